"""Generalised EM for the HMM-GLM (`probssm.models.hmmglm.HMMGLM`) over many trials.

Each iteration, for the current parameters theta (one compiled `lax.scan` step)::

    E-step   gamma, xi, log p(x^m) <- ps.hmm posterior of every trial m (vmapped; hard weights)
    J(theta) = sum_m log p(x^m | theta) + log prior(theta)                 # reported in history
    pi  <- sum_m gamma^m_0 / M;  A_i. <- sum_m xi^m(i, .) normalised       # closed form
             (input-driven transitions: no closed form; damped Newton steps on the concave
             transition part of Q over log A and R, see `transition_objective`)
    M-step   num_m_steps Adam steps (optax) on
             Q(theta') = sum_{m,t,k} gamma^m_t(k) log p(x^m_t | z_t = k, theta') + log prior(theta')
             (one-hot prior: the coupling weights inside Q use a fresh Gumbel-softmax sample
             of the indicators at every Adam step, temperature 0.2)
    accept   the new emission parameters only if Q_hard(new) >= Q_hard(old), where Q_hard
             evaluates Q deterministically with the hard (argmax) indicators; else keep the old
             and halve the Adam step size for the next iteration (it grows back by 1.5x per
             accepted step, up to ``learning_rate``).

Why the acceptance test: an Adam inner loop may overshoot, and with the one-hot prior
it optimises a stochastic relaxation, so neither guarantees that the M-step improves
the model that is evaluated. Requiring Q_hard(new) >= Q_hard(old) restores the
generalised-EM inequality for the deterministic objective J evaluated with hard
indicators (the model used at evaluation time):
J(new) - J(old) >= Q(new) - Q(old) >= 0, because the transition update maximises
its part of Q exactly. Hence ``history`` never decreases (up to rounding). A rejected
step costs nothing: the next iteration draws new Gumbel noise from the same E-step.

    fitted, history = fit_hmmglm(model, spikes, 100, key=key)     # spikes (M, T, N)
    ll = hmmglm_log_likelihood(fitted, held_out)                   # (M',) per trial
    fitted, history = ps.learn.em(model, spikes, 100, key=key)     # the same (registered with em)

The data argument is ``emissions`` (spike counts (M, T, N), (T, N) or a list of (T_m, N) trials);
``spikes=`` is a deprecated keyword alias. Randomness (Gumbel noise of the one-hot prior, random
mini-batches) needs ``key``; fits without randomness run without one.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from probssm.core import batching, checks, params as core_params, progress as prog
from probssm.inference.hmm import filter_params, smoother_params
from probssm.learn.em import register_em
from probssm.learn.hmmglm_transitions import transition_m_step, transition_q
from probssm.models.hmmglm import HMMGLM, AbstractHMMGLM, check_spikes

__all__ = ["ThresholdResult", "coupling_sizes", "fit_hmmglm", "hmmglm_log_likelihood", "init_hmmglm", "m_step_objective",
           "prune_links", "threshold_couplings", "transition_objective"]


def _check_model(model):
    if not isinstance(model, AbstractHMMGLM):
        raise ValueError(f"model: expected a ps.models.HMMGLM, got {type(model).__name__}")


def _accepts_spikes(fn):
    """Let ``fn``'s data argument ``emissions`` also be given as ``spikes=`` (deprecated alias)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "spikes" in kwargs:
            if "emissions" in kwargs or "emissions" in signature.bind_partial(*args).arguments:
                raise ValueError("spikes: a deprecated alias of emissions; give only one of them")
            warnings.warn("spikes= is deprecated; pass the data as emissions", DeprecationWarning, stacklevel=2)
            kwargs["emissions"] = kwargs.pop("spikes")
        return fn(*args, **kwargs)

    return wrapper


