"""Stochastic-gradient maximum likelihood with particle estimates of the score.

Fisher's identity writes the score as a smoothed additive functional::

    grad log p_theta(y_{0:T-1}) = E[ sum_t h_t(z_{t-1}, z_t) | y ],
    h_0 = grad [log p_theta(z_0) + log g_theta(y_0 | z_0)],
    h_t = grad [log f_theta(z_t | z_{t-1}) + log g_theta(y_t | z_t)],

so PaRIS (one pass, O(1/N) bias), PPG (conditional sweeps that carry a
reference path from one iteration to the next, the Markov-score-climbing flavour
of stochastic approximation) or HMC-SMC (a tempered particle filter with HMC
moves, the sum carried along its particle paths; for informative observations,
where the bootstrap proposals of the other two degenerate) estimate it, and
optax climbs it. theta are the model's learnable fields in unconstrained
coordinates (numpyro ``biject_to`` of the constraint each field declares in its
metadata), so constraints always hold.

The whole fit is one `lax.scan` compiled once; ``history`` holds the particle
estimate of log p(y) at each iteration.
"""
from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks, params as P, progress as prog
from probssm.inference.smc import common as C
from probssm.inference.smc.csmc import conditional_smc_sequence, trace_ancestry
from probssm.inference.smc.filter import check_proposal, particle_filter_sequence
from probssm.inference.smc.hmc_smc import check_vector_state, hmc_smc_sequence
from probssm.inference.smc.paris import AdditiveFunctional, paris_sequence, resolve_backward
from probssm.inference.smc.ppg import ppg_sequence

__all__ = ["score_functional", "score_estimate", "score_mle", "markov_score_climbing", "default_optimizer"]


def _emission_term(model, z, t, y, u):
    y_safe, observed = C.observation(y)
    return jnp.where(observed, C.log_prob_of(model.emission(z, t, u), y_safe), 0.0)


def _as_spec(spec) -> P.ParamSpec:
    if isinstance(spec, P.ParamSpec):
        return spec
    if isinstance(spec, dict):  # {path: constraint}, the older form
        return P.ParamSpec(tuple(spec), tuple(spec.values()))
    raise ValueError(f"spec: expected a ps.core.params.ParamSpec, got {type(spec).__name__}")


def score_functional(model, spec, params: dict) -> AdditiveFunctional:
    """Fisher's identity as an `AdditiveFunctional` whose value is a dict of gradients w.r.t. ``params``.

    Args:
        model: the model (its free arrays are replaced by the images of ``params``).
        spec: a `probssm.core.params.ParamSpec` (``ps.core.params.spec(model, fixed)``), or a
            dict ``{path: constraint}``.
        params: ``{path: unconstrained array}`` (``ps.core.params.to_unconstrained(model, spec)``).
    """
    spec = _as_spec(spec)

    def log0(p, z, y, u):
        m = P.from_unconstrained(model, spec, p)
        return m.initial(u).log_prob(z) + _emission_term(m, z, 0, y, u)

    def logt(p, zp, z, t, y, u):
        m = P.from_unconstrained(model, spec, p)
        return m.transition(zp, t, u).log_prob(z) + _emission_term(m, z, t, y, u)

    return AdditiveFunctional(lambda z, y, u: jax.grad(log0)(params, z, y, u),
                              lambda zp, z, t, y, u: jax.grad(logt)(params, zp, z, t, y, u))


def _sum_batch(tree, batched):
    return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree) if batched else tree


def _paris_score(key, model, spec, params, batch, *, num_particles, num_backward, backward):
    m = P.from_unconstrained(model, spec, params)
    functional = score_functional(model, spec, params)

    def one(y, u, n, k):
        r = paris_sequence(k, m, y, u, additive_functional=functional, num_particles=num_particles,
                           num_backward=num_backward, backward=backward, length=n)
        return r.estimate, r.log_likelihood

    est, ll = batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))
    return _sum_batch(est, batch.batched), _sum_batch(ll, batch.batched)


def _ppg_score(key, model, spec, params, batch, refs, *, num_particles, num_backward, backward):
    m = P.from_unconstrained(model, spec, params)
    functional = score_functional(model, spec, params)

    def one(y, u, n, k, ref):
        r = ppg_sequence(k, m, y, u, additive_functional=functional, num_particles=num_particles, num_iters=1,
                         num_backward=num_backward, backward=backward, reference=ref, length=n)
        return r.estimate, r.log_likelihood[0], r.reference

    est, ll, ref = batch.map(one, C.sequence_keys(key, batch), refs, extra_axes=(0, 0))
    return _sum_batch(est, batch.batched), _sum_batch(ll, batch.batched), ref


