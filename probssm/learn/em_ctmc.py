"""EM for the rates of a Markov jump process from panel data (registered with `ps.learn.em`).

    fitted, history = ps.learn.em(proc, (times, states), num_iters, lengths=None, exact_states=(),
                                  censored=None, prior=None)

The complete-data log-likelihood of a path is ``sum_{i != j} N_ij log f_ij - sum_i T_i q_i``
(N_ij jumps i -> j, T_i time spent in i, q_i = sum_j f_ij), so the M-step is
``f_ij = E[N_ij] / E[T_i]``, or with a Gamma(a, b) prior on each free rate the MAP
``f_ij = (E[N_ij] + a - 1) / (E[T_i] + b)``. Structural zeros are never touched.

E-step. The panel likelihood is multilinear in the interval transition matrices P_u = P(dt_u), so
``W_u = d log L / d P_u`` (reverse-mode autodiff through the forward recursion) holds
``W_u[i, j] = sum over intervals of length dt_u of p(z_start = i, z_end = j | data) / P_u[i, j]``.
The expected dwell times and jumps on those intervals follow from one Van Loan block
exponential per distinct dt (Hobolth & Jensen 2005):

    I_u = [expm([[Q^T, W_u], [0, Q^T]] dt_u)]_{upper right} = int_0^dt exp(Q^T s) W_u exp(Q^T (dt - s)) ds
    E[T_i] = sum_u I_u[i, i],     E[N_ij] = Q_ij sum_u I_u[i, j]  (+ the exact-death jumps)

A jump into an exact absorbing state at a known time enters the recursion through the jump rates
R = Q off-diagonal; ``R_ij d log L / d R_ij`` counts those jumps. The whole fit is one compiled
``lax.scan`` over iterations; ``history`` holds the (penalised) log-likelihood of each iterate
before its update, so it never decreases.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import optax

from probssm.core import checks, optim, params as P, progress as prog
from probssm.core.continuous_time import AbstractContinuousTimeSSM, expm
from probssm.core.protocol import DiscreteParams
from probssm.inference.ctmc import Panel, exact_state_labels, expm_batch, prepare_hmm, run_hmm, panel_forward, panel_parts, \
    panel_transitions, prepare_panel
from probssm.inference.forward_backward import filter_params
from probssm.learn.em import register_em
from probssm.models.emissions.base import GammaPrior
from probssm.models.mjp import ContinuousTimeHMM, MarkovJumpProcess

__all__ = ["em_mjp", "em_ct_hmm", "MJPStatistics", "mjp_expected_statistics", "RateStandardErrors", "mjp_standard_errors"]


class MJPStatistics(NamedTuple):
    """Posterior expectations of the complete-data sufficient statistics of a panel."""

    log_likelihood: jax.Array  # ()
    jumps: jax.Array  # (K, K) E[N_ij]
    dwell: jax.Array  # (K,) E[T_i]


def _van_loan(QT, W, dt):
    K = QT.shape[0]
    # I is linear in W: scale W to unit size so the block exponential's scaling-and-squaring is not
    # driven by the size of the counts
    s = jnp.max(jnp.abs(W))
    s = jnp.where(s > 0, s, 1.0)
    top = jnp.concatenate([QT, W / s], axis=1)
    bottom = jnp.concatenate([jnp.zeros_like(QT), QT], axis=1)
    return expm(jnp.concatenate([top, bottom], axis=0) * dt)[:K, K:] * s


def _statistics(proc: MarkovJumpProcess, panel: Panel) -> MJPStatistics:
    Q = proc.generator()
    Ps = expm_batch(Q, panel.dt_values)
    R = panel_parts(Q)
    ll, (gP, gR) = jax.value_and_grad(
        lambda Ps, R: jnp.sum(panel_forward(proc.initial_distribution(), Ps, R, panel)), argnums=(0, 1))(Ps, R)
    Is = jax.vmap(_van_loan, in_axes=(None, 0, 0))(Q.T, gP, panel.dt_values)
    Isum = jnp.sum(Is, axis=0)
    jumps = panel_parts(Q * Isum + R * gR)
    return MJPStatistics(ll, jumps, jnp.diag(Isum))


def mjp_expected_statistics(proc, times, states, *, lengths=None, exact_states=(), censored=None) -> MJPStatistics:
    """E[N_ij], E[T_i] and log L of panel data under ``proc`` (the EM E-step), jitted.

    Arguments as `ps.ctmc.panel_log_likelihood`. Returns `MJPStatistics`.
    """
    panel = prepare_panel(proc, times, states, lengths, exact_states, censored)
    return _statistics_jit(proc, panel)


_statistics_jit = eqx.filter_jit(_statistics)


def _prior_arrays(proc, prior, dtype):
    n = len(proc.rows)
    if prior is None:
        return jnp.ones((n,), dtype), jnp.zeros((n,), dtype)
    if not isinstance(prior, GammaPrior):
        raise ValueError(f"prior: expected ps.emissions.GammaPrior(concentration, rate), got {type(prior).__name__}")
    rows, cols = np.asarray(proc.rows, int), np.asarray(proc.cols, int)

    def per_rate(v, name):
        a = np.asarray(v, np.float64)
        if a.ndim == 2:
            if a.shape != (proc.num_states,) * 2:
                raise ValueError(f"prior: {name} expected a scalar or a ({proc.num_states}, {proc.num_states}) "
                                 f"matrix, got shape {a.shape}")
            a = a[rows, cols]
        return np.broadcast_to(a, (n,))

    a = per_rate(prior.concentration, "concentration")
    b = per_rate(prior.rate, "rate")
    if np.any(a < 1) or np.any(b < 0) or not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        raise ValueError("prior: expected concentration >= 1 and rate >= 0 (finite), so the MAP exists in closed form")
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


@partial(jax.jit, static_argnames=("num_iters",))
def _fit(proc, panel, a, b, *, num_iters):
    rows, cols = np.asarray(proc.rows, int), np.asarray(proc.cols, int)

    def step(rates, _):
        model = eqx.tree_at(lambda m: m.rates, proc, rates)
        st = _statistics(model, panel)
        log_prior = jnp.sum(jnp.where(a == 1.0, 0.0, (a - 1.0) * jnp.log(rates)) - b * rates)
        N = st.jumps[rows, cols]
        T = st.dwell[rows]
        denom = T + b
        new = jnp.where(denom > 0, (N + a - 1.0) / jnp.where(denom > 0, denom, 1.0), rates)
        return new, st.log_likelihood + log_prior

    rates, history = lax.scan(step, proc.rates, None, length=num_iters)
    return eqx.tree_at(lambda m: m.rates, proc, rates), history


@register_em(MarkovJumpProcess)
def em_mjp(proc, data, num_iters: int = 100, *, lengths=None, exact_states=(), censored=None,
           prior: Optional[GammaPrior] = None):
    """EM (MAP with ``prior``) for the free rates of a Markov jump process from panel data.

    Args:
        proc: the starting `ps.models.MarkovJumpProcess` (not modified); its structure fixes which
            rates are free; ``initial_probs`` is kept (the first record of each subject is conditioned on).
        data: ``(times, states)`` as in `ps.ctmc.panel_log_likelihood`.
        num_iters: EM iterations (one compiled scan).
        lengths, exact_states, censored: as in `ps.ctmc.panel_log_likelihood`.
        prior: `ps.emissions.GammaPrior(concentration, rate)` (scalars or (K, K) matrices) on every
            free rate: MAP ``(E[N_ij] + a - 1) / (E[T_i] + b)``.

    Returns:
        ``(fitted, history)``: history (num_iters,) is the (penalised) log-likelihood of each iterate
        before its update (non-decreasing).

    Example:
        >>> fitted, hist = ps.learn.em(proc, (times, states), 200, exact_states=(3,))
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("emissions: expected the panel data as a pair (times, states) (covariates: fit their "
                         "effects with ps.learn.mle(proc, (times, states, covariates)))")
    times, states = data
    panel = prepare_panel(proc, times, states, lengths, exact_states, censored)
    a, b = _prior_arrays(proc, prior, proc.rates.dtype)
    return _fit(proc, panel, a, b, num_iters=num_iters)