def _prepare(model, emissions, inputs, lengths=None):
    """Validated (ys (M, T, N), us (M, T, U) or None, lengths (M,) or None, batched flag).

    ``emissions``: (T, N), (M, T, N) or a list of (T_m, N) trials (padded, lengths filled in).
    Padding beyond each trial's length may hold anything (NaN included): it is zeroed, and its
    bins get zero weight in every sum (history covariates only look back)."""
    batch = batching.as_batch(emissions, inputs, lengths)
    ys, us, ns = batch.emissions, batch.inputs, batch.lengths
    if not batch.batched:
        ys, ns = ys[None], (None if ns is None else ns[None])
        us = None if us is None else us[None]
    elif us is not None and not batch.inputs_batched:
        us = jnp.broadcast_to(jnp.asarray(us), (ys.shape[0],) + jnp.shape(us))
    if ns is not None:
        ys = jnp.where((jnp.arange(ys.shape[1])[None, :] < ns[:, None])[..., None], ys, 0.0)
    ys, _ = check_spikes(ys, model.family, model.num_neurons, model.history_length, "emissions")
    M, T, _ = ys.shape
    if model.num_inputs or us is not None:
        if us is None:
            raise ValueError(f"inputs: the model has {model.num_inputs} external covariates; "
                             f"pass inputs (T, {model.num_inputs}) or (M, T, {model.num_inputs})")
        us = jnp.asarray(us, ys.dtype)
        checks.shape(us, "inputs", (M, T, model.num_inputs),
                     f"({T}, {model.num_inputs}) or ({M}, {T}, {model.num_inputs})")
        checks.finite(us, "inputs")
    return ys, us, ns, batch.batched


def _replace(model, names, values):
    return core_params.replace(model, names, tuple(values[n] for n in names))


def _expected_loglik(model, ys, xs, gamma, mode, key, normalized=True, noise=None):
    """sum_{m,t,k} gamma log p(x_t | z_t = k) over flattened trials (ys (R, N), xs (R, U), gamma (R, K))."""
    return jnp.sum(gamma * model.emission_log_likelihoods(ys, xs, mode, key, normalized, noise))


@_accepts_spikes
def m_step_objective(model, emissions, state_probs, inputs=None, *, mode: str = "hard", key=None):
    """Q_em(theta) = sum_t,k gamma_t(k) log p(x_t | z_t = k, history) + log prior(theta).

    The part of the EM objective that the inner Adam loop maximises (the transition part is
    maximised in closed form, or for input-driven transitions by Newton steps on
    `transition_objective`). Traceable: differentiate it with `jax.grad` w.r.t. the model.

    Args:
        model: `HMMGLM`.
        emissions: spike counts (T, N) or (M, T, N).
        state_probs: (T, K) or (M, T, K) posterior state probabilities gamma.
        inputs: external covariates (T, U) or (M, T, U), when the model has them.
        mode: indicators for the one-hot prior: "hard", "expected" or "relaxed" (needs ``key``).
    """
    ys = jnp.asarray(emissions)
    g = jnp.asarray(state_probs)
    xs = model.covariates(ys, inputs)
    U = xs.shape[-1]
    return (_expected_loglik(model, ys.reshape(-1, ys.shape[-1]), xs.reshape(-1, U), g.reshape(-1, g.shape[-1]),
                             mode, key) + model.log_prior())


def transition_objective(model, state_probs, transition_counts, inputs):
    """Expected complete-data log-likelihood of input-driven transitions,

        Q_trans = sum_{m, t >= 1} sum_{i,j} xi^m_t(i, j) log p(z_t = j | z_{t-1} = i, u^m_t),

    computed without the per-step xi: with log p = log A_ij + r_j . u_t - log sum_j' A_ij' exp(r_j' . u_t)
    and the marginals sum_j xi_t(i, j) = gamma_{t-1}(i), sum_i xi_t(i, j) = gamma_t(j),

        Q_trans = sum_ij N_ij log A_ij + sum_{m,t>=1,j} gamma_t(j) r_j . u_t
                  - sum_{m,t>=1,i} gamma_{t-1}(i) log sum_j A_ij exp(r_j . u_t),

    N the expected transition counts summed over trials. Concave in (log A, R). Traceable.

    Args:
        model: an input-driven `HMMGLM`.
        state_probs: (T, K) or (M, T, K) posterior state probabilities gamma.
        transition_counts: (K, K) or (M, K, K) expected transition counts.
        inputs: (T, U) or (M, T, U).
    """
    _check_model(model)
    if not model.input_driven:
        raise ValueError("model: transition_objective is for input-driven transitions (transition_input_weights)")
    g = jnp.asarray(state_probs)
    g = g[None] if g.ndim == 2 else g
    u = jnp.broadcast_to(jnp.asarray(inputs, g.dtype), g.shape[:2] + (model.num_inputs,))
    counts = jnp.asarray(transition_counts, g.dtype)
    counts = counts.sum(0) if counts.ndim == 3 else counts
    return transition_q(model.log_transition_matrix, model.transition_input_weights, g, counts, u)


_transition_m_step = transition_m_step  # the old private name (tests)


