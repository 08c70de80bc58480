"""Batches of sequences and particle populations over several devices and hosts.

The engines (`ps.kalman`, `ps.hmm`, `ps.smc`, `ps.learn.em`, `ps.learn.fit_hmmglm`, ...) are
jit-compiled and vmapped over the leading batch axis of a ``(B, T, D)`` batch. Nothing in them
knows about devices: place the batch with a `jax.sharding.NamedSharding` that splits its leading
axis over a mesh, call the engine as usual, and XLA's SPMD partitioner runs the vmapped batch
sharded -- each device computes its B / num_devices sequences, and the results come back as
global arrays sharded the same way (per-sequence outputs) or replicated (quantities pooled over
the batch, such as the parameters fitted by EM). The same code runs on one device, on several
devices of one machine and on several hosts (after `jax.distributed.initialize()`).

    import probssm as ps
    mesh = ps.sharding.batch_mesh()                          # 1-D mesh over jax.devices()
    y, lengths = ps.sharding.shard_batch((y, lengths), mesh)  # y (B, T, D), lengths (B,)
    post = ps.kalman.smoother(model, y, lengths=lengths)     # computed B / num_devices per device
    post.smoothed_means.sharding                             # NamedSharding(mesh, P('batch'))
    means = ps.sharding.gather(post.smoothed_means)          # numpy (B, T, D) on every process

A batch whose size is not a multiple of the number of devices is refused with a ValueError
(``pad=False``, the default). ``pad=True`` appends copies of the last sequence up to the next
multiple; per-sequence results (filters, smoothers, samplers, per-trial log-likelihoods) are
trimmed back with ``unpad(result, batch_size)``. Do not pad for learners that pool over the
batch (``ps.learn.em``, ``fit_hmmglm``): the copies would count twice in the fit.

Ragged lists and hmmlearn-style concatenated sequences: `shard_sequences` reads them like every
engine does (`probssm.core.batching.as_batch`), pads them to ``(B, T, D)`` with ``lengths`` and
shards emissions, per-sequence inputs and lengths together (shared inputs are replicated).

Several hosts: every process calls the same program. Either every process holds the whole
batch (then `shard_batch` as above), or each holds its own slice of it and `from_process_local`
assembles the global array (`jax.make_array_from_process_local_data`); `gather` brings a result
back to every process as numpy.

Particle populations: `shard_particles` places a chosen axis (the particle axis) of arrays over
the mesh, on concrete arrays (`jax.device_put`) and inside your own jitted code
(`jax.lax.with_sharding_constraint`), e.g. for a custom SMC loop built from
`ps.smc.particle_filter_sequence` and its kernels. The packaged particle engines draw their
particles inside the compiled program; shard a batch of sequences (and keep the same key) to
spread them over devices.

Random keys follow the batch: a ``(B,)`` array of keys (``jax.random.split(key, B)``) is sharded
like the emissions. With ``jax_threefry_partitionable`` (JAX's default) random draws
do not depend on how the arrays are sharded, so a sharded run reproduces the single-device run
with the same key.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from probssm.core.batching import as_batch

__all__ = ["batch_mesh", "batch_sharding", "shard_batch", "shard_sequences", "ShardedBatch", "unpad",
           "shard_particles", "from_process_local", "gather", "local_batch_sizes"]


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def batch_mesh(devices: Optional[Sequence[Any]] = None, axis_name: str = "batch") -> Mesh:
    """A 1-D `jax.sharding.Mesh` named ``axis_name`` over ``devices``.

    Args:
        devices: the devices to spread the batch over; None: ``jax.devices()``, every device of
            every process (after `jax.distributed.initialize()` that includes other hosts').
        axis_name: the mesh axis name (a non-empty string).

    Returns:
        ``Mesh(devices, (axis_name,))``.

    Raises:
        ValueError: ``devices`` is empty, holds something that is not a `jax.Device` or repeats a
            device; ``axis_name`` is not a non-empty string.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name: expected a non-empty string, got {axis_name!r}")
    if devices is None:
        devices = jax.devices()
    try:
        devices = list(np.asarray(devices, dtype=object).reshape(-1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"devices: expected a sequence of jax devices, got {type(devices).__name__} ({e})") from None
    if not devices:
        raise ValueError("devices: expected at least one device, got an empty sequence")
    for i, d in enumerate(devices):
        if not isinstance(d, jax.Device):
            raise ValueError(f"devices[{i}]: expected a jax.Device (e.g. from jax.devices()), got {type(d).__name__}")
    if len({(d.platform, d.id) for d in devices}) != len(devices):
        raise ValueError(f"devices: expected distinct devices, got {devices}")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def _mesh_axis(mesh, axis_name, name: str = "mesh"):
    """(mesh, axis name, number of devices along it)."""
    if mesh is None:
        mesh = batch_mesh()
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{name}: expected a jax.sharding.Mesh (e.g. ps.sharding.batch_mesh()), "
                         f"got {type(mesh).__name__}")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"axis_name: the mesh has axes {tuple(mesh.axis_names)}; name the one to shard over")
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh axes {tuple(mesh.axis_names)}, got {axis_name!r}")
    return mesh, axis_name, int(mesh.shape[axis_name])


