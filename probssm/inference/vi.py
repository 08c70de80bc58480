"""Variational inference for a linear-Gaussian prior with a non-Gaussian emission.

The prior is any `AbstractLinearGaussianSSM`; from its ``linear_gaussian_params`` the
engine reads the dynamics (m1, P1, F, b, Q) and the *latent linear predictor*

    f_t = H_t z_t + d_t                       (shape (p,))

and it IGNORES the prior's emission covariance R: the observation model is the
``likelihood`` p(y_t | f_t) instead. Each p(y_t | f_t) is replaced by a Gaussian site
N(y~_t; f_t, V~_t), kept in natural form (``Sites``: nat1 = V~^{-1} y~, precision = V~^{-1};
precision 0 = no site). The Kalman smoother on the sites (emission covariance V~_t,
emissions y~_t) gives q(z) and log Z, and

    ELBO = sum_t E_q[log p(y_t | f_t)] - sum_t E_q[log N(y~_t; f_t, V~_t)] + log Z
         = E_q[log p(y | f)] - KL(q(z) || p(z)),

a lower bound on log p(y) for ANY sites, whichever method produced them.

Site updates (``method``), with beta = ``step_size`` and (m_t, S_t) the marginal of f_t under q:

* ``"cvi"`` conjugate-computation VI (Khan & Lin, AISTATS 2017): with the expected
  log-likelihood L_t(m, S) = E_{N(f; m, S)}[log p(y_t | f)],
  precision <- (1 - beta) precision + beta * (-2 dL/dS),
  nat1 <- (1 - beta) nat1 + beta * (dL/dm + (-2 dL/dS) m)
  (the gradient w.r.t. the mean parameters (m, S + m m^T) in natural form). beta = 1 on a
  Gaussian likelihood gives the exact posterior in one step.
* ``"laplace"``: Newton on the posterior mode; the site is the second-order expansion of
  log p(y_t | f) at f = m_t (precision = minus the Hessian, nat1 = gradient + precision m_t),
  so one Kalman smoother pass is one Newton step; mixed with the same beta.
* ``"pl"`` posterior linearisation: statistical linear regression of the conditional mean
  E[y|f] under q(f_t) (y ~ A f + b + N(0, Omega)), giving precision A^T Omega^{-1} A and
  nat1 = A^T Omega^{-1} (y - b); iterated with the same beta.

The loop `fit` compiles (one `lax.scan`, compiled once per shape and static option)::

    sites = init_sites (default: none);  q = smoother(sites)
    for i in range(num_iters):
        new = target(method, q marginals of f, y)               # per-step site targets
        sites = (1 - beta) * sites + beta * new                 # natural parameters
        q, log Z = Kalman smoother on the sites
        elbo_history[i] = ELBO(q, sites)

Expected log-likelihoods are in closed form where one exists (Poisson with log link,
Gamma with log-mean link, Gaussian, heteroscedastic Gaussian), otherwise by Gauss-Hermite
quadrature of ``order`` nodes per latent dimension (1-D per entry for likelihoods that
factorise over the entries of y, a tensor product over p otherwise); their gradients
with respect to (m, S) are by autodiff, exact for the quadrature rule. Site precisions
are kept positive definite: eigenvalues below sqrt(machine epsilon) are raised to it
(never active for log-concave likelihoods: Poisson, Bernoulli, Gamma, Gaussian, away from
extreme predictors; active where a Student-t or heteroscedastic likelihood has positive
curvature).

Missing data: NaN entries of y. A likelihood that factorises over entries
(`AbstractElementwiseLikelihood`) drops exactly the missing entries; a row-level one
(`AbstractRowLikelihood`: heteroscedastic Gaussian, a user `Likelihood`) drops a row with
any NaN. A dropped site has precision 0 and its entries are skipped by the Kalman smoother.
"""
from __future__ import annotations

import abc
import functools
from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from probssm.core import checks, params as P
from probssm.core.linalg import symmetrize
from probssm.core.protocol import AbstractLinearGaussianSSM, LinearGaussianParams
from probssm.inference import kalman

__all__ = ["AbstractLikelihood", "AbstractElementwiseLikelihood", "AbstractRowLikelihood", "Poisson", "Bernoulli",
           "StudentT", "Gamma", "Gaussian", "HeteroscedasticGaussian", "Likelihood", "Sites", "VIResult",
           "METHODS", "fit", "elbo", "update_sites", "initial_sites", "gauss_hermite", "check_arguments",
           "CheckedArguments"]

METHODS = ("cvi", "laplace", "pl")
POSITIVE = {"constraint": constraints.positive}
_LOG_2PI = 1.8378770664093453


# ----------------------------------------------------------------------------------------------
# Quadrature and small helpers
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hermite_numpy(order: int, dim: int):
    x, w = np.polynomial.hermite_e.hermegauss(order)  # weight exp(-x^2 / 2)
    w = w / np.sqrt(2.0 * np.pi)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], axis=-1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), axis=-1).reshape(-1, dim), axis=-1)
    return nodes, weights


def gauss_hermite(order: int, dim: int, dtype=None):
    """Tensor-product Gauss-Hermite rule for N(0, I_dim): ``(nodes (order**dim, dim), weights)``,
    weights summing to one; E[g(x)] ~ sum_i w_i g(x_i), exact for polynomials of degree < 2 order
    in each coordinate."""
    nodes, weights = _hermite_numpy(int(order), int(dim))
    dtype = dtype or jnp.result_type(float)
    return jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)


def _floor(dtype) -> float:
    # below this a site precision is treated as zero curvature: keeps V~ = precision^{-1} finite
    return float(np.sqrt(np.finfo(dtype).eps))


