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
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from probssm.core import checks, progress as prog
from probssm.inference import hmm as hmm_engine
from probssm.models.hmmglm import HMMGLM, check_spikes

__all__ = ["ThresholdResult", "coupling_sizes", "fit_hmmglm", "hmmglm_log_likelihood", "init_hmmglm", "m_step_objective",
           "prune_links", "threshold_couplings", "transition_objective"]


def _check_model(model):
    if not isinstance(model, HMMGLM):
        raise ValueError(f"model: expected a ps.models.HMMGLM, got {type(model).__name__}")


def _prepare(model, spikes, inputs, lengths=None, name="spikes"):
    """Validated (ys (M, T, N), us (M, T, U) or None, lengths (M,) or None, batched flag)."""
    ns = None
    if lengths is not None:
        # padding beyond each trial's length may hold anything (NaN included): it is zeroed, and
        # its bins get zero weight in every sum (history covariates only look back)
        a = np.array(spikes, dtype=float)
        if a.ndim != 3:
            raise ValueError(f"lengths: only for a batch of trials (M, T, N); spikes have shape {a.shape}")
        ns = hmm_engine.check_lengths(lengths, a.shape[1], a.shape[0])
        a[np.arange(a.shape[1])[None, :] >= np.asarray(ns)[:, None]] = 0.0
        spikes = a
    ys, batched = check_spikes(spikes, model.family, model.num_neurons, model.history_length, name)
    if not batched:
        ys = ys[None]
    M, T, _ = ys.shape
    us = None
    if model.num_inputs or inputs is not None:
        if inputs is None:
            raise ValueError(f"inputs: the model has {model.num_inputs} external covariates; "
                             f"pass inputs (T, {model.num_inputs}) or (M, T, {model.num_inputs})")
        us = jnp.asarray(inputs, ys.dtype)
        if us.ndim == 2:
            us = jnp.broadcast_to(us, (M,) + us.shape)
        checks.shape(us, "inputs", (M, T, model.num_inputs),
                     f"({T}, {model.num_inputs}) or ({M}, {T}, {model.num_inputs})")
        checks.finite(us, "inputs")
    return ys, us, ns, batched


def _replace(model, names, values):
    return eqx.tree_at(lambda m: tuple(getattr(m, n) for n in names), model, tuple(values[n] for n in names))


def _expected_loglik(model, ys, xs, gamma, mode, key, normalized=True, noise=None):
    """sum_{m,t,k} gamma log p(x_t | z_t = k) over flattened trials (ys (R, N), xs (R, U), gamma (R, K))."""
    return jnp.sum(gamma * model.emission_log_likelihoods(ys, xs, mode, key, normalized, noise))


def m_step_objective(model, spikes, state_probs, inputs=None, *, mode: str = "hard", key=None):
    """Q_em(theta) = sum_t,k gamma_t(k) log p(x_t | z_t = k, history) + log prior(theta).

    The part of the EM objective that the inner Adam loop maximises (the transition part is
    maximised in closed form, or for input-driven transitions by Newton steps on
    `transition_objective`). Traceable: differentiate it with `jax.grad` w.r.t. the model.

    Args:
        model: `HMMGLM`.
        spikes: (T, N) or (M, T, N).
        state_probs: (T, K) or (M, T, K) posterior state probabilities gamma.
        inputs: external covariates (T, U) or (M, T, U), when the model has them.
        mode: indicators for the one-hot prior: "hard", "expected" or "relaxed" (needs ``key``).
    """
    ys = jnp.asarray(spikes)
    g = jnp.asarray(state_probs)
    xs = model.covariates(ys, inputs)
    U = xs.shape[-1]
    return (_expected_loglik(model, ys.reshape(-1, ys.shape[-1]), xs.reshape(-1, U), g.reshape(-1, g.shape[-1]),
                             mode, key) + model.log_prior())


def _transition_q(log_A, R, gamma, counts, us, lengths=None):
    """Q_trans of `transition_objective` for gamma (M, T, K) (zero beyond each trial's length),
    summed counts (K, K), us (M, T, U)."""
    drive = us[:, 1:] @ R.T  # (M, T-1, K): r_j . u_t
    lse = jax.nn.logsumexp(log_A + drive[..., None, :], -1)  # (M, T-1, K): normaliser of row i at step t
    leaving = gamma[:, :-1]
    if lengths is not None:  # the last step of a trial has no successor
        leaving = leaving * (jnp.arange(1, gamma.shape[1]) < lengths[:, None])[..., None]
    return jnp.sum(counts * log_A) + jnp.sum(gamma[:, 1:] * drive) - jnp.sum(leaving * lse)


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
    return _transition_q(model.log_transition_matrix, model.transition_input_weights, g, counts, u)


