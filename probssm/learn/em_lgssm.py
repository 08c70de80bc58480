"""EM for any linear-Gaussian model (`ps.core.AbstractLinearGaussianSSM`).

E-step: the RTS smoother core (`ps.kalman.smoother_params`) gives, per sequence,
E[z_t], E[z_t z_t^T] and E[z_{t+1} z_t^T]. Missing entries of y_t are latent too:
given z_t and the observed entries, y_t = A_t z_t + c_t + noise with

    J_t = R Rinv_obs   (Rinv_obs: inverse of the observed block, zero elsewhere)
    A_t = (I - J_t) H,   c_t = (I - J_t) d_t + J_t y_t,   Cov = R - J_t R,

so E[y_t], E[y_t z_t^T] and E[y_t y_t^T] are closed-form (a fully observed row
gives back y_t itself). Steps beyond a sequence's length (``lengths=``) get weight 0.

M-step: the model's closed form `model.m_step(moments, fixed)` where it declares one
(`LinearGaussianSSM`: joint linear regressions); otherwise a generalised M-step,
L-BFGS steps on the expected complete-data log-likelihood

    Q(theta) = E[log N(z_0; m_1, P_1)] + sum_t E[log N(z_t; F_t z_{t-1} + b_t, Q_t)]
               + sum_t E[log N(y_t; H_t z_t + d_t, R_t)]

(from `model.linear_gaussian_params`) over the unconstrained free arrays of
`ps.core.params.spec(model, fixed)`; a step is kept only when it raises Q, so the
log-likelihood never decreases. The loop over iterations is one `lax.scan`,
compiled once per (shapes, fixed set).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core import checks, params as pspec, progress as prog
from probssm.core.batching import Batch
from probssm.core.linalg import cholesky, cho_solve_lower, symmetrize
from probssm.core.protocol import AbstractLinearGaussianSSM, LinearGaussianParams
from probssm.inference import kalman
from probssm.models.lgssm import LinearGaussianMoments

__all__ = ["em_lgssm", "posterior_moments", "expected_log_joint"]

_LOG_2PI = 1.8378770664093453


def posterior_moments(params: LinearGaussianParams, emissions, length=None):
    """E-step of one sequence: its `LinearGaussianMoments` (without the batch axis, inputs None)
    and its log-likelihood. ``emissions`` (T, p), NaN = missing; ``length`` (optional int, may be
    traced) marks steps at and beyond it as padding (weight 0)."""
    y = kalman.mask_padding(jnp.asarray(emissions), length)
    num_timesteps = y.shape[0]
    post = kalman.smoother_params(params, y)
    mu, S = post.smoothed_means, post.smoothed_covs
    Ezz = S + jnp.einsum("ti,tj->tij", mu, mu)
    Ez1z0 = post.smoothed_cross_covs + jnp.einsum("ti,tj->tij", mu[1:], mu[:-1])
    p = kalman.expand_time(params, num_timesteps)
    mask = ~jnp.isnan(y)
    obs = mask.astype(y.dtype)
    y0 = jnp.where(mask, y, 0.0)

    def emission_moments(H, d, R, o, y0, m, Ezz):
        R_obs = R * o[:, None] * o[None, :] + jnp.diag(1.0 - o)
        Rinv_obs = jnp.linalg.inv(R_obs) * o[:, None] * o[None, :]
        J = R @ Rinv_obs
        I = jnp.eye(R.shape[0], dtype=R.dtype)
        A = (I - J) @ H
        c = (I - J) @ d + J @ y0
        Ey = A @ m + c
        Eyz = A @ Ezz + jnp.outer(c, m)
        Am = A @ m
        Eyy = A @ Ezz @ A.T + jnp.outer(Am, c) + jnp.outer(c, Am) + jnp.outer(c, c) + symmetrize(R - J @ R)
        return Ey, Eyz, Eyy

    Ey, Eyz, Eyy = jax.vmap(emission_moments)(p.emission_matrix, p.emission_offset, p.emission_cov, obs, y0, mu,
                                              Ezz)
    if length is None:
        weights = jnp.ones(num_timesteps, y.dtype)
    else:
        weights = (jnp.arange(num_timesteps) < length).astype(y.dtype)
    return LinearGaussianMoments(mu, Ezz, Ez1z0, Ey, Eyz, Eyy, None, weights), post.log_likelihood


def _expected_gauss(cov, second):
    """E[log N(r; 0, cov)] given E[r r^T] = second."""
    L = cholesky(cov)
    return -0.5 * (jnp.trace(cho_solve_lower(L, second)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
                   + cov.shape[-1] * _LOG_2PI)


def _affine_second(W, c, Ea, Eab, Eb, Ebb, Eaa):
    """E[r r^T] for r = a - W b - c given E[a], E[a b^T], E[b], E[b b^T], E[a a^T]."""
    Wb = W @ Eb
    cross = Eab @ W.T  # E[a b^T] W^T
    out = (Eaa - cross - cross.T + W @ Ebb @ W.T - jnp.outer(Ea - Wb, c) - jnp.outer(c, Ea - Wb)
           + jnp.outer(c, c))
    return symmetrize(out)


def expected_log_joint(params: LinearGaussianParams, moments: LinearGaussianMoments) -> jax.Array:
    """Q = E[log p(z, y)] of one sequence under ``params``, from its posterior moments
    (single sequence: moments without the batch axis). Traceable; differentiable in params."""
    T = moments.z.shape[0]
    p = kalman.expand_time(params, T)
    w = moments.weights
    m1, z0 = params.initial_mean, moments.z[0]
    init = _expected_gauss(params.initial_cov, symmetrize(moments.zz[0] - jnp.outer(z0, m1) - jnp.outer(m1, z0)
                                                          + jnp.outer(m1, m1)))

    def trans(F, b, Q, Ez, Ezz, Ez1z0, Ezp, Ezzp):
        return _expected_gauss(Q, _affine_second(F, b, Ez, Ez1z0, Ezp, Ezzp, Ezz))

    def emit(H, d, R, Ey, Eyy, Eyz, Ez, Ezz):
        return _expected_gauss(R, _affine_second(H, d, Ey, Eyz, Ez, Ezz, Eyy))

    ll_t = jax.vmap(trans)(p.transition_matrix[1:], p.transition_offset[1:], p.transition_cov[1:], moments.z[1:],
                           moments.zz[1:], moments.z1z0, moments.z[:-1], moments.zz[:-1])
    ll_e = jax.vmap(emit)(p.emission_matrix, p.emission_offset, p.emission_cov, moments.y, moments.yy, moments.yz,
                          moments.z, moments.zz)
    return init + jnp.sum(w[1:] * ll_t) + jnp.sum(w * ll_e)


def _generalised_m_step(model, moments: LinearGaussianMoments, spec, num_steps: int):
    """L-BFGS on -Q over the unconstrained free arrays; the result is kept only if Q rises."""
    if not spec.paths:
        return model
    T = moments.z.shape[1]
    total = jnp.sum(moments.weights)

    def q_of(m):
        def one(mom):
            return expected_log_joint(m.linear_gaussian_params(T, mom.inputs), mom)

        return jnp.sum(jax.vmap(one)(moments))

    def loss(free):
        return -q_of(pspec.from_unconstrained(model, spec, free)) / total

    start = pspec.to_unconstrained(model, spec)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(x, updates), state), None

    (x, _), _ = lax.scan(step, (start, opt.init(start)), None, length=num_steps)
    candidate = pspec.from_unconstrained(model, spec, x)
    q_old, q_new = q_of(model), q_of(candidate)
    better = jnp.isfinite(q_new) & (q_new >= q_old)
    kept = tuple(jnp.where(better, pspec.get(candidate, p), pspec.get(model, p)) for p in spec.paths)
    return pspec.replace(model, spec.paths, kept)


@partial(jax.jit, static_argnames=("num_iters", "fixed", "batched", "inputs_batched", "show", "m_step_iters"))
def _fit(model, ys, inputs, lengths, *, num_iters, fixed, batched, inputs_batched, show, m_step_iters):
    every = prog.report_every(num_iters)
    batch = Batch(ys, inputs, lengths, batched, inputs_batched)
    spec = pspec.spec(model, fixed)

    def e_step(model):
        def one(y, u, n):
            params = model.linear_gaussian_params(y.shape[0], u)
            mom, ll = posterior_moments(params, y, n)
            return mom._replace(inputs=u), ll

        mom, ll = batch.map(one)
        if not batched:
            mom, ll = jax.tree_util.tree_map(lambda a: a[None], (mom, ll))
        return mom, jnp.sum(ll)

    def step(model, i):
        moments, ll = e_step(model)
        if show:
            prog.report(i, ll, every)
        new = model.m_step(moments, fixed)
        if new is None:
            new = _generalised_m_step(model, moments, spec, m_step_iters)
        return new, ll

    return lax.scan(step, model, jnp.arange(num_iters))


def _normalise_fixed(model, fixed) -> tuple:
    """Dotted paths (old bare field names are paths); a named field holding None is dropped."""
    if isinstance(fixed, str):
        fixed = (fixed,)
    out = []
    for f in fixed:
        if not isinstance(f, str):
            raise ValueError(f"fixed: expected dotted path strings such as 'emission_cov', got {f!r}")
        try:
            node = pspec.get(model, f)
        except (AttributeError, IndexError, ValueError):
            node = 0  # unknown: let spec() name it
        if node is not None:
            out.append(f)
    pspec.spec(model, tuple(out))  # raises ValueError naming an unknown path
    return tuple(sorted(set(out)))


def em_lgssm(model, emissions, num_iters: int = 100, *, inputs=None, lengths=None, fixed=(), progress=None,
             m_step_iters: int = 50):
    """EM for any `ps.core.AbstractLinearGaussianSSM`.

    Args:
        model: the starting model (not modified).
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays; NaN marks missing values.
        num_iters: number of EM iterations.
        inputs: (T, U) shared or (B, T, U) per sequence, when the model reads inputs.
        lengths: (B,) true lengths of a padded batch (steps beyond are left out).
        fixed: dotted parameter paths (or prefixes) to hold at their current values, e.g.
            ``("transition_matrix", "emission_matrix")``. For `LinearGaussianSSM`, time-varying
            fields must be fixed.
        progress: show a progress bar (default: when num_iters >= 100).
        m_step_iters: L-BFGS steps of the generalised M-step (models without a closed form).

    Raises:
        ValueError: bad model, emissions, inputs, lengths or fixed paths; sequences of one step.

    Returns:
        ``(fitted_model, log_likelihoods)``; ``log_likelihoods[i]`` (shape (num_iters,)) is the
        log-likelihood of the parameters entering iteration i, so the sequence never decreases.
    """
    if not isinstance(model, AbstractLinearGaussianSSM):
        raise ValueError(f"model: expected an AbstractLinearGaussianSSM, got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    m_step_iters = checks.positive_int(m_step_iters, "m_step_iters")
    fixed = _normalise_fixed(model, fixed)
    batch = kalman.check_arguments(model, emissions, inputs, lengths)
    if kalman.initial_form(model, batch.emissions, batch.inputs, batch.lengths):
        raise ValueError("model: its initial_cov holds inf (a diffuse, flat prior); EM's expected complete-data "
                         "log-likelihood needs a proper initial distribution. Fit by ps.learn.mle (exact "
                         "diffuse log-likelihood, with initial_cov in fixed) or give a finite initial_cov")
    if batch.num_timesteps < 2:
        raise ValueError("emissions: EM needs sequences of at least 2 time steps (with T = 1 the transition is "
                         "unobserved and the emission regression fits the data exactly, a degenerate maximum); "
                         f"got shape {tuple(batch.emissions.shape)}")
    model = checks.unify_dtypes(model, batch.emissions)  # one dtype for the loop's carry
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "EM", show):
        fitted, history = _fit(model, batch.emissions, batch.inputs, batch.lengths, num_iters=num_iters,
                               fixed=fixed, batched=batch.batched, inputs_batched=batch.inputs_batched, show=show,
                               m_step_iters=m_step_iters)
    return fitted, history
