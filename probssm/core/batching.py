"""One way to read a batch of sequences, for every engine.

Emissions come as one sequence ``(T, D)``, a padded batch ``(B, T, D)`` or a list of
``(T_b, D)`` arrays (padded here with NaN to the longest, ``lengths`` set to the
``T_b``). Inputs follow the emissions: ``(T, ...)`` shared by every sequence of a
batch, ``(B, T, ...)`` one per sequence, or a list like the emissions. The reading
never guesses from a coincidence of sizes: with emissions ``(B, T, D)``, an input
array is per-sequence exactly when it has one more axis than a per-step row plus
time, i.e. ``ndim == 3`` for the usual ``(B, T, U)``; pass a list to say so for
inputs of higher rank.

    batch = ps.core.batching.as_batch(emissions, inputs, lengths)
    out = batch.map(lambda y, u, n: engine_core(y, u, n))     # vmapped when batched

`as_batch` runs on concrete or traced arrays; its checks are on shapes only.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Batch", "as_batch", "pad_sequences", "check_input_dim"]


class Batch(NamedTuple):
    """Emissions and inputs of one sequence or of a batch, with what is batched.

    emissions: (T, D) or (B, T, D), floating point, NaN = missing.
    inputs: None, (T, ...) or (B, T, ...) (a pytree of such arrays).
    lengths: None, an int array () or (B,): true lengths (steps beyond are padding).
    batched: whether emissions carry the leading B axis.
    inputs_batched: whether inputs carry it (False: shared by every sequence).
    """

    emissions: jax.Array
    inputs: Any
    lengths: Optional[jax.Array]
    batched: bool
    inputs_batched: bool

    @property
    def num_timesteps(self) -> int:
        return self.emissions.shape[-2]

    @property
    def batch_size(self) -> Optional[int]:
        return self.emissions.shape[0] if self.batched else None

    def in_axes(self):
        """vmap axes for (emissions, inputs, lengths)."""
        return (0, 0 if self.inputs_batched else None, None if self.lengths is None else 0)

    def map(self, fn: Callable, *extra, extra_axes=None):
        """``fn(emissions, inputs, lengths, *extra)`` per sequence: vmapped over B when batched.

        ``extra`` arguments are shared unless ``extra_axes`` gives their vmap axes (e.g. a
        key per sequence: ``extra_axes=(0,)``).
        """
        if not self.batched:
            return fn(self.emissions, self.inputs, self.lengths, *extra)
        axes = self.in_axes() + (tuple(extra_axes) if extra_axes is not None else (None,) * len(extra))
        return jax.vmap(fn, in_axes=axes)(self.emissions, self.inputs, self.lengths, *extra)


def pad_sequences(sequences, fill_value=np.nan):
    """Stack a list of (T_b, ...) arrays into (B, max T_b, ...) padded with ``fill_value``;
    returns (padded, lengths)."""
    arrays = [jnp.asarray(s) for s in sequences]
    if not arrays:
        raise ValueError("emissions: expected a non-empty list of (T, D) arrays, got an empty list")
    tail = arrays[0].shape[1:]
    for i, a in enumerate(arrays):
        if a.ndim < 1 or a.shape[1:] != tail or a.shape[0] < 1:
            raise ValueError(f"emissions[{i}]: expected shape (T_b, {', '.join(map(str, tail))}) like "
                             f"emissions[0], got shape {tuple(a.shape)}")
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating) and isinstance(fill_value, float) and np.isnan(fill_value):
        dtype = jnp.result_type(float)
    longest = max(a.shape[0] for a in arrays)
    padded = jnp.stack([jnp.concatenate([a.astype(dtype), jnp.full((longest - a.shape[0],) + tail, fill_value,
                                                                       dtype)]) for a in arrays])
    return padded, jnp.asarray([a.shape[0] for a in arrays], jnp.int32)


def _as_float(y):
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    return y


def as_batch(emissions, inputs=None, lengths=None, *, name: str = "emissions") -> Batch:
    """Read emissions (and inputs, lengths) as one sequence or a batch; see the module doc.

    Raises:
        ValueError: emissions are not (T, D), (B, T, D) or a list of (T_b, D) arrays; inputs
            have no matching time axis; lengths do not match the batch.
    """
    from_list = isinstance(emissions, (list, tuple))
    if from_list:
        y, list_lengths = pad_sequences(emissions)
        y = _as_float(y)
        if lengths is not None:
            raise ValueError("lengths: emissions given as a list carry their own lengths; expected None")
        lengths = list_lengths
    else:
        y = _as_float(emissions)
    if y.ndim not in (2, 3) or y.shape[-2] < 1:
        raise ValueError(f"{name}: expected shape (T, D), (B, T, D) or a list of (T_b, D) arrays, "
                         f"got shape {tuple(y.shape)}")
    batched = y.ndim == 3
    T = y.shape[-2]
    B = y.shape[0] if batched else None
    inputs_batched = False
    if inputs is not None:
        if isinstance(inputs, list):
            if not batched or len(inputs) != B:
                raise ValueError(f"inputs: a list of inputs needs a batch of {len(inputs)} emissions sequences, "
                                 f"got emissions of shape {tuple(y.shape)}")
            inputs, _ = pad_sequences(inputs, fill_value=0.0)
            inputs_batched = True
        leaves = jax.tree_util.tree_leaves(inputs)
        if batched and not inputs_batched:
            per_seq = [jnp.ndim(a) >= 3 and jnp.shape(a)[:2] == (B, T) for a in leaves]
            inputs_batched = bool(leaves) and all(per_seq)
        for a in leaves:
            shp = tuple(jnp.shape(a))
            ok = (len(shp) >= 2 and shp[:2] == (B, T)) if inputs_batched else (len(shp) >= 1 and shp[0] == T)
            if not ok:
                want = f"({B}, {T}, U)" if inputs_batched else f"({T}, U)" + (f" or ({B}, {T}, U)" if batched else "")
                raise ValueError(f"inputs: expected shape {want}, got shape {shp}")
    if lengths is not None:
        n = jnp.asarray(lengths)
        if not jnp.issubdtype(n.dtype, jnp.integer):
            raise ValueError(f"lengths: expected integers, got dtype {n.dtype}")
        want = (B,) if batched else ()
        if n.shape != want:
            raise ValueError(f"lengths: expected shape {want}, got shape {tuple(n.shape)}")
        if not isinstance(n, jax.core.Tracer):
            a = np.asarray(n)
            if np.any(a < 1) or np.any(a > T):
                raise ValueError(f"lengths: expected values in 1..{T}, got {a.min()}..{a.max()}")
        lengths = n
    return Batch(y, inputs, lengths, batched, inputs_batched)


def check_input_dim(batch: Batch, input_dim) -> None:
    """Every input leaf ends in the model's declared width (None: undeclared, not checked)."""
    if not isinstance(input_dim, int) or input_dim <= 0 or batch.inputs is None:
        return
    for leaf in jax.tree_util.tree_leaves(batch.inputs):
        if jnp.shape(leaf)[-1] != input_dim:
            lead = f"{batch.batch_size}, " if batch.inputs_batched else ""
            raise ValueError(f"inputs: expected shape ({lead}{batch.num_timesteps}, {input_dim}) (the model's "
                             f"input_dim), got shape {tuple(jnp.shape(leaf))}")
