"""Conditional SMC (particle Gibbs kernel), with optional ancestor sampling.

Slot 0 holds a frozen reference trajectory; the other N - 1 particles are
propagated as in the filter, with multinomial resampling at every step::

    z_0^0 = ref_0;  z_0^{1..N-1} ~ q_0
    for t in 1..T-1:
        a^{1..N-1} ~ W_{t-1} (multinomial);  a^0 = 0, or (ancestor sampling)
        a^0 ~ prop. to W_{t-1}^j f_t(ref_t | z_{t-1}^j)
        z_t^0 = ref_t;  z_t^i ~ q(. | z_{t-1}^{a^i});  reweight as the filter does
    new reference: k ~ W_{T-1}, then follow the ancestors back from k

The map reference -> new reference leaves p(z_{0:T-1} | y) invariant.
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.inference.smc import _common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.backward import draw_from_weights

__all__ = ["CSMCResult", "conditional_smc", "trace_ancestry"]


class CSMCResult(NamedTuple):
    reference: jax.Array  # (T, d) the new reference trajectory
    filter: F.ParticleFilterResult  # the conditional particle system (with history)


def trace_ancestry(key, particles, log_weights_last, ancestors):
    """One trajectory by drawing k ~ W_{T-1} and following the ancestor indices back."""
    k = draw_from_weights(key, log_weights_last, ())

    def body(k, xs):
        anc, parts = xs
        return anc[k], parts[k]

    _, path = lax.scan(body, k, (ancestors, particles), reverse=True)
    return path


def _csmc_one(key, model, ys, inputs, reference, *, num_particles, proposal, ancestor_sampling):
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps + 1)
    state = F.init(keys[0], model, ys[0], C.row(inputs, 0), num_particles, proposal, reference[0])

    def body(state, xs):
        t, y, u, ref, k = xs
        new, info = F.step(k, model, state, t, y, u, proposal=proposal, reference=ref,
                           ancestor_sampling=ancestor_sampling)
        return new, (new.particles, new.log_weights, info.ancestors, C.ess(new.log_weights))

    u_rest = None if inputs is None else jax.tree_util.tree_map(lambda a: a[1:], inputs)
    final, (ps_, lws, anc, ess) = lax.scan(
        body, state, (jnp.arange(1, num_timesteps), ys[1:], u_rest, reference[1:], keys[1:-1]))
    parts = jnp.concatenate([state.particles[None], ps_])
    lws = jnp.concatenate([state.log_weights[None], lws])
    # ancestors[t] maps slot at t to its parent at t-1; shift so that row t holds the parent of step t+1
    anc_full = jnp.concatenate([jnp.arange(num_particles, dtype=jnp.int32)[None], anc])
    ess = jnp.concatenate([C.ess(state.log_weights)[None], ess])
    means = jax.vmap(C.weighted_mean)(lws, parts)
    # trace: index at t-1 = ancestors[t][index at t]
    k = draw_from_weights(keys[-1], lws[-1], ())

    def back(k, xs):
        anc_t, parts_t = xs
        return anc_t[k], parts_t[k]

    _, path = lax.scan(back, k, (anc_full, parts), reverse=True)
    res = F.ParticleFilterResult(final.log_likelihood, means, parts, lws, ess, anc_full,
                                 jnp.ones((num_timesteps,), bool).at[0].set(False))
    return CSMCResult(path, res)


@eqx.filter_jit
def _run(key, model, ys, inputs, reference, *, num_particles, proposal, ancestor_sampling):
    return _csmc_one(key, model, ys, inputs, reference, num_particles=num_particles, proposal=proposal,
                     ancestor_sampling=ancestor_sampling)


def conditional_smc(key, model, emissions, reference, num_particles: int, *, ancestor_sampling: bool = True,
                    proposal=None, inputs=None) -> CSMCResult:
    """One conditional-SMC sweep given a reference trajectory; returns the new reference.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D) (one sequence).
        reference: (T, d) the current reference trajectory.
        num_particles: N >= 2 (the reference included).
        ancestor_sampling: draw the reference's ancestors from the backward kernel
            (PGAS; mixes far better on long sequences).
        proposal, inputs: as for `particle_filter`.

    Returns:
        `CSMCResult` (``reference``: (T, d); ``filter``: the particle system).
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    ys, inputs, batched, batched_u = C.prepare_emissions(model, emissions, inputs)
    if batched:
        raise ValueError(f"emissions: conditional_smc takes one sequence (T, D), got shape {tuple(ys.shape)}")
    F.check_proposal(key, model, ys, inputs, proposal, False, False)
    shape, _ = C.state_shape(model, C.row(inputs, 0))
    ref = jnp.asarray(reference)
    if ref.shape != (ys.shape[0],) + shape:
        raise ValueError(f"reference: expected shape {(ys.shape[0],) + shape}, got shape {tuple(ref.shape)}")
    return _run(key, model, ys, inputs, ref.astype(ys.dtype), num_particles=num_particles, proposal=proposal,
                ancestor_sampling=bool(ancestor_sampling))
