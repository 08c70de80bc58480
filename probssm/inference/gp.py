"""Gaussian-process regression in O(T): `ps.gp`.

Kernels are linear SDEs (`probssm.models.kernels`), a `ps.models.MarkovianGP` is a linear-Gaussian
state-space model over the observation times, and the Kalman filter / smoother does the rest:

    k = ps.gp.Matern32(lengthscale=1.0, variance=1.0) + ps.gp.Periodic(period=1.0)
    gp = ps.models.MarkovianGP(k, noise_variance=0.1)
    ps.gp.log_marginal_likelihood(gp, t, y)       # t (T,) sorted, distinct; y (T,) or (T, p); NaN = missing
    mean, var = ps.gp.predict(gp, t, y, t_new)    # posterior of f at any t_new, one O(T + T_new) pass

Both are traceable (use them inside `jax.jit`, `jax.grad` over the model's hyperparameters,
`jax.vmap`), and take ``parallel=True`` for the associative-scan (parallel-in-time) Kalman.
Hyperparameters are learned by `ps.learn.mle(gp, y, inputs=t[:, None])`.
"""
from __future__ import annotations


from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks
from probssm.core.linalg import mm
from probssm.core.protocol import AbstractMarkovianGP
from probssm.inference import kalman
from probssm.models.gp import MarkovianGP, check_times
from probssm.models.kernels import *  # noqa: F401,F403  (the kernels are ps.gp's public names)
from probssm.models import kernels as _kernels

__all__ = list(_kernels.__all__) + ["log_marginal_likelihood", "predict", "Prediction",
                                    "check_times"]


class Prediction(NamedTuple):
    """Posterior marginals at new times: ``mean, var = ps.gp.predict(...)`` unpacks them."""

    mean: jax.Array  # (T_new,) one output / latent function, else (T_new, L or p)
    var: jax.Array


def _check_model(gp) -> None:
    if not isinstance(gp, AbstractMarkovianGP):
        raise ValueError(f"gp: expected a GP in state-space form (e.g. ps.models.MarkovianGP), got "
                         f"{type(gp).__name__}")
    checks.once_per_model(gp, "parameters", lambda: gp.check_parameters())


def _as_series(y, p: int, T: int, name: str = "y") -> jax.Array:
    a = jnp.asarray(y)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if a.ndim == 1 and p == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape != (T, p):
        doc = f"({T},) or ({T}, 1)" if p == 1 else f"({T}, {p})"
        raise ValueError(f"{name}: expected shape {doc} (one row per time in t), got shape {tuple(a.shape)}")
    if checks.is_concrete(a) and np.isinf(np.asarray(a)).any():
        raise ValueError(f"{name}: found inf; use NaN to mark missing values")
    return a


def log_marginal_likelihood(gp: MarkovianGP, t, y, *, parallel: bool = False) -> jax.Array:
    """log p(y) of GP regression with the model's kernel(s) and Gaussian noise, in O(T).

    Args:
        gp: a `ps.models.MarkovianGP` (its own ``times``, if any, are ignored: ``t`` rules).
        t: (T,) sorted, distinct observation times.
        y: (T,) or (T, p) observations; NaN marks a missing value (left out exactly).
        parallel: associative-scan Kalman filter instead of the sequential one.

    Returns:
        The scalar log marginal likelihood.

    Raises:
        ValueError: naming the argument, for unsorted / repeated / non-finite times, y of the wrong
            shape, or a non-positive hyperparameter.
    """
    _check_model(gp)
    t = check_times(t, "t")
    ys = _as_series(y, gp.emission_dim, t.shape[0])
    t, ys = _common_dtype(gp, t, ys)
    return _lml(gp, t, ys, parallel)


def _common_dtype(gp, *arrays):
    dtype = jnp.result_type(gp.latent_matrix().dtype, *[a.dtype for a in arrays])
    return tuple(a.astype(dtype) for a in arrays)


@partial(jax.jit, static_argnums=3)
def _lml(gp, t, ys, parallel):
    if parallel:
        return kalman.filter_params(gp.params_at(t), ys, parallel=True).log_likelihood
    return _lml_sequential(gp, t, ys)


def _lml_sequential(gp, t, ys):
    """log p(y) by a Kalman filter specialised to a GP (see `_scalar_filter_log_likelihood`)."""
    params = gp.params_at(t)
    seen = ~jnp.isnan(ys)
    resid = jnp.where(seen, ys - params.emission_offset, 0.0)
    return _scalar_filter_log_likelihood(params.transition_matrix, params.transition_cov, params.emission_matrix,
                                         gp.output_noise(), resid, seen.astype(ys.dtype), params.initial_mean,
                                         params.initial_cov)


