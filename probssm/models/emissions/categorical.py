"""Categorical label emissions."""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from probssm.core import checks
from probssm.models.emissions.base import (
    SIMPLEX, AbstractEmissions, check_support, float_array,
)


class Categorical(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Categorical(probs[k, d]), independent over d; y holds labels 0..C-1.

    Args:
        probs: (K, D, C) (or (K, C) for one feature, D = 1); rows sum to one.

    Missing entries (NaN) are dropped exactly.
    """

    probs: jax.Array = eqx.field(metadata=SIMPLEX)
    learnable: ClassVar[tuple] = ("probs",)

    def __init__(self, probs):
        probs = float_array(probs, "probs")
        if probs.ndim == 2:
            probs = probs[:, None, :]
        if probs.ndim != 3:
            raise ValueError(f"probs: expected shape (K, D, C) or (K, C), got shape {tuple(probs.shape)}")
        checks.probabilities(probs, "probs")
        self.probs = probs

    @property
    def num_states(self):
        return self.probs.shape[0]

    @property
    def emission_dim(self):
        return self.probs.shape[1]

    @property
    def num_classes(self):
        return self.probs.shape[2]

    def check_emissions(self, emissions) -> None:
        """Labels must be integers in 0..C-1 (NaN = missing)."""
        check_support(emissions, "Categorical", integer=True, low=0, high=self.num_classes - 1)

    def onehot(self, emissions):
        """(T, D) labels (NaN = missing) -> (T, D, C) one-hot rows, zero where missing."""
        m = ~jnp.isnan(emissions)
        labels = jnp.where(m, emissions, 0.0).astype(jnp.int32)
        return jax.nn.one_hot(labels, self.num_classes, dtype=self.probs.dtype) * m[..., None].astype(self.probs.dtype)

    def log_likelihoods(self, emissions, inputs=None):
        m = ~jnp.isnan(emissions)
        labels = jnp.where(m, emissions, 0.0).astype(jnp.int32)  # (T, D)
        logp = jnp.log(self.probs)  # (K, D, C)
        picked = logp[:, jnp.arange(self.emission_dim)[None, :], labels]  # (K, T, D)
        return jnp.sum(jnp.where(m[None], picked, 0.0), -1).T

    def distribution(self, state, inputs=None):
        return dist.Categorical(probs=self.probs[state]).to_event(1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        if "probs" in fixed:
            return self
        counts = jnp.einsum("tk,tdc->kdc", weights, self.onehot(emissions))
        if prior is not None:
            counts = counts + prior.concentration - 1.0
        total = counts.sum(-1, keepdims=True)
        new = counts / jnp.where(total > 0, total, 1.0)
        return eqx.tree_at(lambda e: e.probs, self, jnp.where(total > 0, new, self.probs))

    def log_prior(self, prior):
        if prior is None:
            return jnp.zeros((), self.probs.dtype)
        a = jnp.asarray(prior.concentration, self.probs.dtype)
        return jnp.sum(jnp.where(a == 1.0, 0.0, (a - 1.0) * jnp.log(self.probs)))