def _floor_psd(prec, keep):
    """Symmetric ``prec`` (p, p) with eigenvalues raised to the floor, restricted to ``keep`` (p,)."""
    floor = _floor(prec.dtype)
    if prec.shape[-1] == 1:
        out = jnp.maximum(prec, floor)
    else:
        vals, vecs = jnp.linalg.eigh(symmetrize(prec))
        out = (vecs * jnp.maximum(vals, floor)) @ vecs.T
    k = keep.astype(prec.dtype)
    return symmetrize(out) * k[:, None] * k[None, :]


def _site(grad, prec, m, keep):
    """Natural parameters of the site with curvature ``prec`` whose mean is one Newton step from
    ``m``: y~ = m + prec^{-1} grad, i.e. nat1 = grad + prec m; entries outside ``keep`` zeroed."""
    k = keep.astype(m.dtype)
    return (grad + prec @ m) * k, prec


# ----------------------------------------------------------------------------------------------
# Likelihoods
# ----------------------------------------------------------------------------------------------
class AbstractLikelihood(eqx.Module):
    """An emission p(y_t | f_t) on the latent predictor f_t (p,), for observed rows y_t (D,).

    A likelihood declares how many latent functions it reads per observed column
    (`latent_dim`), which latent components a partly observed row informs (`site_mask`),
    its support (`check_data`), and the three site targets of the methods. The concrete
    families derive from `AbstractElementwiseLikelihood` (factorised over entries) or
    `AbstractRowLikelihood` (one joint factor per row).

    Methods take one time step: ``y`` (D,) with missing entries already replaced by
    `fill_value`, ``mask`` (D,) bool (True = observed), ``m`` (p,), ``S`` (p, p).
    """

    def latent_dim(self, data_dim: int) -> int:
        """p, the number of latent functions for data rows of width ``data_dim``."""
        return data_dim

    def data_dim(self, latent_dim: int) -> Optional[int]:
        """D, the data width that goes with ``latent_dim`` latent functions (None: none does)."""
        return latent_dim

    @property
    def fill_value(self) -> float:
        """A value inside the support, put at missing entries so no NaN reaches a gradient."""
        return 0.0

    def check_data(self, y: np.ndarray) -> None:
        """Raise ValueError naming ``y`` when concrete observed values (1-D, NaN removed) lie
        outside the support. Default: any real value."""
        return None

    @abc.abstractmethod
    def site_mask(self, mask):
        """(D,) observed entries -> (p,) latent components that receive a site."""

    @abc.abstractmethod
    def log_prob(self, y, f, mask):
        """log p(y_obs | f), a scalar; missing entries contribute nothing."""

    @abc.abstractmethod
    def expected_log_prob(self, y, mask, m, S, order: int = 20):
        """E_{N(f; m, S)}[log p(y_obs | f)], a scalar (closed form or Gauss-Hermite)."""

    @abc.abstractmethod
    def cvi_site(self, y, mask, m, S, order: int = 20):
        """(nat1 (p,), precision (p, p)): the natural gradient of `expected_log_prob`."""

    @abc.abstractmethod
    def laplace_site(self, y, mask, f):
        """(nat1, precision): the second-order expansion of `log_prob` at ``f``."""

    @abc.abstractmethod
    def pl_site(self, y, mask, m, S, order: int = 20):
        """(nat1, precision): statistical linear regression of E[y | f] under N(m, S)."""


class AbstractElementwiseLikelihood(AbstractLikelihood):
    """p(y | f) = prod_j p(y_j | f_j): entry j of y reads latent f_j (p = D); missing entries
    are dropped exactly. Subclasses implement `log_prob_entries` (broadcasting) and
    `conditional_moments`, and override `expected_entries` where a closed form exists."""

    @abc.abstractmethod
    def log_prob_entries(self, y, f):
        """log p(y_j | f_j) elementwise (broadcasting y against f)."""

    @abc.abstractmethod
    def conditional_moments(self, f):
        """(E[y_j | f_j], Var[y_j | f_j]) elementwise."""

    def expected_entries(self, y, m, v, order: int = 20):
        """E_{N(f_j; m_j, v_j)}[log p(y_j | f_j)] per entry; Gauss-Hermite by default."""
        x, w = gauss_hermite(order, 1, m.dtype)
        f = m[:, None] + jnp.sqrt(v)[:, None] * x[None, :, 0]
        return self.log_prob_entries(y[:, None], f) @ w

    def site_mask(self, mask):
        return mask

    def log_prob(self, y, f, mask):
        return jnp.sum(jnp.where(mask, self.log_prob_entries(y, f), 0.0))

    def expected_log_prob(self, y, mask, m, S, order: int = 20):
        return jnp.sum(jnp.where(mask, self.expected_entries(y, m, jnp.diagonal(S), order), 0.0))

    def cvi_site(self, y, mask, m, S, order: int = 20):
        v = jnp.diagonal(S)
        total = lambda mm, vv: jnp.sum(jnp.where(mask, self.expected_entries(y, mm, vv, order), 0.0))
        gm, gv = jax.grad(total, argnums=(0, 1))(m, v)
        prec = _floor_diag(-2.0 * gv, mask)
        return _site(gm, prec, m, mask)

    def laplace_site(self, y, mask, f):
        total = lambda x: self.log_prob(y, x, mask)
        grad_fn = jax.grad(total)
        g = grad_fn(f)
        # the Hessian of a sum of one-entry terms is diagonal: its diagonal is the gradient of sum(g)
        h = jax.grad(lambda x: jnp.sum(grad_fn(x)))(f)
        return _site(g, _floor_diag(-h, mask), f, mask)

    def pl_site(self, y, mask, m, S, order: int = 20):
        x, w = gauss_hermite(order, 1, m.dtype)
        v = jnp.diagonal(S)
        sd = jnp.sqrt(v)
        f = m[:, None] + sd[:, None] * x[None, :, 0]  # (p, n)
        mean, var = self.conditional_moments(f)
        mu = mean @ w
        cross = ((f - m[:, None]) * (mean - mu[:, None])) @ w  # Cov(f_j, E[y_j | f_j])
        A = cross / v
        omega = ((mean - mu[:, None]) ** 2) @ w + var @ w - A * A * v  # residual variance
        omega = jnp.maximum(omega, _floor(m.dtype))
        prec = _floor_diag(A * A / omega, mask)
        nat1 = jnp.where(mask, A * (y - mu + A * m) / omega, 0.0)
        return nat1, prec