def _normalise_rows(counts, old):
    total = counts.sum(-1, keepdims=True)
    new = counts / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, new, old)


def _posteriors(model, ys, us, ns):
    one = lambda y, u, n: smoother_params(model.discrete_params(y, u), length=n)
    return jax.vmap(one, in_axes=(0, None if us is None else 0, None if ns is None else 0))(ys, us, ns)


@partial(jax.jit, static_argnames=("num_iters", "num_m_steps", "batch_size", "names", "trans_names", "fix_pi",
                                   "fix_A", "show"))
def _fit(model, ys, us, ns, key, learning_rate, *, num_iters, num_m_steps, batch_size, names, trans_names, fix_pi, fix_A,
         show):
    M, T, N = ys.shape
    K = model.num_states
    xs = model.covariates(ys, us)
    yf, xf = ys.reshape(M * T, N), xs.reshape(M * T, -1)
    scale = 1.0 / ((M * T if ns is None else jnp.sum(ns)) * N)  # per observed count: same steps whatever the padding
    relaxed = model.prior.relaxed  # train on Gumbel-softmax samples of the indicators
    train_mode = "relaxed" if relaxed else "hard"
    opt = optax.scale_by_adam()
    every = prog.report_every(num_iters)

    def q_hard(m, gamma):
        return _expected_loglik(m, yf, xf, gamma, "hard", None, False) + m.log_prior()

    R = M * T
    noise_shape = model.prior.noise_shape
    n_noise = int(np.prod(noise_shape)) if relaxed else 0

    def loss(params, m, gamma, rows, noise):
        mm = _replace(m, names, params)
        if rows is None:
            part, factor = _expected_loglik(mm, yf, xf, gamma, train_mode, None, False, noise), 1.0
        else:  # a random subset of the time bins of all trials, rescaled to the whole data set
            part = _expected_loglik(mm, yf[rows], xf[rows], gamma[rows], train_mode, None, False, noise)
            factor = R / batch_size
        return -scale * (factor * part + mm.log_prior())

    grad = jax.grad(loss)

    def iteration(carry, i):
        m, lr = carry
        # all the randomness of this M-step from one uniform draw (random-number kernels are slow to
        # compile): rows of the mini-batches and standard Gumbel noise for the indicators
        rows, noise = None, None
        width = (0 if batch_size is None else batch_size) + n_noise
        if width:
            u = jax.random.uniform(jax.random.fold_in(key, i), (num_m_steps, width), yf.dtype,
                                   minval=jnp.finfo(yf.dtype).tiny, maxval=1.0)
            if batch_size is not None:
                rows = jnp.minimum((u[:, :batch_size] * R).astype(jnp.int32), R - 1)
            if relaxed:
                noise = -jnp.log(-jnp.log(u[:, width - n_noise:])).reshape((num_m_steps,) + noise_shape)
        post = _posteriors(m, ys, us, ns)
        objective = jnp.sum(post.log_likelihood) + m.log_prior()
        gamma = post.smoothed_probs.reshape(M * T, K)
        pi = m.initial_probs if fix_pi else _normalise_rows(post.smoothed_probs[:, 0].sum(0), m.initial_probs)
        if trans_names:  # input-driven: no closed form, a few Newton steps on the concave Q_trans
            counts = post.transition_counts.sum(0)
            A, Rin = transition_m_step(m, trans_names, post.smoothed_probs, counts, us, ns)
        else:
            A = m.transition_matrix if fix_A else _normalise_rows(post.transition_counts.sum(0), m.transition_matrix)
            Rin = m.transition_input_weights

        params = {n: core_params.get(m, n) for n in names}

        def adam_step(c, xs):
            p, s = c
            r, g = xs
            upd, s = opt.update(grad(p, m, gamma, r, g), s, p)
            return (jax.tree_util.tree_map(lambda a, u: a - lr * u, p, upd), s), None

        (new_params, _), _ = lax.scan(adam_step, (params, opt.init(params)), (rows, noise), length=num_m_steps)
        proposal = _replace(m, names, new_params)
        q_old, q_new = q_hard(m, gamma), q_hard(proposal, gamma)
        accept = jnp.isfinite(q_new) & (q_new >= q_old)
        kept = jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new_params, params)
        m = core_params.replace(_replace(m, names, kept),
                                ("initial_probs", "transition_matrix", "transition_input_weights"), (pi, A, Rin))
        # step-size control: halve after a rejected M-step, recover towards learning_rate after an accepted one
        lr = jnp.where(accept, jnp.minimum(1.5 * lr, learning_rate), 0.5 * lr)
        if show:
            prog.report(i, objective, every)
        return (m, lr), (objective, accept)

    (model, _), (history, accepted) = lax.scan(iteration, (model, learning_rate), jnp.arange(num_iters))
    return model, history, accepted


