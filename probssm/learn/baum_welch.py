"""Baum-Welch: EM for hidden Markov models, compiled once per problem shape.

E-step: forward-backward on every sequence (vmapped over the padded batch) gives
gamma_t(k) = p(z_t = k | y) and the expected transition counts xi(i, j). With
plausibilities (ARPHMM) the emission likelihood of each state is weighted by
pl_t(k) inside forward-backward; the M-step is unchanged, and EM stays monotone
in the weighted likelihood (Juesas et al., theory of weighted distributions).

M-step (MAP with Dirichlet priors of concentration alpha >= 1, MLE for alpha = 1)::

    pi   ∝ sum_b gamma^b_0 + alpha_pi - 1
    A_i. ∝ sum_b xi^b(i, .) + alpha_A(i, .) - 1
    emissions <- emissions.m_step(y, gamma, inputs, prior.emissions)   # closed form per family

A state (or row) whose expected count is zero keeps its previous parameters, so
an emptied state never produces NaN. The loop over iterations is one `lax.scan`;
random restarts are vmapped; the best restart by final objective is returned.

    fitted, history = ps.learn.em(hmm, y, 50)                     # dispatches here
    fitted, history = baum_welch(hmm, y_batch, 50, lengths=lengths, num_restarts=8, key=key)
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks, progress as prog
from probssm.core.protocol import AbstractDiscreteSSM
from probssm.inference import hmm as hmm_engine

__all__ = ["HMMPrior", "baum_welch"]


class HMMPrior(NamedTuple):
    """Conjugate priors for MAP Baum-Welch.

    initial_concentration: Dirichlet concentration for initial_probs, a float or (K,), >= 1.
    transition_concentration: Dirichlet concentration for each row of the transition matrix,
        a float or (K, K), >= 1 (a larger diagonal gives sticky chains).
    emissions: the emission family's conjugate prior (e.g. `ps.emissions.InverseWishartPrior`
        for `Gaussian`), or None.
    """

    initial_concentration: Any = 1.0
    transition_concentration: Any = 1.0
    emissions: Any = None


def _dirichlet_term(conc, probs):
    conc = jnp.asarray(conc, probs.dtype)
    return jnp.sum(jnp.where(conc == 1.0, 0.0, (conc - 1.0) * jnp.log(probs)))


def _normalise_rows(counts, old):
    total = counts.sum(-1, keepdims=True)
    new = counts / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, new, old)


def _log_prior(model, prior, fix_pi, fix_A):
    if prior is None:
        return jnp.zeros((), model.initial_probs.dtype)
    lp = model.emission_family.log_prior(prior.emissions)
    if not fix_pi:
        lp = lp + _dirichlet_term(prior.initial_concentration, model.initial_probs)
    if not fix_A:
        lp = lp + _dirichlet_term(prior.transition_concentration, model.transition_matrix)
    return lp


def _flatten(a):
    return a.reshape((-1,) + a.shape[2:])


def _model_inputs(model, ys, us, inputs_batched):
    """Per-sequence inputs (B, T, U): the given ones, or the model's `default_inputs` (lagged
    observations for autoregressive emissions), or None."""
    if us is None:
        if model.emission_lags == 0:
            return None
        return jax.vmap(model.default_inputs)(ys)
    if inputs_batched:
        return us
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, ys.shape[:1] + a.shape), us)


def _e_step(model, ys, us, lengths, pl):
    def one(y, u, n, p):
        r = hmm_engine.smoother_params(model.discrete_params(y, u), length=n, plausibility=p)
        return hmm_engine.Posterior(r.log_likelihood, r.smoothed_probs, r.transition_counts)

    return jax.vmap(one, in_axes=(0, None if us is None else 0, None if lengths is None else 0,
                                  None if pl is None else 0))(ys, us, lengths, pl)


def _m_step(model, post, ys, us, prior, fix_pi, fix_A, em_fixed):
    gamma = post.smoothed_probs  # (B, T, K), zero on padding
    new_pi, new_A, new_em = model.initial_probs, model.transition_matrix, model.emission_family
    if not fix_pi:
        counts = gamma[:, 0].sum(0)
        if prior is not None:
            counts = counts + jnp.asarray(prior.initial_concentration, counts.dtype) - 1.0
        new_pi = _normalise_rows(counts, model.initial_probs)
    if not fix_A:
        counts = post.transition_counts.sum(0)
        if prior is not None:
            counts = counts + jnp.asarray(prior.transition_concentration, counts.dtype) - 1.0
        new_A = _normalise_rows(counts, model.transition_matrix)
    if len(em_fixed) < len(model.emission_family.learnable):
        new_em = model.emission_family.m_step(_flatten(ys), _flatten(gamma), None if us is None else _flatten(us),
                                        None if prior is None else prior.emissions, em_fixed)
    return eqx.tree_at(lambda m: (m.initial_probs, m.transition_matrix, m.emissions), model,
                       (new_pi, new_A, new_em))


def _random_model(key, model, ys, us, lengths, fix_pi, fix_A, em_fixed):
    """A random restart: Dirichlet chain parameters and emissions fitted to soft assignments
    around K randomly chosen observations."""
    B, T, D = ys.shape
    K = model.num_states
    k_pi, k_A, k_c = jax.random.split(key, 3)
    dtype = model.initial_probs.dtype
    pi, A = model.initial_probs, model.transition_matrix
    if not fix_pi:
        pi = jax.random.dirichlet(k_pi, jnp.ones(K, dtype))
    if not fix_A:
        A = jax.random.dirichlet(k_A, jnp.ones((K, K), dtype) + K * jnp.eye(K, dtype=dtype))
    y = _flatten(ys)
    valid = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None] < lengths[:, None]
    observed = ~jnp.isnan(y)
    row_ok = _flatten(valid) & jnp.any(observed, -1)
    yz = jnp.where(observed, y, 0.0)
    cnt = jnp.maximum(jnp.sum(observed * row_ok[:, None], 0), 1)
    mean = jnp.sum(yz * row_ok[:, None], 0) / cnt
    std = jnp.sqrt(jnp.sum(((yz - mean) * observed * row_ok[:, None]) ** 2, 0) / cnt)
    std = jnp.where(std > 0, std, 1.0)
    yt = jnp.where(observed, (yz - mean) / std, 0.0)
    # K distinct valid rows, uniformly at random (Gumbel top-k)
    scores = jnp.where(row_ok, jax.random.gumbel(k_c, row_ok.shape, dtype), -jnp.inf)
    centres = lax.top_k(scores, K)[1]
    d2 = jnp.sum((yt[:, None, :] - yt[centres][None]) ** 2 * observed[:, None, :], -1) / D
    weights = jax.nn.softmax(-2.0 * d2, -1) * row_ok[:, None]
    em = model.emission_family.initialize(key, y, weights, None if us is None else _flatten(us), em_fixed)
    return eqx.tree_at(lambda m: (m.initial_probs, m.transition_matrix, m.emissions), model, (pi, A, em))


def _select(flag, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)


@partial(jax.jit, static_argnames=("num_iters", "num_restarts", "fix_pi", "fix_A", "em_fixed", "use_tol", "show"))
def _fit(model, ys, us, lengths, pl, prior, key, tol, *, num_iters, num_restarts, fix_pi, fix_A, em_fixed,
         use_tol, show):
    if num_restarts > 1:
        keys = jax.random.split(key, num_restarts)
        models = jax.vmap(lambda k: _random_model(k, model, ys, us, lengths, fix_pi, fix_A, em_fixed))(keys)
        models = jax.tree_util.tree_map(lambda a, b: a.at[0].set(b), models, model)
    else:
        models = jax.tree_util.tree_map(lambda a: a[None], model)
    every = prog.report_every(num_iters)

    def one_iteration(m, prev, done, i):
        post = _e_step(m, ys, us, lengths, pl)
        obj = jnp.sum(post.log_likelihood) + _log_prior(m, prior, fix_pi, fix_A)
        new = _m_step(m, post, ys, us, prior, fix_pi, fix_A, em_fixed)
        if use_tol:
            done = done | ((i > 0) & (jnp.abs(obj - prev) < tol))
            new = _select(done, m, new)
        return new, obj, done

    def step(carry, i):
        ms, prev, done = carry
        ms, obj, done = jax.vmap(one_iteration, in_axes=(0, 0, 0, None))(ms, prev, done, i)
        if show:
            prog.report(i, jnp.max(obj), every)
        return (ms, obj, done), obj

    dtype = model.initial_probs.dtype
    init = (models, jnp.full((num_restarts,), -jnp.inf, dtype), jnp.zeros((num_restarts,), bool))
    (models, _, _), history = lax.scan(step, init, jnp.arange(num_iters))
    final = jnp.where(jnp.isnan(history[-1]), -jnp.inf, history[-1])
    best = jnp.argmax(final)
    return jax.tree_util.tree_map(lambda a: a[best], models), history[:, best]


def _parse_fixed(model, fixed):
    if isinstance(fixed, str):
        fixed = (fixed,)
    learnable = tuple(model.emission_family.learnable)
    allowed = ("initial_probs", "transition_matrix", "emissions") + tuple(f"emissions.{n}" for n in learnable)
    bad = [f for f in fixed if f not in allowed]
    if bad:
        raise ValueError(f"fixed: unknown parameter names {bad}; expected a subset of {list(allowed)}")
    em_fixed = learnable if "emissions" in fixed else tuple(n for n in learnable if f"emissions.{n}" in fixed)
    return "initial_probs" in fixed, "transition_matrix" in fixed, tuple(sorted(em_fixed))


def _check_prior(prior, K, dtype):
    if prior is None:
        return None
    if not isinstance(prior, HMMPrior):
        raise ValueError(f"prior: expected a ps.learn.HMMPrior, got {type(prior).__name__}")
    a0 = jnp.asarray(prior.initial_concentration, dtype)
    aA = jnp.asarray(prior.transition_concentration, dtype)
    if a0.shape not in ((), (K,)):
        raise ValueError(f"prior: initial_concentration expected a float or shape ({K},), got shape {a0.shape}")
    if aA.shape not in ((), (K,), (K, K)):
        raise ValueError(f"prior: transition_concentration expected a float or shape ({K}, {K}), got shape {aA.shape}")
    for name, a in (("initial_concentration", a0), ("transition_concentration", aA)):
        if checks.is_concrete(a) and bool(np.any(np.asarray(a) < 1.0)):
            raise ValueError(f"prior: {name} expected values >= 1 (MAP is degenerate below 1), found {float(a.min())}")
    em = prior.emissions
    if em is not None:
        em = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), em)
    return HMMPrior(a0, aA, em)


def baum_welch(model, emissions, num_iters: int = 100, *, lengths=None, inputs=None, plausibility=None, fixed=(),
               prior: Optional[HMMPrior] = None, num_restarts: int = 1, key=None, tol: Optional[float] = None,
               progress=None):
    """Fit an HMM by Baum-Welch (EM); MAP with ``prior``.

    Args:
        model: the starting point (not modified): a `ps.models.HMM`, or any `AbstractDiscreteSSM`
            that declares the HMM structure through `emission_family`.
        emissions: (T, D), a padded batch (B, T, D) or a list of (T_b, D) arrays; NaN marks
            missing values.
        num_iters: number of EM iterations.
        lengths: (B,) true lengths of the batched sequences (steps beyond are ignored).
        inputs: (T, U) shared or (B, T, U) per sequence; None: the model's `default_inputs`
            (the lagged observations for autoregressive emissions).
        plausibility: (T, K) or (B, T, K) ARPHMM weights on the emission likelihoods.
        fixed: parameters to hold: "initial_probs", "transition_matrix", "emissions" or
            "emissions.<field>" (e.g. "emissions.covs").
        prior: `HMMPrior` (Dirichlet concentrations >= 1 and an emission prior) for MAP.
        num_restarts: R >= 1; restart 0 starts at ``model``, the others at random
            parameters; all run in parallel (vmap) and the best final objective wins.
        key: `jax.random` key, needed when num_restarts > 1.
        tol: stop updating once the objective changes by less than tol (the history then
            repeats its last value).
        progress: show a progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, history)``: history[i] is the (penalised, with a prior)
        log-likelihood of the parameters entering iteration i; it never decreases.
    """
    if not isinstance(model, AbstractDiscreteSSM) or model.emission_family is None:
        raise ValueError("model: Baum-Welch expects a discrete-state model with an HMM structure (an "
                         "AbstractDiscreteSSM whose emission_family is a ps.emissions family, e.g. "
                         f"ps.models.HMM), got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_restarts = checks.positive_int(num_restarts, "num_restarts")
    if num_restarts > 1 and key is None:
        raise ValueError("key: expected a jax.random key when num_restarts > 1")
    if tol is not None and not (float(tol) > 0):
        raise ValueError(f"tol: expected a positive float or None, got {tol!r}")
    fix_pi, fix_A, em_fixed = _parse_fixed(model, fixed)
    if model.transition_matrix.ndim == 3 and not fix_A:
        raise ValueError("fixed: the transition matrix is time-varying; Baum-Welch learns a fixed one, so "
                         "pass fixed=('transition_matrix', ...)")
    batch, pl = hmm_engine.prepare(model, emissions, inputs, lengths, plausibility)
    model = checks.unify_dtypes(model, batch.emissions)  # one dtype for the loop's carry
    ys, u, n = batch.emissions, batch.inputs, batch.lengths
    if not batch.batched:
        ys = ys[None]
        n = None if n is None else n[None]
        pl = None if pl is None else pl[None]
    prior = _check_prior(prior, model.num_states, ys.dtype)
    us = _model_inputs(model, ys, u, batch.inputs_batched)
    show = prog.default_enabled(progress, num_iters)
    tol_arr = jnp.asarray(0.0 if tol is None else tol, ys.dtype)
    with prog.progress_bar(num_iters, "Baum-Welch", show):
        fitted, history = _fit(model, ys, us, n, pl, prior, key, tol_arr, num_iters=num_iters,
                               num_restarts=num_restarts, fix_pi=fix_pi, fix_A=fix_A, em_fixed=em_fixed,
                               use_tol=tol is not None, show=show)
    return fitted, history