def _floor_diag(prec_diag, keep):
    return jnp.diag(jnp.where(keep, jnp.maximum(prec_diag, _floor(prec_diag.dtype)), 0.0))


class AbstractRowLikelihood(AbstractLikelihood):
    """One joint factor p(y_t | f_t) per row; a row with any missing entry is dropped.
    Subclasses implement `log_prob_row` and `conditional_moments` (mean and variance of
    y_t | f_t, both (D,)); `expected_log_prob` is a tensor-product Gauss-Hermite rule over p
    unless overridden by a closed form."""

    @abc.abstractmethod
    def log_prob_row(self, y, f):
        """log p(y | f) of one fully observed row, a scalar."""

    @abc.abstractmethod
    def conditional_moments(self, f):
        """(E[y | f] (D,), Var[y | f] (D,)) for one f (p,)."""

    def site_mask(self, mask):
        return jnp.broadcast_to(jnp.all(mask), (self.latent_dim(mask.shape[-1]),))

    def log_prob(self, y, f, mask):
        return jnp.where(jnp.all(mask), self.log_prob_row(y, f), 0.0)

    def _nodes(self, m, S, order):
        x, w = gauss_hermite(order, m.shape[-1], m.dtype)
        jitter = 10.0 * jnp.finfo(m.dtype).eps * (jnp.trace(S) / m.shape[-1] + 1.0)
        L = jnp.linalg.cholesky(symmetrize(S) + jitter * jnp.eye(m.shape[-1], dtype=m.dtype))
        return m + x @ L.T, w

    def expected_log_prob(self, y, mask, m, S, order: int = 20):
        f, w = self._nodes(m, S, order)
        value = jax.vmap(lambda fi: self.log_prob_row(y, fi))(f) @ w
        return jnp.where(jnp.all(mask), value, 0.0)

    def cvi_site(self, y, mask, m, S, order: int = 20):
        keep = self.site_mask(mask)
        gm, gS = jax.grad(lambda mm, SS: self.expected_log_prob(y, mask, mm, SS, order), argnums=(0, 1))(m, S)
        prec = _floor_psd(-2.0 * symmetrize(gS), keep)
        return _site(gm, prec, m, keep)

    def laplace_site(self, y, mask, f):
        keep = self.site_mask(mask)
        g = jax.grad(lambda x: self.log_prob(y, x, mask))(f)
        h = jax.hessian(lambda x: self.log_prob(y, x, mask))(f)
        return _site(g, _floor_psd(-h, keep), f, keep)

    def pl_site(self, y, mask, m, S, order: int = 20):
        keep = self.site_mask(mask)
        f, w = self._nodes(m, S, order)
        mean, var = jax.vmap(self.conditional_moments)(f)  # (n, D) each
        mu = w @ mean
        dm, df = mean - mu, f - m
        cross = (df * w[:, None]).T @ dm  # (p, D) Cov(f, E[y|f])
        jitter = 10.0 * jnp.finfo(m.dtype).eps * (jnp.trace(S) / m.shape[-1] + 1.0)
        Sj = symmetrize(S) + jitter * jnp.eye(m.shape[-1], dtype=m.dtype)
        A = jnp.linalg.solve(Sj, cross).T  # (D, p)
        omega = (dm * w[:, None]).T @ dm + jnp.diag(w @ var) - A @ Sj @ A.T
        omega = symmetrize(omega) + _floor(m.dtype) * jnp.eye(omega.shape[-1], dtype=m.dtype)
        Oi_A = jnp.linalg.solve(omega, A)  # (D, p)
        prec = _floor_psd(A.T @ Oi_A, keep)
        nat1 = jnp.where(keep, Oi_A.T @ (y - mu + A @ m), 0.0)
        return nat1, prec


def _check_nonnegative_integers(y, what):
    if np.any(y < 0) or np.any(y != np.round(y)):
        bad = y[(y < 0) | (y != np.round(y))][0]
        raise ValueError(f"y: expected {what} for this likelihood, found {bad!r}")


class Poisson(AbstractElementwiseLikelihood):
    """y_j | f_j ~ Poisson(exposure * exp(f_j)) (log link); closed-form expectations.

    Args:
        exposure: a positive constant (float, or a tuple of D floats, one per column) that
            multiplies the rate; it is data, not a parameter. A time-varying exposure goes into
            the prior's ``emission_offset`` as its logarithm (f_t = H z_t + log e_t).

    Example:
        >>> lik = ps.vi.Poisson()
        >>> post = ps.vi.fit(prior, lik, counts, 20)
    """

    exposure: tuple = eqx.field(static=True)

    def __init__(self, exposure=1.0):
        values = tuple(float(e) for e in np.atleast_1d(np.asarray(exposure, dtype=float)))
        if not all(np.isfinite(e) and e > 0 for e in values):
            raise ValueError(f"exposure: expected positive finite values, got {exposure!r}")
        self.exposure = values

    def _log_exposure(self, dtype):
        return jnp.log(jnp.asarray(self.exposure, dtype))

    def check_data(self, y):
        _check_nonnegative_integers(y, "non-negative integer counts")

    def log_prob_entries(self, y, f):
        eta = f + self._log_exposure(f.dtype).reshape((-1,) + (1,) * (f.ndim - 1))
        return y * eta - jnp.exp(eta) - gammaln(y + 1.0)

    def expected_entries(self, y, m, v, order: int = 20):
        eta = m + self._log_exposure(m.dtype)
        return y * eta - jnp.exp(eta + 0.5 * v) - gammaln(y + 1.0)

    def conditional_moments(self, f):
        rate = jnp.exp(f + self._log_exposure(f.dtype).reshape((-1,) + (1,) * (f.ndim - 1)))
        return rate, rate


