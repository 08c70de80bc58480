"""EM for linear-Gaussian models with a closed-form M-step.

E-step: the RTS smoother gives, per sequence, E[z_t], E[z_t z_t^T] and
E[z_{t+1} z_t^T]. Missing entries of y_t are latent too: given z_t and the
observed entries, y_t = A_t z_t + c_t + noise with

    J_t = R Rinv_obs   (Rinv_obs: inverse of the observed block, zero elsewhere)
    A_t = (I - J_t) H,   c_t = (I - J_t) d_t + J_t y_t,   Cov = R - J_t R,

so E[y_t], E[y_t z_t^T] and E[y_t y_t^T] are closed-form (a fully observed row
gives back y_t itself).

M-step: each conditional is a linear regression with Gaussian noise,
z_t ~ [F b B] [z_{t-1}; 1; u_t] and y_t ~ [H d D] [z_t; 1; u_t]; coefficients held
fixed are moved to the target, the free ones solve the normal equations, and
the noise covariance is the expected residual outer product. The loop over
iterations is one `lax.scan`, compiled once per (shapes, fixed set).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks, progress as prog
from probssm.core.linalg import psd_solve, symmetrize
from probssm.inference import kalman

# The fields EM can learn, grouped by the regression they belong to.
TRANSITION_FIELDS = ("transition_matrix", "transition_offset", "transition_input_matrix")
EMISSION_FIELDS = ("emission_matrix", "emission_offset", "emission_input_matrix")
LEARNABLE = ("initial_mean", "initial_cov") + TRANSITION_FIELDS + ("transition_cov",) + EMISSION_FIELDS + (
    "emission_cov",)


class SufficientStats(NamedTuple):
    z0: jax.Array  # sum_b E[z_0]
    z0z0: jax.Array  # sum_b E[z_0 z_0^T]
    num_sequences: jax.Array
    dyn_xx: jax.Array  # sum E[x x^T], x = [z_{t-1}; 1; u_t]
    dyn_zx: jax.Array  # sum E[z_t x^T]
    dyn_zz: jax.Array  # sum E[z_t z_t^T]
    dyn_n: jax.Array
    obs_xx: jax.Array  # x = [z_t; 1; u_t]
    obs_yx: jax.Array
    obs_yy: jax.Array
    obs_n: jax.Array


def _design(mu, Ezz, u):
    """E[x] and E[x x^T] for x = [z; 1; u] (u may be None)."""
    one = jnp.ones((mu.shape[0], 1), mu.dtype)
    parts = [mu, one] + ([u] if u is not None else [])
    ex = jnp.concatenate(parts, axis=-1)
    # E[x x^T] = E[x] E[x]^T except the z block, which is E[z z^T].
    exx = jnp.einsum("ti,tj->tij", ex, ex)
    d = mu.shape[-1]
    exx = exx.at[:, :d, :d].set(Ezz)
    return ex, exx


def _sequence_stats(model, y, u):
    """Expected sufficient statistics of one sequence, and its log-likelihood."""
    num_timesteps = y.shape[0]
    params = model.linear_gaussian_params(num_timesteps, u)
    mask = ~jnp.isnan(y)
    post = kalman._smooth(params, y, mask, False, None)
    mu, S = post.smoothed_means, post.smoothed_covs
    Ezz = S + jnp.einsum("ti,tj->tij", mu, mu)
    Ez1z0 = post.smoothed_cross_covs + jnp.einsum("ti,tj->tij", mu[1:], mu[:-1])

    dyn_u = None if (u is None or model.transition_input_matrix is None) else u[1:]
    ex_prev, exx_prev = _design(mu[:-1], Ezz[:-1], dyn_u)
    d = mu.shape[-1]
    dyn_zx = jnp.einsum("ti,tj->tij", mu[1:], ex_prev).at[:, :, :d].set(Ez1z0)

    # Emissions: expected y given the observed entries and z (see module docstring).
    p = _broadcast_emission(params, num_timesteps)
    H, dd, R = p
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

    Ey, Eyz, Eyy = jax.vmap(emission_moments)(H, dd, R, obs, y0, mu, Ezz)
    obs_u = None if (u is None or model.emission_input_matrix is None) else u
    ex, exx = _design(mu, Ezz, obs_u)
    obs_yx = jnp.einsum("ti,tj->tij", Ey, ex).at[:, :, :d].set(Eyz)

    stats = SufficientStats(
        mu[0], Ezz[0], jnp.asarray(1.0, y.dtype),
        exx_prev.sum(0), dyn_zx.sum(0), Ezz[1:].sum(0), jnp.asarray(num_timesteps - 1, y.dtype),
        exx.sum(0), obs_yx.sum(0), Eyy.sum(0), jnp.asarray(num_timesteps, y.dtype),
    )
    return stats, post.log_likelihood


def _broadcast_emission(params, num_timesteps):
    """Emission matrix, offset (inputs folded in) and covariance with a time axis."""
    def tv(a, base):
        return a if a.ndim > base else jnp.broadcast_to(a, (num_timesteps,) + a.shape)

    return tv(params.emission_matrix, 2), tv(params.emission_offset, 1), tv(params.emission_cov, 2)


def _regression(Sxx, Syx, Syy, n, blocks, coefs, free):
    """Solve y ~ W x with some column blocks of W fixed; return (W blocks, noise covariance).

    blocks: list of (start, stop) column ranges of x; coefs: current W blocks;
    free: tuple of bools, which blocks to estimate.
    """
    free_idx = [i for i, f in enumerate(free) if f]
    fixed_idx = [i for i, f in enumerate(free) if not f]
    cols = lambda idx: jnp.concatenate([jnp.arange(*blocks[i]) for i in idx]) if idx else jnp.zeros(0, int)
    W = jnp.concatenate(coefs, axis=1)
    if free_idx:
        f_cols, c_cols = cols(free_idx), cols(fixed_idx)
        target = Syx[:, f_cols]
        if fixed_idx:
            target = target - W[:, c_cols] @ Sxx[jnp.ix_(c_cols, f_cols)]
        W_free = psd_solve(Sxx[jnp.ix_(f_cols, f_cols)], target.T).T
        W = W.at[:, f_cols].set(W_free)
    cov = (Syy - W @ Syx.T - Syx @ W.T + W @ Sxx @ W.T) / n
    out = [W[:, a:b] for a, b in blocks]
    return out, symmetrize(cov)


def _m_step(model, stats: SufficientStats, fixed: frozenset):
    d = model.state_dim
    new = {}
    if "initial_mean" not in fixed:
        new["initial_mean"] = stats.z0 / stats.num_sequences
    m1 = new.get("initial_mean", model.initial_mean)
    if "initial_cov" not in fixed:
        # E[(z_0 - m1)(z_0 - m1)^T], averaged over sequences (m1 may be held fixed).
        mean, second = stats.z0 / stats.num_sequences, stats.z0z0 / stats.num_sequences
        new["initial_cov"] = symmetrize(second - jnp.outer(mean, m1) - jnp.outer(m1, mean) + jnp.outer(m1, m1))

    for names, cov_name, xx, yx, yy, n, out_dim in (
        (TRANSITION_FIELDS, "transition_cov", stats.dyn_xx, stats.dyn_zx, stats.dyn_zz, stats.dyn_n, d),
        (EMISSION_FIELDS, "emission_cov", stats.obs_xx, stats.obs_yx, stats.obs_yy, stats.obs_n, None),
    ):
        present = [nm for nm in names if getattr(model, nm) is not None]
        if all(nm in fixed for nm in present + [cov_name]):
            continue
        coefs = [getattr(model, nm) if getattr(model, nm).ndim == 2 else getattr(model, nm)[:, None]
                 for nm in present]
        widths = [c.shape[1] for c in coefs]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        blocks = [(s, s + w) for s, w in zip(starts, widths)]
        free = tuple(nm not in fixed for nm in present)
        W_blocks, cov = _regression(xx, yx, yy, n, blocks, coefs, free)
        for nm, W_b, f in zip(present, W_blocks, free):
            if f:
                new[nm] = W_b[:, 0] if getattr(model, nm).ndim == 1 else W_b
        if cov_name not in fixed:
            new[cov_name] = cov
    names = tuple(new)
    return eqx.tree_at(lambda m: tuple(getattr(m, k) for k in names), model, tuple(new[k] for k in names))


@partial(jax.jit, static_argnames=("num_iters", "fixed", "batched_u", "show"))
def _fit(model, ys, inputs, *, num_iters, fixed, batched_u, show):
    every = prog.report_every(num_iters)

    def step(model, i):
        stats, lls = jax.vmap(_sequence_stats, in_axes=(None, 0, 0 if batched_u else None))(model, ys, inputs)
        stats = jax.tree_util.tree_map(lambda a: a.sum(0), stats)
        ll = lls.sum()
        if show:
            prog.report(i, ll, every)
        return _m_step(model, stats, fixed), ll

    return lax.scan(step, model, jnp.arange(num_iters))


def em_lgssm(model, emissions, num_iters: int = 100, *, inputs=None, fixed=(), progress=None):
    """EM for a `LinearGaussianSSM`.

    Args:
        model: the starting model (not modified).
        emissions: (T, p) or (B, T, p); NaN marks missing values (pad unequal lengths with NaN).
        num_iters: number of EM iterations.
        inputs: (T, U) or (B, T, U), when the model has input matrices.
        fixed: names of fields to hold at their current values, e.g.
            ``("transition_matrix", "emission_matrix")``. Time-varying fields must be fixed.
        progress: show a progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, log_likelihoods)``; ``log_likelihoods[i]`` is the log-likelihood of the
        parameters entering iteration i, so the sequence never decreases.
    """
    from probssm.models.lgssm import LinearGaussianSSM

    if not isinstance(model, LinearGaussianSSM):
        raise ValueError(f"model: expected a LinearGaussianSSM, got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    fixed = frozenset(fixed)
    unknown = fixed - set(LEARNABLE)
    if unknown:
        raise ValueError(f"fixed: unknown parameter names {sorted(unknown)}; expected a subset of {list(LEARNABLE)}")
    for name in LEARNABLE:
        a = getattr(model, name)
        base = 1 if name.endswith("offset") or name == "initial_mean" else 2
        if a is not None and a.ndim > base:
            group = next((g + (c,) for g, c in ((TRANSITION_FIELDS, "transition_cov"),
                                                 (EMISSION_FIELDS, "emission_cov")) if name in g + (c,)), (name,))
            free = [g for g in group if g not in fixed and getattr(model, g) is not None]
            if free:
                raise ValueError(
                    f"fixed: {name} is time-varying; EM learns time-invariant parameters only, so fix it "
                    f"and the rest of its group {list(group)} (free now: {free})")
    ys, u, flags = kalman._prepare(model, emissions, inputs)
    if not flags["batched"]:
        ys = ys[None]
    batched_u = flags["batched_u"]
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "EM", show):
        fitted, history = _fit(model, ys, u, num_iters=num_iters, fixed=fixed, batched_u=batched_u, show=show)
    return fitted, history
