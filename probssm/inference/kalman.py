"""Exact inference for linear-Gaussian models: Kalman filter, RTS smoother,
forward-filter backward-sample and forecasting, sequential or parallel in time.

Sequential filter (the loop `lax.scan` runs)::

    m, P = m1, P1                                   # predicted moments of z_0
    for t in 0..T-1:
        if t > 0:  m, P = F_t m + b_t, F_t P F_t^T + Q_t           # predict
        S = H_t P H_t^T + R_t;  L = chol(S)                           # update
        W = L^{-1} H_t P;  v = L^{-1} (y_t - H_t m - d_t)
        m, P = m + W^T v, P - W^T W
        loglik += log N(v; 0, I) - sum(log diag L)

Missing values (NaN) are dropped exactly: the observed rows of H, d, R are kept
and each missing row is replaced by an uninformative unit-variance row whose
residual is zero, then its log(2 pi) term is removed. Whole or partial rows.

Parallel forms (Särkkä & García-Fernández, 2021) write each step as an element
of an associative operator and combine them with `lax.associative_scan`; the
filtering element of step t is the affine-Gaussian map z_{t-1} -> z_t given
y_t, (A, b, C), with the information (eta, J) that y_t carries about z_{t-1}:

    (A, b, C, eta, J)_i  o  (A, b, C, eta, J)_j     (i before j)
      M   = (I + C_i J_j)^{-1}
      A   = A_j M A_i
      b   = A_j M (b_i + C_i eta_j) + b_j
      C   = A_j M C_i A_j^T + C_j
      eta = A_i^T M^T (eta_j - J_j b_i) + eta_i
      J   = A_i^T M^T J_j A_i + J_i

The smoothing element of step t is the backward map z_{t+1} -> z_t,
z_t = E_t z_{t+1} + g_t + N(0, L_t); composing two is composing affine maps.
The sequential smoother runs the same backward recursion with `lax.scan`.

Why one module of ~700 lines: the sequential and parallel forms of the four operations
(filter, smoother, sampler, forecast) share the predict / update / smoothing-element
kernels and the missing-data masking, and the checks of the model-level functions are
written once for all of them; split, every piece would import the others' kernels.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional

import warnings
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import batching, checks
from probssm.core.batching import Batch
from probssm.core.linalg import cho_solve_lower, cholesky, mm, solve_lower, symmetrize
from probssm.core.protocol import AbstractLinearGaussianSSM, LinearGaussianParams
from probssm.core.scan import TWO_LEVEL, chunked_associative_scan, scan_in_place, two_level_size

__all__ = ["FilterResult", "SmootherResult", "ForecastResult", "filter", "smoother", "sample", "forecast",
           "log_likelihood", "filter_params", "smoother_params", "sample_params", "forecast_params",
           "mask_padding", "check_arguments", "expand_time", "predict", "update", "smoother_element",
           "SmootherElement", "initial_form", "steady_state_rtol", "affine_recurrence", "params_at"]

_LOG_2PI = 1.8378770664093453

# Number of dimensions of one time step's value of each LinearGaussianParams field.
_BASE_NDIM = LinearGaussianParams(1, 2, 2, 1, 2, 2, 1, 2)


class FilterResult(NamedTuple):
    """Kalman filter output; a leading batch axis B is added for batched emissions."""

    log_likelihood: jax.Array  # ()
    filtered_means: jax.Array  # (T, d)   E[z_t | y_{0:t}]
    filtered_covs: jax.Array  # (T, d, d)


class SmootherResult(NamedTuple):
    log_likelihood: jax.Array  # ()
    filtered_means: jax.Array  # (T, d)
    filtered_covs: jax.Array  # (T, d, d)
    smoothed_means: jax.Array  # (T, d)   E[z_t | y_{0:T-1}]
    smoothed_covs: jax.Array  # (T, d, d)
    smoothed_cross_covs: jax.Array  # (T-1, d, d)  Cov[z_{t+1}, z_t | y_{0:T-1}]


class ForecastResult(NamedTuple):
    means: jax.Array  # (k, d)  E[z_{T-1+j} | y_{0:T-1}], j = 1..k
    covs: jax.Array  # (k, d, d)
    emission_means: jax.Array  # (k, p)
    emission_covs: jax.Array  # (k, p, p)


# ----------------------------------------------------------------------------------------------
# Parameter helpers
# ----------------------------------------------------------------------------------------------
def _is_time_varying(params: LinearGaussianParams):
    return LinearGaussianParams(*(jnp.ndim(a) > n for a, n in zip(params, _BASE_NDIM)))


def params_at(params: LinearGaussianParams, t) -> LinearGaussianParams:
    """The system of step t (t may be traced): time-varying fields indexed at t, fixed ones as they are."""
    return LinearGaussianParams(*(a[t] if jnp.ndim(a) > n else a for a, n in zip(params, _BASE_NDIM)))


_at = params_at


def _slice_time(params: LinearGaussianParams, start, stop):
    return LinearGaussianParams(*(a[start:stop] if jnp.ndim(a) > n else a for a, n in zip(params, _BASE_NDIM)))


def _broadcast_time(params: LinearGaussianParams, num_timesteps: int):
    """Give every per-step field a leading time axis (for the vmapped parallel forms)."""
    return LinearGaussianParams(
        *(a if (jnp.ndim(a) > n or i < 2) else jnp.broadcast_to(a, (num_timesteps,) + jnp.shape(a))
          for i, (a, n) in enumerate(zip(params, _BASE_NDIM)))
    )


def expand_time(params: LinearGaussianParams, num_timesteps: int) -> LinearGaussianParams:
    """``params`` with a leading time axis of length ``num_timesteps`` on every per-step field
    (F, b, Q (T, d, d)/(T, d); H, d, R (T, p, d)/(T, p)/(T, p, p)); the initial moments unchanged."""
    return _broadcast_time(params, num_timesteps)


def _mask_observation(H, d, R, y, mask):
    """Drop missing entries of y_t exactly: zero their rows of H and d, give them unit variance."""
    if mask is None:
        return H, d, R, y, jnp.asarray(y.shape[-1], y.dtype)
    obs = mask.astype(y.dtype)
    H = H * obs[:, None]
    d = d * obs
    R = R * obs[:, None] * obs[None, :] + jnp.diag(1.0 - obs)
    y = jnp.where(mask, y, 0.0)
    return H, d, R, y, jnp.sum(obs)


# ----------------------------------------------------------------------------------------------
# Sequential filter
# ----------------------------------------------------------------------------------------------
def _update(m, P, H, d, R, y, mask):
    H, d, R, y, num_obs = _mask_observation(H, d, R, y, mask)
    HP = mm(H, P)
    L = cholesky(mm(HP, H.T) + R)
    W = solve_lower(L, HP)
    v = solve_lower(L, y - mm(H, m) - d)
    m = m + mm(W.T, v)
    P = symmetrize(P - mm(W.T, W))
    ll = -0.5 * (v @ v) - jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * num_obs * _LOG_2PI
    return m, P, ll


def _predict(m, P, F, b, Q):
    return mm(F, m) + b, symmetrize(mm(mm(F, P), F.T) + Q)


def _update_joseph(m, P, H, d, R, y, mask):
    """`_update` with the Joseph form (I - K H) P (I - K H)^T + K R K^T: the first step's, where
    P is the prior covariance; a huge prior variance then does not cancel against itself. It runs once per
    sequence, so its factorisations call LAPACK (written out, they would only add compile time)."""
    H, d, R, y, num_obs = _mask_observation(H, d, R, y, mask)
    HP = mm(H, P)
    L = cholesky(mm(HP, H.T) + R, unroll=False)
    v = solve_lower(L, y - mm(H, m) - d, unroll=False)
    K = cho_solve_lower(L, HP, unroll=False).T  # (d, p) = P H^T S^{-1}
    m = m + mm(K, mm(L, v))
    eye = jnp.eye(P.shape[-1], dtype=P.dtype)
    I_KH = eye - mm(K, H)
    P_joseph = symmetrize(mm(mm(I_KH, P), I_KH.T) + mm(mm(K, R), K.T))
    # Information form (P^{-1} + H^T R^{-1} H)^{-1} where P dwarfs R: no cancellation at all.
    # Its inputs are replaced by I where they are not positive definite (then it is not used),
    # so neither branch carries a NaN into the other's gradient.
    LP, LR = cholesky(P, unroll=False), cholesky(R, unroll=False)
    ok = lax.stop_gradient(jnp.all(jnp.diagonal(LP) > 0) & jnp.all(jnp.diagonal(LR) > 0))
    ok = ok & (jnp.trace(P) > 1e8 * jnp.trace(R))
    LP = jnp.where(ok, LP, eye)
    Hw = solve_lower(jnp.where(ok, LR, jnp.eye(R.shape[-1], dtype=R.dtype)), H, unroll=False)
    LPinv = solve_lower(LP, eye, unroll=False)
    LJ = cholesky(symmetrize(mm(LPinv.T, LPinv) + mm(Hw.T, Hw)), unroll=False)
    P_info = symmetrize(cho_solve_lower(LJ, eye, unroll=False))
    P = jnp.where(ok, P_info, P_joseph)
    ll = -0.5 * (v @ v) - jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * num_obs * _LOG_2PI
    return m, P, ll


def _filter_sequential(params: LinearGaussianParams, ys, masks, return_predicted: bool = False):
    """Sequential filter; ``return_predicted`` also returns the predicted moments of steps 1..T-1."""
    p0 = _at(params, 0)
    m0, P0, ll0 = _update_joseph(p0.initial_mean, p0.initial_cov, p0.emission_matrix, p0.emission_offset,
                          p0.emission_cov, ys[0], None if masks is None else masks[0])
    tv = _is_time_varying(params)
    xs_params = _slice_time(params, 1, None)
    varying = {i: a for i, (a, v) in enumerate(zip(xs_params, tv)) if v}

    def step(carry, xs):
        m, P, ll = carry
        y, mask, var = xs
        p = LinearGaussianParams(*(var.get(i, a) for i, a in enumerate(xs_params)))
        m_pred, P_pred = _predict(m, P, p.transition_matrix, p.transition_offset, p.transition_cov)
        m, P, ll_t = _update(m_pred, P_pred, p.emission_matrix, p.emission_offset, p.emission_cov, y, mask)
        return (m, P, ll + ll_t), ((m, P, m_pred, P_pred) if return_predicted else (m, P))

    xs = (ys[1:], None if masks is None else masks[1:], varying)
    (_, _, ll), out = lax.scan(step, (m0, P0, ll0), xs)
    result = FilterResult(ll, jnp.concatenate([m0[None], out[0]]), jnp.concatenate([P0[None], out[1]]))
    return (result, out[2], out[3]) if return_predicted else result


def predict(m, P, F, b, Q):
    """Kalman predict: moments of F z + b + N(0, Q) for z ~ N(m, P).

    m (d,), P (d, d), F (d', d), b (d',), Q (d', d') -> (m' (d',), P' (d', d')). Traceable.
    """
    return _predict(m, P, F, b, Q)


def update(m, P, H, d, R, y, mask=None):
    """Kalman update of N(m, P) on y = H z + d + N(0, R), dropping the missing entries exactly.

    m (d,), P (d, d), H (p, d), d (p,), R (p, p), y (p,); mask (p,) bool, True = observed
    (None: every entry observed). Returns (m (d,), P (d, d), log p(y_obs) ()). Traceable.
    """
    return _update(m, P, H, d, R, y, mask)


# ----------------------------------------------------------------------------------------------
# Parallel filter
# ----------------------------------------------------------------------------------------------
class _FilterElement(NamedTuple):
    A: jax.Array
    b: jax.Array
    C: jax.Array
    eta: jax.Array
    J: jax.Array


def _filter_element(F, b, Q, H, d, R, y, mask):
    """Element of step t >= 1: z_{t-1} -> z_t given y_t."""
    H, d, R, y, _ = _mask_observation(H, d, R, y, mask)
    HQ, HF = mm(H, Q), mm(H, F)
    L = cholesky(mm(HQ, H.T) + R)
    KT = cho_solve_lower(L, HQ)  # (p, d) = S^{-1} H Q
    resid = y - mm(H, b) - d
    A = F - mm(KT.T, HF)
    bb = b + mm(KT.T, resid)
    C = symmetrize(Q - mm(KT.T, HQ))
    HF = solve_lower(L, HF)
    eta = mm(HF.T, solve_lower(L, resid))
    J = symmetrize(mm(HF.T, HF))
    return _FilterElement(A, bb, C, eta, J)


def _first_filter_element(m1, P1, H, d, R, y, mask):
    H, d, R, y, _ = _mask_observation(H, d, R, y, mask)
    S = H @ P1 @ H.T + R
    L = cholesky(S)
    KT = cho_solve_lower(L, H @ P1)
    dim = m1.shape[0]
    zeros = jnp.zeros((dim, dim), m1.dtype)
    return _FilterElement(zeros, m1 + KT.T @ (y - H @ m1 - d), symmetrize(P1 - KT.T @ (H @ P1)),
                          jnp.zeros_like(m1), zeros)


def _filter_combine(ei: _FilterElement, ej: _FilterElement):
    eye = jnp.eye(ei.A.shape[-1], dtype=ei.A.dtype)
    M = jnp.linalg.inv(eye + mm(ei.C, ej.J))
    AjM = mm(ej.A, M)
    MtAi = mm(M, ei.A).T  # A_i^T M^T
    A = mm(AjM, ei.A)
    b = mm(AjM, ei.b + mm(ei.C, ej.eta)) + ej.b
    C = symmetrize(mm(mm(AjM, ei.C), ej.A.T) + ej.C)
    eta = mm(MtAi, ej.eta - mm(ej.J, ei.b)) + ei.eta
    J = symmetrize(mm(mm(MtAi, ej.J), ei.A) + ei.J)
    return _FilterElement(A, b, C, eta, J)


def _filter_identity(dim, dtype):
    eye = jnp.eye(dim, dtype=dtype)
    zeros = jnp.zeros((dim, dim), dtype)
    return _FilterElement(eye, jnp.zeros(dim, dtype), zeros, jnp.zeros(dim, dtype), zeros)


def _predictive_log_likelihood(params_tv, ms, Ps, ys, masks):
    """sum_t log p(y_t | y_{0:t-1}) from the filtered moments, all steps at once."""
    p = params_tv
    m_prev = jnp.concatenate([p.initial_mean[None], ms[:-1]])
    P_prev = jnp.concatenate([p.initial_cov[None], Ps[:-1]])

    def one(t, m, P, F, b, Q, H, d, R, y, mask):
        m_pred, P_pred = _predict(m, P, F, b, Q)
        m_pred = jnp.where(t == 0, m, m_pred)
        P_pred = jnp.where(t == 0, P, P_pred)
        _, _, ll = _update(m_pred, P_pred, H, d, R, y, mask)
        return ll

    ts = jnp.arange(ys.shape[0])
    lls = jax.vmap(one)(ts, m_prev, P_prev, p.transition_matrix, p.transition_offset, p.transition_cov,
                        p.emission_matrix, p.emission_offset, p.emission_cov, ys, masks)
    return jnp.sum(lls)


def _general_chunk(chunk_size, dim, num_timesteps):
    """Chunk of the general parallel forms when none is given. On CPU the two-level form
    (`TWO_LEVEL`: chunks of about sqrt(T) reduced in parallel, then rerun from their starts; work
    about three sequential passes, where a doubling scan multiplies it by log2 of its chunk); on
    an accelerator one associative scan, unless the (T, d, d) elements of a chunk would exceed
    2^26 entries."""
    if chunk_size is not None:
        return chunk_size
    if jax.default_backend() == "cpu":
        return TWO_LEVEL
    limit = max(1, (1 << 26) // (dim * dim))
    return None if num_timesteps <= limit else 1 << (limit.bit_length() - 1)


def _chunk_layout(n):
    """(number of chunks K, chunk length c, time index (K, c) clamped to n - 1, valid (K, c)) of
    n steps cut into chunks of about sqrt(n); the last chunk is padded."""
    size = two_level_size(n)
    num_chunks = -(-n // size)
    flat = jnp.arange(num_chunks * size)
    return num_chunks, size, jnp.minimum(flat, n - 1).reshape(num_chunks, size), (flat < n).reshape(num_chunks, size)


def _where_tree(flag, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)


def _filter_two_level(params: LinearGaussianParams, ys, masks, return_predicted: bool = False):
    """Parallel filter in three phases over chunks of about sqrt(T) steps (scan-then-propagate).

    1) Every chunk, in parallel (vmapped), folds its steps' elements into one with a sequential
    scan: the conditional of its last state given the state before it and its observations, and
    the information its observations carry about that state. 2) A scan over the chunks applies
    those to the filtered moments of step 0, which gives the filtered moments before every chunk.
    3) Every chunk, in parallel, runs the ordinary filter from there: the moments and the
    log-likelihood are those of the sequential filter. Work about three sequential passes, span
    O(sqrt(T)); one compiled body per phase whatever T is."""
    p0 = _at(params, 0)
    m0, P0, ll0 = _update_joseph(p0.initial_mean, p0.initial_cov, p0.emission_matrix, p0.emission_offset,
                                 p0.emission_cov, ys[0], None if masks is None else masks[0])
    n = ys.shape[0] - 1
    if n == 0:
        result = FilterResult(ll0, m0[None], P0[None])
        return (result, m0[:0], P0[:0]) if return_predicted else result
    num_chunks, size, idx, valid = _chunk_layout(n)
    ts = idx + 1
    dim = m0.shape[0]

    def step_inputs(t):
        q = _at(params, t)
        return q, ys[t], None if masks is None else masks[t]

    if num_chunks > 1:
        def chunk_element(ts_c):
            # The filter of the chunk started from a point mass at x = z_{s-1}: its mean is
            # A x + b with covariance C (free of x), and the whitened innovation of step t is
            # v_t - G_t x, so log p(y_chunk | x) = -|v - G x|^2 / 2 summed: J = sum G^T G,
            # eta = sum G^T v. A Kalman step and a few products; no inverse.
            def step(e, t):
                q, y, mask = step_inputs(t)
                H, d, R, y, _ = _mask_observation(q.emission_matrix, q.emission_offset, q.emission_cov, y, mask)
                F = q.transition_matrix
                FA = mm(F, e.A)
                m_pred, P_pred = _predict(e.b, e.C, F, q.transition_offset, q.transition_cov)
                HP = mm(H, P_pred)
                L = cholesky(mm(HP, H.T) + R)
                W = solve_lower(L, HP)
                G = solve_lower(L, mm(H, FA))
                v = solve_lower(L, y - mm(H, m_pred) - d)
                return _FilterElement(FA - mm(W.T, G), m_pred + mm(W.T, v), symmetrize(P_pred - mm(W.T, W)),
                                      e.eta + mm(G.T, v), e.J + mm(G.T, G)), None

            start = _FilterElement(jnp.eye(dim, dtype=ys.dtype), jnp.zeros(dim, ys.dtype),
                                   jnp.zeros((dim, dim), ys.dtype), jnp.zeros(dim, ys.dtype),
                                   jnp.zeros((dim, dim), ys.dtype))
            return lax.scan(step, start, ts_c)[0]

        totals = jax.vmap(chunk_element)(ts[:-1])  # the last chunk's is not needed

        def carry(state, e):
            # Condition N(m, P) on the chunk's information (J, eta) about it, then map it through
            # the chunk: with P = Lp Lp^T and S = I + Lp^T J Lp (>= I, so its factor exists),
            # N = (I + P J)^{-1} P = X^T X for X = chol(S)^{-1} Lp^T, and the mean is
            # m + N (eta - J m). (A general inverse of I + P J compiles several times slower.)
            m, P = state
            # about sqrt(T) steps: LAPACK calls here cost nothing measurable and compile far
            # faster than the written-out factorisations (unroll=False)
            Lp = _jittered_chol(P, unroll=False)
            X = solve_lower(cholesky(jnp.eye(dim, dtype=m.dtype) + mm(mm(Lp.T, e.J), Lp), unroll=False), Lp.T,
                            unroll=False)
            N = mm(X.T, X)
            u = m + mm(N, e.eta - mm(e.J, m))
            return (mm(e.A, u) + e.b, symmetrize(mm(mm(e.A, N), e.A.T) + e.C)), state

        last, starts = lax.scan(carry, (m0, P0), totals)
        starts = jax.tree_util.tree_map(lambda a, l: jnp.concatenate([a, l[None]]), starts, last)
    else:
        starts = (m0[None], P0[None])

    def rerun(m_start, P_start, ts_c, valid_c):
        def step(carry, xs):
            m, P = carry
            t, v = xs
            q, y, mask = step_inputs(t)
            m_pred, P_pred = _predict(m, P, q.transition_matrix, q.transition_offset, q.transition_cov)
            m_new, P_new, ll = _update(m_pred, P_pred, q.emission_matrix, q.emission_offset, q.emission_cov, y, mask)
            out = (m_new, P_new, jnp.where(v, ll, 0.0))
            return (m_new, P_new), (out + (m_pred, P_pred) if return_predicted else out)

        return scan_in_place(step, (m_start, P_start), (ts_c, valid_c))[1]

    out = jax.vmap(rerun)(starts[0], starts[1], ts, valid)
    flat = [a.reshape((-1,) + a.shape[2:])[:n] for a in out]
    result = FilterResult(ll0 + jnp.sum(flat[2]), jnp.concatenate([m0[None], flat[0]]),
                          jnp.concatenate([P0[None], flat[1]]))
    return (result, flat[3], flat[4]) if return_predicted else result


def _filter_parallel(params: LinearGaussianParams, ys, masks, chunk_size):
    num_timesteps = ys.shape[0]
    if _general_chunk(chunk_size, params.initial_mean.shape[0], num_timesteps) == TWO_LEVEL:
        return _filter_two_level(params, ys, masks)
    p = _broadcast_time(params, num_timesteps)
    first = _first_filter_element(p.initial_mean, p.initial_cov, p.emission_matrix[0], p.emission_offset[0],
                                  p.emission_cov[0], ys[0], None if masks is None else masks[0])
    rest = jax.vmap(_filter_element)(
        p.transition_matrix[1:], p.transition_offset[1:], p.transition_cov[1:], p.emission_matrix[1:],
        p.emission_offset[1:], p.emission_cov[1:], ys[1:], None if masks is None else masks[1:])
    elems = jax.tree_util.tree_map(lambda a, r: jnp.concatenate([a[None], r]), first, rest)
    identity = _filter_identity(params.initial_mean.shape[0], ys.dtype)
    chunk_size = _general_chunk(chunk_size, params.initial_mean.shape[0], num_timesteps)
    out = chunked_associative_scan(_filter_combine, elems, identity, chunk_size)
    ll = _predictive_log_likelihood(p, out.b, out.C, ys, masks)
    return FilterResult(ll, out.b, out.C)


# ----------------------------------------------------------------------------------------------
# Smoother (backward elements shared by the sequential and parallel forms)
# ----------------------------------------------------------------------------------------------
class SmootherElement(NamedTuple):
    """Backward map of step t: z_t = E z_{t+1} + g + N(0, L) given z_{t+1} and y_{0:t}."""

    E: jax.Array  # (d, d)
    g: jax.Array  # (d,)
    L: jax.Array  # (d, d)


_SmootherElement = SmootherElement


def smoother_element(m, P, F, b, Q) -> SmootherElement:
    """Backward map of step t from its filtered moments m (d,), P (d, d) and the transition into
    t+1, z_{t+1} = F z_t + b + N(0, Q): z_t = E z_{t+1} + g + N(0, L). Traceable."""
    return _smoother_element(m, P, F, b, Q)


def _smoother_element(m, P, F, b, Q):
    """Backward map of step t: z_t = E z_{t+1} + g + N(0, L), using the transition into t+1."""
    m_pred, P_pred = _predict(m, P, F, b, Q)
    chol = cholesky(P_pred)
    FP = mm(F, P)
    E = cho_solve_lower(chol, FP).T
    g = m - mm(E, m_pred)
    L = symmetrize(P - mm(E, FP))
    return _SmootherElement(E, g, L)


def _smoother_elements(params, filtered: FilterResult):
    num_timesteps = filtered.filtered_means.shape[0]
    p = _broadcast_time(params, num_timesteps)
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    body = jax.vmap(_smoother_element)(ms[:-1], Ps[:-1], p.transition_matrix[1:], p.transition_offset[1:],
                                       p.transition_cov[1:])
    dim = ms.shape[-1]
    last = _SmootherElement(jnp.zeros((dim, dim), ms.dtype), ms[-1], Ps[-1])
    return body, last


def _smoother_combine(later: _SmootherElement, earlier: _SmootherElement):
    E = mm(earlier.E, later.E)
    g = mm(earlier.E, later.g) + earlier.g
    L = symmetrize(mm(mm(earlier.E, later.L), earlier.E.T) + earlier.L)
    return _SmootherElement(E, g, L)


def _rts_backward(params, filtered: FilterResult, m_pred, P_pred):
    """Sequential Rauch-Tung-Striebel pass: each step builds its backward map inside the scan.

    Building the maps inside the scan (rather than all at once, vmapped) keeps each
    step's matrices in cache; at d = 32 batched triangular solves over T are slower
    than the same solves one step at a time.
    """
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    xs_params = _slice_time(params, 1, None)
    tv = _is_time_varying(params)
    varying = {i: a for i, (a, v) in enumerate(zip(xs_params, tv)) if v}

    def step(carry, xs):
        m_next, P_next = carry
        m, P, mp, Pp, var = xs
        F = var.get(2, xs_params[2])
        # E = P F^T Pp^{-1}; m_s = m + E (m_next - mp); P_s = P + E (P_next - Pp) E^T
        E = cho_solve_lower(cholesky(Pp), mm(F, P)).T
        m_s = m + mm(E, m_next - mp)
        P_s = symmetrize(P + mm(mm(E, P_next - Pp), E.T))
        return (m_s, P_s), (m_s, P_s, mm(P_next, E.T))  # Cov[z_{t+1}, z_t] = P^s_{t+1} E_t^T

    _, (m_s, P_s, cross) = lax.scan(step, (ms[-1], Ps[-1]), (ms[:-1], Ps[:-1], m_pred, P_pred, varying),
                                    reverse=True)
    return jnp.concatenate([m_s, ms[-1:]]), jnp.concatenate([P_s, Ps[-1:]]), cross


def _backward_map(params, t, ms, Ps, m_pred, P_pred, valid=True):
    """Backward map of step t, z_t = E z_{t+1} + g + N(0, L), from the filtered moments of t and
    the predicted moments of t + 1 (the identity map where not ``valid``)."""
    F = _at(params, t + 1).transition_matrix
    P = Ps[t]
    FP = mm(F, P)
    # vmapped over the two-level form's chunks, where one batched LAPACK call serves every chunk:
    # written out, the (d, d) factorisation and solve added about a fifth to the smoother's compile
    # time for no measurable speed (unroll=False)
    E = cho_solve_lower(cholesky(P_pred[t], unroll=False), FP, unroll=False).T
    e = _SmootherElement(E, ms[t] - mm(E, m_pred[t]), symmetrize(P - mm(E, FP)))
    dim = P.shape[-1]
    identity = _SmootherElement(jnp.eye(dim, dtype=P.dtype), jnp.zeros(dim, P.dtype), jnp.zeros((dim, dim), P.dtype))
    return _where_tree(valid, e, identity)


def _backward_maps_two_level(params, filtered: FilterResult, m_pred, P_pred):
    """Backward maps z_t = E_t z_{t+1} + g_t + N(0, L_t) of steps 0..T-2 laid out in chunks of
    about sqrt(T) steps (the last padded with identity maps), and every chunk's composition
    (z at its first step given z after its last), all chunks in parallel."""
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    dim = ms.shape[1]
    num_chunks, size, idx, valid = _chunk_layout(ms.shape[0] - 1)
    identity = _SmootherElement(jnp.eye(dim, dtype=ms.dtype), jnp.zeros(dim, ms.dtype), jnp.zeros((dim, dim), ms.dtype))

    def chunk_maps(ts_c, valid_c):
        def step(acc, xs):
            e = _backward_map(params, *xs[:1], ms, Ps, m_pred, P_pred, xs[1])
            return _smoother_combine(acc, e), e

        return scan_in_place(step, identity, (ts_c, valid_c), reverse=True)

    return jax.vmap(chunk_maps)(idx, valid)


def _chunk_ends(carry, start, totals):
    """The state after every chunk (backwards: the state its maps start from): a reverse scan of
    ``carry`` over the chunks' compositions from ``start`` (the first chunk's is not needed)."""
    rest = jax.tree_util.tree_map(lambda a: a[1:], totals)
    first, ends = lax.scan(lambda st, e: (carry(st, e), st), start, rest, reverse=True)
    return jax.tree_util.tree_map(lambda f, a: jnp.concatenate([f[None], a]), first, ends)


def _unchunk(a, n):
    return a.reshape((-1,) + a.shape[2:])[:n]


def _rts_two_level(params, filtered: FilterResult, m_pred, P_pred):
    """`_rts_backward` in three phases over chunks of about sqrt(T) steps, like
    `_filter_two_level`: every chunk builds its backward maps and composes them (in parallel over
    chunks), a scan over the chunks carries the smoothed moments from the last step to every
    chunk's end, and every chunk applies its maps from there."""
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    n = ms.shape[0] - 1
    if n == 0:
        return ms, Ps, Ps[:0]
    totals, maps = _backward_maps_two_level(params, filtered, m_pred, P_pred)

    def moments(e, m_next, P_next):
        return mm(e.E, m_next) + e.g, symmetrize(mm(mm(e.E, P_next), e.E.T) + e.L)

    ends = _chunk_ends(lambda st, e: moments(e, *st), (ms[-1], Ps[-1]), totals)

    def apply(m_end, P_end, maps_c):
        def step(carry, e):
            m, P = moments(e, *carry)
            return (m, P), (m, P, mm(carry[1], e.E.T))  # Cov[z_{t+1}, z_t] = P^s_{t+1} E_t^T

        return scan_in_place(step, (m_end, P_end), maps_c, reverse=True)[1]

    m_s, P_s, cross = (_unchunk(a, n) for a in jax.vmap(apply)(ends[0], ends[1], maps))
    return jnp.concatenate([m_s, ms[-1:]]), jnp.concatenate([P_s, Ps[-1:]]), cross