class Bernoulli(AbstractElementwiseLikelihood):
    """y_j | f_j ~ Bernoulli(sigmoid(f_j)) (logit link), y in {0, 1}; Gauss-Hermite expectations.

    Example:
        >>> post = ps.vi.fit(prior, ps.vi.Bernoulli(), labels, 20)
    """

    def check_data(self, y):
        if np.any((y != 0) & (y != 1)):
            raise ValueError(f"y: expected values in {{0, 1}} for a Bernoulli likelihood, found "
                             f"{y[(y != 0) & (y != 1)][0]!r}")

    def log_prob_entries(self, y, f):
        return y * f - jax.nn.softplus(f)

    def conditional_moments(self, f):
        p = jax.nn.sigmoid(f)
        return p, p * (1.0 - p)


def _positive_scalar(value, name):
    a = jnp.asarray(value, dtype=jnp.result_type(jnp.asarray(value).dtype, float))
    if a.ndim != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {a.shape}")
    if checks.is_concrete(a) and not (np.isfinite(np.asarray(a)) and np.asarray(a) > 0):
        raise ValueError(f"{name}: expected a positive finite value, got {np.asarray(a)}")
    return a


class StudentT(AbstractElementwiseLikelihood):
    """y_j = f_j + scale * t_df (robust regression); Gauss-Hermite expectations. Not
    log-concave: a site whose curvature is negative is floored (see the module docstring).

    Args:
        df: degrees of freedom (> 0; posterior linearisation needs df > 2).
        scale: scale (> 0).
    """

    df: jax.Array = eqx.field(metadata=POSITIVE)
    scale: jax.Array = eqx.field(metadata=POSITIVE)

    def __init__(self, df=3.0, scale=1.0):
        self.df = _positive_scalar(df, "df")
        self.scale = _positive_scalar(scale, "scale")

    def log_prob_entries(self, y, f):
        nu, s = self.df.astype(f.dtype), self.scale.astype(f.dtype)
        z = (y - f) / s
        return (gammaln(0.5 * (nu + 1.0)) - gammaln(0.5 * nu) - 0.5 * jnp.log(nu * jnp.pi) - jnp.log(s)
                - 0.5 * (nu + 1.0) * jnp.log1p(z * z / nu))

    def conditional_moments(self, f):
        nu, s = self.df.astype(f.dtype), self.scale.astype(f.dtype)
        var = jnp.where(nu > 2.0, s * s * nu / jnp.maximum(nu - 2.0, 1e-30), jnp.inf)
        return f, jnp.broadcast_to(var, f.shape)


class Gamma(AbstractElementwiseLikelihood):
    """y_j | f_j ~ Gamma(shape, rate = shape exp(-f_j)): mean exp(f_j) (log-mean link), y > 0;
    closed-form expectations (E[exp(-f)] = exp(-m + v / 2)).

    Args:
        shape: the Gamma shape k (> 0); Var[y | f] = exp(2 f) / k.
    """

    shape: jax.Array = eqx.field(metadata=POSITIVE)

    def __init__(self, shape=1.0):
        self.shape = _positive_scalar(shape, "shape")

    @property
    def fill_value(self) -> float:
        return 1.0

    def check_data(self, y):
        if np.any(y <= 0):
            raise ValueError(f"y: expected positive values for a Gamma likelihood, found {y[y <= 0][0]!r}")

    def _const(self, y, k):
        return k * jnp.log(k) + (k - 1.0) * jnp.log(y) - gammaln(k)

    def log_prob_entries(self, y, f):
        k = self.shape.astype(f.dtype)
        return self._const(y, k) - k * f - k * y * jnp.exp(-f)

    def expected_entries(self, y, m, v, order: int = 20):
        k = self.shape.astype(m.dtype)
        return self._const(y, k) - k * m - k * y * jnp.exp(-m + 0.5 * v)

    def conditional_moments(self, f):
        k = self.shape.astype(f.dtype)
        mean = jnp.exp(f)
        return mean, mean * mean / k


class Gaussian(AbstractElementwiseLikelihood):
    """y_j | f_j ~ N(f_j, variance): conjugate; CVI with step_size 1 is exact in one step.

    Args:
        variance: the noise variance (> 0).
    """

    variance: jax.Array = eqx.field(metadata=POSITIVE)

    def __init__(self, variance=1.0):
        self.variance = _positive_scalar(variance, "variance")

    def log_prob_entries(self, y, f):
        v = self.variance.astype(f.dtype)
        return -0.5 * (_LOG_2PI + jnp.log(v) + (y - f) ** 2 / v)

    def expected_entries(self, y, m, S, order: int = 20):
        v = self.variance.astype(m.dtype)
        return -0.5 * (_LOG_2PI + jnp.log(v) + ((y - m) ** 2 + S) / v)

    def conditional_moments(self, f):
        return f, jnp.broadcast_to(self.variance.astype(f.dtype), f.shape)


