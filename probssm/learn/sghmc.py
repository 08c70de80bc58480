"""Stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, ICML 2014) with friction.

With unit mass, friction alpha > 0, step size eps and a (possibly noisy) gradient estimate g~ of
log p at the current position, one step is::

    r <- (1 - eps alpha) r + eps g~(theta) + N(0, eps (2 alpha - eps beta) I)
    theta <- theta + eps r

the discretisation of dtheta = r dt, dr = grad log p dt - alpha r dt + sqrt(2 alpha) dW, whose
stationary law is p(theta) N(r; 0, I). ``beta`` (``gradient_noise``) is an estimate of the
per-coordinate variance of the gradient noise (g~ = grad log p + noise, Var(noise) = beta): the
injected noise is reduced by eps^2 beta so that the total momentum noise stays 2 alpha eps
(Chen et al.'s B^ = eps beta / 2). With beta = 0 and noisy gradients the chain runs at the
temperature 1 + eps Var(noise) / (2 alpha) to first order.

Why not `blackjax.sghmc`: blackjax 1.7 ships it, but its Euler solver
(`blackjax.sgmcmc.diffusions.sghmc`) moves the position with the momentum of the previous
step, which biases the stationary covariance by O(eps): on a 2-D Gaussian with correlation 0.8
it inflates the variances by 5.5% at eps = 0.05 and 15% at eps = 0.1 (400,000 steps, friction 1),
where this ordering (momentum first, then position, as in Chen et al.'s Algorithm 2) stays within
1.5% at both (the Monte Carlo error of those runs). blackjax's kernel also redraws the momentum at every call and holds one minibatch
for all its integration steps; here the momentum persists and each step reads its own minibatch.

    state = sghmc_init(key, position)
    state = sghmc_step(key, state, grad, step_size=eps, friction=alpha)
    samples = sghmc_samples(key, grad_log_density, position, num_samples, step_size=eps, friction=alpha)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks

__all__ = ["SGHMCState", "sghmc_init", "sghmc_step", "sghmc_samples"]


class SGHMCState(NamedTuple):
    """Position and momentum (pytrees of the same structure)."""

    position: object
    momentum: object


def _normal_like(key, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])


def sghmc_init(key, position) -> SGHMCState:
    """The state at ``position`` (a pytree of floating arrays) with momentum drawn from N(0, I)."""
    position = jax.tree_util.tree_map(jnp.asarray, position)
    return SGHMCState(position, _normal_like(key, position))


def sghmc_step(key, state: SGHMCState, grad, *, step_size, friction, gradient_noise=0.0) -> SGHMCState:
    """One SGHMC step given ``grad``, the (noisy) gradient of log p at ``state.position``.

    Traceable; step_size, friction and gradient_noise may be traced scalars (no checks here; see
    `sghmc_samples` for the checked entry point).
    """
    eps, alpha, beta = step_size, friction, gradient_noise
    noise = _normal_like(key, state.momentum)
    scale = jnp.sqrt(eps * (2.0 * alpha - eps * beta))
    momentum = jax.tree_util.tree_map(lambda r, g, n: (1.0 - eps * alpha) * r + eps * g + scale * n,
                                      state.momentum, grad, noise)
    position = jax.tree_util.tree_map(lambda x, r: x + eps * r, state.position, momentum)
    return SGHMCState(position, momentum)


def sghmc_samples(key, grad_log_density: Callable, init, num_samples: int, *, step_size, friction=1.0,
                  num_warmup: int = 0, thin: int = 1, minibatches=None, gradient_noise=0.0):
    """Run an SGHMC chain and return its positions.

    Args:
        key: a `jax.random` key.
        grad_log_density: ``grad_log_density(position)`` or, with ``minibatches``,
            ``grad_log_density(position, minibatch)``: a (stochastic) estimate of the gradient of
            the log density, a pytree like ``position``.
        init: the initial position (a pytree of floating arrays).
        num_samples: S, positions returned (after warm-up, every ``thin``-th step).
        step_size: eps > 0.
        friction: alpha > 0 with eps * alpha <= 1.
        num_warmup: steps run and discarded first.
        thin: keep every ``thin``-th position.
        minibatches: None, or a pytree whose leaves have a leading axis of length
            num_warmup + num_samples * thin: step i reads entry i.
        gradient_noise: beta >= 0, the estimated per-coordinate variance of the gradient noise
            (eps * beta <= 2 alpha); the injected noise is reduced by eps^2 beta.

    step_size, friction and gradient_noise may be traced (inside a caller's `jax.jit`); their values
    are then not checked. The chain compiles once per ``grad_log_density`` object, shapes and the
    integer arguments: a second call with the same function and new values reuses it.

    Returns:
        The positions, a pytree like ``init`` with a leading axis S.

    The loop this scan implements::

        r ~ N(0, I); theta = init
        for i in range(num_warmup + S * thin):
            g = grad_log_density(theta, minibatches[i])
            r = (1 - eps alpha) r + eps g + sqrt(eps (2 alpha - eps beta)) N(0, I)
            theta = theta + eps r
            keep theta after warm-up, every thin-th step

    Example:
        >>> prec = jnp.array([[2.0, -1.0], [-1.0, 2.0]])
        >>> xs = sghmc_samples(jax.random.key(0), lambda x: -prec @ x, jnp.zeros(2), 5000,
        ...                    step_size=0.05, friction=1.0, num_warmup=500)
    """
    num_samples = checks.positive_int(num_samples, "num_samples")
    num_warmup = checks.positive_int(num_warmup, "num_warmup", minimum=0)
    thin = checks.positive_int(thin, "thin")
    eps = checks.positive_float(step_size, "step_size")
    alpha = checks.positive_float(friction, "friction")
    concrete = all(checks.is_concrete(v) for v in (eps, alpha, gradient_noise))
    if concrete and eps * alpha > 1.0:
        raise ValueError(f"friction: expected step_size * friction <= 1, got {eps} * {alpha} = {eps * alpha:.3g}")
    beta = gradient_noise
    if concrete:
        try:
            beta = float(gradient_noise)
        except (TypeError, ValueError):
            raise ValueError(f"gradient_noise: expected a non-negative number, got {gradient_noise!r}") from None
        if not (np.isfinite(beta) and beta >= 0):
            raise ValueError(f"gradient_noise: expected a non-negative finite number, got {beta}")
    if concrete and eps * beta > 2.0 * alpha:
        raise ValueError(f"gradient_noise: expected step_size * gradient_noise <= 2 * friction, got "
                         f"{eps} * {beta} > 2 * {alpha}: the gradient noise alone exceeds the friction's")
    if not callable(grad_log_density):
        raise ValueError("grad_log_density: expected a callable")
    leaves = jax.tree_util.tree_leaves(init)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        raise ValueError("init: expected a pytree of floating-point arrays")
    total = num_warmup + num_samples * thin
    if minibatches is not None:
        for leaf in jax.tree_util.tree_leaves(minibatches):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != total:
                raise ValueError(f"minibatches: expected a leading axis of length num_warmup + num_samples * thin "
                                 f"= {total}, got shape {jnp.shape(leaf)}")
    return _run(key, grad_log_density, init, minibatches, eps, alpha, beta, num_samples, num_warmup, thin)


def _run(key, grad_log_density, init, minibatches, eps, alpha, beta, num_samples, num_warmup, thin):
    # The tuning scalars travel as arrays, so new values reuse the compiled chain.
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(init))
    scalars = tuple(jnp.asarray(v, dtype) for v in (eps, alpha, beta))
    return _chain(grad_log_density, key, init, minibatches, scalars, num_samples=num_samples,
                  num_warmup=num_warmup, thin=thin)


@eqx.filter_jit
def _chain(grad_log_density, key, init, minibatches, scalars, *, num_samples, num_warmup, thin):
    """The compiled chain. One module-level function, so a second call with the same
    ``grad_log_density`` object and the same shapes reuses the compiled loop (``grad_log_density``
    is hashed by identity: a fresh lambda per call compiles anew)."""
    eps, alpha, beta = scalars
    total = num_warmup + num_samples * thin
    key_init, key_run = jax.random.split(key)
    state = sghmc_init(key_init, init)
    if minibatches is None:
        grad_of = lambda x, batch: grad_log_density(x)
        batches = jnp.zeros((total, 0))
    else:
        grad_of = grad_log_density
        batches = minibatches

    def body(state, xs):
        k, batch = xs
        state = sghmc_step(k, state, grad_of(state.position, batch), step_size=eps, friction=alpha,
                           gradient_noise=beta)
        return state, state.position

    _, positions = lax.scan(body, state, (jax.random.split(key_run, total), batches))
    return jax.tree_util.tree_map(lambda a: a[num_warmup:][thin - 1::thin], positions)
