"""Laplace posterior q(z) q(x) for switching linear dynamical systems, recurrent ones included
(Linderman et al., AISTATS 2017; Zoltowski, Pillow & Linderman, ICML 2020).

The posterior over modes z_{0:T-1} and states x_{0:T-1} is approximated by q(z) q(x) and
the two factors are updated in turn:

* q(x) given q(z): the Laplace approximation of the density proportional to
  exp E_q(z)[log p(x, y, z)]: Newton's method (with a step-halving line search) on

      L(x) = E_q(z)[log p(x, y | z)] + sum_{t>=1} E_q(z)[log p(z_t | z_{t-1}, x_{t-1})]

  then q(x) = N(x*, Lambda^{-1}) with Lambda = -Hessian of L at the mode x*. The Gaussian part
  of L is a block-tridiagonal quadratic form; the recurrence term touches only the diagonal
  blocks (each log softmax reads one x_{t-1}), so Lambda is block tridiagonal and the Newton
  step, the marginal and lag-one covariances and log|Lambda| come from two O(T d^3) scans
  (a block Cholesky forward, selected inversion backward); no (Td x Td) matrix is formed.
  With Gaussian emissions and a Markov mode chain L is quadratic: one Newton step is exact and
  q(x) is the coordinate-ascent optimum (the structured mean-field update).
* q(z) given q(x): exact forward-backward (`ps.hmm`'s core) on the expected log-potentials
  psi_t(k) = E_q(x)[log p(x_t | x_{t-1}, z_t = k) + log p(y_t | x_t, z_t = k)] (exact Gaussian
  expectations) and per-step log transition matrices
  log A_t[i, j] ~ E_q(x)[log p(z_t = j | z_{t-1} = i, x_{t-1})], evaluated by the second-order
  delta method: f(m_{t-1}) + 1/2 tr(Hess f(m_{t-1}) Cov[x_{t-1}]) (for a softmax of W_i x + r_i
  the correction is -1/2 tr(W_i^T (diag p - p p^T) W_i P), the same for every j of a row).

ELBO (after each sweep: q(x) update, then q(z) update): log Z_q(z) + H[q(x)], where log Z_q(z)
is the forward-backward normaliser, which equals E_q[log p(y, x, z)] + H[q(z)] at the updated
q(z); it is exact apart from the delta method on the recurrence, so on a Markov chain it is a
lower bound on log p(y) and equals `structured_vi`'s. Laplace updates need not raise it on a
recurrent model.

The loop the scan runs::

    q(z_t) = 1/K (or given);  x = 0
    for it in range(num_iters):
        for _ in range(num_newton_steps):        # one step without recurrence
            x += s * Lambda(x)^{-1} grad L(x)     # s: best of 1, 1/2, ..., 2^-9, 0
        q(x) = N(x, Lambda(x)^{-1})
        q(z) = forward-backward(psi(q(x)), log A(q(x)));  elbo[it] = log Z + H[q(x)]
    q(x) = Laplace given the final q(z)           # the returned q(x)
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks
from probssm.core.batching import Batch
from probssm.core.linalg import cholesky, solve_lower, solve_upper_transposed, symmetrize
from probssm.core.optim import line_search
from probssm.core.protocol import DiscreteParams
from probssm.core.switching import SwitchingParams, step_systems
from probssm.inference import kalman
from probssm.inference.forward_backward import smoother_params as smoother_params_hmm
from probssm.inference.smc import common as C
from probssm.inference.switching import slds as S

__all__ = ["LaplaceResult", "laplace", "laplace_params", "block_tridiagonal_solve"]

_LOG_2PI = math.log(2 * math.pi)


class LaplaceResult(NamedTuple):
    """Laplace posterior q(z) q(x) of a switching model (a leading B axis for a batch)."""

    elbo: jax.Array  # (num_iters,) ELBO after each sweep (q(x) then q(z) update)
    mode_probs: jax.Array  # (T, K) q(z_t = k)
    pairwise_mode_probs: jax.Array  # (T - 1, K, K) q(z_t = i, z_{t+1} = j)
    transition_counts: jax.Array  # (K, K) sum_t q(z_{t-1} = i, z_t = j)
    means: jax.Array  # (T, d) mode of the Laplace q(x) (its mean)
    covs: jax.Array  # (T, d, d) Cov_q[x_t]
    cross_covs: jax.Array  # (T - 1, d, d) Cov_q[x_{t+1}, x_t]


# ----------------------------------------------------------------------------------------------
# Block-tridiagonal precision: solve, marginal and lag-one covariances, log-determinant
# ----------------------------------------------------------------------------------------------
def _btd_forward(D, O, g):
    """Block Cholesky of the SPD block-tridiagonal Lambda (diagonal blocks D (T, d, d), sub-diagonal
    blocks O (T-1, d, d), O[t-1] = Lambda[t, t-1]) with forward substitution of g (T, d):
    S_0 = D_0, S_t = D_t - O_{t-1} S_{t-1}^{-1} O_{t-1}^T = L_t L_t^T; Y_t = L_{t-1}^{-1} O_{t-1}^T;
    w_t = L_t^{-1} (g_t - Y_t^T w_{t-1})."""
    L0 = cholesky(D[0])
    w0 = solve_lower(L0, g[0])

    def step(carry, xs):
        L_prev, w_prev = carry
        D_t, O_t, g_t = xs
        Y = solve_lower(L_prev, O_t.T)
        L = cholesky(symmetrize(D_t - Y.T @ Y))
        w = solve_lower(L, g_t - Y.T @ w_prev)
        return (L, w), (L, Y, w)

    _, (Ls, Ys, ws) = lax.scan(step, (L0, w0), (D[1:], O, g[1:]))
    return jnp.concatenate([L0[None], Ls]), Ys, jnp.concatenate([w0[None], ws])


def _btd_solve(D, O, g):
    """Lambda^{-1} g by `_btd_forward` and back substitution x_t = L_t^{-T} (w_t - Y_{t+1} x_{t+1})."""
    Ls, Ys, ws = _btd_forward(D, O, g)
    x_last = solve_upper_transposed(Ls[-1], ws[-1])

    def back(x_next, xs):
        L, Y, w = xs
        x = solve_upper_transposed(L, w - Y @ x_next)
        return x, x

    _, xs = lax.scan(back, x_last, (Ls[:-1], Ys, ws[:-1]), reverse=True)
    return jnp.concatenate([xs, x_last[None]])


def _btd_covariances(D, O):
    """Selected inversion: marginal blocks Sigma_t (T, d, d), Cov[x_{t+1}, x_t] (T-1, d, d) and
    log|Lambda|. Sigma_t = S_t^{-1} + G_t Sigma_{t+1} G_t^T, G_t = S_t^{-1} O_t^T = L_t^{-T} Y_{t+1},
    Cov[x_t, x_{t+1}] = -G_t Sigma_{t+1} (the RTS smoother in information form)."""
    d = D.shape[-1]
    Ls, Ys, _ = _btd_forward(D, O, jnp.zeros(D.shape[:-1], D.dtype))
    eye = jnp.eye(d, dtype=D.dtype)

    def sinv(L):
        Li = solve_lower(L, eye)
        return Li.T @ Li

    last = sinv(Ls[-1])

    def back(Sig_next, xs):
        L, Y = xs
        G = solve_upper_transposed(L, Y)
        Sig = symmetrize(sinv(L) + G @ Sig_next @ G.T)
        return Sig, (Sig, -Sig_next @ G.T)

    _, (Sigs, cross) = lax.scan(back, last, (Ls[:-1], Ys), reverse=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Ls, axis1=-2, axis2=-1)))
    return jnp.concatenate([Sigs, last[None]]), cross, logdet


@jax.jit
def block_tridiagonal_solve(diagonal_blocks, lower_blocks, rhs):
    """Solve Lambda x = rhs for a symmetric positive definite block-tridiagonal Lambda, and return
    its inverse's diagonal and first sub-diagonal blocks and log|Lambda|, in O(T d^3) (two scans;
    no (Td, Td) matrix). Traceable.

    Args:
        diagonal_blocks: (T, d, d) Lambda[t, t].
        lower_blocks: (T - 1, d, d) Lambda[t + 1, t].
        rhs: (T, d).

    Returns:
        ``(x, covs, cross_covs, logdet)``: x (T, d); covs (T, d, d) the blocks (Lambda^{-1})[t, t];
        cross_covs (T - 1, d, d) the blocks (Lambda^{-1})[t + 1, t]; logdet ().

    Raises:
        ValueError: naming ``diagonal_blocks``, ``lower_blocks`` or ``rhs`` (wrong shape). A matrix
            that is not positive definite gives NaN (no value check: the function is traced).
    """
    D, O, g = jnp.asarray(diagonal_blocks), jnp.asarray(lower_blocks), jnp.asarray(rhs)
    if D.ndim != 3 or D.shape[1] != D.shape[2] or D.shape[0] < 1:
        raise ValueError(f"diagonal_blocks: expected shape (T, d, d), got shape {tuple(D.shape)}")
    T, d = D.shape[0], D.shape[1]
    if O.shape != (T - 1, d, d):
        raise ValueError(f"lower_blocks: expected shape ({T - 1}, {d}, {d}), got shape {tuple(O.shape)}")
    if g.shape != (T, d):
        raise ValueError(f"rhs: expected shape ({T}, {d}), got shape {tuple(g.shape)}")
    covs, cross, logdet = _btd_covariances(D, O)
    return _btd_solve(D, O, g), covs, cross, logdet


def _btd_matvec(D, O, x):
    """Lambda x for the block-tridiagonal Lambda."""
    y = jnp.einsum("tij,tj->ti", D, x)
    y = y.at[1:].add(jnp.einsum("tij,tj->ti", O, x[:-1]))
    return y.at[:-1].add(jnp.einsum("tji,tj->ti", O, x[1:]))


# ----------------------------------------------------------------------------------------------
# Expected log-densities: the per-mode terms, computed once per parameter set
# ----------------------------------------------------------------------------------------------
class _Terms(NamedTuple):
    """Per-mode quadratic forms; a leading axis of 1 means 'the same at every step'."""

    em_J: jax.Array  # (1 or T, K, d, d) H^T R^{-1} H (missing rows dropped)
    em_h: jax.Array  # (T, K, d) H^T R^{-1} (y - d)
    em_c: jax.Array  # (T, K) -1/2 (y-d)^T R^{-1} (y-d) - 1/2 log|R| - n/2 log 2 pi
    P0i: jax.Array  # (K, d, d)
    mu0: jax.Array  # (K, d)
    c0: jax.Array  # (K,) -1/2 log|P0| - d/2 log 2 pi
    Qi: jax.Array  # (1 or T-1, K, d, d) Q^{-1} of the transition into step t = 1..T-1
    QiF: jax.Array  # Q^{-1} F
    FQiF: jax.Array  # F^T Q^{-1} F
    Qib: jax.Array  # (1 or T-1, K, d) Q^{-1} b
    FQib: jax.Array  # F^T Q^{-1} b
    dc: jax.Array  # (1 or T-1, K) -1/2 b^T Q^{-1} b - 1/2 log|Q| - d/2 log 2 pi
    poisson: object = None  # `_PoissonTerms` for Poisson emissions (the em_* terms are then zero)


class _PoissonTerms(NamedTuple):
    """Counts y_{t,i} ~ Poisson(exp(H_k x_t + d_k)_i); a leading axis of 1: the same every step."""

    H: jax.Array  # (1 or T, K, p, d)
    d: jax.Array  # (1 or T, K, p)
    y: jax.Array  # (T, p), 0 where missing
    obs: jax.Array  # (T, p) 1.0 observed, 0.0 missing
    c: jax.Array  # (T,) -sum_i log y_{t,i}! over the observed entries


def _tk(a, base_ndim, T):
    """(K, ...) or (K, T, ...) -> (1 or T-1, K, ...) for the transitions into steps 1..T-1."""
    if jnp.ndim(a) > base_ndim + 1:
        return jnp.swapaxes(a, 0, 1)[1:]
    return a[None]


def _logdet(L):
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)


def _poisson_terms(sysm, ys) -> _PoissonTerms:
    obs = ~jnp.isnan(ys)
    y = jnp.where(obs, ys, 0.0)
    c = -jnp.sum(jnp.where(obs, jax.scipy.special.gammaln(y + 1.0), 0.0), -1)
    return _PoissonTerms(_tk_all(sysm.emission_matrix, 2), _tk_all(sysm.emission_offset, 1), y,
                         obs.astype(ys.dtype), c)


def _tk_all(a, base_ndim):
    """(K, ...) or (K, T, ...) -> (1 or T, K, ...) for the emissions of steps 0..T-1."""
    return jnp.swapaxes(a, 0, 1) if jnp.ndim(a) > base_ndim + 1 else a[None]


def _poisson_newton_terms(pt: _PoissonTerms, gamma, x):
    """Value (up to the constant), gradient (T, d) and Hessian (T, d, d) blocks of
    sum_t sum_k gamma[t, k] log Poisson(y_t | exp(H_k x_t + d_k)) in x."""
    eta = jnp.einsum("tkpd,td->tkp", pt.H, x) + pt.d
    lam = jnp.exp(eta) * pt.obs[:, None, :]
    y = pt.y[:, None, :] * pt.obs[:, None, :]
    Hk = jnp.broadcast_to(pt.H, gamma.shape + pt.H.shape[2:])
    val = jnp.sum(gamma[:, :, None] * (y * eta - lam))
    grad = jnp.einsum("tk,tkpd,tkp->td", gamma, Hk, y - lam)
    hess = -jnp.einsum("tk,tkpi,tkp,tkpj->tij", gamma, Hk, lam, Hk)
    return val, grad, hess


def _poisson_potentials(pt: _PoissonTerms, m, P):
    """(T, K) E_q(x)[log Poisson(y_t | exp(H_k x_t + d_k))], exact for Gaussian q(x_t) = N(m_t, P_t)."""
    T, K = m.shape[0], pt.H.shape[1]
    Hk = jnp.broadcast_to(pt.H, (T, K) + pt.H.shape[2:])
    eta = jnp.einsum("tkpd,td->tkp", Hk, m) + pt.d
    var = jnp.einsum("tkpi,tij,tkpj->tkp", Hk, P, Hk)
    return jnp.sum(pt.obs[:, None, :] * (pt.y[:, None, :] * eta - jnp.exp(eta + 0.5 * var)), -1) + pt.c[:, None]


def _terms(params: SwitchingParams, ys, missing: bool, poisson: bool = False) -> _Terms:
    T, p = ys.shape
    sysm = params.systems
    d = sysm.initial_mean.shape[-1]
    H, dd, R = sysm.emission_matrix, sysm.emission_offset, sysm.emission_cov
    K = params.initial_probs.shape[0]
    if poisson:
        # the emission term is not quadratic: it enters the Newton steps and the potentials itself
        em_J = jnp.zeros((1, K, d, d), ys.dtype)
        em_h = jnp.zeros((T, K, d), ys.dtype)
        em_c = jnp.zeros((T, K), ys.dtype)
    elif not missing and H.ndim == 3 and R.ndim == 3:
        # fully observed, time-invariant H and R: one factorisation per mode
        L = jnp.linalg.cholesky(R)
        Li = jax.scipy.linalg.solve_triangular(L, jnp.broadcast_to(jnp.eye(p, dtype=R.dtype), R.shape), lower=True)
        A = Li @ H  # (K, p, d)
        em_J = jnp.einsum("kpi,kpj->kij", A, A)[None]
        off = jnp.swapaxes(dd, 0, 1) if dd.ndim == 3 else dd[None]
        e = jnp.einsum("kij,tkj->tki", Li, ys[:, None, :] - off)
        em_h = jnp.einsum("kpi,tkp->tki", A, e)
        em_c = -0.5 * jnp.sum(e * e, -1) - 0.5 * _logdet(L)[None] - 0.5 * p * _LOG_2PI
    else:
        masks = ~jnp.isnan(ys)

        def one(t):
            st = step_systems(sysm, t)
            obs = masks[t].astype(ys.dtype)
            yt = jnp.where(masks[t], ys[t], 0.0)

            def mode(Hk, dk, Rk):
                # missing entries dropped exactly: zero rows, unit variance, zero residual
                Hk = Hk * obs[:, None]
                Rk = Rk * obs[:, None] * obs[None, :] + jnp.diag(1.0 - obs)
                L = jnp.linalg.cholesky(Rk)
                Li = jax.scipy.linalg.solve_triangular(L, jnp.eye(p, dtype=Rk.dtype), lower=True)
                A = Li @ Hk
                e = Li @ ((yt - dk) * obs)
                return A.T @ A, A.T @ e, -0.5 * e @ e - 0.5 * _logdet(L) - 0.5 * jnp.sum(obs) * _LOG_2PI

            return jax.vmap(mode)(st.emission_matrix, st.emission_offset, st.emission_cov)

        em_J, em_h, em_c = jax.vmap(one)(jnp.arange(T))
    P0 = sysm.initial_cov
    L0 = jnp.linalg.cholesky(P0)
    P0i = jax.vmap(lambda L: jax.scipy.linalg.cho_solve((L, True), jnp.eye(d, dtype=L.dtype)))(L0)
    c0 = -0.5 * _logdet(L0) - 0.5 * d * _LOG_2PI
    F = _tk(sysm.transition_matrix, 2, T)
    b = _tk(sysm.transition_offset, 1, T)
    Q = _tk(sysm.transition_cov, 2, T)
    LQ = jnp.linalg.cholesky(Q)
    Qi = jax.scipy.linalg.cho_solve((LQ, True), jnp.broadcast_to(jnp.eye(d, dtype=Q.dtype), Q.shape))
    Qi = symmetrize(Qi)
    QiF = Qi @ F
    FQiF = symmetrize(jnp.swapaxes(F, -1, -2) @ QiF)
    Qib = (Qi @ b[..., None])[..., 0]
    FQib = (jnp.swapaxes(F, -1, -2) @ Qib[..., None])[..., 0]
    dc = -0.5 * jnp.sum(b * Qib, -1) - 0.5 * _logdet(LQ) - 0.5 * d * _LOG_2PI
    return _Terms(em_J, em_h, em_c, P0i, sysm.initial_mean, c0, Qi, QiF, FQiF, Qib, FQib, dc,
                  _poisson_terms(sysm, ys) if poisson else None)


def _wsum(g, X):
    """sum_k g[t, k] X[t or 0, k, ...] -> (T', ...)."""
    return jnp.sum(g.reshape(g.shape + (1,) * (X.ndim - 2)) * X, axis=1)


def _gauss_info(terms: _Terms, gamma):
    """Block-tridiagonal precision (D, O) and linear term h of E_q(z)[log p(x, y | z)] in x."""
    D = _wsum(gamma, terms.em_J)
    D = jnp.broadcast_to(D, gamma.shape[:1] + D.shape[1:])
    h = _wsum(gamma, terms.em_h)
    D = D.at[0].add(jnp.einsum("k,kij->ij", gamma[0], terms.P0i))
    h = h.at[0].add(jnp.einsum("k,kij,kj->i", gamma[0], terms.P0i, terms.mu0))
    g1 = gamma[1:]
    D = D.at[1:].add(_wsum(g1, terms.Qi)).at[:-1].add(_wsum(g1, terms.FQiF))
    O = -jnp.broadcast_to(_wsum(g1, terms.QiF), (g1.shape[0],) + D.shape[1:])
    h = h.at[1:].add(_wsum(g1, terms.Qib)).at[:-1].add(-_wsum(g1, terms.FQib))
    return D, O, h


def _potentials(terms: _Terms, m, P, Cx):
    """psi[t, k] = E_q(x)[log p(x_t | x_{t-1}, z_t = k) + log p(y_t | x_t, z_t = k)] (t = 0: the
    initial density), exact Gaussian expectations from the marginal and lag-one moments."""
    Sx = P + jnp.einsum("ti,tj->tij", m, m)
    em = terms.em_c + jnp.einsum("tki,ti->tk", terms.em_h, m) - 0.5 * jnp.sum(terms.em_J * Sx[:, None], (-2, -1))
    r0 = m[0][None] - terms.mu0
    first = terms.c0 - 0.5 * jnp.sum(terms.P0i * (P[0][None] + jnp.einsum("ki,kj->kij", r0, r0)), (-2, -1))
    Cp = Cx + jnp.einsum("ti,tj->tij", m[1:], m[:-1])  # E[x_t x_{t-1}^T], t = 1..T-1
    quad = (jnp.sum(terms.Qi * Sx[1:, None], (-2, -1)) - 2.0 * jnp.sum(terms.QiF * Cp[:, None], (-2, -1))
            + jnp.sum(terms.FQiF * Sx[:-1, None], (-2, -1)) - 2.0 * jnp.einsum("tki,ti->tk", terms.Qib, m[1:])
            + 2.0 * jnp.einsum("tki,ti->tk", terms.FQib, m[:-1]))
    dyn = terms.dc - 0.5 * quad
    if terms.poisson is not None:
        em = em + _poisson_potentials(terms.poisson, m, P)
    return em + jnp.concatenate([first[None], dyn])


# ----------------------------------------------------------------------------------------------
# The recurrence term and the two updates
# ----------------------------------------------------------------------------------------------
def _recurrence(model, inputs):
    """lt(x, t): (K, K) log p(z_t = j | z_{t-1} = i, x_{t-1} = x) of step t."""
    return lambda x, t: model.log_mode_transitions(x, t, C.row(inputs, t))


def _rec_newton_terms(lt, x, xi):
    """Value, gradient and Hessian of f_t(x_t) = sum_ij xi[t, i, j] lt(x_t, t + 1) for t = 0..T-2
    (zero at T-1)."""
    def f(x_t, t, xi_t):
        return jnp.sum(xi_t * lt(x_t, t + 1))

    ts = jnp.arange(x.shape[0] - 1)
    v, g = jax.vmap(jax.value_and_grad(f))(x[:-1], ts, xi)
    Hs = jax.vmap(jax.hessian(f))(x[:-1], ts, xi)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])
    return pad(v), pad(g), pad(Hs)


