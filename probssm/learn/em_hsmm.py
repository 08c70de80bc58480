"""EM for hidden semi-Markov models (`ps.models.HSMM`), registered with `ps.learn.em`.

E-step: forward-backward on the expanded state (k, remaining duration r) by `ps.hmm`'s core
(plausibilities repeated over the durations), per sequence. From its expected transition
counts C[s, s'] = sum_t p(s_{t-1} = s, s_t = s' | y) = M[s, s'] X[s, s'] (M the expanded
transition matrix) each factor of M gets its own expected count, X[s, s'] times that factor:

    jumps     J[k, j, r] = sum_t p(s_{t-1} = (k, 1), s_t = (j, r))       (A[k, j] p_j(r))
    entries   N[j, r]    = p(s_0 = (j, r)) + sum_k J[k, j, r]             (segments starting with r)
    loops, exits of the last cell (geometric tail): q_k and 1 - q_k

M-step (exact maximisers of the expected complete-data log-likelihood)::

    pi_k    ∝ sum_r p(s_0 = (k, r))
    A[k, j] ∝ sum_r J[k, j, r]         (j != k; absorbing rows stay absorbing)
    durations <- durations.m_step(N, loops, exits)   # pmf: N / sum; parametric: weighted MLE
    emissions <- emissions.m_step(y, gamma)          # gamma_t(k) = sum_r p(s_t = (k, r) | y)

A parametric duration family maximises by guarded Newton steps (kept only when they raise
its term), so EM is monotone throughout. The loop over iterations is one `lax.scan` and
compiles once per problem shape.

    fitted, history = ps.learn.em(hsmm, y, 50, lengths=lengths, plausibility=pl)
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.inference import hmm as hmm_engine
from probssm.learn.em import register_em
from probssm.core.protocol import AbstractSemiMarkovSSM
from probssm.models.hsmm import HSMM

__all__ = ["fit_hsmm", "HSMMStatistics", "hsmm_statistics"]


class HSMMStatistics(NamedTuple):
    """Expected sufficient statistics of one sequence (or summed over a batch)."""

    log_likelihood: jax.Array  # ()
    state_probs: jax.Array  # (T, K) gamma_t(k), zero on padding
    initial: jax.Array  # (K, D) p(s_0 = (k, r) | y)
    jumps: jax.Array  # (K, K, D) J[k, j, r]
    loops: jax.Array  # (K,) self-loops of the last duration cell
    exits: jax.Array  # (K,) departures from the last duration cell


def hsmm_statistics(model: HSMM, emissions, inputs=None, length=None, plausibility=None) -> HSMMStatistics:
    """E-step of one (T, D) sequence; traceable, no checks. ``plausibility``: (T, K * D) or None."""
    K, D = model.num_segment_states, model.max_duration
    params = model.discrete_params(emissions, inputs)
    r = hmm_engine.smoother_params(params, length=length, plausibility=plausibility)
    M = params.transition_matrices.astype(r.transition_counts.dtype)
    # X = C / M where M > 0 (C carries M as a factor); zero where the move is impossible
    X = jnp.where(M > 0, r.transition_counts / jnp.where(M > 0, M, 1.0), 0.0).reshape(K, D, K, D)
    pmf = model.durations.pmf().astype(X.dtype)
    q = model.durations.tail_probs().astype(X.dtype)
    A = model.transition_matrix.astype(X.dtype)
    jump_factor = (1.0 - q) if D == 1 else jnp.ones_like(q)
    jumps = jump_factor[:, None, None] * A[:, :, None] * pmf[None] * X[:, 0]
    ks = jnp.arange(K)
    loops = q * X[ks, D - 1, ks, D - 1]
    if D == 1:
        exits = (1.0 - q) * jnp.sum(A[:, :, None] * pmf[None] * X[:, 0], (1, 2))
    else:
        exits = (1.0 - q) * X[ks, D - 1, ks, D - 2]
    smoothed = r.smoothed_probs.reshape(r.smoothed_probs.shape[0], K, D)
    return HSMMStatistics(r.log_likelihood, smoothed.sum(-1), smoothed[0], jumps, loops, exits)


def _normalise(counts, old):
    total = counts.sum(-1, keepdims=True)
    return jnp.where(total > 0, counts / jnp.where(total > 0, total, 1.0), old)


def _m_step(model: HSMM, st: HSMMStatistics, ys, us, fix_pi, fix_A, fix_dur, em_fixed):
    """st: the statistics with a leading batch axis."""
    new_pi, new_A, new_dur, new_em = model.initial_probs, model.transition_matrix, model.durations, model.emissions
    initial = st.initial.sum(0)
    jumps = st.jumps.sum(0)
    if not fix_pi:
        new_pi = _normalise(initial.sum(-1), model.initial_probs)
    if not fix_A:
        K = model.num_segment_states
        absorbing = jnp.diag(model.transition_matrix) == 1.0
        counts = jumps.sum(-1) * (1.0 - jnp.eye(K, dtype=jumps.dtype))
        new_A = jnp.where(absorbing[:, None], model.transition_matrix, _normalise(counts, model.transition_matrix))
    if not fix_dur:
        new_dur = model.durations.m_step(initial + jumps.sum(0), st.loops.sum(0), st.exits.sum(0))
    if len(em_fixed) < len(model.emissions.learnable):
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        new_em = model.emissions.m_step(flat(ys), flat(st.state_probs), None if us is None else flat(us), None,
                                        em_fixed)
    return eqx.tree_at(lambda m: (m.initial_probs, m.transition_matrix, m.durations, m.emissions), model,
                       (new_pi, new_A, new_dur, new_em))


E_STEP_BATCH = 16  # sequences per vectorised E-step block: bounds the (K D)^2 count arrays held at once


def _e_step(model, ys, us, lengths, pl):
    def one(args):
        return hsmm_statistics(model, *args)

    # lax.map in blocks rather than one vmap: each sequence's expected counts are (K D, K D)
    return lax.map(one, (ys, us, lengths, pl), batch_size=min(ys.shape[0], E_STEP_BATCH))


@partial(jax.jit, static_argnames=("num_iters", "fix_pi", "fix_A", "fix_dur", "em_fixed", "use_tol"))
def _fit(model, ys, us, lengths, pl, tol, *, num_iters, fix_pi, fix_A, fix_dur, em_fixed, use_tol):
    def step(carry, i):
        m, prev, done = carry
        st = _e_step(m, ys, us, lengths, pl)
        obj = jnp.sum(st.log_likelihood)
        new = _m_step(m, st, ys, us, fix_pi, fix_A, fix_dur, em_fixed)
        if use_tol:
            done = done | ((i > 0) & (jnp.abs(obj - prev) < tol))
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), m, new)
        return (new, obj, done), obj

    init = (model, jnp.asarray(-jnp.inf, ys.dtype), jnp.asarray(False))
    (model, _, _), history = lax.scan(step, init, jnp.arange(num_iters))
    return model, history


def _parse_fixed(model, fixed):
    if isinstance(fixed, str):
        fixed = (fixed,)
    learnable = tuple(model.emissions.learnable)
    allowed = ("initial_probs", "transition_matrix", "durations", "emissions") + tuple(
        f"emissions.{n}" for n in learnable)
    bad = [f for f in fixed if f not in allowed]
    if bad:
        raise ValueError(f"fixed: unknown parameter names {bad}; expected a subset of {list(allowed)}")
    em_fixed = learnable if "emissions" in fixed else tuple(n for n in learnable if f"emissions.{n}" in fixed)
    return ("initial_probs" in fixed, "transition_matrix" in fixed, "durations" in fixed, tuple(sorted(em_fixed)))


def _expand_plausibility(model: HSMM, plausibility, batched: bool, num_timesteps: int):
    """(T, K) / (B, T, K) per segment state -> (..., K * D); an expanded one passes through."""
    if plausibility is None:
        return None
    pl = jnp.asarray(plausibility)
    K = model.num_segment_states
    lead = 2 if batched else 1
    if pl.ndim == lead + 1 and pl.shape[-1] == K and pl.shape[-2] == num_timesteps:
        return model.expand_plausibility(pl)
    return pl


def fit_hsmm(model: HSMM, emissions, num_iters: int = 100, *, lengths=None, inputs=None, plausibility=None,
            fixed=(), tol: Optional[float] = None):
    """Fit an `HSMM` by EM (durations, jumps, initial probabilities and emissions).

    Args:
        model: the starting point (not modified).
        emissions: (T, D), a padded batch (B, T, D) or a list of (T_b, D) arrays; NaN = missing.
        num_iters: EM iterations.
        lengths: (B,) true lengths of a padded batch.
        inputs: (T, U) or (B, T, U); None: the emission family's default (lagged observations
            for autoregressive emissions).
        plausibility: ARPHMM weights per segment state, (T, K) or (B, T, K) (or already
            expanded to K * D columns).
        fixed: names to hold: "initial_probs", "transition_matrix", "durations", "emissions",
            "emissions.<field>".
        tol: stop updating once the log-likelihood changes by less than tol.

    Returns:
        ``(fitted_model, history)``; history[i] is the (plausibility-weighted) log-likelihood of
        the parameters entering iteration i, non-decreasing.

    Example:
        >>> fitted, history = ps.learn.em(hsmm, y, 30)
    """
    if not isinstance(model, AbstractSemiMarkovSSM):
        raise ValueError(f"model: expected a semi-Markov model (ps.core.AbstractSemiMarkovSSM, e.g. ps.models.HSMM), "
                         f"got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    if tol is not None and not (float(tol) > 0):
        raise ValueError(f"tol: expected a positive float or None, got {tol!r}")
    fix_pi, fix_A, fix_dur, em_fixed = _parse_fixed(model, fixed)
    y_shape = jnp.shape(emissions) if not isinstance(emissions, (list, tuple)) else None
    batched = y_shape is not None and len(y_shape) == 3
    T = y_shape[-2] if y_shape is not None else max(len(e) for e in emissions)
    pl = _expand_plausibility(model, plausibility, batched or isinstance(emissions, (list, tuple)), T)
    batch, pl = hmm_engine.prepare(model, emissions, inputs, lengths, pl)
    model = checks.unify_dtypes(model, batch.emissions)
    ys, u, n = batch.emissions, batch.inputs, batch.lengths
    if not batch.batched:
        ys = ys[None]
        n = None if n is None else n[None]
        pl = None if pl is None else pl[None]
    if u is None:
        us = None if model.emission_lags == 0 else jax.vmap(model.default_inputs)(ys)
    elif batch.inputs_batched:
        us = u
    else:
        us = jnp.broadcast_to(u, ys.shape[:1] + u.shape)
    tol_arr = jnp.asarray(0.0 if tol is None else tol, ys.dtype)
    return _fit(model, ys, us, n, pl, tol_arr, num_iters=num_iters, fix_pi=fix_pi, fix_A=fix_A,
                fix_dur=fix_dur, em_fixed=em_fixed, use_tol=tol is not None)


register_em(HSMM)(fit_hsmm)
