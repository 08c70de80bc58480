"""Multivariate Student-t emissions (robust to outliers)."""
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
    POSITIVE, PSD, REAL, AbstractEmissions, covariance_update,
    float_array, iw_log_prior, keep_where, mahalanobis, num_states_dim, row_observed, scatter,
)


class StudentT(AbstractEmissions):
    """y_t | z_t = k ~ multivariate Student-t(dofs[k], means[k], scales[k]).

    Args:
        means: (K, D).
        scales: (K, D, D), positive definite scale matrices (covariance = scale * nu / (nu - 2)).
        dofs: (K,) degrees of freedom, held fixed by the M-step.

    The M-step is the ECM update with the latent Gamma scale of each row
    (u = (nu + D) / (nu + Mahalanobis^2) at the current parameters), which never
    decreases the likelihood.
    """

    means: jax.Array = eqx.field(metadata=REAL)
    scales: jax.Array = eqx.field(metadata=PSD)
    dofs: jax.Array = eqx.field(metadata=POSITIVE)
    learnable: ClassVar[tuple] = ("means", "scales")

    def __init__(self, means, scales, dofs):
        means = float_array(means, "means")
        K, D = num_states_dim(means, "means")
        scales = checks.shape(jnp.asarray(scales, means.dtype), "scales", (K, D, D))
        checks.psd(scales, "scales")
        dofs = jnp.broadcast_to(jnp.asarray(dofs, means.dtype), (K,))
        if checks.is_concrete(dofs) and bool(np.any(np.asarray(dofs) <= 0)):
            raise ValueError("dofs: expected positive degrees of freedom")
        self.means, self.scales, self.dofs = means, scales, dofs

    @property
    def num_states(self):
        return self.means.shape[0]

    @property
    def emission_dim(self):
        return self.means.shape[1]

    def mahalanobis(self, y):
        return mahalanobis(y, self.means, self.scales)

    def log_likelihoods(self, emissions, inputs=None):
        obs, y = row_observed(emissions)
        D = self.emission_dim
        nu = self.dofs
        maha, logdet_half = self.mahalanobis(y)
        ll = (gammaln(0.5 * (nu + D)) - gammaln(0.5 * nu) - 0.5 * D * jnp.log(nu * jnp.pi) - logdet_half)[None] \
            - 0.5 * (nu + D)[None] * jnp.log1p(maha / nu[None])
        return jnp.where(obs[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        return dist.MultivariateStudentT(self.dofs[state], self.means[state],
                                         jnp.linalg.cholesky(self.scales[state]))

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        obs, y = row_observed(emissions)
        w = weights * obs[:, None]
        D = self.emission_dim
        maha, _ = self.mahalanobis(y)
        u = (self.dofs[None] + D) / (self.dofs[None] + maha)
        wu = w * u
        n, nu_sum = w.sum(0), wu.sum(0)
        means = self.means
        if "means" not in fixed:
            means = keep_where(nu_sum > 0, (wu.T @ y) / jnp.where(nu_sum > 0, nu_sum, 1.0)[:, None], self.means)
        scales = self.scales
        if "scales" not in fixed:
            scales = covariance_update(scatter(wu, y, means), n, prior, self.scales)
        return eqx.tree_at(lambda e: (e.means, e.scales), self, (means, scales))

    def log_prior(self, prior):
        return iw_log_prior(self.scales, prior)
