"""Maximum likelihood by gradient-based optimisation (optax) for any model with an
exact log-likelihood, or by particle estimates of the score (`estimator="paris"|"ppg"|"hmc_smc"`).

The learnable arrays are those of the one parameter spec, `probssm.core.params`:
every array field declared with a numpyro constraint, found recursively (emission
families inside an HMM, an equinox network inside a nonlinear model), named by
dotted paths (``fixed=("emissions.covs",)``). The optimiser works on unconstrained
values mapped through ``numpyro``'s ``biject_to``, so covariances stay positive
definite and probabilities stay on the simplex.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from probssm.core import batching, checks, optim, params as P, progress as prog
from probssm.core.protocol import AbstractDiscreteSSM, AbstractLinearGaussianSSM

__all__ = ["mle", "exact_log_likelihood", "learnable_fields", "to_unconstrained", "from_unconstrained"]


def learnable_fields(model, fixed=()) -> dict:
    """``{path: constraint}`` of the free learnable arrays (see `probssm.core.params.spec`)."""
    return P.spec(model, fixed).as_dict()


def to_unconstrained(model, fields: dict) -> dict:
    """Unconstrained values of the arrays named in ``fields`` (``{path: constraint}``)."""
    return P.to_unconstrained(model, P.ParamSpec(tuple(fields), tuple(fields.values())))


def from_unconstrained(model, fields: dict, params: dict):
    """A copy of ``model`` holding the constrained images of ``params``."""
    return P.from_unconstrained(model, P.ParamSpec(tuple(fields), tuple(fields.values())), params)


def exact_log_likelihood(model, emissions, inputs=None, lengths=None, diffuse=None):
    """log p(y) (summed over a batch) from the model's declared exact structure; traceable.

    Args:
        model: an `AbstractLinearGaussianSSM` or `AbstractDiscreteSSM`.
        emissions: (T, D) or (B, T, D), NaN = missing.
        inputs: None, (T, U) shared or (B, T, U).
        lengths: None or (B,) true lengths of padded sequences.
        diffuse: linear-Gaussian only: as in `ps.kalman.log_likelihood` (None: decided from the
            initial covariance, at run time when it is traced; False: no diffuse component).
    """
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.inference import kalman

        return kalman.log_likelihood(model, emissions, inputs=inputs, lengths=lengths, diffuse=diffuse)
    if isinstance(model, AbstractDiscreteSSM):
        from probssm.inference import hmm

        return hmm.log_likelihood(model, emissions, inputs=inputs, lengths=lengths)
    raise ValueError(
        f"model: exact MLE needs a declared exact structure (linear-Gaussian or discrete), got "
        f"{type(model).__name__}; use estimator='paris', 'ppg' or 'hmc_smc' for other models"
    )


@partial(jax.jit, static_argnames=("fixed", "optimizer", "num_iters", "show", "diffuse"))
def _fit(model, ys, inputs, lengths, *, fixed, optimizer, num_iters, show, diffuse=None):
    num_obs = jnp.maximum(jnp.sum(~jnp.isnan(ys)), 1).astype(ys.dtype)
    return optim.maximize(model, lambda m: exact_log_likelihood(m, ys, inputs, lengths, diffuse), num_obs, fixed=fixed,
                    optimizer=optimizer, num_iters=num_iters, show=show)


_DEFAULT_OPTIMIZER = None


def mle(model, emissions, num_iters: int = 200, *, inputs=None, lengths=None, optimizer=None, fixed=(),
        estimator="exact", progress=None, key=None, **kwargs):
    """Maximise the log-likelihood over the model's learnable arrays.

    Args:
        model: starting model (not modified).
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays; NaN marks missing values. For a
            continuous-time model (`probssm.core.AbstractContinuousTimeSSM`), the pair ``(times, states)``
            of panel data or ``(times, emissions)``, fitted on log-rates through ``ps.ctmc`` (extra
            keywords ``exact_states``, ``censored``; see `probssm.learn.em_ctmc.mle_continuous_time`).
        num_iters: optimiser steps.
        inputs: (T, U) shared, (B, T, U) per sequence, or a list.
        lengths: (B,) true lengths of padded sequences (exact engines).
        optimizer: an optax optimiser; default L-BFGS with a zoom line search for exact
            likelihoods. Any ``GradientTransformationExtraArgs`` receives ``value``, ``grad``
            and ``value_fn``.
        fixed: dotted paths of arrays (or sub-modules) to hold fixed, e.g. ``("emissions.covs",)``.
        estimator: "exact" (Kalman / forward-backward likelihood), or "paris" / "ppg" /
            "hmc_smc" (particle estimates of the score; needs ``key``). PaRIS's
            self-normalisation bias grows like T / N and shifts the fitted parameters on long
            sequences; PPG removes it. "hmc_smc" (vector states) moves the particles by HMC
            under likelihood tempering, for observations too informative for bootstrap proposals.
        progress: progress bar (default: when num_iters >= 100).
        key: a `jax.random` key; required by the particle estimators, unused by "exact".

    Returns:
        ``(fitted_model, history)`` with the log-likelihood at each step.

    Example:
        >>> fitted, history = ps.learn.mle(hmm, y, 100, fixed=("emissions.covs",))
    """
    if estimator in ("paris", "ppg", "hmc_smc"):
        from probssm.learn.score import score_mle

        if key is None:
            raise ValueError(f"key: estimator={estimator!r} draws particles; expected a jax.random key, got None")
        return score_mle(model, emissions, num_iters, key=key, estimator=estimator, optimizer=optimizer,
                         fixed=fixed, progress=progress, inputs=inputs, **kwargs)
    if estimator != "exact":
        raise ValueError(f"estimator: expected 'exact', 'paris', 'ppg' or 'hmc_smc', got {estimator!r}")
    from probssm.core.continuous_time import AbstractContinuousTimeSSM

    if isinstance(model, AbstractContinuousTimeSSM):
        # panel records / irregular observation times: the continuous-time likelihoods of ps.ctmc
        from probssm.learn.em_ctmc import mle_continuous_time

        if inputs is not None:
            raise ValueError("inputs: continuous-time models take their observation times in the data pair; expected None")
        unknown = sorted(set(kwargs) - {"exact_states", "censored"})
        if unknown:
            raise ValueError(f"unexpected arguments for a continuous-time model: {unknown}")
        return mle_continuous_time(model, emissions, num_iters, lengths=lengths, optimizer=optimizer, fixed=fixed,
                                   progress=progress, **kwargs)
    if kwargs:
        raise ValueError(f"unexpected arguments for estimator='exact': {sorted(kwargs)}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    if not isinstance(model, (AbstractLinearGaussianSSM, AbstractDiscreteSSM)):
        exact_log_likelihood(model, None)  # raises the ValueError that names the model
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    if not P.spec(model, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    batch = _checked_batch(model, emissions, inputs, lengths)
    diffuse = None
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.inference import kalman

        # decided here, on the concrete model, so that one form of the filter is compiled
        diffuse = kalman.initial_form(model, batch.emissions, batch.inputs, batch.lengths)
        if diffuse and "initial_cov" in P.spec(model, fixed).paths:
            raise ValueError("fixed: initial_cov holds inf (a diffuse, flat prior) and cannot be learned; "
                             "expected 'initial_cov' in fixed")
    model = checks.unify_dtypes(model, batch.emissions)  # one dtype for the optimiser's state
    global _DEFAULT_OPTIMIZER
    if optimizer is None:
        if _DEFAULT_OPTIMIZER is None:  # one instance, so repeated fits reuse the compiled loop
            _DEFAULT_OPTIMIZER = optax.lbfgs()
        optimizer = _DEFAULT_OPTIMIZER
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "MLE", show):
        return _fit(model, batch.emissions, batch.inputs, batch.lengths, fixed=fixed, optimizer=optimizer,
                    num_iters=num_iters, show=show, diffuse=diffuse)


def _checked_batch(model, emissions, inputs, lengths) -> batching.Batch:
    """Checks once, outside jit, by the engine the model's structure selects."""
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.inference import kalman as engine
    else:
        from probssm.inference import hmm as engine
    return engine.check_arguments(model, emissions, inputs=inputs, lengths=lengths)
