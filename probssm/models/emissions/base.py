"""The emission-family interface, conjugate priors and the helpers the families share."""
from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from probssm.core import checks

LOG_2PI = 1.8378770664093453
REAL = {"constraint": constraints.real}
POSITIVE = {"constraint": constraints.positive}
PSD = {"constraint": constraints.positive_definite}
SIMPLEX = {"constraint": constraints.simplex}
UNIT = {"constraint": constraints.unit_interval}


# ----------------------------------------------------------------------------------------------
# Conjugate priors (MAP M-steps)
# ----------------------------------------------------------------------------------------------
class InverseWishartPrior(NamedTuple):
    """Sigma_k ~ IW(scale, dof): MAP Sigma = (scatter + scale) / (n + dof + D + 1)."""

    scale: jax.Array  # (D, D) or a float (times the identity)
    dof: float


class InverseGammaPrior(NamedTuple):
    """sigma^2_{kd} ~ InvGamma(concentration, rate): MAP = (scatter + 2 rate) / (n + 2 concentration + 2)."""

    concentration: float
    rate: float


class GammaPrior(NamedTuple):
    """lambda_{kd} ~ Gamma(concentration >= 1, rate): MAP = (sum y + a - 1) / (n + rate)."""

    concentration: float
    rate: float


class BetaPrior(NamedTuple):
    """p_{kd} ~ Beta(a >= 1, b >= 1)."""

    concentration1: float
    concentration0: float


class DirichletPrior(NamedTuple):
    """Rows of categorical probabilities ~ Dirichlet(concentration >= 1)."""

    concentration: float


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def float_array(a, name):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    checks.finite(a, name)
    return a


def row_observed(y):
    """(N,) True where the row has no NaN; y with NaN replaced by 0."""
    obs = ~jnp.any(jnp.isnan(y), axis=-1)
    return obs, jnp.where(jnp.isnan(y), 0.0, y)


def keep_where(ok, new, old):
    """Per-state select: ok is (K,), new/old have leading axis K."""
    return jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)


def chol_inv(covs):
    """Inverse Cholesky factors (K, D, D) and the sum of log-diagonals of chol(covs) (K,)."""
    L = jnp.linalg.cholesky(covs)
    eye = jnp.broadcast_to(jnp.eye(covs.shape[-1], dtype=covs.dtype), covs.shape)
    Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
    return Linv, jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)


def mahalanobis(y, means, covs):
    """(T, K) squared Mahalanobis distances of rows of y to each state, and (K,) sum log diag chol.

    Expanded as y'Py - 2 y'P m + m'P m, all in one matrix product of per-row features
    (the D (D + 1) / 2 distinct products y_i y_j, then y) with per-state weights (several
    times faster than whitening every row for every state; the symmetric packing saves 40%
    of the full D^2 product at D = 5), with y and the means centred on the mean of the
    means to limit cancellation.
    """
    D = y.shape[-1]
    centre = jnp.mean(means, 0)
    yc, mc = y - centre, means - centre
    Linv, logdet_half = chol_inv(covs)
    P = jnp.einsum("kji,kjl->kil", Linv, Linv)
    Pm = jnp.einsum("kij,kj->ki", P, mc)
    rows, cols = np.triu_indices(D)
    off_diagonal_twice = jnp.asarray(np.where(rows == cols, 1.0, 2.0), P.dtype)
    features = jnp.concatenate([yc[:, rows] * yc[:, cols], yc], 1)
    weights = jnp.concatenate([P[:, rows, cols] * off_diagonal_twice, -2.0 * Pm], 1)
    maha = features @ weights.T + jnp.sum(mc * Pm, -1)[None]
    return jnp.maximum(maha, 0.0), logdet_half


def valid_covs(covs):
    """(K,) True where every covariance is finite and positive definite."""
    L = jnp.linalg.cholesky(covs)
    d = jnp.diagonal(L, axis1=-2, axis2=-1)
    return jnp.all(jnp.isfinite(L), axis=(-2, -1)) & jnp.all(d > 0, -1)


def scatter(weights, y, means):
    """sum_t w_tk (y_t - m_k)(y_t - m_k)^T for given means (K, D)."""
    n = weights.sum(0)
    s1 = weights.T @ y
    s2 = jnp.einsum("tk,ti,tj->kij", weights, y, y)
    return (s2 - jnp.einsum("ki,kj->kij", means, s1) - jnp.einsum("ki,kj->kij", s1, means)
            + n[:, None, None] * jnp.einsum("ki,kj->kij", means, means))


