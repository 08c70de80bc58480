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
import json
import os

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


def _decode(spec, arrays):
    if isinstance(spec, dict) and "__opaque__" in spec:
        raise ValueError(
            f"like: the saved model held a {spec['__opaque__']} (a function, say), which is not stored; "
            f"pass like= a model of the same structure")
    if isinstance(spec, dict) and "__array__" in spec:
        return jnp.asarray(arrays[spec["__array__"]])
    if isinstance(spec, dict) and "__tuple__" in spec:
        return tuple(_decode(v, arrays) for v in spec["__tuple__"])
    if isinstance(spec, dict) and "__module__" in spec:
        module_name, qualname = spec["__module__"].split(":")
        if not (module_name == "probssm" or module_name.startswith("probssm.")):
            raise ValueError(f"path: refusing to rebuild class {spec['__module__']} from outside probssm; use like=")
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        obj = object.__new__(cls)
        for name, value in spec["fields"].items():
            object.__setattr__(obj, name, _decode(value, arrays))
        return obj
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
    """Read a model written by `save`. With ``like``, its arrays are replaced in order."""
    npz_path, json_path = _paths(path)
    with open(json_path) as fh:
        header = json.load(fh)
    if header.get("format") != FORMAT:
        raise ValueError(f"path: {json_path} is not a probssm model file (format {header.get('format')!r})")
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if like is None:
        return _decode(header["model"], arrays)
    keys = _array_keys(like)
    leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=lambda x: x is None)
    if len(keys) != len(leaves):
        raise ValueError("like: its structure does not match the saved model")
    values = [jnp.asarray(arrays[k]) if k is not None else v for k, v in zip(keys, leaves)]
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