def _sample_two_level(key, params, ys, masks, num_samples):
    """Backward sampling in the two-level layout: z_{T-1} ~ N(m_{T-1}, P_{T-1}), then
    z_t = E_t z_{t+1} + h_t with h_t = g_t + chol(L_t) eps_t. Every chunk builds its maps and
    offsets and composes them (in parallel over chunks), a scan over the chunks carries the
    draws from the last step to every chunk's end, and every chunk applies its maps from there."""
    filtered, m_pred, P_pred = _filter_two_level(params, ys, masks, return_predicted=True)
    ms, Ps = filtered.filtered_means, filtered.filtered_covs
    num_timesteps, dim = ms.shape
    num_chunks, size, idx, valid = _chunk_layout(max(num_timesteps - 1, 1))
    eps = jax.random.normal(key, (num_chunks * size + 1, num_samples, dim), ms.dtype)  # one draw: compiles once
    z_last = ms[-1] + eps[-1] @ _jittered_chol(Ps[-1], unroll=False).T
    if num_timesteps == 1:
        return z_last[:, None]
    eps = eps[:-1].reshape(num_chunks, size, num_samples, dim)
    eye = jnp.eye(dim, dtype=ms.dtype)

    def chunk_maps(ts_c, valid_c, eps_c):
        def step(acc, xs):
            t, v, eps_t = xs
            e = _backward_map(params, t, ms, Ps, m_pred, P_pred, v)
            # the factor of an identity map's L = 0 is not needed: its offset is zero
            h = jnp.where(v, e.g + eps_t @ _jittered_chol(jnp.where(v, e.L, eye), unroll=False).T, 0.0)
            A, u = acc
            return (mm(e.E, A), u @ e.E.T + h), (e.E, h)

        return scan_in_place(step, (eye, jnp.zeros((num_samples, dim), ms.dtype)), (ts_c, valid_c, eps_c),
                             reverse=True)

    totals, (E, h) = jax.vmap(chunk_maps)(idx, valid, eps)
    ends = _chunk_ends(lambda z, tot: z @ tot[0].T + tot[1], z_last, totals)

    def apply(z_end, E_c, h_c):
        def step(z_next, x):
            z = z_next @ x[0].T + x[1]
            return z, z

        return scan_in_place(step, z_end, (E_c, h_c), reverse=True)[1]

    zs = _unchunk(jax.vmap(apply)(ends, E, h), num_timesteps - 1)  # (T-1, S, d)
    return jnp.swapaxes(jnp.concatenate([zs, z_last[None]]), 0, 1)