def _rec_value(lt, x, xi):
    ts = jnp.arange(x.shape[0] - 1)
    return jnp.sum(jax.vmap(lambda x_t, t, xi_t: jnp.sum(xi_t * lt(x_t, t + 1)))(x[:-1], ts, xi))


def _newton(terms, gamma, xi, x, lt, num_steps):
    """Laplace q(x) given q(z): mode by damped Newton, then covariances at the mode."""
    D, O, h = _gauss_info(terms, gamma)
    pt = terms.poisson
    quadratic = lt is None and pt is None

    def objective(x):
        val = jnp.sum(h * x) - 0.5 * jnp.sum(x * _btd_matvec(D, O, x))
        if lt is not None:
            val = val + _rec_value(lt, x, xi)
        if pt is not None:
            val = val + _poisson_newton_terms(pt, gamma, x)[0]
        return val

    def curvature(x):
        """Gradient and diagonal Hessian blocks of the non-quadratic terms (recurrence, Poisson)."""
        g, Hs = jnp.zeros_like(x), jnp.zeros(x.shape + x.shape[-1:], x.dtype)
        if lt is not None:
            _, fg, fH = _rec_newton_terms(lt, x, xi)
            g, Hs = g + fg, Hs + fH
        if pt is not None:
            _, pg, pH = _poisson_newton_terms(pt, gamma, x)
            g, Hs = g + pg, Hs + pH
        return g, Hs

    def step(x, _):
        grad = h - _btd_matvec(D, O, x)
        Dn = D
        if not quadratic:
            fg, fH = curvature(x)
            grad = grad + fg
            Dn = D - fH
        dx = _btd_solve(Dn, O, grad)
        if quadratic:
            return x + dx, None  # quadratic objective: the full step is exact
        return line_search(objective, x, dx), None

    x, _ = lax.scan(step, x, None, length=num_steps)
    Dn = D if quadratic else D - curvature(x)[1]
    covs, cross, logdet = _btd_covariances(Dn, O)
    return x, covs, cross, logdet


