"""Particle filters: bootstrap, guided (user proposal) and auxiliary, with ESS-triggered resampling.

The loop the `lax.scan` runs (W are normalised weights, eta the auxiliary
look-ahead log-weights, zero for the bootstrap and guided filters)::

    z_0^i ~ q_0;  w_0^i = p(z_0^i) g(y_0 | z_0^i) / q_0(z_0^i);  log Z = log mean_i w_0^i
    for t in 1..T-1:
        V^i = W_{t-1}^i exp(eta(z_{t-1}^i, y_t));  log Z += log sum_i V^i;  normalise V
        if ESS(V) <= ess_threshold * N:  a ~ resample(V);  V = 1/N       # else a^i = i
        z_t^i ~ q(. | z_{t-1}^{a_i}, y_t)
        w^i = f(z_t^i | z_{t-1}^{a_i}) g(y_t | z_t^i) / (q(z_t^i | ...) exp(eta(z_{t-1}^{a_i})))
        log Z += log sum_i V^{a_i} w^i;  W_t = normalise(V^{a_i} w^i)

exp(log Z) is an unbiased estimate of p(y_{0:T-1}). Weights live in log space and
are normalised every step; when every weight underflows (all -inf) the weights
fall back to uniform and log Z becomes -inf, never NaN. A time step whose
observation holds a NaN is missing: every particle gets weight one (see
`probssm.inference.smc.common` for the shared conventions: lagged inputs, padding).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax

from probssm.inference.smc import common as C
from probssm.inference.smc.resampling import SCHEMES, multinomial

__all__ = ["ParticleFilterResult", "PFState", "StepInfo", "particle_filter", "particle_filter_sequence", "init",
           "step", "step_with_keys", "check_proposal", "check_auxiliary"]


class ParticleFilterResult(NamedTuple):
    """Output of `particle_filter` (a leading axis B is added for a batch of sequences).

    For a scalar state (an HMM's integer state) the trailing d axis is absent:
    particles (T, N), filtered_means (T,) (the weighted mean of the state).

    With ``history=False`` the particles and log-weights of the last step only are kept
    (shapes (N, d) and (N,)) and ``ancestors`` is None.
    """

    log_likelihood: jax.Array  # ()        log of an unbiased estimate of p(y_{0:T-1})
    filtered_means: jax.Array  # (T, d)    sum_i W_t^i z_t^i
    particles: jax.Array  # (T, N, d)      z_t^i
    log_weights: jax.Array  # (T, N)       normalised filtering log-weights log W_t^i
    ess: jax.Array  # (T,)                 effective sample size of W_t
    ancestors: Optional[jax.Array] = None  # (T, N) int32; row 0 is 0..N-1
    resampled: Optional[jax.Array] = None  # (T,) bool; whether step t resampled


class PFState(NamedTuple):
    particles: jax.Array  # (N, d)
    log_weights: jax.Array  # (N,) normalised
    log_likelihood: jax.Array  # ()


class StepInfo(NamedTuple):
    ancestors: jax.Array  # (N,)
    resampled: jax.Array  # ()
    ess: jax.Array  # () of the new weights


def init(key, model, y0, u0, num_particles: int, proposal=None, reference=None) -> PFState:
    """Particles at time 0 (``reference``, when given, is frozen in slot 0)."""
    d0 = model.initial(u0)
    if proposal is None:
        z = C.sample_dist(key, d0, num_particles)
    else:
        q0 = proposal(None, 0, y0, u0)
        z = C.sample_dist(key, q0, num_particles)
    if reference is not None:
        z = z.at[0].set(reference.astype(z.dtype))
    incr = C.emission_log_prob(model, z, 0, y0, u0)
    if proposal is not None:
        incr = incr + d0.log_prob(z) - q0.log_prob(z)
    lw, log_sum = C.normalise(incr)
    return PFState(z, lw, log_sum - math.log(num_particles))


def _ancestor_sample(key, model, state, t, u, ref_t):
    """Index j of the reference's ancestor, drawn with probability prop. to W_{t-1}^j f(ref_t | z_{t-1}^j)."""
    logf = jax.vmap(lambda zp: model.transition(zp, t, u).log_prob(ref_t))(state.particles)
    lw, _ = C.normalise(state.log_weights + logf)
    c = C.cumulative(jnp.exp(lw))
    v = jax.random.uniform(key, (), c.dtype)
    return jnp.minimum(jnp.sum(c <= v), lw.shape[0] - 1).astype(jnp.int32)


def step(key, model, state: PFState, t, y, u, *, resampling="systematic", ess_threshold=0.5, proposal=None,
         auxiliary=None, reference=None, ancestor_sampling=False):
    """One step of the filter (see the module docstring); returns ``(new_state, StepInfo)``.

    With a ``reference`` state (conditional SMC) the step always resamples (multinomially),
    slot 0 keeps the reference, and its ancestor is 0 or, with ``ancestor_sampling``, drawn
    from the backward kernel.
    """
    k_res, k_move, k_as = jax.random.split(key, 3)
    new, info, _ = step_with_keys((k_res, k_move, k_as), model, state, t, y, u, None, resampling=resampling,
                         ess_threshold=ess_threshold, proposal=proposal, auxiliary=auxiliary, reference=reference,
                         ancestor_sampling=ancestor_sampling)
    return new, info


def step_with_keys(keys, model, state: PFState, t, y, u, ess_prev, *, resampling="systematic", ess_threshold=0.5,
                   proposal=None, auxiliary=None, reference=None, ancestor_sampling=False):
    """`step` with its three keys given, and the ESS of ``state``'s weights when known (None:
    computed here); returns ``(new_state, StepInfo, W_t)`` (W_t the normalised weights)."""
    k_res, k_move, k_as = keys
    num = state.log_weights.shape[0]
    zp, lw, ll = state
    eta = None
    if auxiliary is not None:
        y_safe, observed = C.observation(y)
        eta = jax.vmap(lambda z: auxiliary(z, t, y_safe, u))(zp)
        eta = jnp.where(observed, eta, 0.0)
        lw, c = C.normalise(lw + eta)
        ll = ll + c
        ess_prev = None
    uniform = jnp.full((num,), -math.log(num), lw.dtype)
    if reference is None:
        do = (C.ess(lw) if ess_prev is None else ess_prev) <= ess_threshold * num
        scheme = SCHEMES[resampling]

        def resample():  # the gather runs only on the steps that resample
            a = scheme(k_res, jnp.exp(lw))
            return a, zp[a], uniform

        def keep():
            return jnp.arange(num, dtype=jnp.int32), zp, lw

        a, zp_a, lw_carry = lax.cond(do, resample, keep)
    else:
        do = jnp.asarray(True)
        a = multinomial(k_res, jnp.exp(lw))
        a0 = _ancestor_sample(k_as, model, state, t, u, reference) if ancestor_sampling else 0
        a = a.at[0].set(a0)
        zp_a = zp[a]
        lw_carry = uniform
    if proposal is None:
        z = C.sample_per_particle(k_move, lambda zz: model.transition(zz, t, u), zp_a)
    else:
        z = C.sample_per_particle(k_move, lambda zz: proposal(zz, t, y, u), zp_a)
    if reference is not None:
        z = z.at[0].set(reference.astype(z.dtype))
    incr = C.emission_log_prob(model, z, t, y, u)
    if proposal is not None:
        incr = incr + C.transition_log_prob(model, zp_a, z, t, u) - jax.vmap(
            lambda zz, zi: proposal(zz, t, y, u).log_prob(zi))(zp_a, z)
    if eta is not None:
        incr = incr - eta[a]
    lw_new, c2, w_new, ess_new = C.normalise_with_ess(lw_carry + incr)
    return PFState(z, lw_new, ll + c2), StepInfo(a, do, ess_new), w_new


def particle_filter_sequence(key, model, emissions, inputs=None, *, num_particles: int,
                             resampling: str = "systematic", ess_threshold=0.5, proposal: Optional[Callable] = None,
                             auxiliary: Optional[Callable] = None, history: bool = True,
                             length=None) -> ParticleFilterResult:
    """Particle filter on one sequence: the public traceable core of `particle_filter`.

    Args:
        key: a `jax.random` key.
        model: any `ps.SSM`.
        emissions: (T, D); NaN marks a missing step (weight one).
        inputs: None (the model's `default_inputs`) or (T, ...) rows.
        num_particles: N (static int >= 2).
        resampling: scheme name (static), see `probssm.inference.smc.resampling.SCHEMES`.
        ess_threshold: resample when ESS <= ess_threshold * N (a float or a traced scalar).
        proposal, auxiliary: as for `particle_filter` (static callables).
        history: keep every step's particles, weights and ancestors (static).
        length: true length of a padded sequence (int, possibly traced); steps at and beyond it
            are missing, so the log-likelihood is that of the first ``length`` steps.

    Returns:
        `ParticleFilterResult`: log_likelihood (), filtered_means (T, d), particles (T, N, d),
        log_weights (T, N), ess (T,), ancestors (T, N), resampled (T,) (last step only
        without history).

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap / grad (grad flows through the weights, not through resampling).
    """
    C.check_model(model)
    ys, inputs = C.prepare_sequence(model, emissions, inputs, length)
    proposal = C.pad_proposal(proposal, length)
    auxiliary = C.pad_proposal(auxiliary, length)
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps)
    state = init(keys[0], model, ys[0], C.row(inputs, 0), num_particles, proposal)
    w0 = jnp.exp(state.log_weights)
    mean0 = C.weighted_sum(w0, state.particles)
    ess0 = 1.0 / jnp.sum(w0 * w0)
    step_keys = jax.vmap(lambda k: jax.random.split(k, 3))(keys[1:])  # (T-1, 3): resample, move, spare
    move_keys = C.bit_keys(step_keys[:, 1])  # the move draws' generator states, drawn at once

    def body(carry, xs):
        state, ess_prev = carry
        t, y, u, k, k_move = xs
        new, info, w = step_with_keys((k[0], k_move, k[2]), model, state, t, y, u, ess_prev, resampling=resampling,
                             ess_threshold=ess_threshold, proposal=proposal, auxiliary=auxiliary)
        mean = C.weighted_sum(w, new.particles)
        if history:
            out = (mean, info.ess, new.particles, new.log_weights, info.ancestors, info.resampled)
        else:
            out = (mean, info.ess)
        return (new, info.ess), out

    xs = (jnp.arange(1, num_timesteps), ys[1:], C.rest(inputs), step_keys, move_keys)
    (final, _), out = lax.scan(body, (state, ess0), xs)
    means = jnp.concatenate([mean0[None], out[0]])
    ess = jnp.concatenate([ess0[None], out[1]])
    if history:
        parts = jnp.concatenate([state.particles[None], out[2]])
        lws = jnp.concatenate([state.log_weights[None], out[3]])
        anc = jnp.concatenate([jnp.arange(num_particles, dtype=jnp.int32)[None], out[4]])
        res = jnp.concatenate([jnp.zeros((1,), bool), out[5]])
        return ParticleFilterResult(final.log_likelihood, means, parts, lws, ess, anc, res)
    return ParticleFilterResult(final.log_likelihood, means, final.particles, final.log_weights, ess)