class HeteroscedasticGaussian(AbstractRowLikelihood):
    """y_j ~ N(f_j, exp(2 f_{D+j})): two latent functions per observed column, the mean and
    the log standard deviation (p = 2 D; f = (means..., log-stds...)). Closed-form expectations:
    E[(y - mu)^2 exp(-2 s)] = exp(-2 m_s + 2 S_ss) ((y - m_mu + 2 S_mu,s)^2 + S_mu,mu).

    Example:
        >>> post = ps.vi.fit(two_latent_prior, ps.vi.HeteroscedasticGaussian(), y, 30)  # y (T, 1)
    """

    def latent_dim(self, data_dim: int) -> int:
        return 2 * data_dim

    def data_dim(self, latent_dim: int) -> Optional[int]:
        return latent_dim // 2 if latent_dim % 2 == 0 else None

    def log_prob_row(self, y, f):
        D = y.shape[-1]
        mu, s = f[:D], f[D:]
        return jnp.sum(-0.5 * _LOG_2PI - s - 0.5 * (y - mu) ** 2 * jnp.exp(-2.0 * s))

    def expected_log_prob(self, y, mask, m, S, order: int = 20):
        D = y.shape[-1]
        j = jnp.arange(D)
        m_mu, m_s = m[:D], m[D:]
        S_mm, S_ss, S_ms = S[j, j], S[D + j, D + j], S[j, D + j]
        quad = jnp.exp(-2.0 * m_s + 2.0 * S_ss) * ((y - m_mu + 2.0 * S_ms) ** 2 + S_mm)
        value = jnp.sum(-0.5 * _LOG_2PI - m_s - 0.5 * quad)
        return jnp.where(jnp.all(mask), value, 0.0)

    def conditional_moments(self, f):
        D = f.shape[-1] // 2
        return f[:D], jnp.exp(2.0 * f[D:])


class Likelihood(AbstractRowLikelihood):
    """Any emission given as ``fn(f) -> numpyro distribution`` over one row y_t (D,).

    ``log_prob`` must be differentiable in f; its value is summed over the row (a
    factorised distribution returns (D,) log-probabilities, a multivariate one a scalar).
    Expectations by tensor-product Gauss-Hermite over p (order**p nodes: keep p small).
    Posterior linearisation reads the distribution's ``mean`` and ``variance``.
    A row with any missing entry is dropped. ``fn`` may be an `equinox.Module` holding arrays:
    `ps.learn.vi` then learns them (as real values, unless the module declares constraints).

    Args:
        fn: f (p,) -> a numpyro distribution of y_t.
        latent_dim: p, when it differs from the data width D (default: p = D).
        fill_value: a value inside the support put at missing entries (default 0.0).

    Example:
        >>> import numpyro.distributions as dist
        >>> lik = ps.vi.Likelihood(lambda f: dist.Poisson(jnp.exp(f)))
    """

    fn: Callable
    num_latent: Optional[int] = eqx.field(static=True)
    fill: float = eqx.field(static=True)

    def __init__(self, fn, latent_dim: Optional[int] = None, fill_value: float = 0.0):
        if not callable(fn):
            raise ValueError(f"fn: expected a callable f -> numpyro distribution, got {type(fn).__name__}")
        if latent_dim is not None:
            latent_dim = checks.positive_int(latent_dim, "latent_dim")
        self.fn, self.num_latent, self.fill = fn, latent_dim, float(fill_value)

    def latent_dim(self, data_dim: int) -> int:
        return data_dim if self.num_latent is None else self.num_latent

    def data_dim(self, latent_dim: int) -> Optional[int]:
        return latent_dim if self.num_latent is None else None

    @property
    def fill_value(self) -> float:
        return self.fill

    def check_data(self, y):
        try:  # the support at f = 0; a function that cannot build it there is not checked
            support = self.fn(jnp.zeros(self.num_latent or 1)).support
            ok = np.asarray(support.check(jnp.asarray(y)))
        except (TypeError, ValueError, IndexError, NotImplementedError):
            return None
        if not ok.all():
            raise ValueError(f"y: found values outside the support of the likelihood's distribution "
                             f"({support}), e.g. {np.asarray(y).ravel()[~ok.ravel()][0]!r}")

    def log_prob_row(self, y, f):
        return jnp.sum(self.fn(f).log_prob(y))

    def conditional_moments(self, f):
        d = self.fn(f)
        shape = d.batch_shape + d.event_shape
        return jnp.broadcast_to(d.mean, shape).ravel(), jnp.broadcast_to(d.variance, shape).ravel()


# ----------------------------------------------------------------------------------------------
# Sites, results and the traceable cores
# ----------------------------------------------------------------------------------------------
class Sites(NamedTuple):
    """Gaussian sites N(y~_t; f_t, V~_t) in natural form (leading B axis for a batch).

    nat1: (T, p) V~_t^{-1} y~_t.  precision: (T, p, p) V~_t^{-1}; 0 (rows and columns) where
    a step or entry has no site (missing data). Site mean and covariance, where precision is
    invertible: ``V~ = inv(precision)``, ``y~ = V~ @ nat1``.
    """

    nat1: jax.Array
    precision: jax.Array


class VIResult(NamedTuple):
    """Output of `fit` (a leading B axis for a batch of sequences).

    elbo: () final ELBO. elbo_history: (num_iters,) ELBO after each site update
    (``elbo_history[-1] == elbo``). means (T, d), covs (T, d, d): marginals of q(z_t).
    f_means (T, p), f_covs (T, p, p): marginals of q(f_t), f_t = H_t z_t + d_t.
    sites: the final `Sites`. log_normalizer: () log Z, the Kalman log-likelihood of the sites.
    """

    elbo: jax.Array
    elbo_history: jax.Array
    means: jax.Array
    covs: jax.Array
    f_means: jax.Array
    f_covs: jax.Array
    sites: Sites
    log_normalizer: jax.Array


class _Posterior(NamedTuple):
    log_z: jax.Array
    means: jax.Array
    covs: jax.Array
    f_means: jax.Array
    f_covs: jax.Array
    observed: jax.Array  # (T, p) components carrying a site