def _smooth(params, ys, masks, parallel, chunk_size, mode="none", diffuse=None, steady_state=True):
    return _dispatch(mode, parallel, params, lambda q: _smooth_diffuse(q, ys, masks, diffuse),
                     lambda q: _smooth_standard(q, ys, masks, parallel, chunk_size, steady_state))


def _smooth_standard(params, ys, masks, parallel, chunk_size, steady_state=True):
    if steady_state and _steady_applies(params, ys, masks, "none"):
        return _smooth_steady(params, ys, parallel, chunk_size)
    if parallel and _general_chunk(chunk_size, params.initial_mean.shape[0], ys.shape[0]) == TWO_LEVEL:
        filtered, m_pred, P_pred = _filter_two_level(params, ys, masks, return_predicted=True)
        means, covs, cross = _rts_two_level(params, filtered, m_pred, P_pred)
    elif parallel:
        filtered = _filter(params, ys, masks, parallel, chunk_size)
        body, last = _smoother_elements(params, filtered)
        elems = jax.tree_util.tree_map(lambda a, l: jnp.concatenate([a, l[None]]), body, last)
        dim = last.g.shape[0]
        identity = _SmootherElement(jnp.eye(dim, dtype=last.g.dtype), jnp.zeros(dim, last.g.dtype),
                                    jnp.zeros((dim, dim), last.g.dtype))
        chunk_size = _general_chunk(chunk_size, dim, ys.shape[0])
        out = chunked_associative_scan(_smoother_combine, elems, identity, chunk_size, reverse=True)
        means, covs = out.g, out.L
        cross = jnp.einsum("tij,tkj->tik", covs[1:], body.E)  # Cov[z_{t+1}, z_t] = P^s_{t+1} E_t^T
    else:
        filtered, m_pred, P_pred = _filter_sequential(params, ys, masks, return_predicted=True)
        means, covs, cross = _rts_backward(params, filtered, m_pred, P_pred)
    return SmootherResult(filtered.log_likelihood, filtered.filtered_means, filtered.filtered_covs,
                          means, covs, cross)


def _filter(params, ys, masks, parallel, chunk_size, mode="none", diffuse=None, steady_state=True):
    """``mode``: "none" (finite initial covariance), "exact" (diffuse) or "auto" (decided at run time)."""
    def standard(q):
        if steady_state and _steady_applies(q, ys, masks, "none"):
            return _filter_steady(q, ys, parallel, chunk_size)
        if parallel:
            return _filter_parallel(q, ys, masks, chunk_size)
        return _filter_sequential(q, ys, masks)

    return _dispatch(mode, parallel, params, lambda q: _filter_diffuse_core(q, ys, masks, diffuse)[0], standard)


# ----------------------------------------------------------------------------------------------
# Steady state: time-invariant F, Q, H, R and no missing data
# ----------------------------------------------------------------------------------------------
# Then the covariance recursion does not depend on y and converges (for a detectable and
# stabilisable system) to the fixed point of the Riccati equation. The filter runs in blocks of
# _STEADY_BLOCK steps: a block runs the full recursion until the filtered covariance of its last
# step differs from the step before by at most rtol * max|P| (elementwise; rtol =
# `steady_state_rtol(dtype)`), and every later block uses the constant gain: the means of those
# steps are then one affine recurrence (one matrix-vector product a step), run after the blocked
# covariance recursion by a plain scan or in parallel. The smoother does the same backwards: its
# gain E is constant where the filter's covariances are, and its covariance recursion converges
# going back from the end.
# The deviation from the full recursion is the distance of the covariances from their fixed point
# at the switch, about rtol * rho / (1 - rho) relative for a contraction rate rho of the
# recursion. Under vmap over a batch of sequences the covariance recursion is not batched (it
# depends on the shared parameters only): it is computed once for the whole batch.
_STEADY_BLOCK = 32