def batch_sharding(mesh: Optional[Mesh] = None, axis_name: Optional[str] = None, *, axis: int = 0) -> NamedSharding:
    """``NamedSharding(mesh, P(None, ..., axis_name))``: array axis ``axis`` split over the mesh
    axis ``axis_name`` (None: the mesh's only axis), the others replicated.

    mesh None: ``batch_mesh()``.
    """
    if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
        raise ValueError(f"axis: expected a non-negative int, got {axis!r}")
    mesh, axis_name, _ = _mesh_axis(mesh, axis_name)
    return NamedSharding(mesh, PartitionSpec(*([None] * axis + [axis_name])))


# ----------------------------------------------------------------------------------------------
# Placing arrays
# ----------------------------------------------------------------------------------------------
def _leaves_with_paths(tree, name: str):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(f"{name}{jax.tree_util.keystr(p)}", leaf) for p, leaf in flat], treedef


def _as_array(leaf, where: str):
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    try:
        return np.asarray(leaf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected an array, got {type(leaf).__name__} ({e})") from None


def _place(x, sharding):
    """device_put for concrete arrays; a sharding constraint for traced ones (inside jit)."""
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x, sharding)
    return jax.device_put(x, sharding)


def _pad_edge(x, size: int):
    """Append copies of the last entry along axis 0 up to ``size`` rows."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


def _shard_axis(tree, mesh, axis_name, axis: int, pad: bool, name: str, what: str):
    mesh, axis_name, n = _mesh_axis(mesh, axis_name)
    leaves, treedef = _leaves_with_paths(tree, name)
    if not leaves:
        raise ValueError(f"{name}: expected at least one array, got {tree!r}")
    arrays = [(w, _as_array(leaf, w)) for w, leaf in leaves]
    size, first = None, None
    for w, a in arrays:
        if a.ndim <= axis:
            raise ValueError(f"{w}: expected an array with a {what} axis {axis} ((B, ...) with B the {what} "
                             f"size), got shape {tuple(a.shape)}")
        if size is None:
            size, first = a.shape[axis], w
        elif a.shape[axis] != size:
            raise ValueError(f"{w}: expected {what} size {size} on axis {axis} (like {first}), "
                             f"got shape {tuple(a.shape)}")
    if size < 1:
        raise ValueError(f"{first}: expected a {what} size >= 1, got shape {tuple(arrays[0][1].shape)}")
    padded = math.ceil(size / n) * n
    if padded != size and not pad:
        hint = " or pass pad=True and trim the results with ps.sharding.unpad" if what == "batch" else ""
        raise ValueError(f"{first}: the {what} size {size} (axis {axis}) must be a multiple of the number of "
                         f"devices {n} on mesh axis {axis_name!r}; choose a {what} size divisible by {n}{hint}")
    sharding = NamedSharding(mesh, PartitionSpec(*([None] * axis + [axis_name])))
    out = []
    for _, a in arrays:
        if padded != size:
            a = _pad_edge(a, padded)
        out.append(_place(a, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_batch(tree, mesh: Optional[Mesh] = None, *, axis_name: Optional[str] = None, pad: bool = False):
    """Place the leading (batch) axis of every array in ``tree`` across the devices of ``mesh``.

    Args:
        tree: an array or a pytree of arrays that all share the leading batch size B:
            emissions (B, T, D), lengths (B,), per-sequence inputs (B, T, U), keys (B,) ...
            (shared inputs (T, U) and single keys are not batched: leave them out).
        mesh: a `jax.sharding.Mesh`; None: ``batch_mesh()`` (every device).
        axis_name: the mesh axis to split the batch over; None: the mesh's only axis.
        pad: False: B must be a multiple of the number of devices along the axis. True: the
            batch is padded to the next multiple with copies of its last sequence; trim
            per-sequence results with ``unpad(result, B)`` (not for learners that pool over the
            batch, where the copies would count twice).

    Returns:
        the same tree, each array a global `jax.Array` with sharding ``NamedSharding(mesh,
        P(axis_name))`` (each device holds B / num_devices rows). Inside `jax.jit` the arrays get
        that sharding as a constraint. The values are unchanged.

    Raises:
        ValueError: naming the leaf, when it has no leading axis, when the leaves disagree on B,
            or when B is not a multiple of the number of devices (``pad=False``); for a bad mesh or
            axis name.
    """
    return _shard_axis(tree, mesh, axis_name, 0, bool(pad), "tree", "batch")


class ShardedBatch(NamedTuple):
    """A batch read like the engines read it and placed over a mesh (see `shard_sequences`).

    emissions: (B', T, D) sharded over the batch axis (B' = batch_size, or the padded size).
    inputs: None, shared inputs (T, ...) replicated on every device, or per-sequence inputs
        (B', T, ...) sharded like the emissions.
    lengths: None or (B',) sharded like the emissions.
    batch_size: B before padding: ``unpad(result, batch_size)`` trims per-sequence results.
    """

    emissions: jax.Array
    inputs: Any
    lengths: Optional[jax.Array]
    batch_size: int


def shard_sequences(emissions, mesh: Optional[Mesh] = None, *, inputs=None, lengths=None,
                    axis_name: Optional[str] = None, pad: bool = False) -> ShardedBatch:
    """Read a batch of sequences as the engines do and shard it over ``mesh``.

    Args:
        emissions: a padded batch (B, T, D), a list of (T_b, D) arrays (padded with NaN and
            ``lengths`` filled in) or concatenated sequences (sum(lengths), D) with a 1-D
            ``lengths`` -- see `probssm.core.batching`. A single sequence (T, D) is refused:
            there is no batch axis to shard.
        mesh, axis_name, pad: as in `shard_batch`.
        inputs: None, shared (T, U) (replicated), or per sequence (B, T, U) / a list.
        lengths: None or (B,) true lengths.

    Returns:
        `ShardedBatch` (emissions, inputs, lengths, batch_size); pass its fields to any engine:
        ``ps.kalman.filter(model, sb.emissions, inputs=sb.inputs, lengths=sb.lengths)``.

    Raises:
        ValueError: as `probssm.core.batching.as_batch` and `shard_batch`; ``emissions`` is a
            single sequence.
    """
    batch = as_batch(emissions, inputs, lengths)
    if not batch.batched:
        raise ValueError(f"emissions: expected a batch (B, T, D) or a list of (T_b, D) arrays to shard, got one "
                         f"sequence of shape {tuple(batch.emissions.shape)}")
    B = int(batch.batch_size)
    mesh, axis_name, _ = _mesh_axis(mesh, axis_name)
    pad = bool(pad)
    y = _shard_axis(batch.emissions, mesh, axis_name, 0, pad, "emissions", "batch")
    n = None if batch.lengths is None else _shard_axis(batch.lengths, mesh, axis_name, 0, pad, "lengths", "batch")
    u = batch.inputs
    if u is not None and batch.inputs_batched:
        u = _shard_axis(u, mesh, axis_name, 0, pad, "inputs", "batch")
    elif u is not None:  # shared by every sequence: a copy on every device
        replicated = NamedSharding(mesh, PartitionSpec())
        u = jax.tree_util.tree_map(lambda a: _place(a, replicated), u)
    return ShardedBatch(y, u, n, B)


def unpad(tree, batch_size: int, *, axis: int = 0):
    """The first ``batch_size`` entries along ``axis`` of every array in ``tree`` (arrays with no
    such axis, e.g. a pooled scalar, are returned as they are): undoes ``pad=True``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")

    def trim(a):
        if jnp.ndim(a) <= axis:
            return a
        return jax.lax.slice_in_dim(a, 0, int(batch_size), axis=axis) if isinstance(a, jax.Array) else \
            np.take(a, np.arange(int(batch_size)), axis=axis)

    return jax.tree_util.tree_map(trim, tree)


def shard_particles(tree, mesh: Optional[Mesh] = None, *, axis: int = 0, axis_name: Optional[str] = None):
    """Place the particle axis ``axis`` of every array in ``tree`` across the devices of ``mesh``.

    Particles (N, D) and log-weights (N,) with ``axis=0``; a history (T, N, D) or a batch of
    populations (B, N, ...) with ``axis=1``. N must be a multiple of the number of devices (a
    population is never padded: extra particles would change the estimator). Works on concrete
    arrays (`jax.device_put`) and on traced ones inside `jax.jit` (a sharding constraint), so
    a custom SMC loop can keep its population sharded; resampling then gathers across devices.

    Raises:
        ValueError: naming the leaf, when it lacks the axis, the leaves disagree on N, or N is
            not a multiple of the number of devices; for a bad mesh, axis or axis name.
    """
    if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
        raise ValueError(f"axis: expected a non-negative int, got {axis!r}")
    return _shard_axis(tree, mesh, axis_name, axis, False, "tree", "particle")


# ----------------------------------------------------------------------------------------------
# Several hosts
# ----------------------------------------------------------------------------------------------
def from_process_local(tree, mesh: Optional[Mesh] = None, *, axis_name: Optional[str] = None):
    """Global arrays from each process's own slice of the batch (multi-host data loading).

    Every process calls this with its local rows (B_local, ...) of every array; the global
    batch is the processes' slices in process order (B = sum of B_local), sharded over the
    batch axis of ``mesh`` like `shard_batch`. Wraps `jax.make_array_from_process_local_data`.
    In a single process it is `shard_batch` (without padding).

    Raises:
        ValueError: naming the leaf, when the leaves disagree on B_local, or B_local is not a
            multiple of this process's devices on the mesh.
    """
    mesh, axis_name, n = _mesh_axis(mesh, axis_name)
    leaves, treedef = _leaves_with_paths(tree, "tree")
    if not leaves:
        raise ValueError(f"tree: expected at least one array, got {tree!r}")
    arrays = [(w, _as_array(leaf, w)) for w, leaf in leaves]
    local_devices = [d for d in mesh.devices.reshape(-1) if d.process_index == jax.process_index()]
    n_local = len(local_devices)
    if n_local == 0:
        raise ValueError(f"mesh: none of its devices belong to this process (index {jax.process_index()})")
    size, first = None, None
    for w, a in arrays:
        if a.ndim < 1:
            raise ValueError(f"{w}: expected an array with a leading batch axis (B_local, ...), got shape "
                             f"{tuple(a.shape)}")
        if size is None:
            size, first = a.shape[0], w
        elif a.shape[0] != size:
            raise ValueError(f"{w}: expected local batch size {size} (like {first}), got shape {tuple(a.shape)}")
    if size < 1 or size % n_local:
        raise ValueError(f"{first}: the local batch size {size} must be a positive multiple of this process's "
                         f"{n_local} devices on mesh axis {axis_name!r}")
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    global_size = size * (n // n_local)
    out = [jax.make_array_from_process_local_data(sharding, np.asarray(a) if not isinstance(a, jax.Array) else a,
                                                  (global_size,) + tuple(a.shape[1:]))
           for _, a in arrays]
    return jax.tree_util.tree_unflatten(treedef, out)


def gather(tree):
    """Every array of ``tree`` as a numpy array holding its global value, on every process.

    One process: `jax.device_get`. Several (`jax.distributed`): an all-gather across processes
    (`jax.experimental.multihost_utils.process_allgather`), so each host gets the whole result.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(a):
        if not isinstance(a, jax.Array):
            return a
        if a.is_fully_addressable:
            return np.asarray(a)
        if a.sharding.is_fully_replicated:  # e.g. parameters fitted by EM: every process has a copy
            return np.asarray(a.addressable_data(0))
        return multihost_utils.process_allgather(a, tiled=True)

    return jax.tree_util.tree_map(one, tree)


def local_batch_sizes(array) -> dict:
    """``{device: rows of axis 0 held there}`` for a `jax.Array` (this process's devices): shows how
    a batch or a result is spread. A replicated array reports its full size on every device."""
    if not isinstance(array, jax.Array):
        raise ValueError(f"array: expected a jax.Array, got {type(array).__name__}")
    if array.ndim < 1:
        raise ValueError(f"array: expected an array with a leading axis, got shape {tuple(array.shape)}")
    return {s.device: int(s.data.shape[0]) for s in array.addressable_shards}