def _system(prior, num_timesteps, inputs) -> LinearGaussianParams:
    params = prior.linear_gaussian_params(num_timesteps, inputs)
    return kalman.expand_time(params, num_timesteps)


def _diffuse_arg(diffuse):
    return jnp.asarray(diffuse, bool) if isinstance(diffuse, tuple) else diffuse


def _posterior(params: LinearGaussianParams, sites: Sites, keep, parallel=False, diffuse=None) -> _Posterior:
    """Kalman smoother on the sites: q(z) marginals, q(f) marginals and log Z."""
    prec = sites.precision
    observed = keep & (jnp.diagonal(prec, axis1=-2, axis2=-1) > 0)
    o = observed.astype(prec.dtype)
    eye = jnp.eye(prec.shape[-1], dtype=prec.dtype)
    # unobserved components get unit precision and no cross terms, then a NaN pseudo-observation:
    # the smoother drops them exactly
    padded = prec * o[..., :, None] * o[..., None, :] + eye * (1.0 - o)[..., None, :]
    cov = symmetrize(jnp.linalg.inv(padded))
    ytil = jnp.where(observed, jnp.einsum("tij,tj->ti", cov, sites.nat1), jnp.nan)
    sm = kalman.smoother_params(params._replace(emission_cov=cov), ytil, parallel=parallel,
                                diffuse=_diffuse_arg(diffuse))
    H, d = params.emission_matrix, params.emission_offset
    means, covs = sm.smoothed_means, sm.smoothed_covs
    f_means = jnp.einsum("tpd,td->tp", H, means) + d
    f_covs = symmetrize(jnp.einsum("tpd,tde,tqe->tpq", H, covs, H))
    return _Posterior(sm.log_likelihood, means, covs, f_means, f_covs, observed)


def _site_expectation(sites: Sites, post: _Posterior):
    """sum_t E_q[log N(y~_t; f_t, V~_t)] over the components carrying a site."""
    o = post.observed.astype(sites.nat1.dtype)
    prec = sites.precision * o[..., :, None] * o[..., None, :]
    eye = jnp.eye(prec.shape[-1], dtype=prec.dtype)
    padded = prec + eye * (1.0 - o)[..., None, :]
    chol = jnp.linalg.cholesky(padded)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    ytil = jnp.linalg.solve(padded, (sites.nat1 * o)[..., None])[..., 0]
    r = (ytil - post.f_means) * o
    quad = jnp.einsum("ti,tij,tj->", r, prec, r) + jnp.einsum("tij,tji->", prec, post.f_covs)
    return -0.5 * jnp.sum(o) * _LOG_2PI + 0.5 * logdet - 0.5 * quad


def _masked(likelihood, y):
    mask = ~jnp.isnan(y)
    return jnp.where(mask, y, jnp.asarray(likelihood.fill_value, y.dtype)), mask


def _elbo_of(likelihood, y, mask, sites, post, order):
    ell = jnp.sum(jax.vmap(lambda yt, mt, m, S: likelihood.expected_log_prob(yt, mt, m, S, order))(
        y, mask, post.f_means, post.f_covs))
    return ell - _site_expectation(sites, post) + post.log_z


def _targets(method, likelihood, y, mask, post, order) -> Sites:
    if method == "cvi":
        out = jax.vmap(lambda yt, mt, m, S: likelihood.cvi_site(yt, mt, m, S, order))(
            y, mask, post.f_means, post.f_covs)
    elif method == "laplace":
        out = jax.vmap(likelihood.laplace_site)(y, mask, post.f_means)
    else:
        out = jax.vmap(lambda yt, mt, m, S: likelihood.pl_site(yt, mt, m, S, order))(
            y, mask, post.f_means, post.f_covs)
    return Sites(*out)


def _mix(old: Sites, new: Sites, beta) -> Sites:
    beta = jnp.asarray(beta, new.nat1.dtype)
    return Sites(*((1.0 - beta) * a + beta * b for a, b in zip(old, new)))


def initial_sites(num_timesteps: int, latent_dim: int, dtype=None) -> Sites:
    """Sites carrying no information (all precisions zero): q starts at the prior."""
    dtype = dtype or jnp.result_type(float)
    return Sites(jnp.zeros((num_timesteps, latent_dim), dtype),
                 jnp.zeros((num_timesteps, latent_dim, latent_dim), dtype))


def elbo(prior, likelihood, y, sites: Sites, *, inputs=None, order: int = 20, parallel: bool = False,
         diffuse=None) -> jax.Array:
    """The ELBO of the q(z) that ``sites`` define, for one sequence; traceable, no checks.

    Args:
        prior: an `AbstractLinearGaussianSSM` (its emission covariance is ignored).
        likelihood: an `AbstractLikelihood`.
        y: (T, D), NaN = missing.
        sites: `Sites` with nat1 (T, p), precision (T, p, p).
        inputs: the prior's (T, U) inputs (a `MarkovianGP` reads its times here), or None.
        order: Gauss-Hermite nodes per dimension (static).
        parallel, diffuse: passed to `ps.kalman.smoother_params`.

    Returns:
        () E_q[log p(y | f)] - E_q[sum_t log N(y~_t; f_t, V~_t)] + log Z: differentiable in the
        prior's and the likelihood's parameters with the sites held fixed (`ps.learn.vi`).

    Example:
        >>> g = jax.grad(lambda m: ps.vi.elbo(m, lik, y, post.sites))(prior)
    """
    y = jnp.asarray(y)
    params = _system(prior, y.shape[0], inputs)
    y, mask = _masked(likelihood, y)
    keep = jax.vmap(likelihood.site_mask)(mask)
    post = _posterior(params, sites, keep, parallel, diffuse)
    return _elbo_of(likelihood, y, mask, sites, post, order)