def steady_state_rtol(dtype) -> float:
    """Relative change of the filtered covariance over one step below which the Kalman filter
    switches to its steady-state gain: 1e-12 in float64, 32 eps (3.8e-6) in float32."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    return max(1e-12, 32.0 * float(jnp.finfo(dtype).eps))


def _steady_applies(params: LinearGaussianParams, ys, masks, mode) -> bool:
    """Static: may the steady-state form run? (F, Q, H, R time-invariant, no missing entry, a
    finite initial covariance and at least two blocks of steps.)"""
    if masks is not None or mode != "none" or ys.shape[0] < 2 * _STEADY_BLOCK + 1:
        return False
    tv = _is_time_varying(params)
    return not (tv.transition_matrix or tv.transition_cov or tv.emission_matrix or tv.emission_cov)


class _SteadyGain(NamedTuple):
    P: jax.Array  # (d, d) filtered covariance
    Pp: jax.Array  # (d, d) predicted covariance
    K: jax.Array  # (d, p) gain Pp H^T S^{-1}
    Linv: jax.Array  # (p, p) L^{-1}, S = L L^T
    const: jax.Array  # () -sum log diag L - p/2 log 2 pi


def _steady_gain(P, F, Q, H, R) -> _SteadyGain:
    _, Pp = _predict(jnp.zeros(P.shape[-1], P.dtype), P, F, jnp.zeros(P.shape[-1], P.dtype), Q)
    HP = mm(H, Pp)
    L = cholesky(mm(HP, H.T) + R, unroll=False)  # once per block: LAPACK, less to compile
    K = cho_solve_lower(L, HP, unroll=False).T
    Linv = solve_lower(L, jnp.eye(L.shape[-1], dtype=L.dtype), unroll=False)
    const = -jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * L.shape[-1] * _LOG_2PI
    return _SteadyGain(P, Pp, K, Linv, const)


def _blocks(a, num_blocks, fill=0):
    """(n, ...) -> (num_blocks, _STEADY_BLOCK, ...), padded at the end with ``fill``."""
    pad = num_blocks * _STEADY_BLOCK - a.shape[0]
    a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)])
    return a.reshape((num_blocks, _STEADY_BLOCK) + a.shape[1:])


def _unblock(a, n):
    return a.reshape((-1,) + a.shape[2:])[:n]


def _block_valid(start, end):
    """(S,) bool: positions start..start+S-1 lie before ``end``."""
    return start + jnp.arange(_STEADY_BLOCK) < end


def _converged(P_last, P_before, rtol):
    return jnp.max(jnp.abs(P_last - P_before)) <= rtol * jnp.max(jnp.abs(P_last))


def _offsets(params: LinearGaussianParams, num_steps):
    """Per-step transition and emission offsets of steps 1..T-1: (n, d), (n, p)."""
    b, d = params.transition_offset, params.emission_offset
    b = b[1:] if b.ndim > 1 else jnp.broadcast_to(b, (num_steps,) + b.shape)
    d = d[1:] if d.ndim > 1 else jnp.broadcast_to(d, (num_steps,) + d.shape)
    return b, d


def _write_block(buf, vals, start):
    """``buf`` with ``vals`` (S, ...) written at positions start..start+S-1, those past the end
    dropped, in place (a block that would run past the end is shifted back and merged with what
    is there). Writing into a carried buffer, rather than stacking blocks and slicing, saves a
    copy of every (T, d, d) output."""
    size = vals.shape[0]
    off = jnp.minimum(start, buf.shape[0] - size)
    shift = start - off
    existing = lax.dynamic_slice_in_dim(buf, off, size)
    rolled = jnp.roll(vals, shift, axis=0)
    keep_new = (jnp.arange(size) >= shift).reshape((size,) + (1,) * (vals.ndim - 1))
    return lax.dynamic_update_slice_in_dim(buf, jnp.where(keep_new, rolled, existing), off, 0)


def _read_block(buf, start, size):
    """Positions start..start+size-1 of ``buf`` (those past the end: arbitrary values)."""
    off = jnp.minimum(start, buf.shape[0] - size)
    return jnp.roll(lax.dynamic_slice_in_dim(buf, off, size), off - start, axis=0)


def _steady_forward(params: LinearGaussianParams, ys):
    """Blocked covariance recursion (see above) over steps t = 1..T-1; block j holds
    t = 1 + j S .. (j + 1) S.

    Full blocks run the whole filter; once converged, later blocks only record their steady
    covariance. Returns the filtered means and covariances (T, d), (T, d, d) (the means of
    steady blocks left zero: `_steady_filter_blocks` fills them in), the blocked
    (num_blocks, S, d) predicted means (zero in steady blocks) and (num_blocks, S) ``steady``
    flags, the final gain, the mean carried out of the last full block and the log-likelihood
    up to there."""
    F, Q, H, R = params.transition_matrix, params.transition_cov, params.emission_matrix, params.emission_cov
    p0 = _at(params, 0)
    m0, P0, ll0 = _update_joseph(p0.initial_mean, p0.initial_cov, H, p0.emission_offset, R, ys[0], None)
    num_timesteps = ys.shape[0]
    n = num_timesteps - 1
    num_blocks = -(-n // _STEADY_BLOCK)
    bs, ds = _offsets(params, n)
    starts = 1 + _STEADY_BLOCK * jnp.arange(num_blocks)
    xs = (_blocks(ys[1:], num_blocks), _blocks(bs, num_blocks), _blocks(ds, num_blocks), starts)
    rtol = steady_state_rtol(ys.dtype)
    dim, size = m0.shape[0], _STEADY_BLOCK

    def full(state, x):
        m, P, ll, _, _ = state

        def step(c, xx):
            m, P, ll = c
            y, b, d, valid = xx
            mp, Pp = _predict(m, P, F, b, Q)
            m2, P2, l = _update(mp, Pp, H, d, R, y, None)
            return (jnp.where(valid, m2, m), P2, ll + jnp.where(valid, l, 0.0)), (m2, P2, mp)

        (m, P, ll), (ms, Ps, mps) = lax.scan(step, (m, P, ll), x[:4])
        conv = _converged(Ps[-1], Ps[-2], rtol)
        return (m, P, ll, conv, _steady_gain(P, F, Q, H, R)), (ms, Ps, mps)

    def steady(state, x):
        g = state[4]
        ms = mps = jnp.zeros((size, dim), g.P.dtype)
        return state, (ms, jnp.broadcast_to(g.P, (size, dim, dim)), mps)

    def block(carry, x):
        state, means, covs = carry
        is_steady = state[3]
        ok = _block_valid(x[-1], n + 1)  # (computed here: a (T,) mask would be constant-folded)
        state, (ms, Ps, mps) = lax.cond(is_steady, steady, full, state, x[:3] + (ok,))
        means, covs = _write_block(means, ms, x[-1]), _write_block(covs, Ps, x[-1])
        return (state, means, covs), (mps, is_steady & ok)

    means = jnp.zeros((num_timesteps, dim), m0.dtype).at[0].set(m0)
    covs = jnp.zeros((num_timesteps, dim, dim), m0.dtype).at[0].set(P0)
    p = H.shape[0]
    no_gain = _SteadyGain(P0, P0, jnp.zeros((dim, p), P0.dtype), jnp.zeros((p, p), P0.dtype), ll0)
    state = (m0, P0, ll0, jnp.asarray(False), no_gain)
    ((m, _, ll, _, gain), means, covs), (mps, flags) = lax.scan(block, (state, means, covs), xs)
    return means, covs, mps, flags, gain, m, ll


def _steady_chunk(chunk_size):
    """Chunk of `affine_recurrence` in the parallel steady-state forms: one chunk unless asked
    (log2 T doubling levels of one (T, d) x (d, d) product each, in one compiled loop; on 2 CPU
    cores that costs less than the sequential filter up to d = 32 at T = 1e5)."""
    return None if chunk_size == TWO_LEVEL else chunk_size


def affine_recurrence(A, u, chunk_size: Optional[int] = None):
    """x_i = A x_{i-1} + u_i (x_{-1} = 0) for a constant A (d, d) and u (n, d), in parallel.

    Inside chunks of ``chunk_size`` steps (rounded up to a power of two; None: one chunk),
    doubling: level k adds A^(2^k) times the partial sums 2^k places before, one (n, d) x (d, d)
    product per level; a sequential scan carries the state across chunks, and A^(j+1) times the
    incoming state is added to step j of each chunk. Work O(n d^2 log chunk), span
    O(log chunk + n / chunk); one compiled loop body whatever n is. Traceable.
    """
    if jnp.ndim(u) != 2 or jnp.shape(A) != (jnp.shape(u)[-1],) * 2:
        raise ValueError(f"A, u: expected A of shape (d, d) and u of shape (n, d), got shapes {jnp.shape(A)} "
                         f"and {jnp.shape(u)}")
    if chunk_size is not None:
        chunk_size = checks.positive_int(chunk_size, "chunk_size")
    n, dim = u.shape
    c = n if chunk_size is None else min(chunk_size, n)
    num_levels = math.ceil(math.log2(c)) if c > 1 else 0
    c = 1 << num_levels
    num_chunks = -(-n // c)
    x = jnp.concatenate([u, jnp.zeros((num_chunks * c - n, dim), u.dtype)]).reshape(num_chunks, c, dim)

    def level(k, carry):
        x, Ak = carry
        offset = jnp.left_shift(1, k)
        padded = jnp.concatenate([jnp.zeros_like(x), x], axis=1)
        before = lax.dynamic_slice_in_dim(padded, c - offset, c, axis=1)
        return x + before @ Ak.T, Ak @ Ak

    x, A_chunk = lax.fori_loop(0, num_levels, level, (x, A))  # A_chunk = A^c
    if num_chunks > 1:
        powers = A[None]  # A^1 .. A^c by doubling: [A^1..A^k] -> [A^1..A^k, A^(k+1)..A^(2k)]
        for _ in range(num_levels):
            powers = jnp.concatenate([powers, powers @ powers[-1]])

        def carry_in(s, last):
            return A_chunk @ s + last, s

        _, starts = lax.scan(carry_in, jnp.zeros(dim, u.dtype), x[:, -1])
        x = x + jnp.einsum("jab,nb->nja", powers, starts)
    return x.reshape(-1, dim)[:n]


def _affine_scan(A, u):
    """x_i = A x_{i-1} + u_i (x_{-1} = 0), sequentially: one matrix-vector product per step."""
    def step(x, u_t):
        x = mm(A, x) + u_t
        return x, x

    return lax.scan(step, jnp.zeros_like(u[0]), u)[1]


def _steady_filter_blocks(params: LinearGaussianParams, ys, parallel, chunk_size):
    """`_steady_forward` with the means of steady steps filled in afterwards: with a constant gain
    K the filtered mean is the affine recurrence m_t = (F - K H F) m_{t-1} + (I - K H) b_t +
    K (y_t - d_t), run by a plain scan (one matrix-vector product per step, no per-block work)
    or in parallel; predictions and the log-likelihood of steady steps are then block products."""
    means, covs, mps, flags, g, m_last, ll = _steady_forward(params, ys)
    F, H = params.transition_matrix, params.emission_matrix
    n = ys.shape[0] - 1
    bs, ds = _offsets(params, n)
    flat = flags.reshape(-1)[:n]
    KH = mm(g.K, H)
    u = bs - bs @ KH.T + (ys[1:] - ds) @ g.K.T  # (I - K H) b + K (y - d)
    # the mean carried out of the last full block enters the recurrence just before the first
    # steady step (when there is none, nothing of the recurrence is used)
    before = jnp.maximum(jnp.argmax(flat) - 1, 0)
    u = jnp.where(flat[:, None], u, 0.0).at[before].add(jnp.where(flat[before], 0.0, m_last))
    closed_loop = F - KH @ F
    x = affine_recurrence(closed_loop, u, _steady_chunk(chunk_size)) if parallel else _affine_scan(closed_loop, u)
    means = means.at[1:].set(jnp.where(flat[:, None], x, means[1:]))
    mp = means[:-1] @ F.T + bs
    w = (ys[1:] - mp @ H.T - ds) @ g.Linv.T
    ll = ll + jnp.sum(jnp.where(flat, g.const - 0.5 * jnp.sum(w * w, axis=-1), 0.0))
    mps = jnp.where(flags[..., None], _blocks(mp, flags.shape[0]), mps)
    return means, covs, mps, flags, g, ll


def _filter_steady(params: LinearGaussianParams, ys, parallel, chunk_size):
    means, covs, _, _, _, ll = _steady_filter_blocks(params, ys, parallel, chunk_size)
    return FilterResult(ll, means, covs)


def _backward_setup(means, mps, flags):
    """What the blocked backward passes (smoother, sampler) read of the blocked filter: the
    predicted mean of t + 1 at position t (n,), whether step t's backward gain is the steady one
    (t >= 1 and step t was steady in the filter) and the first position of every block."""
    dim = means.shape[-1]
    n = means.shape[0] - 1
    mp_flat = mps.reshape(-1, dim)[:n]
    steady_t = jnp.concatenate([jnp.zeros(1, bool), flags.reshape(-1)[:n - 1]])
    starts = _STEADY_BLOCK * jnp.arange(flags.shape[0])
    return mp_flat, steady_t, starts


def _backward_gain(P, F, Q, unroll=True):
    """E = P F^T (F P F^T + Q)^{-1} and the predicted covariance F P F^T + Q."""
    FP = mm(F, P)
    Pp = symmetrize(mm(FP, F.T) + Q)
    return cho_solve_lower(cholesky(Pp, unroll), FP, unroll).T, Pp


def _smooth_steady(params: LinearGaussianParams, ys, parallel, chunk_size):
    """RTS smoother on the blocked filter output: block j smooths t = j S .. (j + 1) S - 1
    (t <= T - 2) from t + 1, recomputing the predicted covariance of t + 1 from the filtered one
    (no (T, d, d) array of predictions is stored). The smoother gain of the last full step is
    carried: it is the steady one by the time a block may use it."""
    means, covs, mps, flags, g, ll = _steady_filter_blocks(params, ys, parallel, chunk_size)
    F, Q = params.transition_matrix, params.transition_cov
    num_timesteps, dim = means.shape
    n = num_timesteps - 1
    num_blocks = flags.shape[0]
    size = _STEADY_BLOCK
    mp_flat, steady_t, starts = _backward_setup(means, mps, flags)
    xs = (_blocks(mp_flat, num_blocks), _blocks(steady_t, num_blocks, False), starts, starts)
    rtol = steady_state_rtol(ys.dtype)
    E_inf = _backward_gain(g.P, F, Q, unroll=False)[0]
    if parallel:
        # in reverse from t = T - 1 (smoothed = filtered): x_t = E x_{t+1} + m_t - E mp_{t+1}
        u = jnp.where(steady_t[:, None], means[:-1] - mp_flat @ E_inf.T, 0.0)
        u = jnp.concatenate([u, means[-1:]])[::-1]
        x_par = affine_recurrence(E_inf, u, _steady_chunk(chunk_size))[::-1][:-1]
        xs = xs + (_blocks(x_par, num_blocks),)

    def full(state, x, m, P):
        m_next, P_next, _ = state

        def step(c, xx):
            m_next, P_next = c
            m, P, mp, st, ok = xx[:5]
            Et, Pp = _backward_gain(P, F, Q, unroll=False)  # mostly transient steps: LAPACK
            m_s = m + mm(Et, m_next - mp)
            if parallel:
                m_s = jnp.where(st, xx[5], m_s)
            P_s = symmetrize(P + mm(mm(Et, P_next - Pp), Et.T))
            m_s, P_s = jnp.where(ok, m_s, m_next), jnp.where(ok, P_s, P_next)
            return (m_s, P_s), (m_s, P_s, mm(P_next, Et.T))

        (m_next, P_next), (m_s, P_s, cross) = lax.scan(step, (m_next, P_next), (m, P) + x[:3] + x[4:],
                                                        reverse=True)
        conv = _converged(P_s[0], P_s[1], rtol) & jnp.all(x[1] | ~x[2])
        return (m_next, P_next, conv), (m_s, P_s, cross)

    def steady(state, x, m, P):
        m_next, P_next, conv = state
        if parallel:
            m_s = x[4]
            m_first = m_s[0]
        else:
            m_first, m_s = lax.scan(lambda mn, xx: (xx[0] + mm(E_inf, mn - xx[1]),) * 2, m_next, (m, x[0]),
                                    reverse=True)
        return (m_first, P_next, conv), (m_s, jnp.broadcast_to(P_next, (size, dim, dim)),
                                         jnp.broadcast_to(mm(P_next, E_inf.T), (size, dim, dim)))

    def block(carry, x):
        state, s_means, s_covs, cross = carry
        start = x[3]
        x = x[:2] + (_block_valid(start, n),) + x[3:]
        m, P = _read_block(means, start, size), _read_block(covs, start, size)
        use_steady = state[2] & jnp.all(x[1] | ~x[2])
        state, (m_s, P_s, c) = lax.cond(use_steady, steady, full, state, x, m, P)
        return (state, _write_block(s_means, m_s, start), _write_block(s_covs, P_s, start),
                _write_block(cross, c, start)), None

    init = ((means[-1], covs[-1], jnp.asarray(False)), means, covs, jnp.zeros((n, dim, dim), covs.dtype))
    (_, s_means, s_covs, cross), _ = lax.scan(block, init, xs, reverse=True)
    return SmootherResult(ll, means, covs, s_means, s_covs, cross)


# ----------------------------------------------------------------------------------------------
# Exact diffuse initialisation (sequential only)
# ----------------------------------------------------------------------------------------------
# z_0 ~ N(m_1 + A delta, P_star) with a flat prior on delta: the columns of A select the
# diffuse components (inf on the diagonal of initial_cov, or the ``diffuse=`` mask), P_star is
# the rest of initial_cov with those rows and columns zeroed; P_1 = P_star + kappa A A^T,
# kappa -> inf (Durbin & Koopman 2012, ch. 5). The filter is run in its augmented form (de Jong
# 1991; D&K 5.7): the filter with delta known carries its moments (a_t, P_t) and the columns X_t
# of d a_t / d delta; each step adds V_t^T V_t and V_t^T v_t (whitened residual and its
# delta-columns) to (S, s). Then, per D&K 7.2.2,
#     log L_d = lim_{kappa -> inf} [log L(kappa) + q/2 log kappa]
#             = log L(delta = 0) + s^T S^{-1} s / 2 - log|S| / 2,
# the exact-diffuse log-likelihood (statsmodels' use_exact_diffuse=True), with no threshold on
# F_inf. Filtered moments are the kappa -> inf limits, a_t + X_t S_t^+ s_t and
# P_t + X_t S_t^+ X_t^T, with +inf variances in the directions the data have not yet
# identified (D&K's P_inf != 0). The smoother is the backward (r, N) recursion of D&K 4.4 on the
# residual and its delta-columns, plus the uncertainty of delta: G_t S^{-1} G_t^T. A missing
# entry carries no information on delta, so it does not shorten the diffuse phase.
class _DiffuseSteps(NamedTuple):
    """What the diffuse smoother reads of each step t (predicted moments before y_t)."""

    a: jax.Array  # (T, d)   predicted mean with delta = 0
    P: jax.Array  # (T, d, d)
    X: jax.Array  # (T, d, d) columns d a / d delta (zero for non-diffuse components)
    Hw: jax.Array  # (T, p, d) L^{-1} H
    W: jax.Array  # (T, p, d) L^{-1} H P
    v: jax.Array  # (T, p)   L^{-1} (y - H a - d)
    V: jax.Array  # (T, p, d) L^{-1} H X


def _diffuse_mask(P1, diffuse):
    """(d,) bool: diagonal inf entries of P1, or-ed with the explicit ``diffuse`` mask."""
    mask = jnp.isinf(jnp.diagonal(P1))
    if diffuse is not None:
        mask = mask | jnp.asarray(diffuse, bool)
    return mask


def _diffuse_update(a, P, X, H, d, R, y, mask):
    H, d, R, y, num_obs = _mask_observation(H, d, R, y, mask)
    HP = mm(H, P)
    L = cholesky(mm(HP, H.T) + R)
    W = solve_lower(L, HP)
    Hw = solve_lower(L, H)
    v = solve_lower(L, y - mm(H, a) - d)
    V = mm(Hw, X)
    a_f, X_f, P_f = a + mm(W.T, v), X - mm(W.T, V), symmetrize(P - mm(W.T, W))
    ll = -0.5 * (v @ v) - jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * num_obs * _LOG_2PI
    return (a_f, P_f, X_f), ll, mm(V.T, V), mm(V.T, v), (Hw, W, v, V)


def _filter_diffuse_core(params: LinearGaussianParams, ys, masks, diffuse):
    """Augmented filter: FilterResult (kappa -> inf limits), the steps, S_T, s_T, the mask."""
    p0 = _at(params, 0)
    dmask = _diffuse_mask(params.initial_cov, diffuse)
    keep = ~dmask
    P1 = params.initial_cov
    dtype = ys.dtype
    P_star = jnp.where(keep[:, None] & keep[None, :], P1, 0.0).astype(dtype)
    X1 = jnp.diag(dmask.astype(dtype))
    m1 = params.initial_mean.astype(dtype)  # log L_d and the limits do not depend on m1[diffuse]
    first, ll0, SS0, ss0, aux0 = _diffuse_update(m1, P_star, X1, p0.emission_matrix, p0.emission_offset,
                                                 p0.emission_cov, ys[0], None if masks is None else masks[0])
    tv = _is_time_varying(params)
    xs_params = _slice_time(params, 1, None)
    varying = {i: a for i, (a, v) in enumerate(zip(xs_params, tv)) if v}

    def step(carry, xs):
        (a, P, X), ll, SS, ss = carry
        y, mask, var = xs
        p = LinearGaussianParams(*(var.get(i, q) for i, q in enumerate(xs_params)))
        F = p.transition_matrix
        a_p, P_p = _predict(a, P, F, p.transition_offset, p.transition_cov)
        X_p = mm(F, X)
        filt, ll_t, SS_t, ss_t, aux = _diffuse_update(a_p, P_p, X_p, p.emission_matrix, p.emission_offset,
                                                      p.emission_cov, y, mask)
        return (filt, ll + ll_t, SS + SS_t, ss + ss_t), (filt, (a_p, P_p, X_p), aux, SS_t, ss_t)

    xs = (ys[1:], None if masks is None else masks[1:], varying)
    (_, ll, SS, ss), (filt, pred, aux, SS_t, ss_t) = lax.scan(step, (first, ll0, SS0, ss0), xs)
    cat = lambda f, r: jnp.concatenate([f[None], r])
    a_f, P_f, X_f = (cat(f, r) for f, r in zip(first, filt))
    S_cum = jnp.cumsum(cat(SS0, SS_t), axis=0)
    s_cum = jnp.cumsum(cat(ss0, ss_t), axis=0)
    # log L_d = log L(delta = 0) + s^T S^{-1} s / 2 - log|S_dd| / 2 (unit diagonal on the rest)
    S_full = SS + jnp.diag(keep.astype(dtype))
    chol = cholesky(S_full)
    w = solve_lower(chol, ss)
    ll = ll + 0.5 * (w @ w) - jnp.sum(jnp.log(jnp.diagonal(chol)))
    means, covs = jax.vmap(partial(_diffuse_limit, keep=keep))(a_f, P_f, X_f, S_cum, s_cum)
    steps = _DiffuseSteps(cat(m1, pred[0]), cat(P_star, pred[1]), cat(X1, pred[2]),
                          *(cat(f, r) for f, r in zip(aux0, aux)))
    return FilterResult(ll, means, covs), steps, chol, ss, keep


def _diffuse_limit(a, P, X, S, s, keep):
    """kappa -> inf limits of the filtered moments of one step: a + X S^+ s, P + X S^+ X^T, and
    +inf (with the sign of X N X^T, N the null projector of S) where delta is not identified."""
    dtype = S.dtype
    scale = jnp.max(jnp.diagonal(S))
    scale = jnp.where(scale > 0, scale, 1.0)
    S = S + scale * jnp.diag(keep.astype(dtype))
    tol = S.shape[-1] * jnp.sqrt(jnp.finfo(dtype).eps) * scale
    evals, evecs = jnp.linalg.eigh(lax.stop_gradient(S))
    null = lax.stop_gradient((evecs * (evals <= tol).astype(dtype)) @ evecs.T)
    # (S + scale N)^{-1} = S^+ + N / scale, differentiable along perturbations that keep N
    chol = cholesky(symmetrize(S + scale * null))
    S_pinv = cho_solve_lower(chol, jnp.eye(S.shape[-1], dtype=dtype)) - null / scale
    XS = mm(X, S_pinv)
    mean = a + mm(XS, s)
    cov = symmetrize(P + mm(XS, X.T))
    P_inf = mm(mm(X, null), X.T)
    unknown = jnp.diagonal(P_inf) > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.maximum(1.0, jnp.max(jnp.abs(X)) ** 2)
    both = unknown[:, None] & unknown[None, :]
    infinite = both & (jnp.abs(P_inf) > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(jnp.abs(P_inf)))
    cov = jnp.where(infinite, jnp.where(P_inf < 0, -jnp.inf, jnp.inf), cov)
    return mean, cov


def _smooth_diffuse(params: LinearGaussianParams, ys, masks, diffuse):
    """Diffuse smoother: backward (r, N) recursion on the residual and its delta-columns."""
    filtered, st, chol, ss, keep = _filter_diffuse_core(params, ys, masks, diffuse)
    num_timesteps, dim = filtered.filtered_means.shape
    dtype = ys.dtype
    eye = jnp.eye(dim, dtype=dtype)
    F_next = _broadcast_time(_slice_time(params, 1, None), num_timesteps - 1).transition_matrix
    # F_{t+1} for t = 0..T-1 (the last is never used: r_T = 0, N_T = 0)
    F_next = jnp.concatenate([F_next, eye[None]])

    def step(carry, xs):
        r, N = carry  # r_{t+1} (d, 1 + d), N_{t+1} (d, d)
        F, Hw, W, v, V = xs
        Lt = mm(F, eye - mm(W.T, Hw))  # L_t = F_{t+1} (I - K_t H_t)
        c = jnp.concatenate([v[:, None], -V], axis=1)
        r = mm(Hw.T, c) + mm(Lt.T, r)
        N = symmetrize(mm(Hw.T, Hw) + mm(mm(Lt.T, N), Lt))
        return (r, N), (r, N, Lt)

    init = (jnp.zeros((dim, 1 + dim), dtype), jnp.zeros((dim, dim), dtype))
    _, (r, N, Lt) = lax.scan(step, init, (F_next, st.Hw, st.W, st.v, st.V), reverse=True)
    PN = jnp.einsum("tij,tjk->tik", st.P, N)
    base = st.a + jnp.einsum("tij,tj->ti", st.P, r[:, :, 0])
    G = st.X + jnp.einsum("tij,tjk->tik", st.P, r[:, :, 1:])  # d E[z_t | y, delta] / d delta
    cov_known = symmetrize(st.P - jnp.einsum("tij,tkj->tik", PN, st.P))
    # delta | y ~ N(S^{-1} s, S^{-1}) on the diffuse block (zero elsewhere)
    C = cho_solve_lower(chol, eye) - jnp.diag(keep.astype(dtype))
    delta = mm(C, ss)
    GC = jnp.einsum("tij,jk->tik", G, C)
    means = base + jnp.einsum("tij,j->ti", G, delta)
    covs = symmetrize(cov_known + jnp.einsum("tij,tkj->tik", GC, G))
    # Cov[z_{t+1}, z_t | y] = (I - P_{t+1} N_{t+1}) L_t P_t + G_{t+1} C G_t^T
    cross = jnp.einsum("tij,tjk,tkl->til", eye[None] - PN[1:], Lt[:-1], st.P[:-1]) \
        + jnp.einsum("tij,tkj->tik", GC[1:], G[:-1])
    return SmootherResult(filtered.log_likelihood, filtered.filtered_means, filtered.filtered_covs,
                          means, covs, cross)


def _finite_initial(params: LinearGaussianParams) -> LinearGaussianParams:
    """``params`` with the inf entries of initial_cov zeroed (the standard branch of "auto")."""
    P1 = params.initial_cov
    return params._replace(initial_cov=jnp.where(jnp.isinf(P1), 0.0, P1))


def _any_diffuse(params: LinearGaussianParams):
    return jnp.any(jnp.isinf(jnp.diagonal(params.initial_cov)))


def _dispatch(mode, parallel, params, diffuse_fn, standard_fn):
    """Run the standard or the diffuse form: ``mode`` "none", "exact" or "auto" (decided at run time:
    the initial covariance is traced and may hold inf)."""
    if mode == "none":
        return standard_fn(params)
    if parallel:
        if mode == "exact":
            raise ValueError("parallel: exact diffuse initialisation runs sequentially; expected "
                             "parallel=False for a model with a diffuse initial state")
        return standard_fn(params)
    if mode == "exact":
        return diffuse_fn(params)
    return lax.cond(_any_diffuse(params), diffuse_fn, lambda q: standard_fn(_finite_initial(q)), params)


def diffuse_mode(initial_cov, diffuse=None) -> str:
    """How a filter treats an initial covariance: "exact" (diffuse components present, or a
    ``diffuse`` mask given), "none" (concrete and finite, or ``diffuse=False``: the caller vouches
    there is no inf) or "auto" (traced: decided at run time with `lax.cond`)."""
    if diffuse is False:
        return "none"
    if diffuse is not None:
        return "exact"
    if not checks.is_concrete(initial_cov):
        return "auto"
    return "exact" if bool(np.isinf(np.diagonal(np.asarray(initial_cov))).any()) else "none"


# ----------------------------------------------------------------------------------------------
# Backward sampling and forecasting
# ----------------------------------------------------------------------------------------------
def _jittered_chol(L, unroll=True):
    dim = L.shape[-1]
    return cholesky(L + 1e-12 * jnp.trace(L) / dim * jnp.eye(dim, dtype=L.dtype), unroll)


def _sample_steady(key, params: LinearGaussianParams, ys, num_samples, parallel, chunk_size):
    """Backward sampling on the blocked steady-state filter: z_t = E_t z_{t+1} + g_t + chol(L_t) eps_t
    with E_t and L_t constant where the filter's covariances are (one Cholesky factor for them
    all); in parallel, `affine_recurrence` over those steps, per draw."""
    means, covs, mps, flags, g, _ = _steady_filter_blocks(params, ys, parallel, chunk_size)
    F, Q = params.transition_matrix, params.transition_cov
    num_timesteps, dim = means.shape
    n = num_timesteps - 1
    num_blocks = flags.shape[0]
    size = _STEADY_BLOCK
    mp_flat, steady_t, starts = _backward_setup(means, mps, flags)
    eps = jax.random.normal(key, (num_timesteps, num_samples, dim), ys.dtype)

    def element(P, unroll=True):
        E, Pp = _backward_gain(P, F, Q, unroll)
        return E, _jittered_chol(symmetrize(P - mm(mm(E, Pp), E.T)), unroll)

    E_inf, chol_inf = element(g.P, unroll=False)
    z_last = means[-1] + eps[-1] @ _jittered_chol(covs[-1], unroll=False).T
    xs = (_blocks(mp_flat, num_blocks), _blocks(eps[:-1], num_blocks), starts, starts)
    if parallel:
        offsets = (means[:-1] - mp_flat @ E_inf.T)[:, None] + eps[:-1] @ chol_inf.T  # (n, S, d)
        u = jnp.where(steady_t[:, None, None], offsets, 0.0)
        u = jnp.concatenate([u, z_last[None]])[::-1]
        rec = jax.vmap(lambda v: affine_recurrence(E_inf, v, _steady_chunk(chunk_size)), in_axes=1, out_axes=1)
        xs = xs + (_blocks(rec(u)[::-1][:-1], num_blocks),)

    def full(z_next, x, m, P):
        def step(z_next, xx):
            m, P, mp, e, ok = xx[:5]
            E, chol = element(P, unroll=False)  # transient steps only: LAPACK, less to compile
            z = z_next @ E.T + (m - mm(E, mp)) + e @ chol.T
            if parallel:
                z = jnp.where(xx[5], xx[6], z)
            z = jnp.where(ok, z, z_next)
            return z, z

        return lax.scan(step, z_next, (m, P) + x[:3] + x[4:], reverse=True)

    def steady(z_next, x, m, P):
        if parallel:
            return x[-1][0], x[-1]

        def step(z_next, xx):
            m, mp, e, ok = xx
            z = z_next @ E_inf.T + (m - mm(E_inf, mp)) + e @ chol_inf.T
            z = jnp.where(ok, z, z_next)  # the last block may run past T - 2
            return z, z

        return lax.scan(step, z_next, (m, x[0], x[1], x[2]), reverse=True)

    def block(z_next, x):
        start = x[3]
        x = x[:2] + (_block_valid(start, n),) + x[3:]
        m, P = _read_block(means, start, size), _read_block(covs, start, size)
        return lax.cond(jnp.all(x[4] | ~x[2]), steady, full, z_next, x, m, P)

    xs = xs[:4] + (_blocks(steady_t, num_blocks, False),) + xs[4:]
    _, zs = lax.scan(block, z_last, xs, reverse=True)
    zs = jnp.concatenate([zs.reshape((-1, num_samples, dim))[:n], z_last[None]])
    return jnp.swapaxes(zs, 0, 1)


def _sample_paths(key, params, ys, masks, num_samples, parallel, chunk_size, steady_state=True):
    if steady_state and _steady_applies(params, ys, masks, "none"):
        return _sample_steady(key, params, ys, num_samples, parallel, chunk_size)
    if parallel and _general_chunk(chunk_size, params.initial_mean.shape[0], ys.shape[0]) == TWO_LEVEL:
        return _sample_two_level(key, params, ys, masks, num_samples)
    filtered = _filter(params, ys, masks, parallel, chunk_size)
    body, last = _smoother_elements(params, filtered)
    num_timesteps, dim = filtered.filtered_means.shape
    chols = jax.vmap(lambda L: cholesky(L + 1e-12 * jnp.trace(L) / dim * jnp.eye(dim, dtype=L.dtype)))(
        jnp.concatenate([body.L, last.L[None]]))
    eps = jax.random.normal(key, (num_samples, num_timesteps, dim), ys.dtype)
    # realised offsets h_t = g_t + chol(L_t) eps_t; then z_t = E_t z_{t+1} + h_t
    g_all = jnp.concatenate([body.g, last.g[None]])
    h = g_all[None] + jnp.einsum("tij,stj->sti", chols, eps)
    E_all = jnp.concatenate([body.E, last.E[None]])
    if parallel:
        def combine(later, earlier):
            return (earlier[0] @ later[0], earlier[0] @ later[1] + earlier[1])

        identity = (jnp.eye(dim, dtype=ys.dtype), jnp.zeros(dim, ys.dtype))
        chunk_size = _general_chunk(chunk_size, dim, num_timesteps)
        scan_one = lambda hs: chunked_associative_scan(combine, (E_all, hs), identity, chunk_size, reverse=True)[1]
        return jax.vmap(scan_one)(h)

    def step(z_next, xs):
        E, h_t = xs
        z = z_next @ E.T + h_t
        return z, z

    h_t_first = jnp.swapaxes(h, 0, 1)  # (T, S, d)
    _, zs = lax.scan(step, h_t_first[-1], (body.E, h_t_first[:-1]), reverse=True)
    return jnp.swapaxes(jnp.concatenate([zs, h_t_first[-1][None]]), 0, 1)


def _forecast(params, ys, masks, num_steps, parallel, chunk_size, mode="none", diffuse=None):
    num_timesteps = ys.shape[0]
    filtered = _filter(_slice_time(params, 0, num_timesteps), ys, masks, parallel, chunk_size, mode, diffuse)
    future = _broadcast_time(_slice_time(params, num_timesteps, num_timesteps + num_steps), num_steps)

    def step(carry, p):
        F, b, Q, H, d, R = p
        m, P = _predict(*carry, F, b, Q)
        return (m, P), (m, P, H @ m + d, symmetrize(H @ P @ H.T + R))

    start = (filtered.filtered_means[-1], filtered.filtered_covs[-1])
    _, out = lax.scan(step, start, tuple(future[2:]))
    return ForecastResult(*out)


# ----------------------------------------------------------------------------------------------
# Public traceable cores: one sequence, arrays only, no checks
# ----------------------------------------------------------------------------------------------
def filter_params(params: LinearGaussianParams, emissions, *, parallel: bool = False,
                  chunk_size: Optional[int] = None, diffuse=None) -> FilterResult:
    """Kalman filter on the arrays of one sequence: the traceable core of `filter`.

    Args:
        params: `LinearGaussianParams` of the sequence (per-step fields with a leading T axis
            or time-invariant ones), e.g. ``model.linear_gaussian_params(T, inputs)``.
        emissions: (T, p); NaN marks a missing entry (dropped exactly, whole or partial rows).
        parallel: associative scan (O(log T) span) instead of the sequential scan.
        chunk_size: parallel only; as in `filter` (static int or ``"two-level"``).
        diffuse: None, or a (d,) boolean mask of diffuse components (a flat prior: exact diffuse
            initialisation, Durbin & Koopman ch. 5); their rows and columns of initial_cov are
            ignored. Entries ``inf`` on the diagonal of initial_cov are diffuse as well.

    Returns:
        `FilterResult`: log_likelihood (), filtered_means (T, d), filtered_covs (T, d, d).

    No input checks: usable inside the caller's jit / vmap / grad (``parallel`` and
    ``chunk_size`` must be static). With a traced initial_cov and ``diffuse=None``, whether it
    holds inf is decided at run time (`lax.cond`; sequential form only).
    """
    ys = jnp.asarray(emissions)
    return _filter(params, ys, ~jnp.isnan(ys), parallel, chunk_size, diffuse_mode(params.initial_cov, diffuse),
                   diffuse)


def smoother_params(params: LinearGaussianParams, emissions, *, parallel: bool = False,
                    chunk_size: Optional[int] = None, diffuse=None) -> SmootherResult:
    """RTS smoother on the arrays of one sequence: the traceable core of `smoother`.

    Args and conventions as `filter_params`. Returns a `SmootherResult`: the filter's fields
    plus smoothed_means (T, d), smoothed_covs (T, d, d) and smoothed_cross_covs (T-1, d, d),
    ``smoothed_cross_covs[t] = Cov[z_{t+1}, z_t | y]``.
    """
    ys = jnp.asarray(emissions)
    return _smooth(params, ys, ~jnp.isnan(ys), parallel, chunk_size, diffuse_mode(params.initial_cov, diffuse),
                   diffuse)


def sample_params(key, params: LinearGaussianParams, emissions, num_samples: int = 1, *,
                  parallel: bool = False, chunk_size: Optional[int] = None) -> jax.Array:
    """Forward-filter backward-sample on the arrays of one sequence: the core of `sample`.

    Args:
        key: a `jax.random` key.
        params, emissions, parallel, chunk_size: as `filter_params`.
        num_samples: number of joint draws (static int).

    Returns:
        (num_samples, T, d) draws of z_{0:T-1} from p(z | y).
    """
    ys = jnp.asarray(emissions)
    return _sample_paths(key, params, ys, ~jnp.isnan(ys), num_samples, parallel, chunk_size)


def forecast_params(params: LinearGaussianParams, emissions, num_steps: int, *, parallel: bool = False,
                    chunk_size: Optional[int] = None, diffuse=None) -> ForecastResult:
    """`forecast` on arrays: ``params`` cover T + num_steps steps, emissions (T, p).

    Returns a `ForecastResult`: means (k, d), covs (k, d, d), emission_means (k, p),
    emission_covs (k, p, p) with k = num_steps (static int).
    """
    ys = jnp.asarray(emissions)
    return _forecast(params, ys, ~jnp.isnan(ys), num_steps, parallel, chunk_size,
                     diffuse_mode(params.initial_cov, diffuse), diffuse)


def mask_padding(emissions, length):
    """Emissions (T, p) with the rows at and beyond ``length`` (an int, possibly traced)
    set to NaN, i.e. treated as missing; ``length`` None returns them unchanged."""
    if length is None:
        return emissions
    keep = jnp.arange(emissions.shape[0]) < length
    return jnp.where(keep[:, None], emissions, jnp.nan)


# ----------------------------------------------------------------------------------------------
# Jitted model-level runs (one compile per shape and flag set) and the public functions
# ----------------------------------------------------------------------------------------------
def _masks_of(ys, has_missing):
    return ~jnp.isnan(ys) if has_missing else None


def _one_sequence(model, y, u, n, has_missing, extra_steps=0):
    """Params and (emissions, masks) of one sequence; padding beyond length n is missing."""
    y = mask_padding(y, n)
    params = model.linear_gaussian_params(y.shape[0] + extra_steps, u)
    return params, y, _masks_of(y, has_missing or n is not None)


@partial(jax.jit, static_argnames=("has_missing", "parallel", "chunk_size", "batched", "inputs_batched", "smooth",
                                   "mode", "steady_state"))
def _run(model, ys, inputs, lengths, diffuse=None, *, has_missing, parallel, chunk_size, batched, inputs_batched,
         smooth, mode="none", steady_state=True):
    def one(y, u, n):
        params, y, masks = _one_sequence(model, y, u, n, has_missing)
        if smooth:
            return _smooth(params, y, masks, parallel, chunk_size, mode, diffuse, steady_state)
        return _filter(params, y, masks, parallel, chunk_size, mode, diffuse, steady_state)

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


@partial(jax.jit, static_argnames=("num_samples", "has_missing", "parallel", "chunk_size", "batched",
                                   "inputs_batched", "steady_state"))
def _run_sample(key, model, ys, inputs, lengths, *, num_samples, has_missing, parallel, chunk_size, batched,
                inputs_batched, steady_state=True):
    def one(y, u, n, k):
        params, y, masks = _one_sequence(model, y, u, n, has_missing)
        return _sample_paths(k, params, y, masks, num_samples, parallel, chunk_size, steady_state)

    batch = Batch(ys, inputs, lengths, batched, inputs_batched)
    if not batched:
        return batch.map(one, key)
    return batch.map(one, jax.random.split(key, ys.shape[0]), extra_axes=(0,))


@partial(jax.jit, static_argnames=("num_steps", "has_missing", "parallel", "chunk_size", "batched",
                                   "inputs_batched", "mode"))
def _run_forecast(model, ys, inputs, lengths, diffuse=None, *, num_steps, has_missing, parallel, chunk_size,
                  batched, inputs_batched, mode="none"):
    def one(y, u, n):
        params, y, masks = _one_sequence(model, y, u, n, has_missing, num_steps)
        return _forecast(params, y, masks, num_steps, parallel, chunk_size, mode, diffuse)

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


def check_arguments(model, emissions, inputs=None, lengths=None, extra_steps: int = 0) -> Batch:
    """Validate a linear-Gaussian model and its data once, outside jit; return them as a `Batch`.

    Reads only what the model declares: ``model.emission_dim``, ``model.num_timesteps``
    (None: any length) and ``model.input_dim`` (None: inputs passed unchecked; 0: no inputs
    allowed; U: inputs (T, U) or (B, T, U) required). ``extra_steps`` is the forecast horizon
    (inputs and time-varying parameters must then cover T + extra_steps steps).

    Raises:
        ValueError: naming the argument, for a model that is not an `AbstractLinearGaussianSSM`,
            emissions not (T, p) / (B, T, p) / a list of (T_b, p), inf in emissions, inputs of the
            wrong shape or non-finite, lengths out of range, a time-varying model of another length.
    """
    if not isinstance(model, AbstractLinearGaussianSSM):
        raise ValueError(
            f"model: expected a linear-Gaussian model (AbstractLinearGaussianSSM), got {type(model).__name__}"
        )
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())
    p = model.emission_dim
    if isinstance(emissions, (list, tuple)):
        for i, y in enumerate(emissions):
            if not (jnp.ndim(y) == 2 and jnp.shape(y)[-1] == p) and not (jnp.ndim(y) == 1 and p == 1):
                raise ValueError(f"emissions[{i}]: expected shape (T_b, {p}), got shape {tuple(jnp.shape(y))}")
    if batching.is_concatenated(emissions, lengths):
        # hmmlearn-style concatenated sequences: split emissions and inputs into a padded batch
        if inputs is not None and not isinstance(inputs, list):
            inputs = jax.tree_util.tree_map(
                lambda a: batching.split_concatenated(a, lengths, 0.0, "inputs")[0], inputs)
        emissions, lengths = batching.split_concatenated(emissions, lengths)
    batch_t = batching.as_batch(emissions, None, lengths)
    if batch_t.emissions.shape[-1] != p:
        raise ValueError(f"emissions: expected shape (T, {p}) or (B, T, {p}), got shape "
                         f"{tuple(batch_t.emissions.shape)}")
    num_timesteps = batch_t.num_timesteps
    needed = num_timesteps + extra_steps
    if checks.is_concrete(batch_t.emissions) and np.isinf(np.asarray(batch_t.emissions)).any():
        raise ValueError("emissions: found inf; use NaN to mark missing values")
    model_len = model.num_timesteps
    if model_len is not None and model_len != needed:
        raise ValueError(
            f"model: its time-varying parameters have length {model_len}, expected {needed} "
            f"(the number of time steps{' plus num_steps' if extra_steps else ''})"
        )
    input_dim = model.input_dim
    if input_dim and inputs is None:
        raise ValueError(f"inputs: the model has input matrices, expected shape ({needed}, {input_dim}), got None")
    if inputs is not None and input_dim == 0:
        raise ValueError("inputs: the model reads no inputs (input_dim = 0), expected None")
    if inputs is not None and not isinstance(inputs, list):
        inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
        if input_dim and not isinstance(inputs, jax.Array):
            raise ValueError(f"inputs: expected an array of shape ({needed}, {input_dim}), got {type(inputs).__name__}")
        if isinstance(inputs, jax.Array) and inputs.ndim == 1:
            inputs = inputs[:, None]
    if extra_steps and inputs is not None:
        # inputs cover T + extra_steps rows; check them against that length.
        y_long = jnp.zeros(batch_t.emissions.shape[:-2] + (needed, 1), batch_t.emissions.dtype)
        ub = batching.as_batch(y_long, inputs)
        batch = batching.Batch(batch_t.emissions, ub.inputs, batch_t.lengths, batch_t.batched, ub.inputs_batched)
    else:
        batch = batching.as_batch(batch_t.emissions, inputs, batch_t.lengths)
    if batch.inputs is not None:
        for leaf in jax.tree_util.tree_leaves(batch.inputs):
            if input_dim and (jnp.ndim(leaf) != (3 if batch.inputs_batched else 2) or jnp.shape(leaf)[-1] != input_dim):
                raise ValueError(f"inputs: expected {input_dim} columns, got shape {tuple(jnp.shape(leaf))}")
            checks.finite(leaf, "inputs")
    first_inputs = batch.inputs
    if batch.inputs_batched:
        first_inputs = jax.tree_util.tree_map(lambda a: a[0], batch.inputs)
    checks.once_per_model(model, ("linear-Gaussian", needed), lambda: check_params(
        _system_params(model, needed, first_inputs), model.state_dim, p))
    return batch


@partial(eqx.filter_jit)
def _system_params(model, num_timesteps, inputs):
    # one compiled call instead of eager op-by-op dispatch (which compiles every primitive)
    return model.linear_gaussian_params(num_timesteps, inputs)


def check_params(params: LinearGaussianParams, state_dim: int, emission_dim: int) -> LinearGaussianParams:
    """Shapes, finiteness and (semi-)definiteness of a model's system matrices, on concrete
    arrays only. It runs where inference starts, so models made by ``eqx.tree_at``,
    ``tree_map`` or ``ps.load`` are checked too; each error names the field."""
    d, p = state_dim, emission_dim
    expected = {"initial_mean": (d,), "initial_cov": (d, d), "transition_matrix": (d, d),
                "transition_offset": (d,), "transition_cov": (d, d), "emission_matrix": (p, d),
                "emission_offset": (p,), "emission_cov": (p, p)}
    for name, want in expected.items():
        a = getattr(params, name)
        shape = tuple(jnp.shape(a))
        timed = name not in ("initial_mean", "initial_cov")
        if shape != want and not (timed and shape[1:] == want):
            doc = f"{want}" + (f" or (T, {', '.join(map(str, want))})" if timed else "")
            raise ValueError(f"{name}: expected shape {doc}, got shape {shape}")
        if not checks.is_concrete(a):
            continue
        if name == "initial_cov":
            check_initial_cov(a)
        elif name.endswith("_cov"):
            checks.psd(a, name, strict=False)
        else:
            checks.finite(a, name)
    _warn_huge_initial_cov(params)
    return params


# A finite prior variance this many times the largest noise variance loses the data's information
# to float rounding (P - P H^T S^{-1} H P cancels); inf (exact diffuse) is then the right model.
_HUGE_RATIO = 1e12


def check_initial_cov(initial_cov, name: str = "initial_cov") -> np.ndarray:
    """Check an initial covariance on concrete arrays: +inf on the diagonal marks a diffuse
    component (zeros in the rest of its row and column), the finite rest must be symmetric
    positive definite. Returns the (d,) boolean diffuse mask (all False under tracing).

    Raises:
        ValueError: naming ``name``, for NaN, -inf, inf off the diagonal or beside a diffuse
            diagonal entry, or a finite part that is not positive definite.
    """
    d = jnp.shape(initial_cov)[-1]
    if not checks.is_concrete(initial_cov):
        return np.zeros(d, bool)
    P = np.asarray(initial_cov, dtype=np.float64)
    mask = np.isposinf(np.diagonal(P))
    diffuse_diag = np.diag(mask)
    beside = (mask[:, None] | mask[None, :]) & ~diffuse_diag  # rest of a diffuse row or column
    if (~np.isfinite(P) & ~diffuse_diag).any() or (P[beside] != 0).any():
        raise ValueError(f"{name}: expected finite entries, or +inf on the diagonal (a diffuse component) "
                         "with zeros in the rest of its row and column; found NaN or another inf")
    keep = ~mask
    if keep.any():
        checks.psd(P[np.ix_(keep, keep)], name, strict=True)
    return mask


def _warn_huge_initial_cov(params: LinearGaussianParams) -> None:
    P1, R, Q = params.initial_cov, params.emission_cov, params.transition_cov
    if not all(checks.is_concrete(a) for a in (P1, R, Q)):
        return
    diag = np.diagonal(np.asarray(P1, dtype=np.float64))
    diag = diag[np.isfinite(diag)]
    noise = max(float(np.max(np.abs(np.diagonal(np.asarray(a, np.float64), axis1=-2, axis2=-1)), initial=0.0))
                for a in (R, Q))
    biggest = float(np.max(diag, initial=0.0))
    if noise > 0 and biggest > _HUGE_RATIO * noise:
        warnings.warn(
            f"initial_cov: a variance of {biggest:.3g} is more than {_HUGE_RATIO:.0e} times the largest noise "
            f"variance ({noise:.3g}); float rounding then loses the information in the data and the "
            "log-likelihood and moments may be wrong. For an uninformative (flat) prior put inf on the "
            "diagonal (exact diffuse initialisation) instead of a huge finite value.",
            UserWarning, stacklevel=7)


_MODES: dict = {}


def _initial_cov(model, batch: Batch, extra_steps: int = 0):
    first = batch.inputs
    if batch.inputs_batched:
        first = jax.tree_util.tree_map(lambda a: a[0], batch.inputs)
    return _system_params(model, batch.num_timesteps + extra_steps, first).initial_cov


def initial_form(model, emissions, inputs=None, lengths=None):
    """False when the model's initial covariance is concrete and finite, a (d,) tuple of bools
    marking its diffuse (inf) components when it holds inf, None when it is traced (undecided).
    Learners call it once, outside their jit, and pass the answer as ``diffuse=`` so that only
    one form of the filter is compiled."""
    batch = batching.as_batch(emissions, inputs, lengths)
    P1 = _initial_cov(model, batch)
    if not checks.is_concrete(P1):
        return None
    mask = np.isinf(np.diagonal(np.asarray(P1)))
    return tuple(bool(m) for m in mask) if mask.any() else False


def _diffuse_of(model, batch: Batch, diffuse, parallel, extra_steps: int = 0):
    """(mode, mask): the static form of the run ("none", "exact", "auto") and the checked
    ``diffuse`` mask (an array or None); the model's mode is cached per model object."""
    d = model.state_dim
    if diffuse is False:
        return "none", None
    if diffuse is not None:
        if checks.is_concrete(diffuse):
            mask = np.asarray(diffuse)
            if mask.shape != (d,) or mask.dtype != np.bool_:
                raise ValueError(f"diffuse: expected a boolean mask of shape ({d},), got dtype {mask.dtype} and "
                                 f"shape {mask.shape}")
        diffuse = jnp.asarray(diffuse, bool)
        mode = "exact"
    else:
        key = id(model)
        mode = _MODES.get(key)
        if mode is None:
            P1 = _initial_cov(model, batch, extra_steps)
            mode = diffuse_mode(P1)
            if checks.is_concrete(P1):
                try:
                    weakref.finalize(model, _MODES.pop, key, None)
                    _MODES[key] = mode
                except TypeError:  # not weak-referenceable: decide every time
                    pass
    if mode == "exact" and parallel:
        raise ValueError("parallel: exact diffuse initialisation (inf in initial_cov, or diffuse=) runs "
                         "sequentially; expected parallel=False")
    return mode, diffuse


