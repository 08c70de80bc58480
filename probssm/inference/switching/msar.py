"""Markov-switching autoregressions (``ps.switching``): Hamilton filter, Kim smoother, Viterbi.

`ps.models.MarkovSwitchingAR` is an HMM on the expanded state z_t = (s_t, ..., s_{t-P});
these functions run `ps.hmm`'s cores (`filter_params`, `smoother_params`, `viterbi_params`)
on its `discrete_params` and report what statsmodels' ``MarkovAutoregression`` reports:
the log-likelihood of y_P..y_{T-1} conditional on the first P observations, with the regime
chain started from its ergodic (stationary) distribution, and marginal regime
probabilities at the T - P steps t = P..T-1. The loop the forward pass runs (Hamilton 1989)::

    xi_{P-1} = stationary law of z                 # pi(s_{t-P}) A[s_{t-P}, .] ... A[., s_t]
    for t in P..T-1:
        pred_t = xi_{t-1} @ A_expanded             # p(z_t | y_{:t-1})
        f_t(z) = N(y_t; m_t(s_t) + sum_i phi_{s_t,i} (y_{t-i} - m_{t-i}(s_{t-i})), sigma^2_{s_t})
        c_t = sum_z pred_t(z) f_t(z);  xi_t = pred_t * f_t / c_t;  log p(y) += log c_t
    filtered_probs[t - P, k] = sum_{z: s_t = k} xi_t(z)

Data: y (T,), (T, 1), a padded batch (B, T, 1) with ``lengths`` (B,), or a list of (T_b,)
arrays; exogenous regressors ``inputs`` (T, X) shared, (B, T, X) or a list. Outputs carry a
leading B axis for a batch and are zero beyond each sequence's length (-1 for regimes).

Missing values: NaN is allowed only at the end of a sequence (padding, a truncated record),
where it is exact (likelihood 1; the probabilities there are predictions). An observed value
after a missing one raises ValueError: its lags would need the missing value integrated out,
which the expanded-state HMM does not do.

Every function checks its arguments on concrete values (ValueError naming the argument) and
runs compiled; all are traceable, so they work inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from probssm.core import checks
from probssm.core.batching import Batch
from probssm.inference import hmm
from probssm.inference.forward_backward import filter_params, smoother_params, viterbi_params
from probssm.core.protocol import AbstractRegimeSwitchingAR

__all__ = ["RegimeFilterResult", "RegimeSmootherResult", "log_likelihood", "filter", "smoother",
           "most_likely_regimes"]


class RegimeFilterResult(NamedTuple):
    """Hamilton filter of a Markov-switching AR (leading B axis for a batch)."""

    log_likelihood: jax.Array  # () log p(y_{P:} | y_{:P})
    filtered_probs: jax.Array  # (T - P, K) p(s_t | y_{:t}), t = P..T-1
    predicted_probs: jax.Array  # (T - P, K) p(s_t | y_{:t-1})


class RegimeSmootherResult(NamedTuple):
    """Kim smoother of a Markov-switching AR (leading B axis for a batch)."""

    log_likelihood: jax.Array  # ()
    filtered_probs: jax.Array  # (T - P, K)
    predicted_probs: jax.Array  # (T - P, K)
    smoothed_probs: jax.Array  # (T - P, K) p(s_t | y), t = P..T-1


def _check(model, emissions, inputs, lengths) -> Batch:
    """Once, outside jit: the model, the data (via `ps.hmm`'s checks) and the regressors."""
    if not isinstance(model, AbstractRegimeSwitchingAR):
        raise ValueError(f"model: expected a regime-switching autoregression (a ps.core.AbstractRegimeSwitchingAR "
                         f"such as ps.models.MarkovSwitchingAR), got {type(model).__name__}")
    X, P = model.num_exog, model.order
    if X == 0 and inputs is not None:
        raise ValueError("inputs: the model has no exogenous regressors (exog_coefs is None); expected None")
    if X and inputs is None:
        raise ValueError(f"inputs: the model has {X} exogenous regressors; expected (T, {X}) or (B, T, {X}), got None")
    batch = hmm.check_arguments(model, emissions, inputs=inputs, lengths=lengths)
    T = batch.num_timesteps
    if T <= P:
        raise ValueError(f"emissions: expected more than P = {P} time steps (the likelihood conditions on the first "
                         f"P observations), got T = {T}")
    if batch.lengths is not None and checks.is_concrete(batch.lengths) and np.any(np.asarray(batch.lengths) <= P):
        raise ValueError(f"lengths: expected lengths > P = {P} (the first P observations are conditioned on), "
                         f"found {int(np.min(np.asarray(batch.lengths)))}")
    if X:
        u = batch.inputs
        if not isinstance(u, jax.Array) or u.shape[-1] != X:
            lead = f"{batch.batch_size}, " if batch.inputs_batched else ""
            raise ValueError(f"inputs: expected shape ({lead}{T}, {X}) (one column per exogenous regressor), got "
                             f"{tuple(u.shape) if isinstance(u, jax.Array) else type(u).__name__}")
        if checks.is_concrete(u) and checks.is_concrete(batch.emissions):
            x = np.asarray(u)
            if np.any(np.isinf(x)):
                raise ValueError("inputs: expected finite exogenous regressors, found inf")
            y = np.asarray(batch.emissions)[..., 0]
            observed = ~np.isnan(y)
            if batch.lengths is not None:
                observed &= np.arange(T) < np.asarray(batch.lengths)[..., None]
            x_missing = np.broadcast_to(np.isnan(x).any(-1), observed.shape)
            if np.any(observed & x_missing):
                raise ValueError("inputs: found NaN at a step whose observation is present; expected finite "
                                 "exogenous regressors wherever y is observed")
    return batch


@partial(jax.jit, static_argnames=("mode", "batched", "inputs_batched"))
def _run(model, ys, inputs, lengths, *, mode, batched, inputs_batched):
    P = model.order

    def one(y, u, n):
        params = model.discrete_params(y, u)
        if mode == "viterbi":
            return model.current_regime(viterbi_params(params, length=n))[P:]
        r = (filter_params if mode == "filter" else smoother_params)(params, length=n)
        filtered = r.filtered_probs
        predicted = jnp.concatenate([params.initial_probs[None], filtered[:-1] @ params.transition_matrices])
        if n is not None:
            predicted = jnp.where((jnp.arange(y.shape[0]) < n)[:, None], predicted, 0.0)
        out = (r.log_likelihood, model.regime_probs(filtered)[P:], model.regime_probs(predicted)[P:])
        if mode == "filter":
            return RegimeFilterResult(*out)
        return RegimeSmootherResult(*out, model.regime_probs(r.smoothed_probs)[P:])

    return Batch(ys, inputs, lengths, batched, inputs_batched).map(one)


def _call(mode, model, emissions, inputs, lengths):
    b = _check(model, emissions, inputs, lengths)
    n = None if b.lengths is None else jnp.asarray(b.lengths, jnp.int32)  # one compilation whatever int type
    return _run(model, b.emissions, b.inputs, n, mode=mode, batched=b.batched, inputs_batched=b.inputs_batched)


def log_likelihood(model, emissions, inputs=None, *, lengths=None) -> jax.Array:
    """log p(y_P, ..., y_{T-1} | y_0, ..., y_{P-1}), regimes started from their ergodic law.

    Args:
        model: a `ps.models.MarkovSwitchingAR` with K regimes and order P.
        emissions: (T,) or (T, 1), a padded batch (B, T, 1) or a list of (T_b,) arrays (T > P);
            NaN only as trailing padding.
        inputs: exogenous regressors (T, X) shared, (B, T, X) or a list; None without.
        lengths: (B,) true lengths of a padded batch (each > P).

    Returns:
        () the log-likelihood, summed over a batch (as `ps.hmm.log_likelihood`); the value
        statsmodels' ``MarkovAutoregression(y, K, P).loglike(params)`` reports.

    Example:
        >>> ps.switching.log_likelihood(ms, y)
        >>> jax.grad(lambda mu: ps.switching.log_likelihood(eqx.tree_at(lambda m: m.means, ms, mu), y))(ms.means)
    """
    # the filter's compiled program (XLA drops the unused probabilities): one compilation for both
    return jnp.sum(_call("filter", model, emissions, inputs, lengths).log_likelihood)


def filter(model, emissions, inputs=None, *, lengths=None) -> RegimeFilterResult:
    """Hamilton filter: log-likelihood and the marginal regime probabilities p(s_t | y_{0:t}).

    Args as `log_likelihood`. Returns a `RegimeFilterResult`: log_likelihood (),
    filtered_probs (T - P, K) and predicted_probs (T - P, K) p(s_t | y_{0:t-1}) at t = P..T-1
    (statsmodels' ``filtered_marginal_probabilities`` and ``predicted_marginal_probabilities``),
    with a leading B axis for a batch.

    Example:
        >>> f = ps.switching.filter(ms, y)
        >>> f.filtered_probs.shape   # (T - P, K)
    """
    return _call("filter", model, emissions, inputs, lengths)


def smoother(model, emissions, inputs=None, *, lengths=None) -> RegimeSmootherResult:
    """Kim smoother (forward-backward on the expanded state): p(s_t | y_{0:T-1}) at t = P..T-1.

    Args as `log_likelihood`. Returns a `RegimeSmootherResult`: the filter's fields and
    smoothed_probs (T - P, K) (statsmodels' ``smoothed_marginal_probabilities``).

    Example:
        >>> r = ps.switching.smoother(ms, y)
        >>> recession = r.smoothed_probs[:, 0]
    """
    return _call("smoother", model, emissions, inputs, lengths)


def most_likely_regimes(model, emissions, inputs=None, *, lengths=None) -> jax.Array:
    """Viterbi: s_P..s_{T-1} of the most likely regime path argmax_s p(s_0, ..., s_{T-1} | y).

    Args as `log_likelihood`. Returns (T - P,) int regimes, (B, T - P) for a batch (-1
    beyond each sequence's length). The first P regimes are part of the maximised path (the
    expanded state at t = P holds them) but are not returned, like the probabilities.
    """
    return _call("viterbi", model, emissions, inputs, lengths)
