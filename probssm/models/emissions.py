"""Emission families for finite-state models (HMMs and autoregressive HMMs).

Each family is a small `equinox.Module` holding the parameters of all K states
(leading axis K). It gives:

* ``log_likelihoods(emissions, inputs=None) -> (T, K)``: log p(y_t | z_t = k).
  A missing value (NaN) contributes likelihood 1: families whose dimensions are
  conditionally independent (`DiagonalGaussian`, `Poisson`, `Bernoulli`,
  `Categorical`) drop each missing entry exactly; full-covariance families
  (`Gaussian`, `StudentT`, `AutoregressiveGaussian`) treat a row with any NaN as
  missing altogether.
* ``distribution(state, inputs=None)``: the numpyro distribution of one y_t, for the
  protocol (`ps.sample`, particle engines).
* ``m_step(emissions, weights, inputs=None, prior=None, fixed=())``: the closed-form
  weighted maximisation (MAP when a conjugate ``prior`` is given), used by Baum-Welch.
  ``weights`` is (N, K) (posterior state probabilities, zero on padding). A state
  whose total weight is zero, or whose new covariance would not be positive
  definite, keeps its previous parameters, so a fit never produces NaN.
* ``log_prior(prior)``: the log density (up to a constant) of the conjugate prior,
  so Baum-Welch can report the penalised log-likelihood.

Autoregressive dependence enters through inputs: `AutoregressiveGaussian` reads
the lagged observations y_{t-1..t-P} (built by `probssm.core.lagged_inputs`) as
its input row; given no inputs it builds them itself, with the first P rows
missing (the fit conditions on the first P observations).
"""
from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.lags import lagged_inputs
from probssm.core.optim import descend

__all__ = [
    "AbstractEmissions",
    "AbstractGLMEmissions",
    "Categorical",
    "Gaussian",
    "DiagonalGaussian",
    "Poisson",
    "Bernoulli",
    "StudentT",
    "AutoregressiveGaussian",
    "InverseWishartPrior",
    "InverseGammaPrior",
    "GammaPrior",
    "BetaPrior",
    "DirichletPrior",
]

_LOG_2PI = 1.8378770664093453
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
def _float(a, name):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    checks.finite(a, name)
    return a


def _row_observed(y):
    """(N,) True where the row has no NaN; y with NaN replaced by 0."""
    obs = ~jnp.any(jnp.isnan(y), axis=-1)
    return obs, jnp.where(jnp.isnan(y), 0.0, y)


def _keep_where(ok, new, old):
    """Per-state select: ok is (K,), new/old have leading axis K."""
    return jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)


def _chol_inv(covs):
    """Inverse Cholesky factors (K, D, D) and the sum of log-diagonals of chol(covs) (K,)."""
    L = jnp.linalg.cholesky(covs)
    eye = jnp.broadcast_to(jnp.eye(covs.shape[-1], dtype=covs.dtype), covs.shape)
    Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
    return Linv, jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)


def _mahalanobis(y, means, covs):
    """(T, K) squared Mahalanobis distances of rows of y to each state, and (K,) sum log diag chol.

    Expanded as y'Py - 2 y'P m + m'P m (two matrix products; several times faster than
    whitening every row for every state), with y and the means centred on the mean of the
    means to limit cancellation.
    """
    T, D = y.shape
    K = means.shape[0]
    centre = jnp.mean(means, 0)
    yc, mc = y - centre, means - centre
    Linv, logdet_half = _chol_inv(covs)
    P = jnp.einsum("kji,kjl->kil", Linv, Linv)
    Pm = jnp.einsum("kij,kj->ki", P, mc)
    yy = (yc[:, :, None] * yc[:, None, :]).reshape(T, D * D)
    maha = yy @ P.reshape(K, D * D).T - 2.0 * (yc @ Pm.T) + jnp.sum(mc * Pm, -1)[None]
    return jnp.maximum(maha, 0.0), logdet_half