def update_sites(prior, likelihood, y, sites: Sites, *, method: str = "cvi", step_size=1.0, inputs=None,
                 order: int = 20, parallel: bool = False, diffuse=None) -> Sites:
    """One site update (the step of `fit`) for one sequence; traceable, no checks.

    The site targets are computed from the q(f) that ``sites`` define and mixed in with weight
    ``step_size``: ``(1 - step_size) * sites + step_size * targets`` in natural form.
    """
    y = jnp.asarray(y)
    params = _system(prior, y.shape[0], inputs)
    y, mask = _masked(likelihood, y)
    keep = jax.vmap(likelihood.site_mask)(mask)
    post = _posterior(params, sites, keep, parallel, diffuse)
    return _mix(sites, _targets(method, likelihood, y, mask, post, order), step_size)


def _fit_sequence(prior, likelihood, y, inputs, sites, step_size, *, num_iters, method, order, parallel,
                  diffuse) -> VIResult:
    params = _system(prior, y.shape[0], inputs)
    y, mask = _masked(likelihood, y)
    keep = jax.vmap(likelihood.site_mask)(mask)

    def step(carry, i):
        sites, post = carry
        new = _mix(sites, _targets(method, likelihood, y, mask, post, order), step_size)
        # pass 0 only smooths the initial sites: the smoother is traced once, which halves compile time
        sites = jax.tree_util.tree_map(lambda a, b: jnp.where(i > 0, a, b), new, sites)
        post = _posterior(params, sites, keep, parallel, diffuse)
        return (sites, post), _elbo_of(likelihood, y, mask, sites, post, order)

    T, p = y.shape[0], keep.shape[-1]
    d = params.initial_mean.shape[-1]
    dtype = sites.nat1.dtype
    eye = lambda n: jnp.broadcast_to(jnp.eye(n, dtype=dtype), (T, n, n))
    blank = _Posterior(jnp.zeros((), dtype), jnp.zeros((T, d), dtype), eye(d), jnp.zeros((T, p), dtype), eye(p),
                       keep)  # finite stand-in, discarded at pass 0
    (sites, post), history = lax.scan(step, (sites, blank), jnp.arange(num_iters + 1))
    history = history[1:]
    return VIResult(history[-1], history, post.means, post.covs, post.f_means, post.f_covs, sites, post.log_z)


@eqx.filter_jit
def _fit_compiled(prior, likelihood, ys, inputs, sites, step_size, *, num_iters, method, order, parallel,
                  diffuse, batched, inputs_batched, sites_batched):
    def one(y, u, s):
        if s is None:
            p = likelihood.latent_dim(y.shape[-1])
            s = initial_sites(y.shape[0], p, y.dtype)
        return _fit_sequence(prior, likelihood, y, u, s, step_size, num_iters=num_iters, method=method,
                             order=order, parallel=parallel, diffuse=diffuse)

    if not batched:
        return one(ys, inputs, sites)
    axes = (0, 0 if inputs_batched else None, 0 if sites_batched else None)
    return jax.vmap(one, in_axes=axes)(ys, inputs, sites)


# ----------------------------------------------------------------------------------------------
# Checks and the public entry point
# ----------------------------------------------------------------------------------------------
class CheckedArguments(NamedTuple):
    """What `check_arguments` returns: the data as a float array (T, D) or (B, T, D), the
    inputs normalised by `ps.kalman.check_arguments`, and the static facts a fit compiles on."""

    prior: AbstractLinearGaussianSSM
    likelihood: AbstractLikelihood
    y: jax.Array
    inputs: object
    batched: bool
    inputs_batched: bool
    diffuse: object


def _cast(tree, dtype):
    is_float = lambda a: isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_float(a) else a, tree)


def check_arguments(prior, likelihood, y, inputs=None) -> CheckedArguments:
    """Validate a prior, a likelihood and data once, outside jit (value checks on concrete
    arrays only). The likelihood's arrays are cast to the prior's (and data's) dtype.

    Raises:
        ValueError: naming the argument, for a prior that is not an `AbstractLinearGaussianSSM`,
            a likelihood that is not an `AbstractLikelihood`, y not (T, D) / (B, T, D) with the
            width the likelihood and the prior's p imply, inf in y, y outside the likelihood's
            support, or inputs the prior refuses.
    """
    if not isinstance(prior, AbstractLinearGaussianSSM):
        raise ValueError(f"prior: expected a linear-Gaussian model (AbstractLinearGaussianSSM), got "
                         f"{type(prior).__name__}")
    if not isinstance(likelihood, AbstractLikelihood):
        raise ValueError(f"likelihood: expected a ps.vi likelihood (AbstractLikelihood, e.g. ps.vi.Poisson()), "
                         f"got {type(likelihood).__name__}")
    # a likelihood made by eqx.tree_at / ps.load is checked here too (its constructor did not run)
    checks.once_per_model(likelihood, "parameters", lambda: P.check_support(likelihood, "likelihood"))
    p = prior.emission_dim
    width = likelihood.data_dim(p)
    doc = f"(T, {width if width is not None else 'D'}) or (B, T, {width if width is not None else 'D'})"
    try:
        y = jnp.asarray(y)
    except (TypeError, ValueError):
        raise ValueError(f"y: expected a numeric array of shape {doc}, got {type(y).__name__}") from None
    if jnp.issubdtype(y.dtype, jnp.complexfloating):
        raise ValueError(f"y: expected real values, got complex dtype {y.dtype}")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim == 1 and width == 1:
        y = y[:, None]
    if y.ndim not in (2, 3) or y.shape[-2] < 1:
        raise ValueError(f"y: expected shape {doc} (prior's linear predictor has p = {p}), got shape "
                         f"{tuple(y.shape)}")
    if likelihood.latent_dim(y.shape[-1]) != p:
        raise ValueError(f"y: expected shape {doc}: {type(likelihood).__name__} reads "
                         f"{likelihood.latent_dim(y.shape[-1])} latent functions for {y.shape[-1]} columns but "
                         f"the prior's linear predictor has p = {p}; got shape {tuple(y.shape)}")
    if checks.is_concrete(y):
        values = np.asarray(y)
        if np.isinf(values).any():
            raise ValueError("y: found inf; use NaN to mark missing values")
        likelihood.check_data(values[~np.isnan(values)])
    batched = y.ndim == 3
    # the prior's own checks (parameters, inputs, time-varying length) on a stand-in of width p
    stand_in = jnp.zeros(y.shape[:-1] + (p,), y.dtype)
    batch = kalman.check_arguments(prior, stand_in, inputs)
    diffuse = kalman.initial_form(prior, stand_in, batch.inputs)
    prior = checks.unify_dtypes(prior, y)
    leaves = [a for a in jax.tree_util.tree_leaves(prior) if isinstance(a, jax.Array)
              and jnp.issubdtype(a.dtype, jnp.floating)]
    dtype = leaves[0].dtype if leaves else y.dtype
    return CheckedArguments(prior, _cast(likelihood, dtype), y.astype(dtype), batch.inputs, batched,
                            batch.inputs_batched, diffuse)


