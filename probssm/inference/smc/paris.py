"""PaRIS: online smoothing of additive functionals (Olsson & Westerborn, 2017).

Target: E[ sum_{t=0}^{T-1} h_t(z_{t-1}, z_t, y_t) | y_{0:T-1} ] (the t = 0 term is
h_0(z_0, y_0)). Each particle carries a statistic tau_t^i; with J^{i,1..Ñ} drawn
from the backward kernel (prob. prop. to W_{t-1}^j f_t(z_t^i | z_{t-1}^j))::

    tau_0^i = h_0(z_0^i, y_0)
    for t in 1..T-1:
        (run one particle-filter step: z_t, W_t)
        tau_t^i = (1 / Ñ) sum_k [ tau_{t-1}^{J^{i,k}} + h_t(z_{t-1}^{J^{i,k}}, z_t^i, y_t) ]
    estimate = sum_i W_{T-1}^i tau_{T-1}^i

One pass, memory independent of T. Backward draws are accept-reject when the
model declares a transition bound (`AbstractBoundedTransitionSSM`), exact O(N)
per draw otherwise. The same step, driven by conditional SMC, is PPG (`ppg.py`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.inference.smc import common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.backward import backward_indices, resolve_method

__all__ = ["AdditiveFunctional", "PaRISResult", "PaRISState", "paris", "paris_sequence", "init", "step", "estimate",
           "as_functional", "mask_functional", "check_functional", "resolve_backward", "backward_update",
           "mcmc_indices"]


class AdditiveFunctional(NamedTuple):
    """h_0(z_0, y_0, inputs_0) and h_t(z_{t-1}, z_t, t, y_t, inputs_t), each returning a pytree of arrays.

    A plain callable ``h(z_prev, z, t, y, inputs)`` passed to `paris` / `ppg` stands for
    ``AdditiveFunctional(initial=None, step=h)``: the t = 0 term is then zero.
    """

    initial: Optional[Callable]
    step: Callable


def as_functional(fn) -> AdditiveFunctional:
    if isinstance(fn, AdditiveFunctional):
        if not callable(fn.step) or (fn.initial is not None and not callable(fn.initial)):
            raise ValueError("additive_functional: expected callables initial(z, y, inputs) and "
                             "step(z_prev, z, t, y, inputs)")
        return fn
    if callable(fn):
        return AdditiveFunctional(None, fn)
    raise ValueError("additive_functional: expected AdditiveFunctional(initial, step) or a callable "
                     f"h(z_prev, z, t, y, inputs), got {type(fn).__name__}")


class PaRISState(NamedTuple):
    filter: F.PFState
    tau: object  # pytree, leading axis N


class PaRISResult(NamedTuple):
    estimate: object  # pytree like h's output: the smoothed additive functional
    log_likelihood: jax.Array  # ()  from the same particle filter
    state: PaRISState  # final state (continue online with `step`)


def _initial_tau(functional, model, z, y, u):
    zero_like = jax.eval_shape(lambda zp, zz: functional.step(zp, zz, 1, y, u), z[0], z[0])
    if functional.initial is None:
        return jax.tree_util.tree_map(lambda s: jnp.zeros((z.shape[0],) + s.shape, s.dtype), zero_like)
    return jax.vmap(lambda zz: functional.initial(zz, y, u))(z)


def init(key, model, y0, u0, functional, num_particles, proposal=None, reference=None) -> PaRISState:
    functional = as_functional(functional)
    state = F.init(key, model, y0, u0, num_particles, proposal, reference)
    return PaRISState(state, _initial_tau(functional, model, state.particles, y0, u0))


def _weight_draws(weights, uniforms):
    """(R, N) indices, each marginally an exact draw from the weights: per round r, the N sorted
    points of a systematic set (one uniform U; O(N), no search) read off cyclically from an
    independent uniform offset s, so slot i holds the point (((i + s) mod N) + U) / N, a uniform
    on [0, 1) whatever i is. Slots of a round depend on each other, on nothing but (U, s).
    ``uniforms``: (R, 2), the (U, s / N) of each round. Particles of weight zero can be drawn
    where a float cumulative sum is not flat across them: the caller rejects them."""
    from probssm.inference.smc.resampling import ancestors_from_counts

    num = weights.shape[0]
    c = C.cumulative(weights, fast=True)  # zero-weight draws are rejected by the caller
    out = []
    for r in range(uniforms.shape[0]):
        a = ancestors_from_counts(jnp.ceil(num * c - uniforms[r, 0]), num)
        shift = jnp.minimum(jnp.floor(uniforms[r, 1] * num).astype(jnp.int32), num - 1)
        # the cyclic read as a slice of the doubled array (cheaper on CPU than a gather)
        out.append(lax.dynamic_slice_in_dim(jnp.concatenate([a, a]), shift, num))
    return jnp.stack(out)


def mcmc_indices(key, model, lw_prev, z_prev, z_new, ancestors, t, u, num_backward, weights=None):
    """(N * Ñ,) backward indices by independent Metropolis-Hastings (Dau & Chopin, 2023).

    Particle i's chain starts at its ancestor a^i (given z_t^i, an exact draw from the backward
    kernel) and takes Ñ steps, each proposing j ~ W_{t-1} and accepting with probability
    min(1, f_t(z_t^i | z_{t-1}^j) / f_t(z_t^i | z_{t-1}^{current})) (never a j of weight zero);
    the Ñ states visited are the draws, each an exact draw marginally (the chain starts in its
    target and keeps it). The proposal of chain i is independent of its current state, as the
    kernel needs; across chains the proposals of a step come from one systematic set
    (`_weight_draws`), O(N) for all of them. ``weights``: W_{t-1} (default exp(lw_prev)).
    Rows are ordered like ``jnp.repeat(z_new, Ñ)``.
    """
    num = z_new.shape[0]
    w = jnp.exp(lw_prev) if weights is None else weights
    uniforms = C.uniform(key, (num_backward, num + 2), jnp.float32)  # one draw: V, then (U, s / N)
    props = _weight_draws(w, uniforms[:, num:].astype(w.dtype))
    # log V in float32: the acceptance probability is realised to about 1e-7, far below any
    # Monte Carlo error, and a float64 log of N Ñ uniforms costs as much as the densities
    log_v = jnp.where(w[props] > 0, jnp.log(uniforms[:, :num]), jnp.inf)

    def mh_step(carry, xs):
        cur, logf_cur = carry
        prop, log_v_k = xs
        logf = C.transition_log_prob(model, z_prev[prop], z_new, t, u)
        acc = log_v_k < (logf - logf_cur).astype(jnp.float32)
        cur, logf_cur = jnp.where(acc, prop, cur), jnp.where(acc, logf, logf_cur)
        return (cur, logf_cur), cur

    logf_start = C.transition_log_prob(model, z_prev[ancestors], z_new, t, u)
    _, visited = lax.scan(mh_step, (ancestors, logf_start), (props, log_v))  # (Ñ, N)
    return visited.T.reshape(-1).astype(jnp.int32)


def backward_update(key, model, functional, prev: F.PFState, tau_prev, z_new, t, y, u, num_backward,
                    use_bound, max_rounds=2, ancestors=None, weights=None):
    """tau_t for every new particle, and the (N, Ñ) backward indices used.

    ``use_bound``: False (exact draws), True (accept-reject with the model's bound) or "mcmc"
    (independent Metropolis-Hastings started at ``ancestors``). ``weights``: W_{t-1} when known.
    """
    num = z_new.shape[0]
    targets = jnp.repeat(z_new, num_backward, axis=0)
    if isinstance(use_bound, str):
        j = mcmc_indices(key, model, prev.log_weights, prev.particles, z_new, ancestors, t, u, num_backward,
                         weights)
    else:
        bound = C.transition_log_bound(model, t, u) if use_bound else None
        j = backward_indices(key, model, prev.log_weights, prev.particles, targets, t, u, log_bound=bound,
                             max_rounds=max_rounds)
    h = jax.vmap(lambda zp, zz: functional.step(zp, zz, t, y, u))(prev.particles[j], targets)
    summed = jax.tree_util.tree_map(lambda a, b: a[j] + b, tau_prev, h)
    tau = jax.tree_util.tree_map(lambda s: jnp.mean(s.reshape((num, num_backward) + s.shape[1:]), axis=1), summed)
    return tau, j.reshape(num, num_backward)


def step(key, model, state: PaRISState, t, y, u, functional, *, num_backward=2, use_bound=True, resampling="systematic",
         ess_threshold=0.5, proposal=None, auxiliary=None, reference=None, ancestor_sampling=False):
    """One PaRIS step; returns ``(new_state, backward_indices (N, Ñ))``."""
    functional = as_functional(functional)
    k_f, k_b = jax.random.split(key)
    new, info = F.step(k_f, model, state.filter, t, y, u, resampling=resampling, ess_threshold=ess_threshold,
                       proposal=proposal, auxiliary=auxiliary, reference=reference,
                       ancestor_sampling=ancestor_sampling)
    tau, j = backward_update(k_b, model, functional, state.filter, state.tau, new.particles, t, y, u,
                             num_backward, use_bound, ancestors=info.ancestors)
    return PaRISState(new, tau), j


def estimate(state: PaRISState):
    return C.weighted_mean(state.filter.log_weights, state.tau)


def mask_functional(functional: AdditiveFunctional, length) -> AdditiveFunctional:
    """The functional with its terms at steps t >= ``length`` set to zero (padding carries no
    terms); ``length`` None returns it unchanged."""
    functional = as_functional(functional)
    if length is None:
        return functional
    inner = functional.step

    def step_fn(zp, z, t, y, u):
        return jax.tree_util.tree_map(lambda a: jnp.where(t < length, a, jnp.zeros_like(a)), inner(zp, z, t, y, u))

    return AdditiveFunctional(functional.initial, step_fn)


def paris_sequence(key, model, emissions, inputs=None, *, additive_functional, num_particles: int,
                   num_backward: int = 2, resampling: str = "systematic", ess_threshold=0.5, proposal=None,
                   auxiliary=None, backward: str = "auto", length=None) -> PaRISResult:
    """PaRIS on one sequence: the public traceable core of `paris`.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        emissions: (T, D); NaN marks a missing step.
        inputs: None (the model's `default_inputs`) or (T, ...) rows.
        additive_functional: `AdditiveFunctional` or a callable ``h(z_prev, z, t, y, inputs)``.
        num_particles, num_backward: N and Ñ (static ints).
        resampling, ess_threshold, proposal, auxiliary: as for `particle_filter_sequence`.
        backward: "auto", "exact", "rejection" or "mcmc" (static), see `paris`.
        length: true length of a padded sequence; steps at and beyond it are missing and their
            terms h_t are dropped, so the estimate is that of the first ``length`` steps.

    Returns:
        `PaRISResult`: estimate (pytree like h's output), log_likelihood (), final state.

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap / grad.
    """
    C.check_model(model)
    use_bound = resolve_backward(model, backward)
    functional = mask_functional(additive_functional, length)
    ys, inputs = C.prepare_sequence(model, emissions, inputs, length)
    proposal = C.pad_proposal(proposal, length)
    auxiliary = C.pad_proposal(auxiliary, length)
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps)
    state = init(keys[0], model, ys[0], C.row(inputs, 0), functional, num_particles, proposal)
    # The filter's keys are drawn up front, as in `particle_filter_sequence`, and each step hands
    # its normalised weights and their ESS on to the next (no second exp pass over them).
    step_keys = jax.vmap(lambda k: jax.random.split(k, 4))(keys[1:])  # resample, move, spare, backward
    move_keys = C.bit_keys(step_keys[:, 1])
    back_keys = C.bit_keys(step_keys[:, 3]) if use_bound == "mcmc" else step_keys[:, 3]
    w0 = jnp.exp(state.filter.log_weights)

    def body(carry, xs):
        state, ess_prev, w_prev = carry
        t, y, u, k, k_move, k_back = xs
        new, info, w = F.step_with_keys((k[0], k_move, k[2]), model, state.filter, t, y, u, ess_prev, resampling=resampling,
                               ess_threshold=ess_threshold, proposal=proposal, auxiliary=auxiliary)
        tau, _ = backward_update(k_back, model, functional, state.filter, state.tau, new.particles, t, y, u,
                                 num_backward, use_bound, ancestors=info.ancestors, weights=w_prev)
        return (PaRISState(new, tau), info.ess, w), None

    xs = (jnp.arange(1, num_timesteps), ys[1:], C.rest(inputs), step_keys, move_keys, back_keys)
    (final, _, _), _ = lax.scan(body, (state, 1.0 / jnp.sum(w0 * w0), w0), xs)
    return PaRISResult(estimate(final), final.filter.log_likelihood, final)


@eqx.filter_jit
def _run(key, model, batch, ess_threshold, functional, *, num_particles, num_backward, resampling, proposal,
         auxiliary, backward):
    def one(y, u, n, k):
        return paris_sequence(k, model, y, u, additive_functional=functional, num_particles=num_particles,
                              num_backward=num_backward, resampling=resampling, ess_threshold=ess_threshold,
                              proposal=proposal, auxiliary=auxiliary, backward=backward, length=n)

    return batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))


def check_functional(model, batch, functional):
    """Evaluate the functional abstractly on the model's state (shape and dtype of a draw of
    ``model.initial``) and check initial and step agree; returns it as an `AdditiveFunctional`."""
    functional = as_functional(functional)
    y, u = C.first_sequence(model, batch)
    zs = C.state_struct(model, C.row(u, 0))
    try:
        out = jax.eval_shape(lambda zp, z: functional.step(zp, z, 1, y[0], C.row(u, 0)), zs, zs)
        if functional.initial is not None:
            out0 = jax.eval_shape(lambda z: functional.initial(z, y[0], C.row(u, 0)), zs)
            if jax.tree_util.tree_structure(out0) != jax.tree_util.tree_structure(out) or any(
                    a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(out0), jax.tree_util.tree_leaves(out))):
                raise ValueError("additive_functional: initial and step must return the same shapes")
    except ValueError:
        raise
    except Exception as e:  # a shape error inside the user's function
        raise ValueError(f"additive_functional: failed on a state of shape {zs.shape}: {e}") from e
    return functional


def resolve_backward(model, backward):
    """False (exact draws), True (accept-reject with the declared bound) or "mcmc"."""
    if backward == "mcmc":
        return "mcmc"
    return resolve_method(model, backward, "backward", extra=("mcmc",))


def paris(key, model, emissions, additive_functional, num_particles: int, num_backward: int = 2, *,
          resampling: str = "systematic", ess_threshold: float = 0.5, proposal=None, auxiliary=None,
          backward: str = "auto", inputs=None, lengths=None) -> PaRISResult:
    """Smoothed expectation of an additive functional by PaRIS, in one forward pass.

    Args:
        key: a `jax.random` key.
        model: any `SSM`; accept-reject backward draws when it declares a transition bound.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays.
        additive_functional: `AdditiveFunctional(initial, step)` or a callable
            ``h(z_prev, z, t, y, inputs)`` (then the t = 0 term is zero); outputs any pytree.
            Static: compiled once per function object, so pass the same one on every call.
        num_particles: N >= 2.
        num_backward: Ñ >= 1 backward draws per particle (2 is enough for O(1/N) bias... see
            Olsson & Westerborn).
        resampling, ess_threshold, proposal, auxiliary, inputs: as for `particle_filter`.
        backward: "auto" (rejection when the model declares a transition bound, else exact),
            "exact" (O(N^2) per step), "rejection" (exact draws by accept-reject, O(N) expected,
            with an exact fallback) or "mcmc" (Ñ independent Metropolis-Hastings steps started at
            each particle's ancestor, Dau & Chopin 2023: O(N) per step for any model, correlated draws).
        lengths: (B,) true lengths of a padded batch: steps beyond are missing data and carry
            no terms of the functional (the estimate is that of each sequence's own length).

    Returns:
        `PaRISResult`: ``estimate`` (same pytree as h's output), ``log_likelihood``, final ``state``
        (a leading axis B for a batch).

    Example:
        >>> f = ps.smc.AdditiveFunctional(initial=lambda z, y, u: z, step=lambda zp, z, t, y, u: z)
        >>> ps.smc.paris(key, model, y, f, 1000).estimate     # ~ sum_t E[z_t | y]

    The traceable single-sequence core is `paris_sequence`.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    num_backward = checks.positive_int(num_backward, "num_backward")
    resampling = C.check_resampling(resampling)
    thr = C.check_ess_threshold(ess_threshold)
    resolve_backward(model, backward)
    batch = C.prepare(model, emissions, inputs, lengths)
    F.check_proposal(key, model, batch, proposal)
    F.check_auxiliary(key, model, batch, auxiliary)
    functional = check_functional(model, batch, additive_functional)
    return _run(key, model, batch, jnp.asarray(thr, batch.emissions.dtype), functional,
                num_particles=num_particles, num_backward=num_backward, resampling=resampling, proposal=proposal,
                auxiliary=auxiliary, backward=backward)