def _absorb(m, P, h, r, v_base, obs):
    """One scalar observation y = h.z + N(0, r) (``v_base`` = y - offset) absorbed into N(m, P);
    returns the new moments and what the adjoint needs."""
    u = mm(P, h)
    s = jnp.sum(h * u) + r
    v = v_base - jnp.sum(h * m)
    k = obs * u / s
    return m + k * v, P - k[:, None] * u[None, :], (u, s, v)


# Steps per loop iteration of the filter. A loop that writes a per-step output is not fused into
# one kernel on CPU, so each iteration pays a fixed cost (~1.5 us at d = 2, more than the step's
# arithmetic); unrolling 4 steps shares it (value + gradient at T = 1e5: 0.25 s against 0.32 s
# unrolled 1, compile 1.9 s against 1.7 s; unrolling 8 gains nothing more and compiles 2.2 s). The
# adjoint's larger body is unrolled 2.
_UNROLL = 4


def _filter_forward(A, Q, H, r, resid, seen, m0, P0, keep: bool = True):
    """Kalman filter over steps t (z_t = A_t z_{t-1} + N(0, Q_t); the outputs absorbed one by one as
    scalars, their noise being diagonal); returns log p(y) and (``keep``) the moments entering each
    step, packed as rows (m, P); without them the loop fuses into one kernel (7x faster)."""
    log2pi = jnp.log(2.0 * jnp.pi).astype(resid.dtype)
    p = H.shape[0]

    def step(carry, xs):
        m, P, ll = carry
        A_t, Q_t, res_t, obs_t = xs
        entering = jnp.concatenate([m, P.reshape(-1)]) if keep else None
        m, P = mm(A_t, m), mm(mm(A_t, P), A_t.T) + Q_t
        for j in range(p):  # p is small and static
            m, P, (_, s, v) = _absorb(m, P, H[j], r[j], res_t[j], obs_t[j])
            ll = ll - 0.5 * obs_t[j] * (log2pi + jnp.log(s) + v * v / s)
        return (m, 0.5 * (P + P.T), ll), entering

    # separate per-step inputs (not one packed row): slicing a packed row inside the loop stops XLA
    # from fusing the loop body, 15x slower for the value alone
    (_, _, ll), entering = lax.scan(step, (m0, P0, jnp.zeros((), resid.dtype)), (A, Q, resid, seen),
                                    unroll=_UNROLL if keep else 1)
    return ll, entering


@jax.custom_vjp
def _scalar_filter_log_likelihood(A, Q, H, r, resid, seen, m0, P0):
    """log p(y) of the linear-Gaussian system with diagonal observation noise ``r`` (p,), steps
    (A_t, Q_t) (T, d, d), residuals y_t - d (T, p) (0 where missing) and 0/1 mask ``seen`` (T, p).

    Why a hand-written adjoint: reverse-mode autodiff of a scan stores and replays every small
    operation of every step, which on CPU costs 100x the forward pass of this filter; the adjoint
    below is one more loop of the same size (tested against autodiff of `_filter_forward`)."""
    return _filter_forward(A, Q, H, r, resid, seen, m0, P0, keep=False)[0]


def _filter_fwd(A, Q, H, r, resid, seen, m0, P0):
    ll, entering = _filter_forward(A, Q, H, r, resid, seen, m0, P0)
    return ll, (A, Q, H, r, resid, seen, entering)