class RateStandardErrors(NamedTuple):
    """Asymptotic standard errors of the free rates from the observed information."""

    rates: jax.Array  # (n,) the free rates (the estimate)
    standard_errors: jax.Array  # (n,) sqrt(diag(covariance))
    covariance: jax.Array  # (n, n) inverse of minus the Hessian of log L in the rates
    generator_standard_errors: jax.Array  # (K, K) the standard errors placed at the free entries, 0 elsewhere


@jax.jit
def _hessian(proc, panel):
    def ll(rates):
        model = eqx.tree_at(lambda m: m.rates, proc, rates)
        Q = model.generator()
        return jnp.sum(panel_forward(model.initial_distribution(), expm_batch(Q, panel.dt_values), panel_parts(Q),
                                     panel))

    return jax.hessian(ll)(proc.rates)


def mjp_standard_errors(proc, data, *, lengths=None, exact_states=(), censored=None) -> RateStandardErrors:
    """Standard errors of the free rates of a fitted `MarkovJumpProcess` (e.g. from `ps.learn.em`):
    the inverse of the observed information ``-d^2 log L / d f d f^T`` (exact Hessian by autodiff through
    the panel likelihood). Arguments as `em_mjp`; ``proc`` should be at the maximum-likelihood estimate.
    For log-rates (the scale msm reports confidence intervals on) the delta method gives se / rate.

    Raises:
        ValueError: the observed information is not positive definite (not at a maximum, or a rate is
            not identified by the data).
    """
    times, states = data
    panel = prepare_panel(proc, times, states, lengths, exact_states, censored)
    info = -np.asarray(_hessian(proc, panel))
    eig = np.linalg.eigvalsh(0.5 * (info + info.T))
    if not np.all(eig > 0):
        raise ValueError(f"proc: the observed information is not positive definite (smallest eigenvalue {eig.min():.3g}); "
                         "expected a model at the maximum-likelihood estimate with identified rates")
    cov = np.linalg.inv(info)
    se = np.sqrt(np.diag(cov))
    G = np.zeros((proc.num_states, proc.num_states))
    G[np.asarray(proc.rows, int), np.asarray(proc.cols, int)] = se
    dtype = proc.rates.dtype
    return RateStandardErrors(proc.rates, jnp.asarray(se, dtype), jnp.asarray(cov, dtype), jnp.asarray(G, dtype))