def _flags(batch: Batch) -> dict:
    ys = batch.emissions
    has_missing = (not checks.is_concrete(ys)) or bool(np.isnan(np.asarray(ys)).any())
    return dict(has_missing=has_missing, batched=batch.batched, inputs_batched=batch.inputs_batched)


def _chunk(chunk_size):
    if chunk_size is None or chunk_size == TWO_LEVEL:
        return chunk_size
    return checks.positive_int(chunk_size, "chunk_size")


def filter(model, emissions, *, inputs=None, lengths=None, parallel: bool = False,
           chunk_size: Optional[int] = None, diffuse=None, steady_state: bool = True) -> FilterResult:
    """Kalman filter: log p(y_{0:T-1}) and the filtered moments of every z_t.

    Args:
        model: a linear-Gaussian model (any `ps.core.AbstractLinearGaussianSSM`).
        emissions: (T, p), a batch (B, T, p) or a list of (T_b, p) arrays; NaN marks a missing
            entry (dropped exactly; a partly missing row keeps its observed entries).
        inputs: (T, U) shared or (B, T, U) per sequence (or a list), when the model reads inputs.
        lengths: (B,) true lengths of a padded batch; steps beyond are treated as missing, so
            the log-likelihood is exact and the moments there are predictions.
        parallel: False for the sequential scan, True for the associative scan (O(log T) span).
        chunk_size: parallel only; an int combines elements by an associative scan inside
            chunks of this length, sequentially across chunks (bounds compile time and memory);
            ``"two-level"`` (`ps.core.scan.TWO_LEVEL`) reduces chunks of about sqrt(T) steps in
            parallel and reruns the ordinary recursion in every chunk from its start. None:
            chosen from the backend (on CPU the two-level form; on an accelerator one chunk
            while its elements fit in 2^26 entries; the steady-state means one chunk).
        diffuse: None, or a (d,) boolean mask of diffuse components (flat prior, exact diffuse
            initialisation; their rows and columns of initial_cov are ignored). ``inf`` on the
            diagonal of the model's initial_cov marks diffuse components too. Sequential only
            (``parallel=True`` raises); filtered variances not yet identified are ``inf``.
        steady_state: when F, Q, H and R are time-invariant and no entry is missing, switch to
            the steady-state gain once the covariance recursion has converged (relative change
            of the filtered covariance over a step at most `steady_state_rtol`: 1e-12 in
            float64); the covariances are then shared by every sequence of a batch. False runs
            the full recursion at every step.

    Returns:
        `FilterResult`: log_likelihood (), filtered_means (T, d), filtered_covs (T, d, d), with a
        leading B axis for batches.

    Example:
        >>> f = ps.kalman.filter(model, y)
        >>> f.log_likelihood, f.filtered_means.shape
    """
    batch = check_arguments(model, emissions, inputs, lengths)
    mode, diffuse = _diffuse_of(model, batch, diffuse, parallel)
    return _run(model, batch.emissions, batch.inputs, batch.lengths, diffuse, parallel=bool(parallel),
                chunk_size=_chunk(chunk_size), smooth=False, mode=mode, steady_state=bool(steady_state),
                **_flags(batch))


