"""Inference for switching linear dynamical systems (``ps.switching``): exact path enumeration,
IMM and GPB2 Gaussian-mixture filters, the Rao-Blackwellised particle filter, most likely modes.

Every engine reads the switching structure (`ps.core.AbstractSwitchingSSM.switching_params`:
mode chain pi, A_t and one linear-Gaussian system per mode) and runs `ps.kalman`'s public
kernels (`predict`, `update`, `smoother_params`) per mode, per path or per particle. The
conventions: z_t selects the dynamics producing x_t from x_{t-1} and the emission of y_t;
x_0 | z_0 = k ~ N(m_k, P_k).

* `exact` enumerates all K^T mode paths with a Kalman filter per path (tiny problems):
  log p(y) = logsumexp_paths [log p(z_{0:T-1}) + log p(y | z_{0:T-1})].
* `imm` (interacting multiple model; Blom & Bar-Shalom 1988) and `gpb2` (generalised
  pseudo-Bayes of order 2) keep one Gaussian per mode; their log-likelihoods are
  approximations (measured errors in their docstrings).
* `rbpf` samples mode paths from the exact one-step predictive (the locally optimal proposal)
  with an exact Kalman filter per particle; exp(log-likelihood) is unbiased.
* `conditional_rbpf`: one particle-Gibbs sweep (the RBPF conditioned on a reference mode path,
  with ancestor sampling); it leaves p(z | y) invariant (`ps.learn.slds_particle_em` iterates it).
* `most_likely_modes`: Viterbi on GPB2's (or IMM's) mode potentials, or the exact MAP path.

With one mode every engine is the Kalman filter (same kernels). NaN observations are missing
and dropped exactly (partly missing rows keep their observed entries); a padded batch with
``lengths`` treats the padding as missing. Data: (T, p), (B, T, p) or a list of (T_b, p).
"""
from __future__ import annotations

import itertools
import math
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import logsumexp

from probssm.core import batching, checks
from probssm.core.batching import Batch
from probssm.core.linalg import psd_solve
from probssm.core.protocol import LinearGaussianParams
from probssm.core.switching import AbstractSwitchingSSM, SwitchingParams, check_switching_params, path_system, \
    step_systems
from probssm.inference import kalman
from probssm.inference.forward_backward import smoother_params as smoother_params_hmm, viterbi_params
from probssm.core.protocol import DiscreteParams
from probssm.inference.smc import common as C
from probssm.inference.smc.resampling import resample as _resample

__all__ = ["ExactResult", "MixtureFilterResult", "RBPFResult", "exact", "exact_log_likelihood", "exact_params",
           "imm", "imm_params", "gpb2", "gpb2_params", "rbpf", "rbpf_params", "most_likely_modes",
           "ConditionalRBPFResult", "conditional_rbpf", "conditional_rbpf_params",
           "StructuredVIResult", "structured_vi", "structured_vi_params", "check_arguments", "MAX_PATHS"]

MAX_PATHS = 4096  # default limit on K^T for `exact`


class ExactResult(NamedTuple):
    """Exact posterior by path enumeration (a leading B axis for a batch)."""

    log_likelihood: jax.Array  # ()
    filtered_mode_probs: jax.Array  # (T, K) p(z_t | y_{0:t})
    smoothed_mode_probs: jax.Array  # (T, K) p(z_t | y_{0:T-1})
    filtered_means: jax.Array  # (T, d) E[x_t | y_{0:t}]
    smoothed_means: jax.Array  # (T, d) E[x_t | y_{0:T-1}]
    smoothed_covs: jax.Array  # (T, d, d) Cov[x_t | y_{0:T-1}]
    most_likely_modes: jax.Array  # (T,) argmax_z p(z_{0:T-1} | y)


class MixtureFilterResult(NamedTuple):
    """IMM / GPB2 filter output (a leading B axis for a batch)."""

    log_likelihood: jax.Array  # () approximate log p(y)
    filtered_mode_probs: jax.Array  # (T, K) approximate p(z_t | y_{0:t})
    filtered_means: jax.Array  # (T, d) moment-matched mixture mean of x_t | y_{0:t}
    filtered_covs: jax.Array  # (T, d, d)
    mode_means: jax.Array  # (T, K, d) E[x_t | z_t = k, y_{0:t}]
    mode_covs: jax.Array  # (T, K, d, d)
    mode_log_likelihoods: jax.Array  # (T, K, K) log p(y_t | z_{t-1} = i, z_t = j, y_{0:t-1}) (GPB2; IMM: same for every i)


class RBPFResult(NamedTuple):
    """Rao-Blackwellised particle filter and ancestor-tracing smoother (a leading B axis for a batch)."""

    log_likelihood: jax.Array  # () log of an unbiased estimate of p(y)
    filtered_mode_probs: jax.Array  # (T, K) Rao-Blackwellised estimate of p(z_t | y_{0:t})
    filtered_means: jax.Array  # (T, d) sum_i W_t^i E[x_t | z^i_{0:t}, y_{0:t}]
    smoothed_mode_probs: jax.Array  # (T, K) from the traced mode paths, weighted by W_{T-1}
    smoothed_means: jax.Array  # (T, d) sum_i W^i E[x_t | traced path i, y] (a Kalman smoother per path)
    modes: jax.Array  # (T, N) int z_t^i
    mode_paths: jax.Array  # (N, T) int traced ancestral mode paths of the final particles
    log_weights: jax.Array  # (T, N) normalised log W_t^i
    ancestors: jax.Array  # (T, N) int32 parent of particle i at t - 1 (row 0: 0..N-1)
    ess: jax.Array  # (T,)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
def _steps(params: SwitchingParams, T: int):
    """The (T, K, K) mode transition matrices of steps 0..T-1 (entry 0 unused)."""
    A = params.transition_matrices
    A = A if A.ndim == 3 else jnp.broadcast_to(A, (T,) + A.shape)
    return A


def _update_modes(m, P, sys: LinearGaussianParams, y, mask):
    """Update N(m, P) (one moment pair, or (K, ...) one per mode) with every mode's emission."""
    return jax.vmap(kalman.update, in_axes=(0 if m.ndim == 2 else None, 0 if P.ndim == 3 else None,
                                            0, 0, 0, None, None))(
        m, P, sys.emission_matrix, sys.emission_offset, sys.emission_cov, y, mask)


def _predict_update(m, P, sys: LinearGaussianParams, k, y, mask):
    """Predict N(m, P) with mode k's dynamics and update with its emission."""
    mp, Pp = kalman.predict(m, P, sys.transition_matrix[k], sys.transition_offset[k], sys.transition_cov[k])
    return kalman.update(mp, Pp, sys.emission_matrix[k], sys.emission_offset[k], sys.emission_cov[k], y, mask)


def _all_modes(m, P, sys: LinearGaussianParams, y, mask):
    """From one N(m, P): predict + update with each of the K modes -> (K, d), (K, d, d), (K,)."""
    K = sys.transition_matrix.shape[0]
    return jax.vmap(lambda k: _predict_update(m, P, sys, k, y, mask))(jnp.arange(K))


def _collapse(w, ms, Ps):
    """Moment-match the mixture sum_i w_i N(ms_i, Ps_i) (w normalised) -> (m, P)."""
    m = jnp.einsum("i,id->d", w, ms)
    dm = ms - m
    P = jnp.einsum("i,ide->de", w, Ps + jnp.einsum("id,ie->ide", dm, dm))
    return m, 0.5 * (P + P.T)


def _safe_softmax(logw, axis=-1):
    """softmax with an all -inf slice giving uniform weights (never NaN)."""
    mx = jnp.max(logw, axis=axis, keepdims=True)
    ok = jnp.isfinite(mx)
    w = jnp.exp(logw - jnp.where(ok, mx, 0.0))
    w = jnp.where(ok, w, 1.0)
    return w / jnp.sum(w, axis=axis, keepdims=True)