def iw_log_prior(covs, prior):
    if prior is None:
        return jnp.zeros((), covs.dtype)
    D = covs.shape[-1]
    scale = jnp.broadcast_to(jnp.asarray(prior.scale, covs.dtype) * (jnp.eye(D, dtype=covs.dtype)
                             if jnp.ndim(prior.scale) == 0 else 1.0), (D, D))
    Linv, logdet_half = chol_inv(covs)
    prec = jnp.einsum("kji,kjl->kil", Linv, Linv)
    return jnp.sum(-(prior.dof + D + 1) * logdet_half - 0.5 * jnp.einsum("ij,kji->k", scale, prec))


def covariance_update(scatter, n, prior, old):
    D = old.shape[-1]
    if prior is None:
        new = scatter / n[:, None, None]
    else:
        scale = jnp.asarray(prior.scale, old.dtype)
        scale = scale * jnp.eye(D, dtype=old.dtype) if scale.ndim == 0 else scale
        new = (scatter + scale) / (n + prior.dof + D + 1)[:, None, None]
    new = 0.5 * (new + jnp.swapaxes(new, -1, -2))
    ok = (n > 0) & valid_covs(new)
    return keep_where(ok, new, old)


def check_fixed(fixed, learnable, cls):
    bad = set(fixed) - set(learnable)
    if bad:
        raise ValueError(f"fixed: {cls} has no learnable fields {sorted(bad)}; expected a subset of {list(learnable)}")


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------
class AbstractEmissions(eqx.Module):
    """Per-state emission distributions p(y_t | z_t = k), k = 0..K-1."""

    learnable: ClassVar[tuple] = ()

    @property
    @abc.abstractmethod
    def num_states(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...

    @abc.abstractmethod
    def log_likelihoods(self, emissions, inputs=None) -> jax.Array:
        """(T, D) emissions (and (T, U) inputs) -> (T, K) log-likelihoods; 0 where missing."""

    @abc.abstractmethod
    def distribution(self, state, inputs=None):
        """numpyro distribution of one y_t (event shape (D,)) given z_t = state."""

    @property
    def input_dim(self):
        """Width U of the input rows the family reads; None: undeclared (the default)."""
        return None

    @property
    def num_lags(self) -> int:
        """P > 0 when the inputs of y_t are the lagged observations y_{t-1..t-P} (autoregressive
        families); 0 otherwise (the default)."""
        return 0

    def default_inputs(self, emissions):
        """(T, D) or (B, T, D) emissions -> the inputs used when none are given: the lagged
        observations (first P rows NaN, i.e. missing) for an autoregressive family, else None."""
        return None

    def check_emissions(self, emissions) -> None:
        """Raise ValueError naming ``emissions`` when concrete data (..., D) (NaN = missing) lie
        outside the family's support. Called at public functions only; default: no check."""
        return None

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        """Weighted maximisation; returns a new module. Default: unchanged (no closed form)."""
        return self

    def log_prior(self, prior) -> jax.Array:
        return jnp.zeros(())

    def initialize(self, key, emissions, weights, inputs=None, fixed=frozenset()):
        """Parameters for a random restart from soft assignments ``weights`` (N, K)."""
        return self.m_step(emissions, weights, inputs, None, fixed)


def num_states_dim(means, name):
    if means.ndim != 2:
        raise ValueError(f"{name}: expected shape (K, D), got shape {tuple(means.shape)}")
    return means.shape


def check_support(emissions, name: str, *, integer: bool, low=None, high=None) -> None:
    """ValueError naming ``emissions`` if an observed (non-NaN) value of a concrete array is not
    an integer (when ``integer``) or lies outside [low, high]; ``name`` is the family's name."""
    if not checks.is_concrete(emissions):
        return
    a = np.asarray(emissions, dtype=np.float64)
    v = a[~np.isnan(a)]
    if v.size == 0:
        return
    if integer and not np.all(v == np.round(v)):
        bad = v[v != np.round(v)][0]
        raise ValueError(f"emissions: {name} expects integer values (NaN for missing), found {bad:g}")
    out = np.zeros(v.shape, bool)
    if low is not None:
        out |= v < low
    if high is not None:
        out |= v > high
    if np.any(out):
        bad = v[out][0]
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"emissions: {name} expects values in [{lo}, {hi}] (NaN for missing), found {bad:g}")