def _check_sites(init_sites, y, p, dtype):
    if init_sites is None:
        return None, False
    if not isinstance(init_sites, Sites):
        raise ValueError(f"init_sites: expected ps.vi.Sites(nat1, precision), got {type(init_sites).__name__}")
    lead = y.shape[:-1]
    n1, pr = jnp.asarray(init_sites.nat1, dtype), jnp.asarray(init_sites.precision, dtype)
    T = y.shape[-2]
    ok_single = n1.shape == (T, p) and pr.shape == (T, p, p)
    ok_batch = n1.shape == lead + (p,) and pr.shape == lead + (p, p)
    if not (ok_single or ok_batch):
        raise ValueError(f"init_sites: expected nat1 ({T}, {p}) and precision ({T}, {p}, {p})"
                         f"{' (or with the batch axis)' if len(lead) == 2 else ''}, got shapes "
                         f"{tuple(n1.shape)} and {tuple(pr.shape)}")
    if checks.is_concrete(pr):
        checks.psd(pr, "init_sites.precision", strict=False)
    return Sites(n1, pr), (len(lead) == 2 and n1.ndim == 3)


def fit(prior, likelihood, y, num_iters: int, method: str = "cvi", *, inputs=None, step_size=1.0,
        init_sites: Optional[Sites] = None, order: int = 20, parallel: bool = False) -> VIResult:
    """Fit a Gaussian q(z) to p(z | y) for a linear-Gaussian prior and a non-Gaussian emission.

    Args:
        prior: any `AbstractLinearGaussianSSM` (e.g. `ps.models.LinearGaussianSSM`, a Markovian GP).
            Only its dynamics and linear predictor f_t = H_t z_t + d_t are used; its emission
            covariance R is ignored.
        likelihood: an `AbstractLikelihood`: `Poisson`, `Bernoulli`, `StudentT`, `Gamma`,
            `Gaussian`, `HeteroscedasticGaussian` or `Likelihood(fn)`.
        y: (T, D) or a batch (B, T, D) (vmapped); NaN marks a missing entry. D is the width the
            likelihood reads from p = the prior's emission_dim (D = p except
            `HeteroscedasticGaussian`, D = p / 2).
        num_iters: site updates (>= 1); the loop is one compiled `lax.scan`.
        method: ``"cvi"``, ``"laplace"`` or ``"pl"`` (see the module docstring).
        inputs: the prior's inputs, (T, U) or (B, T, U) (a Markovian GP reads its times here).
        step_size: beta in (0, 1], the weight of the new site targets.
        init_sites: starting `Sites` (e.g. a previous result's ``.sites``); default: none (q = prior).
        order: Gauss-Hermite nodes per latent dimension where no closed form exists.
        parallel: run the Kalman smoother in parallel-in-time form.

    Returns:
        `VIResult`: elbo (), elbo_history (num_iters,), means (T, d), covs (T, d, d),
        f_means (T, p), f_covs (T, p, p), sites (`Sites`), log_normalizer (); a leading B axis
        for a batch.

    Usable inside a user's ``jax.jit`` / ``vmap`` / ``grad`` (num_iters, method, order and
    parallel are static; value checks run on concrete arrays only).

    Example:
        >>> import jax.numpy as jnp, probssm as ps
        >>> prior = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1),
        ...                                     0.1 * jnp.eye(1), jnp.eye(1), jnp.eye(1))
        >>> counts = jnp.array([[0.], [2.], [1.], [4.], [3.]])
        >>> post = ps.vi.fit(prior, ps.vi.Poisson(), counts, 10)
        >>> post.elbo, post.f_means.shape
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    order = checks.positive_int(order, "order")
    if checks.is_concrete(step_size):
        beta = np.asarray(step_size)
        if beta.ndim != 0 or not (np.isfinite(beta) and 0.0 < float(beta) <= 1.0):
            raise ValueError(f"step_size: expected a number in (0, 1], got {step_size!r}")
    a = check_arguments(prior, likelihood, y, inputs)
    p = a.prior.emission_dim
    sites, sites_batched = _check_sites(init_sites, a.y, p, a.y.dtype)
    return _fit_compiled(a.prior, a.likelihood, a.y, a.inputs, sites, jnp.asarray(step_size, a.y.dtype),
                         num_iters=num_iters, method=method, order=order, parallel=bool(parallel),
                         diffuse=a.diffuse, batched=a.batched, inputs_batched=a.inputs_batched,
                         sites_batched=sites_batched)