def _filter_bwd(res, g):
    A, Q, H, r, resid, seen, entering = res
    p, d = H.shape

    def step(carry, xs):
        m_bar, P_bar, H_bar, r_bar = carry
        A_t, Q_t, res_t, obs_t, m_in, P_in = xs
        # recompute the step forward, keeping the intermediates of each scalar update
        m, P = mm(A_t, m_in), mm(mm(A_t, P_in), A_t.T) + Q_t
        saved = []
        for j in range(p):
            m_j, P_j = m, P
            m, P, aux = _absorb(m, P, H[j], r[j], res_t[j], obs_t[j])
            saved.append((m_j, P_j) + aux)
        P_bar = 0.5 * (P_bar + P_bar.T)  # through the symmetrisation
        res_bar, H_rows, r_parts = [], [], []
        for j in reversed(range(p)):
            m_j, P_j, u, s, v = saved[j]
            h, o = H[j], obs_t[j]
            mu = jnp.sum(m_bar * u)
            s_bar = o * (-0.5 * g * (1.0 / s - v * v / (s * s)) + (jnp.sum(u * mm(P_bar, u)) - mu * v) / (s * s))
            v_bar = o * (-g * v / s + mu / s)
            u_bar = o * (-mm(P_bar + P_bar.T, u) / s + m_bar * v / s) + s_bar * h
            H_rows.append(-v_bar * m_j + s_bar * u + mm(P_j, u_bar))
            r_parts.append(s_bar)
            res_bar.append(v_bar)
            m_bar = m_bar - v_bar * h
            P_bar = P_bar + u_bar[:, None] * h[None, :]
        H_bar = H_bar + jnp.stack(H_rows[::-1])
        r_bar = r_bar + jnp.stack(r_parts[::-1])
        # through the prediction m = A m_in, P = A P_in A^T + Q
        A_bar = m_bar[:, None] * m_in[None, :] + mm(mm(P_bar + P_bar.T, A_t), P_in)
        Q_bar = P_bar
        m_bar, P_bar = mm(A_t.T, m_bar), mm(mm(A_t.T, P_bar), A_t)
        out = jnp.concatenate([A_bar.reshape(-1), Q_bar.reshape(-1), jnp.stack(res_bar[::-1])])
        return (m_bar, P_bar, H_bar, r_bar), out

    init = (jnp.zeros(d, resid.dtype), jnp.zeros((d, d), resid.dtype), jnp.zeros_like(H), jnp.zeros_like(r))
    T = A.shape[0]
    ms_in, Ps_in = entering[:, :d], entering[:, d:].reshape(T, d, d)
    (m0_bar, P0_bar, H_bar, r_bar), out = lax.scan(step, init, (A, Q, resid, seen, ms_in, Ps_in), reverse=True,
                                                   unroll=2)
    A_bar, Q_bar = out[:, :d * d].reshape(T, d, d), out[:, d * d:2 * d * d].reshape(T, d, d)
    return A_bar, Q_bar, H_bar, r_bar, out[:, 2 * d * d:], jnp.zeros_like(seen), m0_bar, P0_bar


_scalar_filter_log_likelihood.defvjp(_filter_fwd, _filter_bwd)


def predict(gp: MarkovianGP, t, y, t_new, *, observed: bool = False, parallel: bool = False) -> Prediction:
    """Posterior mean and variance at new times, from one smoother pass over t and t_new merged.

    The new times are slotted into the sorted training times as missing observations, so one
    Kalman smoother over T + T_new steps gives every marginal: O(T + T_new), no refit per point.
    New times may lie before, between or after the training times, in any order, and may repeat
    training times.

    Args:
        gp: a `ps.models.MarkovianGP`.
        t: (T,) sorted, distinct training times.
        y: (T,) or (T, p) observations (NaN = missing).
        t_new: (T_new,) new times (any order).
        observed: False: the latent functions f (L of them); True: the outputs y = W f + mean +
            noise (p of them).
        parallel: associative-scan smoother instead of the sequential one.

    Returns:
        `Prediction` (mean, var): (T_new,) arrays for one function / output, else (T_new, L or p).
    """
    _check_model(gp)
    t = check_times(t, "t")
    ys = _as_series(y, gp.emission_dim, t.shape[0])
    t_new = jnp.asarray(t_new)
    if t_new.ndim == 0:
        t_new = t_new[None]
    if t_new.ndim != 1:
        raise ValueError(f"t_new: expected shape (T_new,), got shape {tuple(t_new.shape)}")
    if checks.is_concrete(t_new) and not np.all(np.isfinite(np.asarray(t_new, dtype=float))):
        raise ValueError("t_new: expected finite times, found NaN or inf")
    t, ys, t_new = _common_dtype(gp, t, ys, t_new.astype(jnp.result_type(t_new.dtype, float)))
    if checks.is_concrete(t_new):
        span = float(np.max(np.abs(np.concatenate([np.asarray(t), np.asarray(t_new)]))))
        if not span < 0.5 * float(jnp.finfo(t.dtype).max):
            raise ValueError(f"t_new: times up to {span:g} overflow {t.dtype} differences")
    return _predict(gp, t, ys, t_new, observed, parallel)


@partial(jax.jit, static_argnums=(4, 5))
def _predict(gp, t, ys, t_new, observed, parallel):
    T = t.shape[0]
    merged = jnp.concatenate([t, t_new])
    order = jnp.argsort(merged, stable=True)  # a new time equal to a training time comes after it
    y_all = jnp.concatenate([ys, jnp.full((t_new.shape[0], ys.shape[1]), jnp.nan, ys.dtype)])
    post = kalman.smoother_params(gp.params_at(merged[order]), y_all[order], parallel=parallel)
    where = jnp.argsort(order)[T:]  # rows of the new times in the merged, sorted grid
    m, P = post.smoothed_means[where], post.smoothed_covs[where]
    params = gp.params_at(t[:1])
    G = params.emission_matrix if observed else gp.latent_matrix()
    mean = m @ G.T + (params.emission_offset if observed else 0.0)
    var = jnp.einsum("ij,tjk,ik->ti", G, P, G)
    if observed:
        var = var + gp.output_noise()
    if mean.shape[1] == 1:
        mean, var = mean[:, 0], var[:, 0]
    return Prediction(mean, var)