def smoother(model, emissions, *, inputs=None, lengths=None, parallel: bool = False,
             chunk_size: Optional[int] = None, diffuse=None, steady_state: bool = True) -> SmootherResult:
    """Rauch-Tung-Striebel smoother: smoothed moments and lag-one cross-covariances.

    Same arguments as `filter`. Returns a `SmootherResult`: the filter's fields plus
    smoothed_means (T, d), smoothed_covs (T, d, d), smoothed_cross_covs (T-1, d, d), where
    ``smoothed_cross_covs[t]`` is Cov[z_{t+1}, z_t | all y] (EM uses it).
    """
    batch = check_arguments(model, emissions, inputs, lengths)
    mode, diffuse = _diffuse_of(model, batch, diffuse, parallel)
    return _run(model, batch.emissions, batch.inputs, batch.lengths, diffuse, parallel=bool(parallel),
                chunk_size=_chunk(chunk_size), smooth=True, mode=mode, steady_state=bool(steady_state),
                **_flags(batch))


def sample(key, model, emissions, num_samples: int = 1, *, inputs=None, lengths=None, parallel: bool = False,
           chunk_size: Optional[int] = None, steady_state: bool = True) -> jax.Array:
    """Forward-filter backward-sample: draws of z_{0:T-1} from p(z | y).

    Args: ``key`` (a `jax.random` key, required) and the arguments of `filter` (``steady_state``
    as there: False draws through the full recursion).

    Returns:
        (num_samples, T, d), or (B, num_samples, T, d) for a batch (one key per sequence,
        split from ``key``).
    """
    num_samples = checks.positive_int(num_samples, "num_samples")
    batch = check_arguments(model, emissions, inputs, lengths)
    mode = _diffuse_of(model, batch, None, False)[0]
    if mode == "exact":
        raise ValueError("model: its initial_cov holds inf (a diffuse, flat prior); sampling needs a proper "
                         "initial distribution, expected a finite initial_cov")
    if mode == "auto":  # traced initial_cov: the same refusal, at run time
        model = eqx.error_if(model, jnp.isinf(_initial_cov(model, batch)).any(),
            "model: its initial_cov holds inf (a diffuse, flat prior); sampling needs a proper initial "
            "distribution, expected a finite initial_cov")
    return _run_sample(key, model, batch.emissions, batch.inputs, batch.lengths, num_samples=num_samples,
                       parallel=bool(parallel), chunk_size=_chunk(chunk_size), steady_state=bool(steady_state),
                       **_flags(batch))