_NEWTON_STEPS = 8
_NEWTON_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.01)


def _transition_m_step(model, trans_names, gamma, counts, us, lengths=None):
    """Maximise Q_trans over log A and R (those in ``trans_names``) by damped Newton steps.

    Q_trans is concave but flat along row shifts of log A and shifts of R shared by all
    states, so the Newton system gets a small ridge. Each step tries the step sizes in
    ``_NEWTON_STEP_SIZES`` at once and keeps the best one that does not lower Q_trans, so the
    result never scores below the start (the generalised-EM inequality holds for this block
    on its own: Q separates into emission and transition parameters)."""
    K, U = model.num_states, model.num_inputs
    log_A0, R0 = model.log_transition_matrix, model.transition_input_weights
    free_A, free_R = "transition_matrix" in trans_names, "transition_input_weights" in trans_names
    n_A = K * K if free_A else 0

    def unpack(theta):
        log_A = theta[:n_A].reshape(K, K) if free_A else log_A0
        R = theta[n_A:].reshape(K, U) if free_R else R0
        return log_A, R

    def q(theta):
        log_A, R = unpack(theta)
        return _transition_q(log_A, R, gamma, counts, us, lengths)

    theta0 = jnp.concatenate(([log_A0.ravel()] if free_A else []) + ([R0.ravel()] if free_R else []))
    sizes = jnp.asarray(_NEWTON_STEP_SIZES, theta0.dtype)
    eye = jnp.eye(theta0.size, dtype=theta0.dtype)

    def newton(theta, _):
        g = jax.grad(q)(theta)
        H = jax.hessian(q)(theta)
        ridge = 1e-6 * jnp.trace(-H) / theta.size + jnp.finfo(theta.dtype).eps
        step = jnp.linalg.solve(-H + ridge * eye, g)
        candidates = theta + sizes[:, None] * step
        values = jax.vmap(q)(candidates)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        best = jnp.argmax(values)
        better = values[best] >= q(theta)
        return jnp.where(better, candidates[best], theta), None

    theta, _ = lax.scan(newton, theta0, None, length=_NEWTON_STEPS)
    log_A, R = unpack(theta)
    A = jax.nn.softmax(log_A, -1) if free_A else model.transition_matrix
    return A, R


def _normalise_rows(counts, old):
    total = counts.sum(-1, keepdims=True)
    new = counts / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, new, old)


def _posteriors(model, ys, us, ns):
    one = lambda y, u, n: hmm_engine.posterior(model, y, u, length=n)
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
    train_mode = "relaxed" if model.prior == "onehot" else "hard"
    opt = optax.scale_by_adam()
    every = prog.report_every(num_iters)

    def q_hard(m, gamma):
        return _expected_loglik(m, yf, xf, gamma, "hard", None, False) + m.log_prior()

    R = M * T
    onehot = model.prior == "onehot"
    logits_shape = model.adjacency_logits.shape
    n_noise = int(np.prod(logits_shape))

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
        width = (0 if batch_size is None else batch_size) + (n_noise if onehot else 0)
        if width:
            u = jax.random.uniform(jax.random.fold_in(key, i), (num_m_steps, width), yf.dtype,
                                   minval=jnp.finfo(yf.dtype).tiny, maxval=1.0)
            if batch_size is not None:
                rows = jnp.minimum((u[:, :batch_size] * R).astype(jnp.int32), R - 1)
            if onehot:
                noise = -jnp.log(-jnp.log(u[:, width - n_noise:])).reshape((num_m_steps,) + logits_shape)
        post = _posteriors(m, ys, us, ns)
        objective = jnp.sum(post.log_likelihood) + m.log_prior()
        gamma = post.smoothed_probs.reshape(M * T, K)
        pi = m.initial_probs if fix_pi else _normalise_rows(post.smoothed_probs[:, 0].sum(0), m.initial_probs)
        if trans_names:  # input-driven: no closed form, a few Newton steps on the concave Q_trans
            counts = post.transition_counts.sum(0)
            A, Rin = _transition_m_step(m, trans_names, post.smoothed_probs, counts, us, ns)
        else:
            A = m.transition_matrix if fix_A else _normalise_rows(post.transition_counts.sum(0), m.transition_matrix)
            Rin = m.transition_input_weights

        params = {n: getattr(m, n) for n in names}

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
        m = eqx.tree_at(lambda mm: (mm.initial_probs, mm.transition_matrix, mm.transition_input_weights),
                        _replace(m, names, kept), (pi, A, Rin))
        # step-size control: halve after a rejected M-step, recover towards learning_rate after an accepted one
        lr = jnp.where(accept, jnp.minimum(1.5 * lr, learning_rate), 0.5 * lr)
        if show:
            prog.report(i, objective, every)
        return (m, lr), (objective, accept)

    (model, _), (history, accepted) = lax.scan(iteration, (model, learning_rate), jnp.arange(num_iters))
    return model, history, accepted