# ----------------------------------------------------------------------------------------------
# Continuous-time HMMs: rates, initial probabilities and the emission family (e.g. misclassification)
# ----------------------------------------------------------------------------------------------
class _Sequences(NamedTuple):
    emissions: jax.Array  # (B, T, D)
    dt_values: jax.Array  # (U,)
    index: jax.Array  # (B, T): dt_values entry of step t (entry 0 unused)
    lengths: jax.Array  # (B,)


def _prepare_sequences(model, times, emissions, lengths) -> _Sequences:
    y, t, n, batched = prepare_hmm(model, times, emissions, lengths)
    if not batched:
        y, t, n = y[None], t[None], (None if n is None else jnp.reshape(n, (1,)))
    B, T = t.shape
    n = jnp.full((B,), T, jnp.int32) if n is None else jnp.asarray(n, jnp.int32)
    if not (checks.is_concrete(t) and checks.is_concrete(n)):
        raise ValueError("times: EM reads the observation times on the host; expected concrete arrays")
    tt, nn = np.asarray(t, np.float64), np.asarray(n)
    valid = np.arange(T)[None, :] < nn[:, None]
    d = np.where(valid, np.diff(tt, axis=1, prepend=tt[:, :1]), 0.0)
    values, inverse = np.unique(d.ravel(), return_inverse=True)
    dtype = model.generator().dtype
    return _Sequences(y, jnp.asarray(values, dtype), jnp.asarray(inverse.reshape(B, T), jnp.int32), n)