def forecast(model, emissions, num_steps: int, *, inputs=None, lengths=None, parallel: bool = False,
             chunk_size: Optional[int] = None, diffuse=None) -> ForecastResult:
    """Predict the states and observations ``num_steps`` ahead of the last observation.

    A time-varying model must carry parameters (and ``inputs`` rows) for T + num_steps
    steps; the last num_steps of them drive the forecast. With ``lengths``, a sequence's
    forecast starts after its padded end (the steps between are predicted as missing).

    Returns a `ForecastResult`: means (k, d), covs (k, d, d), emission_means (k, p),
    emission_covs (k, p, p), k = num_steps, with a leading B axis for batches.
    """
    num_steps = checks.positive_int(num_steps, "num_steps")
    batch = check_arguments(model, emissions, inputs, lengths, extra_steps=num_steps)
    mode, diffuse = _diffuse_of(model, batch, diffuse, parallel, extra_steps=num_steps)
    return _run_forecast(model, batch.emissions, batch.inputs, batch.lengths, diffuse, num_steps=num_steps,
                         parallel=bool(parallel), chunk_size=_chunk(chunk_size), mode=mode, **_flags(batch))


def log_likelihood(model, emissions, *, inputs=None, lengths=None, diffuse=None) -> jax.Array:
    """log p(y) of one sequence, summed over a batch; traceable (for gradients and samplers).

    Args:
        model: any `AbstractLinearGaussianSSM`.
        emissions: (T, p), (B, T, p) or a list of (T_b, p); NaN = missing.
        inputs: (T, U) or (B, T, U), when the model reads inputs.
        lengths: (B,) true lengths of a padded batch (padding counts as missing: exact).
        diffuse: None or a (d,) boolean mask of diffuse components, as in `filter`; with inf in
            the model's initial_cov the exact-diffuse log-likelihood is returned (decided at run
            time when initial_cov is traced, which compiles both forms). ``False`` (static) says
            there is no diffuse component: the standard form only, the cheaper compile.

    Returns:
        () the total log-likelihood. No value checks (shapes only): the learners call this
        inside their own jit.
    """
    batch = batching.as_batch(emissions, inputs, lengths)
    if diffuse is not None and diffuse is not False:
        diffuse = jnp.asarray(diffuse, bool)

    def one(y, u, n):
        y = mask_padding(y, n)
        params = model.linear_gaussian_params(y.shape[0], u)
        mode = diffuse_mode(params.initial_cov, diffuse)
        return _filter(params, y, ~jnp.isnan(y), False, None, mode, diffuse).log_likelihood

    return jnp.sum(batch.map(one))
