"""PPG: PaRIS particle Gibbs (Cardoso, Janati El Idrissi, Le Corff, Moulines, Olsson; 2023).

Each sweep runs PaRIS on a conditional-SMC particle system whose slot 0 is a
frozen reference path; the sweep's PaRIS estimate is recorded and a new
reference is drawn from the backward draws::

    ref = a path from a plain PaRIS / particle-filter run
    for k in 0..num_iters-1:
        run conditional SMC with reference ref, carrying PaRIS statistics tau (backward draws J)
        estimate_k = sum_i W_{T-1}^i tau_{T-1}^i
        j_{T-1} ~ W_{T-1};  for t = T-1..1:  j_{t-1} = J_t^{j_t, m}, m uniform in 1..Ñ
        ref = (z_0^{j_0}, ..., z_{T-1}^{j_{T-1}})
    estimate = mean of estimate_k over k >= burn_in

Averaging over sweeps removes most of PaRIS's self-normalisation bias (O(1/N) per
sweep). Memory is O(T N Ñ) for the backward indices of one sweep.
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.inference.smc import common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.paris import (check_functional, estimate as paris_estimate, init as paris_init,
                                         mask_functional, resolve_backward, step as paris_step)
from probssm.inference.smc.backward import draw_from_weights
from probssm.inference.smc.csmc import check_reference, trace_ancestry

__all__ = ["PPGResult", "ppg", "ppg_sequence", "ppg_sweep"]


class PPGResult(NamedTuple):
    estimate: object  # pytree: mean of the per-sweep estimates after burn-in
    trace: object  # pytree with a leading axis num_iters: the estimate of each sweep
    log_likelihood: jax.Array  # (num_iters,) log-likelihood estimate of each conditional sweep
    reference: jax.Array  # (T, d) the last reference path (start the next run from it)


def ppg_sweep(key, model, ys, inputs, functional, reference, *, num_particles, num_backward, use_bound,
              proposal=None, ancestor_sampling=False):
    """One PPG sweep on prepared arrays (ys (T, D) and inputs as `common.prepare_sequence` makes
    them; ``use_bound`` as `paris.resolve_backward` returns): (estimate, log-likelihood, new reference)."""
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps + 1)
    state = paris_init(keys[0], model, ys[0], C.row(inputs, 0), functional, num_particles, proposal, reference[0])

    def body(state, xs):
        t, y, u, ref, k = xs
        new, j = paris_step(k, model, state, t, y, u, functional, num_backward=num_backward, use_bound=use_bound,
                        proposal=proposal, reference=ref, ancestor_sampling=ancestor_sampling)
        return new, (new.filter.particles, j)

    final, (parts, js) = lax.scan(body, state, (jnp.arange(1, num_timesteps), ys[1:], C.rest(inputs), reference[1:],
                                                keys[1:-1]))
    est = paris_estimate(final)
    k_last, k_pick = jax.random.split(keys[-1])
    i_last = draw_from_weights(k_last, final.filter.log_weights, ())
    picks = jax.random.randint(k_pick, (max(num_timesteps - 1, 1),), 0, num_backward)[: num_timesteps - 1]

    def back(i, xs):
        parts_t, j_t, m = xs
        return j_t[i, m], parts_t[i]

    i0, path_rest = lax.scan(back, i_last, (parts, js, picks), reverse=True)
    path = jnp.concatenate([state.filter.particles[i0][None], path_rest])
    return est, final.filter.log_likelihood, path


def ppg_sequence(key, model, emissions, inputs=None, *, additive_functional, num_particles: int, num_iters: int,
                 burn_in: int = 0, num_backward: int = 2, backward: str = "auto", proposal=None,
                 ancestor_sampling: bool = False, reference=None, length=None) -> PPGResult:
    """PaRIS particle Gibbs on one sequence: the public traceable core of `ppg`.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D); NaN marks a missing step.
        inputs: None (the model's `default_inputs`) or (T, ...) rows.
        additive_functional: as for `paris`.
        num_particles, num_iters, burn_in, num_backward: static ints (see `ppg`).
        backward, proposal, ancestor_sampling: static, see `ppg`.
        reference: (T, d) the starting reference path, e.g. the ``reference`` of a previous
            run; None draws one from a particle filter (one traced-back path).
        length: true length of a padded sequence; steps at and beyond it are missing and carry
            no terms of the functional.

    Returns:
        `PPGResult`.

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap / grad.
    """
    C.check_model(model)
    use_bound = resolve_backward(model, backward)
    functional = mask_functional(additive_functional, length)
    ys, inputs = C.prepare_sequence(model, emissions, inputs, length)
    proposal = C.pad_proposal(proposal, length)
    k0, k_iters = jax.random.split(key)
    if reference is None:
        pf = F.particle_filter_sequence(k0, model, ys, inputs, num_particles=num_particles, proposal=proposal,
                                        history=True)
        reference = trace_ancestry(jax.random.fold_in(k0, 1), pf.particles, pf.log_weights[-1], pf.ancestors)

    def sweep(ref, k):
        est, ll, new_ref = ppg_sweep(k, model, ys, inputs, functional, ref, num_particles=num_particles,
                                     num_backward=num_backward, use_bound=use_bound, proposal=proposal,
                                     ancestor_sampling=ancestor_sampling)
        return new_ref, (est, ll)

    ref, (trace, lls) = lax.scan(sweep, reference, jax.random.split(k_iters, num_iters))
    estimate = jax.tree_util.tree_map(lambda a: jnp.mean(a[burn_in:], axis=0), trace)
    return PPGResult(estimate, trace, lls, ref)


@eqx.filter_jit
def _run(key, model, batch, functional, reference, *, num_particles, num_backward, num_iters, burn_in, backward,
         proposal, ancestor_sampling):
    def one(y, u, n, k, ref):
        return ppg_sequence(k, model, y, u, additive_functional=functional, num_particles=num_particles,
                            num_iters=num_iters, burn_in=burn_in, num_backward=num_backward, backward=backward,
                            proposal=proposal, ancestor_sampling=ancestor_sampling, reference=ref, length=n)

    return batch.map(one, C.sequence_keys(key, batch), reference,
                     extra_axes=(0, None if reference is None else 0))


def ppg(key, model, emissions, additive_functional, num_particles: int, num_iters: int, *, burn_in: int = 0,
        num_backward: int = 2, backward: str = "auto", proposal=None, ancestor_sampling: bool = False,
        inputs=None, lengths=None, reference=None) -> PPGResult:
    """Smoothed additive functional by PaRIS particle Gibbs, averaged over sweeps.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (one independent PPG chain
            per sequence).
        additive_functional: as for `paris`.
        num_particles: N >= 2 per sweep (the reference included).
        num_iters: number of sweeps.
        burn_in: sweeps left out of the average (0 <= burn_in < num_iters).
        num_backward: Ñ backward draws per particle.
        backward: "auto", "exact", "rejection" or "mcmc" backward draws (see `paris`).
        ancestor_sampling: also resample the reference's ancestors (PGAS-style).
        inputs, lengths: as for `paris`.
        reference: optional starting reference (T, d) ((B, T, d) for a batch), e.g. the
            ``reference`` of an earlier run; None starts from a particle filter's path.

    Returns:
        `PPGResult` with ``estimate``, per-sweep ``trace``, ``log_likelihood`` per sweep and the
        last ``reference`` (a leading axis B for a batch).

    The traceable single-sequence core is `ppg_sequence`.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_backward = checks.positive_int(num_backward, "num_backward")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or not (0 <= burn_in < num_iters):
        raise ValueError(f"burn_in: expected an integer in [0, num_iters={num_iters}), got {burn_in!r}")
    resolve_backward(model, backward)
    batch = C.prepare(model, emissions, inputs, lengths)
    F.check_proposal(key, model, batch, proposal)
    functional = check_functional(model, batch, additive_functional)
    if reference is not None:
        reference = check_reference(model, batch, reference)
    return _run(key, model, batch, functional, reference, num_particles=num_particles, num_backward=num_backward,
                num_iters=num_iters, burn_in=burn_in, backward=backward, proposal=proposal,
                ancestor_sampling=bool(ancestor_sampling))
