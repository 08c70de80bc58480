"""Deprecated keyword names kept working while they are phased out."""
from __future__ import annotations

import functools
import warnings

__all__ = ["renamed"]


def renamed(**old_to_new):
    """Decorator: accept ``old=`` for a renamed keyword ``new=`` with a DeprecationWarning.

    Example:
        >>> @renamed(observations="emissions")
        ... def filter(model, emissions): ...
    """
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}: got both {new}= and its deprecated name {old}=")
                    warnings.warn(f"{fn.__name__}: {old}= is deprecated, use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap
