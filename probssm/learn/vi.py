"""Hyperparameter learning by the ELBO of `ps.vi`: variational EM with CVI sites.

Each iteration of the one compiled loop takes ``cvi_steps_per_iter`` CVI site updates under
the current parameters (the E-step: q moves towards p(z | y)), then one optimiser step on
the ELBO with the sites held fixed (the M-step: the prior's and the likelihood's learnable
arrays move). The ELBO is a lower bound on log p(y) for every (parameters, sites) pair, so
both moves climb the same objective::

    sites = none;  sites = cvi_update x warmup
    for i in range(num_iters):
        for _ in range(cvi_steps_per_iter):
            sites = cvi_update(prior, likelihood, y, sites)
        value, grad = value_and_grad(ELBO)(params; sites)       # sites fixed
        params = optimizer step on -ELBO / (number of observed entries)
        history[i] = value

The learnable arrays are those of `probssm.core.params` for the pair, named
``"prior.<path>"`` and ``"likelihood.<path>"`` (e.g. ``fixed=("prior.initial_cov",)``),
optimised on their unconstrained scale. The prior's emission covariance takes no part in
the ELBO: its gradient is zero and it stays where it starts.
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks, params as P, progress as prog
from probssm.inference import vi as engine

__all__ = ["vi", "VIFit"]


class VIFit(NamedTuple):
    """What `vi` returns (unpacks as ``prior, likelihood, history``)."""

    prior: object
    likelihood: object
    history: jax.Array  # (num_iters,) ELBO (summed over a batch) before each optimiser step


class _Pair(eqx.Module):
    """The prior and the likelihood as one pytree, so one parameter spec names both."""

    prior: object
    likelihood: object


def _sequences(a: engine.CheckedArguments):
    """(ys (B, T, D), inputs, inputs axis) with a batch axis always present."""
    ys = a.y if a.batched else a.y[None]
    inputs_axis = 0 if a.inputs_batched else None
    return ys, a.inputs, inputs_axis


@eqx.filter_jit
def _learn(pair, ys, inputs, *, inputs_axis, fixed, optimizer, num_iters, steps, warmup, order, diffuse, show):
    spec = P.spec(pair, fixed)
    params = P.to_unconstrained(pair, spec)
    num_obs = jnp.maximum(jnp.sum(~jnp.isnan(ys)), 1).astype(ys.dtype)
    p = pair.likelihood.latent_dim(ys.shape[-1])
    sites = jax.vmap(lambda y: engine.initial_sites(y.shape[0], p, y.dtype))(ys)
    every = prog.report_every(num_iters)

    def per_sequence(fn, model, *args):
        return jax.vmap(lambda y, u, *rest: fn(model, y, u, *rest), in_axes=(0, inputs_axis) + (0,) * len(args))(
            ys, inputs, *args)

    def total_elbo(params, sites):
        model = P.from_unconstrained(pair, spec, params)
        values = per_sequence(lambda m, y, u, s: engine.elbo(m.prior, m.likelihood, y, s, inputs=u, order=order,
                                                             diffuse=diffuse), model, sites)
        return jnp.sum(values)

    def loss(params, sites):
        return -total_elbo(params, sites) / num_obs

    def cvi(model, sites, steps=steps):
        def one(s, _):
            s = per_sequence(lambda m, y, u, si: engine.update_sites(m.prior, m.likelihood, y, si, method="cvi",
                                                                     inputs=u, order=order, diffuse=diffuse),
                             model, s)
            return s, None

        return lax.scan(one, sites, None, length=steps)[0]

    def step(carry, i):
        params, state, sites = carry
        sites = cvi(P.from_unconstrained(pair, spec, params), sites)
        value, grad = jax.value_and_grad(loss)(params, sites)
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, -value * num_obs, every)
        return (params, state, sites), -value * num_obs

    if warmup:
        sites = cvi(pair, sites, warmup)
    (params, _, _), history = lax.scan(step, (params, optimizer.init(params), sites), jnp.arange(num_iters))
    fitted = P.from_unconstrained(pair, spec, params)
    return fitted.prior, fitted.likelihood, history


_DEFAULT_OPTIMIZER = None


def vi(prior, likelihood, y, num_iters: int, *, inputs=None, optimizer=None, fixed=(), cvi_steps_per_iter: int = 1,
       warmup: int = 20, order: int = 20, progress=None) -> VIFit:
    """Maximise the ELBO of `ps.vi.fit` over the learnable arrays of the prior and the likelihood.

    Args:
        prior: an `AbstractLinearGaussianSSM` (not modified).
        likelihood: a `ps.vi` likelihood (not modified).
        y: (T, D) or (B, T, D); NaN = missing.
        num_iters: optimiser steps (one compiled `lax.scan`).
        inputs: the prior's inputs (T, U) or (B, T, U).
        optimizer: an optax optimiser on the unconstrained parameters; default ``optax.adam(1e-2)``.
            It minimises -ELBO divided by the number of observed entries.
        fixed: dotted paths to hold, prefixed by ``"prior."`` or ``"likelihood."``
            (e.g. ``("prior.initial_cov", "likelihood")``).
        cvi_steps_per_iter: CVI site updates (step size 1) before each optimiser step.
        warmup: CVI site updates under the starting parameters before the first optimiser step
            (from no sites, CVI on counts can take ~10 updates to settle; gradients taken before
            that point the parameters the wrong way).
        order: Gauss-Hermite nodes per dimension where no closed form exists.
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        `VIFit` ``(prior, likelihood, history)``: the fitted prior and likelihood and the ELBO
        (summed over a batch) at each step, computed before that step's parameter update.

    Example:
        >>> prior_fit, lik_fit, history = ps.learn.vi(prior, ps.vi.Poisson(), counts, 200,
        ...                                           fixed=("prior.initial_cov",))
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    steps = checks.positive_int(cvi_steps_per_iter, "cvi_steps_per_iter")
    warmup = checks.positive_int(warmup, "warmup", minimum=0)
    order = checks.positive_int(order, "order")
    a = engine.check_arguments(prior, likelihood, y, inputs)
    pair = _Pair(a.prior, a.likelihood)
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    if not P.spec(pair, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    if a.diffuse and "prior.initial_cov" in P.spec(pair, fixed).paths:
        raise ValueError("fixed: initial_cov holds inf (a diffuse, flat prior) and cannot be learned; "
                         "expected 'prior.initial_cov' in fixed")
    global _DEFAULT_OPTIMIZER
    if optimizer is None:
        if _DEFAULT_OPTIMIZER is None:  # one instance, so repeated fits reuse the compiled loop
            _DEFAULT_OPTIMIZER = optax.adam(1e-2)
        optimizer = _DEFAULT_OPTIMIZER
    ys, u, inputs_axis = _sequences(a)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "VI", show):
        out = _learn(pair, ys, u, inputs_axis=inputs_axis, fixed=fixed, optimizer=optimizer, num_iters=num_iters,
                     steps=steps, warmup=warmup, order=order, diffuse=a.diffuse, show=show)
    return VIFit(*out)
