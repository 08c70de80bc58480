"""A fixed number of optax steps on a loss, compiled as one scan (inner loops of M-steps and filters)."""
import jax
import optax
from jax import lax


def descend(loss, params, optimizer, num_steps: int):
    """Take ``num_steps`` steps of ``optimizer`` on ``loss`` from ``params``; returns the final params."""

    def step(carry, _):
        p, s = carry
        updates, s = optimizer.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = lax.scan(step, (params, optimizer.init(params)), None, length=num_steps)
    return params
