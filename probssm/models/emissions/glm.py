"""Generalised linear emissions (the HMM-GLM's families build on this interface)."""
from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from probssm.core.optim import descend
from probssm.models.emissions.base import (
    AbstractEmissions,
)


class AbstractGLMEmissions(AbstractEmissions):
    """Generalised linear emissions: y_{t,d} | z_t = k ~ F(g(biases[k, d] + weights[k, d] @ x_t)).

    Subclasses hold ``weights`` (K, D, U) and ``biases`` (K, D) and define
    `mean_function` (the inverse link g) and `log_prob` (elementwise log density of
    y given the mean). The per-state log-likelihoods follow; missing entries are
    dropped. There is no closed-form M-step: `m_step` takes ``num_m_steps`` Adam
    steps on the weighted expected log-likelihood plus `log_prior` (a generalised
    EM step), which subclasses may override with something better.
    """

    weights: eqx.AbstractVar[jax.Array]
    biases: eqx.AbstractVar[jax.Array]
    learnable: ClassVar[tuple] = ("weights", "biases")
    num_m_steps: ClassVar[int] = 50
    learning_rate: ClassVar[float] = 1e-2

    @abc.abstractmethod
    def mean_function(self, eta):
        """Inverse link g: linear predictor -> mean of y."""

    @abc.abstractmethod
    def log_prob(self, y, mean):
        """Elementwise log p(y | mean)."""

    @property
    def num_states(self):
        return self.weights.shape[0]

    @property
    def emission_dim(self):
        return self.weights.shape[1]

    def predictor(self, inputs):
        """(T, U) inputs -> (T, K, D) linear predictor."""
        return jnp.einsum("kdu,tu->tkd", self.weights, inputs) + self.biases[None]

    def log_likelihoods(self, emissions, inputs=None):
        if inputs is None:
            raise ValueError("inputs: GLM emissions need inputs (T, U)")
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        lp = self.log_prob(y[:, None, :], self.mean_function(self.predictor(jnp.nan_to_num(inputs))))
        return jnp.sum(jnp.where(m[:, None, :], lp, 0.0), -1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        import optax

        names = tuple(n for n in self.learnable if n not in fixed)
        if not names:
            return self
        params = {n: getattr(self, n) for n in names}
        num_obs = jnp.maximum(weights.sum(), 1.0)

        def loss(p):
            e = eqx.tree_at(lambda s: tuple(getattr(s, n) for n in names), self, tuple(p[n] for n in names))
            return -(jnp.sum(weights * e.log_likelihoods(emissions, inputs)) + e.log_prior(prior)) / num_obs

        params = descend(loss, params, optax.adam(self.learning_rate), self.num_m_steps)
        return eqx.tree_at(lambda s: tuple(getattr(s, n) for n in names), self, tuple(params[n] for n in names))
