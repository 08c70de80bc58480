"""Bernoulli binary emissions."""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from probssm.core import checks
from probssm.models.emissions.base import (
    UNIT, AbstractEmissions, check_support, float_array, num_states_dim,
)


class Bernoulli(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Bernoulli(probs[k, d]), independent over d. Missing entries dropped."""

    probs: jax.Array = eqx.field(metadata=UNIT)
    learnable: ClassVar[tuple] = ("probs",)

    def __init__(self, probs):
        probs = float_array(probs, "probs")
        num_states_dim(probs, "probs")
        if checks.is_concrete(probs) and bool(np.any((np.asarray(probs) < 0) | (np.asarray(probs) > 1))):
            raise ValueError("probs: expected probabilities in [0, 1]")
        self.probs = probs

    @property
    def num_states(self):
        return self.probs.shape[0]

    @property
    def emission_dim(self):
        return self.probs.shape[1]

    def check_emissions(self, emissions) -> None:
        """Values must be 0 or 1 (NaN = missing)."""
        check_support(emissions, "Bernoulli", integer=True, low=0, high=1)

    def log_likelihoods(self, emissions, inputs=None):
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        mf = m.astype(y.dtype)
        logp, log1mp = jnp.log(self.probs), jnp.log1p(-self.probs)
        # (y log p + (1 - y) log(1 - p)); guarded so 0 * log 0 is 0
        floor = jnp.finfo(logp.dtype).min / 4
        a = jnp.where(jnp.isfinite(logp), logp, floor)
        b = jnp.where(jnp.isfinite(log1mp), log1mp, floor)
        return (y * mf) @ a.T + ((1.0 - y) * mf) @ b.T

    def distribution(self, state, inputs=None):
        return dist.Bernoulli(probs=self.probs[state]).to_event(1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        if "probs" in fixed:
            return self
        m = (~jnp.isnan(emissions)).astype(weights.dtype)
        y = jnp.where(m > 0, emissions, 0.0)
        n, s = weights.T @ m, weights.T @ y
        if prior is not None:
            s = s + prior.concentration1 - 1.0
            n = n + prior.concentration1 + prior.concentration0 - 2.0
        new = jnp.clip(s / jnp.where(n > 0, n, 1.0), 0.0, 1.0)
        return eqx.tree_at(lambda e: e.probs, self, jnp.where(n > 0, new, self.probs))

    def log_prior(self, prior):
        if prior is None:
            return jnp.zeros((), self.probs.dtype)
        p = self.probs
        return jnp.sum(jnp.where(prior.concentration1 == 1.0, 0.0, (prior.concentration1 - 1.0) * jnp.log(p))
                       + jnp.where(prior.concentration0 == 1.0, 0.0, (prior.concentration0 - 1.0) * jnp.log1p(-p)))