def _valid_covs(covs):
    """(K,) True where every covariance is finite and positive definite."""
    L = jnp.linalg.cholesky(covs)
    d = jnp.diagonal(L, axis1=-2, axis2=-1)
    return jnp.all(jnp.isfinite(L), axis=(-2, -1)) & jnp.all(d > 0, -1)


def _scatter(weights, y, means):
    """sum_t w_tk (y_t - m_k)(y_t - m_k)^T for given means (K, D)."""
    n = weights.sum(0)
    s1 = weights.T @ y
    s2 = jnp.einsum("tk,ti,tj->kij", weights, y, y)
    return (s2 - jnp.einsum("ki,kj->kij", means, s1) - jnp.einsum("ki,kj->kij", s1, means)
            + n[:, None, None] * jnp.einsum("ki,kj->kij", means, means))


def _iw_log_prior(covs, prior):
    if prior is None:
        return jnp.zeros((), covs.dtype)
    D = covs.shape[-1]
    scale = jnp.broadcast_to(jnp.asarray(prior.scale, covs.dtype) * (jnp.eye(D, dtype=covs.dtype)
                             if jnp.ndim(prior.scale) == 0 else 1.0), (D, D))
    Linv, logdet_half = _chol_inv(covs)
    prec = jnp.einsum("kji,kjl->kil", Linv, Linv)
    return jnp.sum(-(prior.dof + D + 1) * logdet_half - 0.5 * jnp.einsum("ij,kji->k", scale, prec))


def _covariance_update(scatter, n, prior, old):
    D = old.shape[-1]
    if prior is None:
        new = scatter / n[:, None, None]
    else:
        scale = jnp.asarray(prior.scale, old.dtype)
        scale = scale * jnp.eye(D, dtype=old.dtype) if scale.ndim == 0 else scale
        new = (scatter + scale) / (n + prior.dof + D + 1)[:, None, None]
    new = 0.5 * (new + jnp.swapaxes(new, -1, -2))
    ok = (n > 0) & _valid_covs(new)
    return _keep_where(ok, new, old)


def _check_fixed(fixed, learnable, cls):
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

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        """Weighted maximisation; returns a new module. Default: unchanged (no closed form)."""
        return self

    def log_prior(self, prior) -> jax.Array:
        return jnp.zeros(())

    def initialize(self, key, emissions, weights, inputs=None, fixed=frozenset()):
        """Parameters for a random restart from soft assignments ``weights`` (N, K)."""
        return self.m_step(emissions, weights, inputs, None, fixed)


def _num_states_dim(means, name):
    if means.ndim != 2:
        raise ValueError(f"{name}: expected shape (K, D), got shape {tuple(means.shape)}")
    return means.shape