def _fixed_paths(model, fixed):
    """``fixed`` (paths or the bare names of the prior's fields) -> paths, checked."""
    if isinstance(fixed, str):
        fixed = (fixed,)
    allowed = ("initial_probs",) + model.transition_paths + model.emission_paths
    out = tuple(f if f in allowed else f"prior.{f}" for f in fixed)
    bad = [f for f, p in zip(fixed, out) if p not in allowed]
    if bad:
        raise ValueError(f"fixed: unknown parameter names {bad}; expected a subset of {list(allowed)}")
    return out


@register_em(HMMGLM)
@_accepts_spikes
def fit_hmmglm(model: HMMGLM, emissions, num_iters: int = 50, *, inputs=None, lengths=None, key=None,
               num_m_steps: int = 50, learning_rate: float = 0.05, batch_size: Optional[int] = None, fixed=(),
               progress: Optional[bool] = None, return_accepted: bool = False):
    """Fit an HMM-GLM to many trials by generalised EM (compiled once per problem shape).

    Args:
        model: the starting `HMMGLM` (e.g. from `init_hmmglm`); its prior, family and link
            stay as they are.
        emissions: (M, T, N) trials of spike counts, one trial (T, N) or a list of (T_m, N)
            trials; Poisson counts are non-negative integers, Bernoulli bins 0/1.
            (``spikes=``: deprecated alias.)
        num_iters: EM iterations.
        inputs: external covariates (T, U) shared by the trials or (M, T, U).
        lengths: (M,) trial lengths when trials of different lengths are padded to T; the
            padding may hold anything (NaN included) and is ignored.
        key: `jax.random` key, required when the fit draws randomness: the Gumbel-softmax samples
            of a relaxed prior (`OneHotPrior`) or the mini-batches of ``batch_size``.
        num_m_steps: Adam steps per M-step (50).
        learning_rate: Adam step size.
        batch_size: time bins (pooled over trials) per Adam step, drawn at random; None
            uses all M * T bins. Subsampling makes the inner loop cheaper; the acceptance test
            always uses all bins, so the objective still never decreases.
        fixed: parameters to hold, as `probssm.core.params` paths: "initial_probs",
            "transition_matrix", "transition_input_weights" (input-driven transitions) or any
            of ``model.emission_paths`` (e.g. "biases", "prior.connectome_logits"; the prior's
            fields may also be named bare, "connectome_logits").
        progress: show a progress bar (default: when num_iters >= 100).
        return_accepted: deprecated: also return the (num_iters,) flags of accepted M-steps.

    Returns:
        ``(fitted_model, history)``; history[i] = sum_m log p(x^m) + log prior of the parameters
        entering iteration i, with hard one-hot indicators. It never decreases.
    """
    _check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_m_steps = checks.positive_int(num_m_steps, "num_m_steps")
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate: expected a positive float, got {learning_rate!r}")
    fixed = _fixed_paths(model, fixed)
    names = tuple(n for n in model.emission_paths if n not in fixed)
    trans_names = tuple(n for n in model.transition_paths if n not in fixed) if model.input_driven else ()
    ys, us, ns, _ = _prepare(model, emissions, inputs, lengths)
    model = checks.unify_dtypes(model, ys)  # one dtype for the loop's carry
    if batch_size is not None:
        batch_size = checks.positive_int(batch_size, "batch_size")
        if batch_size >= ys.shape[0] * ys.shape[1]:
            batch_size = None
    if key is None:
        if model.prior.relaxed or batch_size is not None:
            raise ValueError(f"key: this fit draws random numbers (the {type(model.prior).__name__}'s Gumbel-softmax "
                             "samples or random mini-batches); pass key=jax.random.PRNGKey(...)")
        key = jax.random.PRNGKey(0)  # a placeholder argument: nothing is drawn from it
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, f"HMM-GLM EM ({model.prior.name})", show):
        fitted, history, accepted = _fit(model, ys, us, ns, key, jnp.asarray(learning_rate, ys.dtype),
                                         num_iters=num_iters, num_m_steps=num_m_steps, batch_size=batch_size,
                                         names=names, trans_names=trans_names,
                                         fix_pi="initial_probs" in fixed, fix_A="transition_matrix" in fixed,
                                         show=show)
    if return_accepted:
        warnings.warn("return_accepted is deprecated: learners return (model, history)", DeprecationWarning,
                      stacklevel=2)
        return fitted, history, accepted
    return fitted, history


