"""Input checks run once at public functions, outside jit.

Each raises ``ValueError`` naming the argument, what was received and what was
expected. Value checks (finite, PSD, simplex) run only on concrete arrays, so a
public function can still be called inside a user's own ``jax.jit``.
"""
from __future__ import annotations

import weakref

import numpy as np
import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
    """Whether ``x``'s values can be read here: not traced, and not a global array spanning other
    processes' devices (multi-host, see `probssm.core.sharding`), whose value checks are skipped
    like those of traced arrays."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def positive_float(value, name: str):
    """A positive finite Python float; a traced value (inside a caller's jit) passes unchecked."""
    if not is_concrete(value):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive number, got {value!r}") from None
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {v}")
    return v


def array(x, name: str, ndims: tuple[int, ...], shape_doc: str):
    """Convert to a float array and check its number of dimensions."""
    if x is None:
        raise ValueError(f"{name}: expected an array of shape {shape_doc}, got None")
    a = jnp.asarray(x)
    if a.ndim not in ndims:
        raise ValueError(f"{name}: expected shape {shape_doc}, got shape {a.shape}")
    return a


def shape(a, name: str, expected: tuple, shape_doc: str | None = None):
    """Check `a.shape == expected`, where an entry None matches any size."""
    ok = len(a.shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, a.shape)
    )
    if not ok:
        doc = shape_doc or str(tuple("*" if e is None else e for e in expected))
        raise ValueError(f"{name}: expected shape {doc}, got shape {tuple(a.shape)}")
    return a


def finite(a, name: str):
    if is_concrete(a) and not bool(np.all(np.isfinite(np.asarray(a)))):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return a


def psd(a, name: str, strict: bool = True):
    """Check symmetric (positive definite when strict) matrices, stacked or single."""
    if not is_concrete(a):
        return a
    m = np.asarray(a, dtype=np.float64)
    finite(m, name)
    scale = max(1.0, float(np.max(np.abs(m)))) if m.size else 1.0
    if not np.allclose(m, np.swapaxes(m, -1, -2), rtol=1e-6, atol=1e-8 * scale):
        raise ValueError(f"{name}: expected a symmetric matrix, got an asymmetric one")
    eig = np.linalg.eigvalsh(m)
    floor = -1e-10 * scale
    if (strict and np.any(eig <= 0)) or np.any(eig < floor):
        kind = "positive definite" if strict else "positive semi-definite"
        raise ValueError(
            f"{name}: expected a {kind} matrix, smallest eigenvalue is {eig.min():.3g}"
        )
    return a


def probabilities(a, name: str, axis: int = -1, atol: float = 1e-6):
    if not is_concrete(a):
        return a
    p = np.asarray(a, dtype=np.float64)
    finite(p, name)
    if np.any(p < 0):
        raise ValueError(f"{name}: expected non-negative probabilities, found {p.min():.3g}")
    s = p.sum(axis=axis)
    if not np.allclose(s, 1.0, atol=atol):
        bad = s.ravel()[np.argmax(np.abs(s.ravel() - 1.0))]
        raise ValueError(f"{name}: expected rows that sum to one along axis {axis}, found a sum of {bad:.6g}")
    return a


def emissions_batch(emissions, emission_dim: int, name: str = "emissions"):
    """Accept (T, D) or (B, T, D) (and (T,) as (T, 1) when ``emission_dim`` is 1); return
    (array, batched flag). Complex data and T = 0 are refused."""
    y = jnp.asarray(emissions)
    if jnp.issubdtype(y.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {y.dtype}")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim == 1 and emission_dim == 1:
        y = y[:, None]
    if y.ndim in (2, 3) and y.shape[-2] < 1:
        raise ValueError(f"{name}: expected at least one time step (T >= 1), got shape {tuple(y.shape)}")
    if y.ndim not in (2, 3) or y.shape[-1] != emission_dim:
        raise ValueError(
            f"{name}: expected shape (T, {emission_dim}) or (B, T, {emission_dim}), got shape {tuple(y.shape)}"
        )
    if is_concrete(y) and bool(np.isinf(np.asarray(y)).any()):
        raise ValueError(f"{name}: found inf; use NaN to mark missing values")
    return y, y.ndim == 3


def inputs_batch(inputs, num_timesteps: int, batch_size: int | None, name: str = "inputs"):
    """Inputs are (T, U) for one sequence or (B, T, U) for a batch (or (T, U) shared)."""
    if inputs is None:
        return None, False
    u = jnp.asarray(inputs)
    if jnp.issubdtype(u.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {u.dtype}")
    if u.ndim == 1:
        u = u[:, None]
    if batch_size is None:
        if u.ndim != 2 or u.shape[0] != num_timesteps:
            raise ValueError(f"{name}: expected shape ({num_timesteps}, U), got shape {tuple(u.shape)}")
        return u, False
    if u.ndim == 2 and u.shape[0] == num_timesteps:
        return u, False
    if u.ndim != 3 or u.shape[:2] != (batch_size, num_timesteps):
        raise ValueError(
            f"{name}: expected shape ({batch_size}, {num_timesteps}, U) or ({num_timesteps}, U), "
            f"got shape {tuple(u.shape)}"
        )
    return u, True


_PASSED: dict = {}


def once_per_model(model, tag, check) -> None:
    """Run ``check()`` unless this very model object already passed it under ``tag``.

    Models are immutable pytrees of immutable arrays, so a model object that passed a check
    passes it again; a model changed by ``eqx.tree_at`` / ``tree_map`` / ``ps.load`` is a new
    object and is checked anew. This keeps repeated calls on one model (a benchmark loop, an
    online filter) free of the checks' fixed cost. The entry is dropped when the model dies.
    """
    key = (id(model), tag)
    if key in _PASSED:
        return
    check()
    try:
        weakref.finalize(model, _PASSED.pop, key, None)
    except TypeError:  # not weak-referenceable: check every time
        return
    _PASSED[key] = True


def unify_dtypes(model, *arrays):
    """``model`` with every floating-point array leaf cast to the promoted floating dtype of all of
    them and of ``arrays`` (the data), so a model mixing float32 and float64 runs in one dtype (the
    loops of the learners carry the parameters and need one). Returns ``model`` itself when the
    dtypes already agree; traceable."""
    def is_float(a):
        return isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating)

    leaves = [a for a in jax.tree_util.tree_leaves(model) if is_float(a)]
    if not leaves:
        return model
    data = [a for a in arrays if a is not None and is_float(a)]
    dtype = jnp.result_type(*[a.dtype for a in leaves + data])
    if all(a.dtype == dtype for a in leaves):
        return model
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_float(a) else a, model)
