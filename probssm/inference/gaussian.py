"""Gaussian filters and smoothers for nonlinear models with additive Gaussian noise:
extended (EKF), iterated extended (IEKF), unscented (UKF) and cubature (CKF).

Every method is one Kalman recursion run on a *linearisation* of the model around
the current Gaussian belief N(m, P). A linearisation of a function g is an affine
map with an extra noise term,

    g(z) ~= A z + b + N(0, Omega),

after which the step is exactly a Kalman predict (F = A, b, Q + Omega) or update
(H = A, d = b, R + Omega). The methods differ only in how (A, b, Omega) are made:

    ekf       A = dg/dz at m (``jax.jacfwd``), b = g(m) - A m, Omega = 0
    iekf      the update is relinearised at the posterior mean ``num_iter`` times
              (Gauss-Newton on the MAP of z_t); prediction as in the EKF
    ukf       statistical linear regression on unscented sigma points:
              A = C^T P^{-1}, b = ybar - A m, Omega = S - A P A^T, with ybar, S, C the
              sigma-point mean, covariance and cross-covariance of g(z), z ~ N(m, P)
    cubature  the same on the 2d spherical-radial cubature points (UKF with
              alpha = 1, beta = 0, kappa = 0)

Written this way the sigma-point filters are algebraically the textbook UKF/CKF and
the RTS-type smoothers are the extended and unscented RTS smoothers: the backward
gain is E_t = P_t A_t^T (A_t P_t A_t^T + Omega_t + Q)^{-1} = C_t P_pred^{-1}, with the
transition linearised at the filtered belief of step t, exactly the linearisation
the filter used for its prediction. On a linear model every linearisation is exact
and each filter equals `ps.kalman` (to rounding).

Loop run by `lax.scan` (t indexes states and observations from 0)::

    m, P = m1, P1
    for t in 0..T-1:
        if t > 0:
            A, b, Om = linearise(z -> f(z, t, u_t), m, P);  m, P = A m + b, A P A^T + Q + Om
        A, b, Om = linearise(z -> h(z, t, u_t), m, P)      # IEKF: repeat at the new mean
        m, P, ll_t = kalman_update(m, P, A, b, R + Om, y_t) # NaN rows dropped exactly

Missing values (NaN) are handled exactly as in `ps.kalman` (its row-dropping update is
reused), so a step with every entry missing is a pure prediction; steps beyond a
sequence's ``lengths`` entry are treated as missing.

The engines read only the declared additive-Gaussian structure of the model
(`ps.core.AbstractAdditiveGaussianSSM`: ``initial_moments``, ``transition_mean``,
``transition_noise_cov``, ``emission_mean``, ``emission_noise_cov`` and the Jacobians),
so `ps.models.NonlinearGaussianSSM`, `ps.models.LinearGaussianSSM` (closed-form
Jacobians) and user subclasses all run.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import batching, checks
from probssm.core.batching import Batch
from probssm.core.linalg import cho_solve_lower, cholesky, mm, symmetrize
from probssm.core.protocol import AbstractAdditiveGaussianSSM
from probssm.inference.kalman import FilterResult, SmootherResult, mask_padding
from probssm.inference.kalman import predict as _predict
from probssm.inference.kalman import smoother_element as _smoother_element
from probssm.inference.kalman import update as _update

__all__ = ["METHODS", "FilterResult", "SmootherResult", "filter", "smoother", "sigma_points"]

METHODS = ("ekf", "iekf", "ukf", "cubature")


# ----------------------------------------------------------------------------------------------
# Linearisations: (fn, m, P) -> (A, b, Omega)
# ----------------------------------------------------------------------------------------------
def sigma_points(mean, cov, method: str = "ukf", alpha: float = 1.0, beta: float = 2.0,
                 kappa: Optional[float] = None):
    """Sigma points and weights of N(mean, cov).

    Args:
        mean: (d,).
        cov: (d, d), positive definite.
        method: "ukf" (2d + 1 scaled unscented points) or "cubature" (2d points).
        alpha, beta, kappa: unscented scaling; lambda = alpha^2 (d + kappa) - d. ``kappa=None``
            uses max(3 - d, 0) (for d = 1 the three points are Gauss-Hermite's).

    Returns:
        ``(points (n, d), mean_weights (n,), cov_weights (n,))``.
    """
    return _sigma_points(mean, cholesky(cov), method, alpha, beta, kappa)


def _sigma_points(mean, L, method, alpha, beta, kappa):
    d = mean.shape[0]
    dtype = mean.dtype
    if method == "cubature":
        scaled = math.sqrt(d) * L.T  # row i = sqrt(d) * column i of L
        points = jnp.concatenate([mean + scaled, mean - scaled])
        w = jnp.full((2 * d,), 1.0 / (2 * d), dtype)
        return points, w, w
    k = max(3.0 - d, 0.0) if kappa is None else float(kappa)
    lam = alpha ** 2 * (d + k) - d
    scaled = math.sqrt(d + lam) * L.T
    points = jnp.concatenate([mean[None], mean + scaled, mean - scaled])
    wi = 1.0 / (2.0 * (d + lam))
    wm = jnp.concatenate([jnp.full((1,), lam / (d + lam), dtype), jnp.full((2 * d,), wi, dtype)])
    wc = wm.at[0].add(1.0 - alpha ** 2 + beta)
    return points, wm, wc


_FUSE_ELEMENTS = 4096  # below this many multiplies a broadcast-sum beats a tiny GEMM call


def _weighted_sum(w, Y):
    """sum_i w_i Y_i for points Y (n, p)."""
    if Y.size > _FUSE_ELEMENTS:
        return w @ Y
    return jnp.sum(w[:, None] * Y, axis=0)


def _weighted_outer(w, X, Y):
    """sum_i w_i X_i Y_i^T for points X (n, d), Y (n, p): fused for small sizes."""
    if X.shape[0] * X.shape[1] * Y.shape[1] > _FUSE_ELEMENTS:
        return (w[:, None] * X).T @ Y
    return jnp.sum(w[:, None, None] * X[:, :, None] * Y[:, None, :], axis=0)


def _slr(fn, m, P, cfg):
    """Statistical linear regression of fn on sigma points of N(m, P)."""
    L = cholesky(P)  # one factorisation for both the points and the regression
    points, wm, wc = _sigma_points(m, L, cfg.method, cfg.alpha, cfg.beta, cfg.kappa)
    Y = jax.vmap(fn)(points)
    ybar = _weighted_sum(wm, Y)
    dX = points - m
    dY = Y - ybar
    C = _weighted_outer(wc, dX, dY)  # (d, p) Cov[z, g(z)]
    S = _weighted_outer(wc, dY, dY)  # (p, p) Cov[g(z)]
    A = cho_solve_lower(L, C).T  # C^T P^{-1}
    b = ybar - mm(A, m)
    Omega = symmetrize(S - mm(mm(A, P), A.T))
    return A, b, Omega


def _taylor(fn, jac, m):
    A = jac(m)
    out = fn(m)
    return A, out - mm(A, m)


class _Config(eqx.Module):
    """Static settings of one run (hashable: all Python values)."""

    method: str = eqx.field(static=True)
    num_iter: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    kappa: Optional[float] = eqx.field(static=True)
    transition_jacobian: Optional[Callable] = eqx.field(static=True)
    emission_jacobian: Optional[Callable] = eqx.field(static=True)


def _row(inputs, t):
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[t], inputs)


def _linearise_transition(model, cfg, m, P, t, u):
    f = lambda z: model.transition_mean(z, t, u)
    Q = model.transition_noise_cov(t, u)
    if cfg.method in ("ekf", "iekf"):
        jac = (lambda z: model.transition_jacobian(z, t, u)) if cfg.transition_jacobian is None else (
            lambda z: cfg.transition_jacobian(z, t, u))
        A, b = _taylor(f, jac, m)
        return A, b, Q
    A, b, Omega = _slr(f, m, P, cfg)
    return A, b, symmetrize(Q + Omega)


def _measure(model, cfg, m, P, t, u, y, mask):
    h = lambda z: model.emission_mean(z, t, u)
    R = model.emission_noise_cov(t, u)
    if cfg.method in ("ekf", "iekf"):
        jac = (lambda z: model.emission_jacobian(z, t, u)) if cfg.emission_jacobian is None else (
            lambda z: cfg.emission_jacobian(z, t, u))

        def at(z):
            A, b = _taylor(h, jac, z)
            return _update(m, P, A, b, R, y, mask)

        if cfg.method == "iekf" and cfg.num_iter > 1:
            z = lax.fori_loop(0, cfg.num_iter - 1, lambda i, z: at(z)[0], m)
        else:
            z = m
        return at(z)
    A, b, Omega = _slr(h, m, P, cfg)
    return _update(m, P, A, b, symmetrize(R + Omega), y, mask)


# ----------------------------------------------------------------------------------------------
# Filter and smoother cores
# ----------------------------------------------------------------------------------------------
def _filter_core(model, cfg, ys, masks, inputs):
    """Returns the FilterResult and the transition linearisation (A, b, Q_eff) of steps 1..T-1."""
    mask_at = (lambda t: None) if masks is None else (lambda t: masks[t])
    m1, P1 = model.initial_moments(_row(inputs, 0))
    m0, P0, ll0 = _measure(model, cfg, m1, P1, 0, _row(inputs, 0), ys[0], mask_at(0))

    def step(carry, t):
        m, P, ll = carry
        u = _row(inputs, t)
        A, b, Qe = _linearise_transition(model, cfg, m, P, t, u)
        m, P = _predict(m, P, A, b, Qe)
        m, P, ll_t = _measure(model, cfg, m, P, t, u, ys[t], mask_at(t))
        return (m, P, ll + ll_t), (m, P, A, b, Qe)

    ts = jnp.arange(1, ys.shape[0])
    (_, _, ll), (ms, Ps, As, bs, Qs) = lax.scan(step, (m0, P0, ll0), ts)
    result = FilterResult(ll, jnp.concatenate([m0[None], ms]), jnp.concatenate([P0[None], Ps]))
    return result, (As, bs, Qs)


def _smoother_core(model, cfg, ys, masks, inputs):
    filtered, (As, bs, Qs) = _filter_core(model, cfg, ys, masks, inputs)
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    body = jax.vmap(_smoother_element)(ms[:-1], Ps[:-1], As, bs, Qs)

    def step(carry, e):
        m_next, P_next = carry
        m = mm(e.E, m_next) + e.g
        P = symmetrize(mm(mm(e.E, P_next), e.E.T) + e.L)
        return (m, P), (m, P)

    _, (sm, sP) = lax.scan(step, (ms[-1], Ps[-1]), body, reverse=True)
    means = jnp.concatenate([sm, ms[-1][None]])
    covs = jnp.concatenate([sP, Ps[-1][None]])
    cross = jnp.einsum("tij,tkj->tik", covs[1:], body.E)  # Cov[z_{t+1}, z_t] = P^s_{t+1} E_t^T
    return SmootherResult(filtered.log_likelihood, ms, Ps, means, covs, cross)


@eqx.filter_jit
def _run(model, ys, inputs, lengths, cfg, has_missing, batched, inputs_batched, smooth):
    def one(y, u, n):
        y = mask_padding(y, n)
        masks = ~jnp.isnan(y) if (has_missing or n is not None) else None
        if smooth:
            return _smoother_core(model, cfg, y, masks, u)
        return _filter_core(model, cfg, y, masks, u)[0]

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _first_row(batch: Batch, t: int):
    """Input row t of the first sequence (for the checks), or None."""
    if batch.inputs is None:
        return None
    t = min(t, batch.num_timesteps - 1)
    return jax.tree_util.tree_map(lambda a: a[0, t] if batch.inputs_batched else a[t], batch.inputs)


def _check_model(model, batch: Batch):
    """Shapes and values of the model's arrays, read through its declared methods (so a model
    edited with eqx.tree_at is checked too). Noise covariances are checked at steps 0 and 1."""
    d, p = model.state_dim, model.emission_dim
    u0, u1 = _first_row(batch, 0), _first_row(batch, 1)
    m1, P1 = model.initial_moments(u0)
    Q, R = model.transition_noise_cov(1, u1), model.emission_noise_cov(0, u0)
    checks.shape(jnp.asarray(m1), "initial_mean", (d,))
    checks.shape(jnp.asarray(P1), "initial_cov", (d, d))
    checks.shape(jnp.asarray(Q), "transition_cov", (d, d))
    checks.shape(jnp.asarray(R), "emission_cov", (p, p))
    checks.finite(m1, "initial_mean")
    checks.psd(P1, "initial_cov")
    checks.psd(Q, "transition_cov", strict=False)
    checks.psd(R, "emission_cov", strict=False)
    # The mean functions' output shapes are not traced here (that would retrace user code on
    # every call); NonlinearGaussianSSM checks them once in its constructor.
    z = jax.ShapeDtypeStruct((d,), jnp.result_type(m1))
    return u1, z


def _prepare(model, emissions, inputs, lengths, method, num_iter, alpha, beta, kappa, transition_jacobian,
             emission_jacobian):
    if not isinstance(model, AbstractAdditiveGaussianSSM):
        raise ValueError("model: expected an additive-Gaussian model (ps.core.AbstractAdditiveGaussianSSM, e.g. "
                         f"ps.models.NonlinearGaussianSSM), got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    num_iter = checks.positive_int(num_iter, "num_iter")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if alpha <= 0:
        raise ValueError(f"alpha: expected a number > 0, got {alpha}")
    d, p = model.state_dim, model.emission_dim
    if kappa is not None:
        if not isinstance(kappa, (int, float)) or not math.isfinite(kappa):
            raise ValueError(f"kappa: expected a finite number or None, got {kappa!r}")
        if method == "ukf" and alpha ** 2 * (d + kappa) <= 0:
            raise ValueError(f"kappa: expected alpha^2 (d + kappa) > 0 (d = {d}), got kappa = {kappa}")
    if isinstance(emissions, (list, tuple)):
        for i, y in enumerate(emissions):
            if not (jnp.ndim(y) == 2 and jnp.shape(y)[-1] == p) and not (jnp.ndim(y) == 1 and p == 1):
                raise ValueError(f"emissions[{i}]: expected shape (T_b, {p}), got shape {tuple(jnp.shape(y))}")
    else:
        checks.emissions_batch(emissions, p)
    if inputs is not None and model.input_dim == 0:
        raise ValueError("inputs: the model reads no inputs (input_dim = 0), expected None")
    if inputs is not None and not isinstance(inputs, list):
        inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
        if isinstance(inputs, jax.Array) and inputs.ndim == 1:
            inputs = inputs[:, None]
    batch = batching.as_batch(emissions, inputs, lengths)
    if checks.is_concrete(batch.emissions) and bool(np.isinf(np.asarray(batch.emissions)).any()):
        raise ValueError("emissions: found inf; use NaN to mark missing values")
    if model.num_timesteps is not None and model.num_timesteps != batch.num_timesteps:
        raise ValueError(f"model: its time-varying parameters have length {model.num_timesteps}, expected "
                         f"{batch.num_timesteps} (the number of time steps)")
    for leaf in jax.tree_util.tree_leaves(batch.inputs):
        if model.input_dim and jnp.shape(leaf)[-1] != model.input_dim:
            raise ValueError(f"inputs: expected {model.input_dim} columns, got shape {tuple(jnp.shape(leaf))}")
        checks.finite(leaf, "inputs")
    u1, z = _check_model(model, batch)
    for name, jac, expected in (("transition_jacobian", transition_jacobian, (d, d)),
                                ("emission_jacobian", emission_jacobian, (p, d))):
        if jac is None:
            continue
        if method not in ("ekf", "iekf"):
            raise ValueError(f"{name}: only used by method 'ekf' or 'iekf', got method {method!r}")
        if not callable(jac):
            raise ValueError(f"{name}: expected a callable (z, t, inputs) -> {expected}, got {jac!r}")
        out = jax.eval_shape(lambda z: jac(z, 1, u1), z)
        if out.shape != expected:
            raise ValueError(f"{name}: expected a Jacobian of shape {expected}, got shape {out.shape}")
    ys = batch.emissions
    has_missing = (not checks.is_concrete(ys)) or bool(np.isnan(np.asarray(ys)).any())
    cfg = _Config(method, num_iter, float(alpha), float(beta), None if kappa is None else float(kappa),
                  transition_jacobian, emission_jacobian)
    return batch, cfg, dict(has_missing=has_missing, batched=batch.batched, inputs_batched=batch.inputs_batched)


def filter(model, emissions, *, method: str = "ekf", inputs=None, lengths=None, num_iter: int = 5,
           alpha: float = 1.0,
           beta: float = 2.0, kappa: Optional[float] = None, transition_jacobian: Optional[Callable] = None,
           emission_jacobian: Optional[Callable] = None) -> FilterResult:
    """Gaussian filter (EKF, IEKF, UKF or cubature) for any additive-Gaussian model.

    Args:
        model: a `ps.core.AbstractAdditiveGaussianSSM` (`ps.models.NonlinearGaussianSSM`,
            `ps.models.LinearGaussianSSM`, or a user subclass).
        emissions: (T, p), a batch (B, T, p) or a list of (T_b, p); NaN marks a missing value
            (dropped exactly; a partly missing row keeps its observed entries).
        method: "ekf", "iekf", "ukf" or "cubature".
        inputs: optional (T, U) shared or (B, T, U) per sequence; row t is passed to f and h at step t.
        lengths: (B,) true lengths of a padded batch; steps beyond are treated as missing.
        num_iter: IEKF only; the number of linearisations of each update (1 gives the EKF).
        alpha, beta, kappa: UKF sigma-point scaling (see `sigma_points`).
        transition_jacobian: EKF/IEKF only; ``J_f(z, t, inputs) -> (d, d)``; default ``jax.jacfwd``.
        emission_jacobian: EKF/IEKF only; ``J_h(z, t, inputs) -> (p, d)``; default ``jax.jacfwd``.

    Returns:
        `ps.kalman.FilterResult`: log_likelihood (), filtered_means (T, d), filtered_covs (T, d, d)
        (with a leading B axis for batches); ``log_likelihood`` is the sum of the approximate
        one-step predictive log-densities.

    Example:
        >>> model = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1),
        ...     lambda z, t, u: jnp.sin(z), 0.1 * jnp.eye(1), lambda z, t, u: z ** 2 / 20, jnp.eye(1))
        >>> _, y = ps.sample(jax.random.key(0), model, 100)
        >>> ps.gaussian.filter(model, y, method="ukf").filtered_means.shape     # (100, 1)

    The model's functions are plain Python callables, so the engine is compiled with
    `equinox.filter_jit`: pass the same function objects again to reuse the compiled code.
    """
    batch, cfg, flags = _prepare(model, emissions, inputs, lengths, method, num_iter, alpha, beta, kappa,
                                 transition_jacobian, emission_jacobian)
    return _run(model, batch.emissions, batch.inputs, batch.lengths, cfg, smooth=False, **flags)


def smoother(model, emissions, *, method: str = "ekf", inputs=None, lengths=None, num_iter: int = 5,
             alpha: float = 1.0,
             beta: float = 2.0, kappa: Optional[float] = None, transition_jacobian: Optional[Callable] = None,
             emission_jacobian: Optional[Callable] = None) -> SmootherResult:
    """RTS-type smoother on top of `filter` (extended RTS for ekf/iekf, unscented/cubature RTS).

    Same arguments as `filter`. Backward pass (``E_t`` is the gain of the transition
    linearised at the filtered belief of step t, the one the filter predicted with)::

        ms[T-1], Ps[T-1] = filtered
        for t in T-2..0:
            E = P_t A_t^T Pp_{t+1}^{-1}
            ms[t] = m_t + E (ms[t+1] - mp_{t+1});  Ps[t] = P_t + E (Ps[t+1] - Pp_{t+1}) E^T

    Returns:
        `ps.kalman.SmootherResult`: the filter's fields plus smoothed_means (T, d), smoothed_covs
        (T, d, d), smoothed_cross_covs (T-1, d, d) (approximating Cov[z_{t+1}, z_t | y]).
    """
    batch, cfg, flags = _prepare(model, emissions, inputs, lengths, method, num_iter, alpha, beta, kappa,
                                 transition_jacobian, emission_jacobian)
    return _run(model, batch.emissions, batch.inputs, batch.lengths, cfg, smooth=True, **flags)
