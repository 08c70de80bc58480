"""Backward kernels and backward simulation (forward-filter backward-sample for particles).

The backward kernel of step t draws, for a target state z_t, an index j with
probability proportional to W_{t-1}^j f_t(z_t | z_{t-1}^j). Two ways:

* exact: evaluate all N transition densities for each target, O(N) per draw;
* accept-reject (when the model declares a bound B_t >= f_t, see
  `probssm.core.bounded.AbstractBoundedTransitionSSM`): propose j ~ W_{t-1},
  accept with probability f_t(z_t | z_{t-1}^j) / B_t; O(1) expected per draw.
  Proposals come from a guide table (Chen & Asau), so a draw from W costs one
  gather and a short forward walk, not a binary search. The first round runs on
  every target; later rounds run on a compacted buffer of the targets not yet
  accepted; after ``max_rounds`` the remaining targets fall back to the exact draw.

Backward simulation of whole paths (the reference loop)::

    j_{T-1} ~ W_{T-1}
    for t in T-1..1:   j_{t-1} ~ backward kernel of step t with target z_t^{j_t}
    path = (z_0^{j_0}, ..., z_{T-1}^{j_{T-1}})
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.core.batching import as_batch
from probssm.inference.smc import common as C
from probssm.inference.smc.resampling import ancestors_from_counts

__all__ = ["backward_indices", "backward_sample", "backward_sample_sequence", "draw_from_weights", "resolve_method"]


def _guide_table(c):
    num = c.shape[0]
    return ancestors_from_counts(jnp.ceil(num * c), num)


def draw_from_weights(key, normed_log_weights, shape, table=None, cumulative=None):
    """Independent draws of indices from the weights (guide-table inversion, O(1) expected each).

    The guide table g[k] = first i with C_i > k / N brackets each search: the index sought lies in
    [g[k], g[k + 1]] for u in [k / N, (k + 1) / N). A vectorised bisection of that bracket finishes
    it, so a bucket holding many particles of negligible weight costs log2 of its size, not a walk
    through it; a short forward walk is kept as a safety net.
    """
    num = normed_log_weights.shape[0]
    c = C.cumulative(jnp.exp(normed_log_weights)) if cumulative is None else cumulative
    g = _guide_table(c) if table is None else table
    u = C.uniform(key, shape, c.dtype)
    k = jnp.clip(jnp.floor(u * num).astype(jnp.int32), 0, num - 1)
    lo = jnp.minimum(g[k], num - 1)
    hi = jnp.where(k + 1 < num, g[jnp.minimum(k + 1, num - 1)], num - 1)
    hi = jnp.maximum(jnp.minimum(hi, num - 1), lo)

    def bis_cond(s):
        lo, hi = s
        return jnp.any(lo < hi)

    def bis_body(s):
        lo, hi = s
        mid = (lo + hi) // 2
        right = c[mid] > u
        return jnp.where(right, lo, mid + 1), jnp.where(right, mid, hi)

    i, _ = lax.while_loop(bis_cond, bis_body, (lo, hi))

    def cond(i):
        return jnp.any(c[i] <= u)

    def body(i):
        return jnp.minimum(jnp.where(c[i] <= u, i + 1, i), num - 1)

    return lax.while_loop(cond, body, i)


def _exact_one(key, model, lw_prev, z_prev, target, t, u):
    logf = jax.vmap(lambda zp: model.transition(zp, t, u).log_prob(target))(z_prev)
    lw, _ = C.normalise(lw_prev + logf)
    c = C.cumulative(jnp.exp(lw))
    v = C.uniform(key, (), c.dtype)
    return jnp.minimum(jnp.sum(c <= v), lw.shape[0] - 1).astype(jnp.int32)


def backward_indices(key, model, lw_prev, z_prev, targets, t, u, *, log_bound=None, max_rounds: int = 2,
                     first_rounds: int = 4, fallback_chunk: int = 16):
    """For each target z_t^m (M of them), an index j ~ W_{t-1}^j f_t(z_t^m | z_{t-1}^j).

    Args:
        lw_prev: (N,) normalised log-weights at t-1.
        z_prev: (N, d) particles at t-1.
        targets: (M, d) states at t.
        t: index of the target states (the transition into t is used).
        log_bound: None for exact draws (O(N) each), or a scalar >= log f_t for accept-reject.
        max_rounds: accept-reject rounds on the compacted buffer of waiting targets before the
            exact fallback.
        first_rounds: proposals per target made at once, for all targets, in the first stage.
        fallback_chunk: targets drawn exactly at once in the fallback.

    Accept-reject runs in three stages, all with static shapes: (1) ``first_rounds`` proposals
    j ~ W_{t-1} for every target at once, each accepted with probability f_t / B_t, the first
    accepted one kept; (2) rounds of eight proposals per target on a compacted buffer (M / 4) of the targets still waiting;
    (3) exact draws for whatever is left after ``max_rounds``. Every stage draws from the same
    law, so the result is an exact draw from the backward kernel.

    Returns:
        (M,) int32 indices.
    """
    num_targets = jax.tree_util.tree_leaves(targets)[0].shape[0]
    if log_bound is None:
        keys = jax.random.split(key, num_targets)
        return jax.vmap(lambda k, tg: _exact_one(k, model, lw_prev, z_prev, tg, t, u))(keys, targets)

    c = C.cumulative(jnp.exp(lw_prev))
    table = _guide_table(c)
    k0, k1, k2 = jax.random.split(key, 3)

    def propose_accept(k, tgt, rounds):
        """(rounds, m) proposals for each of m targets; returns the first accepted index and whether any."""
        ka, kb = jax.random.split(k)
        m = jax.tree_util.tree_leaves(tgt)[0].shape[0]
        j = draw_from_weights(ka, lw_prev, (rounds * m,), table, c)
        tg = jax.tree_util.tree_map(lambda a: jnp.tile(a, (rounds,) + (1,) * (a.ndim - 1)), tgt)
        logf = C.transition_log_prob(model, z_prev[j], tg, t, u)
        v = C.uniform(kb, (rounds * m,), logf.dtype)
        acc = (v < jnp.exp(logf - log_bound)).reshape(rounds, m)
        j = j.reshape(rounds, m)
        first = jnp.argmax(acc, axis=0)
        return jnp.take_along_axis(j, first[None], axis=0)[0], jnp.any(acc, axis=0)

    # stage 1: every target
    idx, accepted = propose_accept(k0, targets, first_rounds)
    # stage 2: a compacted buffer of the targets still waiting
    buf = max(8, min(num_targets, num_targets // 4))

    def cond(s):
        idx, accepted, r, _ = s
        return jnp.logical_and(r < max_rounds, ~jnp.all(accepted))

    def body(s):
        idx, accepted, r, k = s
        k, kr = jax.random.split(k)
        waiting = jnp.nonzero(~accepted, size=buf, fill_value=num_targets)[0]
        valid = waiting < num_targets
        safe = jnp.minimum(waiting, num_targets - 1)
        j, acc = propose_accept(kr, jax.tree_util.tree_map(lambda a: a[safe], targets), 8)
        acc = acc & valid
        where = jnp.where(acc, safe, num_targets)
        return idx.at[where].set(j, mode="drop"), accepted.at[where].set(True, mode="drop"), r + 1, k

    idx, accepted, _, _ = lax.while_loop(cond, body, (idx, accepted, jnp.asarray(0), k1))

    # stage 3: exact draws for whatever is left, a chunk at a time
    chunk = min(fallback_chunk, num_targets)

    def fb_cond(s):
        return ~jnp.all(s[1])

    def fb_body(s):
        idx, accepted, k = s
        k, kr = jax.random.split(k)
        waiting = jnp.nonzero(~accepted, size=chunk, fill_value=num_targets)[0]
        safe = jnp.minimum(waiting, num_targets - 1)
        j = jax.vmap(lambda kk, m: _exact_one(kk, model, lw_prev, z_prev, targets[m], t, u))(
            jax.random.split(kr, chunk), safe)
        where = jnp.where(waiting < num_targets, safe, num_targets)
        return idx.at[where].set(j, mode="drop"), accepted.at[where].set(True, mode="drop"), k

    idx, _, _ = lax.while_loop(fb_cond, fb_body, (idx, accepted, k2))
    return idx.astype(jnp.int32)


def resolve_method(model, method: str, name: str = "method", extra: tuple = ()) -> bool:
    """Whether backward draws use the model's declared transition bound (accept-reject):
    ``method`` "auto" (when declared), "exact" (never) or "rejection" (required); ``extra``
    names further choices the caller handles itself (the error message lists them)."""
    choices = ("auto", "exact", "rejection") + tuple(extra)
    if method not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {method!r}")
    bounded = C.is_bounded(model)
    if method == "rejection" and not bounded:
        raise ValueError(f"{name}: 'rejection' needs a model that declares a transition bound "
                         "(subclass AbstractBoundedTransitionSSM)")
    return bounded and method != "exact"


def backward_sample_sequence(key, model, filter_result, inputs=None, *, num_samples: int = 1,
                             method: str = "auto", max_rounds: int = 2):
    """Backward simulation on one sequence's filter output: the traceable core of `backward_sample`.

    Args:
        key: a `jax.random` key.
        model: the model the filter ran on.
        filter_result: a single-sequence `ParticleFilterResult` with history (particles (T, N, d),
            log_weights (T, N)).
        inputs: the (T, ...) inputs the filter was given (an autoregressive model whose
            transition reads its inputs needs ``model.default_inputs(y)`` here).
        num_samples: M trajectories (static int).
        method: "auto", "exact" or "rejection" (static), see `backward_sample`.
        max_rounds: accept-reject rounds before the exact fallback (static int).

    Returns:
        (M, T, d) trajectories.

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap.
    """
    C.check_model(model)
    use_bound = resolve_method(model, method)
    particles, log_weights = filter_result.particles, filter_result.log_weights
    num_timesteps = log_weights.shape[0]
    k_last, k_rest = jax.random.split(key)
    j_last = draw_from_weights(k_last, log_weights[-1], (num_samples,))
    z_last = particles[-1][j_last]

    def body(carry, xs):
        z_next = carry
        t_next, z_prev, lw_prev, k = xs
        u = C.row(inputs, t_next)
        bound = C.transition_log_bound(model, t_next, u) if use_bound else None
        j = backward_indices(k, model, lw_prev, z_prev, z_next, t_next, u, log_bound=bound, max_rounds=max_rounds)
        z = z_prev[j]
        return z, z

    keys = jax.random.split(k_rest, max(num_timesteps - 1, 1))[: num_timesteps - 1]
    xs = (jnp.arange(1, num_timesteps), particles[:-1], log_weights[:-1], keys)
    _, zs = lax.scan(body, z_last, xs, reverse=True)
    paths = jnp.concatenate([zs, z_last[None]])  # (T, M, d)
    return jnp.swapaxes(paths, 0, 1)


@eqx.filter_jit
def _run(key, model, particles, log_weights, batch, *, num_samples, method, max_rounds):
    def one(_, u, n, k, p, lw):
        result = _History(p, lw)
        return backward_sample_sequence(k, model, result, u, num_samples=num_samples, method=method,
                                        max_rounds=max_rounds)

    return batch.map(one, C.sequence_keys(key, batch), particles, log_weights, extra_axes=(0, 0, 0))


class _History(NamedTuple):
    particles: jax.Array
    log_weights: jax.Array


def backward_sample(key, model, filter_result, num_samples: int = 1, *, method: str = "auto", inputs=None,
                    lengths=None, max_rounds: int = 2):
    """Draw smoothed trajectories from the output of `particle_filter` (with ``history=True``).

    Args:
        key: a `jax.random` key.
        model: the model the filter ran on.
        filter_result: a `ParticleFilterResult` with history (particles (T, N, d), or (B, T, N, d)
            for a batch).
        num_samples: number of trajectories M.
        method: "exact" (O(N) per draw), "rejection" (needs a model that declares a transition
            bound) or "auto" (rejection when the model declares a bound).
        inputs: the inputs the filter was given: (T, U) shared by a batch, (B, T, U) or a list
            one per sequence (read like `particle_filter`'s).
        lengths: the filter's ``lengths`` (checked only: steps beyond a sequence's length carry
            no data, so its paths there are draws from the model's prediction).

    Returns:
        (M, T, d) trajectories, or (B, M, T, d) for a batched filter result.
    """
    C.check_model(model)
    num_samples = checks.positive_int(num_samples, "num_samples")
    max_rounds = checks.positive_int(max_rounds, "max_rounds", minimum=0)
    resolve_method(model, method)
    particles, lws = filter_result.particles, filter_result.log_weights
    if filter_result.ancestors is None or jnp.ndim(lws) not in (2, 3):
        raise ValueError("filter_result: expected a result of particle_filter(..., history=True)")
    # one reading of a batch for every engine: the filter's (B,) T axis stands in for the emissions
    shape = tuple(lws.shape[:-1])
    batch = as_batch(jnp.zeros(shape + (1,), lws.dtype), inputs, lengths, name="filter_result")
    return _run(key, model, particles, lws, batch, num_samples=num_samples, method=method, max_rounds=max_rounds)
