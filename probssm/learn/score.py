"""Stochastic-gradient maximum likelihood with particle estimates of the score.

Fisher's identity writes the score as a smoothed additive functional::

    grad log p_theta(y_{0:T-1}) = E[ sum_t h_t(z_{t-1}, z_t) | y ],
    h_0 = grad [log p_theta(z_0) + log g_theta(y_0 | z_0)],
    h_t = grad [log f_theta(z_t | z_{t-1}) + log g_theta(y_t | z_t)],

so PaRIS (one pass, O(1/N) bias) or PPG (conditional sweeps that carry a
reference path from one iteration to the next, the Markov-score-climbing flavour
of stochastic approximation) estimate it, and optax climbs it. theta are the
model's learnable fields in unconstrained coordinates (numpyro ``biject_to`` of the
constraint each field declares in its metadata), so constraints always hold.

The whole fit is one `lax.scan` compiled once; ``history`` holds the particle
estimate of log p(y) at each iteration.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks, progress as prog
from probssm.inference.smc import _common as C
from probssm.inference.smc.filter import _filter_one
from probssm.inference.smc.csmc import trace_ancestry
from probssm.inference.smc.paris import AdditiveFunctional, _paris_one, resolve_backward
from probssm.inference.smc.ppg import ppg_sweep
from probssm.learn.mle import from_unconstrained, learnable_fields, to_unconstrained

__all__ = ["score_functional", "score_estimate", "score_mle", "markov_score_climbing"]


def _emission_term(model, z, t, y, u):
    y_safe, observed = C.observation(y)
    return jnp.where(observed, model.emission(z, t, u).log_prob(y_safe), 0.0)


def score_functional(model, fields: dict, params: dict) -> AdditiveFunctional:
    """Fisher's identity as an `AdditiveFunctional` whose value is a dict of gradients w.r.t. ``params``
    (unconstrained values of ``fields``)."""

    def log0(p, z, y, u):
        m = from_unconstrained(model, fields, p)
        return m.initial(u).log_prob(z) + _emission_term(m, z, 0, y, u)

    def logt(p, zp, z, t, y, u):
        m = from_unconstrained(model, fields, p)
        return m.transition(zp, t, u).log_prob(z) + _emission_term(m, z, t, y, u)

    return AdditiveFunctional(lambda z, y, u: jax.grad(log0)(params, z, y, u),
                              lambda zp, z, t, y, u: jax.grad(logt)(params, zp, z, t, y, u))


def _sum_batch(tree):
    return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree)


def _paris_score(key, model, fields, params, ys, inputs, batched, batched_u, *, num_particles, num_backward,
                 use_bound):
    m = from_unconstrained(model, fields, params)
    functional = score_functional(model, fields, params)
    thr = jnp.asarray(0.5, ys.dtype)
    fn = lambda k, y, u: _paris_one(k, m, y, u, thr, functional, num_particles=num_particles,
                                    num_backward=num_backward, resampling="systematic", proposal=None,
                                    auxiliary=None, use_bound=use_bound)
    if not batched:
        r = fn(key, ys, inputs)
        return r.estimate, r.log_likelihood
    r = jax.vmap(fn, in_axes=(0, 0, 0 if batched_u else None))(jax.random.split(key, ys.shape[0]), ys, inputs)
    return _sum_batch(r.estimate), jnp.sum(r.log_likelihood)


def _ppg_score(key, model, fields, params, ys, inputs, refs, batched, batched_u, *, num_particles, num_backward,
               use_bound):
    m = from_unconstrained(model, fields, params)
    functional = score_functional(model, fields, params)
    fn = lambda k, y, u, ref: ppg_sweep(k, m, y, u, functional, ref, num_particles=num_particles,
                                        num_backward=num_backward, use_bound=use_bound)
    if not batched:
        est, ll, ref = fn(key, ys, inputs, refs)
        return est, ll, ref
    est, ll, ref = jax.vmap(fn, in_axes=(0, 0, 0 if batched_u else None, 0))(
        jax.random.split(key, ys.shape[0]), ys, inputs, refs)
    return _sum_batch(est), jnp.sum(ll), ref


def _initial_refs(key, model, ys, inputs, batched, batched_u, num_particles):
    def one(k, y, u):
        k1, k2 = jax.random.split(k)
        pf = _filter_one(k1, model, y, u, jnp.asarray(0.5, y.dtype), num_particles=num_particles,
                         resampling="systematic", proposal=None, auxiliary=None, history=True)
        return trace_ancestry(k2, pf.particles, pf.log_weights[-1], pf.ancestors)

    if not batched:
        return one(key, ys, inputs)
    return jax.vmap(one, in_axes=(0, 0, 0 if batched_u else None))(jax.random.split(key, ys.shape[0]), ys, inputs)


@eqx.filter_jit
def _fit(key, model, ys, inputs, params, *, names, optimizer, num_iters, estimator, num_particles, num_backward,
         use_bound, batched, batched_u, show):
    meta = {f.name: f.metadata.get("constraint") for f in dataclasses.fields(model)}
    fields = {n: meta[n] for n in names}
    num_obs = jnp.maximum(jnp.sum(~jnp.isnan(ys)), 1).astype(ys.dtype)
    every = prog.report_every(num_iters)
    k_init, k_iters = jax.random.split(key)
    refs = _initial_refs(k_init, model, ys, inputs, batched, batched_u, num_particles) if estimator == "ppg" else None

    def step(carry, xs):
        params, state, refs = carry
        i, k = xs
        if estimator == "paris":
            score, ll = _paris_score(k, model, fields, params, ys, inputs, batched, batched_u,
                                     num_particles=num_particles, num_backward=num_backward, use_bound=use_bound)
        else:
            score, ll, refs = _ppg_score(k, model, fields, params, ys, inputs, refs, batched, batched_u,
                                         num_particles=num_particles, num_backward=num_backward,
                                         use_bound=use_bound)
        grad = jax.tree_util.tree_map(lambda g: -g / num_obs, score)  # optax minimises
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, ll, every)
        return (params, state, refs), ll

    (params, _, _), history = lax.scan(step, (params, optimizer.init(params), refs),
                                       (jnp.arange(num_iters), jax.random.split(k_iters, num_iters)))
    return from_unconstrained(model, fields, params), history


_DEFAULT_OPTIMIZERS = {}


def default_optimizer(num_iters: int):
    """Adam with a Robbins-Monro decay 0.05 / (1 + i / 20)^0.6 (one cached instance per num_iters)."""
    if num_iters not in _DEFAULT_OPTIMIZERS:
        _DEFAULT_OPTIMIZERS[num_iters] = optax.adam(lambda i: 0.05 / (1.0 + i / 20.0) ** 0.6)
    return _DEFAULT_OPTIMIZERS[num_iters]


def _prepare(model, emissions, inputs, fixed, estimator, num_particles, num_backward, backward):
    C.check_model(model)
    if estimator not in ("paris", "ppg"):
        raise ValueError(f"estimator: expected 'paris' or 'ppg', got {estimator!r}")
    num_particles = C.check_num_particles(num_particles)
    num_backward = checks.positive_int(num_backward, "num_backward")
    unknown = set(fixed) - {f.name for f in dataclasses.fields(model)}
    if unknown:
        raise ValueError(f"fixed: unknown field names {sorted(unknown)} for {type(model).__name__}")
    fields = learnable_fields(model, fixed)
    if not fields:
        raise ValueError("fixed: every learnable field is fixed; nothing to fit")
    use_bound = resolve_backward(model, backward)
    ys, inputs, batched, batched_u = C.prepare_emissions(model, emissions, inputs)
    return fields, num_particles, num_backward, use_bound, ys, inputs, batched, batched_u


def score_estimate(key, model, emissions, num_particles: int = 500, *, fixed=(), num_backward: int = 2,
                   backward: str = "auto", inputs=None):
    """PaRIS estimate of the score (gradient of log p(y) w.r.t. the unconstrained learnable fields).

    Returns ``(score, log_likelihood)`` with ``score`` a dict keyed by field name.
    """
    fields, num_particles, num_backward, use_bound, ys, inputs, batched, batched_u = _prepare(
        model, emissions, inputs, fixed, "paris", num_particles, num_backward, backward)
    params = to_unconstrained(model, fields)
    return _score_jit(key, model, ys, inputs, params, names=tuple(fields), num_particles=num_particles,
                      num_backward=num_backward, use_bound=use_bound, batched=batched, batched_u=batched_u)


@eqx.filter_jit
def _score_jit(key, model, ys, inputs, params, *, names, num_particles, num_backward, use_bound, batched, batched_u):
    meta = {f.name: f.metadata.get("constraint") for f in dataclasses.fields(model)}
    fields = {n: meta[n] for n in names}
    return _paris_score(key, model, fields, params, ys, inputs, batched, batched_u, num_particles=num_particles,
                        num_backward=num_backward, use_bound=use_bound)


def score_mle(model, emissions, num_iters: int, *, key, estimator: str = "paris", num_particles: int = 500,
              optimizer=None, fixed=(), progress=None, inputs=None, num_backward: int = 2, backward: str = "auto"):
    """Stochastic-gradient MLE with the particle score (PaRIS or PPG).

    Args:
        model: starting model; its learnable fields (those with a ``constraint`` in their
            field metadata, minus ``fixed``) are fitted.
        emissions: (T, D) or (B, T, D); NaN marks missing steps.
        num_iters: gradient steps (one particle sweep each).
        key: a `jax.random` key (required).
        estimator: "paris" (fresh PaRIS run each step) or "ppg" (one conditional PaRIS sweep per
            step, the reference path carried across steps).
        num_particles: N per sweep.
        optimizer: an optax optimiser (it receives minus the score per observation); default Adam
            with a decaying step, see `default_optimizer`.
        fixed: field names to hold fixed.
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, history)``; history: (num_iters,) particle log-likelihood estimates.

    Example:
        >>> fitted, hist = ps.learn.mle(model, y, 300, estimator="paris", key=jax.random.key(0))
    """
    if key is None:
        raise ValueError("key: the particle score needs a jax.random key, got None")
    num_iters = checks.positive_int(num_iters, "num_iters")
    fields, num_particles, num_backward, use_bound, ys, inputs, batched, batched_u = _prepare(
        model, emissions, inputs, fixed, estimator, num_particles, num_backward, backward)
    if optimizer is None:
        optimizer = default_optimizer(num_iters)
    params = to_unconstrained(model, fields)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, f"MLE ({estimator})", show):
        return _fit(key, model, ys, inputs, params, names=tuple(fields), optimizer=optimizer, num_iters=num_iters,
                    estimator=estimator, num_particles=num_particles, num_backward=num_backward,
                    use_bound=use_bound, batched=batched, batched_u=batched_u, show=show)


# ----------------------------------------------------------------------------------------------
# Markov score climbing (Naesseth, Lindsten & Blei, 2020)
# ----------------------------------------------------------------------------------------------
def _markov_log_prob(family, params, path, ys, inputs):
    """log q_params(z_{0:T-1}) = log q_0(z_0 | y_0) + sum_t log q_t(z_t | z_{t-1}, y_t)."""
    prop = family(params)
    num_timesteps = ys.shape[0]
    lp0 = prop(None, 0, ys[0], C.row(inputs, 0)).log_prob(path[0])
    if num_timesteps == 1:
        return lp0
    u_rest = None if inputs is None else jax.tree_util.tree_map(lambda a: a[1:], inputs)
    rest = jax.vmap(lambda t, zp, z, y, u: prop(zp, t, y, u).log_prob(z))(
        jnp.arange(1, num_timesteps), path[:-1], path[1:], ys[1:], u_rest)
    return lp0 + jnp.sum(rest)


@eqx.filter_jit
def _msc_fit(key, model, ys, inputs, params, *, family, optimizer, num_iters, num_particles, ancestor_sampling,
             show):
    from probssm.inference.smc.csmc import _csmc_one

    every = prog.report_every(num_iters)
    k_init, k_ref, k_iters = jax.random.split(key, 3)
    pf = _filter_one(k_init, model, ys, inputs, jnp.asarray(0.5, ys.dtype), num_particles=num_particles,
                     resampling="systematic", proposal=family(params), auxiliary=None, history=True)
    ref = trace_ancestry(k_ref, pf.particles, pf.log_weights[-1], pf.ancestors)
    num_timesteps = jnp.asarray(ys.shape[0], ys.dtype)

    def step(carry, xs):
        params, state, ref = carry
        i, k = xs
        out = _csmc_one(k, model, ys, inputs, ref, num_particles=num_particles, proposal=family(params),
                        ancestor_sampling=ancestor_sampling)
        ref = lax.stop_gradient(out.reference)
        score = jax.grad(_markov_log_prob, argnums=1)(family, params, ref, ys, inputs)
        grad = jax.tree_util.tree_map(lambda g: -g / num_timesteps, score)  # optax minimises
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        ll = out.filter.log_likelihood
        if show:
            prog.report(i, ll, every)
        return (params, state, ref), ll

    (params, _, _), history = lax.scan(step, (params, optimizer.init(params), ref),
                                       (jnp.arange(num_iters), jax.random.split(k_iters, num_iters)))
    return params, history


def markov_score_climbing(model, emissions, family, params, num_iters: int, *, key, num_particles: int = 100,
                          optimizer=None, ancestor_sampling: bool = True, inputs=None, progress=None):
    """Markov score climbing: fit a Markov variational family q to p(z | y) by minimising KL(p || q).

    The family is q(z_{0:T-1}) = q_0(z_0 | y_0) prod_t q_t(z_t | z_{t-1}, y_t); ``family(params)``
    returns it as a proposal function with the signature `particle_filter` takes. Each iteration
    runs one conditional-SMC sweep that uses q as its proposal (a Markov kernel leaving p(z | y)
    invariant, whatever q is), and takes an optax step along grad log q_params(z^k) at the new
    reference path z^k, the stochastic-approximation gradient of -KL(p || q)::

        z^k ~ CSMC(z^{k-1}; q_params)        params += step * grad_params log q_params(z^k) / T

    Args:
        model: any `SSM` (the target p(z, y)).
        emissions: (T, D), one sequence.
        family: ``family(params) -> proposal`` with ``proposal(z_prev, t, y_t, inputs)`` returning a
            distribution over z_t (``z_prev`` is None at t = 0).
        params: initial variational parameters (a pytree of float arrays).
        num_iters: sweeps (one gradient step each).
        key: a `jax.random` key (required).
        num_particles: N >= 2 per conditional sweep.
        optimizer: an optax optimiser (it receives minus the score per time step); default Adam
            with a decaying step, see `default_optimizer`.
        ancestor_sampling: ancestor sampling in the conditional sweeps (better mixing).
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_params, history)``; history: (num_iters,) log-likelihood estimates of the
        conditional sweeps.
    """
    if key is None:
        raise ValueError("key: Markov score climbing needs a jax.random key, got None")
    C.check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_particles = C.check_num_particles(num_particles)
    if not callable(family):
        raise ValueError("family: expected a callable family(params) -> proposal(z_prev, t, y_t, inputs)")
    ys, inputs, batched, batched_u = C.prepare_emissions(model, emissions, inputs)
    if batched:
        raise ValueError(f"emissions: markov_score_climbing takes one sequence (T, D), got shape {tuple(ys.shape)}")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves):
        raise ValueError("params: expected a non-empty pytree of float arrays")
    from probssm.inference.smc.filter import check_proposal

    check_proposal(key, model, ys, inputs, family(params), False, False)
    if optimizer is None:
        optimizer = default_optimizer(num_iters)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "Markov score climbing", show):
        return _msc_fit(key, model, ys, inputs, params, family=family, optimizer=optimizer, num_iters=num_iters,
                        num_particles=num_particles, ancestor_sampling=bool(ancestor_sampling), show=show)