def _log_transitions(params, lt, m, P, T):
    """(T, K, K) expected log transition matrices (entry 0 unused): the model's chain, or for a
    recurrent model the delta method E[f(x)] ~ f(m) + 1/2 tr(Hess f(m) P) at q(x_{t-1})."""
    K = params.initial_probs.shape[0]
    if lt is None:
        A = params.transition_matrices
        A = A if A.ndim == 3 else jnp.broadcast_to(A, (T, K, K))
        return jnp.log(A)
    ts = jnp.arange(1, T)

    def one(x, Pt, t):
        Hs = jax.hessian(lt)(x, t)  # (K, K, d, d)
        return lt(x, t) + 0.5 * jnp.einsum("ijab,ab->ij", Hs, Pt)

    rows = jax.vmap(one)(m[:-1], P[:-1], ts)
    return jnp.concatenate([jnp.zeros((1, K, K), m.dtype), rows])


def _qz(params, logA, psi):
    """Forward-backward on potentials psi and per-step log transitions: marginals, per-step pairwise
    marginals, counts and log Z."""
    shift = jnp.max(logA, axis=(1, 2))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0).at[0].set(0.0)
    A = jnp.exp(logA - shift[:, None, None])
    fb = smoother_params_hmm(DiscreteParams(params.initial_probs, A, psi))
    alpha, gamma = fb.filtered_probs, fb.smoothed_probs
    pred = jnp.einsum("ti,tij->tj", alpha[:-1], A[1:])  # p(z_t | y_{0:t-1}) up to the step's scale
    ratio = gamma[1:] / jnp.where(pred > 0, pred, 1.0)
    xi = alpha[:-1, :, None] * A[1:] * ratio[:, None, :]
    return gamma, xi, fb.transition_counts, fb.log_likelihood + jnp.sum(shift)