def _log_transitions(model, params, t, A_t, means, u_t, recurrent):
    """(K, K) log transition matrix of step t; for a recurrent model row i is evaluated at means[i]."""
    if not recurrent:
        return jnp.log(A_t)
    rows = jax.vmap(lambda i, x: model.log_mode_transitions(x, t, u_t)[i])(jnp.arange(means.shape[0]), means)
    return rows


# ----------------------------------------------------------------------------------------------
# Exact: enumeration of the K^T mode paths
# ----------------------------------------------------------------------------------------------
def _path_smoother(sysp: LinearGaussianParams, ys, masks):
    """Kalman filter and RTS smoother of one path's time-varying system, with `ps.kalman`'s
    predict / update kernels: per-step log-likelihoods (T,), filtered means (T, d), smoothed
    means (T, d) and covariances (T, d, d)."""
    p0 = kalman.params_at(sysp, 0)
    m, P, l0 = kalman.update(p0.initial_mean, p0.initial_cov, p0.emission_matrix, p0.emission_offset,
                             p0.emission_cov, ys[0], masks[0])

    def forward(carry, t):
        m, P = carry
        p = kalman.params_at(sysp, t)
        mp, Pp = kalman.predict(m, P, p.transition_matrix, p.transition_offset, p.transition_cov)
        m_new, P_new, lt = kalman.update(mp, Pp, p.emission_matrix, p.emission_offset, p.emission_cov, ys[t],
                                         masks[t])
        return (m_new, P_new), (m_new, P_new, mp, Pp, lt)

    _, (ms, Ps, mps, Pps, ls) = lax.scan(forward, (m, P), jnp.arange(1, ys.shape[0]))
    ms_all = jnp.concatenate([m[None], ms])
    Ps_all = jnp.concatenate([P[None], Ps])

    def backward(carry, xs):
        ms_next, Ps_next = carry
        mf, Pf, mp, Pp, t = xs
        F = kalman.params_at(sysp, t).transition_matrix
        G = psd_solve(Pp, F @ Pf).T  # Pf F^T Pp^{-1}
        m_s = mf + G @ (ms_next - mp)
        P_s = Pf + G @ (Ps_next - Pp) @ G.T
        P_s = 0.5 * (P_s + P_s.T)
        return (m_s, P_s), (m_s, P_s)

    xs = (ms_all[:-1], Ps_all[:-1], mps, Pps, jnp.arange(1, ys.shape[0]))
    _, (sm, sP) = lax.scan(backward, (ms_all[-1], Ps_all[-1]), xs, reverse=True)
    sm = jnp.concatenate([sm, ms_all[-1:]])
    sP = jnp.concatenate([sP, Ps_all[-1:]])
    return jnp.concatenate([l0[None], ls]), ms_all, sm, sP


def exact_params(params: SwitchingParams, emissions, *, max_paths: int = MAX_PATHS) -> ExactResult:
    """`exact` on the arrays of one sequence (traceable; ``max_paths`` static). Markov mode chain only."""
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    K = params.initial_probs.shape[0]
    if K ** T > max_paths:
        raise ValueError(f"emissions: exact enumeration visits K^T = {K}^{T} = {K ** T} mode paths, above "
                         f"max_paths = {max_paths}; use imm, gpb2 or rbpf (or raise max_paths)")
    masks = ~jnp.isnan(ys)
    paths = jnp.asarray(np.array(list(itertools.product(range(K), repeat=T)), dtype=np.int32).reshape(-1, T))
    A = _steps(params, T)
    logA = jnp.log(A)
    log_pi = jnp.log(params.initial_probs)

    def one(path):
        sysp = path_system(params.systems, path)
        lls, fms, sms, sPs = _path_smoother(sysp, ys, masks)
        prior = log_pi[path[0]] + jnp.sum(logA[jnp.arange(1, T), path[:-1], path[1:]])
        return prior, lls, fms, sms, sPs

    prior, lls, fms, sms, sPs = jax.vmap(one)(paths)
    joint = prior + jnp.sum(lls, axis=1)  # (P,) log p(z, y)
    ll = logsumexp(joint)
    w = jnp.exp(joint - ll)
    onehot = jax.nn.one_hot(paths, K, dtype=w.dtype)  # (P, T, K)
    smoothed_probs = jnp.einsum("p,ptk->tk", w, onehot)
    # p(z_{0:T-1}, y_{0:t}): the suffix of the prior sums out, so weighting full paths by
    # prior * prefix likelihood gives p(z_t, y_{0:t}) after summing over paths.
    prefix = prior[:, None] + jnp.cumsum(lls, axis=1)  # (P, T)
    wt = jnp.exp(prefix - logsumexp(prefix, axis=0, keepdims=True))
    filtered_probs = jnp.einsum("pt,ptk->tk", wt, onehot)
    filtered_means = jnp.einsum("pt,ptd->td", wt, fms)
    smoothed_means = jnp.einsum("p,ptd->td", w, sms)
    dm = sms - smoothed_means[None]
    smoothed_covs = jnp.einsum("p,ptde->tde", w, sPs + jnp.einsum("ptd,pte->ptde", dm, dm))
    return ExactResult(ll, filtered_probs, smoothed_probs, filtered_means, smoothed_means, smoothed_covs,
                       paths[jnp.argmax(joint)])


# ----------------------------------------------------------------------------------------------
# IMM and GPB2
# ----------------------------------------------------------------------------------------------
def _mixture_filter(params: SwitchingParams, emissions, kind: str, model=None, inputs=None):
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    masks = ~jnp.isnan(ys)
    K = params.initial_probs.shape[0]
    A = _steps(params, T)
    recurrent = model is not None and model.is_recurrent
    sys0 = step_systems(params.systems, 0)
    m0, P0, l0 = _update_modes(sys0.initial_mean, sys0.initial_cov, sys0, ys[0], masks[0])
    logc = jnp.log(params.initial_probs) + l0
    ll0 = logsumexp(logc)
    mu0 = _safe_softmax(logc)
    pair0 = jnp.broadcast_to(l0[None, :], (K, K))

    def step(carry, t):
        m, P, mu = carry
        sys = step_systems(params.systems, t)
        u_t = None if inputs is None else C.row(inputs, t)
        logA = _log_transitions(model, params, t, A[t], m, u_t, recurrent)
        logj = jnp.log(mu)[:, None] + logA  # (i, j) log p(z_{t-1} = i, z_t = j | y_{:t-1})
        if kind == "imm":
            # mix the K posteriors into one prior per next mode, then one predict + update per mode
            mix = _safe_softmax(logj, axis=0)  # (i, j) p(z_{t-1} = i | z_t = j, y_{:t-1})
            mm, PP = jax.vmap(lambda w: _collapse(w, m, P), in_axes=1)(mix)
            mn, Pn, lj = jax.vmap(lambda k, a, b: _predict_update(a, b, sys, k, ys[t], masks[t]))(
                jnp.arange(K), mm, PP)
            pair = jnp.broadcast_to(lj[None, :], (K, K))
            lw = logsumexp(logj, axis=0) + lj
            ll_t = logsumexp(lw)
            mu_new = _safe_softmax(lw)
        else:
            # every (previous, current) pair: K^2 Kalman steps, then merge over the previous mode
            mij, Pij, lij = jax.vmap(lambda a, b: _all_modes(a, b, sys, ys[t], masks[t]))(m, P)  # (i, j, ...)
            pair = lij
            lw = logj + lij
            ll_t = logsumexp(lw)
            mu_new = _safe_softmax(logsumexp(lw, axis=0))
            back = _safe_softmax(lw, axis=0)  # (i, j) p(z_{t-1} = i | z_t = j, y_{:t})
            mn, Pn = jax.vmap(lambda w, a, b: _collapse(w, a, b), in_axes=(1, 1, 1))(back, mij, Pij)
        return (mn, Pn, mu_new), (ll_t, mu_new, mn, Pn, pair)

    _, (lls, mus, ms, Ps, pairs) = lax.scan(step, (m0, P0, mu0), jnp.arange(1, T))
    mus = jnp.concatenate([mu0[None], mus])
    ms = jnp.concatenate([m0[None], ms])
    Ps = jnp.concatenate([P0[None], Ps])
    pairs = jnp.concatenate([pair0[None], pairs])
    fm, fP = jax.vmap(_collapse)(mus, ms, Ps)
    return MixtureFilterResult(ll0 + jnp.sum(lls), mus, fm, fP, ms, Ps, pairs)


