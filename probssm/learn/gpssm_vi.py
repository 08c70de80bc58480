"""Variational learning for `ps.models.GPSSM`: free-form VI by SGHMC and the PRSSM baseline.

Free-form VI (Fan, Bonilla, O'Kane, Sisson, ICML 2023). The joint of the inducing outputs U
(M, d_x), the states x_{0:T-1} and the data under hyperparameters theta (kernel, Z, q, r, C, d,
the initial state) is::

    log p(y, x, U | theta) = log N(U; 0, K_ZZ)                      (one column per output)
                           + log N(x_0; m_1, P_1)
                           + sum_{t>=1} log N(x_t; mu(x_{t-1}) + a_t^T U, (k_tt - k_tZ a_t) + q)
                           + sum_t log N(y_t; C x_t + d, r)          (NaN entries dropped)

with a_t = K_ZZ^{-1} k_Z(x_{t-1}, u_t), the sparse-GP conditional of `GPSSM.conditional_moments`.
q(U, x) is left free: it is represented by a few SGHMC chains (`probssm.learn.sghmc`) targeting
p(U, x | y, theta). The ELBO E_q[log p(y, x, U | theta)] + H[q] has the gradient
E_q[grad_theta log p(y, x, U | theta)] in theta (the entropy does not depend on theta), estimated
by the average over the chains and followed by Adam. The chains sample the whitened
V = L^{-1} U (L L^T = K_ZZ + jitter I) rather than U: V's prior is N(0, I) whatever theta,
which keeps the sampler's scales fixed while Z and the kernel move (q is then free-form on
(V, x), an equally free family). One compiled `lax.scan` runs::

    V, x = 0, C^+ (y - d);  momentum ~ N(0, I)        (per chain)
    SGHMC steps x num_warmup                          (theta fixed; whole rounds)
    for i in range(num_iters):
        SGHMC steps x sghmc_steps                     (each chain, theta fixed)
        objective[i] = mean over chains of log p(y, x, U | theta)
        theta = Adam step along mean over chains of grad_theta log p(y, x, U | theta)
    num_samples rounds of sghmc_steps steps (theta fixed), keeping (U, x) after each
    each kept U redrawn exactly from p(U | x, y, theta)  (a Gibbs step: same target)

Collapsed (``method="collapsed"``): U is integrated out of the chains' target, which becomes
log p(y, x | theta) (`collapsed_log_joint`: per output a Gaussian in the transitions' residuals
with covariance W^T W + D, evaluated by Woodbury in O(T M^2)); the chains run over x alone and
each kept x gets one exact draw of U from its Gaussian conditional.

Particle Gibbs (`gpssm_particle_gibbs`): the states by conditional SMC with ancestor sampling, U
by its exact conditional, theta by an Adam step along the complete-data gradient at each draw.

PRSSM (Doerr et al., ICML 2018): q(U) = N(m_U, S) (the model's ``inducing_mean`` and
``inducing_scale_tril``) and q(x) the prior's own dynamics with U integrated out per step::

    x_0 ~ N(m_1, P_1),   x_t ~ N(mean_t, var_t + q)   (`GPSSM.marginal_moments` of x_{t-1})
    ELBO = E_q[sum_t log p(y_t | x_t)] - KL(q(U) || p(U))

estimated by reparameterised trajectories and maximised by Adam over (m_U, S, theta).

`transition_function_moments` gives the learned f on a set of points from the U samples (mean
over samples; variance = within (the conditional GP variance) + between (the spread of the
conditional means over the samples)), and `gpssm_simulate` runs the learned model freely.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.scipy.linalg import solve_triangular

from probssm.core import checks, params as P, progress as prog
from probssm.inference.smc.csmc import conditional_smc_sequence
from probssm.learn.sghmc import sghmc_init, sghmc_step
from probssm.models.gpssm import AbstractSparseGPSSM

__all__ = ["free_form_vi", "GPSSMVIFit", "GPSSMVIHistory", "FunctionMoments", "transition_function_moments",
           "gpssm_simulate", "gpssm_particle_gibbs"]

_LOG_2PI = float(np.log(2.0 * np.pi))
# q(U)'s own parameters: the free-form posterior replaces them (they are refitted from the samples)
_Q_U_PATHS = ("inducing_mean", "inducing_scale_tril")
# Adam without its learning rate, one instance: the rate enters as a traced scalar, so a new rate
# (or a second call) reuses the compiled loop
_ADAM = optax.scale_by_adam()


class GPSSMVIHistory(NamedTuple):
    """What a fit records.

    Attributes:
        objective: (num_iters,) per iteration: "free_form": the mean over the chains of
            log p(y, x, U | theta) (the ELBO without the entropy of q, which particles do not
            give); "collapsed": the same of log p(y, x | theta); "prssm": the ELBO estimate. Both computed before that iteration's Adam step.
        inducing_outputs: (S, M, d_x) samples of U at the fitted theta ("free_form": chains x
            num_samples; "prssm": draws from q(U)).
        states: (S, T, d_x) the matching samples of x_{0:T-1} ("prssm": trajectories of q(x)).
    """

    objective: jax.Array
    inducing_outputs: jax.Array
    states: jax.Array


class GPSSMVIFit(NamedTuple):
    """What `free_form_vi` returns (unpacks as ``model, history``).

    Attributes:
        model: the fitted `GPSSM`. For "free_form" its q(U) (``inducing_mean``,
            ``inducing_scale_tril``) is the Gaussian with the mean and covariance of the U samples
            (per output), so `GPSSM.marginal_moments` gives the samples' mean and within + between
            variance of f.
        history: a `GPSSMVIHistory`.
    """

    model: AbstractSparseGPSSM
    history: GPSSMVIHistory


class FunctionMoments(NamedTuple):
    """Mean (N, d_x) and variance (N, d_x) of the learned f at N points (without the process noise)."""

    mean: jax.Array
    variance: jax.Array


# ---------------------------------------------------------------------------------------------
# The log joint (free form) and the ELBO estimate (PRSSM)


def _gram_chol(model):
    Z = model.inducing_inputs
    return jnp.linalg.cholesky(model.kernel.gram(Z, Z) + model.jitter * jnp.eye(Z.shape[0], dtype=Z.dtype))


def _gp_inputs(model, x_prev, u_next):
    """(T-1, d_x + d_u) rows (x_{t-1}, u_t) for t = 1..T-1."""
    return x_prev if model.num_inputs == 0 else jnp.concatenate([x_prev, u_next.astype(x_prev.dtype)], axis=-1)


def _mean_fn(model, x, X):
    """mu at the states x (N, d_x) with GP inputs X (N, d_x + d_u) (the linear mean reads X)."""
    if model.mean_function == "linear":
        return X @ model.mean_weights.T + model.mean_offset
    return x if model.mean_function == "identity" else jnp.zeros_like(x)


def _normal_logpdf(x, mean, var):
    return -0.5 * (_LOG_2PI + jnp.log(var) + (x - mean) ** 2 / var)


def _emission_log_lik(model, x, y):
    """sum_t log N(y_t; C x_t + d, r) over the observed (non-NaN) entries; x (T, d_x), y (T, p)."""
    observed = ~jnp.isnan(y)
    mean = x @ model.emission_matrix.T + model.emission_offset
    terms = _normal_logpdf(jnp.where(observed, y, mean), mean, model.emission_noise)
    return jnp.sum(jnp.where(observed, terms, 0.0))


def _initial_log_pdf(model, x0):
    L = jnp.linalg.cholesky(model.initial_cov)
    w = solve_triangular(L, x0 - model.initial_mean, lower=True)
    return -0.5 * (x0.shape[0] * _LOG_2PI + w @ w) - jnp.sum(jnp.log(jnp.diag(L)))


def _transition_terms(model, x, inputs):
    """The transitions x_{t-1} -> x_t given x (T, d_x) as a regression on the whitened U = L V:
    x_t - mu(x_{t-1}) = W[:, t]^T V + N(0, within_t + q), with W = L^{-1} k(Z, X) (M, T-1), X the
    GP inputs (x_{t-1}, u_t), within the sparse-GP conditional variance. Returns (W, within,
    residuals (T-1, d_x), q (d_x,))."""
    L = _gram_chol(model)
    X = _gp_inputs(model, x[:-1], None if inputs is None else inputs[1:])
    W = solve_triangular(L, model.kernel.gram(model.inducing_inputs, X), lower=True)
    within = jnp.maximum(model.kernel.diag(X) - jnp.sum(W * W, axis=0), 0.0)
    resid = x[1:] - _mean_fn(model, x[:-1], X)
    return W, within, resid, jnp.broadcast_to(model.transition_noise, (x.shape[1],))


def log_joint(model, whitened, x, y, inputs):
    """log p(y, x, U | theta) with U = L V (``whitened`` V (M, d_x)), x (T, d_x), y (T, p).

    The prior term is that of V, N(0, I); it differs from log N(U; 0, K_ZZ) by log|L| per output,
    which does not depend on (V, x), so both target the same posterior. The transitions are
    independent given x, so all T-1 of them are evaluated at once (no scan).
    """
    W, within, resid, q = _transition_terms(model, x, inputs)
    prior = -0.5 * jnp.sum(whitened ** 2) - 0.5 * whitened.size * _LOG_2PI
    trans = jnp.sum(_normal_logpdf(resid, W.T @ whitened, within[:, None] + q))  # a^T U = W^T V
    return prior + _initial_log_pdf(model, x[0]) + trans + _emission_log_lik(model, x, y)


def collapsed_log_joint(model, x, y, inputs):
    """log p(y, x | theta) with U integrated out, x (T, d_x), y (T, p).

    Given the states the transitions are a linear-Gaussian observation of the whitened U = L V,
    V ~ N(0, I): per output j, r_j = x_{1:}[:, j] - mu_j(x_{:-1}) ~ N(0, W^T W + D_j) with
    W = L^{-1} k(Z, x_{:-1}) (M, T-1) and D_j = diag(s_t^2 + q_j) (the conditional GP variance plus
    the process noise). Woodbury and the matrix determinant lemma keep it O(T M^2):
    r^T C^{-1} r = sum r^2 / D - |chol(A)^{-1} W (r / D)|^2 and log|C| = sum log D + log|A|,
    A = I + W D^{-1} W^T.
    """
    W, within, resid, q = _transition_terms(model, x, inputs)
    eye = jnp.eye(W.shape[0], dtype=x.dtype)

    def one(r, q_j):
        D = within + q_j
        chol = jnp.linalg.cholesky(eye + (W / D) @ W.T)
        b = solve_triangular(chol, W @ (r / D), lower=True)
        quad = jnp.sum(r * r / D) - b @ b
        logdet = jnp.sum(jnp.log(D)) + 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        return -0.5 * (quad + logdet + r.shape[0] * _LOG_2PI)

    trans = jnp.sum(jax.vmap(one, in_axes=(1, 0))(resid, q))
    return _initial_log_pdf(model, x[0]) + trans + _emission_log_lik(model, x, y)


def _prssm_trajectory(model, key, num_timesteps, inputs):
    """One reparameterised trajectory of q(x): x_0 ~ N(m_1, P_1), then the U-marginal moments."""
    k0, k1 = jax.random.split(key)
    dx = model.state_dim
    dtype = model.initial_mean.dtype
    x0 = model.initial_mean + jnp.linalg.cholesky(model.initial_cov) @ jax.random.normal(k0, (dx,), dtype)
    eps = jax.random.normal(k1, (num_timesteps - 1, dx), dtype)
    rows = jnp.zeros((num_timesteps - 1, 0), dtype) if inputs is None else inputs[1:]
    factors = model.whitened_factors()   # once per trajectory, not per step (and per gradient step)

    def step(x_prev, xs):
        e, u = xs
        mean, var = model.marginal_moments(x_prev, None if inputs is None else u, factors)
        x = mean + jnp.sqrt(var + model.transition_noise) * e
        return x, x

    _, xs = lax.scan(step, x0, (eps, rows))
    return jnp.concatenate([x0[None], xs], axis=0)


def prssm_elbo(model, key, y, inputs, num_samples):
    """The PRSSM ELBO estimate: mean over ``num_samples`` trajectories of the emission
    log-likelihood, minus KL(q(U) || p(U))."""
    keys = jax.random.split(key, num_samples)
    xs = jax.vmap(lambda k: _prssm_trajectory(model, k, y.shape[0], inputs))(keys)
    ll = jax.vmap(lambda x: _emission_log_lik(model, x, y))(xs)
    return jnp.mean(ll) - model.prior_kl(), xs


# ---------------------------------------------------------------------------------------------
# The compiled fits


def _adam_ascent(params, grads, state, learning_rate):
    """One Adam step up the objective (Adam minimises: it is given -grad)."""
    updates, state = _ADAM.update(jax.tree_util.tree_map(jnp.negative, grads), state, params)
    return jax.tree_util.tree_map(lambda p, u: p - learning_rate * u, params, updates), state


def _initial_states(model, y, num_chains, key, start=None):
    """x = ``start`` when given, else C^+ (y - d) with missing entries at the offset (so they add
    0), plus a small jitter per chain; V = small noise. A start near the data keeps the first
    gradients in theta sensible."""
    C = model.emission_matrix
    filled = jnp.where(jnp.isnan(y), model.emission_offset, y)
    x = (filled - model.emission_offset) @ jnp.linalg.pinv(C).T if start is None else start
    kx, kv = jax.random.split(key)
    T, dx = x.shape
    M = model.num_inducing
    xs = x[None] + 0.01 * jax.random.normal(kx, (num_chains, T, dx), x.dtype)
    vs = 0.01 * jax.random.normal(kv, (num_chains, M, dx), x.dtype)
    return vs, xs


def _sample_moments(U):
    """Per-output mean (M, d_x) and Cholesky factors (d_x, M, M) of the samples U (S, M, d_x),
    with a small ridge so that fewer samples than M still give a valid factor."""
    mean = jnp.mean(U, axis=0)
    c = U - mean
    cov = jnp.einsum("smj,snj->jmn", c, c) / U.shape[0]
    M = U.shape[1]
    scale = jnp.trace(cov, axis1=-2, axis2=-1)[:, None, None] / M
    ridge = (1e-6 * scale + 1e-10) * jnp.eye(M, dtype=U.dtype)
    return mean, jnp.linalg.cholesky(cov + ridge)


@eqx.filter_jit
def _fit_free_form(model, y, inputs, key, scalars, start, *, fixed, num_iters, num_chains, sghmc_steps,
                   warmup_rounds, num_samples, show, collapsed=False):
    step_size, friction, learning_rate = scalars
    spec = P.spec(model, fixed)
    params = P.to_unconstrained(model, spec)
    k_init, k_mom, k_run = jax.random.split(key, 3)
    vs, xs = _initial_states(model, y, num_chains, k_init, start)
    states = jax.vmap(sghmc_init)(jax.random.split(k_mom, num_chains), (vs, xs))
    every = prog.report_every(num_iters)
    first, last = warmup_rounds, warmup_rounds + num_iters   # rounds [first, last) take Adam steps
    total = last + num_samples

    def objective(m, position):
        if collapsed:  # log p(y, x | theta): U integrated out
            return collapsed_log_joint(m, position[1], y, inputs)
        return log_joint(m, position[0], position[1], y, inputs)

    def target(m, position):
        if collapsed:  # V is left to its N(0, I) prior (it does not enter) and redrawn given x at the end
            return objective(m, position) - 0.5 * jnp.sum(position[0] ** 2)
        return objective(m, position)

    def sghmc_round(m, states, key):
        grad = jax.grad(lambda pos: target(m, pos))

        def one(s, k):
            s = jax.vmap(lambda kk, ss: sghmc_step(kk, ss, grad(ss.position), step_size=step_size,
                                                   friction=friction))(jax.random.split(k, num_chains), s)
            return s, None

        return lax.scan(one, states, jax.random.split(key, sghmc_steps))[0]

    def mean_target(params, positions):
        m = P.from_unconstrained(model, spec, params)
        return jnp.mean(jax.vmap(lambda v, x: objective(m, (v, x)))(*positions))

    # Warm-up, fitting and keeping samples are one scan over rounds (one copy of the sampler in the
    # compiled graph): every round moves the chains; only the fitting rounds move theta, and the
    # last num_samples rounds write the chains' positions into a buffer.
    def round_(carry, xs):
        params, adam, states, kept = carry
        r, k = xs
        states = sghmc_round(P.from_unconstrained(model, spec, params), states, k)
        value, grads = jax.value_and_grad(mean_target)(params, states.position)
        new_params, new_adam = _adam_ascent(params, grads, adam, learning_rate)
        fitting = (r >= first) & (r < last)
        params, adam = jax.tree_util.tree_map(lambda a, b: jnp.where(fitting, a, b), (new_params, new_adam),
                                              (params, adam))
        slot = jnp.clip(r - last, 0, num_samples - 1)
        kept = jax.tree_util.tree_map(
            lambda buf, pos: jnp.where(r >= last, lax.dynamic_update_index_in_dim(buf, pos, slot, 0), buf),
            kept, states.position)
        if show:
            prog.report(jnp.clip(r - first, 0, num_iters - 1), value, every)
        return (params, adam, states, kept), value

    kept = jax.tree_util.tree_map(lambda a: jnp.zeros((num_samples,) + a.shape, a.dtype), states.position)
    carry = (params, _ADAM.init(params), states, kept)
    (params, _, _, (vs, xs)), values = lax.scan(round_, carry, (jnp.arange(total), jax.random.split(k_run, total)))
    fitted = P.from_unconstrained(model, spec, params)
    L = _gram_chol(fitted)
    xs = xs.reshape((-1,) + xs.shape[2:])
    vs = vs.reshape((-1,) + vs.shape[2:])
    # U | x is Gaussian: every kept state path gets one exact draw of U. For "collapsed" that is
    # the only U there is; for "free_form" it is a Gibbs step on U, which leaves the chains' target
    # p(U, x | y, theta) invariant and replaces the slowly mixing SGHMC coordinates of U (on the
    # sysid records it lowered dryer's free-simulation RMSE from 0.079-0.093 to 0.077-0.078)
    keys = jax.random.split(jax.random.fold_in(k_run, 1), xs.shape[0])
    vs = jax.vmap(lambda k, x: _whitened_posterior_draw(k, fitted, x, inputs))(keys, xs)
    U = jnp.einsum("mn,snj->smj", L, vs)   # (S * chains, M, d_x)
    mean, tril = _sample_moments(U)
    fitted = eqx.tree_at(lambda m: (m.inducing_mean, m.inducing_scale_tril), fitted, (mean, tril))
    return fitted, GPSSMVIHistory(values[first:last], U, xs)


@eqx.filter_jit
def _fit_prssm(model, y, inputs, key, scalars, *, fixed, num_iters, num_chains, num_samples, show):
    learning_rate = scalars[2]
    spec = P.spec(model, fixed)
    params = P.to_unconstrained(model, spec)
    every = prog.report_every(num_iters)
    k_run, k_u, k_x = jax.random.split(key, 3)

    def objective(params, k):
        return prssm_elbo(P.from_unconstrained(model, spec, params), k, y, inputs, num_chains)[0]

    def iteration(carry, xs):
        params, adam = carry
        i, k = xs
        value, grads = jax.value_and_grad(objective)(params, k)
        params, adam = _adam_ascent(params, grads, adam, learning_rate)
        if show:
            prog.report(i, value, every)
        return (params, adam), value

    (params, _), values = lax.scan(iteration, (params, _ADAM.init(params)),
                                   (jnp.arange(num_iters), jax.random.split(k_run, num_iters)))
    fitted = P.from_unconstrained(model, spec, params)
    n = num_chains * num_samples
    U = jax.vmap(fitted.sample_inducing_outputs)(jax.random.split(k_u, n))
    xs = prssm_elbo(fitted, k_x, y, inputs, n)[1]
    return fitted, GPSSMVIHistory(values, U, xs)


# ---------------------------------------------------------------------------------------------
# The public functions


def _check_model(model, name="model"):
    if not isinstance(model, AbstractSparseGPSSM):
        raise ValueError(f"{name}: expected a ps.models.GPSSM, got {type(model).__name__}")
    model.check_parameters(name)
    checks.psd(model.initial_cov, f"{name}.initial_cov")
    checks.finite(model.initial_mean, f"{name}.initial_mean")


def _check_emissions(model, emissions):
    y = jnp.asarray(emissions)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(model.inducing_mean.dtype)
    p = model.emission_dim
    if y.ndim != 2 or y.shape[1] != p:
        raise ValueError(f"emissions: expected shape (T, {p}) (model.emission_dim = {p}), got {tuple(y.shape)}")
    if y.shape[0] < 2:
        raise ValueError(f"emissions: expected at least 2 time steps, got {y.shape[0]}")
    if not checks.is_concrete(y):  # inside a caller's jit / vmap: shapes only
        return y.astype(model.inducing_mean.dtype)
    a = np.asarray(y)
    if np.any(np.isinf(a)):
        raise ValueError("emissions: expected finite values or NaN (missing), found inf")
    if np.all(np.isnan(a)):
        raise ValueError("emissions: every entry is NaN (missing); nothing to fit")
    return y.astype(model.inducing_mean.dtype)


def _check_inputs(model, inputs, num_timesteps):
    du = model.input_dim
    if du == 0:
        if inputs is not None:
            raise ValueError("inputs: this model reads no inputs (input_dim = 0); expected None")
        return None
    if inputs is None:
        raise ValueError(f"inputs: the model reads input rows of width {du}; expected ({num_timesteps}, {du}), got None")
    u = jnp.asarray(inputs)
    if u.ndim != 2 or u.shape != (num_timesteps, du):
        raise ValueError(f"inputs: expected shape ({num_timesteps}, {du}) (row t drives x_(t-1) -> x_t), "
                         f"got {tuple(u.shape)}")
    checks.finite(u, "inputs")
    return u.astype(model.inducing_mean.dtype)


def _check_initial_states(model, initial_states, num_timesteps):
    if initial_states is None:
        return None
    x = jnp.asarray(initial_states)
    dx = model.state_dim
    if x.shape != (num_timesteps, dx):
        raise ValueError(f"initial_states: expected shape ({num_timesteps}, {dx}) (T, d_x), got {tuple(x.shape)}")
    checks.finite(x, "initial_states")
    return x.astype(model.inducing_mean.dtype)


def free_form_vi(key, model: AbstractSparseGPSSM, emissions, num_iters: int, *, inputs=None, num_chains: int = 4,
                 sghmc_steps: int = 5, num_warmup: int = 200, num_samples: int = 50, step_size: float = 0.02,
                 friction: float = 5.0, learning_rate: float = 1e-2, fixed=(), method: str = "free_form",
                 initial_states=None, progress: Optional[bool] = None) -> GPSSMVIFit:
    """Fit a `GPSSM` by free-form variational inference (SGHMC particles) or the PRSSM baseline.

    Args:
        key: a `jax.random` key.
        model: the starting `GPSSM` (not modified).
        emissions: (T, p), T >= 2; NaN entries are missing (their log-likelihood terms dropped).
        num_iters: Adam steps on theta (one compiled `lax.scan`).
        inputs: (T, d_u) when the model reads inputs (row t drives x_{t-1} -> x_t), else None.
        num_chains: "free_form": parallel SGHMC chains (vmapped); "prssm": trajectories per
            ELBO estimate.
        sghmc_steps: "free_form": SGHMC steps per chain between Adam steps.
        num_warmup: "free_form": SGHMC steps before the first Adam step (theta at its start),
            rounded up to whole rounds of ``sghmc_steps``.
        num_samples: rounds of ``sghmc_steps`` steps after the fit (theta fixed), each keeping
            every chain's (U, x): ``num_chains * num_samples`` samples in the history.
        step_size: SGHMC step size eps > 0 (whitened U and x share it; it must resolve the
            stiffest direction, about sqrt(q) for the states).
        friction: SGHMC friction alpha > 0, eps * alpha <= 1.
        learning_rate: Adam's learning rate on the unconstrained theta (> 0).
        fixed: dotted paths of the model's learnable arrays to hold (e.g.
            ``("emission_offset", "initial_mean", "initial_cov")``). For "free_form"
            ``inducing_mean`` and ``inducing_scale_tril`` are never learned by Adam (the particles
            are q(U)); they are set from the samples at the end.
        method: "free_form", "collapsed" (the chains run over x alone, with U integrated out of
            the target by `collapsed_log_joint`) or "prssm". For both SGHMC methods every kept x
            gets one exact draw of U from its Gaussian conditional at the end (for "free_form" a
            Gibbs step that leaves the chains' target invariant and mixes U better than SGHMC).
        initial_states: (T, d_x) where the chains start ("free_form", "collapsed"), e.g. the
            smoothed states of a linear-Gaussian fit; None: x = C^+ (y - d).
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        `GPSSMVIFit` ``(model, history)``: the fitted model and a `GPSSMVIHistory` (the objective
        per iteration and the final samples of (U, x_{0:T-1})).

    Raises:
        ValueError: naming the argument: a model that is not a `GPSSM` or holds invalid values
            (also after ``eqx.tree_at``); emissions not (T, model.emission_dim), T < 2, inf or all
            NaN; inputs of the wrong shape (or given to a model that reads none); num_iters < 1;
            non-positive step_size, friction or learning_rate, step_size * friction > 1; an unknown
            method or fixed path; initial_states not (T, d_x) or not finite.

    The first call compiles; later calls with data and settings of the same shapes (new values of
    the data, key, step_size, friction, learning_rate included) reuse the compiled loop.

    Example:
        >>> model = ps.models.GPSSM(ps.models.ARDSquaredExponential(jnp.ones(1)), jnp.linspace(-3, 1, 15)[:, None],
        ...                         jnp.zeros((15, 1)), 0.05, 0.1, mean_function="zero")
        >>> fitted, history = free_form_vi(jax.random.key(0), model, y, 2000, fixed=("emission_offset",))
        >>> f = transition_function_moments(fitted, history.inducing_outputs, jnp.linspace(-3, 1, 50)[:, None])
    """
    _check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_chains = checks.positive_int(num_chains, "num_chains")
    sghmc_steps = checks.positive_int(sghmc_steps, "sghmc_steps")
    num_warmup = checks.positive_int(num_warmup, "num_warmup", minimum=0)
    num_samples = checks.positive_int(num_samples, "num_samples")
    eps = checks.positive_float(step_size, "step_size")
    alpha = checks.positive_float(friction, "friction")
    lr = checks.positive_float(learning_rate, "learning_rate")
    if eps * alpha > 1.0:
        raise ValueError(f"friction: expected step_size * friction <= 1, got {eps} * {alpha} = {eps * alpha:.3g}")
    if method not in ("free_form", "collapsed", "prssm"):
        raise ValueError(f"method: expected 'free_form', 'collapsed' or 'prssm', got {method!r}")
    y = _check_emissions(model, emissions)
    u = _check_inputs(model, inputs, y.shape[0])
    start = _check_initial_states(model, initial_states, y.shape[0])
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    P.spec(model, fixed)  # unknown paths raise here, naming `fixed`
    if method != "prssm":
        fixed = fixed + tuple(p for p in _Q_U_PATHS if p not in fixed)
    if not P.spec(model, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    dtype = model.inducing_mean.dtype
    scalars = tuple(jnp.asarray(v, dtype) for v in (eps, alpha, lr))
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "PRSSM" if method == "prssm" else "GPSSM VI", show):
        if method != "prssm":
            out = _fit_free_form(model, y, u, key, scalars, start, fixed=fixed, num_iters=num_iters, num_chains=num_chains,
                                 sghmc_steps=sghmc_steps, warmup_rounds=-(-num_warmup // sghmc_steps),
                                 num_samples=num_samples, show=show, collapsed=method == "collapsed")
        else:
            out = _fit_prssm(model, y, u, key, scalars, fixed=fixed, num_iters=num_iters, num_chains=num_chains,
                             num_samples=num_samples, show=show)
    return GPSSMVIFit(*out)


@eqx.filter_jit
def _function_moments(model, U, X):
    L = _gram_chol(model)
    W = solve_triangular(L, model.kernel.gram(model.inducing_inputs, X), lower=True)   # (M, N)
    A = solve_triangular(L.T, W, lower=False)                                          # K_ZZ^{-1} K_ZX
    within = jnp.maximum(model.kernel.diag(X) - jnp.sum(W * W, axis=0), 0.0)           # (N,)
    means = jnp.einsum("mn,smj->snj", A, U)                                            # (S, N, d_x)
    base = _mean_fn(model, X[:, :model.state_dim], X)
    return FunctionMoments(base + jnp.mean(means, axis=0), within[:, None] + jnp.var(means, axis=0))


def _inducing_stack(inducing_outputs, M, dx, dtype):
    """(S, M, d_x) samples of U from (S, M, d_x) or one (M, d_x)."""
    U = jnp.asarray(inducing_outputs, dtype)
    if U.ndim == 2:
        U = U[None]
    if U.ndim != 3 or U.shape[1:] != (M, dx):
        raise ValueError(f"inducing_outputs: expected (S, {M}, {dx}) or ({M}, {dx}), got {tuple(jnp.shape(inducing_outputs))}")
    return U


def transition_function_moments(model: AbstractSparseGPSSM, inducing_outputs, points, inputs=None) -> FunctionMoments:
    """The learned f(x, u) = mu(x) + g(x, u) at N points, with U averaged over samples.

    Given samples U_s, f's sparse-GP conditional is N(mu(x) + a(x)^T U_s, k(x, x) - k(x, Z) a(x)).
    Over the samples, mean = mu(x) + mean_s a^T U_s and variance = the conditional variance
    (within) + the variance over s of a^T U_s (between). The process noise q is not included.

    Args:
        model: a `GPSSM` (its hyperparameters; its q(U) is not read).
        inducing_outputs: (S, M, d_x) samples of U (e.g. ``history.inducing_outputs``) or one
            (M, d_x).
        points: (N, d_x) states x.
        inputs: (N, d_u) inputs u paired with the points, when the model reads inputs.

    Returns:
        `FunctionMoments` (mean (N, d_x), variance (N, d_x)).

    Raises:
        ValueError: naming the argument, for shapes that do not fit the model.
    """
    _check_model(model)
    M, dx = model.num_inducing, model.state_dim
    U = _inducing_stack(inducing_outputs, M, dx, model.inducing_mean.dtype)
    X = jnp.asarray(points, U.dtype)
    if X.ndim != 2 or X.shape[1] != dx:
        raise ValueError(f"points: expected shape (N, {dx}), got {tuple(X.shape)}")
    if model.input_dim:
        if inputs is None or jnp.shape(inputs) != (X.shape[0], model.input_dim):
            raise ValueError(f"inputs: expected shape ({X.shape[0]}, {model.input_dim}), got "
                             f"{None if inputs is None else tuple(jnp.shape(inputs))}")
        X = jnp.concatenate([X, jnp.asarray(inputs, U.dtype)], axis=1)
    elif inputs is not None:
        raise ValueError("inputs: this model reads no inputs; expected None")
    return _function_moments(model, U, X)


@eqx.filter_jit
def _simulate(model, U, x0, keys, inputs, num_steps):
    def one(U, key):
        m = model.with_inducing_outputs(U)
        rows = jnp.zeros((num_steps, 0), x0.dtype) if inputs is None else inputs

        def step(x, xs):
            k, u = xs
            mean, var = m.conditional_moments(x, None if inputs is None else u)
            x = mean + jnp.sqrt(var + m.transition_noise) * jax.random.normal(k, x.shape, x.dtype)
            return x, x

        return lax.scan(step, x0, (jax.random.split(key, num_steps), rows))[1]

    return jax.vmap(one)(U, keys)


def gpssm_simulate(key, model: AbstractSparseGPSSM, inducing_outputs, x0, num_steps: int, inputs=None) -> jax.Array:
    """Free simulation of the learned dynamics: one trajectory per U sample.

    For each sample U_s: x_t ~ N(mu(x_{t-1}) + a^T U_s, k - k a + q), t = 1..num_steps, from x0
    (each step draws f afresh from the conditional given U_s, the FITC-style transition of
    `GPSSM.transition`).

    Args:
        key: a `jax.random` key.
        model: a `GPSSM`.
        inducing_outputs: (S, M, d_x) samples of U (or one (M, d_x)).
        x0: (d_x,) the starting state.
        num_steps: steps to simulate (>= 1).
        inputs: (num_steps, d_u) when the model reads inputs (row t drives step t).

    Returns:
        (S, num_steps, d_x) states x_1..x_num_steps.

    Raises:
        ValueError: naming the argument, for shapes that do not fit the model.
    """
    _check_model(model)
    num_steps = checks.positive_int(num_steps, "num_steps")
    M, dx = model.num_inducing, model.state_dim
    U = _inducing_stack(inducing_outputs, M, dx, model.inducing_mean.dtype)
    x0 = jnp.asarray(x0, U.dtype)
    if x0.shape != (dx,):
        raise ValueError(f"x0: expected shape ({dx},), got {tuple(x0.shape)}")
    u = _check_inputs(model, inputs, num_steps)
    return _simulate(model, U, x0, jax.random.split(key, U.shape[0]), u, num_steps)


# ---------------------------------------------------------------------------------------------
# Particle Gibbs over (x, U) with stochastic-approximation learning of theta


def _whitened_posterior_draw(key, model, x, inputs):
    """A draw of the whitened inducing outputs V (M, d_x), U = L V, from p(V | x, theta): given
    the states every transition is a linear-Gaussian observation of V,
    x_t[j] - mu_j(x_{t-1}) = w_t^T V[:, j] + N(0, s_t^2 + q_j) with w_t = L^{-1} k(Z, x_{t-1}) and
    s_t^2 the sparse-GP conditional variance, so V[:, j] | x ~ N(A^{-1} W D^{-1} r_j, A^{-1}) with
    A = I + W D^{-1} W^T (one M x M Cholesky per output)."""
    W, within, resid, q = _transition_terms(model, x, inputs)
    dx, M = x.shape[1], W.shape[0]
    eye = jnp.eye(M, dtype=x.dtype)

    def one(r_j, q_j, k):
        prec = 1.0 / (within + q_j)
        chol = jnp.linalg.cholesky(eye + (W * prec) @ W.T)
        mean = jax.scipy.linalg.cho_solve((chol, True), W @ (prec * r_j))
        return mean + solve_triangular(chol.T, jax.random.normal(k, (M,), x.dtype), lower=False)

    return jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)(resid, q, jax.random.split(key, dx))


@eqx.filter_jit
def _fit_particle_gibbs(model, y, inputs, key, learning_rate, start, *, fixed, num_iters, num_particles,
                        num_samples, show):
    spec = P.spec(model, fixed)
    params = P.to_unconstrained(model, spec)
    k_init, k_run = jax.random.split(key)
    vs, xs = _initial_states(model, y, 1, k_init, start)
    every = prog.report_every(num_iters)
    total = num_iters + num_samples

    def iteration(carry, xs_):
        params, adam, v, x, kept = carry
        r, k = xs_
        k_x, k_v = jax.random.split(k)
        m = P.from_unconstrained(model, spec, params)
        # x | U, y: one conditional-SMC sweep with ancestor sampling on the model conditioned on U
        sweep = conditional_smc_sequence(k_x, m.with_inducing_outputs(_gram_chol(m) @ v), y, inputs, reference=x,
                                         num_particles=num_particles)
        x = sweep.reference
        v = _whitened_posterior_draw(k_v, m, x, inputs)  # U | x: conjugate
        # theta: an Adam step along grad log p(y, x, V | theta) at the draw (Fisher's identity: its
        # expectation under p(x, V | y, theta) is the gradient of log p(y | theta))
        value, grads = jax.value_and_grad(lambda p: log_joint(P.from_unconstrained(model, spec, p), v, x, y,
                                                             inputs))(params)
        new_params, new_adam = _adam_ascent(params, grads, adam, learning_rate)
        fitting = r < num_iters
        params, adam = jax.tree_util.tree_map(lambda a, b: jnp.where(fitting, a, b), (new_params, new_adam),
                                              (params, adam))
        slot = jnp.clip(r - num_iters, 0, num_samples - 1)
        kept = jax.tree_util.tree_map(
            lambda buf, pos: jnp.where(r >= num_iters, lax.dynamic_update_index_in_dim(buf, pos, slot, 0), buf),
            kept, (v, x))
        if show:
            prog.report(jnp.clip(r, 0, num_iters - 1), value, every)
        return (params, adam, v, x, kept), value

    kept = (jnp.zeros((num_samples,) + vs.shape[1:], vs.dtype), jnp.zeros((num_samples,) + xs.shape[1:], xs.dtype))
    carry = (params, _ADAM.init(params), vs[0], xs[0], kept)
    (params, _, _, _, (v_kept, x_kept)), values = lax.scan(iteration, carry,
                                                           (jnp.arange(total), jax.random.split(k_run, total)))
    fitted = P.from_unconstrained(model, spec, params)
    U = jnp.einsum("mn,snj->smj", _gram_chol(fitted), v_kept)
    mean, tril = _sample_moments(U)
    fitted = eqx.tree_at(lambda m: (m.inducing_mean, m.inducing_scale_tril), fitted, (mean, tril))
    return fitted, GPSSMVIHistory(values[:num_iters], U, x_kept)


def gpssm_particle_gibbs(key, model: AbstractSparseGPSSM, emissions, num_iters: int, *, inputs=None,
                         num_particles: int = 32, num_samples: int = 200, learning_rate: float = 1e-2, fixed=(),
                         initial_states=None, progress: Optional[bool] = None) -> GPSSMVIFit:
    """Learn a `GPSSM`'s transition function by particle Gibbs (Frigola, Lindsten, Schoen &
    Rasmussen, NeurIPS 2013, with inducing points): a Gibbs sampler over the states and the
    inducing outputs, with the hyperparameters learned along the way by stochastic approximation.

    Each iteration:

    1. x_{0:T-1} | U, y: one conditional-SMC sweep with ancestor sampling
       (`ps.smc.conditional_smc_sequence`) on the model conditioned on U;
    2. U | x: an exact draw from its Gaussian conditional (whitened, U = L V with L the Cholesky
       factor of k(Z, Z));
    3. theta (kernel, Z, Q, R, ... minus ``fixed``): one Adam step along
       grad_theta log p(y, x, V | theta) at the draw. By Fisher's identity its expectation under
       the sampler's target is grad log p(y | theta), so theta climbs the marginal likelihood while
       (x, V) keep sampling its posterior.

    After ``num_iters`` iterations theta is held and ``num_samples`` more iterations keep (U, x);
    the fitted model's q(U) is set to their per-output mean and covariance.

    Args:
        key: a `jax.random` key.
        model: the starting `GPSSM` (not modified).
        emissions: (T, p), T >= 2; NaN entries are missing.
        num_iters: iterations that move theta (static).
        inputs: (T, d_u) when the model reads inputs (row t drives x_{t-1} -> x_t), else None.
        num_particles: N >= 2 conditional-SMC particles (static).
        num_samples: iterations kept after the fit (static).
        learning_rate: Adam's learning rate on the unconstrained theta (> 0).
        fixed: dotted paths held at their values (``inducing_mean`` and ``inducing_scale_tril``
            are never learned by Adam: the samples are the posterior of U).
        initial_states: (T, d_x) the first reference path; None: x = C^+ (y - d).
        progress: progress bar (default: when num_iters >= 100).

    Returns:
        `GPSSMVIFit` ``(model, history)``: ``history.objective`` (num_iters,) is
        log p(y, x, V | theta) at each iteration's draw (a diagnostic), ``history.inducing_outputs``
        (num_samples, M, d_x) and ``history.states`` (num_samples, T, d_x) the kept draws; pass
        them to `transition_function_moments`.

    Raises:
        ValueError: naming the argument, as `free_form_vi` (model, emissions, inputs, fixed,
            initial_states), and ``num_particles`` < 2, non-positive ``num_iters``, ``num_samples``
            or ``learning_rate``.
    """
    _check_model(model)
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_samples = checks.positive_int(num_samples, "num_samples")
    num_particles = checks.positive_int(num_particles, "num_particles")
    if num_particles < 2:
        raise ValueError(f"num_particles: expected an int >= 2, got {num_particles}")
    lr = checks.positive_float(learning_rate, "learning_rate")
    y = _check_emissions(model, emissions)
    u = _check_inputs(model, inputs, y.shape[0])
    start = _check_initial_states(model, initial_states, y.shape[0])
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    P.spec(model, fixed)  # unknown paths raise here, naming `fixed`
    fixed = fixed + tuple(p for p in _Q_U_PATHS if p not in fixed)
    if not P.spec(model, fixed).paths:
        raise ValueError("fixed: every learnable array is fixed; nothing to fit")
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "GPSSM particle Gibbs", show):
        out = _fit_particle_gibbs(model, y, u, key, jnp.asarray(lr, model.inducing_mean.dtype), start, fixed=fixed,
                                  num_iters=num_iters, num_particles=num_particles, num_samples=num_samples, show=show)
    return GPSSMVIFit(*out)
