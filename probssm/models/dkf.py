"""The discriminative Kalman filter's model (Burkhart, Brandman, Franco, Hochberg & Harrison,
Neural Computation 2020) and the fitted parts of its observation model.

The latent state is a stationary linear-Gaussian chain (``mu0`` the stationary mean, zero in
the paper) and the observation model is a learned *discriminative* Gaussian p(z | x):

    z_0 ~ N(mu0, S)
    z_t = mu0 + A (z_{t-1} - mu0) + N(0, G)          t = 1..T-1,   S = A S A^T + G
    p(z_t | x_t) ~= N(f(x_t), Q(x_t))                 (f, Q: regressions fitted on paired data)

What `emission` returns, and why. The DKF never models the observations x: it has no p(x)
and no p(x | z) as a normalised density over x, so no honest generative emission exists.
What its assumptions do fix is the likelihood *ratio* (Bayes' rule, z stationary N(mu0, S)):

    p(x | z) / p(x) = p(z | x) / p(z) = N(z; f(x), Q(x)) / N(z; mu0, S)

`emission(z, t)` returns a `DiscriminativeLikelihood` whose ``log_prob(x)`` is this log ratio,
i.e. log p(x | z) up to the term -log p(x), which does not depend on z. Everything that only
compares states given the data is therefore exact with it: normalised particle weights, the
filtering and smoothing distributions a particle engine targets (the exact posterior under
the DKF's assumptions, of which `ps.dkf.filter` is the Gaussian approximation). What
integrates over x is not: a particle filter's ``log_likelihood`` estimates
log p(x_{0:T-1}) - sum_t log p(x_t) (the pointwise mutual information, not the evidence), and
``sample`` raises ``NotImplementedError``. Where Q(x)^{-1} - S^{-1} is not positive definite the
ratio grows without bound along some direction of z (the paper's failure case that
``ps.dkf.filter`` corrects); the emission returns the ratio as it is.

Engines read only what `AbstractDiscriminativeSSM` declares: ``transition_matrix``,
``transition_cov``, ``stationary_mean``, ``stationary_cov``, ``discriminative_mean(x)``,
``discriminative_cov(x)``, ``state_dim``, ``emission_dim``.
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.linalg import cholesky, mvn_logpdf_chol, solve_lower, symmetrize
from probssm.core.protocol import SSM

__all__ = ["AbstractDiscriminativeSSM", "DKFModel", "DiscriminativeLikelihood", "exact_linear_gaussian",
           "stationary_covariance", "inv_psd", "LinearMap", "ConstantCovariance", "NadarayaWatson", "MLPRegressor", "GPRegressor",
           "KernelCovariance"]

REAL = {"constraint": constraints.real}
PSD = {"constraint": constraints.positive_definite}


def inv_psd(a: jax.Array) -> jax.Array:
    """Inverse (d, d) of a symmetric positive definite (d, d) matrix, via its Cholesky factor."""
    Linv = solve_lower(cholesky(a), jnp.eye(a.shape[-1], dtype=a.dtype))
    return Linv.T @ Linv


class DiscriminativeLikelihood(dist.Distribution):
    """The DKF's emission at state z: ``log_prob(x) = log N(z; f(x), Q(x)) - log N(z; mu0, S)``.

    Under the DKF's assumptions this is log p(x | z) - log p(x) (see the module doc): exact up
    to a term constant in z. A row x with any NaN is missing and gets ``log_prob`` 0 (ratio
    one), as in `ps.dkf.filter`. ``log_prob`` reads the last axis of x as one observation
    (n,); ``sample`` raises ``NotImplementedError`` (the DKF has no model of x).
    """

    support = constraints.real_vector
    pytree_data_fields = ("state", "model")

    def __init__(self, state, model: "AbstractDiscriminativeSSM", *, validate_args=None):
        self.state = state
        self.model = model
        n = model.emission_dim
        super().__init__(batch_shape=jnp.shape(state)[:-1], event_shape=() if n is None else (n,),
                         validate_args=validate_args)

    def log_prob(self, value):
        model = self.model
        mu0, S = model.stationary_mean, model.stationary_cov
        log_prior = lambda z: mvn_logpdf_chol(z - mu0, cholesky(symmetrize(S)))

        def one(z, x):
            observed = jnp.all(~jnp.isnan(x))
            x = jnp.where(jnp.isnan(x), 0.0, x)
            f = model.discriminative_mean(x)
            L = cholesky(symmetrize(model.discriminative_cov(x)))
            return jnp.where(observed, mvn_logpdf_chol(z - f, L) - log_prior(z), 0.0)

        return jnp.vectorize(one, signature="(d),(n)->()")(self.state, jnp.asarray(value))

    def sample(self, key, sample_shape=()):
        raise NotImplementedError(
            "DiscriminativeLikelihood.sample: the discriminative Kalman filter models p(z | x), not p(x | z); "
            "it has no generative model of the observations to draw from")


class AbstractDiscriminativeSSM(SSM):
    """A stationary linear-Gaussian state chain with a discriminative observation model
    p(z | x) ~= N(discriminative_mean(x), discriminative_cov(x)): unlocks `ps.dkf.filter`.

    Subclasses provide the four arrays and the two regressions; the protocol's ``initial``,
    ``transition`` and ``emission`` follow (see the module doc for what ``emission`` means).
    The model reads no inputs (``input_dim = 0``): the observations x_t are its emissions.
    """

    transition_matrix: eqx.AbstractVar[jax.Array]  # A (d, d)
    transition_cov: eqx.AbstractVar[jax.Array]  # G (d, d)
    stationary_mean: eqx.AbstractVar[jax.Array]  # mu0 (d,)
    stationary_cov: eqx.AbstractVar[jax.Array]  # S (d, d)

    @abc.abstractmethod
    def discriminative_mean(self, x: jax.Array) -> jax.Array:
        """f(x): (n,) -> (d,), the mean of p(z | x)."""

    @abc.abstractmethod
    def discriminative_cov(self, x: jax.Array) -> jax.Array:
        """Q(x): (n,) -> (d, d), the covariance of p(z | x)."""

    @property
    def state_dim(self) -> int:
        return self.transition_matrix.shape[0]

    @property
    def emission_dim(self) -> Optional[int]:
        """Width n of an observation row, or None when the regressions do not declare it."""
        return None

    @property
    def input_dim(self) -> int:
        return 0

    def initial(self, inputs=None):
        return dist.MultivariateNormal(self.stationary_mean, covariance_matrix=self.stationary_cov)

    def transition(self, z_prev, t, inputs=None):
        mean = self.stationary_mean + self.transition_matrix @ (z_prev - self.stationary_mean)
        return dist.MultivariateNormal(mean, covariance_matrix=self.transition_cov)

    def emission(self, z, t, inputs=None) -> DiscriminativeLikelihood:
        """The likelihood ratio p(x | z) / p(x) at z (a `DiscriminativeLikelihood`)."""
        return DiscriminativeLikelihood(z, self)


class DKFModel(AbstractDiscriminativeSSM):
    """Stationary linear-Gaussian state chain plus a discriminative observation model.

    Args:
        transition_matrix: A, (d, d).
        transition_cov: G, (d, d), positive semi-definite.
        stationary_cov: S, (d, d), positive definite (S = A S A^T + G for a stationary chain).
        mean_fn: f, ``x (n,) -> (d,)``; a function or an equinox module.
        cov_fn: Q, ``x (n,) -> (d, d)``; a function or an equinox module.
        stationary_mean: mu0, (d,); zeros when None.
        emission_dim: n, the width of an observation row, when known (checked by the filter
            and used as the emission's event shape); None leaves it undeclared.

    Example:
        >>> model = ps.models.DKFModel(A, G, S, ps.models.dkf.LinearMap(K), ps.models.dkf.ConstantCovariance(Q))
        >>> ps.dkf.filter(model, x).filtered_means
    """

    transition_matrix: jax.Array = eqx.field(metadata=REAL)
    transition_cov: jax.Array = eqx.field(metadata=PSD)
    stationary_cov: jax.Array = eqx.field(metadata=PSD)
    mean_fn: Callable
    cov_fn: Callable
    stationary_mean: jax.Array = eqx.field(metadata=REAL)
    declared_emission_dim: Optional[int] = eqx.field(static=True)

    def __init__(self, transition_matrix, transition_cov, stationary_cov, mean_fn, cov_fn, stationary_mean=None,
                 emission_dim: Optional[int] = None):
        A = checks.array(transition_matrix, "transition_matrix", (2,), "(d, d)")
        A = jnp.asarray(A, jnp.result_type(A.dtype, float))
        d = A.shape[0]
        checks.shape(A, "transition_matrix", (d, d), "(d, d)")
        G = checks.shape(jnp.asarray(transition_cov, A.dtype), "transition_cov", (d, d), f"({d}, {d})")
        S = checks.shape(jnp.asarray(stationary_cov, A.dtype), "stationary_cov", (d, d), f"({d}, {d})")
        mu0 = jnp.zeros(d, A.dtype) if stationary_mean is None else checks.shape(
            jnp.asarray(stationary_mean, A.dtype), "stationary_mean", (d,), f"({d},)")
        checks.finite(A, "transition_matrix")
        checks.finite(mu0, "stationary_mean")
        checks.psd(G, "transition_cov", strict=False)
        checks.psd(S, "stationary_cov")
        if not callable(mean_fn):
            raise ValueError("mean_fn: expected a callable x -> (d,)")
        if not callable(cov_fn):
            raise ValueError("cov_fn: expected a callable x -> (d, d)")
        if emission_dim is not None:
            emission_dim = checks.positive_int(emission_dim, "emission_dim")
        self.transition_matrix, self.transition_cov, self.stationary_cov = A, G, S
        self.mean_fn, self.cov_fn, self.stationary_mean = mean_fn, cov_fn, mu0
        self.declared_emission_dim = emission_dim

    def discriminative_mean(self, x):
        return self.mean_fn(x)

    def discriminative_cov(self, x):
        return self.cov_fn(x)

    @property
    def emission_dim(self) -> Optional[int]:
        return self.declared_emission_dim


def stationary_covariance(transition_matrix: jax.Array, transition_cov: jax.Array) -> jax.Array:
    """S (d, d) solving S = A S A^T + G (A (d, d) stable, G (d, d))."""
    A = jnp.asarray(transition_matrix)
    d = A.shape[0]
    G = jnp.asarray(transition_cov, A.dtype)
    S = jnp.linalg.solve(jnp.eye(d * d, dtype=A.dtype) - jnp.kron(A, A), G.reshape(-1)).reshape(d, d)
    return symmetrize(S)


def exact_linear_gaussian(transition_matrix, transition_cov, emission_matrix, emission_cov,
                          stationary_cov=None) -> DKFModel:
    """The DKF whose p(z | x) is the exact posterior of x = H z + N(0, R) under z ~ N(0, S).

    Args:
        transition_matrix: A (d, d); transition_cov: G (d, d); emission_matrix: H (n, d);
        emission_cov: R (n, n); stationary_cov: S (d, d), default the solution of S = A S A^T + G.

    Q^{-1} = S^{-1} + H^T R^{-1} H and f(x) = Q H^T R^{-1} x; with it the DKF *is* the Kalman
    filter started from N(0, S), and its emission ratio is N(x; H z, R) / N(x; 0, H S H^T + R).
    """
    A = jnp.asarray(transition_matrix, jnp.result_type(jnp.asarray(transition_matrix).dtype, float))
    G, H, R = (jnp.asarray(a, A.dtype) for a in (transition_cov, emission_matrix, emission_cov))
    S = stationary_covariance(A, G) if stationary_cov is None else jnp.asarray(stationary_cov, A.dtype)
    HtRinv = H.T @ inv_psd(R)
    Q = symmetrize(inv_psd(inv_psd(S) + HtRinv @ H))
    K = Q @ HtRinv
    return DKFModel(A, G, S, LinearMap(K), ConstantCovariance(Q), emission_dim=H.shape[0])


# ----------------------------------------------------------------------------------------------
# Fitted parts of the observation model (equinox modules: pytrees that save and load);
# the learners that fit them are in `probssm.learn.dkf`.
# ----------------------------------------------------------------------------------------------
class LinearMap(eqx.Module):
    """f(x) = matrix @ x (+ offset): matrix (d, n), offset (d,) or None."""

    matrix: jax.Array
    offset: Optional[jax.Array] = None

    def __call__(self, x):
        out = self.matrix @ x
        return out if self.offset is None else out + self.offset


class ConstantCovariance(eqx.Module):
    """Q(x) = cov (d, d) for every x."""

    cov: jax.Array

    def __call__(self, x):
        return self.cov


class NadarayaWatson(eqx.Module):
    """f(x) = sum_i w_i(x) z_i with Gaussian-kernel weights on standardised x."""

    x_train: jax.Array  # (N, n), standardised
    z_train: jax.Array  # (N, d)
    x_mean: jax.Array
    x_scale: jax.Array
    bandwidth: jax.Array  # ()

    def __call__(self, x):
        u = (x - self.x_mean) / self.x_scale
        logw = -0.5 * jnp.sum((self.x_train - u) ** 2, -1) / self.bandwidth ** 2
        return jax.nn.softmax(logw) @ self.z_train


class MLPRegressor(eqx.Module):
    """f(x) = z_mean + z_scale * mlp((x - x_mean) / x_scale)."""

    mlp: eqx.nn.MLP
    x_mean: jax.Array
    x_scale: jax.Array
    z_mean: jax.Array
    z_scale: jax.Array

    def __call__(self, x):
        return self.z_mean + self.z_scale * self.mlp((x - self.x_mean) / self.x_scale)


class GPRegressor(eqx.Module):
    """GP posterior mean with a squared-exponential kernel on standardised x."""

    x_train: jax.Array
    alpha: jax.Array  # (N, d) = (K + s2 I)^{-1} (z - z_mean) / z_scale
    x_mean: jax.Array
    x_scale: jax.Array
    z_mean: jax.Array
    z_scale: jax.Array
    lengthscale: jax.Array
    signal_var: jax.Array

    def __call__(self, x):
        u = (x - self.x_mean) / self.x_scale
        k = self.signal_var * jnp.exp(-0.5 * jnp.sum((self.x_train - u) ** 2, -1) / self.lengthscale ** 2)
        return self.z_mean + self.z_scale * (k @ self.alpha)


class KernelCovariance(eqx.Module):
    """Q(x) = sum_i w_i(x) r_i r_i^T / sum_i w_i + ridge I, kernel weights on standardised x."""

    x_train: jax.Array
    outer: jax.Array  # (N, d, d) residual outer products
    x_mean: jax.Array
    x_scale: jax.Array
    bandwidth: jax.Array
    ridge: jax.Array  # (d, d)

    def __call__(self, x):
        u = (x - self.x_mean) / self.x_scale
        logw = -0.5 * jnp.sum((self.x_train - u) ** 2, -1) / self.bandwidth ** 2
        return jnp.einsum("i,ijk->jk", jax.nn.softmax(logw), self.outer) + self.ridge