def imm_params(params: SwitchingParams, emissions, *, model=None, inputs=None) -> MixtureFilterResult:
    """`imm` on the arrays of one sequence (traceable). ``model`` (and its ``inputs`` rows) is read
    only for a recurrent model's `log_mode_transitions`."""
    return _mixture_filter(params, emissions, "imm", model, inputs)


def gpb2_params(params: SwitchingParams, emissions, *, model=None, inputs=None) -> MixtureFilterResult:
    """`gpb2` on the arrays of one sequence (traceable); ``model`` as in `imm_params`."""
    return _mixture_filter(params, emissions, "gpb2", model, inputs)


# ----------------------------------------------------------------------------------------------
# Rao-Blackwellised particle filter
# ----------------------------------------------------------------------------------------------
def _categorical(key, logits):
    """One draw per row of (N, K) logits (rows of -inf only: mode 0)."""
    return jax.random.categorical(key, jnp.where(jnp.isfinite(jnp.max(logits, -1, keepdims=True)), logits, 0.0))


def rbpf_params(key, params: SwitchingParams, emissions, num_particles: int, *, resampling: str = "systematic",
                ess_threshold: float = 0.5) -> RBPFResult:
    """`rbpf` on the arrays of one sequence (traceable; ``num_particles``, ``resampling`` and
    ``ess_threshold`` static). Markov mode chain only."""
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    N = int(num_particles)
    masks = ~jnp.isnan(ys)
    A = _steps(params, T)
    logA = jnp.log(A)
    key0, key_scan = jax.random.split(key)
    sys0 = step_systems(params.systems, 0)
    m0, P0, l0 = _update_modes(sys0.initial_mean, sys0.initial_cov, sys0, ys[0], masks[0])
    la0 = jnp.log(params.initial_probs) + l0
    ll0 = logsumexp(la0)
    q0 = _safe_softmax(la0)
    z0 = _categorical(key0, jnp.broadcast_to(la0, (N, la0.shape[0])))
    lw0 = jnp.full((N,), -math.log(N), ys.dtype)
    carry0 = (z0, m0[z0], P0[z0], lw0, ll0)

    def step(carry, xs):
        z, m, P, lw, ll = carry
        t, k = xs
        k_res, k_z = jax.random.split(k)
        sys = step_systems(params.systems, t)
        # every particle, every next mode: the exact one-step predictive p(y_t | z_t = j, z^i_{0:t-1}, y_{:t-1})
        mij, Pij, lij = jax.vmap(lambda a, b: _all_modes(a, b, sys, ys[t], masks[t]))(m, P)
        la = logA[t][z] + lij  # (N, K) log p(z_t = j, y_t | particle i)
        lv = logsumexp(la, axis=1)  # the weight of the locally optimal proposal (fully adapted)
        lV = lw + lv
        lse = logsumexp(lV)
        ll = ll + lse
        lV = lV - lse
        W = jnp.exp(lV)
        probs = jnp.einsum("i,ij->j", W, _safe_softmax(la))  # Rao-Blackwellised p(z_t | y_{:t})
        ess = 1.0 / jnp.sum(W * W)
        do = ess < ess_threshold * N
        a = lax.cond(do, lambda: _resample(k_res, lV, resampling), lambda: jnp.arange(N, dtype=jnp.int32))
        lw_new = jnp.where(do, jnp.full((N,), -math.log(N), ys.dtype), lV)
        z_new = _categorical(k_z, la[a])
        m_new = mij[a, z_new]
        P_new = Pij[a, z_new]
        ess_new = 1.0 / jnp.sum(jnp.exp(2 * lw_new))
        out = (z_new, a, lw_new, ess_new, probs, jnp.einsum("i,id->d", jnp.exp(lw_new), m_new))
        return (z_new, m_new, P_new, lw_new, ll), out

    keys = jax.random.split(key_scan, T - 1)
    (zT, _, _, lwT, ll), (zs, anc, lws, esss, probs, fmeans) = lax.scan(step, carry0, (jnp.arange(1, T), keys))
    modes = jnp.concatenate([z0[None], zs])
    ancestors = jnp.concatenate([jnp.arange(N, dtype=jnp.int32)[None], anc])
    log_weights = jnp.concatenate([lw0[None], lws])
    ess = jnp.concatenate([jnp.asarray([float(N)], ys.dtype), esss])
    filtered_probs = jnp.concatenate([q0[None], probs])
    filtered_means = jnp.concatenate([jnp.einsum("i,id->d", jnp.exp(lw0), m0[z0])[None], fmeans])

    # ancestor tracing: the mode path of each final particle
    def back(idx, xs):
        z_t, a_t = xs
        return a_t[idx], z_t[idx]

    _, traced = lax.scan(back, jnp.arange(N, dtype=jnp.int32), (modes, ancestors), reverse=True)
    mode_paths = traced.T  # (N, T)
    WT = jnp.exp(lwT)
    smoothed_probs = jnp.einsum("i,itk->tk", WT, jax.nn.one_hot(mode_paths, A.shape[-1], dtype=WT.dtype))
    sm = jax.vmap(lambda path: _path_smoother(path_system(params.systems, path), ys, masks)[2])(mode_paths)
    smoothed_means = jnp.einsum("i,itd->td", WT, sm)
    return RBPFResult(ll, filtered_probs, filtered_means, smoothed_probs, smoothed_means, modes, mode_paths,
                      log_weights, ancestors, ess)


# ----------------------------------------------------------------------------------------------
# Conditional RBPF with ancestor sampling (the particle-Gibbs kernel on mode paths)
# ----------------------------------------------------------------------------------------------
class ConditionalRBPFResult(NamedTuple):
    """One conditional-RBPF sweep (a leading B axis for a batch)."""

    reference: jax.Array  # (T,) int the new mode path: one traced path, drawn uniformly
    mode_paths: jax.Array  # (N, T) int every final particle's traced mode path (slot 0 ends on the old reference)
    log_likelihood: jax.Array  # () the conditional filter's log normalising-constant estimate (biased: a diagnostic)


def _masked_information(H, d, R, y, mask):
    """H^T R^-1 H and H^T R^-1 (y - d) of the observed entries of y (missing ones carry nothing)."""
    obs = mask.astype(y.dtype)
    H = H * obs[:, None]
    R = R * obs[:, None] * obs[None, :] + jnp.diag(1.0 - obs)
    r = jnp.where(mask, y - d, 0.0)
    Rinv_H = psd_solve(R, H)
    return H.T @ Rinv_H, Rinv_H.T @ r


