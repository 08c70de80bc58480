"""Fit a Markovian GP-VAE by stochastic ELBO ascent: `ps.learn.gpvae.fit`.

The objective is the mean ELBO per sequence (`probssm.inference.gpvae.elbo`), maximised jointly
over the encoder, the decoder, the kernel hyperparameters and the observation variance. The
learnable arrays are those of `probssm.core.params` (constrained fields on the log scale through
numpyro's ``biject_to``; every floating array of the networks as real), and ``fixed`` holds any of
them by dotted path (``fixed=("kernels",)`` keeps the GP prior as given).

The whole loop is one compiled `lax.scan`: each step draws a minibatch of sequences (random
indices, without replacement within the step), fresh reparameterisation noise, and takes one
optimiser step, so a fit compiles once whatever ``num_iters``.
"""
from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks, params as P, progress as prog
from probssm.inference import gpvae as engine
from probssm.models.gpvae import MarkovianGPVAE

__all__ = ["fit"]

_DEFAULT_OPTIMIZER = None


def _default_optimizer():
    global _DEFAULT_OPTIMIZER
    if _DEFAULT_OPTIMIZER is None:  # one instance, so repeated fits reuse the compiled loop
        _DEFAULT_OPTIMIZER = optax.adam(1e-3)
    return _DEFAULT_OPTIMIZER


@eqx.filter_jit
def _fit(key, model, t, ys, t_batched, fixed, optimizer, num_iters, batch_size, num_samples, show):
    spec = P.spec(model, fixed)
    params = P.to_unconstrained(model, spec)
    B = ys.shape[0]

    def loss(params, k):
        m = P.from_unconstrained(model, spec, params)
        k_batch, k_draw = jax.random.split(k)
        if batch_size < B:
            idx = jax.random.choice(k_batch, B, (batch_size,), replace=False)
            y_b, t_b = ys[idx], (t[idx] if t_batched else t)
        else:
            y_b, t_b = ys, t
        keys = jax.random.split(k_draw, y_b.shape[0])
        values = jax.vmap(lambda kk, tt, yy: engine.elbo_terms_one(kk, m, tt, yy, num_samples).elbo,
                          in_axes=(0, 0 if t_batched else None, 0))(keys, t_b, y_b)
        return -jnp.mean(values)

    value_and_grad = jax.value_and_grad(loss)
    every = prog.report_every(num_iters)

    def step(carry, xs):
        params, state = carry
        i, k = xs
        value, grad = value_and_grad(params, k)
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, -value, every)
        return (params, state), -value

    keys = jax.random.split(key, num_iters)
    (params, _), history = lax.scan(step, (params, optimizer.init(params)), (jnp.arange(num_iters), keys))
    return P.from_unconstrained(model, spec, params), history


def fit(key, model: MarkovianGPVAE, t, ys, num_iters: int, *, batch_size: Optional[int] = None,
        optimizer=None, fixed=(), progress=None, num_samples: int = 1):
    """Maximise the mean ELBO per sequence over the model's learnable arrays.

    Args:
        key: a `jax.random` key (minibatches and reparameterisation draws).
        model: the starting `ps.models.gpvae.MarkovianGPVAE` (not modified).
        t: (T,) frame times shared by every sequence, or (B, T) per sequence; sorted, distinct.
        ys: (B, T, D) sequences of frames (or one (T, D) sequence); NaN rows are missing frames.
        num_iters: optimiser steps.
        batch_size: sequences per step (drawn at random each step); default all B.
        optimizer: an optax `GradientTransformation`; default ``optax.adam(1e-3)``.
        fixed: dotted paths (or prefixes) of arrays to hold, e.g. ``("kernels",)`` or
            ``("observation_variance",)``.
        progress: progress bar (default: when num_iters >= 100).
        num_samples: reparameterised draws per frame in each ELBO estimate.

    Returns:
        ``(fitted_model, history)``: history (num_iters,) holds the minibatch mean ELBO per
        sequence at each step (before that step's update; a noisy estimate).

    Raises:
        ValueError: naming the argument, for bad times or frames (as `ps.gpvae.elbo`), a
            non-positive ``num_iters`` / ``num_samples``, ``batch_size`` outside 1..B, or ``fixed``
            naming no learnable array / every learnable array.

    Example:
        >>> fitted, history = ps.learn.gpvae.fit(key, vae, t, ys, 2000, batch_size=32)
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_samples = checks.positive_int(num_samples, "num_samples")
    t, ys, batched, t_batched = engine.check_arguments(model, t, ys, "t", "ys")
    if not batched:
        ys = ys[None]
    B = ys.shape[0]
    batch_size = B if batch_size is None else checks.positive_int(batch_size, "batch_size")
    if batch_size > B:
        raise ValueError(f"batch_size: expected at most the number of sequences {B}, got {batch_size}")
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    if not P.spec(model, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    model = checks.unify_dtypes(model, ys)  # one dtype for the optimiser's state
    optimizer = _default_optimizer() if optimizer is None else optimizer
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "GP-VAE", show):
        return _fit(key, model, t, ys, t_batched, fixed, optimizer, num_iters, batch_size, num_samples, show)
