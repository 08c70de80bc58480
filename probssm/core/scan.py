"""Scan helpers shared by the parallel-in-time engines."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def chunked_associative_scan(fn, elems, identity, chunk_size=None, reverse=False):
    """All prefix combinations of `elems` under the associative `fn`.

    ``fn(a, b)`` works on single elements (it is vmapped here) and combines an element ``a`` that comes first in scan order with
    ``b`` that comes after it (with ``reverse=True`` scan order runs from the last
    time step back, so ``a`` is the later step). ``identity`` is the neutral
    element, used to pad the last chunk.

    With ``chunk_size=None`` this is `lax.associative_scan`. Otherwise the
    sequence is cut into chunks of ``chunk_size``: an associative scan runs inside
    each chunk and a sequential `lax.scan` carries the running prefix across
    chunks, so the compiled graph has a fixed size whatever T is.
    """
    leaves = jax.tree_util.tree_leaves(elems)
    num_timesteps = leaves[0].shape[0]
    if reverse:
        elems = jax.tree_util.tree_map(lambda a: jnp.flip(a, 0), elems)
    if chunk_size is None or chunk_size >= num_timesteps:
        out = lax.associative_scan(jax.vmap(fn), elems)
    else:
        num_chunks = -(-num_timesteps // chunk_size)
        pad = num_chunks * chunk_size - num_timesteps

        def pad_and_split(a, e):
            if pad:
                a = jnp.concatenate([a, jnp.broadcast_to(e, (pad,) + e.shape)])
            return a.reshape((num_chunks, chunk_size) + a.shape[1:])

        chunks = jax.tree_util.tree_map(pad_and_split, elems, identity)

        def step(prefix, chunk):
            local = lax.associative_scan(jax.vmap(fn), chunk)
            full = jax.vmap(lambda e: fn(prefix, e))(local)
            return jax.tree_util.tree_map(lambda a: a[-1], full), full

        _, out = lax.scan(step, identity, chunks)
        out = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:])[:num_timesteps], out)
    if reverse:
        out = jax.tree_util.tree_map(lambda a: jnp.flip(a, 0), out)
    return out