@jax.jit
def _loglik(model, ys, us, ns):
    def one(y, u, n):  # the forward pass only
        return filter_params(model.discrete_params(y, u), length=n).log_likelihood
    return jax.vmap(one, in_axes=(0, None if us is None else 0, None if ns is None else 0))(ys, us, ns)


@_accepts_spikes
def hmmglm_log_likelihood(model: HMMGLM, emissions, inputs=None, lengths=None):
    """log p(x^m) of every trial under the model (hard one-hot indicators), conditioning on
    zero spikes before each trial. Returns (M,) for (M, T, N) emissions (or a list of M trials),
    or () for (T, N); ``lengths`` (M,) as in `fit_hmmglm`."""
    _check_model(model)
    ys, us, ns, batched = _prepare(model, emissions, inputs, lengths)
    ll = _loglik(model, ys, us, ns)
    return ll if batched else ll[0]


def _inverse_link(family, link, mean):
    mean = np.asarray(mean, float)
    if family == "bernoulli":
        p = np.clip(mean, 1e-4, 1 - 1e-4)
        if link == "sigmoid":
            return np.log(p) - np.log1p(-p)
        mean = -np.log1p(-p)  # the Poisson rate whose P(count > 0) is p
    if link == "exp":
        return np.log(np.maximum(mean, 1e-6))
    if link == "softplus":
        m = np.maximum(mean, 1e-6)
        return np.where(m > 30, m, np.log(np.expm1(m)))
    return np.log(np.clip(mean, 1e-4, 1 - 1e-4)) - np.log1p(-np.clip(mean, 1e-4, 1 - 1e-4))


def _link_cost(link_cost, bins, num_states):
    if isinstance(link_cost, str):
        if link_cost != "bic":
            raise ValueError(f"link_cost: expected a float >= 0 or 'bic', got {link_cost!r}")
        return 0.5 * float(np.log(max(bins / num_states, 1.0)))
    return link_cost


@_accepts_spikes
def prune_links(model: HMMGLM, emissions, num_iters: int = 30, *, link_cost="bic", lengths=None, **fit_options):
    """Continue a one-hot fit with a price on every connection switched on, so that links
    whose likelihood gain is below ``link_cost`` nats turn to "none".

    Charging the link cost from the start keeps links from switching on while the states
    are still mixed; charged after a fit has found the states and their strong links, it
    removes the weak spurious links that the relaxed indicators leave at the strength floor.
    ``link_cost="bic"``: 0.5 log(observed bins / K). The objective with the cost is a new
    one; it never decreases within this call. ``fit_options`` go to `fit_hmmglm` (``key``,
    required; ``inputs``, ``batch_size``, ...). ``emissions`` as in `fit_hmmglm`.

    Returns:
        ``(fitted_model, history)`` as `fit_hmmglm`; the model's prior keeps ``link_cost``.
    """
    _check_model(model)
    ys, _, ns, _ = _prepare(model, emissions, fit_options.get("inputs"), lengths)
    bins = int(np.prod(ys.shape[:2])) if ns is None else int(jnp.sum(ns))
    prior = model.prior.with_link_cost(_link_cost(link_cost, bins, model.num_states))  # checks cost >= 0
    return fit_hmmglm(eqx.tree_at(lambda m: m.prior, model, prior), emissions, num_iters, lengths=lengths,
                      **fit_options)


class ThresholdResult(NamedTuple):
    model: HMMGLM  # the couplings at or below ``threshold`` set to zero ("none" for the one-hot prior)
    threshold: jax.Array  # () the chosen threshold on the coupling size
    thresholds: jax.Array  # (levels + 2,) the candidates, 0 (nothing dropped) first
    log_likelihoods: jax.Array  # (levels + 2,) held-out log-likelihood (summed over trials) per candidate


def coupling_sizes(model: HMMGLM, per_state: bool = True):
    """(K, N, N) size of each coupling n <- n': the norm over the history bases of its hard
    weights; ``per_state=False``: of the state-averaged weights (the same for every state)."""
    w = model.coupling_weights("hard")
    if not per_state:
        w = jnp.broadcast_to(jnp.mean(w, 0), w.shape)
    return jnp.sqrt(jnp.sum(w ** 2, -1))


