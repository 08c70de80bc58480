"""Continuous-time Markov chains (``ps.ctmc``): transition matrices, simulation, panel likelihoods,
forward-backward and Viterbi for continuous-time HMMs.

Consumes any `probssm.core.AbstractContinuousTimeSSM` (a generator Q, initial probabilities pi,
emission log-likelihoods) through ``model.generator()``; ``P(dt) = expm(Q dt)``.

* `transition_matrix` (expm, one per distinct dt) and `uniformization` (the Poisson series
  ``P(t) = sum_n Pois(n; lam t) R^n``, ``R = I + Q / lam``, ``lam = max_i |Q_ii|``).
* `gillespie` (exact path on [0, t_max], fixed buffer of ``max_jumps`` jumps, reports truncation),
  `sample_at` (the states at given times, exactly, by the Markov property) and `sample_bridge`
  (a path conditioned on both end points, by uniformisation).
* `panel_log_likelihood`: per-subject records (t_j, s_j) of an exactly observed process, the first
  record of each subject conditioned on. It is the forward recursion (the loop ``lax.scan`` runs)::

      alpha = pi * e(s_0) / sum(pi * e(s_0))            # an exact first state: its indicator
      for j in 1..L-1:
          v = alpha @ P(t_j - t_{j-1})
          a = (v @ R) * e(s_j)   if s_j is an exact state entered now (death at a known time: R = Q
                                 off-diagonal; a later record in the same absorbing state adds a factor 1)
          a = v * e(s_j)         otherwise                 (e: indicator of the possible states)
          log L += log sum(a);  alpha = a / sum(a)

  so an exact death contributes ``sum_k P(dt)[i, k] Q[k, abs]`` and a censored record (a set of
  possible states) sums over its set. Subjects are vmapped, never looped over in Python; on
  concrete data each distinct interval length gets one matrix exponential.
* `path_log_likelihood`, `path_statistics`: exactly observed paths (every jump time and the state
  entered), ``sum log Q_ij over jumps - sum_i q_i T_i`` through the sufficient statistics
  (`PathStatistics`: jump counts N_ij, dwell times T_i; the last sojourn censored at ``t_end``).
* `dwell_log_likelihood`, `dwell_time_density`: aggregated processes (only the class of the state is
  seen, e.g. open / shut channels) with exact dwell times: the Colquhoun-Hawkes likelihood, missed
  events not corrected.
* `filter`, `smoother`, `viterbi`: a `ContinuousTimeHMM` (or any continuous-time model) at irregular
  observation times, by the discrete engines of ``ps.hmm`` on ``A_t = expm(Q (t_t - t_{t-1}))``; with
  ``exact_states`` an exactly timed, correctly labelled entry into an absorbing state (msm's
  ``deathexact``) uses ``A_t = (P(dt) Q_off)[:, s]`` in column s instead.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import gammaln, xlogy

from probssm.core import checks
from probssm.core.batching import as_batch
from probssm.core.continuous_time import AbstractContinuousTimeSSM, expm
from probssm.core.protocol import DiscreteParams
from probssm.inference.forward_backward import FilterResult, SmootherResult, filter_params, smoother_params, \
    viterbi_params
from probssm.models.mjp import MarkovJumpProcess, check_generator

__all__ = ["Path", "FilterResult", "SmootherResult", "transition_matrix", "uniformization", "gillespie",
           "sample_at", "sample_bridge", "panel_log_likelihood", "PathStatistics", "path_statistics",
           "path_log_likelihood", "dwell_log_likelihood", "dwell_time_density", "filter", "smoother", "viterbi",
           "state_probs_at"]


# ----------------------------------------------------------------------------------------------
# Generators and transition matrices
# ----------------------------------------------------------------------------------------------
def _generator(proc, name: str = "proc"):
    if isinstance(proc, AbstractContinuousTimeSSM):
        return proc.generator()
    Q = jnp.asarray(proc)
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"{name}: expected a continuous-time model or a (K, K) generator, got "
                         f"{type(proc).__name__} of shape {tuple(jnp.shape(Q))}")
    Q = Q if jnp.issubdtype(Q.dtype, jnp.floating) else Q.astype(jnp.result_type(float))
    check_generator(Q, name)
    return Q


def _checked(proc, name: str = "proc"):
    """Generator of ``proc`` with the value checks of a model that may not have come through its
    constructor (``eqx.tree_at``, ``ps.load``)."""
    Q = _generator(proc, name)
    if isinstance(proc, AbstractContinuousTimeSSM):
        check_generator(Q, f"{name}.generator")
        checks.once_per_model(proc, "parameters", lambda: proc.check_parameters(name))
    return Q


def _dt(dt, name="dt"):
    d = jnp.asarray(dt)
    d = d if jnp.issubdtype(d.dtype, jnp.floating) else d.astype(jnp.result_type(float))
    if checks.is_concrete(d):
        a = np.asarray(d)
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{name}: expected finite time steps >= 0, found {a[~(np.isfinite(a) & (a >= 0))][0]}")
    return d


@jax.jit
def expm_batch(Q, dts):
    return jax.vmap(lambda d: expm(Q * d))(dts)


def transition_matrix(proc, dt) -> jax.Array:
    """P(dt) = expm(Q dt): one (K, K) matrix per time step.

    Args:
        proc: a continuous-time model (`ps.models.MarkovJumpProcess`, `ContinuousTimeHMM`) or a
            (K, K) generator.
        dt: a time step >= 0, or an array of them of any shape.

    Returns:
        ``dt.shape + (K, K)``. On concrete ``dt`` each distinct value is exponentiated once (a batched
        expm over the distinct values); traceable (then one expm per entry).

    Example:
        >>> ps.ctmc.transition_matrix(proc, jnp.array([0.1, 0.5, 0.1])).shape   # 2 expm calls
        (3, K, K)
    """
    Q = _checked(proc)
    d = _dt(dt).astype(Q.dtype)
    if checks.is_concrete(d) and checks.is_concrete(Q) and d.ndim > 0:
        values, inverse = np.unique(np.asarray(d).ravel(), return_inverse=True)
        return expm_batch(Q, jnp.asarray(values, Q.dtype))[inverse].reshape(d.shape + Q.shape)
    return expm_batch(Q, d.ravel()).reshape(d.shape + Q.shape)


def _poisson_terms(x) -> int:
    # Poisson(x) upper tail beyond x + 10 sqrt(x) + 30 is below 1e-17 for every x (Chernoff bound)
    return int(np.ceil(x + 10.0 * np.sqrt(x) + 30.0))


@partial(jax.jit, static_argnames=("num_terms",))
def _uniformization(Q, dts, *, num_terms):
    K = Q.shape[0]
    lam = jnp.max(-jnp.diag(Q))
    lam = jnp.where(lam > 0, lam, 1.0)
    R = jnp.eye(K, dtype=Q.dtype) + Q / lam

    def power(M, _):
        return M @ R, M

    _, powers = lax.scan(power, jnp.eye(K, dtype=Q.dtype), None, length=num_terms)  # R^0 .. R^{N-1}
    n = jnp.arange(num_terms, dtype=Q.dtype)
    x = lam * dts[:, None]
    weights = jnp.exp(-x + xlogy(n, x) - gammaln(n + 1.0))  # Poisson(n; lam dt)
    return jnp.einsum("un,nij->uij", weights, powers)


def uniformization(proc, dt, *, num_terms: Optional[int] = None) -> jax.Array:
    """P(dt) by uniformisation: ``sum_{n < N} Pois(n; lam dt) R^n`` with ``R = I + Q / lam``,
    ``lam = max_i |Q_ii|`` (all terms non-negative, so no cancellation).

    Args:
        proc: a continuous-time model or a (K, K) generator.
        dt: a time step >= 0 or an array of them.
        num_terms: N; default (concrete arguments only) ``lam dt + 10 sqrt(lam dt) + 30`` for the
            largest dt, which leaves a Poisson tail below 1e-17. Required when tracing.

    Returns:
        ``dt.shape + (K, K)``.
    """
    Q = _checked(proc)
    d = _dt(dt).astype(Q.dtype)
    if num_terms is None:
        if not (checks.is_concrete(Q) and checks.is_concrete(d)):
            raise ValueError("num_terms: expected an integer when proc or dt is traced (it fixes the series length)")
        lam = float(np.max(-np.diag(np.asarray(Q)))) if Q.size else 0.0
        num_terms = _poisson_terms(lam * float(np.max(np.asarray(d))) if d.size else 0.0)
    num_terms = checks.positive_int(num_terms, "num_terms")
    return _uniformization(Q, d.ravel(), num_terms=num_terms).reshape(d.shape + Q.shape)


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------
class Path(NamedTuple):
    """One Gillespie path on [0, t_max] in a fixed buffer of ``max_jumps`` jumps.

    jump_times: (max_jumps + 1,) entry 0 is 0 (the start), then the jump times; t_max beyond num_jumps.
    states: (max_jumps + 1,) the state entered at each jump time (entry 0: the initial state); beyond
        num_jumps the last state is repeated, so ``states[searchsorted(jump_times, t, 'right') - 1]``
        is the state at time t.
    num_jumps: () number of jumps recorded.
    truncated: () True when the buffer filled before t_max (more jumps happened than recorded).
    """

    jump_times: jax.Array
    states: jax.Array
    num_jumps: jax.Array
    truncated: jax.Array


@partial(jax.jit, static_argnames=("max_jumps",))
def _gillespie(key, Q, pi, t_max, *, max_jumps):
    K = Q.shape[0]
    k0, kscan = jax.random.split(key)
    z0 = jax.random.categorical(k0, jnp.log(pi))
    rates_out = -jnp.diag(Q)
    off = ~jnp.eye(K, dtype=bool)

    def draw(t, z, k):
        kt, kz = jax.random.split(k)
        rate = rates_out[z]
        dwell = jax.random.exponential(kt, dtype=Q.dtype) / jnp.where(rate > 0, rate, 1.0)
        t_new = jnp.where(rate > 0, t + dwell, jnp.inf)
        logits = jnp.where(off[z], jnp.log(jnp.maximum(Q[z], 0.0)), -jnp.inf)
        return t_new, jax.random.categorical(kz, logits)

    def step(carry, k):
        t, z, alive = carry
        t_new, z_new = draw(t, z, k)
        jump = alive & (t_new <= t_max)
        z_next = jnp.where(jump, z_new, z)
        # padding beyond the last jump holds t_max (finite, so paths vmap and save cleanly)
        return (jnp.where(jump, t_new, t), z_next, jump), (jnp.where(jump, t_new, t_max), z_next, jump)

    keys = jax.random.split(kscan, max_jumps + 1)
    (t, z, alive), (times, states, jumped) = lax.scan(step, (jnp.zeros((), Q.dtype), z0, jnp.array(True)),
                                                      keys[:max_jumps])
    t_next, _ = draw(t, z, keys[max_jumps])
    truncated = alive & (t_next <= t_max)
    zero = jnp.zeros((1,), Q.dtype)
    return Path(jnp.concatenate([zero, times]), jnp.concatenate([z0[None], states]),
                jnp.sum(jumped), truncated)


def _initial(proc):
    if not isinstance(proc, AbstractContinuousTimeSSM):
        raise ValueError(f"proc: expected a continuous-time model (e.g. ps.models.MarkovJumpProcess), got "
                         f"{type(proc).__name__}")
    Q = _checked(proc)
    return Q, jnp.asarray(proc.initial_distribution(), Q.dtype)


def gillespie(key, proc, t_max, max_jumps: int) -> Path:
    """Exact simulation of one path on [0, t_max] (Gillespie's direct method), jitted.

    z(0) ~ pi; in state i the chain waits Exp(|Q_ii|) and jumps to j with probability
    ``Q_ij / |Q_ii|``; an absorbing state ends the path. The buffer holds ``max_jumps`` jumps;
    ``truncated`` says whether the path needed more. ``jax.vmap`` over keys draws many paths.

    Args:
        key: a `jax.random` key.
        proc: a continuous-time model.
        t_max: end of the time window (> 0).
        max_jumps: size of the jump buffer (static).

    Returns:
        `Path`.
    """
    max_jumps = checks.positive_int(max_jumps, "max_jumps")
    Q, pi = _initial(proc)
    t = jnp.asarray(t_max, Q.dtype)
    if checks.is_concrete(t) and not (np.ndim(t) == 0 and np.isfinite(t) and float(t) > 0):
        raise ValueError(f"t_max: expected a finite scalar > 0, got {np.asarray(t_max)}")
    return _gillespie(key, Q, pi, t, max_jumps=max_jumps)


@jax.jit
def _sample_at(key, Q, pi, times):
    dts = jnp.diff(times, prepend=jnp.zeros((1,), times.dtype))
    Ps = jax.vmap(lambda d: expm(Q * d))(dts)
    keys = jax.random.split(key, times.shape[0] + 1)
    z0 = jax.random.categorical(keys[0], jnp.log(pi))

    def step(z, x):
        P, k = x
        z = jax.random.categorical(k, jnp.log(P[z]))
        return z, z

    return lax.scan(step, z0, (Ps, keys[1:]))[1]


def sample_at(key, proc, times) -> jax.Array:
    """The states of one path at sorted times (T,) (the chain starts at time 0 from pi), drawn
    exactly: ``z(t_0) ~ pi P(t_0)``, ``z(t_j) | z(t_{j-1}) ~ P(t_j - t_{j-1})``.

    Args:
        key: a `jax.random` key.
        proc: a continuous-time model.
        times: (T,) non-decreasing times >= 0, or (B, T) for B independent paths.

    Returns:
        (T,) or (B, T) int states.
    """
    Q, pi = _initial(proc)
    t = jnp.asarray(times, Q.dtype)
    if t.ndim not in (1, 2) or t.shape[-1] < 1:
        raise ValueError(f"times: expected shape (T,) or (B, T), got shape {tuple(t.shape)}")
    if checks.is_concrete(t):
        a = np.asarray(t)
        if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(np.diff(a, axis=-1) < 0):
            raise ValueError("times: expected finite, non-decreasing times >= 0")
    if t.ndim == 1:
        return _sample_at(key, Q, pi, t)
    return jax.vmap(_sample_at, in_axes=(0, None, None, 0))(jax.random.split(key, t.shape[0]), Q, pi, t)


@partial(jax.jit, static_argnames=("max_jumps",))
def _bridge(key, Q, a, b, t, *, max_jumps):
    K = Q.shape[0]
    lam = jnp.max(-jnp.diag(Q))
    lam = jnp.where(lam > 0, lam, 1.0)
    R = jnp.eye(K, dtype=Q.dtype) + Q / lam

    def power(M, _):
        return M @ R, M

    _, powers = lax.scan(power, jnp.eye(K, dtype=Q.dtype), None, length=max_jumps + 1)  # R^0 .. R^N
    n_all = jnp.arange(max_jumps + 1, dtype=Q.dtype)
    x = lam * t
    # p(N = n | z(0) = a, z(t) = b) is proportional to Pois(n; lam t) R^n[a, b]
    log_pois = -x + xlogy(n_all, x) - gammaln(n_all + 1.0)
    mass = jnp.exp(log_pois) * powers[:, a, b]
    k_n, k_t, k_z = jax.random.split(key, 3)
    n = jax.random.categorical(k_n, jnp.log(mass))
    truncated = jnp.sum(mass) < (1.0 - 1e-10) * expm(Q * t)[a, b]
    idx = jnp.arange(1, max_jumps + 1)
    # the N jump times are N sorted uniforms on [0, t] (the unused draws sort to the end)
    times = jnp.sort(jnp.where(idx <= n, jax.random.uniform(k_t, (max_jumps,), Q.dtype) * t, jnp.inf))

    def step(z, x):
        i, k = x
        # z_i | z_{i-1} is proportional to R[z_{i-1}, k] R^{n - i}[k, b]
        w = R[z] * powers[jnp.clip(n - i, 0, max_jumps), :, b]
        z_new = jax.random.categorical(k, jnp.log(jnp.maximum(w, 0.0)))
        z_new = jnp.where(i <= n, z_new, z).astype(z.dtype)
        return z_new, z_new

    _, zs = lax.scan(step, a, (idx, jax.random.split(k_z, max_jumps)))
    prev = jnp.concatenate([jnp.reshape(a, (1,)), zs[:-1]])
    real = (idx <= n) & (zs != prev)  # virtual (self) jumps of the uniformised chain are dropped
    slot = jnp.where(real, jnp.cumsum(real), max_jumps + 1)  # compact the real jumps to the front
    out_t = jnp.full((max_jumps + 2,), t, Q.dtype).at[0].set(0.0).at[slot].set(times)[:max_jumps + 1]
    out_z = jnp.full((max_jumps + 2,), b, zs.dtype).at[0].set(a).at[slot].set(zs)[:max_jumps + 1]
    return Path(out_t, out_z, jnp.sum(real), truncated)


def sample_bridge(key, proc, start_state, end_state, t, max_jumps: int) -> Path:
    """A path on [0, t] conditioned on z(0) = ``start_state`` and z(t) = ``end_state``, drawn exactly by
    uniformisation (Hobolth & Stone 2009): for the Poisson-thinned chain with ``R = I + Q / lam``,

        N ~ p(n) proportional to Pois(n; lam t) R^n[a, b];  jump times: N sorted uniforms on [0, t];
        z_i ~ R[z_{i-1}, k] R^{N - i}[k, b] / R^{N - i + 1}[z_{i-1}, b]   (i = 1..N; z_N = b),

    then the self-jumps are dropped. The building block of Gibbs / MCMC over rates given a panel.

    Args:
        key: a `jax.random` key.
        proc: a continuous-time model.
        start_state, end_state: the end-point states a, b (P(t)[a, b] must be > 0).
        t: the duration (> 0).
        max_jumps: buffer of the uniformised chain's jumps (static); ``truncated`` says whether
            N > max_jumps had probability above 1e-10 (then raise it).

    Returns:
        `Path` (jump_times, states, num_jumps, truncated) as `gillespie`'s, ending in ``end_state``.
    """
    max_jumps = checks.positive_int(max_jumps, "max_jumps")
    Q, _ = _initial(proc)
    K = Q.shape[0]
    for name, v in (("start_state", start_state), ("end_state", end_state)):
        if checks.is_concrete(v) and not (np.ndim(v) == 0 and 0 <= int(v) < K and int(v) == v):
            raise ValueError(f"{name}: expected a state in 0..{K - 1}, got {v!r}")
    tt = jnp.asarray(t, Q.dtype)
    if checks.is_concrete(tt) and not (np.ndim(tt) == 0 and np.isfinite(tt) and float(tt) > 0):
        raise ValueError(f"t: expected a finite duration > 0, got {np.asarray(t)}")
    return _bridge(key, Q, jnp.asarray(start_state, jnp.int32), jnp.asarray(end_state, jnp.int32), tt,
                   max_jumps=max_jumps)


# ----------------------------------------------------------------------------------------------
# Panel data
# ----------------------------------------------------------------------------------------------
class Panel(NamedTuple):
    """Panel records prepared once, outside jit (internal; shared with the EM).

    dt_values: (U,) interval lengths (the distinct ones on concrete data).
    index: (B, L - 1) int: which dt_values entry each interval uses.
    codes: (B, L) int observation codes (0..K-1 a state, K.. a censored set).
    valid: (B, L) bool: record j of subject b is real (not padding).
    table: (C, K) indicator of the possible states of each code.
    exact: (C,) bool: the code is an absorbing state entered at a known time.
    covariates: (B, L - 1, P) covariate values on each interval, or None (no covariates).
    """

    dt_values: jax.Array
    index: jax.Array
    codes: jax.Array
    valid: jax.Array
    table: jax.Array
    exact: jax.Array
    covariates: Optional[jax.Array] = None


def _traced(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def _pad(seqs, name, fill):
    xp = jnp if any(_traced(a) for a in seqs) else np
    arrs = []
    for i, a in enumerate(seqs):
        a = xp.asarray(a)
        if a.ndim != 1 or a.shape[0] < 1:
            raise ValueError(f"{name}[{i}]: expected a non-empty 1-D array, got shape {tuple(a.shape)}")
        arrs.append(a)
    L = max(a.shape[0] for a in arrs)
    dtype = np.result_type(*[b.dtype for b in arrs])
    out = xp.stack([xp.pad(a.astype(dtype), (0, L - a.shape[0]), constant_values=fill) for a in arrs])
    return out, np.asarray([a.shape[0] for a in arrs], np.int32)


def _codes_table(K, censored, exact_states, absorbing):
    censored = dict(censored or {})
    table = [np.eye(K)[k] for k in range(K)]
    code_of = {}
    for c, (label, allowed) in enumerate(censored.items()):
        allowed = [int(a) for a in np.atleast_1d(allowed)]
        if not isinstance(label, (int, np.integer)) or label < K:
            raise ValueError(f"censored: expected integer codes >= {K} (the states are 0..{K - 1}), got {label!r}")
        if not allowed or any(a < 0 or a >= K for a in allowed):
            raise ValueError(f"censored: code {label} must map to a non-empty set of states in 0..{K - 1}, "
                             f"got {allowed}")
        row = np.zeros(K)
        row[allowed] = 1.0
        table.append(row)
        code_of[int(label)] = K + c
    exact_states = tuple(int(e) for e in np.atleast_1d(np.asarray(exact_states, dtype=int)))
    for e in exact_states:
        if e < 0 or e >= K:
            raise ValueError(f"exact_states: expected states in 0..{K - 1}, got {e}")
        if e not in absorbing:
            raise ValueError(f"exact_states: state {e} is not absorbing (it has rates out of it); exact entry times "
                             "are for absorbing states such as death")
    exact = np.zeros(len(table), bool)
    exact[list(exact_states)] = True
    return np.stack(table), exact, code_of


def _check_states(a, valid, K, code_of, absorbing):
    """Concrete checks of the (B, L) states: integers, in 0..K-1 or a censored code, no absorbing state left."""
    if np.issubdtype(a.dtype, np.floating) and not np.all(a[valid] == np.round(a[valid])):
        raise ValueError("states: expected integer states")
    a = np.where(valid, a, 0).astype(np.int64)
    ok = (a >= 0) & (a < K)
    for label in code_of:
        ok |= a == label
    if not np.all(ok | ~valid):
        bad = a[~ok & valid][0]
        raise ValueError(f"states: expected states in 0..{K - 1}" +
                         (f" or censored codes {sorted(code_of)}" if code_of else "") + f", found {bad}")
    for b, j in zip(*np.nonzero(valid[:, 1:] & np.isin(a[:, :-1], absorbing))):
        if a[b, j + 1] != a[b, j]:
            raise ValueError(f"states: subject {b} leaves the absorbing state {a[b, j]} (record {j} -> {j + 1}: "
                             f"{a[b, j]} -> {a[b, j + 1]})")
    codes = a.copy()
    for label, c in code_of.items():
        codes[a == label] = c
    return codes


def _record_lengths(lengths, B, L):
    """(B,) integer record counts in 1..L (all L when None); concrete values are checked."""
    if lengths is None:
        return np.full((B,), L, np.int32)
    n = lengths if _traced(lengths) else np.asarray(lengths)
    if n.shape != (B,) or not jnp.issubdtype(n.dtype, jnp.integer):
        raise ValueError(f"lengths: expected integers of shape ({B},), got {n.dtype} of shape {tuple(n.shape)}")
    if not _traced(n) and (np.any(n < 1) or np.any(n > L)):
        raise ValueError(f"lengths: expected values in 1..{L}, got {n.min()}..{n.max()}")
    return n


def _panel_records(times, states, lengths):
    """``(t, s, lengths)`` with a leading subject axis: lists of 1-D arrays are padded (their own
    lengths), a single (L,) record gains the axis; concrete arrays become numpy, traced ones stay."""
    if isinstance(times, (list, tuple)) != isinstance(states, (list, tuple)):
        raise ValueError("states: expected the same layout as times (both (B, L) arrays or both lists)")
    if isinstance(times, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths: times and states given as lists carry their own lengths; expected None")
        if len(times) != len(states) or len(times) == 0:
            raise ValueError(f"states: expected {len(times)} sequences (as many as times), got {len(states)}")
        t, n_t = _pad(times, "times", 0.0)
        s, n_s = _pad(states, "states", 0)
        if not np.array_equal(n_t, n_s):
            raise ValueError(f"states: expected sequences of the lengths of times {n_t.tolist()}, got {n_s.tolist()}")
        return t, s, n_t
    t = times if _traced(times) else np.asarray(times)
    s = states if _traced(states) else np.asarray(states)
    if t.ndim == 1:
        t, s = t[None], (s[None] if s.ndim == 1 else s)
        lengths = None if lengths is None else (lengths if _traced(lengths) else np.asarray(lengths)).reshape(1)
    if t.ndim != 2:
        raise ValueError(f"times: expected shape (B, L) (or (L,), or a list of 1-D arrays), got shape {tuple(t.shape)}")
    return t, s, lengths


def _interval_covariates(covariates, proc, B, L, dtype):
    """(B, L - 1, P) covariate values of each interval from per-subject (B, P) or per-record (B, L, P)
    values (a record's value holds on the interval it starts, as in msm); (P,) and (L, P) for one subject."""
    P = proc.num_covariates
    if P == 0:
        raise ValueError("covariates: the process has no covariate_effects; expected None (or build it with "
                         "MarkovJumpProcess(..., covariate_effects=...))")
    if isinstance(covariates, (list, tuple)) and not any(_traced(a) for a in covariates):
        # one entry per subject: (P,) values, or (L_b, P) per record (padded here with zeros)
        rows = [np.asarray(a, np.float64) for a in covariates]
        if len(rows) != B or any(r.ndim != rows[0].ndim or r.shape[-1:] != (P,) or r.ndim not in (1, 2) or
                                 (r.ndim == 2 and r.shape[0] > L) for r in rows):
            raise ValueError(f"covariates: expected a list of {B} arrays of shape ({P},) or (L_b, {P}) (one per "
                             f"subject), got shapes {[r.shape for r in rows]}")
        covariates = np.stack(rows) if rows[0].ndim == 1 else np.stack(
            [np.concatenate([r, np.zeros((L - r.shape[0], P))]) for r in rows])
    x = jnp.asarray(covariates, dtype) if _traced(covariates) else np.asarray(covariates, np.float64)
    if B == 1 and x.ndim in (1, 2) and x.shape in ((P,), (L, P)):
        x = x[None]
    if x.shape == (B, P):
        x = x[:, None, :] * (np.ones if isinstance(x, np.ndarray) else jnp.ones)((1, L - 1, 1))
    elif x.shape == (B, L, P):
        x = x[:, :-1]
    else:
        raise ValueError(f"covariates: expected shape ({B}, {P}) per subject or ({B}, {L}, {P}) per record, "
                         f"got shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
        raise ValueError("covariates: expected finite values (pad with zeros)")
    return jnp.asarray(x, dtype)


def prepare_panel(proc, times, states, lengths=None, exact_states=(), censored=None, covariates=None) -> Panel:
    """Validate panel data once and build the `Panel` arrays. Concrete data are checked and read in
    numpy (one matrix exponential per distinct interval); traced data (inside the caller's jit) give one
    interval per record pair, unchecked. With ``covariates`` every interval has its own generator."""
    if not isinstance(proc, MarkovJumpProcess):
        raise ValueError(f"proc: expected a ps.models.MarkovJumpProcess, got {type(proc).__name__}")
    K = proc.num_states
    dtype = _checked(proc).dtype
    t, s, lengths = _panel_records(times, states, lengths)
    if s.shape != t.shape:
        raise ValueError(f"states: expected shape {tuple(t.shape)} (that of times), got shape {tuple(s.shape)}")
    B, L = t.shape
    n = _record_lengths(lengths, B, L)
    absorbing = proc.absorbing_states
    table, exact, code_of = _codes_table(K, censored, exact_states, absorbing)
    concrete = not (_traced(t) or _traced(s) or _traced(n))
    if concrete:
        t = t.astype(np.float64)
        valid = np.arange(L)[None, :] < n[:, None]
        codes = _check_states(s, valid, K, code_of, absorbing)
        if not np.all(np.isfinite(t[valid])):
            raise ValueError("times: expected finite times")
        d = np.diff(t, axis=1)
        sv = valid[:, 1:]
        if np.any(d[sv] < 0):
            b, j = np.argwhere((d < 0) & sv)[0]
            raise ValueError(f"times: expected non-decreasing times within each subject; subject {b} goes from "
                             f"{t[b, j]:g} to {t[b, j + 1]:g}")
        values, inverse = np.unique(np.where(sv, d, 0.0).ravel(), return_inverse=True)
        dt_values, index = values, inverse.reshape(d.shape)
    else:
        valid = jnp.arange(L)[None, :] < jnp.asarray(n)[:, None]
        codes = jnp.asarray(s).astype(jnp.int32)
        for label, c in code_of.items():
            codes = jnp.where(codes == label, c, codes)
        dts = jnp.diff(jnp.asarray(t), axis=1)
        dt_values = jnp.where(valid[:, 1:], dts, 0.0).ravel()
        index = jnp.arange(B * (L - 1)).reshape(B, L - 1)
    x = None if covariates is None else _interval_covariates(covariates, proc, B, L, dtype)
    return Panel(jnp.asarray(dt_values, dtype), jnp.asarray(index, jnp.int32), jnp.asarray(codes, jnp.int32),
                 jnp.asarray(valid), jnp.asarray(table, dtype), jnp.asarray(exact), x)


def panel_forward(pi, Ps, jumps, panel: Panel) -> jax.Array:
    """(B,) log-likelihood of each subject given its first record (traceable).

    ``Ps`` (U, K, K) are the transition matrices of ``panel.dt_values``; ``jumps`` (K, K) the
    off-diagonal rates (for exact entries into absorbing states), or (U, K, K) those of each interval
    (covariates). Written in ``Ps`` and ``jumps`` so that their gradients are the E-step weights of EM.
    """
    table, exact = panel.table, panel.exact

    def subject(codes, index, valid):
        e0 = table[codes[0]]
        a0 = pi * e0
        s0 = jnp.sum(a0)
        a0 = jnp.where(s0 > 0, a0 / jnp.where(s0 > 0, s0, 1.0), e0 / jnp.sum(e0))

        def step(alpha, x):
            prev, code, j, ok = x
            v = alpha @ Ps[j]
            e = table[code]
            # the entry into an exact state is the first record in it; later records there add P = 1
            J = jumps[j] if jumps.ndim == 3 else jumps
            a = jnp.where(exact[code] & (prev != code), (v @ J) * e, v * e)
            c = jnp.sum(a)
            c_safe = jnp.where(ok & (c > 0), c, 1.0)
            # the double where keeps the gradient finite on padding and on impossible records
            return jnp.where(ok, a / c_safe, alpha), jnp.where(ok, jnp.where(c > 0, jnp.log(c_safe), -jnp.inf), 0.0)

        _, logc = lax.scan(step, a0, (codes[:-1], codes[1:], index, valid[1:]))
        return jnp.sum(logc)

    return jax.vmap(subject)(panel.codes, panel.index, panel.valid)


def panel_parts(Q):
    """Off-diagonal part of a generator (the jump rates); batched over leading axes."""
    return Q * (1.0 - jnp.eye(Q.shape[-1], dtype=Q.dtype))


def panel_transitions(proc, panel: Panel):
    """``(Ps, jumps, panel)`` for `panel_forward` (traceable): one generator and one exponential per
    distinct interval, or with covariates one generator and one exponential per interval."""
    if panel.covariates is None:
        Q = proc.generator()
        return expm_batch(Q, panel.dt_values), panel_parts(Q), panel
    B, n = panel.index.shape
    Qs = proc.generator(panel.covariates).reshape(B * n, proc.num_states, proc.num_states)
    dts = panel.dt_values[panel.index].reshape(B * n)
    Ps = jax.vmap(lambda Q, d: expm(Q * d))(Qs, dts)
    return Ps, panel_parts(Qs), panel._replace(index=jnp.arange(B * n, dtype=jnp.int32).reshape(B, n))


@partial(jax.jit, static_argnames=("per_subject",))
def _panel_ll(proc, panel, *, per_subject):
    ll = panel_forward(proc.initial_distribution(), *panel_transitions(proc, panel))
    return ll if per_subject else jnp.sum(ll)


def panel_log_likelihood(proc, times, states, *, lengths=None, exact_states=(), censored=None,
                         covariates=None, per_subject: bool = False) -> jax.Array:
    """Log-likelihood of panel data: per-subject (time, state) records of an exactly observed process.

    Each subject's first record is conditioned on; between records the state moves by
    ``P(dt) = expm(Q dt)`` (one exponential per distinct dt on concrete data); subjects are vmapped.

    Args:
        proc: a `ps.models.MarkovJumpProcess`.
        times: (B, L) per-subject record times (non-decreasing within a subject), (L,) for one
            subject, or a list of 1-D arrays (unequal lengths).
        states: integer states 0..K-1 in the layout of ``times`` (or censored codes, below).
        lengths: (B,) number of real records of each padded subject (None: all L).
        exact_states: absorbing states (e.g. death) whose entry time is known exactly: the first record
            in one of them contributes ``sum_k P(dt)[i, k] Q[k, s]`` instead of ``P(dt)[i, s]`` (later
            records in the same absorbing state contribute 1).
        censored: ``{code: states}``: a record holding ``code`` (an integer >= K) means "one of
            ``states``" (e.g. ``{99: (0, 1, 2)}``: alive, grade unknown). The likelihood sums over them.
        covariates: values of the process's P covariates (its ``covariate_effects``): (B, P) per
            subject, or (B, L, P) per record, where a record's values hold on the interval it starts
            (msm's convention); (P,) or (L, P) for one subject. The rates of each interval are then
            ``rates * exp(x @ covariate_effects)``, with one matrix exponential per interval.
        per_subject: return the (B,) per-subject values instead of their sum.

    Returns:
        () the total log-likelihood (or (B,) with ``per_subject``). Traceable in the model (jit, vmap,
        grad over rates); the data are validated when concrete.

    Raises:
        ValueError: naming ``times`` (decreasing), ``states`` (outside 0..K-1, leaving an absorbing
            state), ``lengths``, ``exact_states`` (not absorbing), ``censored`` or ``covariates``
            (wrong shape, non-finite, or a process without covariate effects).

    Example:
        >>> ps.ctmc.panel_log_likelihood(proc, [t1, t2], [s1, s2], exact_states=(3,))
    """
    panel = prepare_panel(proc, times, states, lengths, exact_states, censored, covariates)
    return _panel_ll(proc, panel, per_subject=bool(per_subject))


# ----------------------------------------------------------------------------------------------
# Exactly observed paths (every jump time and the state it enters)
# ----------------------------------------------------------------------------------------------
class PathStatistics(NamedTuple):
    """Sufficient statistics of exactly observed paths (`path_statistics`).

    The log-likelihood of the paths given their first states is
    ``sum_{i != j} jumps[i, j] log Q[i, j] - sum_i dwell[i] q_i`` (``q_i = -Q[i, i]``), so with a
    Gamma(a, b) prior on a free rate Q[i, j] its posterior is Gamma(a + jumps[i, j], b + dwell[i]) and
    its maximum-likelihood value is ``jumps[i, j] / dwell[i]``.

    jumps: (K, K) number of jumps i -> j (zero diagonal); (B, K, K) per subject.
    dwell: (K,) total time spent in each state (the last sojourn of each subject up to ``t_end``);
        (B, K) per subject.
    """

    jumps: jax.Array
    dwell: jax.Array


def _absorbing_of(Q):
    """States with no rate out of them, when the generator's values can be read (else none)."""
    if not checks.is_concrete(Q):
        return ()
    return tuple(int(k) for k in np.nonzero(np.all(np.asarray(Q) == 0, axis=-1))[0])


def _path_arrays(K, times, states, lengths, t_end, absorbing, dtype):
    """(t (B, L), s (B, L), n (B,), t_end (B,)) of exactly observed paths; concrete data are validated."""
    t, s, n = _panel_records(times, states, lengths)
    if s.shape != t.shape:
        raise ValueError(f"states: expected shape {tuple(t.shape)} (that of times), got shape {tuple(s.shape)}")
    B, L = t.shape
    if L < 1:
        raise ValueError("times: expected at least one record (the initial state) per subject, got L = 0")
    n = _record_lengths(n, B, L)
    if t_end is not None:
        t_end = t_end if _traced(t_end) else np.asarray(t_end)
        if t_end.ndim == 1 and t_end.shape != (B,) or t_end.ndim > 1:
            raise ValueError(f"t_end: expected a scalar or shape ({B},), got shape {tuple(t_end.shape)}")
    if not (_traced(t) or _traced(s) or _traced(n)):
        valid = np.arange(L)[None, :] < n[:, None]
        tv = np.asarray(t, np.float64)
        if not np.all(np.isfinite(tv[valid])):
            raise ValueError("times: expected finite times")
        d = np.diff(tv, axis=1)
        sv = valid[:, 1:]
        if np.any(d[sv] < 0):
            b, j = np.argwhere((d < 0) & sv)[0]
            raise ValueError(f"times: expected non-decreasing jump times within each subject; subject {b} goes from "
                             f"{tv[b, j]:g} to {tv[b, j + 1]:g}")
        sa = np.asarray(s)
        if not (jnp.issubdtype(sa.dtype, jnp.integer) or np.all(sa[valid] == np.round(sa[valid]))):
            raise ValueError("states: expected integer states")
        sa = np.where(valid, sa, 0).astype(np.int64)
        if np.any((sa < 0) | (sa >= K)):
            raise ValueError(f"states: expected states in 0..{K - 1}, found {sa[(sa < 0) | (sa >= K)][0]}")
        for b, j in zip(*np.nonzero(sv & (sa[:, 1:] == sa[:, :-1]))):
            raise ValueError(f"states: subject {b} jumps from state {sa[b, j]} to itself (records {j} -> {j + 1}); "
                             "each record after the first is a jump into a different state")
        for b, j in zip(*np.nonzero(sv & np.isin(sa[:, :-1], absorbing))):
            raise ValueError(f"states: subject {b} leaves the absorbing state {sa[b, j]} (records {j} -> {j + 1}: "
                             f"{sa[b, j]} -> {sa[b, j + 1]})")
        if t_end is not None and not _traced(t_end):
            te = np.broadcast_to(np.asarray(t_end, np.float64), (B,))
            last = tv[np.arange(B), n - 1]
            if not np.all(np.isfinite(te)):
                raise ValueError("t_end: expected finite end times")
            if np.any(te < last):
                b = int(np.argmax(te < last))
                raise ValueError(f"t_end: expected the end of observation at or after the last jump; subject {b} ends "
                                 f"at {te[b]:g} before its last jump at {last[b]:g}")
        s = sa
    t = jnp.asarray(t).astype(dtype)
    n = jnp.asarray(n, jnp.int32)
    if t_end is None:
        te = jnp.take_along_axis(t, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    else:
        te = jnp.broadcast_to(jnp.asarray(t_end).astype(dtype), (B,))
    return t, jnp.asarray(s).astype(jnp.int32), n, te


@partial(jax.jit, static_argnames=("num_states",))
def _path_statistics(t, s, n, t_end, *, num_states):
    L = t.shape[1]
    j = jnp.arange(L)[None, :]
    valid = j < n[:, None]
    t = jnp.where(valid, t, 0.0)
    # a sojourn ends at the next record, the last one (censored, no jump) at t_end
    t_next = jnp.concatenate([t[:, 1:], t_end[:, None]], axis=1)
    t_next = jnp.where(j == n[:, None] - 1, t_end[:, None], t_next)
    duration = jnp.where(valid, t_next - t, 0.0)
    onehot = jax.nn.one_hot(jnp.where(valid, s, 0), num_states, dtype=t.dtype)
    dwell = jnp.einsum("bl,blk->bk", duration, onehot)
    jumped = valid[:, 1:].astype(t.dtype)
    jumps = jnp.einsum("bl,bli,blj->bij", jumped, onehot[:, :-1], onehot[:, 1:])
    return PathStatistics(jumps, dwell)


def statistics_log_likelihood(generator, statistics: PathStatistics) -> jax.Array:
    """``sum_{i != j} N_ij log Q_ij - sum_i T_i q_i`` from `PathStatistics` (per subject when they have a
    leading axis). Traceable; a jump along a zero rate (or i -> i) gives -inf with a finite gradient."""
    Q = jnp.asarray(generator)
    K = Q.shape[-1]
    off = ~jnp.eye(K, dtype=bool)
    rate = jnp.where(off, Q, 0.0)
    N = jnp.asarray(statistics.jumps, Q.dtype)
    used = N > 0
    possible = rate > 0
    log_rate = jnp.log(jnp.where(possible, rate, 1.0))
    terms = jnp.where(used, jnp.where(possible, N * log_rate, -jnp.inf), 0.0)
    exit_rates = -jnp.diagonal(Q, axis1=-2, axis2=-1)
    return jnp.sum(terms, axis=(-2, -1)) - jnp.sum(jnp.asarray(statistics.dwell, Q.dtype) * exit_rates, axis=-1)


def path_statistics(proc, times, states, *, lengths=None, t_end=None, per_subject: bool = False) -> PathStatistics:
    """Transition counts N_ij and dwell times T_i of exactly observed paths.

    Args:
        proc: a continuous-time model (`ps.models.MarkovJumpProcess`) or a (K, K) generator (it fixes K
            and, when concrete, the absorbing states the data may not leave).
        times: (B, L) per subject: the start time of the observation, then the jump times
            (non-decreasing); (L,) for one subject; or a list of 1-D arrays (unequal lengths).
        states: integer states 0..K-1 in the layout of ``times``: the state at the start, then the state
            entered at each jump (each different from the one before).
        lengths: (B,) number of real records of each padded subject, 1 + its number of jumps (None: all L).
            A batch of `gillespie` paths: ``times=path.jump_times, states=path.states,
            lengths=path.num_jumps + 1, t_end=t_max``.
        t_end: end of observation, a scalar or (B,) (>= each subject's last jump): the last sojourn is
            censored there (time in the state, no jump). None: observation ends at the last record.
        per_subject: return (B, K, K) and (B, K) instead of their sums over subjects.

    Returns:
        `PathStatistics` ``(jumps, dwell)``. Traceable (jit, vmap, grad with respect to the times); the data
        are validated when concrete.

    Raises:
        ValueError: naming ``times`` (decreasing, not finite), ``states`` (outside 0..K-1, a jump i -> i,
            leaving an absorbing state), ``lengths`` or ``t_end`` (before the last jump).
    """
    Q = _checked(proc)
    K = Q.shape[0]
    t, s, n, te = _path_arrays(K, times, states, lengths, t_end, _absorbing_of(Q), Q.dtype)
    stats = _path_statistics(t, s, n, te, num_states=K)
    if per_subject:
        return stats
    return PathStatistics(jnp.sum(stats.jumps, axis=0), jnp.sum(stats.dwell, axis=0))


def path_log_likelihood(proc, times, states, *, lengths=None, t_end=None, per_subject: bool = False) -> jax.Array:
    """Log-likelihood of exactly observed paths (every jump time and the state it enters), given each
    subject's first state::

        log L = sum over jumps i -> j of log Q[i, j]  -  sum over sojourns in i of q_i * (its duration)

    with ``q_i = -Q[i, i]``; each subject's last sojourn is censored at ``t_end`` (no jump). It depends on
    the data only through `path_statistics` (N_ij, T_i), and is maximised by ``Q[i, j] = N_ij / T_i``.

    Args:
        proc: a continuous-time model (`ps.models.MarkovJumpProcess`) or a (K, K) generator.
        times, states, lengths, t_end: as in `path_statistics`.
        per_subject: return the (B,) per-subject values instead of their sum.

    Returns:
        () the total log-likelihood (or (B,)). Traceable in the model and the data (jit, vmap, grad over
        rates); -inf for a jump along a zero rate.

    Raises:
        ValueError: as `path_statistics`.

    Example:
        >>> paths = jax.vmap(lambda k: ps.ctmc.gillespie(k, proc, 10.0, 64))(jax.random.split(key, 100))
        >>> ps.ctmc.path_log_likelihood(proc, paths.jump_times, paths.states, lengths=paths.num_jumps + 1,
        ...                             t_end=10.0)
    """
    Q = _checked(proc)
    stats = path_statistics(Q, times, states, lengths=lengths, t_end=t_end, per_subject=per_subject)
    return statistics_log_likelihood(Q, stats)


# ----------------------------------------------------------------------------------------------
# Continuous-time HMMs at irregular observation times: the ps.hmm cores on A_t = expm(Q dt_t)
# ----------------------------------------------------------------------------------------------
def prepare_hmm(model, times, emissions, lengths):
    if not isinstance(model, AbstractContinuousTimeSSM):
        raise ValueError(f"model: expected a continuous-time model (e.g. ps.models.ContinuousTimeHMM), got "
                         f"{type(model).__name__}")
    Q = _checked(model, "model")
    if isinstance(times, (list, tuple)):
        times = [jnp.asarray(a)[:, None] for a in times]
    else:
        times = jnp.asarray(times)
        times = times[..., None]
    if isinstance(emissions, (list, tuple)) != isinstance(times, list):
        raise ValueError("times: expected the layout of emissions (both arrays or both lists)")
    batch = as_batch(emissions, times, lengths)
    D = model.emission_dim
    if batch.emissions.shape[-1] != D:
        raise ValueError(f"emissions: expected shape (T, {D}) or (B, T, {D}), got shape {tuple(batch.emissions.shape)}")
    T = batch.num_timesteps
    t = jnp.asarray(batch.inputs)[..., 0].astype(Q.dtype)
    if batch.batched and not batch.inputs_batched:
        t = jnp.broadcast_to(t, (batch.batch_size, T))
    n = batch.lengths
    if checks.is_concrete(t):
        a = np.asarray(t)
        nn = np.full(a.shape[:-1], T) if n is None else np.asarray(n)
        valid = np.arange(T) < np.asarray(nn)[..., None]
        if not np.all(np.isfinite(a[valid])):
            raise ValueError("times: expected finite times")
        d = np.diff(a, axis=-1)
        if np.any(d[valid[..., 1:]] < 0):
            raise ValueError("times: expected non-decreasing observation times within each sequence")
    if checks.is_concrete(batch.emissions):
        y = np.array(batch.emissions)
        if np.any(np.isinf(y)):
            raise ValueError("emissions: found inf; use NaN to mark missing values")
        if n is not None and checks.is_concrete(n):
            y[np.arange(T) >= np.asarray(n)[..., None]] = np.nan
        model.check_emissions(y)
    return batch.emissions, t, n, batch.batched


def _one_params(model, times, y, n, exact=()):
    T = times.shape[0]
    if n is not None:
        # padding repeats the last real time (dt = 0, identity transitions) so no NaN enters expm
        times = jnp.where(jnp.arange(T) < n, times, times[jnp.maximum(n - 1, 0)])
    Q = model.generator()
    dts = jnp.diff(times, prepend=times[:1])
    A = jax.vmap(lambda d: expm(Q * d))(dts)
    if exact:
        A = _exact_entries(A, Q, y, exact)
    return DiscreteParams(model.initial_distribution(), A, model.emission_log_likelihoods(y))


def _exact_entries(A, Q, y, exact):
    """Steps whose label is an exactly timed entry into an absorbing state s (the label equals s and the
    previous label does not): the chain was elsewhere just before and jumped into s at that instant, so
    the step's matrix is ``(P(dt) Q_off)[:, s]`` in column s and zero elsewhere (the forward pass does not
    need stochastic matrices; its normaliser then carries the density of the entry time)."""
    K = Q.shape[0]
    lab = y[:, 0]
    prev = jnp.concatenate([jnp.full((1,), jnp.nan, lab.dtype), lab[:-1]])
    cols = jnp.zeros((lab.shape[0], K), A.dtype)
    for s in exact:
        cols = cols.at[:, s].set(jnp.where((lab == s) & (prev != s), 1.0, 0.0))
    cols = cols.at[0].set(0.0)  # the first record has no interval before it
    entry = jnp.any(cols > 0, axis=-1)
    PQ = A @ panel_parts(Q)
    return jnp.where(entry[:, None, None], PQ * cols[:, None, :], A)


def exact_state_labels(model, exact_states, emission_dim):
    ex = tuple(int(e) for e in np.atleast_1d(np.asarray(exact_states, dtype=int)))
    if not ex:
        return ex
    if emission_dim != 1:
        raise ValueError(f"exact_states: exactly timed entries are read from integer labels (emission_dim 1); the model "
                         f"has emission_dim {emission_dim}")
    Q = model.generator()
    if not checks.is_concrete(Q):  # a traced model: the checks need values
        return ex
    absorbing = tuple(int(k) for k in np.nonzero(np.all(np.asarray(Q) == 0, axis=-1))[0])
    for e in ex:
        if e < 0 or e >= model.num_states:
            raise ValueError(f"exact_states: expected states in 0..{model.num_states - 1}, got {e}")
        if e not in absorbing:
            raise ValueError(f"exact_states: state {e} is not absorbing (it has rates out of it); exact entry times "
                             "are for absorbing states such as death")
    return ex


@partial(eqx.filter_jit)
def run_hmm(model, y, t, n, mode, batched, exact=()):
    def one(yy, tt, nn):
        p = _one_params(model, tt, yy, nn, exact)
        if mode == "filter":
            return filter_params(p, length=nn)
        if mode == "smoother":
            return smoother_params(p, length=nn)
        return viterbi_params(p, length=nn)

    if not batched:
        return one(y, t, n)
    return jax.vmap(one, in_axes=(0, 0, None if n is None else 0))(y, t, n)


def filter(model, times, emissions, *, lengths=None, exact_states=()) -> FilterResult:
    """Forward pass of a continuous-time HMM at irregular observation times.

    With ``A_t = expm(Q (t_t - t_{t-1}))`` the model is a discrete HMM on its observation times, run
    by the forward pass of ``ps.hmm``; the first observation's state is drawn from pi.

    Args:
        model: a `ps.models.ContinuousTimeHMM` (or any `AbstractContinuousTimeSSM`; a
            `MarkovJumpProcess` sees its states exactly).
        times: (T,) sorted observation times, (B, T) one row per sequence, or a list of 1-D arrays.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays; NaN = missing.
        lengths: (B,) real lengths of padded sequences.
        exact_states: absorbing states (e.g. death) whose entry time is known exactly and whose label is
            not misclassified (msm's ``deathexact``): a record labelled s in ``exact_states`` after a record
            with another label contributes ``sum_k P(dt)[i, k] Q[k, s]`` (times its emission probability)
            instead of ``P(dt)[i, s]``. Needs integer labels (emission_dim 1).

    Returns:
        `FilterResult`: log_likelihood (), filtered_probs (T, K) p(z(t_t) | y_{0:t}) (leading B for
        a batch; zero on padding).
    """
    y, t, n, batched = prepare_hmm(model, times, emissions, lengths)
    return run_hmm(model, y, t, n, "filter", batched, exact_state_labels(model, exact_states, model.emission_dim))


def smoother(model, times, emissions, *, lengths=None, exact_states=()) -> SmootherResult:
    """Forward-backward of a continuous-time HMM: smoothed state probabilities p(z(t_t) | y) at the
    observation times. Arguments as `filter`; returns a `SmootherResult` (log_likelihood,
    filtered_probs, smoothed_probs (T, K), transition_counts: expected pairs (z(t_{t-1}), z(t_t)))."""
    y, t, n, batched = prepare_hmm(model, times, emissions, lengths)
    return run_hmm(model, y, t, n, "smoother", batched, exact_state_labels(model, exact_states, model.emission_dim))


def viterbi(model, times, emissions, *, lengths=None, exact_states=()) -> jax.Array:
    """Most likely states at the observation times, argmax p(z(t_0), ..., z(t_{T-1}) | y).
    Arguments as `filter`; returns (T,) int (or (B, T); -1 on padding)."""
    y, t, n, batched = prepare_hmm(model, times, emissions, lengths)
    return run_hmm(model, y, t, n, "viterbi", batched, exact_state_labels(model, exact_states, model.emission_dim))


@eqx.filter_jit
def _state_probs_at(model, times, y, query):
    T, S = times.shape[0], query.shape[0]
    all_t = jnp.concatenate([times, query])
    # observations sort before queries at equal times (stable sort), so a query sees the record at its time
    order = jnp.argsort(all_t, stable=True)
    missing = jnp.full((S, y.shape[1]), jnp.nan, y.dtype)
    ys = jnp.concatenate([y, missing])[order]
    r = smoother_params(_one_params(model, all_t[order], ys, None))
    where = jnp.argsort(order)[T:]  # position of each query in the merged grid
    return r.smoothed_probs[where]


def state_probs_at(model, times, emissions, query_times) -> jax.Array:
    """Posterior state probabilities p(z(s) | y) at any times s of one sequence (between, before or after
    the observation times): the query times join the grid as missing observations and forward-backward
    runs on the merged grid (exact). Before the first observation the chain starts from pi at that time.

    Args:
        model: a continuous-time model.
        times: (T,) sorted observation times; emissions: (T, D) (NaN = missing).
        query_times: (S,) times in any order. The chain's law at the earliest grid time is pi, so a
            query before the first observation moves that start to the query time.

    Returns:
        (S, K) probabilities, in the order of ``query_times``.
    """
    y, t, n, batched = prepare_hmm(model, times, emissions, None)
    if batched:
        raise ValueError(f"emissions: expected one sequence (T, D), got shape {tuple(y.shape)}")
    q = jnp.asarray(query_times, t.dtype)
    if q.ndim != 1:
        raise ValueError(f"query_times: expected shape (S,), got shape {tuple(q.shape)}")
    if checks.is_concrete(q) and not np.all(np.isfinite(np.asarray(q))):
        raise ValueError("query_times: expected finite times")
    return _state_probs_at(model, t, y, q)


# ----------------------------------------------------------------------------------------------
# Data of a continuous-time model, prepared once for a learner that evaluates many models (ps.mcmc)
# ----------------------------------------------------------------------------------------------
def prepare_data(model, data, lengths=None, exact_states=(), censored=None):
    """Validate the data of a continuous-time model once, outside jit: ``(arrays, how)``, a pytree of
    arrays and a hashable description for `prepared_log_likelihood`.

    ``data`` is `PathStatistics` (exactly observed paths, from `path_statistics`), or the pair
    ``(times, states)`` of panel records (a model that `observes_states`, as `panel_log_likelihood`) or
    ``(times, emissions)`` (a hidden-state model, as `filter`), the pair ``ps.learn.mle`` takes.
    """
    if not isinstance(model, AbstractContinuousTimeSSM):
        raise ValueError(f"model: expected a continuous-time model, got {type(model).__name__}")
    Q = _checked(model, "model")
    if isinstance(data, PathStatistics):
        if lengths is not None or tuple(exact_states) or censored is not None:
            raise ValueError("lengths: path statistics are sums over the paths; expected no lengths, exact_states "
                             "or censored")
        K = model.num_states
        N, T = jnp.asarray(data.jumps, Q.dtype), jnp.asarray(data.dwell, Q.dtype)
        if N.shape[-2:] != (K, K) or T.shape[-1:] != (K,) or N.shape[:-2] != T.shape[:-1]:
            raise ValueError(f"emissions: expected path statistics of shapes (..., {K}, {K}) and (..., {K}), got "
                             f"{tuple(N.shape)} and {tuple(T.shape)}")
        for name, a in (("jumps", N), ("dwell", T)):
            if checks.is_concrete(a) and not np.all(np.isfinite(np.asarray(a)) & (np.asarray(a) >= 0)):
                raise ValueError(f"emissions: expected finite, non-negative path statistics ({name})")
        return PathStatistics(N, T), ("paths",)
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3) or (len(data) == 3 and not model.observes_states):
        raise ValueError("emissions: expected the data of a continuous-time model as a pair (times, states) or "
                         "(times, emissions), a triple (times, states, covariates) of panel records, or "
                         "ps.ctmc.path_statistics(...) of exactly observed paths")
    if model.observes_states:
        covariates = data[2] if len(data) == 3 else None
        return prepare_panel(model, data[0], data[1], lengths, exact_states, censored, covariates), ("panel",)
    if censored is not None:
        raise ValueError("censored: a continuous-time HMM expresses uncertain labels through its emissions; "
                         "expected None")
    y, t, n, batched = prepare_hmm(model, data[0], data[1], lengths)
    return (y, t, n), ("hmm", bool(batched), exact_state_labels(model, exact_states, model.emission_dim))


def prepared_log_likelihood(model, arrays, how) -> jax.Array:
    """Per-subject (or per-sequence) log-likelihoods of data prepared by `prepare_data` (traceable in
    the model; ``how`` static)."""
    Q = model.generator()
    if how[0] == "paths":
        return statistics_log_likelihood(Q, arrays)
    if how[0] == "panel":
        return panel_forward(model.initial_distribution(), *panel_transitions(model, arrays))
    y, t, n = arrays
    return run_hmm(model, y, t, n, "filter", how[1], how[2]).log_likelihood


# ----------------------------------------------------------------------------------------------
# Aggregated Markov processes: only the class of the state is seen, with exact dwell times
# ----------------------------------------------------------------------------------------------
_TAYLOR_DEGREE = 16      # Taylor series of expm on a non-negative matrix of norm <= 1/2: remainder < 1e-20
_MAX_DWELL_SQUARINGS = 48  # norms up to 2**47 (rate x dwell time)


def _stationary(Q):
    """Stationary distribution p (p Q = 0, sum p = 1) of an irreducible generator (traceable)."""
    K = Q.shape[0]
    ones = jnp.ones((K,), Q.dtype)
    return jnp.linalg.solve(Q.T + jnp.ones((K, K), Q.dtype), ones)


def _entry_distributions(Q, masks):
    """(C, K) equilibrium distributions of the state entered at the start of a sojourn in each class:
    ``phi_A proportional to p_(not A) Q_(not A, A)`` (p stationary), zero outside A."""
    p = _stationary(Q)
    off = panel_parts(Q)
    flow = jnp.einsum("ck,kj,cj->cj", p[None, :] * (1.0 - masks), off, masks)
    s = jnp.sum(flow, axis=-1, keepdims=True)
    return flow / jnp.where(s > 0, s, 1.0)


def _uniformized_expm(N, t):
    """``expm(N t) = exp(L) E`` for a non-negative (K, K) ``N`` and a time t >= 0: the Taylor series
    (no cancellation: every term is non-negative) on ``N t / 2**s`` (norm <= 1/2), then s squarings,
    each renormalised into the log scale L (so nothing under- or overflows)."""
    K = N.shape[-1]
    A = N * t
    norm = jnp.max(jnp.sum(A, axis=-1))
    s = jnp.ceil(jnp.log2(jnp.maximum(norm, jnp.finfo(A.dtype).tiny) / 0.5))
    s = lax.stop_gradient(jnp.clip(s, 0, _MAX_DWELL_SQUARINGS)).astype(jnp.int32)
    X = A / (2.0 ** s).astype(A.dtype)
    eye = jnp.eye(K, dtype=A.dtype)
    P = eye
    for j in range(_TAYLOR_DEGREE, 0, -1):
        P = eye + (X @ P) / j

    def square(carry, i):
        P, L = carry
        P2 = P @ P
        c = lax.stop_gradient(jnp.max(P2))
        return (jnp.where(i < s, P2 / c, P), jnp.where(i < s, 2.0 * L + jnp.log(c), L)), None

    (P, L), _ = lax.scan(square, (P, jnp.zeros((), A.dtype)), jnp.arange(_MAX_DWELL_SQUARINGS))
    return P, L


@jax.custom_jvp
def _symmetric_expm(S, t, cls):
    """``expm(S[cls_n] t_n) = exp(L_n) E_n`` for symmetric (C, K, K) ``S`` (one eigendecomposition per
    class), shifted by the largest eigenvalue so that E stays in [-1, 1]. Its derivative is the
    Daleckii-Krein formula with divided differences of exp, so it stays finite at repeated
    eigenvalues (where the derivative of ``eigh`` does not)."""
    return _symmetric_expm_parts(S, t, cls)[:2]


def _symmetric_expm_parts(S, t, cls):
    w, V = jnp.linalg.eigh(S)
    m = w[:, -1]
    wc, Vc, mc = w[cls], V[cls], m[cls]
    shifted = wc - mc[:, None]
    E = jnp.einsum("nik,nk,njk->nij", Vc, jnp.exp(shifted * t[:, None]), Vc)
    return E, mc * t, (V, shifted, mc)


@_symmetric_expm.defjvp
def _symmetric_expm_jvp(primals, tangents):
    S, t, cls = primals
    dS, dt, _ = tangents
    E, L, (V, shifted, mc) = _symmetric_expm_parts(S, t, cls)
    Vc = V[cls]
    dSv = jnp.einsum("cki,ckl,clj->cij", V, dS, V)[cls]        # V^T dS V per dwell
    a, b = shifted[:, :, None], shifted[:, None, :]
    tt = t[:, None, None]
    x = -jnp.abs(a - b) * tt                                  # <= 0
    small = jnp.abs(x) < 1e-8
    x_safe = jnp.where(small, -1.0, x)
    ratio = jnp.where(small, 1.0 + 0.5 * x, jnp.expm1(x_safe) / x_safe)
    G = jnp.exp(jnp.maximum(a, b) * tt) * tt * ratio          # (e^{a t} - e^{b t}) / (a - b), shifted
    dm = dSv[:, -1, -1]                                       # derivative of the largest eigenvalue
    Sc = S[cls]
    K = S.shape[-1]
    dE = (jnp.einsum("nik,nkl,njl->nij", Vc, G * dSv, Vc) - (t * dm)[:, None, None] * E
          + dt[:, None, None] * ((Sc - mc[:, None, None] * jnp.eye(K, dtype=S.dtype)) @ E))
    dL = dm * t + mc * dt
    return (E, L), (dE, dL)


def _reversible(Q, tol: float = 1e-8) -> bool:
    """Whether a concrete generator is irreducible with a positive stationary distribution satisfying
    detailed balance ``p_i Q_ij = p_j Q_ji``."""
    q = np.asarray(Q, np.float64)
    K = q.shape[0]
    try:
        p = np.linalg.solve(q.T + np.ones((K, K)), np.ones(K))
    except np.linalg.LinAlgError:
        return False
    if not np.all(np.isfinite(p)) or np.any(p <= 1e-300):
        return False
    flux = p[:, None] * q
    return bool(np.all(np.abs(flux - flux.T) <= tol * max(np.max(np.abs(flux)), 1e-300)))


def _dwell_exponentials(Q, masks, t, cls, method):
    """Per dwell n: ``expm(Q_AA t_n) = exp(L_n) E_n`` for its class A = cls_n; E (N, K, K) is zero off
    the A x A block. ``method`` "expm" (any generator) or "spectral" (reversible generators)."""
    K = Q.shape[0]
    q = -jnp.diagonal(Q)
    block = masks[:, :, None] * masks[:, None, :]            # (C, K, K)
    lam = jnp.max(jnp.where(masks > 0, q[None, :], -jnp.inf), axis=-1)   # (C,) fastest exit in the class
    if method == "expm":
        # uniformised: Q_AA = N_A - lam_A I with N_A >= 0
        N = (Q[None] + lam[:, None, None] * jnp.eye(K, dtype=Q.dtype)) * block
        E, L = jax.vmap(_uniformized_expm)(N[cls], t)
        return E * block[cls], L - lam[cls] * t
    p = _stationary(Q)
    d = jnp.sqrt(jnp.maximum(p, jnp.finfo(Q.dtype).tiny))
    Sym = d[:, None] * Q / d[None, :]
    Sym = 0.5 * (Sym + Sym.T)                                 # exact for a reversible generator
    # outside the class the diagonal holds distinct values below -2 lam (so below every eigenvalue of the
    # class block, by Gershgorin, and never repeated: second derivatives through eigh stay finite);
    # those entries are masked out after
    spread = 3.0 + jnp.arange(K, dtype=Q.dtype)
    fill = jnp.diag(spread)[None] * lax.stop_gradient(-lam)[:, None, None] * (1.0 - masks)[:, :, None]
    S = Sym[None] * block + fill
    E, L = _symmetric_expm(S, t, cls)
    E = E / d[None, :, None] * d[None, None, :]
    return E * block[cls], L


@partial(jax.jit, static_argnames=("method", "per_record"))
def _dwell_ll(Q, masks, t, c, n, censor, initial, *, method, per_record):
    B, N = t.shape
    C, K = masks.shape
    off = panel_parts(Q)
    j = jnp.arange(N)
    valid = j[None, :] < n[:, None]
    t = jnp.where(valid, t, 0.0)
    c = jnp.where(valid, c, 0)
    E, L = _dwell_exponentials(Q, masks, t.ravel(), c.ravel(), method)
    E, L = E.reshape(B, N, K, K), L.reshape(B, N)
    if initial is None:
        initial = _entry_distributions(Q, masks)[c[:, 0]]

    def record(E, L, c, n, censor, init):
        a0 = init * masks[c[0]]
        s0 = jnp.sum(a0)
        alpha0 = a0 / jnp.where(s0 > 0, s0, 1.0)
        c_next = jnp.concatenate([c[1:], c[-1:]])

        def step(alpha, x):
            Ej, Lj, a, b, jj = x
            last = jj == n - 1
            ok = jj < n
            v = alpha @ Ej
            ma = masks[a]
            to = jnp.where(last, 1.0 - ma, masks[b])
            u = jnp.where(last & censor, v, v @ (off * ma[:, None] * to[None, :]))
            s = jnp.sum(u)
            good = ok & (s > 0)
            s_safe = jnp.where(good, s, 1.0)
            logc = jnp.where(ok, jnp.where(s > 0, jnp.log(s_safe) + Lj, -jnp.inf), 0.0)
            return jnp.where(good, u / s_safe, alpha), logc

        _, logc = lax.scan(step, alpha0, (E, L, c, c_next, j))
        return jnp.sum(logc) + jnp.where(s0 > 0, 0.0, -jnp.inf)

    ll = jax.vmap(record)(E, L, c, n, censor, initial)
    return ll if per_record else jnp.sum(ll)


def _class_masks(classes, K, dtype):
    if not checks.is_concrete(classes):
        raise ValueError(f"classes: expected a concrete ({K},) array of class labels (it fixes the number of "
                         "classes), got a traced array")
    a = np.asarray(classes)
    if a.shape != (K,):
        raise ValueError(f"classes: expected shape ({K},) (a class label per state), got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.int64)   # True = class 1 (e.g. open), False = class 0 (shut)
    if not (np.issubdtype(a.dtype, np.integer) or np.all(a == np.round(a))):
        raise ValueError("classes: expected integer class labels 0..C-1 (or a boolean mask of the 'open' states)")
    a = a.astype(np.int64)
    if np.any(a < 0):
        raise ValueError(f"classes: expected labels >= 0, found {a.min()}")
    C = int(a.max()) + 1
    empty = [k for k in range(C) if not np.any(a == k)]
    if empty:
        raise ValueError(f"classes: class {empty[0]} has no states (labels must be 0..C-1, each used at least once)")
    return jnp.asarray(np.eye(C)[a].T, dtype), C


def _records(x):
    """A list or tuple of 1-D records (not a flat list of numbers)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and np.ndim(x[0]) >= 1


def _dwell_arrays(dwell_times, dwell_classes, lengths, C, dtype):
    dwell_times = dwell_times if _records(dwell_times) or _traced(dwell_times) else np.asarray(dwell_times)
    dwell_classes = dwell_classes if _records(dwell_classes) or _traced(dwell_classes) else np.asarray(dwell_classes)
    if isinstance(dwell_times, (list, tuple)) != isinstance(dwell_classes, (list, tuple)):
        raise ValueError("dwell_classes: expected the same layout as dwell_times (both (B, N) arrays or both lists)")
    if isinstance(dwell_times, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths: records given as lists carry their own lengths; expected None")
        if len(dwell_times) != len(dwell_classes) or len(dwell_times) == 0:
            raise ValueError(f"dwell_classes: expected {len(dwell_times)} records (as many as dwell_times), got "
                             f"{len(dwell_classes)}")
        t, n_t = _pad(dwell_times, "dwell_times", 0.0)
        c, n_c = _pad(dwell_classes, "dwell_classes", 0)
        if not np.array_equal(n_t, n_c):
            raise ValueError(f"dwell_classes: expected records of the lengths of dwell_times {n_t.tolist()}, got "
                             f"{n_c.tolist()}")
        n = n_t
    else:
        t = dwell_times if _traced(dwell_times) else np.asarray(dwell_times)
        c = dwell_classes if _traced(dwell_classes) else np.asarray(dwell_classes)
        n = lengths
        if t.ndim == 1:
            t, c = t[None], c[None]
            n = None if n is None else (n if _traced(n) else np.asarray(n)).reshape(1)
    if t.ndim != 2 or t.shape[1] < 1:
        raise ValueError(f"dwell_times: expected shape (B, N) (or (N,), or a list of 1-D arrays) with N >= 1, got "
                         f"shape {tuple(t.shape)}")
    if c.shape != t.shape:
        raise ValueError(f"dwell_classes: expected shape {tuple(t.shape)} (that of dwell_times), got shape "
                         f"{tuple(c.shape)}")
    B, N = t.shape
    n = _record_lengths(n, B, N)
    if not _traced(n):
        valid = np.arange(N)[None, :] < np.asarray(n)[:, None]
        if not _traced(t):
            tv = np.asarray(t, np.float64)[valid]
            if not np.all(np.isfinite(tv)) or np.any(tv < 0):
                bad = tv[~(np.isfinite(tv) & (tv >= 0))][0]
                raise ValueError(f"dwell_times: expected finite durations >= 0, found {bad}")
        if not _traced(c):
            ca = np.asarray(c)
            if not (np.issubdtype(ca.dtype, np.integer) or np.all(ca[valid] == np.round(ca[valid]))):
                raise ValueError("dwell_classes: expected integer class labels")
            ca = np.where(valid, ca, 0).astype(np.int64)
            if np.any((ca < 0) | (ca >= C)):
                raise ValueError(f"dwell_classes: expected classes in 0..{C - 1} (the labels of classes), found "
                                 f"{ca[(ca < 0) | (ca >= C)][0]}")
            same = valid[:, 1:] & (ca[:, 1:] == ca[:, :-1])
            if np.any(same):
                b, j = np.argwhere(same)[0]
                raise ValueError(f"dwell_classes: record {b} has two consecutive sojourns in class {ca[b, j]} "
                                 f"(sojourns {j} and {j + 1}); consecutive sojourns must be in different classes "
                                 "(merge them into one)")
            c = ca
    return (jnp.asarray(t).astype(dtype), jnp.asarray(c).astype(jnp.int32), jnp.asarray(n, jnp.int32))


def _dwell_method(Q, method):
    if method not in ("auto", "expm", "spectral"):
        raise ValueError(f"method: expected 'auto', 'expm' or 'spectral', got {method!r}")
    if method == "expm":
        return method
    concrete = checks.is_concrete(Q)
    reversible = concrete and _reversible(Q)
    if method == "spectral":
        if concrete and not reversible:
            raise ValueError("method: 'spectral' needs an irreducible generator in detailed balance "
                             "(p_i Q_ij = p_j Q_ji); this process is not; use method='expm'")
        return method
    return "spectral" if reversible else "expm"


def dwell_log_likelihood(process, dwell_times, dwell_classes, classes, *, lengths=None, initial=None,
                         censor_last=False, method: str = "auto", per_record: bool = False) -> jax.Array:
    """Log-likelihood of an aggregated Markov process observed with exact dwell times (Colquhoun &
    Hawkes): only the class of the state is seen (e.g. open / shut ion channels), with the exact
    duration of every sojourn in a class.

    The states are partitioned into classes; a record is a sequence of consecutive sojourns, in classes
    c_1, c_2, ... (consecutive ones different) of durations t_1, t_2, ...::

        L = phi_start G_{c1 c2}(t_1) G_{c2 c3}(t_2) ... G_{c_{n-1} c_n}(t_{n-1}) end(t_n),
        G_AB(t) = expm(Q_AA t) Q_AB,
        end(t) = expm(Q_AA t) Q_(A, not A) 1     (the last sojourn ends by leaving its class), or
        end(t) = expm(Q_AA t) 1                  with ``censor_last`` (still in the class at the end).

    Computed in log space: one `lax.scan` per record with the forward vector renormalised at every
    sojourn, and the matrix exponentials of all dwells batched outside the scan, each held as
    ``exp(L) E`` so that a long dwell neither under- nor overflows. Missed events are NOT corrected:
    sojourns shorter than the recording's resolution (tres) are assumed to be all detected, so the
    result is the exact-time likelihood, not the HJCFIT one.

    Args:
        process: a continuous-time model (`ps.models.MarkovJumpProcess`) or a (K, K) generator Q.
        dwell_times: (B, N) per record, padded (with ``lengths``); (N,) for one record; or a list of 1-D
            arrays. Durations >= 0 in the generator's time unit.
        dwell_classes: the class of each sojourn (integers 0..C-1), in the layout of ``dwell_times``.
        classes: (K,) concrete class label of each state, 0..C-1, every class with at least one state; or a
            boolean (K,) mask of the "open" states (True = class 1, False = class 0).
        lengths: (B,) number of sojourns of each padded record (None: all N).
        initial: None (default): the first sojourn of each record starts in the equilibrium distribution
            of entry into its class, ``phi_A proportional to p_(not A) Q_(not A, A)`` with p the stationary
            distribution (the process must be irreducible). Else a (K,) or (B, K) distribution of the state
            at the start of each record's first sojourn, e.g. ``process.initial_distribution()`` for a
            simulation started at time 0. Either way it is restricted to the first sojourn's class and
            renormalised: the likelihood is conditional on the class of the first sojourn.
        censor_last: bool or (B,) bools: the last sojourn of a record was cut by the end of the recording
            (``expm(Q_AA t) 1``) instead of ending by a transition out of its class.
        method: how the dwell exponentials are computed. "expm": any generator (a Taylor series on the
            uniformised block plus renormalised squarings, about 64 small matrix products per dwell).
            "spectral": one symmetric eigendecomposition per class, then ``V exp(w t) V^T`` per dwell
            (tens of times faster); needs a reversible generator (irreducible, detailed balance
            ``p_i Q_ij = p_j Q_ji``, true of every mechanism without cycles and of cycles obeying
            microscopic reversibility). Its derivative stays finite at repeated eigenvalues. "auto"
            (default): "spectral" when the generator is concrete and reversible, else "expm" (a traced
            generator, as inside a fit, gets "expm" unless you pass "spectral").
        per_record: return the (B,) per-record values instead of their sum.

    Returns:
        () the total log-likelihood (or (B,)). Traceable in the process (jit, vmap, grad over rates);
        -inf when the data are impossible under the process (a transition along a zero rate).

    Raises:
        ValueError: naming ``dwell_times`` (negative or non-finite), ``dwell_classes`` (outside 0..C-1,
            two consecutive sojourns in one class), ``classes`` (shape, a class with no states),
            ``lengths``, ``initial``, ``censor_last`` or ``method``; concrete arrays only.

    Example:
        >>> open_ = jnp.array([False, False, True])      # C2 - C1 - O: one open state
        >>> ps.ctmc.dwell_log_likelihood(proc, [t1, t2], [c1, c2], open_, censor_last=True)
    """
    Q = _checked(process, "process")
    K = Q.shape[0]
    masks, C = _class_masks(classes, K, Q.dtype)
    t, c, n = _dwell_arrays(dwell_times, dwell_classes, lengths, C, Q.dtype)
    B = t.shape[0]
    cl = jnp.asarray(censor_last)
    if cl.ndim > 1 or (cl.ndim == 1 and cl.shape != (B,)) or not (cl.dtype == bool or jnp.issubdtype(cl.dtype,
                                                                                                        jnp.integer)):
        raise ValueError(f"censor_last: expected a bool or bools of shape ({B},), got {cl.dtype} of shape "
                         f"{tuple(cl.shape)}")
    censor = jnp.broadcast_to(cl.astype(bool), (B,))
    if initial is not None:
        init = jnp.asarray(initial).astype(Q.dtype)
        if init.shape not in ((K,), (B, K)):
            raise ValueError(f"initial: expected shape ({K},) or ({B}, {K}), got shape {tuple(init.shape)}")
        if checks.is_concrete(init):
            a = np.asarray(init)
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ValueError("initial: expected finite, non-negative probabilities")
        init = jnp.broadcast_to(init, (B, K))
    else:
        init = None
        if checks.is_concrete(Q):
            q = np.asarray(Q, np.float64)
            try:
                p = np.linalg.solve(q.T + np.ones((K, K)), np.ones(K))
            except np.linalg.LinAlgError:
                p = np.full(K, np.nan)
            if not np.all(np.isfinite(p)) or np.any(p < -1e-10):
                raise ValueError("initial: the default (equilibrium entry into the first class) needs an irreducible "
                                 "process with a unique stationary distribution; pass initial= instead")
    return _dwell_ll(Q, masks, t, c, n, censor, init, method=_dwell_method(Q, method), per_record=bool(per_record))


def dwell_time_density(process, times, classes, dwell_class: int, *, method: str = "auto") -> jax.Array:
    """Equilibrium density of the duration of a sojourn in one class (e.g. the open-time pdf of a
    channel): ``f(t) = phi_A expm(Q_AA t) Q_(A, not A) 1`` with ``phi_A`` the equilibrium distribution of
    entry into A (as the default of `dwell_log_likelihood`). A mixture of exponentials, one component
    per state of A; its mean is ``phi_A (-Q_AA)^{-1} 1``. Missed events are not corrected.

    Args:
        process: an irreducible continuous-time model or (K, K) generator.
        times: durations >= 0, any shape.
        classes: (K,) class labels (or a boolean mask of the open states), as `dwell_log_likelihood`.
        dwell_class: the class A (an integer label).
        method: "auto", "expm" or "spectral", as `dwell_log_likelihood`.

    Returns:
        the density at ``times`` (their shape). Traceable in the process.
    """
    Q = _checked(process, "process")
    K = Q.shape[0]
    masks, C = _class_masks(classes, K, Q.dtype)
    if not isinstance(dwell_class, (int, np.integer)) or not 0 <= int(dwell_class) < C:
        raise ValueError(f"dwell_class: expected a class label in 0..{C - 1}, got {dwell_class!r}")
    t = _dt(times, "times").astype(Q.dtype)
    return _dwell_density(Q, masks, t.ravel(), int(dwell_class), method=_dwell_method(Q, method)).reshape(t.shape)


@partial(jax.jit, static_argnames=("dwell_class", "method"))
def _dwell_density(Q, masks, t, dwell_class, *, method):
    cls = jnp.full(t.shape, dwell_class, jnp.int32)
    E, L = _dwell_exponentials(Q, masks, t, cls, method)
    ma = masks[dwell_class]
    exit_rates = panel_parts(Q) @ (1.0 - ma) * ma
    phi = _entry_distributions(Q, masks)[dwell_class]
    return jnp.einsum("i,nij,j->n", phi, E, exit_rates) * jnp.exp(L)

# The amortised estimator lives in its own module (a network and its weights, no engine code).
from probssm.inference.ctmc_amortized import AmortizedEstimate, AmortizedRateEstimator  # noqa: E402

__all__ += ["AmortizedEstimate", "AmortizedRateEstimator"]