def _backward_information(sysp: LinearGaussianParams, ys, masks):
    """Along one mode path's system: (Omega_t, lambda_t), t = 1..T-1, with
    p(y_{t:T-1} | x_{t-1}, path) proportional to exp(-x^T Omega_t x / 2 + x^T lambda_t) (the
    constant does not depend on x_{t-1}). Row T-1 of the output is t = T-1; row 0 is unused.

    With J_t = Omega_{t+1} + H_t^T R_t^-1 H_t, h_t = lambda_{t+1} + H_t^T R_t^-1 (y_t - d_t) (the
    information of y_{t:} about x_t) and x_t = F x_{t-1} + b + N(0, Q):
    Omega_t = F^T J (I + Q J)^-1 F and lambda_t = F^T (I + J Q)^-1 (h - J b).
    """
    T, d = ys.shape[0], sysp.initial_mean.shape[-1]
    eye = jnp.eye(d, dtype=ys.dtype)

    def step(carry, t):
        Om, lam = carry
        p = kalman.params_at(sysp, t)
        J0, h0 = _masked_information(p.emission_matrix, p.emission_offset, p.emission_cov, ys[t], masks[t])
        J, h = Om + J0, lam + h0
        M = eye + p.transition_cov @ J  # I + Q J
        F = p.transition_matrix
        Om_new = F.T @ jnp.linalg.solve(M.T, J).T @ F  # F^T J (I + Q J)^-1 F
        lam_new = F.T @ jnp.linalg.solve(M.T, h - J @ p.transition_offset)
        Om_new = 0.5 * (Om_new + Om_new.T)
        return (Om_new, lam_new), (Om_new, lam_new)

    zeros = (jnp.zeros((d, d), ys.dtype), jnp.zeros((d,), ys.dtype))
    _, (Oms, lams) = lax.scan(step, zeros, jnp.arange(1, T), reverse=True)
    return jnp.concatenate([Oms[:1], Oms]), jnp.concatenate([lams[:1], lams])


def _log_gauss_information(m, P, Om, lam):
    """log of the integral of N(x; m, P) exp(-x^T Om x / 2 + x^T lam) dx."""
    G = jnp.eye(m.shape[-1], dtype=m.dtype) + P @ Om  # I + P Om (eigenvalues >= 1)
    sol = jnp.linalg.solve(G, jnp.stack([m, P @ lam], axis=1))
    v, w = sol[:, 0], sol[:, 1]
    _, logdet = jnp.linalg.slogdet(G)
    return -0.5 * logdet - 0.5 * m @ (Om @ v) + v @ lam + 0.5 * lam @ w


def conditional_rbpf_params(key, params: SwitchingParams, emissions, reference, num_particles: int, *,
                            ancestor_sampling: bool = True) -> ConditionalRBPFResult:
    """`conditional_rbpf` on the arrays of one sequence (traceable; ``num_particles`` and
    ``ancestor_sampling`` static). Markov mode chain only."""
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    N = int(num_particles)
    ref = jnp.asarray(reference, jnp.int32)
    masks = ~jnp.isnan(ys)
    logA = jnp.log(_steps(params, T))
    key0, key_scan, key_pick = jax.random.split(key, 3)
    if ancestor_sampling:
        Oms, lams = _backward_information(path_system(params.systems, ref), ys, masks)
    else:
        Oms = lams = jnp.zeros((T,), ys.dtype)  # unused
    sys0 = step_systems(params.systems, 0)
    m0, P0, l0 = _update_modes(sys0.initial_mean, sys0.initial_cov, sys0, ys[0], masks[0])
    la0 = jnp.log(params.initial_probs) + l0
    z0 = _categorical(key0, jnp.broadcast_to(la0, (N, la0.shape[0]))).at[0].set(ref[0])
    carry0 = (z0, m0[z0], P0[z0])

    def step(carry, xs):
        z, m, P = carry
        t, k, Om, lam = xs
        k_anc, k_z, k_as = jax.random.split(k, 3)
        sys = step_systems(params.systems, t)
        mij, Pij, lij = jax.vmap(lambda a, b: _all_modes(a, b, sys, ys[t], masks[t]))(m, P)
        la = logA[t][z] + lij  # (N, K) log p(z_t = j, y_t | particle i); the weights at t-1 are equal
        lv = logsumexp(la, axis=1)
        ll_t = logsumexp(lv) - math.log(N)
        a = _categorical(k_anc, jnp.broadcast_to(lv, (N, N)))
        z_new = _categorical(k_z, la[a])
        if ancestor_sampling:
            # p(z'_t | z^i_{t-1}) p(y_{t:} | z^i_{0:t-1}, z'_{t:}, y_{:t-1}), up to a constant in i
            las = logA[t][z, ref[t]] + jax.vmap(lambda mi, Pi: _log_gauss_information(mi, Pi, Om, lam))(m, P)
            a0 = _categorical(k_as, las[None])[0]
        else:
            a0 = jnp.asarray(0, a.dtype)
        a = a.at[0].set(a0)
        z_new = z_new.at[0].set(ref[t])
        return (z_new, mij[a, z_new], Pij[a, z_new]), (z_new, a.astype(jnp.int32), ll_t)

    xs = (jnp.arange(1, T), jax.random.split(key_scan, T - 1), Oms[1:], lams[1:])
    _, (zs, anc, lls) = lax.scan(step, carry0, xs)
    ll = logsumexp(la0) + jnp.sum(lls)  # summed at the end: a float32 running total would lose digits
    modes = jnp.concatenate([z0[None], zs])
    ancestors = jnp.concatenate([jnp.arange(N, dtype=jnp.int32)[None], anc])

    def back(idx, xs):
        z_t, a_t = xs
        return a_t[idx], z_t[idx]

    _, traced = lax.scan(back, jnp.arange(N, dtype=jnp.int32), (modes, ancestors), reverse=True)
    mode_paths = traced.T
    # fully adapted: the final weights are equal, so the new reference is a uniform pick
    new_ref = mode_paths[jax.random.randint(key_pick, (), 0, N)]
    return ConditionalRBPFResult(new_ref, mode_paths, ll)


# ----------------------------------------------------------------------------------------------
# Structured variational inference q(z) q(x)
# ----------------------------------------------------------------------------------------------
class StructuredVIResult(NamedTuple):
    """Structured mean-field posterior q(z) q(x) (a leading B axis for a batch)."""

    elbo: jax.Array  # (num_iters,) ELBO after each coordinate-ascent sweep (non-decreasing)
    mode_probs: jax.Array  # (T, K) q(z_t = k)
    transition_counts: jax.Array  # (K, K) sum_t q(z_{t-1} = i, z_t = j)
    means: jax.Array  # (T, d) E_q[x_t]
    covs: jax.Array  # (T, d, d) Cov_q[x_t]
    cross_covs: jax.Array  # (T - 1, d, d) Cov_q[x_{t+1}, x_t]


def _masked_emission(H, d, R, y, mask):
    """Missing entries dropped exactly: zero rows of H and d, unit variance, zero residual."""
    obs = mask.astype(y.dtype)
    H = H * obs[:, None]
    d = d * obs
    R = R * obs[:, None] * obs[None, :] + jnp.diag(1.0 - obs)
    return H, d, R, jnp.where(mask, y, 0.0), jnp.sum(obs)


def _expected_gauss(E_rr, R, n):
    """E[log N(r; 0, R)] from E[r r^T] (n: the dimension that counts for log 2 pi)."""
    L = jnp.linalg.cholesky(R)
    Li = jax.scipy.linalg.solve_triangular(L, jnp.eye(R.shape[-1], dtype=R.dtype), lower=True)
    return -0.5 * jnp.trace(Li.T @ Li @ E_rr) - jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * n * _LOG_2PI


_LOG_2PI = math.log(2 * math.pi)


