"""Remaining useful life as a posterior predictive, and the metrics prognostics is judged by.

`rul` gives the exact distribution of the time tau to an absorbing failure state F of an HMM
or HSMM (or any time-invariant discrete model) given the observed history y_{0:t}: with
p_t = p(s_t | y_{0:t}) the filtered (expanded) state and M the transition matrix,

    P(tau <= r | y_{0:t}) = sum_{s in F} (p_t M^r)[s],      P(tau = r) = its difference in r,

because F is absorbing (tau = 0 when the chain is already in F at the last observed step).
The loop this scan runs::

    cdf[0] = p_t[F].sum()
    for r in 1..H:
        p = p @ M;  cdf[r] = p[F].sum()
    pmf = diff(cdf, prepend=0);  beyond = 1 - cdf[H]

Metrics: `phm08_score` (the PHM08 challenge's asymmetric score), `rmse`, `coverage` of
predictive intervals at several nominal levels, `pit` values for a PIT histogram (uniform
under calibration; randomised for the discrete RUL when a key is given), `intervals` (central
intervals from a RUL pmf).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks
from probssm.core.batching import Batch
from probssm.core.protocol import AbstractSemiMarkovSSM
from probssm.inference import hmm as hmm_engine
from probssm.inference.forward_backward import filter_params

__all__ = ["RULResult", "rul", "rul_from_probs", "intervals", "phm08_score", "rmse", "coverage", "pit"]

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RULResult(NamedTuple):
    """Distribution of the time to failure tau (in steps after the last observed one).

    pmf (..., H + 1): P(tau = r | y), r = 0..H (r = 0: already failed).
    cdf (..., H + 1): P(tau <= r | y).
    beyond (...,): P(tau > H), mass past the horizon.
    mean (...,): E[tau], exact when ``beyond`` is 0 (otherwise a lower bound: the mass past the
        horizon counts as H + 1).
    median (...,): the smallest r with cdf >= 1/2 (H + 1 when none).
    quantiles (..., Q): the smallest r with cdf >= level, for the ``levels`` requested.
    levels (Q,): those levels.
    """

    pmf: jax.Array
    cdf: jax.Array
    beyond: jax.Array
    mean: jax.Array
    median: jax.Array
    quantiles: jax.Array
    levels: jax.Array


# ----------------------------------------------------------------------------------------------
# The failure set and its checks
# ----------------------------------------------------------------------------------------------
def _segment_chain(model):
    """(segment-level transition matrix, cells per segment state) of a supported model."""
    if isinstance(model, AbstractSemiMarkovSSM):
        return model.segment_transition_matrix, model.max_duration
    if model.emission_family is not None:  # declares the HMM structure: fields initial_probs, transition_matrix
        return model.transition_matrix, 1
    return None, 1


def _failure_mask(model, failure_state) -> jax.Array:
    """(num_states,) 0/1 mask of the expanded states in F, with the topology checks (concrete models)."""
    A, cells = _segment_chain(model)
    if A is None:
        if failure_state is None:
            raise ValueError(f"failure_state: expected the index of the absorbing failure state of a "
                             f"{type(model).__name__} (it declares no segment-level chain to find it in)")
        K = model.num_states
        fs = checks.positive_int(failure_state, "failure_state", minimum=0)
        return jax.nn.one_hot(fs, K)
    if A.ndim != 2:
        raise ValueError(f"model: the remaining useful life needs a time-invariant transition matrix, got "
                         f"shape {tuple(A.shape)}")
    K = A.shape[0]
    if checks.is_concrete(A):
        a = np.asarray(A)
        absorbing = np.flatnonzero(np.isclose(np.diag(a), 1.0, rtol=0, atol=1e-12))
        if failure_state is None:
            if absorbing.size == 0:
                raise ValueError("model: the remaining useful life needs an absorbing failure state (a row of "
                                 "transition_matrix equal to e_k, as in a left-to-right topology ending in an "
                                 "absorbing state); this transition_matrix has none")
            if absorbing.size > 1:
                raise ValueError(f"failure_state: the model has several absorbing states {absorbing.tolist()}; "
                                 "expected the index of the failure state")
            fs = int(absorbing[0])
        else:
            fs = checks.positive_int(failure_state, "failure_state", minimum=0)
            if fs >= K:
                raise ValueError(f"failure_state: expected an index in [0, {K - 1}], got {fs}")
            if fs not in absorbing:
                raise ValueError(f"failure_state: state {fs} is not absorbing (transition_matrix[{fs}, {fs}] = "
                                 f"{a[fs, fs]:.6g}); the remaining useful life needs an absorbing failure state")
        # every state must reach F, or tau is infinite with positive probability
        reach = np.zeros(K, bool)
        reach[fs] = True
        for _ in range(K):
            reach = reach | ((a > 0) & reach[None, :]).any(1)
        if not reach.all():
            bad = int(np.flatnonzero(~reach)[0])
            raise ValueError(f"model: state {bad} never reaches the failure state {fs} (transition_matrix is "
                             "not a degradation topology: every state must lead to the absorbing failure state)")
    else:
        if failure_state is None:
            raise ValueError("failure_state: expected an index when the model is traced")
        fs = checks.positive_int(failure_state, "failure_state", minimum=0)
    return jnp.repeat(jax.nn.one_hot(fs, K), cells)


def _levels(quantiles):
    q = np.asarray(quantiles, dtype=float).reshape(-1)
    if q.size == 0 or np.any(~np.isfinite(q)) or np.any(q <= 0) or np.any(q >= 1):
        raise ValueError(f"quantiles: expected levels in (0, 1), got {quantiles!r}")
    return q


# ----------------------------------------------------------------------------------------------
# The first-passage distribution
# ----------------------------------------------------------------------------------------------
def _summaries(cdf, levels):
    H = cdf.shape[-1] - 1
    pmf = jnp.diff(cdf, axis=-1, prepend=0.0)
    beyond = 1.0 - cdf[..., -1]
    r = jnp.arange(H + 1, dtype=cdf.dtype)
    mean = jnp.sum(pmf * r, -1) + (H + 1) * beyond
    # smallest r with cdf >= level: the number of r whose cdf is below it (cdf is non-decreasing);
    # a relative slack of a few ulps keeps an exact level such as 0.5 from falling off by rounding
    slack = 8 * jnp.finfo(cdf.dtype).eps
    lev = jnp.asarray(levels, cdf.dtype)
    quant = jnp.sum(cdf[..., None, :] < lev[:, None] - slack, -1).astype(cdf.dtype)
    median = jnp.sum(cdf < 0.5 - slack, -1).astype(cdf.dtype)
    return pmf, beyond, mean, median, quant


def _propagate(p, M, mask, horizon):
    def step(q, _):
        q = q @ M
        return q, q @ mask

    _, later = lax.scan(step, p, None, length=horizon)
    return jnp.concatenate([(p @ mask)[None], later])


def rul_from_probs(probs, transition_matrix, failure_mask, max_horizon: int, quantiles=DEFAULT_QUANTILES) -> RULResult:
    """First-passage distribution into the states of ``failure_mask`` from state probabilities;
    traceable core of `rul` (no checks; ``max_horizon`` and ``quantiles`` static).

    Args:
        probs: (S,) or (B, S) state probabilities at the last observed step.
        transition_matrix: (S, S) (rows: from-state), the failure states absorbing.
        failure_mask: (S,) 1 on failure states.
        max_horizon: H.
        quantiles: levels in (0, 1).
    """
    probs = jnp.asarray(probs)
    M = jnp.asarray(transition_matrix, probs.dtype)
    mask = jnp.asarray(failure_mask, probs.dtype)
    run = lambda p: _propagate(p, M, mask, int(max_horizon))
    cdf = run(probs) if probs.ndim == 1 else jax.vmap(run)(probs)
    cdf = jnp.clip(cdf, 0.0, 1.0)
    cdf = lax.cummax(cdf, axis=cdf.ndim - 1)  # rounding must not make it decrease
    pmf, beyond, mean, median, quant = _summaries(cdf, quantiles)
    return RULResult(pmf, cdf, beyond, mean, median, quant, jnp.asarray(quantiles, cdf.dtype))


@partial(jax.jit, static_argnames=("batched", "inputs_batched", "max_horizon", "levels"))
def _rul(model, ys, inputs, lengths, pl, mask, *, batched, inputs_batched, max_horizon, levels):
    batch = Batch(ys, inputs, lengths, batched, inputs_batched)

    def last_filtered(y, u, n, p):
        params = model.discrete_params(y, u)
        f = filter_params(params, length=n, plausibility=p)
        last = y.shape[0] - 1 if n is None else n - 1
        return f.filtered_probs[last], params.transition_matrices

    probs, M = batch.map(last_filtered, pl, extra_axes=(None if pl is None else 0,))
    if batched:
        M = M[0]  # time-invariant: the same in every sequence
    return rul_from_probs(probs, M, mask, max_horizon, levels)


def rul(model, emissions, *, max_horizon: int, inputs=None, lengths=None, plausibility=None, failure_state=None,
        quantiles=DEFAULT_QUANTILES) -> RULResult:
    """Exact distribution of the remaining useful life given the observed history.

    tau = min{r >= 0 : s_{t+r} in F}, t the last observed step of each sequence and F the
    absorbing failure state (all its duration cells for an HSMM): the first-passage
    distribution from the filtered state, propagated r = 1..H steps by the transition matrix.

    Args:
        model: `ps.models.HMM` or `ps.models.HSMM` with a time-invariant transition matrix and an
            absorbing failure state reachable from every state (e.g. `ps.models.left_to_right`).
        emissions: the history, (T, D), a padded batch (B, T, D) (engines or cut points) with
            ``lengths``, or a list of (T_b, D) arrays; NaN = missing.
        max_horizon: H, the largest horizon; mass past it is reported as ``beyond``.
        inputs: as in `ps.hmm.filter` (None: lagged observations for AR emissions).
        lengths: () or (B,): the last observed step of each sequence is lengths - 1.
        plausibility: (T, K) or (B, T, K) per (segment) state, as in the ARPHMM.
        failure_state: index of F; None: the model's only absorbing state.
        quantiles: levels of the quantiles returned.

    Returns:
        `RULResult` (leading B axis for a batch): pmf, cdf over r = 0..H, beyond, mean,
        median, quantiles.

    Raises:
        ValueError: no absorbing failure state, a state that never reaches it, a failure_state
            that is not absorbing, or the usual argument errors of `ps.hmm.filter`.

    Example:
        >>> hsmm = ps.models.HSMM(pi, ps.models.left_to_right(4), durations, emissions)
        >>> r = ps.prognostics.rul(hsmm, y_history, max_horizon=300)
        >>> r.median, r.quantiles[..., [0, -1]]     # point prediction, 90% interval
    """
    H = checks.positive_int(max_horizon, "max_horizon")
    levels = tuple(float(v) for v in _levels(quantiles))
    mask = _failure_mask(model, failure_state)
    if isinstance(model, AbstractSemiMarkovSSM) and plausibility is not None:
        pl = jnp.asarray(plausibility)
        if pl.ndim >= 1 and pl.shape[-1] == model.num_segment_states and model.max_duration > 1:
            plausibility = model.expand_plausibility(pl)
    batch, pl = hmm_engine.prepare(model, emissions, inputs, lengths, plausibility)
    return _rul(model, batch.emissions, batch.inputs, batch.lengths, pl, mask, batched=batch.batched,
                inputs_batched=batch.inputs_batched, max_horizon=H, levels=levels)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _pair(predicted, truth, name="predicted"):
    p = jnp.asarray(predicted, jnp.result_type(float))
    t = jnp.asarray(truth, p.dtype)
    if p.shape != t.shape:
        raise ValueError(f"{name}: expected the shape of truth {tuple(t.shape)}, got shape {tuple(p.shape)}")
    return p, t


def phm08_score(predicted, truth) -> jax.Array:
    """PHM08 challenge score: sum_i s(d_i), d = predicted - true RUL,
    s(d) = exp(-d / 13) - 1 for early predictions (d < 0), exp(d / 10) - 1 for late ones.

    Args:
        predicted, truth: arrays of the same shape (N,).
    """
    p, t = _pair(predicted, truth)
    d = p - t
    return jnp.sum(jnp.where(d < 0, jnp.expm1(-d / 13.0), jnp.expm1(d / 10.0)))


def rmse(predicted, truth) -> jax.Array:
    """Root mean squared error sqrt(mean((predicted - truth)^2))."""
    p, t = _pair(predicted, truth)
    return jnp.sqrt(jnp.mean((p - t) ** 2))


def intervals(result, levels=(0.5, 0.9)) -> jax.Array:
    """Central predictive intervals from a RUL distribution.

    Args:
        result: a `RULResult` (or a (..., H + 1) pmf over r = 0..H).
        levels: nominal levels L in (0, 1).

    Returns:
        (L, ..., 2): [lower, upper] = the (1 - l)/2 and (1 + l)/2 quantiles (H + 1 past the horizon).
    """
    lv = _levels(levels)
    if isinstance(result, RULResult):
        cdf = result.cdf
    else:
        cdf = jnp.cumsum(jnp.asarray(result), -1)
    probs = tuple(float(v) for v in np.concatenate([(1 - lv) / 2, (1 + lv) / 2]))
    q = _summaries(cdf, probs)[-1]
    L = lv.size
    return jnp.moveaxis(jnp.stack([q[..., :L], q[..., L:]], -1), -2, 0)


def coverage(intervals, truth) -> jax.Array:
    """Fraction of the true values inside their (closed) intervals.

    Args:
        intervals: (N, 2) or (L, N, 2) [lower, upper] (e.g. `intervals` of a batched RUL for L levels).
        truth: (N,).

    Returns:
        () or (L,) empirical coverage, to compare with the nominal levels.
    """
    iv = jnp.asarray(intervals, jnp.result_type(float))
    t = jnp.asarray(truth, iv.dtype)
    if iv.ndim not in (2, 3) or iv.shape[-1] != 2 or iv.shape[-2:-1] != t.shape or t.ndim != 1:
        raise ValueError(f"intervals: expected shape (N, 2) or (L, N, 2) with N = len(truth) = "
                         f"{t.shape[0] if t.ndim == 1 else t.shape}, got shape {tuple(iv.shape)}")
    inside = (t >= iv[..., 0]) & (t <= iv[..., 1])
    return jnp.mean(inside.astype(iv.dtype), -1)


def pit(pmf, truth, key=None) -> jax.Array:
    """Probability integral transform of true RULs under discrete predictive distributions.

    u_i = F_i(y_i - 1) + v_i p_i(y_i), v_i ~ U(0, 1) with ``key`` (randomised PIT: exactly uniform
    under calibration), v_i = 1/2 without (mid-PIT). A truth past the horizon falls in the
    ``beyond`` bin (mass 1 - sum(pmf)).

    Args:
        pmf: (N, H + 1) over r = 0..H (a `RULResult.pmf`).
        truth: (N,) integer RULs.
        key: optional `jax.random` key.

    Returns:
        (N,) values in [0, 1] for a PIT histogram.
    """
    p = jnp.asarray(pmf, jnp.result_type(float))
    t = jnp.asarray(truth)
    if p.ndim != 2 or t.shape != p.shape[:1]:
        raise ValueError(f"pmf: expected shape (N, H + 1) with N = len(truth), got {tuple(p.shape)} and truth "
                         f"{tuple(t.shape)}")
    H = p.shape[1] - 1
    cdf = jnp.cumsum(p, -1)
    idx = jnp.clip(t, 0, H + 1).astype(jnp.int32)
    ext_cdf = jnp.concatenate([jnp.zeros_like(cdf[:, :1]), cdf, jnp.ones_like(cdf[:, :1])], -1)
    below = jnp.take_along_axis(ext_cdf, idx[:, None], 1)[:, 0]
    upto = jnp.take_along_axis(ext_cdf, idx[:, None] + 1, 1)[:, 0]
    v = 0.5 if key is None else jax.random.uniform(key, t.shape, p.dtype)
    return jnp.clip(below + v * (upto - below), 0.0, 1.0)