def _hmc_smc_score(key, model, spec, params, batch, *, num_particles):
    m = P.from_unconstrained(model, spec, params)
    functional = score_functional(model, spec, params)

    def one(y, u, n, k):
        r = hmc_smc_sequence(k, m, y, u, num_particles=num_particles, additive_functional=functional, length=n)
        return r.estimate, r.log_likelihood

    est, ll = batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))
    return _sum_batch(est, batch.batched), _sum_batch(ll, batch.batched)


def _initial_refs(key, model, batch, num_particles, proposal=None):
    """One path per sequence, traced back through a particle filter."""
    def one(y, u, n, k):
        k1, k2 = jax.random.split(k)
        pf = particle_filter_sequence(k1, model, y, u, num_particles=num_particles, proposal=proposal,
                                      history=True, length=n)
        return trace_ancestry(k2, pf.particles, pf.log_weights[-1], pf.ancestors)

    return batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))


@eqx.filter_jit
def _fit(key, model, batch, params, *, fixed, optimizer, num_iters, estimator, num_particles, num_backward,
         backward, show):
    spec = P.spec(model, fixed)
    ys = batch.emissions
    num_obs = jnp.maximum(jnp.sum(~jnp.isnan(ys)), 1).astype(ys.dtype)
    every = prog.report_every(num_iters)
    k_init, k_iters = jax.random.split(key)
    refs = _initial_refs(k_init, model, batch, num_particles) if estimator == "ppg" else None

    def step(carry, xs):
        params, state, refs = carry
        i, k = xs
        if estimator == "paris":
            score, ll = _paris_score(k, model, spec, params, batch, num_particles=num_particles,
                                     num_backward=num_backward, backward=backward)
        elif estimator == "hmc_smc":
            score, ll = _hmc_smc_score(k, model, spec, params, batch, num_particles=num_particles)
        else:
            score, ll, refs = _ppg_score(k, model, spec, params, batch, refs, num_particles=num_particles,
                                         num_backward=num_backward, backward=backward)
        grad = jax.tree_util.tree_map(lambda g: -g / num_obs, score)  # optax minimises
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, ll, every)
        return (params, state, refs), ll

    (params, _, _), history = lax.scan(step, (params, optimizer.init(params), refs),
                                       (jnp.arange(num_iters), jax.random.split(k_iters, num_iters)))
    return P.from_unconstrained(model, spec, params), history


_DEFAULT_OPTIMIZERS = {}


def default_optimizer(num_iters: int):
    """Adam with a Robbins-Monro decay 0.05 / (1 + i / 20)^0.6 (one cached instance per num_iters)."""
    if num_iters not in _DEFAULT_OPTIMIZERS:
        _DEFAULT_OPTIMIZERS[num_iters] = optax.adam(lambda i: 0.05 / (1.0 + i / 20.0) ** 0.6)
    return _DEFAULT_OPTIMIZERS[num_iters]


def _fixed_paths(fixed) -> tuple:
    if isinstance(fixed, str):
        return (fixed,)
    return tuple(fixed)


def _prepare(model, emissions, inputs, lengths, fixed, estimator, num_particles, num_backward, backward):
    C.check_model(model)
    if estimator not in ("paris", "ppg", "hmc_smc"):
        raise ValueError(f"estimator: expected 'paris', 'ppg' or 'hmc_smc', got {estimator!r}")
    num_particles = C.check_num_particles(num_particles)
    num_backward = checks.positive_int(num_backward, "num_backward")
    fixed = _fixed_paths(fixed)
    spec = P.spec(model, fixed)  # raises a ValueError naming an unknown path
    if not spec.paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    resolve_backward(model, backward)
    batch = C.prepare(model, emissions, inputs, lengths)
    if estimator == "hmc_smc":
        check_vector_state(model, batch)
    return fixed, spec, num_particles, num_backward, batch