def _log_potentials(params: SwitchingParams, ys, masks, Ex, Exx, Exx1):
    """psi[t, k] = E_q(x)[log p(x_t | x_{t-1}, z_t = k) + log p(y_t | x_t, z_t = k)] (t = 0: the initial
    density of x_0 instead of the dynamics), from E[x_t], E[x_t x_t^T], E[x_{t+1} x_t^T]."""
    T = ys.shape[0]
    d = Ex.shape[-1]

    def emission(t):
        sys = step_systems(params.systems, t)

        def one(H, dd, R):
            H, dd, R, y, n = _masked_emission(H, dd, R, ys[t], masks[t])
            r0 = y - dd
            Hm = H @ Ex[t]
            E_rr = jnp.outer(r0, r0) - jnp.outer(Hm, r0) - jnp.outer(r0, Hm) + H @ Exx[t] @ H.T
            return _expected_gauss(E_rr, R, n)

        return jax.vmap(one)(sys.emission_matrix, sys.emission_offset, sys.emission_cov)

    def dynamics(t):  # t >= 1
        sys = step_systems(params.systems, t)

        def one(F, b, Q):
            mt, mp = Ex[t], Ex[t - 1]
            C = Exx1[t - 1]  # E[x_t x_{t-1}^T]
            E_ee = (Exx[t] - C @ F.T - F @ C.T + F @ Exx[t - 1] @ F.T - jnp.outer(mt - F @ mp, b)
                    - jnp.outer(b, mt - F @ mp) + jnp.outer(b, b))
            return _expected_gauss(E_ee, Q, d)

        return jax.vmap(one)(sys.transition_matrix, sys.transition_offset, sys.transition_cov)

    sys0 = step_systems(params.systems, 0)

    def initial(m, P):
        E_ee = Exx[0] - jnp.outer(Ex[0], m) - jnp.outer(m, Ex[0]) + jnp.outer(m, m)
        return _expected_gauss(E_ee, P, d)

    em = jax.vmap(emission)(jnp.arange(T))
    dyn = jax.vmap(dynamics)(jnp.arange(1, T))
    first = jax.vmap(initial)(sys0.initial_mean, sys0.initial_cov)
    return em + jnp.concatenate([first[None], dyn])


def _whiten(cov):
    """L^{-1} for cov = L L^T."""
    L = jnp.linalg.cholesky(cov)
    return jax.scipy.linalg.solve_triangular(L, jnp.eye(cov.shape[-1], dtype=cov.dtype), lower=True)


def _qx_system(params: SwitchingParams, ys, masks, gamma):
    """The linear-Gaussian system whose exact posterior is the optimal q(x) given q(z) (marginals gamma (T, K)).

    Expected dynamics: Q~^{-1} = sum_k g_k Q_k^{-1}, F~ = Q~ sum_k g_k Q_k^{-1} F_k, b~ likewise; the part of
    sum_k g_k |x_t - F_k x_{t-1} - b_k|^2_{Q_k} that N(x_t; F~ x_{t-1} + b~, Q~) misses is exactly
    sum_k g_k |(F_k - F~) x_{t-1} + b_k - b~|^2_{Q_k} (the cross term vanishes by the choice of F~, b~):
    K whitened pseudo-observations of x_{t-1}. The expected emissions are K whitened copies of y_t
    (rows sqrt(g_k) L_{R_k}^{-1} H_k, unit noise); a zero g_k gives zero, uninformative rows.
    Returns (LinearGaussianParams with a time axis, pseudo-observations (T, K (p + d))).
    """
    T = ys.shape[0]

    g = jnp.clip(gamma, 0.0, 1.0)
    sg = jnp.sqrt(g)
    sys0 = step_systems(params.systems, 0)
    P0i = jax.vmap(jnp.linalg.inv)(sys0.initial_cov)
    J0 = jnp.einsum("k,kij->ij", g[0], P0i)
    P0 = jnp.linalg.inv(J0)
    P0 = 0.5 * (P0 + P0.T)
    m0 = P0 @ jnp.einsum("k,kij,kj->i", g[0], P0i, sys0.initial_mean)

    def dyn(t):
        sys = step_systems(params.systems, t)
        Qi = jax.vmap(jnp.linalg.inv)(sys.transition_cov)
        J = jnp.einsum("k,kij->ij", g[t], Qi)
        Qt = jnp.linalg.inv(J)
        Qt = 0.5 * (Qt + Qt.T)
        Ft = Qt @ jnp.einsum("k,kij,kjl->il", g[t], Qi, sys.transition_matrix)
        bt = Qt @ jnp.einsum("k,kij,kj->i", g[t], Qi, sys.transition_offset)
        W = jax.vmap(_whiten)(sys.transition_cov)  # (K, d, d)
        Hc = sg[t][:, None, None] * jnp.einsum("kij,kjl->kil", W, sys.transition_matrix - Ft[None])
        yc = -sg[t][:, None] * jnp.einsum("kij,kj->ki", W, sys.transition_offset - bt[None])
        return Ft, bt, Qt, Hc.reshape(-1, Hc.shape[-1]), yc.reshape(-1)

    def emis(t):
        sys = step_systems(params.systems, t)

        def one(H, dd, R, s):
            H, dd, R, y, _ = _masked_emission(H, dd, R, ys[t], masks[t])
            W = _whiten(R)
            return s * W @ H, s * W @ (y - dd)

        He, ye = jax.vmap(one)(sys.emission_matrix, sys.emission_offset, sys.emission_cov, sg[t])
        return He.reshape(-1, He.shape[-1]), ye.reshape(-1)

    Ft, bt, Qt, Hc, yc = jax.vmap(dyn)(jnp.arange(1, T))
    He, ye = jax.vmap(emis)(jnp.arange(T))
    d = P0.shape[0]
    # the correction of transition t acts on x_{t-1}: it joins step t-1's pseudo-observations
    Hc = jnp.concatenate([Hc, jnp.zeros((1,) + Hc.shape[1:], Hc.dtype)])
    yc = jnp.concatenate([yc, jnp.zeros((1,) + yc.shape[1:], yc.dtype)])
    H = jnp.concatenate([He, Hc], axis=1)
    y = jnp.concatenate([ye, yc], axis=1)
    eye = jnp.eye(d, dtype=P0.dtype)
    F = jnp.concatenate([eye[None], Ft])
    b = jnp.concatenate([jnp.zeros((1, d), P0.dtype), bt])
    Q = jnp.concatenate([eye[None], Qt])
    n = H.shape[1]
    sysx = LinearGaussianParams(m0, P0, F, b, Q, H, jnp.zeros((T, n), P0.dtype), jnp.eye(n, dtype=P0.dtype))
    return sysx, y


def _gauss_entropy(cov):
    L = jnp.linalg.cholesky(cov)
    return jnp.sum(jnp.log(jnp.diagonal(L))) + 0.5 * cov.shape[-1] * (1.0 + _LOG_2PI)


def _chain_entropy(covs, cross):
    """Entropy of a Gaussian Markov chain from its marginal and lag-one covariances:
    H(x_{T-1}) + sum_t [H(x_t, x_{t+1}) - H(x_{t+1})]."""
    pair = jnp.concatenate([jnp.concatenate([covs[:-1], jnp.swapaxes(cross, 1, 2)], axis=2),
                            jnp.concatenate([cross, covs[1:]], axis=2)], axis=1)
    return _gauss_entropy(covs[-1]) + jnp.sum(jax.vmap(_gauss_entropy)(pair) - jax.vmap(_gauss_entropy)(covs[1:]))


def structured_vi_params(params: SwitchingParams, emissions, num_iters: int, *, initial_mode_probs=None):
    """`structured_vi` on the arrays of one sequence (traceable; ``num_iters`` static)."""
    ys = jnp.asarray(emissions)
    T = ys.shape[0]
    K = params.initial_probs.shape[0]
    masks = ~jnp.isnan(ys)
    A = params.transition_matrices
    gamma0 = jnp.full((T, K), 1.0 / K, ys.dtype) if initial_mode_probs is None else initial_mode_probs

    def qx(gamma):
        sysx, yx = _qx_system(params, ys, masks, gamma)
        sm = kalman.smoother_params(sysx, yx, diffuse=False)
        m, P, C = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
        Exx = P + jnp.einsum("ti,tj->tij", m, m)
        Exx1 = C + jnp.einsum("ti,tj->tij", m[1:], m[:-1])
        return m, P, C, Exx, Exx1

    def sweep(gamma, _):
        m, P, C, Exx, Exx1 = qx(gamma)
        psi = _log_potentials(params, ys, masks, m, Exx, Exx1)
        fb = smoother_params_hmm(DiscreteParams(params.initial_probs, A, psi))
        elbo = fb.log_likelihood + _chain_entropy(P, C)
        return fb.smoothed_probs, (elbo, fb.transition_counts)

    gamma, (elbos, counts) = lax.scan(sweep, gamma0, None, length=num_iters)
    m, P, C, _, _ = qx(gamma)
    return StructuredVIResult(elbos, gamma, counts[-1], m, P, C)