def laplace_params(params: SwitchingParams, emissions, num_iters: int, *, model=None, inputs=None,
                   num_newton_steps: int = 3, initial_state=None, missing: bool = True,
                   emission_family: str = "gaussian") -> LaplaceResult:
    """`laplace` on the arrays of one sequence (traceable; ``num_iters``, ``num_newton_steps``,
    ``missing`` and ``emission_family`` static).

    Args:
        params: the model's `SwitchingParams` for this sequence.
        emissions: (T, p), NaN = missing.
        num_iters: sweeps.
        model: read only when ``model.is_recurrent`` (its `log_mode_transitions`); None: Markov.
        inputs: the model's (T, U) inputs, for its recurrence.
        num_newton_steps: Newton steps per q(x) update on a recurrent model (one is exact otherwise).
        initial_state: None, or ``(mode_probs (T, K), pairwise_mode_probs (T-1, K, K), means (T, d))``
            to start from (warm start); default uniform q(z), x = 0.
        missing: False promises no NaN in ``emissions`` (a cheaper emission term).
        emission_family: ``"gaussian"``, or ``"poisson"`` for counts with rates exp(H_k x + d_k)
            (``params``' emission covariances unused; Newton steps with line search).
    """
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    K = params.initial_probs.shape[0]
    d = params.systems.initial_mean.shape[-1]
    recurrent = model is not None and model.is_recurrent
    lt = _recurrence(model, inputs) if recurrent else None
    poisson = emission_family == "poisson"
    newton = int(num_newton_steps) if (recurrent or poisson) else 1
    terms = _terms(params, ys, missing, poisson)
    if initial_state is None:
        gamma0 = jnp.full((T, K), 1.0 / K, ys.dtype)
        xi0 = jnp.full((T - 1, K, K), 1.0 / K ** 2, ys.dtype)
        x0 = jnp.zeros((T, d), ys.dtype)
    else:
        gamma0, xi0, x0 = initial_state
    entropy_const = 0.5 * T * d * (1.0 + _LOG_2PI)

    def qx(gamma, xi, x):
        return _newton(terms, gamma, xi, x, lt, newton)

    def sweep(carry, _):
        gamma, xi, x, _, _, _ = carry
        m, P, Cx, logdet = qx(gamma, xi, x)
        psi = _potentials(terms, m, P, Cx)
        logA = _log_transitions(params, lt, m, P, T)
        gamma_new, xi_new, counts, log_z = _qz(params, logA, psi)
        return (gamma_new, xi_new, m, gamma, xi, (m, P, Cx)), (log_z + entropy_const - 0.5 * logdet, counts)

    # num_iters + 1 sweeps, the last one's q(z) update discarded: its q(x) is the Laplace step given
    # the final q(z), and the update is compiled once (not again after the loop)
    mom0 = (x0, jnp.zeros((T, d, d), ys.dtype), jnp.zeros((T - 1, d, d), ys.dtype))
    carry, (elbos, counts) = lax.scan(sweep, (gamma0, xi0, x0, gamma0, xi0, mom0), None, length=num_iters + 1)
    _, _, _, gamma, xi, (m, P, Cx) = carry
    return LaplaceResult(elbos[:-1], gamma, xi, counts[-2], m, P, Cx)


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("num_iters", "num_newton_steps", "missing", "batched", "inputs_batched"))
def _run(model, ys, inputs, lengths, *, num_iters, num_newton_steps, missing, batched, inputs_batched):
    def one(y, u, n):
        y = kalman.mask_padding(y, n)
        params = model.switching_params(y.shape[0], u)
        return laplace_params(params, y, num_iters, model=model, inputs=u, num_newton_steps=num_newton_steps,
                              missing=missing, emission_family=model.emission_family)

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