def score_estimate(key, model, emissions, num_particles: int = 500, *, fixed=(), num_backward: int = 2,
                   backward: str = "auto", inputs=None, lengths=None):
    """PaRIS estimate of the score (gradient of log p(y) w.r.t. the unconstrained free arrays).

    Args:
        key: a `jax.random` key.
        model: any `SSM`; its learnable arrays are those of `probssm.core.params.spec`, nested
            modules included (``"emissions.means"``, ``"transition_fn.layers.0.weight"``).
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (a batch sums the scores).
        fixed: dotted paths (or prefixes) held fixed.
        inputs, lengths: as for `ps.smc.paris`.

    Returns:
        ``(score, log_likelihood)``; ``score`` a dict keyed by dotted path.
    """
    fixed, spec, num_particles, num_backward, batch = _prepare(
        model, emissions, inputs, lengths, fixed, "paris", num_particles, num_backward, backward)
    params = P.to_unconstrained(model, spec)
    return _score_jit(key, model, batch, params, fixed=fixed, num_particles=num_particles,
                      num_backward=num_backward, backward=backward)


@eqx.filter_jit
def _score_jit(key, model, batch, params, *, fixed, num_particles, num_backward, backward):
    return _paris_score(key, model, P.spec(model, fixed), params, batch, num_particles=num_particles,
                        num_backward=num_backward, backward=backward)


def score_mle(model, emissions, num_iters: int, *, key, estimator: str = "paris", num_particles: int = 500,
              optimizer=None, fixed=(), progress=None, inputs=None, lengths=None, num_backward: int = 2,
              backward: str = "auto"):
    """Stochastic-gradient MLE with the particle score (PaRIS, PPG or HMC-SMC).

    Args:
        model: starting model; its learnable arrays (`probssm.core.params.spec`: every array
            field that declares a constraint, walked into sub-modules such as an HMM's emission
            family or an equinox network), minus ``fixed``, are fitted.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays; NaN marks missing steps.
        num_iters: gradient steps (one particle sweep each).
        key: a `jax.random` key (required).
        estimator: "paris" (fresh PaRIS run each step), "ppg" (one conditional PaRIS sweep per
            step, the reference path carried across steps) or "hmc_smc" (a fresh `hmc_smc` run
            each step with its default settings, the score summed along its particle paths; for
            models with a real vector state). ``num_backward`` and ``backward`` are PaRIS / PPG
            settings, unused by "hmc_smc".
        num_particles: N per sweep.
        optimizer: an optax optimiser (it receives minus the score per observation); default Adam
            with a decaying step, see `default_optimizer`.
        fixed: dotted paths (or prefixes) held fixed, e.g. ``("emissions.covs",)``.
        progress: progress bar (default: when num_iters >= 100).
        inputs, lengths: as for `ps.smc.paris` (a batch sums the sequences' scores).
        num_backward, backward: as for `ps.smc.paris`.

    Returns:
        ``(fitted_model, history)``; history: (num_iters,) particle log-likelihood estimates.

    Example:
        >>> fitted, hist = ps.learn.mle(model, y, 300, estimator="paris", key=jax.random.key(0))
    """
    if key is None:
        raise ValueError("key: the particle score needs a jax.random key, got None")
    num_iters = checks.positive_int(num_iters, "num_iters")
    fixed, spec, num_particles, num_backward, batch = _prepare(
        model, emissions, inputs, lengths, fixed, estimator, num_particles, num_backward, backward)
    if optimizer is None:
        optimizer = default_optimizer(num_iters)
    params = P.to_unconstrained(model, spec)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, f"MLE ({estimator})", show):
        return _fit(key, model, batch, params, fixed=fixed, optimizer=optimizer, num_iters=num_iters,
                    estimator=estimator, num_particles=num_particles, num_backward=num_backward,
                    backward=backward, show=show)


# ----------------------------------------------------------------------------------------------
# Markov score climbing (Naesseth, Lindsten & Blei, 2020)
# ----------------------------------------------------------------------------------------------
def _markov_log_prob(family, params, path, ys, inputs, length: Optional[jax.Array] = None):
    """log q_params(z_{0:n-1}) = log q_0(z_0 | y_0) + sum_{t<n} log q_t(z_t | z_{t-1}, y_t), n = length or T."""
    prop = family(params)
    num_timesteps = ys.shape[0]
    lp0 = prop(None, 0, ys[0], C.row(inputs, 0)).log_prob(path[0])
    if num_timesteps == 1:
        return lp0
    ts = jnp.arange(1, num_timesteps)
    y_rest = ys[1:]
    if length is not None:  # padded steps: a finite stand-in for y (their terms are dropped below)
        y_rest = jnp.where((ts < length)[:, None], y_rest, 0.0)
    rest = jax.vmap(lambda t, zp, z, y, u: prop(zp, t, y, u).log_prob(z))(ts, path[:-1], path[1:], y_rest,
                                                                            C.rest(inputs))
    if length is not None:
        rest = jnp.where(ts < length, rest, 0.0)
    return lp0 + jnp.sum(rest)


