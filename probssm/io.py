"""Save and load models as arrays (.npz) plus a JSON header; never pickle.

    ps.save("fit", model)        # writes fit.npz and fit.json
    model = ps.load("fit")

The JSON header records each module's class and, field by field, either a plain
value (number, string, bool, None), a nested module, a tuple, or the key of an
array in the .npz. Only classes from the probssm package are rebuilt from the
header; for a model holding user functions (e.g. `NonlinearGaussianSSM`), pass
``like=`` a model of the same structure and only its arrays are replaced.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import warnings
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "probssm-model-v1"


def _paths(path):
    base = os.fspath(path)
    for ext in (".npz", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base + ".npz", base + ".json"


def _encode(obj, key, arrays):
    if isinstance(obj, eqx.Module):
        cls = type(obj)
        return {"__module__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(obj, f.name), f"{key}{f.name}/", arrays)
                           for f in dataclasses.fields(obj)}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        name = key.rstrip("/") or "value"
        arrays[name] = np.asarray(obj)
        return {"__array__": name}
    if isinstance(obj, (tuple, list)):
        return {"__tuple__": [_encode(v, f"{key}{i}/", arrays) for i, v in enumerate(obj)]}
    # A function or other object: not data. Record what it was; `load` then needs `like=`.
    return {"__opaque__": type(obj).__name__}


def _where(key: str) -> str:
    return key.rstrip("/") or "model"


def _array_dtype_ok(a) -> bool:
    return a.dtype.kind in "biuf"  # bool, integers, floats; never complex, object, strings


def _resolve_class(spec, key):
    ref = spec.get("__module__")
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ValueError(f"{_where(key)}: malformed class reference {ref!r} (expected 'module:Class')")
    module_name, qualname = ref.split(":")
    if not (module_name == "probssm" or module_name.startswith("probssm.")):
        raise ValueError(f"{_where(key)}: refusing to rebuild class {ref} from outside probssm; use like=")
    try:
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        raise ValueError(f"{_where(key)}: unknown probssm class {ref}") from None
    if not (isinstance(cls, type) and issubclass(cls, eqx.Module)):
        raise ValueError(f"{_where(key)}: {ref} is not a probssm model class")
    if inspect.isabstract(cls):
        raise ValueError(f"{_where(key)}: {ref} is an abstract class and cannot be loaded")
    return cls


def _check_fields(cls, spec, key):
    stored = spec.get("fields")
    if not isinstance(stored, dict):
        raise ValueError(f"{_where(key)}: malformed entry (no field table) for class {cls.__qualname__}")
    expected = [f.name for f in dataclasses.fields(cls)]
    unknown = [n for n in stored if n not in expected]
    missing = [n for n in expected if n not in stored]
    if unknown:
        raise ValueError(f"{key}{unknown[0]}: {cls.__qualname__} has no field {unknown[0]!r}; "
                         f"expected the fields {expected}")
    if missing:
        raise ValueError(f"{key}{missing[0]}: missing field of {cls.__qualname__} (expected the fields {expected})")
    return stored


def _rebuilt(cls, values: dict, key: str):
    """``cls(**values)`` when the constructor takes exactly the fields (then it re-runs the
    class's own checks); None when the constructor reads other arguments."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    params = [p for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = {p.name for p in params}
    required = {p.name for p in params if p.default is p.empty}
    if not (set(values) <= names and required <= set(values)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**values)
    except ValueError as e:
        raise ValueError(f"{key}{e}") from None
    except Exception as e:  # a constructor failing on tampered data in another way
        raise ValueError(f"{_where(key)}: the stored fields do not make a valid {cls.__qualname__} "
                         f"({type(e).__name__}: {e})") from None


def _compare(rebuilt, obj, key):
    """Every array of ``obj`` has the shape and dtype kind its class's constructor gives it."""
    got, got_def = jax.tree_util.tree_flatten_with_path(obj)
    want, want_def = jax.tree_util.tree_flatten_with_path(rebuilt)
    if got_def != want_def:
        raise ValueError(f"{_where(key)}: the stored fields do not have the structure of a "
                         f"{type(rebuilt).__qualname__}")
    for (path, a), (_, b) in zip(got, want):
        if not (isinstance(a, _ARRAY) and isinstance(b, _ARRAY)):
            continue
        name = key + jax.tree_util.keystr(path).lstrip(".").replace(".", "/").replace("[", "/").replace("]", "")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{name}: expected shape {tuple(b.shape)} for this {type(rebuilt).__qualname__}, "
                             f"got shape {tuple(a.shape)}")
        if np.dtype(a.dtype).kind != np.dtype(b.dtype).kind:
            raise ValueError(f"{name}: expected dtype {b.dtype} ({_KINDS[np.dtype(b.dtype).kind]}), got "
                             f"dtype {a.dtype}")


_ARRAY = (jax.Array, np.ndarray, np.generic)
_KINDS = {"b": "boolean", "i": "integer", "u": "unsigned integer", "f": "floating point", "c": "complex"}


