"""Structured variational inference for graph-switching dynamical systems (``ps.switching``;
`ps.models.GRASS`, Liu et al., ICML 2023).

The posterior over modes z, edges e and states x of N objects is approximated by
q(z, e) prod_n q(x^n), fitted by coordinate ascent on the ELBO:

* q(x^n) given the mode marginals q(z_t^n): the structured-VI q(x) update of an SLDS (an exact
  Kalman smoother of the expected dynamics and emissions), one per object (vmapped): the
  dynamics are block diagonal across objects and the emissions per object, so q(x) factorises.
* q(z, e) given q(x), ``method="exact"``: exact forward-backward on the joint chain over
  s = (z^1..z^N, e^1..e^E) (S = K^N 2^E states) with the expected log-potentials
  psi_t(s) = sum_n psi_t^n(z^n), psi_t^n(k) = E_q(x^n)[log p(x_t^n | x_{t-1}^n, z_t^n = k)
  + log p(y_t^n | x_t^n, z_t^n = k)]. The transition factorises as
  p(s_t | s_{t-1}) = E_t[g', g] M[c', g, c] (edge configurations g, mode configurations c), so a
  step costs O(C G^2 + C^2 G) rather than O(S^2). ELBO = log Z_q(z, e) + sum_n H[q(x^n)].
* ``method="factorised"``: q(z, e) = prod_n q(z^n) prod_m q(e^m), each an exact chain, for larger
  N. The interaction term's log-normaliser is bounded by Jensen's inequality over the other
  objects and edges (z_{t-1}^n itself kept exact),

      E[log sum_k P[i, k] exp(sum_m e^{nm} W[z^m, k])] <= log sum_k P[i, k] prod_m phi_t^{nm}(k),
      phi_t^{nm}(k) = 1 - q(e_t^{nm}) + q(e_t^{nm}) sum_l q(z_{t-1}^m = l) exp W[l, k],

  so the ELBO stays a lower bound on log p(y). The bound is convex in each other chain's
  marginals, so each chain's update (forward-backward on the gradient of the objective, a
  tangent minoriser) raises the ELBO; chains are updated one after another.

With W = 0 both methods reduce to independent `ps.switching.structured_vi` runs per object
(the edges then decouple and contribute exactly zero). The loop::

    q(z_t^n) = 1/K
    for it in range(num_iters):
        q(x^n) = Kalman smoother of the expected system given q(z^n)   (every n)
        q(z, e) = forward-backward (exact) | one chain after another (factorised)
        elbo[it] = ...
    q(x^n) given the final q(z^n)                                      (the returned q(x))
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import logsumexp

from probssm.core import checks
from probssm.inference.switching.slds import expected_log_potentials, gaussian_chain_entropy, qx_given_modes
from probssm.models.grass import AbstractGraphSwitchingSSM, edge_pairs

__all__ = ["GRASSResult", "grass_structured_vi", "grass_structured_vi_params", "grass_transition_objective",
           "MAX_JOINT_STATES", "GRASS_METHODS"]

MAX_JOINT_STATES = 4096  # default limit on K^N 2^E for method="exact"
GRASS_METHODS = ("exact", "factorised")


class GRASSResult(NamedTuple):
    """Structured posterior q(z, e) prod_n q(x^n) (a leading B axis for a batch)."""

    elbo: jax.Array  # (num_iters,) ELBO after each sweep (non-decreasing)
    mode_probs: jax.Array  # (T, N, K) q(z_t^n = k)
    edge_probs: jax.Array  # (T, E) q(e_t^m = 1)
    means: jax.Array  # (T, N, d) E_q[x_t^n]
    covs: jax.Array  # (T, N, d, d) Cov_q[x_t^n]
    cross_covs: jax.Array  # (T - 1, N, d, d) Cov_q[x_{t+1}^n, x_t^n]
    mode_pair_probs: jax.Array  # (T - 1, N, K, K) q(z_t^n = i, z_{t+1}^n = k)
    edge_pair_probs: jax.Array  # (T - 1, E, 2, 2) q(e_t^m = j, e_{t+1}^m = i)
    joint_transition_counts: jax.Array  # (C, G, C) sum_t q(c_{t-1}, g_t, c_t) (exact; (0, 0, 0) factorised)


# ----------------------------------------------------------------------------------------------
# Configuration tables (numpy, static)
# ----------------------------------------------------------------------------------------------
def _tables(model):
    """One-hot tables of the mode configurations (C, N, K) and edge configurations (G, E, 2),
    the configurations themselves (C, N), (G, E) and the pairs (E, 2)."""
    modes, edges = model.joint_states()
    G = 2 ** model.num_edges
    cfg_z, cfg_e = modes[::G], edges[:G]
    oh_z = np.eye(model.num_modes)[cfg_z]
    oh_e = np.eye(2)[cfg_e]
    return oh_z, oh_e, cfg_z, cfg_e, edge_pairs(model.num_objects)


def _safe_dot(p, logv):
    """sum p * logv with 0 * (-inf) = 0."""
    return jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logv, 0.0), 0.0))


# ----------------------------------------------------------------------------------------------
# q(x) and the expected log-potentials, per object
# ----------------------------------------------------------------------------------------------
def _qx(params, ys, gamma):
    """Per-object q(x) given mode marginals gamma (T, N, K): means, covs, cross-covs, E[xx^T], E[x_{t+1}x_t^T]
    with an object axis after time."""
    out = jax.vmap(lambda y, g: qx_given_modes(params, y, g), in_axes=(1, 1))(ys, gamma)
    return tuple(jnp.moveaxis(a, 0, 1) for a in out)


def _psi(params, ys, m, Exx, Exx1):
    """(T, N, K) expected log-potentials of every object."""
    out = jax.vmap(lambda y, a, b, c: expected_log_potentials(params, y, a, b, c), in_axes=(1, 1, 1, 1))(
        ys, m, Exx, Exx1)
    return jnp.moveaxis(out, 0, 1)


# ----------------------------------------------------------------------------------------------
# Exact: forward-backward on the joint chain with the factorised transition
# ----------------------------------------------------------------------------------------------
def _joint_forward_backward(model, psi, log_edges, tables):
    """Scaled forward-backward on s = (c, g) with p(s_t | s_{t-1}) = E_t[g', g] M[c', g, c].

    The loops (b_t(c) = exp(sum_n psi_t^n(c_n) - max), v_t = alpha_{t-1} E_t)::

        alpha_0 ~ pi(c) rho(g) b_0(c)
        alpha_t(c, g) ~ b_t(c) sum_c' v_t(c', g) M[c', g, c]                 (normaliser n_t)
        beta_{t-1}(c', g') = sum_g E_t[g', g] sum_c M[c', g, c] b_t(c) beta_t(c, g) / n_t

    Returns log Z, marginals (T, C, G), joint counts (C, G, C), mode pairs (T-1, N, K, K) and edge
    pairs (T-1, E, 2, 2)."""
    oh_z, oh_e, cfg_z, cfg_e, _ = tables
    dtype = psi.dtype
    oh_z = jnp.asarray(oh_z, dtype)
    oh_e = jnp.asarray(oh_e, dtype)
    M = jnp.exp(model.mode_log_transitions())  # (C, G, C)
    ar = np.arange(cfg_e.shape[1])
    logE = jnp.sum(log_edges[:, ar[None, None, :], cfg_e[:, None, :], cfg_e[None, :, :]], axis=-1)  # (T, G, G)
    Et = jnp.exp(logE)
    lb = jnp.einsum("tnk,cnk->tc", psi, oh_z)  # (T, C) log b_t
    mx = jnp.max(lb, axis=1)
    b = jnp.exp(lb - mx[:, None])
    log_pi0 = jnp.sum(jnp.log(model.initial_probs)[cfg_z], axis=1)
    log_rho0 = jnp.sum(jnp.log(model.edge_initial_probs)[cfg_e], axis=1)
    a0 = jnp.exp(log_pi0)[:, None] * jnp.exp(log_rho0)[None] * b[0][:, None]
    n0 = jnp.sum(a0)
    alpha0 = a0 / n0

    def fwd(alpha, xs):
        E, bt = xs
        v = alpha @ E  # (C, G)
        a = jnp.einsum("ag,agc->cg", v, M) * bt[:, None]
        n = jnp.sum(a)
        return a / n, (a / n, n)

    _, (alphas, ns) = lax.scan(fwd, alpha0, (Et[1:], b[1:]))
    alphas = jnp.concatenate([alpha0[None], alphas])
    log_z = jnp.log(n0) + jnp.sum(jnp.log(ns)) + jnp.sum(mx)

    def bwd(carry, xs):
        beta, counts = carry
        E, bt, n, alpha_prev = xs
        w = bt[:, None] * beta / n  # (C, G)
        u = jnp.einsum("agc,cg->ag", M, w)  # (C', G)
        v = alpha_prev @ E  # (C', G)
        X = v[:, :, None] * M * w.T[None]  # (C', G, C) q(c_{t-1}, g_t, c_t)
        Y = jnp.sum(X, axis=1)
        pair_z = jnp.einsum("ac,anj,cnk->njk", Y, oh_z, oh_z)
        Xe = E * (alpha_prev.T @ u)  # (G', G) q(g_{t-1}, g_t)
        pair_e = jnp.einsum("ab,aej,bei->eji", Xe, oh_e, oh_e)
        return (u @ E.T, counts + X), (beta, pair_z, pair_e)

    C, G = M.shape[0], M.shape[1]
    beta_last = jnp.ones((C, G), dtype)
    (beta0, counts), (betas, pair_z, pair_e) = lax.scan(
        bwd, (beta_last, jnp.zeros_like(M)), (Et[1:], b[1:], ns, alphas[:-1]), reverse=True)
    betas = jnp.concatenate([beta0[None], betas])
    gamma = alphas * betas
    gamma = gamma / jnp.sum(gamma, axis=(1, 2), keepdims=True)
    return log_z, gamma, counts, pair_z, pair_e


def _exact_qz(model, psi, log_edges, tables):
    """q(z, e) by the joint forward-backward: log Z, mode (T, N, K) and edge (T, E) marginals, and
    the pairwise statistics."""
    oh_z, oh_e = tables[:2]
    log_z, gamma, counts, pair_z, pair_e = _joint_forward_backward(model, psi, log_edges, tables)
    mode_probs = jnp.einsum("tcg,cnk->tnk", gamma, jnp.asarray(oh_z, gamma.dtype))
    edge_probs = jnp.einsum("tcg,ge->te", gamma, jnp.asarray(oh_e[..., 1], gamma.dtype))
    return log_z, mode_probs, edge_probs, pair_z, pair_e, counts


# ----------------------------------------------------------------------------------------------
# Factorised: one chain per object and per edge
# ----------------------------------------------------------------------------------------------
def _chain(log_init, log_trans, unary):
    """Log-space forward-backward of one chain with unary (T, K) and pairwise (T - 1, K, K) log
    potentials: (log Z, marginals (T, K), pair marginals (T - 1, K, K))."""
    la0 = log_init + unary[0]

    def fwd(la, xs):
        lA, u = xs
        la_new = logsumexp(la[:, None] + lA, axis=0) + u
        return la_new, la_new

    _, las = lax.scan(fwd, la0, (log_trans, unary[1:]))
    la = jnp.concatenate([la0[None], las])
    log_z = logsumexp(la[-1])

    def bwd(lb, xs):
        lA, u = xs
        lb_prev = logsumexp(lA + (u + lb)[None, :], axis=1)
        return lb_prev, lb_prev

    zero = jnp.zeros_like(la0)
    _, lbs = lax.scan(bwd, zero, (log_trans, unary[1:]), reverse=True)
    lb = jnp.concatenate([lbs, zero[None]])
    marg = jnp.exp(la + lb - log_z)
    pair = jnp.exp(la[:-1, :, None] + log_trans + (unary[1:] + lb[1:])[:, None, :] - log_z)
    return log_z, marg, pair


def _chain_entropy(log_z, log_init, log_trans, unary, marg, pair):
    """H[q] = log Z - E_q[sum of the log potentials]."""
    return log_z - _safe_dot(marg[0], log_init) - _safe_dot(marg, unary) - _safe_dot(pair, log_trans)


def _adjacency(qe, pairs, N):
    """(T, N, N) symmetric edge probabilities (zero diagonal) from (T, E)."""
    A = jnp.zeros(qe.shape[:1] + (N, N), qe.dtype)
    return A.at[:, pairs[:, 0], pairs[:, 1]].set(qe).at[:, pairs[:, 1], pairs[:, 0]].set(qe)


def _interaction_bound(model, qz, qe, pairs):
    """The part of the factorised objective that couples the chains (t >= 1):

        sum_{t, n} [ sum_m q(e_t^{nm}) q(z_{t-1}^m)^T W q(z_t^n)
                     - sum_i q(z_{t-1}^n = i) log sum_k P[i, k] prod_m phi_t^{nm}(k) ]
    """
    N = qz.shape[1]
    W = model.interaction_weights
    P = model.transition_matrix
    Adj = _adjacency(qe[1:], pairs, N)  # (T-1, N, N)
    lin = jnp.einsum("tnm,tml,lk,tnk->", Adj, qz[:-1], W, qz[1:])
    expW = jnp.einsum("tml,lk->tmk", qz[:-1], jnp.exp(W))  # sum_l q(z^m = l) exp W[l, k]
    phi = 1.0 - Adj[..., None] + Adj[..., None] * expW[:, None, :, :]  # (T-1, n, m, k)
    log_prod = jnp.sum(jnp.log(phi), axis=2)  # (T-1, n, k)
    L = logsumexp(log_prod[:, :, None, :], b=P[None, None], axis=-1)  # (T-1, n, i)
    return lin - jnp.sum(qz[:-1] * L)


def _factorised_qz(model, psi, log_edges, state, pairs):
    """One sweep over the object chains, then the edge chains. Returns the new state and the ELBO's
    discrete part (expected log-prior and entropies)."""
    qz, xiz, qe, xie = state
    N, K = qz.shape[1], qz.shape[2]
    T = qz.shape[0]
    log_pi = jnp.log(model.initial_probs)
    logP = jnp.broadcast_to(jnp.log(model.transition_matrix), (T - 1, K, K))
    grad_z = jax.grad(_interaction_bound, argnums=1)

    # one chain after another (Gauss-Seidel: each update sees the others' latest marginals); a scan
    # over the chain index keeps the compiled graph one chain update long
    def object_step(carry, n):
        qz, xiz, ent = carry
        unary = psi[:, n] + grad_z(model, qz, qe, pairs)[:, n]
        log_z, marg, pair = _chain(log_pi, logP, unary)
        ent = ent + _chain_entropy(log_z, log_pi, logP, unary, marg, pair)
        return (qz.at[:, n].set(marg), xiz.at[:, n].set(pair), ent), None

    zero = jnp.zeros((), psi.dtype)
    (qz, xiz, ent_z), _ = lax.scan(object_step, (qz, xiz, zero), jnp.arange(N))
    log_rho = jnp.log(model.edge_initial_probs)
    grad_e = jax.grad(_interaction_bound, argnums=2)

    def edge_step(carry, m):
        qe, xie, ent = carry
        g = grad_e(model, qz, qe, pairs)[:, m]
        unary = jnp.stack([jnp.zeros_like(g), g], axis=-1)
        log_z, marg, pair = _chain(log_rho, log_edges[1:, m], unary)
        ent = ent + _chain_entropy(log_z, log_rho, log_edges[1:, m], unary, marg, pair)
        return (qe.at[:, m].set(marg[:, 1]), xie.at[:, m].set(pair), ent), None

    ent_e = zero
    if qe.shape[1]:  # (one object: no edges)
        (qe, xie, ent_e), _ = lax.scan(edge_step, (qe, xie, zero), jnp.arange(qe.shape[1]))
    value = (_safe_dot(qz[0], log_pi[None]) + jnp.sum(qz * psi) + _safe_dot(xiz, logP[:, None])
             + _interaction_bound(model, qz, qe, pairs) + _edge_terms(model, qe, xie, log_edges)
             + ent_z + ent_e)
    return (qz, xiz, qe, xie), value


def _edge_terms(model, qe, xie, log_edges):
    """sum_m E_q[log p(e^m_0) + sum_t log p(e_t^m | e_{t-1}^m, u_t^m)]."""
    q0 = jnp.stack([1.0 - qe[0], qe[0]], axis=-1)  # (E, 2)
    return _safe_dot(q0, jnp.log(model.edge_initial_probs)[None]) + _safe_dot(xie, log_edges[1:])


def _prior_edges(model, log_edges, T):
    """Marginals and pair marginals of the edge chains under the prior (the factorised start)."""
    log_rho = jnp.log(model.edge_initial_probs)
    zero = jnp.zeros((T, 2), log_edges.dtype)
    _, marg, pair = jax.vmap(lambda le: _chain(log_rho, le, zero), in_axes=1)(log_edges[1:])
    return jnp.moveaxis(marg[..., 1], 0, 1), jnp.moveaxis(pair, 0, 1)


# ----------------------------------------------------------------------------------------------
# The sweeps
# ----------------------------------------------------------------------------------------------
def grass_structured_vi_params(model, emissions, num_iters: int, *, edge_inputs=None, method: str = "exact",
                               initial_mode_probs=None, initial_edge_probs=None) -> GRASSResult:
    """`grass_structured_vi` on one sequence (T, N, p) (traceable; ``num_iters`` and ``method``
    static; no argument checks). ``initial_mode_probs`` (T, N, K) starts q(z) (default uniform);
    ``initial_edge_probs`` (T, E) starts the factorised q(e) (default: the prior's marginals), so
    that a warm start (EM) continues the coordinate ascent."""
    ys = jnp.asarray(emissions)
    T, N = ys.shape[0], ys.shape[1]
    K = model.num_modes
    dtype = jnp.result_type(ys.dtype, model.dynamics_matrices.dtype)
    ys = ys.astype(dtype)
    params = model.switching_params(T)
    log_edges = model.edge_log_transitions(T, edge_inputs)  # (T, E, 2, 2)
    pairs = edge_pairs(N)
    gamma0 = jnp.full((T, N, K), 1.0 / K, dtype) if initial_mode_probs is None else jnp.asarray(
        initial_mode_probs, dtype)

    def qx_terms(gamma):
        m, P, Cx, Exx, Exx1 = _qx(params, ys, gamma)
        h = jnp.sum(jax.vmap(gaussian_chain_entropy, in_axes=(1, 1))(P, Cx))
        return m, P, Cx, Exx, Exx1, h

    E = model.num_edges
    Tm1 = T - 1
    if method == "exact":
        tables = _tables(model)  # the K^N 2^E configurations: exact only
        C, G = K ** N, 2 ** E
        state0 = (gamma0, jnp.zeros((T, E), dtype), jnp.zeros((Tm1, N, K, K), dtype),
                  jnp.zeros((Tm1, E, 2, 2), dtype), jnp.zeros((C, G, C), dtype))

        def update(state, psi):
            log_z, mode_probs, edge_probs, pair_z, pair_e, counts = _exact_qz(model, psi, log_edges, tables)
            return (mode_probs, edge_probs, pair_z, pair_e, counts), log_z
    else:
        qe0, xie0 = _prior_edges(model, log_edges, T)
        if initial_edge_probs is not None:
            qe0 = jnp.asarray(initial_edge_probs, dtype).reshape(T, E)
        state0 = (gamma0, jnp.einsum("tnj,tnk->tnjk", gamma0[:-1], gamma0[1:]), qe0, xie0)

        def update(state, psi):
            return _factorised_qz(model, psi, log_edges, state, pairs)

    # num_iters + 1 passes: the last computes only the returned q(x) (its q(z, e) update is
    # discarded), so the q(x) update is compiled once
    def sweep(carry, i):
        state, _ = carry
        m, P, Cx, Exx, Exx1, h = qx_terms(state[0])
        new, value = update(state, _psi(params, ys, m, Exx, Exx1))
        keep = i < num_iters
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, state)
        return (state, (m, P, Cx)), value + h

    d = model.state_dim
    qx0 = (jnp.zeros((T, N, d), dtype), jnp.zeros((T, N, d, d), dtype), jnp.zeros((Tm1, N, d, d), dtype))
    (state, (m, P, Cx)), elbos = lax.scan(sweep, (state0, qx0), jnp.arange(num_iters + 1))
    elbos = elbos[:num_iters]
    if method == "exact":
        gamma, edge_probs, pair_z, pair_e, counts = state
    else:
        gamma, pair_z, edge_probs, pair_e = state
        counts = jnp.zeros((0, 0, 0), dtype)
    return GRASSResult(elbos, gamma, edge_probs.reshape(T, E), m, P, Cx, pair_z, pair_e, counts)


def grass_transition_objective(model, result: GRASSResult, *, edge_inputs=None, method: str = "exact"):
    """The discrete part of the expected complete-data log-likelihood under a fixed q (one sequence):
    E_q[log p(z_0) + log p(e_0) + sum_t log p(e_t | e_{t-1}, u_t) + log p(z_t | z_{t-1}, e_t)], with the
    interaction normaliser bounded as in the factorised ELBO for ``method="factorised"``. A function
    of the model's discrete parameters (pi, P, W, edge law) to maximise in EM's M-step. Traceable."""
    T = result.mode_probs.shape[0]
    log_edges = model.edge_log_transitions(T, edge_inputs)
    qz, qe = result.mode_probs, result.edge_probs
    value = _safe_dot(qz[0], jnp.log(model.initial_probs)[None]) + _edge_terms(model, qe, result.edge_pair_probs,
                                                                                 log_edges)
    if method == "exact":
        return value + _safe_dot(result.joint_transition_counts, model.mode_log_transitions())
    pairs = edge_pairs(model.num_objects)
    return (value + _safe_dot(result.mode_pair_probs, jnp.log(model.transition_matrix)[None, None])
            + _interaction_bound(model, qz, qe, pairs))


# ----------------------------------------------------------------------------------------------
# Checks and the public function
# ----------------------------------------------------------------------------------------------
def check_model(model, method: str = "exact", max_joint_states: int = MAX_JOINT_STATES) -> None:
    """The model and method checks of `grass_structured_vi` (outside jit).

    Raises:
        ValueError: naming ``model`` (not a graph-switching model, or too many joint states for
            ``method="exact"``), ``method``, or the model field outside its support.
    """
    if not isinstance(model, AbstractGraphSwitchingSSM):
        raise ValueError(f"model: expected a graph-switching model (ps.models.GRASS), got {type(model).__name__}")
    if method not in GRASS_METHODS:
        raise ValueError(f"method: expected one of {GRASS_METHODS}, got {method!r}")
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())
    S = model.num_joint_states
    if method == "exact" and S > max_joint_states:
        raise ValueError(f"model: method='exact' runs a chain over K^N 2^E = {model.num_modes}^{model.num_objects} "
                         f"2^{model.num_edges} = {S} joint states, above max_joint_states = {max_joint_states}; "
                         "use method='factorised' (or raise max_joint_states)")


def check_data(model, emissions, edge_inputs=None):
    """Emissions (T, N, p) or (B, T, N, p) and edge inputs (T, E) or (B, T, E) (outside jit).
    Returns (emissions, edge_inputs, batched).

    Raises:
        ValueError: naming ``emissions`` or ``edge_inputs``, with the expected shape.
    """
    N, p, E = model.num_objects, model.emission_dim, model.num_edges
    y = jnp.asarray(emissions)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim not in (3, 4) or y.shape[-2:] != (N, p) or y.shape[-3] < 2:
        raise ValueError(f"emissions: expected shape (T, {N}, {p}) or (B, T, {N}, {p}) with T >= 2, "
                         f"got shape {tuple(y.shape)}")
    if checks.is_concrete(y) and bool(np.isinf(np.asarray(y)).any()):
        raise ValueError("emissions: found inf; use NaN to mark missing values")
    batched = y.ndim == 4
    T = y.shape[-3]
    if edge_inputs is None:
        return y, None, batched
    u = jnp.asarray(edge_inputs)
    ok = u.shape == (T, E) or (batched and u.shape == (y.shape[0], T, E))
    if not ok:
        want = f"({T}, {E})" + (f" or ({y.shape[0]}, {T}, {E})" if batched else "")
        raise ValueError(f"edge_inputs: expected shape {want} (one column per pair of objects), "
                         f"got shape {tuple(u.shape)}")
    checks.finite(u, "edge_inputs")
    return y, u, batched


@partial(jax.jit, static_argnames=("num_iters", "method", "batched"))
def _run(model, ys, u, *, num_iters, method, batched):
    one = lambda y, e: grass_structured_vi_params(model, y, num_iters, edge_inputs=e, method=method)
    if not batched:
        return one(ys, u)
    return jax.vmap(one, in_axes=(0, None if u is None or u.ndim == 2 else 0))(ys, u)


def grass_structured_vi(model, emissions, num_iters: int = 20, *, edge_inputs=None, method: str = "exact",
                        max_joint_states: int = MAX_JOINT_STATES) -> GRASSResult:
    """Structured variational inference for a graph-switching system: q(z, e) prod_n q(x^n) by
    coordinate ascent (see the module doc for both methods and the loop).

    Args:
        model: an `AbstractGraphSwitchingSSM` (e.g. `ps.models.GRASS`).
        emissions: (T, N, p) or (B, T, N, p); NaN = missing.
        num_iters: sweeps (static int >= 1).
        edge_inputs: None or (T, E) (or (B, T, E)) exogenous inputs of the edges' switch-on logits,
            columns in the order of `ps.models.edge_pairs`.
        method: ``"exact"`` (forward-backward on the K^N 2^E joint states) or ``"factorised"``
            (one chain per object and per edge; larger N).
        max_joint_states: ``"exact"`` refuses models above this many joint states (default 4096).

    Returns:
        `GRASSResult`: elbo (num_iters,), mode_probs (T, N, K), edge_probs (T, E), means (T, N, d),
        covs (T, N, d, d) and the pairwise statistics EM reads. Most likely modes: argmax of
        ``mode_probs`` over its last axis.

    Raises:
        ValueError: naming the argument: a model that is not graph-switching or has parameters
            outside their support, too many joint states for ``method="exact"`` (``model``), an
            unknown ``method``, emissions or edge inputs of the wrong shape.

    Example:
        >>> r = ps.switching.grass_structured_vi(grass, y, 20, edge_inputs=dist)   # y (T, N, p)
        >>> r.mode_probs.argmax(-1)                                                  # (T, N)
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    max_joint_states = checks.positive_int(max_joint_states, "max_joint_states")
    check_model(model, method, max_joint_states)
    ys, u, batched = check_data(model, emissions, edge_inputs)
    return _run(model, ys, u, num_iters=num_iters, method=method, batched=batched)
