"""Implicit MAP filter (Bencomo, Snell & Griffiths, ICLR 2024).

Each step starts from the predicted mean f(x_{t-1}) and takes K steps of an optax optimiser
on the negative log-likelihood -log p(y_t | x); the optimiser, its learning rate and K define
the prior implicitly. No covariance is ever formed, so the state may be any pytree (e.g. the
weights of a neural network) and the cost per step is K gradient evaluations.

For a linear-Gaussian scalar step (y = h x + N(0, r), predicted variance P), K steps of
gradient descent with step size eta give x_K = x + [1 - (1 - eta h^2 / r)^K] (y / h - x), which
is the Kalman update when (1 - eta h^2 / r)^K = r / (h^2 P + r), i.e.

    eta = (r / h^2) * (1 - (r / (h^2 P + r))^(1 / K))            (`matched_step_size`)

and coordinate-wise for diagonal models (use ``optax.scale(-eta)`` with a per-coordinate
array). So on a diagonal linear-Gaussian model started at the steady-state covariance, the
filter with that step size reproduces the Kalman filter's means. A step whose observation
holds a NaN is a pure prediction.

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

`filter_ssm` runs the same loop on any `ps.core.AbstractAdditiveGaussianSSM` (e.g.
`ps.models.NonlinearGaussianSSM`, `ps.models.LinearGaussianSSM`, or your own subclass),
reading only ``initial_moments`` (the mean), ``transition_mean``, ``emission_mean``,
``emission_noise_cov``, ``state_dim``, ``emission_dim`` and the protocol's ``input_dim`` /
``default_inputs``. Deprecated keyword names still accepted: ``observations=`` (now
``emissions=``) and ``num_steps=`` (now ``num_iters=``).
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

from probssm.core.deprecation import renamed
from probssm.core import checks
from probssm.core.batching import as_batch, check_input_dim
from probssm.core.linalg import cholesky, solve_lower
from probssm.core.optim import descend
from probssm.core.protocol import AbstractAdditiveGaussianSSM

__all__ = ["IMAPResult", "NAMED", "filter", "filter_ssm", "filter_ssm_sequence", "matched_step_size"]


class IMAPResult(NamedTuple):
    """filtered_means: the MAP estimate after each step (a pytree with leading T axis, or
    (T, d) for an SSM); final_losses: (T,) negative log-likelihood at the returned state."""

    filtered_means: object
    final_losses: jax.Array

    @property
    def filtered_states(self):
        """Old name of ``filtered_means``."""
        return self.filtered_means


def matched_step_size(emission_scale, emission_var, predicted_var, num_steps):
    """Gradient-descent step size for which `num_steps` steps equal the Kalman update (per coordinate)."""
    h2 = jnp.asarray(emission_scale) ** 2
    r = jnp.asarray(emission_var)
    return (r / h2) * (1 - (r / (h2 * jnp.asarray(predicted_var) + r)) ** (1.0 / num_steps))


_OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "rmsprop": optax.rmsprop,
               "adagrad": optax.adagrad, "adabelief": optax.adabelief, "lion": optax.lion, "nadam": optax.nadam}
NAMED = tuple(_OPTIMIZERS)


@functools.lru_cache(maxsize=64)
def _named(name, learning_rate):
    # cached so that the same (name, learning rate) gives the same object, whose identity is
    # what the compiled filter is keyed on
    return _OPTIMIZERS[name](learning_rate)


def _optimizer(optimizer, learning_rate, num_iters):
    """Validate (optimizer, learning_rate, num_iters) and return the optax transformation."""
    if not isinstance(num_iters, (int, np.integer)) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError("num_iters: expected an integer K >= 1 (optimiser steps per observation; formerly "
                         f"num_steps), got {num_iters!r}")
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


def _scan(transition_fn, loss_fn, optimizer, num_iters, initial_state, observations, aux=None, prepare=None,
          length=None):
    """The filter loop. Without ``prepare``: transition_fn(x, t), loss_fn(x, y, t). With it,
    ``aux`` (None or a pytree with leading axis T) is read per step but never makes one
    missing: transition_fn(x, t, a_t), loss_fn(x, y, t, c_t) with c_t = prepare(t, a_t),
    formed once per step outside the K iterations. Steps t >= length are skipped (padding)."""
    T = jax.tree_util.tree_leaves(observations)[0].shape[0]

    def update(x, y, t, ctx):
        observed = jnp.all(jnp.asarray([jnp.all(~jnp.isnan(l)) for l in jax.tree_util.tree_leaves(y)]))
        if length is not None:
            observed = observed & (t < length)
        y0 = jax.tree_util.tree_map(lambda l: jnp.where(jnp.isnan(l), 0.0, l), y)
        obj = (lambda s: loss_fn(s, y0, t)) if prepare is None else (lambda s: loss_fn(s, y0, t, ctx))

        xk = descend(obj, x, optimizer, num_iters)
        xk = jax.tree_util.tree_map(lambda a, b: jnp.where(observed, a, b), xk, x)
        return xk, obj(xk)

    def step(x, inp):
        y, t, a = inp
        if prepare is None:
            x = lax.cond(t > 0, lambda s: transition_fn(s, t), lambda s: s, x)
            ctx = None
        else:
            x = lax.cond(t > 0, lambda s: transition_fn(s, t, a), lambda s: s, x)
            ctx = prepare(t, a)
        x, loss = update(x, y, t, ctx)
        return x, (x, loss)

    _, (xs, losses) = lax.scan(step, initial_state, (observations, jnp.arange(T), aux))
    return IMAPResult(xs, losses)


# functions, the optimiser and K are static (hashed by identity): reuse them to reuse the compilation
_run = eqx.filter_jit(_scan)


@renamed(observations="emissions", num_steps="num_iters")
def filter(transition_fn: Callable, loss_fn: Callable, initial_state, emissions, *,
           optimizer: Union[str, optax.GradientTransformation], num_iters: int, learning_rate=None) -> IMAPResult:
    """Implicit MAP filter on a general (pytree) state.

    Args:
        transition_fn: ``(state, t) -> state``, the mean of the dynamics (applied for t >= 1).
        loss_fn: ``(state, y_t, t) -> scalar``, the negative log-likelihood -log p(y_t | state).
        initial_state: pytree, the predicted mean of the state at t = 0.
        emissions: the observations, a pytree with leaves of leading axis T; a step with a NaN
            in any leaf is skipped. (``observations=``: deprecated name.)
        optimizer: any ``optax.GradientTransformation`` (e.g. ``optax.sgd(0.1)``, ``optax.adam(0.1)``),
            or a name from `NAMED` ("sgd", "adam", "rmsprop", ...) built with ``learning_rate``.
        num_iters: K >= 1 optimiser steps per observation, starting from the predicted mean
            (``num_steps=``: deprecated name).
        learning_rate: required with a named optimiser; with a transformation it is only
            checked (> 0), so pass the value you built it with to have a bad value reported.

    Returns:
        `IMAPResult`; ``filtered_means`` has the structure of the state with a leading T axis
        (also readable as ``filtered_states``).

    Example:
        >>> out = ps.imap.filter(lambda x, t: 0.9 * x, lambda x, y, t: 0.5 * jnp.sum((y - x) ** 2),
        ...                      jnp.zeros(2), ys, optimizer=optax.adam(0.1), num_iters=10)
    """
    optimizer = _optimizer(optimizer, learning_rate, num_iters)
    leaves = jax.tree_util.tree_leaves(emissions)
    if not leaves or any(jnp.ndim(l) < 1 for l in leaves) or len({jnp.shape(l)[0] for l in leaves}) != 1:
        raise ValueError("emissions: expected a pytree of arrays of observations with a common leading axis T")
    return _run(transition_fn, loss_fn, optimizer, int(num_iters), initial_state, emissions)


def _row(inputs, t):
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[t], inputs)


def filter_ssm_sequence(model: AbstractAdditiveGaussianSSM, emissions: jax.Array, inputs=None, length=None, *,
                        optimizer: optax.GradientTransformation, num_iters: int) -> IMAPResult:
    """`filter_ssm` on one sequence without input checks: the public traceable core.

    Args:
        model: an `AbstractAdditiveGaussianSSM`.
        emissions: (T, p), NaN = missing (a row with any NaN is a pure prediction).
        inputs: None (the model's ``default_inputs``) or rows with leading axis T.
        length: optional int (traced is fine); steps t >= length are skipped.
        optimizer: an ``optax.GradientTransformation``; num_iters: K (static).

    Returns:
        `IMAPResult` with filtered_means (T, d) and final_losses (T,).
    """
    if inputs is None:
        inputs = model.default_inputs(emissions)
    m0, _ = model.initial_moments(_row(inputs, 0))

    def prepare(t, u):
        # r^T R^-1 r = |L^-1 r|^2: the factor of R_t, once per step
        return cholesky(model.emission_noise_cov(t, u)), u

    def loss(x, yt, t, ctx):
        L, u = ctx
        return 0.5 * jnp.sum(solve_lower(L, yt - model.emission_mean(x, t, u)) ** 2)

    return _scan(model.transition_mean, loss, optimizer, num_iters, m0, emissions, aux=inputs, prepare=prepare,
                 length=length)


_run_ssm = eqx.filter_jit(filter_ssm_sequence)


def _check_ssm(model, batch):
    if not isinstance(model, AbstractAdditiveGaussianSSM):
        raise ValueError("model: expected a ps.core.AbstractAdditiveGaussianSSM (e.g. ps.models.NonlinearGaussianSSM "
                         f"or ps.models.LinearGaussianSSM), got {type(model).__name__}")
    y = batch.emissions
    p, d = model.emission_dim, model.state_dim
    if y.shape[-1] != p:
        shape = f"(T, {p})" + (f" or (B, T, {p})" if batch.batched else "")
        raise ValueError(f"emissions: expected shape {shape}, got shape {tuple(y.shape)}")
    check_input_dim(batch, model.input_dim)
    u0 = _row(batch.inputs, (0, 0) if batch.inputs_batched else 0)
    m0, _ = model.initial_moments(u0)
    checks.shape(jnp.asarray(m0), "initial_mean", (d,), f"({d},)")
    checks.finite(m0, "initial_mean")
    R0 = jnp.asarray(model.emission_noise_cov(0, u0))
    checks.shape(R0, "emission_cov", (p, p), f"({p}, {p}) (model.emission_noise_cov)")
    # strictly positive definite: the loss whitens by its Cholesky factor
    checks.psd(R0, "emission_cov (model.emission_noise_cov at t = 0)")


@renamed(num_steps="num_iters")
def filter_ssm(model: AbstractAdditiveGaussianSSM, emissions, inputs=None, *,
               optimizer: Union[str, optax.GradientTransformation], num_iters: int, learning_rate=None,
               lengths=None) -> IMAPResult:
    """Implicit MAP filter for any `ps.core.AbstractAdditiveGaussianSSM` (state (d,)).

    Starts from the mean of ``model.initial_moments``, predicts with ``transition_mean`` and
    minimises 0.5 (y_t - h(x, t, u_t))^T R_t^{-1} (y_t - h(x, t, u_t)) with R_t =
    ``emission_noise_cov(t, u_t)`` (checked positive definite at t = 0).

    Args:
        model: e.g. `ps.models.NonlinearGaussianSSM`, `ps.models.LinearGaussianSSM`, or a subclass
            of your own.
        emissions: (T, p), a batch (B, T, p) or a list of (T_b, p) arrays; a row with any NaN is
            a pure prediction.
        inputs: None (the model's ``default_inputs``), (T, U) shared or (B, T, U) per sequence.
        optimizer, num_iters, learning_rate: as in `filter` (``num_steps=``: deprecated name).
        lengths: () or (B,) ints; steps t >= length are skipped.

    Returns:
        `IMAPResult` with filtered_means (T, d) (leading B for a batch) and final_losses (T,).
    """
    optimizer = _optimizer(optimizer, learning_rate, num_iters)
    if not isinstance(emissions, (list, tuple)) and jnp.ndim(emissions) not in (2, 3):
        raise ValueError("emissions: expected shape (T, p), (B, T, p) or a list of (T_b, p) arrays, "
                         f"got shape {tuple(jnp.shape(emissions))}")
    batch = as_batch(emissions, inputs, lengths)
    _check_ssm(model, batch)
    K = int(num_iters)
    return batch.map(lambda y, u, n: _run_ssm(model, y, u, n, optimizer=optimizer, num_iters=K))