# Engine helpers shared with the graph-switching engine (`ps.switching.grass_structured_vi`):
# public so that no private name crosses modules, not exported in ``__all__``.
def qx_given_modes(params: SwitchingParams, emissions, mode_probs):
    """The optimal q(x) given mode marginals q(z_t = k) (T, K) (the structured-VI q(x) update):
    (means (T, d), covs (T, d, d), cross_covs (T - 1, d, d), E[x x^T] (T, d, d), E[x_{t+1} x_t^T]
    (T - 1, d, d)). Traceable; NaN emissions are missing."""
    ys = jnp.asarray(emissions)
    sysx, yx = _qx_system(params, ys, ~jnp.isnan(ys), mode_probs)
    sm = kalman.smoother_params(sysx, yx, diffuse=False)
    m, P, C = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
    return m, P, C, P + jnp.einsum("ti,tj->tij", m, m), C + jnp.einsum("ti,tj->tij", m[1:], m[:-1])


def expected_log_potentials(params: SwitchingParams, emissions, means, second_moments, cross_moments):
    """psi[t, k] = E_q(x)[log p(x_t | x_{t-1}, z_t = k) + log p(y_t | x_t, z_t = k)] (T, K) from E[x_t],
    E[x_t x_t^T], E[x_{t+1} x_t^T]. Traceable."""
    ys = jnp.asarray(emissions)
    return _log_potentials(params, ys, ~jnp.isnan(ys), means, second_moments, cross_moments)


def gaussian_chain_entropy(covs, cross_covs):
    """Entropy of a Gaussian Markov chain from its marginal (T, d, d) and lag-one (T - 1, d, d)
    covariances. Traceable."""
    return _chain_entropy(covs, cross_covs)


# ----------------------------------------------------------------------------------------------
# Checks and the jitted model-level runs
# ----------------------------------------------------------------------------------------------
def check_arguments(model, emissions, inputs=None, lengths=None, *, markov: bool = False,
                    gaussian: bool = True) -> Batch:
    """Validate a switching model and its data once, outside jit; return them as a `Batch`.

    Raises:
        ValueError: naming the argument: a model that is not an `AbstractSwitchingSSM` (or, with
            ``markov``, a recurrent one; with ``gaussian``, one with Poisson emissions), parameters
            outside their support (non-stochastic transitions, non-PSD covariances, recurrence
            weights of the wrong shape), emissions not (T, p) / (B, T, p) / a list, inf in
            emissions (negative or non-integer counts for Poisson emissions), inputs of the wrong shape.
    """
    if not isinstance(model, AbstractSwitchingSSM):
        raise ValueError(f"model: expected a switching model (ps.core.AbstractSwitchingSSM, e.g. ps.models.SLDS), "
                         f"got {type(model).__name__}")
    if markov and model.is_recurrent:
        raise ValueError(f"model: this engine needs a Markov mode chain; a {type(model).__name__}'s mode transitions "
                         "depend on x_{t-1} (use imm / gpb2, or ps.smc.particle_filter on its protocol)")
    if gaussian and model.emission_family != "gaussian":
        raise ValueError(f"model: this engine needs Gaussian emissions; the model has {model.emission_family} "
                         "emissions (use ps.switching.laplace, and ps.learn.em for Laplace-EM)")
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())
    p = model.emission_dim
    batch = batching.as_batch(emissions, inputs, lengths)
    if batch.emissions.shape[-1] != p:
        raise ValueError(f"emissions: expected shape (T, {p}) or (B, T, {p}), got shape {tuple(batch.emissions.shape)}")
    if checks.is_concrete(batch.emissions) and np.isinf(np.asarray(batch.emissions)).any():
        raise ValueError("emissions: found inf; use NaN to mark missing values")
    if model.emission_family == "poisson" and checks.is_concrete(batch.emissions):
        y = np.asarray(batch.emissions, float)
        y = y[~np.isnan(y)]
        if (y < 0).any() or (y != np.round(y)).any():
            raise ValueError("emissions: Poisson emissions are counts; expected non-negative integers (NaN = missing)")
    U = model.input_dim
    if U and batch.inputs is None:
        raise ValueError(f"inputs: the model has input matrices, expected shape ({batch.num_timesteps}, {U}), got None")
    if batch.inputs is not None and U == 0:
        raise ValueError("inputs: the model reads no inputs (input_dim = 0), expected None")
    batching.check_input_dim(batch, U)
    if batch.inputs is not None:
        for leaf in jax.tree_util.tree_leaves(batch.inputs):
            checks.finite(leaf, "inputs")
    u0 = batch.inputs if not batch.inputs_batched else jax.tree_util.tree_map(lambda a: a[0], batch.inputs)
    checks.once_per_model(model, ("switching", batch.num_timesteps), lambda: check_switching_params(
        _switching_params(model, batch.num_timesteps, u0), model.num_modes, model.state_dim, p,
        model.switching_param_names()))
    return batch


@eqx.filter_jit
def _switching_params(model, num_timesteps, inputs):
    return model.switching_params(num_timesteps, inputs)


@partial(jax.jit, static_argnames=("kind", "batched", "inputs_batched", "options"))
def _run(model, ys, inputs, lengths, key, *, kind, batched, inputs_batched, options):
    opts = dict(options)

    def one(y, u, n, k):
        y = kalman.mask_padding(y, n)
        params = model.switching_params(y.shape[0], u)
        if kind == "exact":
            return exact_params(params, y, **opts)
        if kind == "imm":
            return imm_params(params, y, model=model, inputs=u)
        if kind == "gpb2":
            return gpb2_params(params, y, model=model, inputs=u)
        if kind == "rbpf":
            return rbpf_params(k, params, y, **opts)
        if kind == "conditional_rbpf":
            k, ref = k
            return conditional_rbpf_params(k, params, y, ref, **opts)
        if kind == "structured_vi":
            return structured_vi_params(params, y, **opts)
        raise AssertionError(kind)

    batch = Batch(ys, inputs, lengths, batched, inputs_batched)
    if kind == "rbpf":
        keys = jax.random.split(key, ys.shape[0]) if batched else key
        return batch.map(one, keys, extra_axes=(0 if batched else None,))
    if kind == "conditional_rbpf":
        key, reference = key
        keys = jax.random.split(key, ys.shape[0]) if batched else key
        return batch.map(one, (keys, reference), extra_axes=(0 if batched else None,))
    return batch.map(one, None)


def _call(kind, model, emissions, inputs, lengths, key=None, markov=False, **options):
    b = check_arguments(model, emissions, inputs, lengths, markov=markov)
    return _run(model, b.emissions, b.inputs, b.lengths, key, kind=kind, batched=b.batched,
                inputs_batched=b.inputs_batched, options=tuple(sorted(options.items())))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def exact(model, emissions, *, inputs=None, lengths=None, max_paths: int = MAX_PATHS) -> ExactResult:
    """Exact posterior of a switching model by enumerating all K^T mode paths, a Kalman filter
    and smoother per path (tiny problems; the oracle of the other engines).

    log p(y) = logsumexp over z_{0:T-1} of [log pi_{z_0} + sum_t log A_t[z_{t-1}, z_t]
    + log p(y | z_{0:T-1})], each last term one Kalman filter.

    Args:
        model: an `AbstractSwitchingSSM` with a Markov mode chain (e.g. `ps.models.SLDS`).
        emissions: (T, p), (B, T, p) or a list of (T_b, p); NaN = missing.
        inputs: (T, U) or (B, T, U) when the model reads inputs.
        lengths: (B,) true lengths of a padded batch (padding is missing: exact).
        max_paths: refuse K^T above this (default 4096): ValueError naming ``emissions``.

    Returns:
        `ExactResult`: log_likelihood, filtered / smoothed mode probabilities (T, K), filtered
        and smoothed means of x (T, d), smoothed covariances (T, d, d) and the MAP mode path (T,).
    """
    max_paths = checks.positive_int(max_paths, "max_paths")
    return _call("exact", model, emissions, inputs, lengths, markov=True, max_paths=max_paths)