def fit_hmmglm(model: HMMGLM, spikes, num_iters: int = 50, *, inputs=None, lengths=None, key=None,
               num_m_steps: int = 50,
               learning_rate: float = 0.05, batch_size: Optional[int] = None, fixed=(),
               progress: Optional[bool] = None, return_accepted: bool = False):
    """Fit an HMM-GLM to many trials by generalised EM (compiled once per problem shape).

    Args:
        model: the starting `HMMGLM` (e.g. from `init_hmmglm`); its prior, family and link
            stay as they are.
        spikes: (M, T, N) trials of spike counts (or one trial (T, N)); Poisson counts are
            non-negative integers, Bernoulli bins 0/1.
        num_iters: EM iterations.
        inputs: external covariates (T, U) shared by the trials or (M, T, U).
        lengths: (M,) trial lengths when trials of different lengths are padded to T; the
            padding may hold anything (NaN included) and is ignored.
        key: `jax.random` key for the Gumbel-softmax samples (one-hot prior).
        num_m_steps: Adam steps per M-step (50).
        learning_rate: Adam step size.
        batch_size: time bins (pooled over trials) per Adam step, drawn at random; None
            uses all M * T bins. Subsampling makes the inner loop cheaper; the acceptance test
            always uses all bins, so the objective still never decreases.
        fixed: parameter names to hold ("initial_probs", "transition_matrix",
            "transition_input_weights" of input-driven transitions, or any
            learnable emission field of the model's prior, e.g. "biases").
        progress: show a progress bar (default: when num_iters >= 100).
        return_accepted: also return the (num_iters,) flags of accepted M-steps.

    Returns:
        ``(fitted_model, history)``; history[i] = sum_m log p(x^m) + log prior of the parameters
        entering iteration i, with hard one-hot indicators. It never decreases.
    """
    _check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_m_steps = checks.positive_int(num_m_steps, "num_m_steps")
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate: expected a positive float, got {learning_rate!r}")
    if isinstance(fixed, str):
        fixed = (fixed,)
    learnable = HMMGLM.LEARNABLE[model.prior]
    transition_fields = ("transition_matrix", "transition_input_weights") if model.input_driven else ()
    allowed = ("initial_probs", "transition_matrix") + transition_fields[1:] + learnable
    bad = [f for f in fixed if f not in allowed]
    if bad:
        raise ValueError(f"fixed: unknown parameter names {bad}; expected a subset of {list(allowed)}")
    names = tuple(n for n in learnable if n not in fixed)
    trans_names = tuple(n for n in transition_fields if n not in fixed)
    ys, us, ns, _ = _prepare(model, spikes, inputs, lengths)
    if batch_size is not None:
        batch_size = checks.positive_int(batch_size, "batch_size")
        if batch_size >= ys.shape[0] * ys.shape[1]:
            batch_size = None
    key = jax.random.PRNGKey(0) if key is None else key
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, f"HMM-GLM EM ({model.prior})", show):
        fitted, history, accepted = _fit(model, ys, us, ns, key, jnp.asarray(learning_rate, ys.dtype),
                                         num_iters=num_iters, num_m_steps=num_m_steps, batch_size=batch_size,
                                         names=names, trans_names=trans_names,
                                         fix_pi="initial_probs" in fixed, fix_A="transition_matrix" in fixed,
                                         show=show)
    if return_accepted:
        return fitted, history, accepted
    return fitted, history


@jax.jit
def _loglik(model, ys, us, ns):
    def one(y, u, n):  # the forward pass only
        valid = None if n is None else jnp.arange(y.shape[0]) < n
        return hmm_engine._filter_one(model.discrete_params(y, u), None, valid, False, None)[0]
    return jax.vmap(one, in_axes=(0, None if us is None else 0, None if ns is None else 0))(ys, us, ns)


def hmmglm_log_likelihood(model: HMMGLM, spikes, inputs=None, lengths=None):
    """log p(x^m) of every trial under the model (hard one-hot indicators), conditioning on
    zero spikes before each trial. Returns (M,) for (M, T, N) spikes, or () for (T, N);
    ``lengths`` (M,) as in `fit_hmmglm`."""
    _check_model(model)
    ys, us, ns, batched = _prepare(model, spikes, inputs, lengths)
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


