"""Discriminative Kalman filter (Burkhart, Brandman, Franco, Hochberg & Harrison,
Neural Computation 2020) and learners for its parts.

The latent state follows a stationary linear-Gaussian chain, and the observation
model is replaced by a learned *discriminative* Gaussian p(z | x) ~ N(f(x), Q(x)):

    z_0 ~ N(mu0, S),   z_t - mu0 = A (z_{t-1} - mu0) + N(0, G),   S = A S A^T + G
    p(z_t | x_t) ~= N(f(x_t), Q(x_t))

Since p(x | z) is proportional to p(z | x) / p(z), the filter is a Kalman recursion in
information form (``mu0`` is the stationary mean, zero in the paper)::

    mu, Sigma = mu0, S                                   # predicted moments of z_0
    for t in 0..T-1:
        if t > 0:  nu, M = mu0 + A (mu - mu0), A Sigma A^T + G
        else:      nu, M = mu, Sigma
        J = Q(x_t)^{-1} - S^{-1};  h = Q(x_t)^{-1} f(x_t) - S^{-1} mu0
        Sigma = (M^{-1} + J)^{-1};  mu = Sigma (M^{-1} nu + h)

The update needs Q^{-1} - S^{-1} positive definite. Where it is not, ``correction="auto"``
(default) replaces Q by (Q^{-1} + S^{-1})^{-1} for that step (MODELS.md), which makes
J = Q^{-1} positive definite. ``robust=True`` runs the variant that never divides by the
stationary prior, Sigma = (M^{-1} + Q^{-1})^{-1}, mu = Sigma (M^{-1} nu + Q^{-1} f(x)) (the
authors' fallback update used at every step): it treats N(f(x), Q(x)) as a likelihood,
so it stays well defined under prior misspecification (e.g. non-stationary data) at the
price of double-counting the prior. A step whose observation holds any NaN is a pure
prediction (f cannot take a partial x).

Learners (paired training data: states (N, d) and observations (N, n)):
`fit_dynamics` (A, G by least squares, S = cov(z)); `fit_nadaraya_watson` (Gaussian kernel,
bandwidth by leave-one-out error), `fit_mlp` (equinox MLP trained with optax), `fit_gp`
(GP regression, hyperparameters by marginal likelihood); `fit_covariance` (Q constant or
kernel-regressed on held-out residual outer products); `fit` puts them together.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks
from probssm.core.optim import descend
from probssm.core.linalg import cho_solve_lower, cholesky, mm, solve_lower, symmetrize

__all__ = ["DKFModel", "DKFResult", "filter", "fit", "fit_dynamics", "fit_nadaraya_watson", "fit_mlp", "fit_gp",
           "fit_covariance", "NadarayaWatson", "MLPRegressor", "GPRegressor", "KernelCovariance",
           "ConstantCovariance", "exact_linear_gaussian"]


# ----------------------------------------------------------------------------------------------
# Model and filter
# ----------------------------------------------------------------------------------------------
class DKFModel(eqx.Module):
    """Stationary linear-Gaussian state chain plus a discriminative observation model.

    Args:
        transition_matrix: A, (d, d).
        transition_cov: G, (d, d), positive semi-definite.
        stationary_cov: S, (d, d), positive definite (S = A S A^T + G for a stationary chain).
        mean_fn: f, ``x (n,) -> (d,)``; a function or an equinox module.
        cov_fn: Q, ``x (n,) -> (d, d)``; a function or an equinox module.
        stationary_mean: mu0, (d,); zeros when None.
    """

    transition_matrix: jax.Array
    transition_cov: jax.Array
    stationary_cov: jax.Array
    mean_fn: Callable
    cov_fn: Callable
    stationary_mean: jax.Array

    def __init__(self, transition_matrix, transition_cov, stationary_cov, mean_fn, cov_fn, stationary_mean=None):
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
        self.transition_matrix, self.transition_cov, self.stationary_cov = A, G, S
        self.mean_fn, self.cov_fn, self.stationary_mean = mean_fn, cov_fn, mu0

    @property
    def state_dim(self) -> int:
        return self.transition_matrix.shape[0]


class DKFResult(NamedTuple):
    filtered_means: jax.Array  # (T, d)  approximate E[z_t | x_{0:t}]
    filtered_covs: jax.Array  # (T, d, d)
    corrected: jax.Array  # (T,) bool: step t used Q <- (Q^-1 + S^-1)^-1 (always False when robust)


def _inv_psd(a):
    Linv = solve_lower(cholesky(a), jnp.eye(a.shape[-1], dtype=a.dtype))
    return mm(Linv.T, Linv)


def _information(model, xs, correction, robust):
    """Per-step information (J_t, h_t) that x_t adds about z_t, all steps at once."""
    S_inv = _inv_psd(model.stationary_cov)
    mu0 = model.stationary_mean

    def one(x):
        observed = jnp.all(~jnp.isnan(x))
        x = jnp.where(jnp.isnan(x), 0.0, x)
        f = model.mean_fn(x)
        Q_inv = _inv_psd(symmetrize(model.cov_fn(x)))
        if robust:
            J, h, fixed = Q_inv, Q_inv @ f, jnp.array(False)
        else:
            J = symmetrize(Q_inv - S_inv)
            bad = ~jnp.all(jnp.isfinite(cholesky(J)))  # the factorisation fails (NaN) unless J is PD
            fixed = bad if correction == "auto" else jnp.array(False)
            # Q <- (Q^-1 + S^-1)^-1:  Q^-1 -> Q^-1 + S^-1, so J -> Q^-1
            J = jnp.where(fixed, Q_inv, J)
            h = jnp.where(fixed, (Q_inv + S_inv) @ f, Q_inv @ f) - S_inv @ mu0
        zero = jnp.zeros_like(J)
        return jnp.where(observed, J, zero), jnp.where(observed, h, 0.0), fixed & observed

    return jax.vmap(one)(xs)


@eqx.filter_jit
def _run(model, xs, correction, robust):
    Js, hs, fixed = _information(model, xs, correction, robust)
    A, G, mu0 = model.transition_matrix, model.transition_cov, model.stationary_mean

    eye = jnp.eye(A.shape[0], dtype=A.dtype)

    def update(nu, M, J, h):
        # Sigma = (M^-1 + J)^-1 = L B^-1 L^T with M = L L^T, B = I + L^T J L (SPD, eigenvalues >= 1);
        # mu = Sigma (M^-1 nu + h) = L B^-1 (L^-1 nu + L^T h). No inverse of M or of J is formed,
        # so J may be singular (a skipped step has J = 0).
        L = cholesky(M)
        C = cholesky(symmetrize(eye + mm(mm(L.T, J), L)))
        mu = mm(L, cho_solve_lower(C, solve_lower(L, nu) + mm(L.T, h)))
        W = solve_lower(C, L.T)  # C^-1 L^T, so Sigma = W^T W
        return mu, mm(W.T, W)

    m0, P0 = update(mu0, model.stationary_cov, Js[0], hs[0])

    def step(carry, inp):
        mu, Sigma = carry
        J, h = inp
        nu = mu0 + mm(A, mu - mu0)
        M = symmetrize(mm(mm(A, Sigma), A.T) + G)
        mu, Sigma = update(nu, M, J, h)
        return (mu, Sigma), (mu, Sigma)

    _, (ms, Ps) = lax.scan(step, (m0, P0), (Js[1:], hs[1:]))
    return DKFResult(jnp.concatenate([m0[None], ms]), jnp.concatenate([P0[None], Ps]), fixed)


def _check_model(model, xs):
    if not isinstance(model, DKFModel):
        raise ValueError(f"model: expected a ps.dkf.DKFModel, got {type(model).__name__}")
    d = model.state_dim
    checks.psd(model.transition_cov, "transition_cov", strict=False)
    checks.psd(model.stationary_cov, "stationary_cov")
    x = jax.ShapeDtypeStruct(xs.shape[-1:], xs.dtype)
    try:
        f_out = jax.eval_shape(model.mean_fn, x)
    except Exception as e:  # noqa: BLE001 - report the user's function failing on this shape
        raise ValueError(f"mean_fn: failed on an observation of shape {x.shape}: {e}") from e
    if f_out.shape != (d,):
        raise ValueError(f"mean_fn: expected an output of shape ({d},), got {f_out.shape}")
    q_out = jax.eval_shape(model.cov_fn, x)
    if q_out.shape != (d, d):
        raise ValueError(f"cov_fn: expected an output of shape ({d}, {d}), got {q_out.shape}")


def filter(model: DKFModel, observations, *, correction: str = "auto", robust: bool = False) -> DKFResult:
    """Discriminative Kalman filter.

    Args:
        model: a `DKFModel` (built by hand or by `fit`).
        observations: (T, n) (or a batch (B, T, n)); a row with any NaN is skipped.
        correction: "auto" replaces Q(x_t) by (Q^-1 + S^-1)^-1 at steps where Q^-1 - S^-1 is
            not positive definite; "never" leaves it (the update may then be invalid).
        robust: run the robust variant (no division by the stationary prior; see module doc).

    Returns:
        `DKFResult` (leading B axis for a batch).

    Example:
        >>> model = ps.dkf.fit(z_train, x_train, regressor="nw")
        >>> ps.dkf.filter(model, x_test).filtered_means
    """
    if correction not in ("auto", "never"):
        raise ValueError(f"correction: expected 'auto' or 'never', got {correction!r}")
    xs = jnp.asarray(observations)
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        xs = xs.astype(jnp.result_type(float))
    if xs.ndim not in (2, 3) or xs.shape[-2] < 1:
        raise ValueError(f"observations: expected shape (T, n) or (B, T, n), got shape {tuple(xs.shape)}")
    _check_model(model, xs)
    if xs.ndim == 3:
        return jax.vmap(lambda x: _run(model, x, correction, bool(robust)))(xs)
    return _run(model, xs, correction, bool(robust))


def exact_linear_gaussian(transition_matrix, transition_cov, emission_matrix, emission_cov,
                          stationary_cov=None) -> DKFModel:
    """The DKF whose p(z | x) is the exact posterior of x = H z + N(0, R) under z ~ N(0, S).

    Q^{-1} = S^{-1} + H^T R^{-1} H and f(x) = Q H^T R^{-1} x; with it the DKF *is* the Kalman
    filter started from N(0, S). S defaults to the solution of S = A S A^T + G.
    """
    A = jnp.asarray(transition_matrix, jnp.result_type(jnp.asarray(transition_matrix).dtype, float))
    G, H, R = (jnp.asarray(a, A.dtype) for a in (transition_cov, emission_matrix, emission_cov))
    if stationary_cov is None:
        d = A.shape[0]
        S = jnp.linalg.solve(jnp.eye(d * d, dtype=A.dtype) - jnp.kron(A, A), G.reshape(-1)).reshape(d, d)
        S = symmetrize(S)
    else:
        S = jnp.asarray(stationary_cov, A.dtype)
    HtRinv = H.T @ _inv_psd(R)
    Q = symmetrize(_inv_psd(_inv_psd(S) + HtRinv @ H))
    K = Q @ HtRinv
    return DKFModel(A, G, S, LinearMap(K), ConstantCovariance(Q))


# ----------------------------------------------------------------------------------------------
# Pieces of the observation model (equinox modules, so they are pytrees and save/load)
# ----------------------------------------------------------------------------------------------
class LinearMap(eqx.Module):
    matrix: jax.Array
    offset: Optional[jax.Array] = None

    def __call__(self, x):
        out = self.matrix @ x
        return out if self.offset is None else out + self.offset


class ConstantCovariance(eqx.Module):
    cov: jax.Array

    def __call__(self, x):
        return self.cov


def _sqdist(a, b):
    return jnp.maximum(jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2 * a @ b.T, 0.0)


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


def _standardise(x):
    mean = jnp.mean(x, 0)
    scale = jnp.std(x, 0)
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x - mean) / scale, mean, scale


def _default_bandwidths(d2, dtype):
    med = jnp.sqrt(jnp.median(d2[d2 > 0]))
    return med * jnp.logspace(-1.5, 0.5, 24, dtype=dtype)


def _to_2d(a, name):
    a = jnp.asarray(a)
    a = jnp.asarray(a, jnp.result_type(a.dtype, float))
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, dim), got shape {tuple(a.shape)}")
    checks.finite(a, name)
    return a


def _check_pair(x, z):
    x, z = _to_2d(x, "observations"), _to_2d(z, "states")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"observations: expected {z.shape[0]} rows to pair with states, got {x.shape[0]}")
    if x.shape[0] < 3:
        raise ValueError(f"states: expected at least 3 paired rows, got {x.shape[0]}")
    return x, z


def fit_nadaraya_watson(observations, states, *, bandwidths=None) -> NadarayaWatson:
    """Nadaraya-Watson regression of z on x; bandwidth minimises the leave-one-out squared error.

    Args:
        observations: (N, n) training x.
        states: (N, d) training z.
        bandwidths: candidate bandwidths (in units of standardised x); default 24 values
            log-spaced around the median pairwise distance.
    """
    x, z = _check_pair(observations, states)
    u, mean, scale = _standardise(x)
    d2 = _sqdist(u, u)
    hs = _default_bandwidths(d2, u.dtype) if bandwidths is None else jnp.asarray(bandwidths, u.dtype)
    if hs.ndim != 1 or not bool(jnp.all(hs > 0)):
        raise ValueError("bandwidths: expected a 1-D array of positive numbers")
    eye = jnp.eye(u.shape[0], dtype=bool)

    def loo_error(h):
        logw = jnp.where(eye, -jnp.inf, -0.5 * d2 / h ** 2)
        pred = jax.nn.softmax(logw, axis=1) @ z
        return jnp.mean(jnp.sum((pred - z) ** 2, -1))

    errs = lax.map(loo_error, hs)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    return NadarayaWatson(u, z, mean, scale, hs[jnp.argmin(errs)])


class MLPRegressor(eqx.Module):
    """f(x) = z_mean + z_scale * mlp((x - x_mean) / x_scale)."""

    mlp: eqx.nn.MLP
    x_mean: jax.Array
    x_scale: jax.Array
    z_mean: jax.Array
    z_scale: jax.Array

    def __call__(self, x):
        return self.z_mean + self.z_scale * self.mlp((x - self.x_mean) / self.x_scale)


@eqx.filter_jit
def _train_mlp(mlp, u, v, num_steps, learning_rate, weight_decay):
    # module level, so a second fit with the same shapes and settings reuses the compilation
    opt = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps), weight_decay=weight_decay)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def loss(p):
        net = eqx.combine(p, static)
        return jnp.mean((jax.vmap(net)(u) - v) ** 2)

    return eqx.combine(descend(loss, params, opt, num_steps), static)


def fit_mlp(key, observations, states, *, width: int = 64, depth: int = 2, num_steps: int = 2000,
            learning_rate: float = 3e-3, weight_decay: float = 1e-4) -> MLPRegressor:
    """A small equinox MLP regressing z on x, trained full-batch with optax AdamW (one `lax.scan`)."""
    x, z = _check_pair(observations, states)
    width, depth = checks.positive_int(width, "width"), checks.positive_int(depth, "depth")
    num_steps = checks.positive_int(num_steps, "num_steps")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: expected a number > 0, got {learning_rate}")
    u, xm, xs = _standardise(x)
    v, zm, zs = _standardise(z)
    mlp = eqx.nn.MLP(x.shape[1], z.shape[1], width, depth, activation=jax.nn.gelu, key=key)
    mlp = jax.tree_util.tree_map(lambda a: a.astype(x.dtype) if eqx.is_inexact_array(a) else a, mlp)
    params = _train_mlp(mlp, u, v, num_steps, float(learning_rate), float(weight_decay))
    return MLPRegressor(params, xm, xs, zm, zs)


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


def _gp_gram(theta, d2):
    ell, sf2, sn2 = jnp.exp(theta[0]), jnp.exp(theta[1]), jnp.exp(theta[2]) + 1e-6
    return ell, sf2, sf2 * jnp.exp(-0.5 * d2 / ell ** 2) + sn2 * jnp.eye(d2.shape[0], dtype=d2.dtype)


@partial(jax.jit, static_argnums=3)
def _fit_gp_hyper(theta, d2, v, num_steps):
    opt = optax.adam(0.05)

    def nll(th):
        L = jnp.linalg.cholesky(_gp_gram(th, d2)[2])
        a = jax.scipy.linalg.cho_solve((L, True), v)
        return 0.5 * jnp.sum(v * a) + v.shape[1] * jnp.sum(jnp.log(jnp.diagonal(L)))

    theta = descend(nll, theta, opt, num_steps)
    ell, sf2, K = _gp_gram(theta, d2)
    return ell, sf2, jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(K), True), v)


def fit_gp(observations, states, *, max_points: int = 1000, num_steps: int = 200) -> GPRegressor:
    """GP regression of z on x (shared kernel over output dimensions); the length-scale, signal
    and noise variances maximise the marginal likelihood (optax Adam). The first
    ``max_points`` rows are used (exact GP, O(N^3))."""
    x, z = _check_pair(observations, states)
    max_points = checks.positive_int(max_points, "max_points", 3)
    num_steps = checks.positive_int(num_steps, "num_steps")
    x, z = x[:max_points], z[:max_points]
    u, xm, xs = _standardise(x)
    v, zm, zs = _standardise(z)
    d2 = _sqdist(u, u)
    init = jnp.array([jnp.log(jnp.sqrt(jnp.median(d2[d2 > 0]))), 0.0, jnp.log(0.1)], u.dtype)
    ell, sf2, alpha = _fit_gp_hyper(init, d2, v, num_steps)
    return GPRegressor(u, alpha, xm, xs, zm, zs, ell, sf2)


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


def fit_covariance(mean_fn, observations, states, *, kind: str = "constant", bandwidths=None,
                   ridge: float = 1e-3):
    """Q for p(z | x) from residuals r_i = z_i - f(x_i) on held-out pairs.

    Args:
        mean_fn: the fitted f.
        observations, states: held-out (N, n) and (N, d), not used to fit f.
        kind: "constant" (Q = mean of r r^T) or "kernel" (Nadaraya-Watson regression of
            r r^T on x, bandwidth by leave-one-out Gaussian log-likelihood of the residuals).
        ridge: added to the kernel estimate as ``ridge * mean(diag(constant Q)) * I``.
    """
    x, z = _check_pair(observations, states)
    if kind not in ("constant", "kernel"):
        raise ValueError(f"kind: expected 'constant' or 'kernel', got {kind!r}")
    r = z - jax.vmap(mean_fn)(x)
    Q = symmetrize(r.T @ r / r.shape[0])
    if kind == "constant":
        return ConstantCovariance(Q)
    u, mean, scale = _standardise(x)
    d2 = _sqdist(u, u)
    hs = _default_bandwidths(d2, u.dtype) if bandwidths is None else jnp.asarray(bandwidths, u.dtype)
    outer = r[:, :, None] * r[:, None, :]
    ridge_m = ridge * jnp.mean(jnp.diagonal(Q)) * jnp.eye(Q.shape[0], dtype=Q.dtype)
    eye = jnp.eye(u.shape[0], dtype=bool)

    def loo_nll(h):
        w = jax.nn.softmax(jnp.where(eye, -jnp.inf, -0.5 * d2 / h ** 2), axis=1)
        Qs = jnp.einsum("ni,ijk->njk", w, outer) + ridge_m
        L = jnp.linalg.cholesky(Qs)
        s = jax.scipy.linalg.solve_triangular(L, r[..., None], lower=True)[..., 0]
        return jnp.mean(0.5 * jnp.sum(s ** 2, -1) + jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2)), -1))

    errs = lax.map(loo_nll, hs)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    return KernelCovariance(u, outer, mean, scale, hs[jnp.argmin(errs)], ridge_m)


# ----------------------------------------------------------------------------------------------
# State dynamics and the whole fit
# ----------------------------------------------------------------------------------------------
def fit_dynamics(states):
    """A, G by least squares and the stationary mean and covariance S = cov(z).

    Args:
        states: (T, d) one sequence, or a list of (T_i, d) sequences (trials).

    Returns:
        ``(A, G, mean, S)``.
    """
    seqs = list(states) if isinstance(states, (list, tuple)) else [states]
    seqs = [_to_2d(s, "states") for s in seqs]
    allz = jnp.concatenate(seqs)
    mean = jnp.mean(allz, 0)
    S = symmetrize(jnp.cov(allz.T, bias=True).reshape(allz.shape[1], allz.shape[1]))
    z0 = jnp.concatenate([s[:-1] for s in seqs]) - mean
    z1 = jnp.concatenate([s[1:] for s in seqs]) - mean
    if z0.shape[0] < allz.shape[1]:
        raise ValueError(f"states: expected at least {allz.shape[1] + 1} time steps, got {allz.shape[0]}")
    A = jnp.linalg.lstsq(z0, z1)[0].T
    res = z1 - z0 @ A.T
    G = symmetrize(res.T @ res / res.shape[0])
    return A, G, mean, S


def fit(states, observations, *, regressor="nw", covariance: str = "constant", holdout: float = 0.25,
        key=None, regressor_kwargs: Optional[dict] = None) -> DKFModel:
    """Learn a `DKFModel` from paired training data.

    Args:
        states: (N, d) latent states, in time order (or a list of trials).
        observations: (N, n) observations paired with ``states`` (or a list of trials).
        regressor: "nw" (Nadaraya-Watson), "mlp", "gp", or a callable
            ``(observations, states) -> f`` fitting your own.
        covariance: "constant" or "kernel" (see `fit_covariance`).
        holdout: fraction of the (last) rows held out from f to fit Q on residuals, in (0, 1).
        key: a `jax.random` key (needed by "mlp").
        regressor_kwargs: passed to the regressor's fit function.
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout: expected a fraction in (0, 1), got {holdout}")
    A, G, mean, S = fit_dynamics(states)
    z = jnp.concatenate(states) if isinstance(states, (list, tuple)) else states
    x = jnp.concatenate(observations) if isinstance(observations, (list, tuple)) else observations
    x, z = _check_pair(x, z)
    n_fit = int(round(x.shape[0] * (1 - holdout)))
    if n_fit < 3 or x.shape[0] - n_fit < 3:
        raise ValueError(f"holdout: leaves too few rows on one side of the split ({n_fit} / {x.shape[0]})")
    kw = dict(regressor_kwargs or {})
    if regressor == "nw":
        f = fit_nadaraya_watson(x[:n_fit], z[:n_fit], **kw)
    elif regressor == "mlp":
        if key is None:
            raise ValueError("key: the 'mlp' regressor needs a jax.random key, got None")
        f = fit_mlp(key, x[:n_fit], z[:n_fit], **kw)
    elif regressor == "gp":
        f = fit_gp(x[:n_fit], z[:n_fit], **kw)
    elif callable(regressor):
        f = regressor(x[:n_fit], z[:n_fit])
    else:
        raise ValueError(f"regressor: expected 'nw', 'mlp', 'gp' or a callable, got {regressor!r}")
    Q = fit_covariance(f, x[n_fit:], z[n_fit:], kind=covariance)
    return DKFModel(A, G, S, f, Q, mean)
