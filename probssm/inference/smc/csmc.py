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

from probssm.inference.smc import common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.backward import draw_from_weights

__all__ = ["CSMCResult", "conditional_smc", "conditional_smc_sequence", "trace_ancestry", "check_reference"]


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


def conditional_smc_sequence(key, model, emissions, inputs=None, *, reference, num_particles: int,
                             ancestor_sampling: bool = True, proposal=None, length=None) -> CSMCResult:
    """One conditional-SMC sweep on one sequence: the public traceable core of `conditional_smc`.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D); NaN marks a missing step.
        inputs: None (the model's `default_inputs`) or (T, ...) rows.
        reference: (T, d) the current reference path (the state's dtype: integers for an HMM).
        num_particles: N (static int >= 2, the reference included).
        ancestor_sampling, proposal: as for `conditional_smc` (static).
        length: true length of a padded sequence; steps at and beyond it are missing.

    Returns:
        `CSMCResult`: reference (T, d) the new path, filter the conditional particle system.

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap.
    """
    C.check_model(model)
    ys, inputs = C.prepare_sequence(model, emissions, inputs, length)
    proposal = C.pad_proposal(proposal, length)
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps + 1)
    state = F.init(keys[0], model, ys[0], C.row(inputs, 0), num_particles, proposal, reference[0])

    def body(state, xs):
        t, y, u, ref, k = xs
        new, info = F.step(k, model, state, t, y, u, proposal=proposal, reference=ref,
                           ancestor_sampling=ancestor_sampling)
        return new, (new.particles, new.log_weights, info.ancestors, C.ess(new.log_weights))

    final, (ps_, lws, anc, ess) = lax.scan(
        body, state, (jnp.arange(1, num_timesteps), ys[1:], C.rest(inputs), reference[1:], keys[1:-1]))
    parts = jnp.concatenate([state.particles[None], ps_])
    lws = jnp.concatenate([state.log_weights[None], lws])
    # ancestors[t] maps slot at t to its parent at t-1
    anc_full = jnp.concatenate([jnp.arange(num_particles, dtype=jnp.int32)[None], anc])
    ess = jnp.concatenate([C.ess(state.log_weights)[None], ess])
    means = jax.vmap(C.weighted_mean)(lws, parts)
    path = trace_ancestry(keys[-1], parts, lws[-1], anc_full)
    res = F.ParticleFilterResult(final.log_likelihood, means, parts, lws, ess, anc_full,
                                 jnp.ones((num_timesteps,), bool).at[0].set(False))
    return CSMCResult(path, res)


@eqx.filter_jit
def _run(key, model, batch, reference, *, num_particles, proposal, ancestor_sampling):
    def one(y, u, n, k, ref):
        return conditional_smc_sequence(k, model, y, u, reference=ref, num_particles=num_particles,
                                        proposal=proposal, ancestor_sampling=ancestor_sampling, length=n)

    return batch.map(one, C.sequence_keys(key, batch), reference, extra_axes=(0, 0))


def check_reference(model, batch, reference, name: str = "reference"):
    """A reference path (T, d) (or (B, T, d) for a batch) in the state's dtype."""
    _, u = C.first_sequence(model, batch)
    z = C.state_struct(model, C.row(u, 0))
    want = ((batch.batch_size,) if batch.batched else ()) + (batch.num_timesteps,) + tuple(z.shape)
    ref = jnp.asarray(reference)
    if tuple(ref.shape) != want:
        raise ValueError(f"{name}: expected shape {want}, got shape {tuple(ref.shape)}")
    return ref.astype(z.dtype)


def conditional_smc(key, model, emissions, reference, num_particles: int, *, ancestor_sampling: bool = True,
                    proposal=None, inputs=None, lengths=None) -> CSMCResult:
    """One conditional-SMC sweep given a reference trajectory; returns the new reference.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (then one sweep per sequence).
        reference: (T, d) the current reference trajectory ((B, T, d) for a batch).
        num_particles: N >= 2 (the reference included).
        ancestor_sampling: draw the reference's ancestors from the backward kernel
            (PGAS; mixes far better on long sequences).
        proposal, inputs, lengths: as for `particle_filter` (steps beyond a length are missing).

    Returns:
        `CSMCResult` (``reference``: (T, d); ``filter``: the particle system), a leading axis B
        for a batch.

    The traceable single-sequence core is `conditional_smc_sequence`.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    batch = C.prepare(model, emissions, inputs, lengths)
    F.check_proposal(key, model, batch, proposal)
    ref = check_reference(model, batch, reference)
    return _run(key, model, batch, ref, num_particles=num_particles, proposal=proposal,
                ancestor_sampling=bool(ancestor_sampling))