def prune_links(model: HMMGLM, spikes, num_iters: int = 30, *, link_cost="bic", lengths=None, **fit_options):
    """Continue a one-hot fit with a price on every connection switched on, so that links
    whose likelihood gain is below ``link_cost`` nats turn to "none".

    Charging the link cost from the start keeps links from switching on while the states
    are still mixed; charged after a fit has found the states and their strong links, it
    removes the weak spurious links that the relaxed indicators leave at the strength floor.
    ``link_cost="bic"``: 0.5 log(observed bins / K). The objective with the cost is a new
    one; it never decreases within this call. ``fit_options`` go to `fit_hmmglm` (``key``,
    ``inputs``, ``batch_size``, ...).

    Returns:
        ``(fitted_model, history)`` as `fit_hmmglm`; the model keeps ``link_cost``.
    """
    _check_model(model)
    if model.prior != "onehot":
        raise ValueError(f"model: prune_links needs the one-hot prior, got prior {model.prior!r}")
    shape = np.shape(spikes)
    if lengths is not None and len(shape) == 3:
        bins = int(jnp.sum(hmm_engine.check_lengths(lengths, shape[1], shape[0])))
    else:  # fit_hmmglm rejects lengths without a batch of trials
        bins = int(np.prod(shape[:-1]))
    cost = _link_cost(link_cost, bins, model.num_states)  # HMMGLM checks cost >= 0
    return fit_hmmglm(dataclasses.replace(model, link_cost=cost), spikes, num_iters, lengths=lengths, **fit_options)


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


def _without(model, drop):
    """The model with the couplings where ``drop`` (K, N, N) is true switched off."""
    if model.prior == "onehot":  # indicators to "none": q = (e^-30, 1, e^-30), argmax "none"
        none = jnp.asarray([-30.0, 0.0, -30.0], model.adjacency_logits.dtype)
        return eqx.tree_at(lambda m: m.adjacency_logits, model,
                           jnp.where(drop[..., None], none, model.adjacency_logits))
    return eqx.tree_at(lambda m: m.weights, model, jnp.where(drop[..., None], 0.0, model.weights))


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
        return jnp.sum(_loglik(_without(model, droppable & (size <= th)), ys, us, ns))
    lls = lax.map(score, thresholds)
    best = thresholds[jnp.argmax(lls)]  # the first of equal maxima: the smallest threshold
    return ThresholdResult(_without(model, droppable & (size <= best)), best, thresholds, lls)


def threshold_couplings(model: HMMGLM, spikes, *, per_state: bool = True, levels: int = 40, inputs=None,
                        lengths=None) -> ThresholdResult:
    """Set the weak couplings of a fitted HMM-GLM to zero, the threshold chosen by the
    log-likelihood of held-out trials ``spikes`` (validation data, not the training data:
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
    ys, us, ns, _ = _prepare(model, spikes, inputs, lengths)
    return _threshold_scan(model, ys, us, ns, bool(per_state), levels)


def init_hmmglm(key, spikes, num_states: int, *, prior: str = "none", family: str = "poisson",
                link: str = "softplus", basis=None, num_inputs: int = 0, stickiness: float = 0.98,
                weight_scale: float = 0.1, temperature: float = 0.2, min_strength: float = 0.1,
                min_weight_scale: float = 0.1, sparsity: float = 0.0, link_cost=0.0,
                input_driven_transitions: bool = False) -> HMMGLM:
    """A starting point for `fit_hmmglm`: `HMMGLM.create` with the biases at the inverse link of
    each neuron's mean count (so a model without coupling matches the firing rates).

    ``link_cost="bic"`` (one-hot prior) charges each connection switched on in a state
    0.5 log(T_total / K) nats, T_total the number of time bins in ``spikes``: the BIC price of
    the strength parameter it adds, estimated from the bins a state sees on average."""
    y = np.asarray(spikes, float)
    if y.ndim not in (2, 3):
        raise ValueError(f"spikes: expected shape (T, N) or (M, T, N), got shape {y.shape}")
    N = y.shape[-1]
    link_cost = _link_cost(link_cost, int(np.prod(y.shape[:-1])), checks.positive_int(num_states, "num_states"))
    rate = y.reshape(-1, N).mean(0)
    biases = _inverse_link(family, link, rate)
    return HMMGLM.create(key, num_states, N, basis=basis, num_inputs=num_inputs, prior=prior, family=family,
                         link=link, stickiness=stickiness, biases=biases, weight_scale=weight_scale,
                         temperature=temperature, min_strength=min_strength, min_weight_scale=min_weight_scale,
                         sparsity=sparsity, link_cost=link_cost,
                         input_driven_transitions=input_driven_transitions)