def exact_log_likelihood(model, emissions, *, inputs=None, lengths=None, max_paths: int = MAX_PATHS) -> jax.Array:
    """log p(y) by path enumeration (see `exact`), summed over a batch."""
    r = exact(model, emissions, inputs=inputs, lengths=lengths, max_paths=max_paths)
    return jnp.sum(r.log_likelihood)


def imm(model, emissions, *, inputs=None, lengths=None) -> MixtureFilterResult:
    """Interacting multiple model filter (Blom & Bar-Shalom 1988): one Gaussian per mode, mixed
    before each prediction. K Kalman steps per time step.

    The loop the scan runs (mu_t(k) ~ p(z_t = k | y_{0:t}), N(m_k, P_k) ~ p(x_t | z_t = k, y_{0:t}))::

        m_k, P_k, l_k = update(m0_k, P0_k, y_0 | mode k);  mu_0 = normalise(pi * exp(l))
        for t in 1..T-1:
            c_j = sum_i mu_i A[i, j];  w_ij = mu_i A[i, j] / c_j
            mixed_j = moment-match sum_i w_ij N(m_i, P_i)
            m_j, P_j, l_j = predict (mode j) + update (mode j) of mixed_j
            log p(y) += log sum_j c_j exp(l_j);  mu_j = normalise(c_j exp(l_j))

    Accuracy: one mode (or K identical modes) gives the Kalman filter exactly. Otherwise the
    log-likelihood is an approximation; measured against `exact` on 40 random 2-mode SLDS with
    d = p = 2, T = 8 (tests/test_switching.py's ``random_slds``; offsets of scale 0.3): |error|
    mean 0.24, 90th percentile 0.58, max 1.6 nats (offsets of scale 1: mean 0.45, max 3.0). The
    stated bound the tests enforce on such problems: 2.0 nats. GPB2 is markedly tighter.

    For a recurrent model the mode transition row i is evaluated at the mean of component i
    (an approximation on top of the mixture's).

    Args:
        model: an `AbstractSwitchingSSM`.
        emissions, inputs, lengths: as `exact`.

    Returns:
        `MixtureFilterResult`: log_likelihood (), filtered_mode_probs (T, K), filtered_means
        (T, d), filtered_covs (T, d, d), mode_means (T, K, d), mode_covs (T, K, d, d),
        mode_log_likelihoods (T, K, K).
    """
    return _call("imm", model, emissions, inputs, lengths)


def gpb2(model, emissions, *, inputs=None, lengths=None) -> MixtureFilterResult:
    """Generalised pseudo-Bayes filter of order 2: from each of the K per-mode Gaussians, a
    Kalman step under each of the K next modes (K^2 steps), then the K^2 posteriors merged into
    one Gaussian per current mode by moment matching.

    The loop::

        for t in 1..T-1:
            m_ij, P_ij, l_ij = predict (mode j) + update (mode j) of N(m_i, P_i)
            w_ij = mu_i A[i, j] exp(l_ij);  log p(y) += log sum_ij w_ij
            mu_j = sum_i w_ij / sum;  N(m_j, P_j) = moment-match sum_i w_ij N(m_ij, P_ij)

    Accuracy: one mode gives the Kalman filter, and with T <= 2 GPB2 is exact (nothing has been
    collapsed yet; tested to 1e-10). Measured against `exact` on the problems of `imm`: |error|
    mean 0.05, 90th percentile 0.06, max 0.5 nats (offsets of scale 1: mean 0.07, max 1.5);
    stated bound the tests enforce: 0.6 nats.

    Args and returns as `imm`; ``mode_log_likelihoods[t, i, j]`` = log p(y_t | z_{t-1} = i,
    z_t = j, y_{0:t-1}) under the approximation (row 0: the initial step, equal for every i).
    """
    return _call("gpb2", model, emissions, inputs, lengths)


def rbpf(key, model, emissions, num_particles: int, *, inputs=None, lengths=None, resampling: str = "systematic",
         ess_threshold: float = 0.5) -> RBPFResult:
    """Rao-Blackwellised particle filter: particles carry a mode path and the exact Kalman
    moments of x given it; modes are proposed from the exact one-step predictive (the locally
    optimal proposal), so the filter is fully adapted; resampling when the ESS falls below
    ``ess_threshold * N``. The log-likelihood estimate is unbiased on the natural scale.

    The loop (W normalised weights; per particle i the Kalman moments (m^i, P^i))::

        z_0^i ~ p(z_0 | y_0);  log Z = log sum_k pi_k p(y_0 | z_0 = k)
        for t in 1..T-1:
            a_ij = A[z^i, j] p(y_t | z_t = j, z^i, y_{:t-1})     (K Kalman steps per particle)
            V^i = W^i sum_j a_ij;  log Z += log sum_i V^i;  normalise V
            if ESS(V) < ess_threshold N: ancestors ~ resample(V), W = 1/N  else W = V
            z_t^i ~ a_{parent(i), .} normalised;  (m^i, P^i) = Kalman update under z_t^i

    Smoothing: ancestor tracing of the final particles' mode paths (weighted by W_{T-1}) gives
    smoothed mode marginals; a Kalman smoother per traced path gives the smoothed means.

    Args:
        key: a `jax.random` key (one per sequence is split from it for a batch).
        model: an `AbstractSwitchingSSM` with a Markov mode chain.
        emissions, inputs, lengths: as `exact`.
        num_particles: N >= 2.
        resampling: "systematic", "stratified", "multinomial" or "residual" (`ps.smc.resampling`).
        ess_threshold: in (0, 1]; 1 resamples at every step.

    Returns:
        `RBPFResult`.
    """
    num_particles = C.check_num_particles(num_particles)
    resampling = C.check_resampling(resampling)
    ess_threshold = C.check_ess_threshold(ess_threshold)
    return _call("rbpf", model, emissions, inputs, lengths, key=key, markov=True, num_particles=num_particles,
                 resampling=resampling, ess_threshold=ess_threshold)


