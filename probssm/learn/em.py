"""Expectation-maximisation, dispatched on the model's declared exact structure.

`em` picks the learner from what the model declares, never from its concrete class:

* a family that registered its own EM with `register_em` (e.g. the HMM-GLM's
  generalised EM) uses it; the registry is the extension point for user families;
* an `AbstractLinearGaussianSSM` uses Kalman-smoother EM (`probssm.learn.em_lgssm`),
  closed-form where the model declares one, generalised otherwise;
* an `AbstractDiscreteSSM` uses Baum-Welch (`probssm.learn.baum_welch`).
"""
from __future__ import annotations

from typing import Callable

from probssm.core.protocol import AbstractDiscreteSSM, AbstractLinearGaussianSSM

__all__ = ["em", "register_em"]

_REGISTRY: dict = {}


def register_em(model_class: type) -> Callable:
    """Decorator: ``fn(model, emissions, num_iters, **options) -> (model, history)`` becomes the
    EM of ``model_class`` and its subclasses.

    Example:
        >>> @ps.learn.register_em(MyModel)
        ... def fit_my_model(model, emissions, num_iters, **options): ...
    """
    if not isinstance(model_class, type):
        raise ValueError(f"model_class: expected a class, got {model_class!r}")

    def decorate(fn):
        _REGISTRY[model_class] = fn
        return fn

    return decorate


def _registered(model):
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def em(model, emissions, num_iters: int = 100, **kwargs):
    """Fit by EM; returns ``(fitted_model, history)`` with the log-likelihood per iteration.

    Args:
        model: the starting model (not modified).
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays; NaN marks missing values.
        num_iters: EM iterations.
        **kwargs: options of the learner the model's structure selects (``inputs``, ``fixed``,
            ``lengths``, ``progress``, ...).
    """
    fit = _registered(model)
    if fit is not None:
        return fit(model, emissions, num_iters, **kwargs)
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.learn.em_lgssm import em_lgssm

        return em_lgssm(model, emissions, num_iters, **kwargs)
    if isinstance(model, AbstractDiscreteSSM):
        from probssm.learn.baum_welch import baum_welch

        return baum_welch(model, emissions, num_iters, **kwargs)
    raise ValueError(
        f"model: EM needs a declared exact structure (linear-Gaussian or discrete) or a learner registered "
        f"with ps.learn.register_em, got {type(model).__name__}"
    )
