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
from probssm.inference.smc import _common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.paris import (init as _paris_init, step as _paris_step, estimate as _paris_estimate,
                                         resolve_backward, check_functional)
from probssm.inference.smc.backward import draw_from_weights

__all__ = ["PPGResult", "ppg", "ppg_sweep"]


class PPGResult(NamedTuple):
    estimate: object  # pytree: mean of the per-sweep estimates after burn-in
    trace: object  # pytree with a leading axis num_iters: the estimate of each sweep
    log_likelihood: jax.Array  # (num_iters,) log-likelihood estimate of each conditional sweep
    reference: jax.Array  # (T, d) the last reference path


def ppg_sweep(key, model, ys, inputs, functional, reference, *, num_particles, num_backward, use_bound,
              proposal=None, ancestor_sampling=False):
    """One PPG sweep: returns (estimate, log-likelihood, new reference)."""
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps + 1)
    state = _paris_init(keys[0], model, ys[0], C.row(inputs, 0), functional, num_particles, proposal, reference[0])

    def body(state, xs):
        t, y, u, ref, k = xs
        new, j = _paris_step(k, model, state, t, y, u, functional, num_backward=num_backward, use_bound=use_bound,
                        proposal=proposal, reference=ref, ancestor_sampling=ancestor_sampling)
        return new, (new.filter.particles, j)

    u_rest = None if inputs is None else jax.tree_util.tree_map(lambda a: a[1:], inputs)
    final, (parts, js) = lax.scan(body, state, (jnp.arange(1, num_timesteps), ys[1:], u_rest, reference[1:],
                                                keys[1:-1]))
    est = _paris_estimate(final)
    k_last, k_pick = jax.random.split(keys[-1])
    i_last = draw_from_weights(k_last, final.filter.log_weights, ())
    picks = jax.random.randint(k_pick, (max(num_timesteps - 1, 1),), 0, num_backward)[: num_timesteps - 1]

    def back(i, xs):
        parts_t, j_t, m = xs
        return j_t[i, m], parts_t[i]

    i0, path_rest = lax.scan(back, i_last, (parts, js, picks), reverse=True)
    path = jnp.concatenate([state.filter.particles[i0][None], path_rest])
    return est, final.filter.log_likelihood, path


@eqx.filter_jit
def _run(key, model, ys, inputs, functional, *, num_particles, num_backward, num_iters, burn_in, use_bound,
         proposal, ancestor_sampling):
    k0, k_iters = jax.random.split(key)
    # initial reference: one backward-traced path from an unconditional particle filter
    pf = F._filter_one(k0, model, ys, inputs, jnp.asarray(0.5, ys.dtype), num_particles=num_particles,
                       resampling="systematic", proposal=proposal, auxiliary=None, history=True)
    from probssm.inference.smc.csmc import trace_ancestry

    ref = trace_ancestry(jax.random.fold_in(k0, 1), pf.particles, pf.log_weights[-1], pf.ancestors)

    def sweep(ref, k):
        est, ll, new_ref = ppg_sweep(k, model, ys, inputs, functional, ref, num_particles=num_particles,
                                     num_backward=num_backward, use_bound=use_bound, proposal=proposal,
                                     ancestor_sampling=ancestor_sampling)
        return new_ref, (est, ll)

    ref, (trace, lls) = lax.scan(sweep, ref, jax.random.split(k_iters, num_iters))
    estimate = jax.tree_util.tree_map(lambda a: jnp.mean(a[burn_in:], axis=0), trace)
    return PPGResult(estimate, trace, lls, ref)


def ppg(key, model, emissions, additive_functional, num_particles: int, num_iters: int, *, burn_in: int = 0,
        num_backward: int = 2, backward: str = "auto", proposal=None, ancestor_sampling: bool = False,
        inputs=None) -> PPGResult:
    """Smoothed additive functional by PaRIS particle Gibbs, averaged over sweeps.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D), one sequence.
        additive_functional: as for `paris`.
        num_particles: N >= 2 per sweep (the reference included).
        num_iters: number of sweeps.
        burn_in: sweeps left out of the average (0 <= burn_in < num_iters).
        num_backward: Ñ backward draws per particle.
        backward: "auto", "exact", "rejection" or "mcmc" backward draws (see `paris`).
        ancestor_sampling: also resample the reference's ancestors (PGAS-style).

    Returns:
        `PPGResult` with ``estimate``, per-sweep ``trace``, ``log_likelihood`` per sweep and the
        last ``reference``.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_backward = checks.positive_int(num_backward, "num_backward")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or not (0 <= burn_in < num_iters):
        raise ValueError(f"burn_in: expected an integer in [0, num_iters={num_iters}), got {burn_in!r}")
    use_bound = resolve_backward(model, backward)
    ys, inputs, batched, batched_u = C.prepare_emissions(model, emissions, inputs)
    if batched:
        raise ValueError(f"emissions: ppg takes one sequence (T, D), got shape {tuple(ys.shape)}")
    F.check_proposal(key, model, ys, inputs, proposal, False, False)
    functional = check_functional(model, ys, inputs, additive_functional, False, False)
    return _run(key, model, ys, inputs, functional, num_particles=num_particles, num_backward=num_backward,
                num_iters=num_iters, burn_in=burn_in, use_bound=use_bound, proposal=proposal,
                ancestor_sampling=bool(ancestor_sampling))
