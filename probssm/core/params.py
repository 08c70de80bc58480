"""One description of a model's learnable arrays, shared by every learner.

A model is a pytree of `equinox.Module`s. Its learnable arrays are found by a
recursive walk and named by dotted paths (``"emissions.covs"``,
``"transition_fn.layers.0.weight"``):

* a field declared with ``eqx.field(metadata={"constraint": c})`` holding an
  array is a learnable array with support ``c`` (a numpyro constraint);
* a field holding a `Module` (or a tuple / list of them) is walked into;
* a module none of whose fields declares a constraint (an ``eqx.nn.MLP``, a user's
  own network) contributes every floating-point array it holds, as real-valued.

``fixed`` takes paths; a path names one array or a whole sub-module
(``fixed=("emissions",)`` holds every emission parameter). Learners optimise the
unconstrained values ``biject_to(c).inv(x)`` and map back with ``biject_to(c)``, so
covariances stay positive definite and probabilities on the simplex.

    spec = ps.core.params.spec(model, fixed=("emissions.covs",))
    free = ps.core.params.to_unconstrained(model, spec)   # {path: array}
    model = ps.core.params.from_unconstrained(model, spec, free)
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

__all__ = ["ParamSpec", "spec", "get", "to_unconstrained", "from_unconstrained", "replace", "paths", "declared", "check_support"]


class ParamSpec(NamedTuple):
    """Learnable arrays of a model: dotted paths and their numpyro constraints (same order)."""

    paths: tuple
    constraints: tuple

    def as_dict(self) -> dict:
        return dict(zip(self.paths, self.constraints))


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(x.dtype, jnp.inexact)


def _declares(module) -> bool:
    return any("constraint" in f.metadata for f in dataclasses.fields(module))


def _children(value, prefix):
    if isinstance(value, eqx.Module):
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _children(v, f"{prefix}.{i}")


def _leaf_fields(module, prefix=""):
    """(path, constraint or None, value, declared) of every non-static field of ``module`` and of the
    modules it holds, except fields that hold modules (they are walked into)."""
    declared = _declares(module)
    for f in dataclasses.fields(module):
        if f.metadata.get("static", False):
            continue
        value = getattr(module, f.name, None)
        path = f"{prefix}{f.name}"
        if isinstance(value, (eqx.Module, tuple, list)):
            for sub_path, sub in _children(value, path):
                yield from _leaf_fields(sub, sub_path + ".")
        else:
            yield path, f.metadata.get("constraint"), value, declared


def _walk(module, prefix, out):
    for path, constraint, value, declared in _leaf_fields(module, prefix):
        if _is_float_array(value) and (constraint is not None or not declared):
            out.append((path, constraint if constraint is not None else constraints.real))


def declared(model) -> list:
    """``(path, constraint, value)`` of every field that declares a constraint, whatever its
    value holds (an array, or a Python number put there by ``eqx.tree_at``): what a check of a
    model's parameter values reads."""
    return [(path, c, value) for path, c, value, _ in _leaf_fields(model) if c is not None and value is not None]


def check_support(module, name: str = "model") -> None:
    """Raise ValueError naming the first declared scalar or elementwise parameter of ``module`` (a
    model, a likelihood, any equinox module) outside its support, e.g. ``model.sigma: expected
    values in Positive, got -1.0``. Real-valued fields and matrix constraints (PSD, simplex rows)
    are left to each structure's own checks, except that a finite ``positive_definite`` field must
    be symmetric without a negative eigenvalue (semi-definite passes: a structure may hold an
    exactly singular covariance; infinite entries, a diffuse prior, are the structure's to check).
    Concrete values only (traced ones are skipped)."""
    from probssm.core import checks

    for path, c, value in declared(module):
        if c is constraints.positive_definite:
            # an infinite entry is a diffuse prior (exact diffuse Kalman): left to the structure
            if checks.is_concrete(value) and np.ndim(value) >= 2 and np.all(np.isfinite(np.asarray(value))):
                checks.psd(value, f"{name}.{path}", strict=False)
            continue
        if c is constraints.real or getattr(c, "event_dim", 0) != 0 or not checks.is_concrete(value):
            continue
        a = np.asarray(value)
        if not np.issubdtype(a.dtype, np.number):
            continue
        ok = np.asarray(c.check(a)) & np.isfinite(a)
        if not np.all(ok):
            bad = a[~ok] if a.ndim else a
            raise ValueError(f"{name}.{path}: expected values in {type(c).__name__.lstrip('_')}, "
                             f"got {np.ravel(bad)[0]}")


def paths(model) -> dict:
    """Every learnable array of ``model``: ``{path: constraint}`` in a fixed order."""
    if not isinstance(model, eqx.Module):
        raise ValueError(f"model: expected an equinox Module, got {type(model).__name__}")
    out: list = []
    _walk(model, "", out)
    return dict(out)


def spec(model, fixed: Iterable[str] = ()) -> ParamSpec:
    """The free learnable arrays of ``model`` (all of `paths` except those under ``fixed``).

    Raises:
        ValueError: ``fixed`` names a path that is neither a learnable array nor a prefix of one.
    """
    if isinstance(fixed, str):
        fixed = (fixed,)
    fixed = tuple(fixed)
    every = paths(model)
    for f in fixed:
        if not isinstance(f, str):
            raise ValueError(f"fixed: expected dotted path strings such as 'emissions.covs', got {f!r}")
        if not any(p == f or p.startswith(f + ".") for p in every):
            raise ValueError(f"fixed: {f!r} is not a learnable path of {type(model).__name__}; "
                             f"expected one of {sorted(every)} (or a prefix of one)")
    free = [(p, c) for p, c in every.items() if not any(p == f or p.startswith(f + ".") for f in fixed)]
    return ParamSpec(tuple(p for p, _ in free), tuple(c for _, c in free))


def get(model, path: str):
    """The node of ``model`` at a dotted path."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (tuple, list)) else getattr(node, part)
    return node


def replace(model, paths_: tuple, values: tuple):
    """A copy of ``model`` with the arrays at ``paths_`` replaced by ``values`` (traceable)."""
    if not paths_:
        return model
    return eqx.tree_at(lambda m: tuple(get(m, p) for p in paths_), model, tuple(values))


def to_unconstrained(model, spec_: ParamSpec) -> dict:
    """``{path: unconstrained array}`` for the free arrays of ``spec_``."""
    return {p: biject_to(c).inv(get(model, p)) for p, c in zip(spec_.paths, spec_.constraints)}


def from_unconstrained(model, spec_: ParamSpec, params: dict):
    """A copy of ``model`` holding the constrained images of ``params``."""
    values = tuple(biject_to(c)(params[p]).astype(get(model, p).dtype)
                   for p, c in zip(spec_.paths, spec_.constraints))
    return replace(model, spec_.paths, values)