def conditional_rbpf(key, model, emissions, reference, num_particles: int, *, inputs=None, lengths=None,
                     ancestor_sampling: bool = True) -> ConditionalRBPFResult:
    """One sweep of the conditional Rao-Blackwellised particle filter with ancestor sampling: the
    particle-Gibbs kernel on mode paths of a switching linear system (Lindsten, Jordan & Schoen,
    JMLR 2014; the Rao-Blackwellised form of Svensson, Lindsten & Schoen 2014). It leaves
    p(z_{0:T-1} | y) invariant; x is integrated out exactly by a Kalman filter per particle.

    Slot 0 of the particle system is pinned to the ``reference`` mode path; the other N - 1
    particles run the fully adapted RBPF of `rbpf` (multinomial resampling at every step). With
    ``ancestor_sampling``, slot 0's parent at step t is redrawn with probability proportional to
    A[z^i_{t-1}, z'_t] p(y_{t:T-1} | z^i_{0:t-1}, z'_{t:T-1}, y_{0:t-1}): the second factor is the
    integral of particle i's filtered Gaussian against a backward information filter run once along
    the reference, so the chain mixes even where the paths coalesce. The new reference is one of the
    N traced paths, picked uniformly (the final weights of a fully adapted filter are equal).

    The loop (the backward filter first: p(y_{t:} | x_{t-1}, z'_{t:}) as exp(-x^T Om_t x / 2 + x^T lam_t))::

        slot 0: z'_0;  slots i >= 1: z_0^i ~ p(z_0 | y_0)
        for t in 1..T-1:
            a_ij = A[z^i, j] p(y_t | z_t = j, z^i, y_{:t-1})              (K Kalman steps per particle)
            slots i >= 1: parent ~ sum_j a_ij;  z_t^i ~ a_{parent, .}
            slot 0: z_t = z'_t;  parent ~ A[z^i, z'_t] * integral N(x; m^i, P^i) exp(-x^T Om_t x / 2 + x^T lam_t)

    Particle Gibbs learning (`ps.learn.slds_particle_em`) iterates this kernel.

    Args:
        key: a `jax.random` key (one per sequence is split from it for a batch).
        model: an `AbstractSwitchingSSM` with a Markov mode chain and Gaussian emissions.
        emissions, inputs, lengths: as `exact` (NaN = missing; padding is missing).
        reference: (T,) int mode path in [0, K), (B, T) for a batch: the current state of the chain
            (e.g. ``rbpf(...).mode_paths[0]`` or `most_likely_modes`).
        num_particles: N >= 2 (slot 0 is the reference).
        ancestor_sampling: redraw the reference's ancestry (default); without it the kernel is plain
            conditional SMC, still invariant but slow to move the early modes.

    Returns:
        `ConditionalRBPFResult`: reference (T,) the new mode path, mode_paths (N, T) all traced
        paths (for Rao-Blackwellised estimates: average over them), log_likelihood () a diagnostic.

    Raises:
        ValueError: naming the argument: as `rbpf`, and a ``reference`` of the wrong shape or with
            modes outside [0, K).
    """
    num_particles = C.check_num_particles(num_particles)
    if not isinstance(ancestor_sampling, bool):
        raise ValueError(f"ancestor_sampling: expected True or False, got {ancestor_sampling!r}")
    b = check_arguments(model, emissions, inputs, lengths, markov=True)
    reference = _check_reference(reference, b, model.num_modes)
    return _run(model, b.emissions, b.inputs, b.lengths, (key, reference), kind="conditional_rbpf", batched=b.batched,
                inputs_batched=b.inputs_batched, options=(("ancestor_sampling", ancestor_sampling),
                                                          ("num_particles", num_particles)))


def _check_reference(reference, batch: Batch, num_modes: int):
    """A (T,) / (B, T) int mode path matching the data; ValueError naming ``reference``."""
    expected = (batch.emissions.shape[0], batch.num_timesteps) if batch.batched else (batch.num_timesteps,)
    shape = tuple(np.shape(reference))
    if shape != expected:
        raise ValueError(f"reference: expected a mode path of shape {expected}, got shape {shape}")
    if not jnp.issubdtype(jnp.asarray(reference).dtype, jnp.integer):
        raise ValueError(f"reference: expected integer modes, got dtype {jnp.asarray(reference).dtype}")
    if checks.is_concrete(reference):
        r = np.asarray(reference)
        if (r < 0).any() or (r >= num_modes).any():
            raise ValueError(f"reference: modes must lie in [0, {num_modes}), got values in [{r.min()}, {r.max()}]")
    return jnp.asarray(reference, jnp.int32)


def _viterbi_pairwise(log_pi, logA, pair, length=None):
    """Most likely path of log pi_{z_0} + pair[0, ., z_0] + sum_t (logA[t, z_{t-1}, z_t] + pair[t, z_{t-1}, z_t])
    through `ps.hmm`'s Viterbi core: the pairwise terms are folded into per-step 'transition
    matrices' (normalised per step: a constant per step does not move the argmax)."""
    s = logA + pair
    s = s - jnp.max(s, axis=(1, 2), keepdims=True)
    init = log_pi + pair[0, 0]
    params = DiscreteParams(jnp.exp(init - jnp.max(init)), jnp.exp(s), jnp.zeros(pair.shape[:2], pair.dtype))
    return viterbi_params(params, length=length)


def most_likely_modes(model, emissions, *, inputs=None, lengths=None, method: str = "gpb2") -> jax.Array:
    """A most likely mode path z_{0:T-1}.

    ``method``:

    * ``"gpb2"`` (default): Viterbi on GPB2's pairwise potentials: the path maximising
      log pi_{z_0} + sum_t log A_t[z_{t-1}, z_t] + sum_t log p^(y_t | z_{t-1}, z_t, y_{0:t-1}),
      where p^ is GPB2's Gaussian predictive (exact at t = 0 and for one mode). It approximates
      argmax p(z | y); on tiny problems it matches the exact MAP path when modes are well separated.
    * ``"imm"``: the same with IMM's per-mode predictive p^(y_t | z_t, y_{0:t-1}).
    * ``"exact"``: argmax_z p(z_{0:T-1} | y) by enumerating the K^T paths (tiny problems).

    Returns:
        (T,) int modes, (B, T) for a batch (-1 beyond each sequence's length).
    """
    if method not in ("gpb2", "imm", "exact"):
        raise ValueError(f"method: expected 'gpb2', 'imm' or 'exact', got {method!r}")
    b = check_arguments(model, emissions, inputs, lengths, markov=(method == "exact"))
    return _run_viterbi(model, b.emissions, b.inputs, b.lengths, method=method, batched=b.batched,
                        inputs_batched=b.inputs_batched)


@partial(jax.jit, static_argnames=("method", "batched", "inputs_batched"))
def _run_viterbi(model, ys, inputs, lengths, *, method, batched, inputs_batched):
    def one(y, u, n):
        y = kalman.mask_padding(y, n)
        params = model.switching_params(y.shape[0], u)
        T = y.shape[0]
        if method == "exact":
            path = exact_params(params, y).most_likely_modes
            return path if n is None else jnp.where(jnp.arange(T) < n, path, -1)
        r = _mixture_filter(params, y, method, model, u)
        logA = jnp.log(_steps(params, T))
        if model.is_recurrent:
            # the transitions the filter used: row i at the mean of component i of step t-1
            rows = jax.vmap(lambda t, ms: _log_transitions(model, params, t, None, ms, C.row(u, t), True))(
                jnp.arange(1, T), r.mode_means[:-1])
            logA = jnp.concatenate([logA[:1], rows])
        return _viterbi_pairwise(jnp.log(params.initial_probs), logA, r.mode_log_likelihoods, n)

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


def structured_vi(model, emissions, num_iters: int = 50, *, inputs=None, lengths=None) -> StructuredVIResult:
    """Structured variational inference for an SLDS: q(z_{0:T-1}, x_{0:T-1}) = q(z) q(x), each factor a
    chain, fitted by coordinate ascent on the ELBO (Ghahramani & Hinton 2000; Linderman et al. 2017).

    * q(z) given q(x): exact forward-backward (`ps.hmm`'s core) on the expected log-potentials
      psi_t(k) = E_q(x)[log p(x_t | x_{t-1}, z_t = k) + log p(y_t | x_t, z_t = k)];
    * q(x) given q(z): the exact Kalman smoother (`ps.kalman`) of the linear-Gaussian system with the
      expected dynamics and emissions (built exactly; see ``_qx_system``).

    After each sweep (q(x) update, then q(z) update) the ELBO is log Z_q(z) + H[q(x)], where log Z_q(z)
    is the forward-backward normaliser; coordinate ascent makes it non-decreasing, and it is a lower
    bound on log p(y). With one mode q is the exact posterior and the ELBO equals the Kalman
    log-likelihood. q(z) starts uniform.

    Args:
        model: an `AbstractSwitchingSSM` with a Markov mode chain and positive definite dynamics
            covariances.
        emissions, inputs, lengths: as `exact` (NaN = missing; padding is missing).
        num_iters: sweeps (static int >= 1).

    Returns:
        `StructuredVIResult`: elbo (num_iters,), mode_probs (T, K), transition_counts (K, K), means
        (T, d), covs (T, d, d), cross_covs (T - 1, d, d).
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    return _call("structured_vi", model, emissions, inputs, lengths, markov=True, num_iters=num_iters)