@eqx.filter_jit
def _run(key, model, batch, ess_threshold, *, num_particles, resampling, proposal, auxiliary, history):
    def one(y, u, n, k):
        return particle_filter_sequence(k, model, y, u, num_particles=num_particles, resampling=resampling,
                                        ess_threshold=ess_threshold, proposal=proposal, auxiliary=auxiliary,
                                        history=history, length=n)

    return batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))


def check_proposal(key, model, batch, proposal):
    """Call the proposal once at t = 0 and t = 1 and check it returns a state of the model's event shape."""
    if proposal is None:
        return
    if not callable(proposal):
        raise ValueError("proposal: expected a callable proposal(z_prev, t, y_t, inputs) -> distribution")
    y, u = C.first_sequence(model, batch)
    d0 = model.initial(C.row(u, 0))
    shape = tuple(d0.event_shape)
    q0 = proposal(None, 0, y[0], C.row(u, 0))
    for tt, q in ((0, q0),) + (((1, proposal(d0.sample(key), 1, y[1], C.row(u, 1))),) if y.shape[0] > 1 else ()):
        event = tuple(q.event_shape) if isinstance(q, dist.Distribution) else None
        batch_shape = tuple(q.batch_shape) if isinstance(q, dist.Distribution) else None
        if event != shape or batch_shape != ():
            got = type(q).__name__ if event is None else f"event shape {event} and batch shape {batch_shape}"
            raise ValueError(f"proposal: at t={tt} expected a distribution with event shape {shape} and no batch "
                             f"shape, got {got}")


