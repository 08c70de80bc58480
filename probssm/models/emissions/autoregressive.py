"""Autoregressive Gaussian emissions: the ARHMM / ARPHMM family."""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from probssm.core import checks
from probssm.core.lags import lagged_inputs
from probssm.models.emissions.base import (
    LOG_2PI, PSD, REAL, AbstractEmissions, chol_inv, covariance_update,
    float_array, iw_log_prior, keep_where, row_observed,
)


class AutoregressiveGaussian(AbstractEmissions):
    """y_t | z_t = k, x_t ~ N(weights[k] @ x_t + biases[k], covs[k]), x_t the input row.

    For an autoregressive HMM of order P, x_t = (y_{t-1}, ..., y_{t-P}) stacked as
    by `probssm.core.lagged_inputs` (U = P * D); the family declares ``num_lags = P``
    and `default_inputs` builds them from the emissions, with the first P rows missing
    (used when no inputs are given). ARPHMM's
    y_t = -sum_p b_{k,p} y_{t-p} + e_t is this with weights = -b (and biases fixed
    at zero if wanted, via ``fixed=("emissions.biases",)``).

    Args:
        weights: (K, D, U).
        biases: (K, D).
        covs: (K, D, D).

    A row whose y_t or x_t has a NaN is missing (likelihood 1).
    """

    weights: jax.Array = eqx.field(metadata=REAL)
    biases: jax.Array = eqx.field(metadata=REAL)
    covs: jax.Array = eqx.field(metadata=PSD)
    learnable: ClassVar[tuple] = ("weights", "biases", "covs")

    def __init__(self, weights, biases, covs):
        weights = float_array(weights, "weights")
        if weights.ndim != 3:
            raise ValueError(f"weights: expected shape (K, D, U), got shape {tuple(weights.shape)}")
        K, D, U = weights.shape
        biases = checks.shape(float_array(jnp.asarray(biases, weights.dtype), "biases"), "biases", (K, D))
        covs = checks.shape(jnp.asarray(covs, weights.dtype), "covs", (K, D, D))
        checks.psd(covs, "covs")
        self.weights, self.biases, self.covs = weights, biases, covs

    @property
    def num_states(self):
        return self.weights.shape[0]

    @property
    def emission_dim(self):
        return self.weights.shape[1]

    @property
    def input_dim(self) -> int:
        """U, the width of the input row x_t."""
        return self.weights.shape[2]

    @property
    def num_lags(self) -> int:
        """P = U / D: the inputs are the lagged observations (0 when U is not a multiple of D,
        i.e. the inputs are something else and must be passed explicitly)."""
        U, D = self.input_dim, self.emission_dim
        return U // D if U % D == 0 else 0

    def default_inputs(self, emissions):
        """(T, D) or (B, T, D) -> (T, P * D) or (B, T, P * D): y_{t-1..t-P}, first P rows NaN."""
        if self.num_lags == 0:
            return None
        return lagged_inputs(emissions, self.num_lags, fill_value=jnp.nan)

    def _x(self, emissions, inputs):
        if inputs is not None:
            return inputs
        x = self.default_inputs(emissions)
        if x is None:
            raise ValueError(f"inputs: expected ({emissions.shape[0]}, {self.input_dim}) input rows; "
                             "they are not lagged observations (U is not a multiple of D)")
        return x

    def log_likelihoods(self, emissions, inputs=None):
        x = self._x(emissions, inputs)
        obs_y, y = row_observed(emissions)
        obs_x, x = row_observed(x)
        Linv, logdet_half = chol_inv(self.covs)
        mean = jnp.einsum("kdu,tu->tkd", self.weights, x) + self.biases[None]
        z = jnp.einsum("kde,tke->tkd", Linv, y[:, None, :] - mean)
        ll = -0.5 * jnp.sum(z * z, -1) - logdet_half[None] - 0.5 * self.emission_dim * LOG_2PI
        return jnp.where((obs_y & obs_x)[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: AutoregressiveGaussian.distribution needs the lagged observations x_t")
        mean = self.weights[state] @ inputs + self.biases[state]
        return dist.MultivariateNormal(mean, covariance_matrix=self.covs[state])

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        x = self._x(emissions, inputs)
        obs_y, y = row_observed(emissions)
        obs_x, x = row_observed(x)
        w = weights * (obs_y & obs_x)[:, None]
        n = w.sum(0)
        K, D, U = self.weights.shape
        W, b = self.weights, self.biases
        fit_w, fit_b = "weights" not in fixed, "biases" not in fixed
        if fit_w:
            if fit_b:
                X = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], -1)
                target = y
            else:
                X = x
                target = None
            Sxx = jnp.einsum("tk,ti,tj->kij", w, X, X)
            if fit_b:
                Sxy = jnp.einsum("tk,ti,td->kid", w, X, target)
            else:
                # sum_t w_tk x_t (y_t - b_k)^T
                Sxy = jnp.einsum("tk,ti,td->kid", w, X, y) - jnp.einsum("tk,ti,kd->kid", w, X, b)
            coef = jnp.linalg.solve(Sxx, Sxy)  # (K, U(+1), D)
            ok = (n > 0) & jnp.all(jnp.isfinite(coef), axis=(-2, -1))
            W = keep_where(ok, jnp.swapaxes(coef[:, :U], -1, -2), self.weights)
            if fit_b:
                b = keep_where(ok, coef[:, U], self.biases)
        elif fit_b:
            resid_sum = w.T @ y - jnp.einsum("tk,kdu,tu->kd", w, W, x)
            b = keep_where(n > 0, resid_sum / jnp.where(n > 0, n, 1.0)[:, None], self.biases)
        covs = self.covs
        if "covs" not in fixed:
            r = y[:, None, :] - (jnp.einsum("kdu,tu->tkd", W, x) + b[None])  # (T, K, D)
            scatter = jnp.einsum("tk,tki,tkj->kij", w, r, r)
            covs = covariance_update(scatter, n, prior, self.covs)
        return eqx.tree_at(lambda e: (e.weights, e.biases, e.covs), self, (W, b, covs))

    def log_prior(self, prior):
        return iw_log_prior(self.covs, prior)