def _decode(spec, arrays, key=""):
    if isinstance(spec, dict) and "__opaque__" in spec:
        raise ValueError(
            f"like: the saved model held a {spec['__opaque__']} (a function, say) at {_where(key)}, which is not "
            f"stored; pass like= a model of the same structure")
    if isinstance(spec, dict) and "__array__" in spec:
        name = spec["__array__"]
        if not isinstance(name, str) or name not in arrays:
            raise ValueError(f"{_where(key)}: its array {name!r} is missing from the .npz file")
        a = arrays[name]
        if not _array_dtype_ok(a):
            raise ValueError(f"{_where(key)}: expected a real array (bool, integer or float), got dtype {a.dtype}")
        return jnp.asarray(a)
    if isinstance(spec, dict) and "__tuple__" in spec:
        return tuple(_decode(v, arrays, f"{key}{i}/") for i, v in enumerate(spec["__tuple__"]))
    if isinstance(spec, dict) and "__module__" in spec:
        cls = _resolve_class(spec, key)
        stored = _check_fields(cls, spec, key)
        values = {name: _decode(value, arrays, f"{key}{name}/") for name, value in stored.items()}
        obj = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(obj, name, value)
        rebuilt = _rebuilt(cls, values, key)
        if rebuilt is not None:
            _compare(rebuilt, obj, key)
        return obj
    if isinstance(spec, dict) or (isinstance(spec, list)):
        raise ValueError(f"{_where(key)}: malformed entry {str(spec)[:80]}")
    return spec


def save(path, model) -> None:
    """Write ``model`` to ``path.npz`` (arrays) and ``path.json`` (structure)."""
    if not isinstance(model, eqx.Module):
        raise ValueError(f"model: expected an equinox Module, got {type(model).__name__}")
    arrays: dict = {}
    header = {"format": FORMAT, "model": _encode(model, "", arrays)}
    npz_path, json_path = _paths(path)
    np.savez(npz_path, **arrays)
    with open(json_path, "w") as fh:
        json.dump(header, fh, indent=1)


def load(path, like=None):
    """Read a model written by `save`. With ``like``, its arrays are replaced in order.

    The file is checked before anything is built: the format version, the class (a concrete
    probssm class), its field names, and every array's dtype (real: bool, integer or float) and
    shape. Where the class's constructor takes exactly its fields, the model is rebuilt through
    it, so the class's own checks run (shapes, finite values, PSD covariances, simplex rows),
    and every stored array must have the shape and dtype kind the constructor gives it. With
    ``like``, every array must match the shape and dtype kind of ``like``'s leaf. A corrupted
    or tampered file raises ``ValueError`` naming the field (e.g. ``emissions/covs: ...``).
    """
    npz_path, json_path = _paths(path)
    try:
        with open(json_path) as fh:
            header = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"path: {json_path} is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"path: {json_path} is not a probssm model file (no header object)")
    fmt = header.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("probssm-model-v"):
            raise ValueError(f"format: {json_path} has format version {fmt!r}; this probssm reads {FORMAT!r}")
        raise ValueError(f"path: {json_path} is not a probssm model file (format {fmt!r}, expected {FORMAT!r})")
    if "model" not in header:
        raise ValueError(f"model: {json_path} holds no model entry")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"path: {npz_path} is not a readable .npz array file (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from None
    if like is None:
        return _decode(header["model"], arrays)
    keys = _array_keys(like)
    leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=lambda x: x is None)
    if len(keys) != len(leaves):
        raise ValueError("like: its structure does not match the saved model")
    values = []
    for k, v in zip(keys, leaves):
        if k is None:
            values.append(v)
            continue
        if k not in arrays:
            raise ValueError(f"{k}: missing from {npz_path} (like= does not match the saved model)")
        a = arrays[k]
        if not _array_dtype_ok(a):
            raise ValueError(f"{k}: expected a real array (bool, integer or float), got dtype {a.dtype}")
        if isinstance(v, _ARRAY) and tuple(a.shape) != tuple(np.shape(v)):
            raise ValueError(f"{k}: expected shape {tuple(np.shape(v))} (as in like=), got shape {tuple(a.shape)}")
        if isinstance(v, _ARRAY) and np.dtype(a.dtype).kind != np.dtype(v.dtype).kind:
            raise ValueError(f"{k}: expected dtype {v.dtype} (as in like=), got dtype {a.dtype}")
        values.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, values)


def _array_keys(like):
    """Array keys of ``like``'s leaves in flattening order (None for non-array leaves)."""
    keys = []

    def visit(obj, key):
        if isinstance(obj, eqx.Module):
            for f in dataclasses.fields(obj):
                if not f.metadata.get("static", False):
                    visit(getattr(obj, f.name), f"{key}{f.name}/")
        elif isinstance(obj, (jax.Array, np.ndarray, np.generic)):
            keys.append(key.rstrip("/") or "value")
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                visit(v, f"{key}{i}/")
        elif obj is None:
            keys.append(None)
        else:
            keys.append(None)

    visit(like, "")
    return keys