def _ct_hmm_step(model, seqs, a, b, fixed):
    proc = model.process
    Q = proc.generator()
    Ps = expm_batch(Q, seqs.dt_values)
    lls = jax.vmap(model.emissions.log_likelihoods)(seqs.emissions)  # (B, T, K)

    def total(Ps, lls):
        def one(index, ll, n):
            return filter_params(DiscreteParams(proc.initial_probs, Ps[index], ll), length=n).log_likelihood

        return jnp.sum(jax.vmap(one)(seqs.index, lls, seqs.lengths))

    # log L is multilinear in the P_u and in exp(lls): its gradients are the E-step's weights
    # (sum of p(z_{t-1} = i, z_t = j | y) / P_u[i, j], and the smoothed probabilities)
    ll, (gP, gamma) = jax.value_and_grad(total, argnums=(0, 1))(Ps, lls)
    rows, cols = np.asarray(proc.rows, int), np.asarray(proc.cols, int)
    log_prior = jnp.sum(jnp.where(a == 1.0, 0.0, (a - 1.0) * jnp.log(proc.rates)) - b * proc.rates)
    new = model
    if "rates" not in fixed and rows.size:
        Isum = jnp.sum(jax.vmap(_van_loan, in_axes=(None, 0, 0))(Q.T, gP, seqs.dt_values), axis=0)
        N = (Q * Isum)[rows, cols]
        T = jnp.diag(Isum)[rows]
        denom = T + b
        rates = jnp.where(denom > 0, (N + a - 1.0) / jnp.where(denom > 0, denom, 1.0), proc.rates)
        new = eqx.tree_at(lambda m: m.process.rates, new, rates)
    if "initial_probs" not in fixed:
        g0 = jnp.sum(gamma[:, 0], axis=0)
        new = eqx.tree_at(lambda m: m.process.initial_probs, new, g0 / jnp.sum(g0))
    if "emissions" not in fixed:
        D = seqs.emissions.shape[-1]
        ys = seqs.emissions.reshape(-1, D)
        w = gamma.reshape(-1, gamma.shape[-1])
        new = eqx.tree_at(lambda m: m.emissions, new, model.emissions.m_step(ys, w))
    return new, ll + log_prior


@partial(jax.jit, static_argnames=("num_iters", "fixed"))
def _fit_ct_hmm(model, seqs, a, b, *, num_iters, fixed):
    def step(m, _):
        return _ct_hmm_step(m, seqs, a, b, fixed)

    return lax.scan(step, model, None, length=num_iters)


