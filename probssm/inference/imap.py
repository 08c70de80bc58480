"""Implicit MAP filter (Bencomo, Snell & Griffiths, ICLR 2024).

Each step starts from the predicted mean f(x_{t-1}) and takes K steps of an optax optimiser
on the negative log-likelihood -log p(y_t | x); the optimiser, its learning rate and K define
the prior implicitly. No covariance is ever formed, so the state may be any pytree (e.g. the
weights of a neural network) and the cost per step is K gradient evaluations.

For a linear-Gaussian scalar step (y = h x + N(0, r), predicted variance P), K steps of
gradient descent with step size eta give x_K = x + [1 - (1 - eta h^2 / r)^K] (y / h - x), which
is the Kalman update when (1 - eta h^2 / r)^K = r / (h^2 P + r), i.e.

    eta = (r / h^2) * (1 - (r / (h^2 P + r))^(1 / K))            (`matched_step_size`)

and coordinate-wise for diagonal models (use ``optax.sgd`` with a per-coordinate array as the
learning rate via ``optax.scale(-eta)``). A step whose observation holds a NaN is a pure
prediction.

Loop run by `lax.scan` (the optimiser state is reset at every observation, as in the paper)::

    x = initial_state
    for t in 0..T-1:
        if t > 0: x = transition_fn(x, t)                # predicted mean
        if y_t has no NaN:
            s = optimizer.init(x)
            for k in 1..K:
                u, s = optimizer.update(grad(loss_fn)(x, y_t, t), s, x);  x = x + u
        out[t] = x, loss_fn(x, y_t, t)

Cost per observation: K gradient evaluations plus one loss; memory: the state and the
optimiser's state (Adam: two more copies), never a covariance.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from probssm.core import checks
from probssm.core.linalg import cholesky, mm, solve_lower
from probssm.core.optim import descend
from probssm.models.nonlinear import NonlinearGaussianSSM

__all__ = ["IMAPResult", "NAMED", "filter", "filter_ssm", "matched_step_size"]


class IMAPResult(NamedTuple):
    filtered_states: object  # pytree, leaves with a leading T axis: the MAP estimate after each step
    final_losses: jax.Array  # (T,) negative log-likelihood at the returned state


def matched_step_size(emission_scale, emission_var, predicted_var, num_steps):
    """Gradient-descent step size for which `num_steps` steps equal the Kalman update (per coordinate)."""
    h2 = jnp.asarray(emission_scale) ** 2
    r = jnp.asarray(emission_var)
    return (r / h2) * (1 - (r / (h2 * jnp.asarray(predicted_var) + r)) ** (1.0 / num_steps))


NAMED = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adabelief", "lion", "nadam")


@functools.lru_cache(maxsize=64)
def _named(name, learning_rate):
    # cached so that the same (name, learning rate) gives the same object, whose identity is
    # what the compiled filter is keyed on
    return getattr(optax, name)(learning_rate)


def _optimizer(optimizer, learning_rate, num_steps):
    """Validate (optimizer, learning_rate, num_steps) and return the optax transformation."""
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer K >= 1, got {num_steps!r}")
    if learning_rate is not None:
        lr = np.asarray(learning_rate, dtype=float)
        if lr.size == 0 or not bool(np.all(np.isfinite(lr) & (lr > 0))):
            raise ValueError(f"learning_rate: expected a positive finite number, got {learning_rate!r}")
    if isinstance(optimizer, str):
        if optimizer not in NAMED:
            raise ValueError(f"optimizer: expected one of {NAMED} or an optax.GradientTransformation, "
                             f"got {optimizer!r}")
        if learning_rate is None:
            raise ValueError(f"learning_rate: optimizer {optimizer!r} given by name needs a learning rate > 0")
        if np.ndim(learning_rate) != 0:
            raise ValueError(f"learning_rate: expected a scalar for a named optimizer, got shape "
                             f"{np.shape(learning_rate)}")
        return _named(optimizer, float(learning_rate))
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer: expected an optax.GradientTransformation or one of {NAMED}, "
                         f"got {type(optimizer).__name__}")
    return optimizer


def _scan(transition_fn, loss_fn, optimizer, num_steps, initial_state, observations):
    def update(x, y, t):
        observed = jnp.all(jnp.asarray([jnp.all(~jnp.isnan(l)) for l in jax.tree_util.tree_leaves(y)]))
        y0 = jax.tree_util.tree_map(lambda l: jnp.where(jnp.isnan(l), 0.0, l), y)
        obj = lambda s: loss_fn(s, y0, t)

        xk = descend(obj, x, optimizer, num_steps)
        xk = jax.tree_util.tree_map(lambda a, b: jnp.where(observed, a, b), xk, x)
        return xk, obj(xk)

    T = jax.tree_util.tree_leaves(observations)[0].shape[0]

    def step(x, inp):
        y, t = inp
        x = lax.cond(t > 0, lambda s: transition_fn(s, t), lambda s: s, x)
        x, loss = update(x, y, t)
        return x, (x, loss)

    _, (xs, losses) = lax.scan(step, initial_state, (observations, jnp.arange(T)))
    return IMAPResult(xs, losses)


# functions, the optimiser and K are static (hashed by identity): reuse them to reuse the compilation
_run = eqx.filter_jit(_scan)


@eqx.filter_jit
def _run_ssm(model, y, optimizer, num_steps):
    R = model.emission_cov
    W = solve_lower(cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype))  # L^-1, formed once: r^T R^-1 r = |W r|^2

    def loss(x, yt, t):
        return 0.5 * jnp.sum(mm(W, yt - model.emission_fn(x, t, None)) ** 2)

    return _scan(lambda x, t: model.transition_fn(x, t, None), loss, optimizer, num_steps, model.initial_mean, y)


def filter(transition_fn: Callable, loss_fn: Callable, initial_state, observations, *,
           optimizer: Union[str, optax.GradientTransformation], num_steps: int, learning_rate=None) -> IMAPResult:
    """Implicit MAP filter on a general (pytree) state.

    Args:
        transition_fn: ``(state, t) -> state``, the mean of the dynamics (applied for t >= 1).
        loss_fn: ``(state, y_t, t) -> scalar``, the negative log-likelihood -log p(y_t | state).
        initial_state: pytree, the predicted mean of the state at t = 0.
        observations: pytree with leaves of leading axis T; a step with any NaN is skipped.
        optimizer: any ``optax.GradientTransformation`` (e.g. ``optax.sgd(0.1)``, ``optax.adam(0.1)``),
            or a name from `NAMED` ("sgd", "adam", "rmsprop", ...) built with ``learning_rate``.
        num_steps: K >= 1 optimiser steps per observation, starting from the predicted mean.
        learning_rate: required with a named optimiser; with a transformation it is only
            checked (> 0), so pass the value you built it with to have a bad value reported.

    Returns:
        `IMAPResult`; ``filtered_states`` has the structure of the state with a leading T axis.

    Example:
        >>> out = ps.imap.filter(lambda x, t: 0.9 * x, lambda x, y, t: 0.5 * jnp.sum((y - x) ** 2),
        ...                      jnp.zeros(2), ys, optimizer=optax.adam(0.1), num_steps=10)
    """
    optimizer = _optimizer(optimizer, learning_rate, num_steps)
    leaves = jax.tree_util.tree_leaves(observations)
    if not leaves or any(jnp.ndim(l) < 1 for l in leaves) or len({jnp.shape(l)[0] for l in leaves}) != 1:
        raise ValueError("observations: expected a pytree of arrays with a common leading axis T")
    return _run(transition_fn, loss_fn, optimizer, int(num_steps), initial_state, observations)


def filter_ssm(model, emissions, *, optimizer: Union[str, optax.GradientTransformation], num_steps: int,
               learning_rate=None) -> IMAPResult:
    """Implicit MAP filter for a `ps.models.NonlinearGaussianSSM` (state (d,), emissions (T, p)).

    Starts from ``model.initial_mean``, predicts with ``transition_fn`` and minimises
    0.5 (y - h(x))^T R^{-1} (y - h(x)) with R = ``model.emission_cov``.
    """
    if not isinstance(model, NonlinearGaussianSSM):
        raise ValueError(f"model: expected a ps.models.NonlinearGaussianSSM, got {type(model).__name__}")
    checks.psd(model.emission_cov, "emission_cov")  # strictly: the loss whitens by its Cholesky factor
    y = jnp.asarray(emissions)
    y = jnp.asarray(y, jnp.result_type(y.dtype, float))
    R = jnp.asarray(model.emission_cov)
    p = R.shape[0]
    if y.ndim != 2 or y.shape[1] != p:
        raise ValueError(f"emissions: expected shape (T, {p}), got shape {tuple(y.shape)}")
    optimizer = _optimizer(optimizer, learning_rate, num_steps)
    return _run_ssm(model, y, optimizer, int(num_steps))