def _check_invertible(model, batch):
    """The Laplace step inverts Q_k and R_k: they must be positive definite (concrete values only)."""
    names = model.switching_param_names()
    u0 = batch.inputs
    if u0 is not None and batch.inputs_batched:
        u0 = jax.tree_util.tree_map(lambda a: a[0], u0)
    sysm = model.switching_params(batch.num_timesteps, u0).systems
    fields = (("transition_cov", sysm.transition_cov),) + (
        (("emission_cov", sysm.emission_cov),) if model.emission_family == "gaussian" else ())
    for field, a in fields:
        if checks.is_concrete(a):
            checks.psd(a, names.get(field, field), strict=True)


def laplace(model, emissions, num_iters: int = 20, *, inputs=None, lengths=None,
            num_newton_steps: int = 3) -> LaplaceResult:
    """Laplace posterior q(z) q(x) of a switching linear dynamical system, recurrent or not
    (Linderman et al. 2017; Zoltowski et al. 2020): q(z) by exact forward-backward on expected
    log-potentials, q(x) the Laplace approximation of exp E_q(z)[log p(x, y, z)] (Newton's method
    with block-tridiagonal solves, O(T d^3)). See the module doc for the updates and the loop.

    On a Markov (non-recurrent) model with Gaussian emissions it is structured mean-field VI and
    agrees with `structured_vi` sweep for sweep; with one mode q(x) is the Kalman smoother and the
    ELBO the exact log-likelihood. With Poisson emissions (``emission_family="poisson"``, spike
    counts with rates exp(C_k x + d_k)) the emission term enters the Newton steps and the
    potentials are its exact Gaussian expectations, so on a Markov chain the ELBO is still a
    lower bound on log p(y).

    Args:
        model: an `AbstractSwitchingSSM` (e.g. `ps.models.RecurrentSLDS` or `ps.models.SLDS`) with
            positive definite dynamics and (Gaussian emissions) emission covariances.
        emissions: (T, p), (B, T, p) or a list of (T_b, p); NaN = missing; non-negative integer
            counts for Poisson emissions.
        num_iters: sweeps (static int >= 1).
        inputs: (T, U) or (B, T, U) when the model reads inputs.
        lengths: (B,) true lengths of a padded batch (padding is missing).
        num_newton_steps: Newton steps per q(x) update on a recurrent model or with Poisson
            emissions (static int >= 1; warm started across sweeps).

    Returns:
        `LaplaceResult`: elbo (num_iters,), mode_probs (T, K), pairwise_mode_probs (T-1, K, K),
        transition_counts (K, K), means (T, d), covs (T, d, d), cross_covs (T-1, d, d).

    Raises:
        ValueError: naming the argument: the checks of `ps.switching.check_arguments` (model,
            emissions (T, p) / (B, T, p), inputs, lengths, parameters such as recurrence weights
            of the wrong shape), singular dynamics or emission covariances, ``num_iters`` or
            ``num_newton_steps`` not a positive int.

    Example:
        >>> r = ps.switching.laplace(rslds, y, 20)
        >>> r.mode_probs.argmax(-1)          # (T,) segmentation
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_newton_steps = checks.positive_int(num_newton_steps, "num_newton_steps")
    b = S.check_arguments(model, emissions, inputs, lengths, gaussian=False)
    checks.once_per_model(model, ("laplace", b.num_timesteps), lambda: _check_invertible(model, b))
    missing = b.lengths is not None or not checks.is_concrete(b.emissions) or bool(
        np.isnan(np.asarray(b.emissions)).any())
    return _run(model, b.emissions, b.inputs, b.lengths, num_iters=num_iters, num_newton_steps=num_newton_steps,
                missing=missing, batched=b.batched, inputs_batched=b.inputs_batched)
