"""Optax loops compiled as one scan: a fixed number of steps on a loss (inner loops of M-steps and
filters), the maximum-likelihood loop over a model's learnable arrays (`maximize`), and the line
search of damped Newton steps (`line_search`)."""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import params as P, progress as prog


LINE_SEARCH_STEPS = tuple(2.0 ** -i for i in range(10)) + (0.0,)  # step sizes tried (0: keep x)


def line_search(objective, x, dx):
    """``x + s dx`` for the step ``s`` in `LINE_SEARCH_STEPS` with the highest finite ``objective``
    (to maximise; x itself when no step is finite).

    Values within rounding of the best count as tied, and the longest tied step wins. Near the
    optimum every step ties with keeping x, and a plain argmax would pick among them by rounding
    noise: Newton would stop short of the optimum at a point that differs between compilations
    (under vmap, or with other XLA flags). The full step is the right one there."""
    steps = jnp.asarray(LINE_SEARCH_STEPS, x.dtype)
    vals = jax.vmap(lambda s: objective(x + s * dx))(steps)
    vals = jnp.where(jnp.isfinite(vals), vals, -jnp.inf)
    best = jnp.max(vals)
    tied = jnp.isfinite(vals) & (vals >= best - 100 * jnp.finfo(vals.dtype).eps * (1.0 + jnp.abs(best)))
    return x + jnp.where(jnp.any(tied), steps[jnp.argmax(tied)], 0.0) * dx


def descend(loss, params, optimizer, num_steps: int):
    """Take ``num_steps`` steps of ``optimizer`` on ``loss`` from ``params``; returns the final params."""

    def step(carry, _):
        p, s = carry
        updates, s = optimizer.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = lax.scan(step, (params, optimizer.init(params)), None, length=num_steps)
    return params


def maximize(model, log_likelihood, num_obs, *, fixed, optimizer, num_iters: int, show: bool):
    """The optimisation loop behind `mle`, traceable (callers jit it): maximise
    ``log_likelihood(model)`` over the learnable arrays of ``model`` not in ``fixed``, in their
    unconstrained coordinates, with an optax ``optimizer`` over ``num_iters`` steps in one scan.
    The loss is scaled by ``num_obs`` (float) so step sizes do not depend on the data size.
    Returns ``(fitted_model, history)``: the best finite iterate (a line search can step into an
    overflow; the fit never returns NaN parameters) and the log-likelihood entering each step."""
    spec = P.spec(model, fixed)
    params = P.to_unconstrained(model, spec)

    def loss(params):
        return -log_likelihood(P.from_unconstrained(model, spec, params)) / num_obs

    value_and_grad = jax.value_and_grad(loss)
    every = prog.report_every(num_iters)

    def keep_best(best, params, value):
        better = jnp.isfinite(value) & (value < best[1])
        return jax.tree_util.tree_map(lambda b, p: jnp.where(better, p, b), best[0], params), \
            jnp.where(better, value, best[1])

    def step(carry, i):
        params, state, best = carry
        value, grad = value_and_grad(params)
        best = keep_best(best, params, value)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        params = optax.apply_updates(params, updates)
        if show:
            prog.report(i, -value * num_obs, every)
        return (params, state, best), -value * num_obs

    best = (params, jnp.asarray(jnp.inf, jnp.result_type(num_obs)))
    (params, _, best), history = lax.scan(step, (params, optimizer.init(params), best), jnp.arange(num_iters))
    params, _ = keep_best(best, params, loss(params))
    return P.from_unconstrained(model, spec, params), history