@partial(jax.jit, static_argnames=("per_state", "levels"))
def _threshold_scan(model, ys, us, ns, per_state, levels):
    size = coupling_sizes(model, per_state)
    cross = ~np.eye(model.num_neurons, dtype=bool)
    quantiles = (jnp.quantile(size[:, cross], jnp.linspace(0.0, 1.0, levels + 1)) if cross.any()
                 else jnp.zeros(0, size.dtype))
    thresholds = jnp.concatenate([jnp.zeros(1, size.dtype), quantiles])
    # self-history couplings are never dropped; couplings already zero are left as they are
    droppable = cross & (size > 0)

    def score(th):
        return jnp.sum(_loglik(model.without_couplings(droppable & (size <= th)), ys, us, ns))
    lls = lax.map(score, thresholds)
    best = thresholds[jnp.argmax(lls)]  # the first of equal maxima: the smallest threshold
    return ThresholdResult(model.without_couplings(droppable & (size <= best)), best, thresholds, lls)


@_accepts_spikes
def threshold_couplings(model: HMMGLM, emissions, *, per_state: bool = True, levels: int = 40, inputs=None,
                        lengths=None) -> ThresholdResult:
    """Set the weak couplings of a fitted HMM-GLM to zero, the threshold chosen by the
    log-likelihood of held-out trials ``emissions`` (validation data, not the training data:
    on those a smaller model never scores higher).

    The candidates are 0 (drop nothing) and the ``levels`` + 1 quantiles (0, 1/levels, ..., 1)
    of the sizes of the cross-neuron couplings (`coupling_sizes`, the norm over the history
    bases); each coupling whose size is at or below the candidate is switched off, the
    self-history couplings never. ``per_state=True`` sizes each state's couplings on their own;
    ``False`` sizes the state-averaged couplings, so a pair is dropped in every state at
    once. The same rule serves all three priors: for the plain and Gaussian priors it is
    how the model says "no connection"; for the one-hot prior (hard indicators) it turns
    links to "none" whose strength the held-out trials do not support.

    Returns:
        `ThresholdResult` (model, threshold, thresholds, log_likelihoods); ``model.connectome``
        and ``model.coupling_weights`` of the result read off the thresholded graph.
    """
    _check_model(model)
    levels = checks.positive_int(levels, "levels")
    ys, us, ns, _ = _prepare(model, emissions, inputs, lengths)
    return _threshold_scan(model, ys, us, ns, bool(per_state), levels)


@_accepts_spikes
def init_hmmglm(key, emissions, num_states: int, *, prior="none", family: str = "poisson",
                link: str = "softplus", basis=None, num_inputs: int = 0, stickiness: float = 0.98,
                weight_scale: float = 0.1, temperature: float = 0.2, min_strength: float = 0.1,
                min_weight_scale: float = 0.1, sparsity: float = 0.0, link_cost=0.0,
                input_driven_transitions: bool = False) -> HMMGLM:
    """A starting point for `fit_hmmglm`: `HMMGLM.create` with the biases at the inverse link of
    each neuron's mean count (so a model without coupling matches the firing rates).

    ``link_cost="bic"`` (one-hot prior) charges each connection switched on in a state
    0.5 log(T_total / K) nats, T_total the number of time bins in ``spikes``: the BIC price of
    the strength parameter it adds, estimated from the bins a state sees on average.

    ``emissions``: spike counts (T, N) or (M, T, N); ``prior``: a prior class (e.g.
    `probssm.models.OneHotPrior`), a prior object or a (deprecated) name, as in `HMMGLM.create`."""
    y = np.asarray(emissions, float)
    if y.ndim not in (2, 3):
        raise ValueError(f"emissions: expected shape (T, N) or (M, T, N), got shape {y.shape}")
    N = y.shape[-1]
    link_cost = _link_cost(link_cost, int(np.prod(y.shape[:-1])), checks.positive_int(num_states, "num_states"))
    rate = y.reshape(-1, N).mean(0)
    biases = _inverse_link(family, link, rate)
    return HMMGLM.create(key, num_states, N, basis=basis, num_inputs=num_inputs, prior=prior, family=family,
                         link=link, stickiness=stickiness, biases=biases, weight_scale=weight_scale,
                         temperature=temperature, min_strength=min_strength, min_weight_scale=min_weight_scale,
                         sparsity=sparsity, link_cost=link_cost,
                         input_driven_transitions=input_driven_transitions)
