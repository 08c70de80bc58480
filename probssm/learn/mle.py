"""Maximum likelihood by gradient-based optimisation (optax) for any model with an
exact log-likelihood, or by particle estimates of the score (`estimator="paris"|"ppg"`).

Each learnable field of a model declares its support in its dataclass metadata
(``eqx.field(metadata={"constraint": numpyro constraint})``). The optimiser works
on unconstrained values mapped through ``numpyro``'s ``biject_to``, so
covariances stay positive definite and probabilities stay on the simplex.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax
from numpyro.distributions.transforms import biject_to

from probssm.core import checks, progress as prog
from probssm.core.protocol import AbstractDiscreteSSM, AbstractLinearGaussianSSM


def learnable_fields(model, fixed=()) -> dict:
    """Names and constraints of the array fields of ``model`` that a learner may change."""
    out = {}
    for f in dataclasses.fields(model):
        constraint = f.metadata.get("constraint")
        if constraint is None or f.name in fixed:
            continue
        value = getattr(model, f.name)
        if isinstance(value, jax.Array) or hasattr(value, "shape"):
            out[f.name] = constraint
    return out


def to_unconstrained(model, fields: dict) -> dict:
    return {k: biject_to(c).inv(getattr(model, k)) for k, c in fields.items()}


def from_unconstrained(model, fields: dict, params: dict):
    names = tuple(fields)
    values = tuple(biject_to(fields[k])(params[k]) for k in names)
    return eqx.tree_at(lambda m: tuple(getattr(m, k) for k in names), model, values)


def exact_log_likelihood(model, emissions, inputs=None):
    """log p(y) (summed over a batch) from the model's declared exact structure; traceable."""
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.inference import kalman

        return kalman.log_likelihood(model, emissions, inputs=inputs)
    if isinstance(model, AbstractDiscreteSSM):
        from probssm.inference import hmm

        return hmm.log_likelihood(model, emissions, inputs=inputs)
    raise ValueError(
        f"model: exact MLE needs a declared exact structure (linear-Gaussian or discrete), got "
        f"{type(model).__name__}; use estimator='paris' or 'ppg' for other models"
    )


def _constraints(model, names) -> dict:
    meta = {f.name: f.metadata.get("constraint") for f in dataclasses.fields(model)}
    return {n: meta[n] for n in names}


@partial(jax.jit, static_argnames=("names", "optimizer", "num_iters", "show"))
def _fit(model, ys, inputs, params, *, names, optimizer, num_iters, show):
    fields = _constraints(model, names)
    num_obs = jnp.maximum(jnp.sum(~jnp.isnan(ys)), 1)

    def loss(params):
        return -exact_log_likelihood(from_unconstrained(model, fields, params), ys, inputs) / num_obs

    value_and_grad = jax.value_and_grad(loss)
    every = prog.report_every(num_iters)

    def step(carry, i):
        params, state = carry
        value, grad = value_and_grad(params)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, -value * num_obs, every)
        return (params, state), -value * num_obs

    (params, _), history = lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_iters))
    return from_unconstrained(model, fields, params), history


_DEFAULT_OPTIMIZER = None


def mle(model, emissions, num_iters: int = 200, *, inputs=None, optimizer=None, fixed=(), estimator="exact",
        progress=None, key=None, **kwargs):
    """Maximise the log-likelihood over the model's learnable fields.

    Args:
        model: starting model (not modified).
        emissions: (T, D) or (B, T, D); NaN marks missing values.
        num_iters: optimiser steps.
        optimizer: an optax optimiser; default L-BFGS with a zoom line search for exact
            likelihoods. Any ``GradientTransformationExtraArgs`` receives ``value``, ``grad``
            and ``value_fn``.
        fixed: field names to hold fixed.
        estimator: "exact" (Kalman / forward-backward likelihood), or "paris" / "ppg"
            (particle estimates of the score; needs ``key``). PaRIS's self-normalisation bias
            grows like T / N and shifts the fitted parameters on long sequences; PPG removes it.
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, history)`` with the log-likelihood at each step.
    """
    if estimator in ("paris", "ppg"):
        from probssm.learn.score import score_mle

        return score_mle(model, emissions, num_iters, key=key, estimator=estimator, optimizer=optimizer,
                         fixed=fixed, progress=progress, inputs=inputs, **kwargs)
    if estimator != "exact":
        raise ValueError(f"estimator: expected 'exact', 'paris' or 'ppg', got {estimator!r}")
    if kwargs:
        raise ValueError(f"unexpected arguments for estimator='exact': {sorted(kwargs)}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    fields = learnable_fields(model, fixed)
    unknown = set(fixed) - {f.name for f in dataclasses.fields(model)}
    if unknown:
        raise ValueError(f"fixed: unknown field names {sorted(unknown)} for {type(model).__name__}")
    if not fields:
        raise ValueError("fixed: every learnable field is fixed; nothing to fit")
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.inference import kalman

        ys, inputs, _ = kalman._prepare(model, emissions, inputs)
    else:
        ys = jnp.asarray(emissions)
    if not isinstance(model, (AbstractLinearGaussianSSM, AbstractDiscreteSSM)):
        exact_log_likelihood(model, ys, inputs)  # raises the ValueError that names the model
    global _DEFAULT_OPTIMIZER
    if optimizer is None:
        if _DEFAULT_OPTIMIZER is None:  # one instance, so repeated fits reuse the compiled loop
            _DEFAULT_OPTIMIZER = optax.lbfgs()
        optimizer = _DEFAULT_OPTIMIZER
    params = to_unconstrained(model, fields)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "MLE", show):
        return _fit(model, ys, inputs, params, names=tuple(fields), optimizer=optimizer,
                    num_iters=num_iters, show=show)
