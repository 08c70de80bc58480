"""Gaussian emission families: full and diagonal covariance."""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from probssm.core import checks
from probssm.models.emissions.base import (
    LOG_2PI, POSITIVE, PSD, REAL, AbstractEmissions, covariance_update,
    float_array, iw_log_prior, keep_where, mahalanobis, num_states_dim, row_observed, scatter,
)


class Gaussian(AbstractEmissions):
    """y_t | z_t = k ~ N(means[k], covs[k]).

    Args:
        means: (K, D).
        covs: (K, D, D), positive definite.

    A row with any missing entry counts as missing (likelihood 1).
    """

    means: jax.Array = eqx.field(metadata=REAL)
    covs: jax.Array = eqx.field(metadata=PSD)
    learnable: ClassVar[tuple] = ("means", "covs")

    def __init__(self, means, covs):
        means = float_array(means, "means")
        K, D = num_states_dim(means, "means")
        covs = checks.shape(jnp.asarray(covs, means.dtype), "covs", (K, D, D))
        checks.psd(covs, "covs")
        self.means, self.covs = means, covs

    @property
    def num_states(self):
        return self.means.shape[0]

    @property
    def emission_dim(self):
        return self.means.shape[1]

    def log_likelihoods(self, emissions, inputs=None):
        obs, y = row_observed(emissions)
        maha, logdet_half = mahalanobis(y, self.means, self.covs)
        ll = -0.5 * maha - logdet_half[None] - 0.5 * self.emission_dim * LOG_2PI
        return jnp.where(obs[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        return dist.MultivariateNormal(self.means[state], covariance_matrix=self.covs[state])

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        obs, y = row_observed(emissions)
        w = weights * obs[:, None]
        n = w.sum(0)
        means = self.means
        if "means" not in fixed:
            new = (w.T @ y) / jnp.where(n > 0, n, 1.0)[:, None]
            means = keep_where(n > 0, new, self.means)
        covs = self.covs
        if "covs" not in fixed:
            covs = covariance_update(scatter(w, y, means), n, prior, self.covs)
        return eqx.tree_at(lambda m: (m.means, m.covs), self, (means, covs))

    def log_prior(self, prior):
        return iw_log_prior(self.covs, prior)


class DiagonalGaussian(AbstractEmissions):
    """y_{t,d} | z_t = k ~ N(means[k, d], variances[k, d]), independent over d.

    Args:
        means: (K, D).
        variances: (K, D), positive.

    Missing entries are dropped exactly.
    """

    means: jax.Array = eqx.field(metadata=REAL)
    variances: jax.Array = eqx.field(metadata=POSITIVE)
    learnable: ClassVar[tuple] = ("means", "variances")

    def __init__(self, means, variances):
        means = float_array(means, "means")
        K, D = num_states_dim(means, "means")
        variances = checks.shape(float_array(jnp.asarray(variances, means.dtype), "variances"), "variances", (K, D))
        if checks.is_concrete(variances) and bool(np.any(np.asarray(variances) <= 0)):
            raise ValueError("variances: expected positive values")
        self.means, self.variances = means, variances

    @property
    def num_states(self):
        return self.means.shape[0]

    @property
    def emission_dim(self):
        return self.means.shape[1]

    def log_likelihoods(self, emissions, inputs=None):
        mask = ~jnp.isnan(emissions)
        y = jnp.where(mask, emissions, 0.0)
        prec = 1.0 / self.variances
        # sum_d mask * (-(y - m)^2 / (2 v) - log(2 pi v) / 2), expanded into matrix products
        m = mask.astype(y.dtype)
        quad = (m * y * y) @ prec.T - 2.0 * (y * m) @ (self.means * prec).T + m @ (self.means ** 2 * prec).T
        norm = m @ (jnp.log(self.variances) + LOG_2PI).T
        return -0.5 * (quad + norm)

    def distribution(self, state, inputs=None):
        return dist.Normal(self.means[state], jnp.sqrt(self.variances[state])).to_event(1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        m = (~jnp.isnan(emissions)).astype(weights.dtype)
        y = jnp.where(m > 0, emissions, 0.0)
        n = weights.T @ m  # (K, D)
        s1 = weights.T @ y
        s2 = weights.T @ (y * y)
        means = self.means
        if "means" not in fixed:
            means = jnp.where(n > 0, s1 / jnp.where(n > 0, n, 1.0), self.means)
        variances = self.variances
        if "variances" not in fixed:
            scatter = s2 - 2 * means * s1 + n * means ** 2
            if prior is None:
                new = scatter / jnp.where(n > 0, n, 1.0)
            else:
                new = (scatter + 2 * prior.rate) / (n + 2 * prior.concentration + 2)
            variances = jnp.where((n > 0) & (new > 0) & jnp.isfinite(new), new, self.variances)
        return eqx.tree_at(lambda e: (e.means, e.variances), self, (means, variances))

    def log_prior(self, prior):
        if prior is None:
            return jnp.zeros((), self.variances.dtype)
        return jnp.sum(-(prior.concentration + 1) * jnp.log(self.variances) - prior.rate / self.variances)