@register_em(ContinuousTimeHMM)
def em_ct_hmm(model, data, num_iters: int = 100, *, lengths=None, prior: Optional[GammaPrior] = None, fixed=()):
    """EM for a continuous-time HMM at irregular observation times: the rates (Van Loan expectations,
    ``f_ij = E[N_ij] / E[T_i]``, Gamma MAP with ``prior``), the initial probabilities (the mean smoothed
    first state) and the emission family by its own weighted ``m_step`` (a misclassification matrix:
    expected label counts per state, normalised; structural zeros stay zero).

    Args:
        model: the starting `ps.models.ContinuousTimeHMM` (not modified).
        data: ``(times, emissions)`` as in `ps.ctmc.filter` ((T,), (B, T) or lists; NaN = missing).
        num_iters: EM iterations (one compiled scan).
        lengths: (B,) real lengths of padded sequences.
        prior: `ps.emissions.GammaPrior` on every free rate.
        fixed: any of ``"rates"``, ``"initial_probs"``, ``"emissions"`` to hold.

    Returns:
        ``(fitted, history)``: the (penalised) log-likelihood of each iterate before its update.
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    for f in fixed:
        if f not in ("rates", "initial_probs", "emissions"):
            raise ValueError(f"fixed: expected names among 'rates', 'initial_probs', 'emissions', got {f!r}")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("emissions: expected the data as a pair (times, emissions)")
    seqs = _prepare_sequences(model, data[0], data[1], lengths)
    a, b = _prior_arrays(model.process, prior, model.process.rates.dtype)
    return _fit_ct_hmm(model, seqs, a, b, num_iters=num_iters, fixed=tuple(sorted(fixed)))


# ----------------------------------------------------------------------------------------------
# Gradient MLE (the branch of ps.learn.mle for continuous-time models)
# ----------------------------------------------------------------------------------------------
def _panel_total(model, panel):
    return jnp.sum(panel_forward(model.initial_distribution(), *panel_transitions(model, panel)))


def _hmm_total(model, data):
    (y, t, n), (batched, exact) = data
    return jnp.sum(run_hmm(model, y, t, n, "filter", batched, exact).log_likelihood)


@partial(jax.jit, static_argnames=("total", "fixed", "optimizer", "num_iters", "show", "exact"))
def _fit_mle(model, data, num_obs, *, total, fixed, optimizer, num_iters, show, exact):
    data = data if total is _panel_total else (data, exact)
    return optim.maximize(model, lambda m: total(m, data), num_obs, fixed=fixed, optimizer=optimizer, num_iters=num_iters,
                    show=show)


_LBFGS = None


def mle_continuous_time(model, data, num_iters: int = 200, *, lengths=None, optimizer=None, fixed=(), progress=None,
                        exact_states=(), censored=None):
    """Gradient MLE of a continuous-time model (``ps.learn.mle`` dispatches here), on unconstrained values
    (log-rates: the free rates only, so structural zeros stay zero).

    * `MarkovJumpProcess`: ``data = (times, states)`` panel records, or ``(times, states, covariates)``
      when it has ``covariate_effects`` (fitted with the rates), the likelihood of
      `ps.ctmc.panel_log_likelihood` (``exact_states``, ``censored``, ``covariates`` as there). The first record of each
      subject is conditioned on, so ``initial_probs`` is not identified and always held fixed.
    * `ContinuousTimeHMM` (or another continuous-time model): ``data = (times, emissions)``, the likelihood
      of `ps.ctmc.filter` (``exact_states`` as there); every learnable array not in ``fixed`` is fitted.

    Args:
        model: the starting model (not modified).
        data: the pair described above.
        num_iters: optimiser steps (one compiled scan).
        lengths: (B,) real lengths of padded (B, L) data.
        optimizer: an optax optimiser (default L-BFGS with its zoom line search).
        fixed: dotted paths to hold (e.g. ``("emissions",)``).
        progress: progress bar (default: when num_iters >= 100).
        exact_states, censored: as in `ps.ctmc.panel_log_likelihood` / `ps.ctmc.filter`.

    Returns:
        ``(fitted, history)``: history holds the log-likelihood before each step.
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    if not isinstance(model, AbstractContinuousTimeSSM):
        raise ValueError(f"model: expected a continuous-time model, got {type(model).__name__}")
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3) or (len(data) == 3 and not model.observes_states):
        raise ValueError("emissions: expected the data of a continuous-time model as a pair (times, states), "
                         "a triple (times, states, covariates) of panel records, or (times, emissions)")
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    if model.observes_states:
        fixed = tuple(sorted(set(fixed) | {"initial_probs"}))
        covariates = data[2] if len(data) == 3 else None
        panel = prepare_panel(model, data[0], data[1], lengths, exact_states, censored, covariates)
        total, prepared, exact = _panel_total, panel, ()
        num_obs = jnp.maximum(jnp.sum(panel.valid[:, 1:]), 1)
    else:
        if censored is not None:
            raise ValueError("censored: a continuous-time HMM expresses uncertain labels through its emissions; "
                             "expected None")
        y, t, n, batched = prepare_hmm(model, data[0], data[1], lengths)
        exact = exact_state_labels(model, exact_states, model.emission_dim)
        total, prepared, exact = _hmm_total, (y, t, n), (bool(batched), exact)
        num_obs = jnp.maximum(jnp.sum(~jnp.isnan(y)), 1)
    if not P.spec(model, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    global _LBFGS
    if optimizer is None:
        if _LBFGS is None:  # one instance, so repeated fits reuse the compiled loop
            _LBFGS = optax.lbfgs()
        optimizer = _LBFGS
    show = prog.default_enabled(progress, num_iters)
    dtype = model.generator().dtype
    with prog.progress_bar(num_iters, "MLE", show):
        return _fit_mle(model, prepared, jnp.asarray(num_obs, dtype), total=total, fixed=fixed, optimizer=optimizer,
                        num_iters=num_iters, show=show, exact=exact)