def check_auxiliary(key, model, batch, auxiliary):
    if auxiliary is None:
        return
    if not callable(auxiliary):
        raise ValueError("auxiliary: expected a callable auxiliary(z_prev, t, y_t, inputs) -> scalar log-weight")
    y, u = C.first_sequence(model, batch)
    z = C.state_struct(model, C.row(u, 0))
    if y.shape[0] > 1:
        out = jax.eval_shape(lambda zz: auxiliary(zz, 1, y[1], C.row(u, 1)), z)
        if tuple(out.shape) != ():
            raise ValueError(f"auxiliary: expected a scalar log-weight, got shape {tuple(out.shape)}")


def particle_filter(key, model, emissions, num_particles: int, *, resampling: str = "systematic",
                    ess_threshold: float = 0.5, proposal: Optional[Callable] = None,
                    auxiliary: Optional[Callable] = None, inputs=None, lengths=None,
                    history: bool = True) -> ParticleFilterResult:
    """Bootstrap, guided or auxiliary particle filter for any `SSM`.

    Args:
        key: a `jax.random` key.
        model: any `ps.SSM` (its ``initial`` / ``transition`` / ``emission`` are vmapped over
            particles); continuous or discrete (an HMM's particles are integer states).
        emissions: (T, D), a batch (B, T, D) or a list of (T_b, D) arrays; a NaN anywhere in
            y_t marks step t missing (weight one).
        num_particles: N >= 2.
        resampling: "systematic" (default), "stratified", "multinomial" or "residual".
        ess_threshold: resample when ESS <= ess_threshold * N; in (0, 1] (1: every step).
        proposal: guided filter: ``proposal(z_prev, t, y_t, inputs)`` returns a numpyro distribution
            over z_t with the state's event shape (``z_prev`` is None at t = 0). None: bootstrap.
        auxiliary: auxiliary filter: ``auxiliary(z_prev, t, y_t, inputs)`` returns a scalar
            look-ahead log-weight (e.g. log g(y_t | mean of f(z_prev))).
        inputs: optional (T, U) inputs shared by a batch, or (B, T, U) / a list, one per sequence;
            row t is passed to the model at step t. None: the model's `default_inputs`.
        lengths: (B,) true lengths of a padded batch. Steps beyond a sequence's length are
            treated as missing data (weight one), which leaves its log-likelihood estimate
            that of its own length; filtered means there are predictions.
        history: keep the particles, weights and ancestors of every step (needed by
            `backward_sample`); False keeps only the last step (memory independent of T).

    Returns:
        `ParticleFilterResult` (a leading axis B for a batch).

    Example:
        >>> model = ps.models.StochasticVolatility()
        >>> _, y = ps.sample(jax.random.key(0), model, 500)
        >>> pf = ps.smc.particle_filter(jax.random.key(1), model, y, 1000)
        >>> pf.log_likelihood, pf.filtered_means.shape     # (), (500, 1)

    Models holding plain Python functions are fine (the engine is compiled with
    `equinox.filter_jit`); pass the same function objects again to reuse the compiled code.
    The traceable single-sequence core is `particle_filter_sequence`.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    resampling = C.check_resampling(resampling)
    thr = C.check_ess_threshold(ess_threshold)
    batch = C.prepare(model, emissions, inputs, lengths)
    check_proposal(key, model, batch, proposal)
    check_auxiliary(key, model, batch, auxiliary)
    return _run(key, model, batch, jnp.asarray(thr, batch.emissions.dtype), num_particles=num_particles,
                resampling=resampling, proposal=proposal, auxiliary=auxiliary, history=bool(history))