@eqx.filter_jit
def _msc_fit(key, model, batch, params, *, family, optimizer, num_iters, num_particles, ancestor_sampling,
             show):
    every = prog.report_every(num_iters)
    k_init, k_iters = jax.random.split(key)
    ref = _initial_refs(k_init, model, batch, num_particles, proposal=family(params))
    lengths = batch.lengths
    num_steps = (jnp.sum(lengths) if lengths is not None else
                 batch.num_timesteps * (batch.batch_size or 1))
    num_steps = jnp.asarray(num_steps, batch.emissions.dtype)

    def one_sweep(params, k, ref):
        def one(y, u, n, kk, r):
            out = conditional_smc_sequence(kk, model, y, u, reference=r, num_particles=num_particles,
                                           proposal=family(params), ancestor_sampling=ancestor_sampling, length=n)
            new_ref = lax.stop_gradient(out.reference)
            ys, uu = C.prepare_sequence(model, y, u, n)
            score = jax.grad(_markov_log_prob, argnums=1)(family, params, new_ref, ys, uu, n)
            return new_ref, score, out.filter.log_likelihood

        new_ref, score, ll = batch.map(one, C.sequence_keys(k, batch), ref, extra_axes=(0, 0))
        return new_ref, _sum_batch(score, batch.batched), _sum_batch(ll, batch.batched)

    def step(carry, xs):
        params, state, ref = carry
        i, k = xs
        ref, score, ll = one_sweep(params, k, ref)
        grad = jax.tree_util.tree_map(lambda g: -g / num_steps, score)  # optax minimises
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, ll, every)
        return (params, state, ref), ll

    (params, _, _), history = lax.scan(step, (params, optimizer.init(params), ref),
                                       (jnp.arange(num_iters), jax.random.split(k_iters, num_iters)))
    return params, history


def markov_score_climbing(model, emissions, family, params, num_iters: int, *, key, num_particles: int = 100,
                          optimizer=None, ancestor_sampling: bool = True, inputs=None, lengths=None,
                          progress=None):
    """Markov score climbing: fit a Markov variational family q to p(z | y) by minimising KL(p || q).

    The family is q(z_{0:T-1}) = q_0(z_0 | y_0) prod_t q_t(z_t | z_{t-1}, y_t); ``family(params)``
    returns it as a proposal function with the signature `particle_filter` takes. Each iteration
    runs one conditional-SMC sweep that uses q as its proposal (a Markov kernel leaving p(z | y)
    invariant, whatever q is), and takes an optax step along grad log q_params(z^k) at the new
    reference path z^k, the stochastic-approximation gradient of -KL(p || q)::

        z^k ~ CSMC(z^{k-1}; q_params)        params += step * grad_params log q_params(z^k) / T

    Args:
        model: any `SSM` (the target p(z, y)).
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (a batch: one reference path
            per sequence, the scores summed).
        family: ``family(params) -> proposal`` with ``proposal(z_prev, t, y_t, inputs)`` returning a
            distribution over z_t (``z_prev`` is None at t = 0).
        params: initial variational parameters (a pytree of float arrays).
        num_iters: sweeps (one gradient step each).
        key: a `jax.random` key (required).
        num_particles: N >= 2 per conditional sweep.
        optimizer: an optax optimiser (it receives minus the score per time step); default Adam
            with a decaying step, see `default_optimizer`.
        ancestor_sampling: ancestor sampling in the conditional sweeps (better mixing).
        inputs, lengths: as for `ps.smc.particle_filter`; the padding beyond a length is missing
            data and carries no term of log q.
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_params, history)``; history: (num_iters,) log-likelihood estimates of the
        conditional sweeps (summed over a batch).
    """
    if key is None:
        raise ValueError("key: Markov score climbing needs a jax.random key, got None")
    C.check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_particles = C.check_num_particles(num_particles)
    if not callable(family):
        raise ValueError("family: expected a callable family(params) -> proposal(z_prev, t, y_t, inputs)")
    batch = C.prepare(model, emissions, inputs, lengths)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves):
        raise ValueError("params: expected a non-empty pytree of float arrays")
    check_proposal(key, model, batch, family(params))
    if optimizer is None:
        optimizer = default_optimizer(num_iters)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "Markov score climbing", show):
        return _msc_fit(key, model, batch, params, family=family, optimizer=optimizer, num_iters=num_iters,
                        num_particles=num_particles, ancestor_sampling=bool(ancestor_sampling), show=show)