# ----------------------------------------------------------------------------------------------
# Gaussian families
# ----------------------------------------------------------------------------------------------
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
        means = _float(means, "means")
        K, D = _num_states_dim(means, "means")
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
        obs, y = _row_observed(emissions)
        maha, logdet_half = _mahalanobis(y, self.means, self.covs)
        ll = -0.5 * maha - logdet_half[None] - 0.5 * self.emission_dim * _LOG_2PI
        return jnp.where(obs[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        return dist.MultivariateNormal(self.means[state], covariance_matrix=self.covs[state])

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        obs, y = _row_observed(emissions)
        w = weights * obs[:, None]
        n = w.sum(0)
        means = self.means
        if "means" not in fixed:
            new = (w.T @ y) / jnp.where(n > 0, n, 1.0)[:, None]
            means = _keep_where(n > 0, new, self.means)
        covs = self.covs
        if "covs" not in fixed:
            covs = _covariance_update(_scatter(w, y, means), n, prior, self.covs)
        return eqx.tree_at(lambda m: (m.means, m.covs), self, (means, covs))

    def log_prior(self, prior):
        return _iw_log_prior(self.covs, prior)


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
        means = _float(means, "means")
        K, D = _num_states_dim(means, "means")
        variances = checks.shape(_float(jnp.asarray(variances, means.dtype), "variances"), "variances", (K, D))
        if checks.is_concrete(variances) and bool(jnp.any(variances <= 0)):
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
        norm = m @ (jnp.log(self.variances) + _LOG_2PI).T
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
        means = _float(means, "means")
        K, D = _num_states_dim(means, "means")
        scales = checks.shape(jnp.asarray(scales, means.dtype), "scales", (K, D, D))
        checks.psd(scales, "scales")
        dofs = jnp.broadcast_to(jnp.asarray(dofs, means.dtype), (K,))
        if checks.is_concrete(dofs) and bool(jnp.any(dofs <= 0)):
            raise ValueError("dofs: expected positive degrees of freedom")
        self.means, self.scales, self.dofs = means, scales, dofs

    @property
    def num_states(self):
        return self.means.shape[0]

    @property
    def emission_dim(self):
        return self.means.shape[1]

    def _mahalanobis(self, y):
        return _mahalanobis(y, self.means, self.scales)

    def log_likelihoods(self, emissions, inputs=None):
        obs, y = _row_observed(emissions)
        D = self.emission_dim
        nu = self.dofs
        maha, logdet_half = self._mahalanobis(y)
        ll = (gammaln(0.5 * (nu + D)) - gammaln(0.5 * nu) - 0.5 * D * jnp.log(nu * jnp.pi) - logdet_half)[None] \
            - 0.5 * (nu + D)[None] * jnp.log1p(maha / nu[None])
        return jnp.where(obs[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        return dist.MultivariateStudentT(self.dofs[state], self.means[state],
                                         jnp.linalg.cholesky(self.scales[state]))

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        obs, y = _row_observed(emissions)
        w = weights * obs[:, None]
        D = self.emission_dim
        maha, _ = self._mahalanobis(y)
        u = (self.dofs[None] + D) / (self.dofs[None] + maha)
        wu = w * u
        n, nu_sum = w.sum(0), wu.sum(0)
        means = self.means
        if "means" not in fixed:
            means = _keep_where(nu_sum > 0, (wu.T @ y) / jnp.where(nu_sum > 0, nu_sum, 1.0)[:, None], self.means)
        scales = self.scales
        if "scales" not in fixed:
            scales = _covariance_update(_scatter(wu, y, means), n, prior, self.scales)
        return eqx.tree_at(lambda e: (e.means, e.scales), self, (means, scales))

    def log_prior(self, prior):
        return _iw_log_prior(self.scales, prior)


class AutoregressiveGaussian(AbstractEmissions):
    """y_t | z_t = k, x_t ~ N(weights[k] @ x_t + biases[k], covs[k]), x_t the input row.

    For an autoregressive HMM of order P, x_t = (y_{t-1}, ..., y_{t-P}) stacked as
    by `probssm.core.lagged_inputs` (U = P * D). Given no inputs, the module builds
    them from the emissions itself, with the first P rows missing. ARPHMM's
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
        weights = _float(weights, "weights")
        if weights.ndim != 3:
            raise ValueError(f"weights: expected shape (K, D, U), got shape {tuple(weights.shape)}")
        K, D, U = weights.shape
        biases = checks.shape(_float(jnp.asarray(biases, weights.dtype), "biases"), "biases", (K, D))
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
    def input_dim(self):
        return self.weights.shape[2]

    @property
    def num_lags(self):
        return self.input_dim // self.emission_dim

    def _inputs(self, emissions, inputs):
        if inputs is None:
            return lagged_inputs(emissions, self.num_lags, fill_value=jnp.nan)
        return inputs

    def log_likelihoods(self, emissions, inputs=None):
        x = self._inputs(emissions, inputs)
        obs_y, y = _row_observed(emissions)
        obs_x, x = _row_observed(x)
        Linv, logdet_half = _chol_inv(self.covs)
        mean = jnp.einsum("kdu,tu->tkd", self.weights, x) + self.biases[None]
        z = jnp.einsum("kde,tke->tkd", Linv, y[:, None, :] - mean)
        ll = -0.5 * jnp.sum(z * z, -1) - logdet_half[None] - 0.5 * self.emission_dim * _LOG_2PI
        return jnp.where((obs_y & obs_x)[:, None], ll, 0.0)

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: AutoregressiveGaussian.distribution needs the lagged observations x_t")
        mean = self.weights[state] @ inputs + self.biases[state]
        return dist.MultivariateNormal(mean, covariance_matrix=self.covs[state])

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        x = self._inputs(emissions, inputs)
        obs_y, y = _row_observed(emissions)
        obs_x, x = _row_observed(x)
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
                Sxy = jnp.einsum("tk,ti,td->kid", w, X, y) - jnp.einsum("kij,kd->kid", Sxx, b)
            coef = jnp.linalg.solve(Sxx, Sxy)  # (K, U(+1), D)
            ok = (n > 0) & jnp.all(jnp.isfinite(coef), axis=(-2, -1))
            W = _keep_where(ok, jnp.swapaxes(coef[:, :U], -1, -2), self.weights)
            if fit_b:
                b = _keep_where(ok, coef[:, U], self.biases)
        elif fit_b:
            resid_sum = w.T @ y - jnp.einsum("tk,kdu,tu->kd", w, W, x)
            b = _keep_where(n > 0, resid_sum / jnp.where(n > 0, n, 1.0)[:, None], self.biases)
        covs = self.covs
        if "covs" not in fixed:
            r = y[:, None, :] - (jnp.einsum("kdu,tu->tkd", W, x) + b[None])  # (T, K, D)
            scatter = jnp.einsum("tk,tki,tkj->kij", w, r, r)
            covs = _covariance_update(scatter, n, prior, self.covs)
        return eqx.tree_at(lambda e: (e.weights, e.biases, e.covs), self, (W, b, covs))

    def log_prior(self, prior):
        return _iw_log_prior(self.covs, prior)


# ----------------------------------------------------------------------------------------------
# Count and binary families
# ----------------------------------------------------------------------------------------------
class Poisson(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Poisson(rates[k, d]), independent over d. Missing entries dropped."""

    rates: jax.Array = eqx.field(metadata=POSITIVE)
    learnable: ClassVar[tuple] = ("rates",)

    def __init__(self, rates):
        rates = _float(rates, "rates")
        _num_states_dim(rates, "rates")
        if checks.is_concrete(rates) and bool(jnp.any(rates <= 0)):
            raise ValueError("rates: expected positive rates")
        self.rates = rates

    @property
    def num_states(self):
        return self.rates.shape[0]

    @property
    def emission_dim(self):
        return self.rates.shape[1]

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


class Bernoulli(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Bernoulli(probs[k, d]), independent over d. Missing entries dropped."""

    probs: jax.Array = eqx.field(metadata=UNIT)
    learnable: ClassVar[tuple] = ("probs",)

    def __init__(self, probs):
        probs = _float(probs, "probs")
        _num_states_dim(probs, "probs")
        if checks.is_concrete(probs) and bool(jnp.any((probs < 0) | (probs > 1))):
            raise ValueError("probs: expected probabilities in [0, 1]")
        self.probs = probs

    @property
    def num_states(self):
        return self.probs.shape[0]

    @property
    def emission_dim(self):
        return self.probs.shape[1]

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


class Categorical(AbstractEmissions):
    """y_{t,d} | z_t = k ~ Categorical(probs[k, d]), independent over d; y holds labels 0..C-1.

    Args:
        probs: (K, D, C) (or (K, C) for one feature, D = 1); rows sum to one.

    Missing entries (NaN) are dropped exactly.
    """

    probs: jax.Array = eqx.field(metadata=SIMPLEX)
    learnable: ClassVar[tuple] = ("probs",)

    def __init__(self, probs):
        probs = _float(probs, "probs")
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

    def _onehot(self, emissions):
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
        counts = jnp.einsum("tk,tdc->kdc", weights, self._onehot(emissions))
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


# ----------------------------------------------------------------------------------------------
# GLM interface (implemented by the HMM-GLM models)
# ----------------------------------------------------------------------------------------------
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
