"""One way to read a batch of sequences, for every engine.

Emissions come as

* one sequence ``(T, D)``; a 1-D array ``(T,)`` is read as ``(T, 1)`` (one emission
  dimension; a model with ``emission_dim != 1`` then refuses it by its usual shape check);
* a padded batch ``(B, T, D)`` with optional ``lengths`` (B,) (steps beyond are padding);
* a list of ``(T_b, D)`` (or ``(T_b,)``) arrays, padded here with NaN to the longest,
  ``lengths`` set to the ``T_b``;
* hmmlearn-style concatenated sequences: a 2-D ``(sum(lengths), D)`` array with a 1-D
  ``lengths`` ``[T_1, ..., T_B]`` is split into the B sequences (padded batch, B >= 1).
  The rule is by rank, never by a coincidence of sizes: for a 2-D array a scalar
  ``lengths`` is the true length of one padded sequence, a 1-D ``lengths`` (list or array)
  means concatenation and ``sum(lengths)`` must equal T; for a 3-D array ``lengths`` has
  shape (B,). Inputs given as one array ``(sum(lengths), U)`` are split the same way.
  Results then carry the leading B axis of a batch.

Inputs follow the emissions: ``(T, ...)`` shared by every sequence of a
batch, ``(B, T, ...)`` one per sequence, or a list like the emissions. The reading
never guesses from a coincidence of sizes: with emissions ``(B, T, D)``, an input
array is per-sequence exactly when it has one more axis than a per-step row plus
time, i.e. ``ndim == 3`` for the usual ``(B, T, U)``; pass a list to say so for
inputs of higher rank.

Refused with a ValueError naming the argument: complex emissions or inputs (``emissions:
expected real values``), no time step (``T >= 1``), lengths that do not fit.

    batch = ps.core.batching.as_batch(emissions, inputs, lengths)
    out = batch.map(lambda y, u, n: engine_core(y, u, n))     # vmapped when batched

`as_batch` runs on concrete or traced arrays; its checks are on shapes and dtypes only
(concatenated sequences need concrete ``lengths``: they fix the padded shape).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Batch", "as_batch", "pad_sequences", "check_input_dim", "is_concatenated", "split_concatenated"]


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


def _real(a, name: str):
    """``a`` as a jax array; ValueError naming ``name`` for complex or non-numeric data."""
    try:
        a = jnp.asarray(a)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a real numeric array, got {type(a).__name__} ({e})") from None
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {a.dtype} (pass the real part, or "
                         "real and imaginary parts as separate columns)")
    if not (jnp.issubdtype(a.dtype, jnp.number) or jnp.issubdtype(a.dtype, jnp.bool_)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    return a


def _time_steps_error(name: str, shape) -> ValueError:
    return ValueError(f"{name}: expected at least one time step (T >= 1), got shape {tuple(shape)}")


def _sequence(a, name: str):
    """One (T, D) sequence of a list: 1-D (T,) read as (T, 1); T >= 1."""
    a = _real(a, name)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim < 1:
        raise ValueError(f"{name}: expected shape (T, D) or (T,), got shape {tuple(a.shape)}")
    if a.shape[0] < 1:
        raise _time_steps_error(name, a.shape)
    return a


def pad_sequences(sequences, fill_value=np.nan, name: str = "emissions"):
    """Stack a list of (T_b, ...) arrays into (B, max T_b, ...) padded with ``fill_value``;
    returns (padded, lengths)."""
    arrays = [_real(s, f"{name}[{i}]") for i, s in enumerate(sequences)]
    if not arrays:
        raise ValueError(f"{name}: expected a non-empty list of (T, D) arrays, got an empty list")
    tail = arrays[0].shape[1:]
    for i, a in enumerate(arrays):
        if a.ndim < 1 or a.shape[1:] != tail:
            raise ValueError(f"{name}[{i}]: expected shape (T_b, {', '.join(map(str, tail))}) like "
                             f"{name}[0], got shape {tuple(a.shape)}")
        if a.shape[0] < 1:
            raise _time_steps_error(f"{name}[{i}]", a.shape)
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating) and isinstance(fill_value, float) and np.isnan(fill_value):
        dtype = jnp.result_type(float)
    longest = max(a.shape[0] for a in arrays)
    padded = jnp.stack([jnp.concatenate([a.astype(dtype), jnp.full((longest - a.shape[0],) + tail, fill_value,
                                                                       dtype)]) for a in arrays])
    return padded, jnp.asarray([a.shape[0] for a in arrays], jnp.int32)


def _as_float(y, name: str = "emissions"):
    y = _real(y, name)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    return y


def _check_real_inputs(inputs, name: str = "inputs"):
    if isinstance(inputs, list):
        for i, u in enumerate(inputs):
            for leaf in jax.tree_util.tree_leaves(u):
                _real(leaf, f"{name}[{i}]")
        return
    for leaf in jax.tree_util.tree_leaves(inputs):
        _real(leaf, name)


def _concatenated_lengths(lengths, T: int, name: str):
    """Python ints from a 1-D ``lengths`` of concatenated sequences; sum(lengths) must equal T."""
    if isinstance(lengths, jax.core.Tracer):
        raise ValueError("lengths: concatenated sequences (2-D emissions with a 1-D lengths) need concrete "
                         "lengths (they fix the padded shape); pass a padded (B, T, D) batch under tracing")
    n = np.asarray(lengths)
    if n.size and not np.issubdtype(n.dtype, np.integer):
        if np.issubdtype(n.dtype, np.floating) and np.all(np.isfinite(n)) and np.all(n == np.round(n)):
            n = n.astype(np.int64)
        else:
            raise ValueError(f"lengths: expected integers, got dtype {n.dtype}")
    if n.size == 0:
        raise ValueError("lengths: expected a non-empty list of sequence lengths, got an empty one")
    if np.any(n < 1):
        raise ValueError(f"lengths: expected every length >= 1 (T >= 1), found {int(n.min())}")
    if int(n.sum()) != T:
        raise ValueError(f"lengths: for concatenated sequences ({name} of shape (T, D) with a 1-D lengths), "
                         f"sum(lengths) must equal T = {T}, got sum {int(n.sum())} (lengths {n.tolist()})")
    return [int(v) for v in n]


def _split(a, sizes):
    bounds = np.cumsum([0] + list(sizes))
    return [a[int(bounds[i]):int(bounds[i + 1])] for i in range(len(sizes))]


def is_concatenated(emissions, lengths) -> bool:
    """Whether ``(emissions, lengths)`` are hmmlearn-style concatenated sequences: a 2-D array
    (not a list) with a 1-D ``lengths`` (see the module doc)."""
    return (lengths is not None and not isinstance(emissions, (list, tuple)) and np.ndim(emissions) == 2
            and np.ndim(lengths) == 1)


def split_concatenated(array, lengths, fill_value=np.nan, name: str = "emissions"):
    """Split a (sum(lengths), ...) array into the (B, max T_b, ...) padded batch of its
    ``lengths`` (concrete); returns (padded, lengths)."""
    a = _real(array, name)
    sizes = _concatenated_lengths(lengths, a.shape[0] if a.ndim else -1, name)
    return pad_sequences(_split(a, sizes), fill_value=fill_value, name=name)


def as_batch(emissions, inputs=None, lengths=None, *, name: str = "emissions") -> Batch:
    """Read emissions (and inputs, lengths) as one sequence or a batch; see the module doc.

    Raises:
        ValueError: emissions are not (T,), (T, D), (B, T, D), a list of (T_b, D) arrays or
            concatenated sequences (2-D emissions with a 1-D ``lengths`` summing to T);
            complex emissions or inputs; no time step (T >= 1); inputs have no matching time
            axis; lengths do not match the batch.
    """
    if inputs is not None:
        _check_real_inputs(inputs)
    from_list = isinstance(emissions, (list, tuple))
    if from_list:
        if len(emissions) == 0:
            raise ValueError(f"{name}: expected a non-empty list of (T, D) arrays, got an empty list")
        seqs = [_sequence(e, f"{name}[{i}]") for i, e in enumerate(emissions)]
        y, list_lengths = pad_sequences(seqs, name=name)
        y = _as_float(y, name)
        if lengths is not None:
            raise ValueError("lengths: emissions given as a list carry their own lengths; expected None")
        lengths = list_lengths
    else:
        y = _as_float(emissions, name)
        if y.ndim == 1:
            y = y[:, None]
    if y.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape (T, D), (B, T, D) or a list of (T_b, D) arrays, "
                         f"got shape {tuple(y.shape)}")
    if y.shape[-2] < 1:
        raise _time_steps_error(name, y.shape)
    split_inputs = False
    if not from_list and y.ndim == 2 and lengths is not None and np.ndim(lengths) == 1:
        # hmmlearn-style concatenated sequences -> a padded batch
        sizes = _concatenated_lengths(lengths, y.shape[0], name)
        y, lengths = pad_sequences(_split(y, sizes), name=name)
        if inputs is not None and not isinstance(inputs, list):
            def split_leaf(a):
                a = jnp.asarray(a)
                if a.ndim < 1 or a.shape[0] != sum(sizes):
                    raise ValueError(f"inputs: with concatenated sequences, expected shape ({sum(sizes)}, U) "
                                     f"(sum(lengths) rows, split like the emissions), got shape {tuple(a.shape)}")
                return pad_sequences(_split(a, sizes), fill_value=0.0, name="inputs")[0]

            inputs = jax.tree_util.tree_map(split_leaf, inputs)
            split_inputs = True
    batched = y.ndim == 3
    T = y.shape[-2]
    B = y.shape[0] if batched else None
    inputs_batched = False
    if inputs is not None:
        if isinstance(inputs, list):
            if not batched or len(inputs) != B:
                raise ValueError(f"inputs: a list of inputs needs a batch of {len(inputs)} emissions sequences, "
                                 f"got emissions of shape {tuple(y.shape)}")
            inputs, _ = pad_sequences(inputs, fill_value=0.0, name="inputs")
            inputs_batched = True
        inputs_batched = inputs_batched or (split_inputs and bool(jax.tree_util.tree_leaves(inputs)))
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
        if not isinstance(n, jax.core.Tracer) and not (isinstance(n, jax.Array) and not n.is_fully_addressable):
            a = np.asarray(n)  # a global array over several hosts (jax.distributed) is not read here
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
