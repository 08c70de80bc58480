"""Poisson count emissions."""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln

from probssm.core import checks
from probssm.models.emissions.base import (
    POSITIVE, AbstractEmissions, check_support, float_array, num_states_dim,
)


class Poisson(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Poisson(rates[k, d]), independent over d. Missing entries dropped."""

    rates: jax.Array = eqx.field(metadata=POSITIVE)
    learnable: ClassVar[tuple] = ("rates",)

    def __init__(self, rates):
        rates = float_array(rates, "rates")
        num_states_dim(rates, "rates")
        if checks.is_concrete(rates) and bool(np.any(np.asarray(rates) <= 0)):
            raise ValueError("rates: expected positive rates")
        self.rates = rates

    @property
    def num_states(self):
        return self.rates.shape[0]

    @property
    def emission_dim(self):
        return self.rates.shape[1]

    def check_emissions(self, emissions) -> None:
        """Counts must be non-negative integers (NaN = missing)."""
        check_support(emissions, "Poisson", integer=True, low=0)

    def log_likelihoods(self, emissions, inputs=None):
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        mf = m.astype(y.dtype)
        return y @ jnp.log(self.rates).T - mf @ self.rates.T - jnp.sum(gammaln(y + 1.0) * mf, -1, keepdims=True)

    def distribution(self, state, inputs=None):
        return dist.Poisson(self.rates[state]).to_event(1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        if "rates" in fixed:
            return self
        m = (~jnp.isnan(emissions)).astype(weights.dtype)
        y = jnp.where(m > 0, emissions, 0.0)
        n, s = weights.T @ m, weights.T @ y
        if prior is not None:
            s, n = s + prior.concentration - 1.0, n + prior.rate
        new = s / jnp.where(n > 0, n, 1.0)
        return eqx.tree_at(lambda e: e.rates, self, jnp.where((n > 0) & (new > 0), new, self.rates))

    def log_prior(self, prior):
        if prior is None:
            return jnp.zeros((), self.rates.dtype)
        return jnp.sum((prior.concentration - 1.0) * jnp.log(self.rates) - prior.rate * self.rates)
