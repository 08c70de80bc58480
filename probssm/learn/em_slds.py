"""Variational EM for switching linear dynamical systems (registered with `ps.learn.em`).

    fitted, elbos = ps.learn.em(slds, y, num_iters, lengths=None, num_vi_iters=3, fixed=())

E-step: structured variational inference q(z) q(x) (`ps.switching.structured_vi`), warm-started
from the previous iteration's mode marginals. M-step: closed form, maximising
E_q[log p(y, x, z | theta)] given the expected sufficient statistics:

* pi = E[z_0]; A[i] = E[#(i -> j)] / sum_j E[#(i -> j)];
* per mode k, the weighted regression x_t ~ [A_k b_k][x_{t-1}; 1] with weights q(z_t = k),
  Q_k the weighted expected residual covariance; the initial moments from q(z_0 = k);
* emissions: per mode the same regression y_t ~ [C_k d_k][x_t; 1] with weights q(z_t = k), or
  one shared regression with weight one when the emissions are shared.

Both steps raise the ELBO, so the history (the ELBO after each E-step) never decreases. The
whole fit is one compiled `lax.scan`. A mode that q(z) never visits keeps its parameters.
"""
from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from probssm.core import checks, progress as prog
from probssm.core.linalg import psd_solve, symmetrize
from probssm.core.switching import AbstractSwitchingSSM
from probssm.inference.switching import slds as S
from probssm.learn.em import register_em
from probssm.models.slds import SLDS

__all__ = ["slds_variational_em"]

_FIELDS = ("initial_probs", "transition_matrix", "initial_means", "initial_covs", "dynamics_matrices",
           "dynamics_offsets", "dynamics_covs", "emission_matrices", "emission_offsets", "emission_covs")
_EMISSIONS = ("emission_matrices", "emission_offsets", "emission_covs")


def _regression(w, Ex_in, Exx_in, Eyx, Eyy, Ey):
    """Weighted least squares target ~ [W c][x; 1] from expectations with leading axes (N,):
    E[x], E[x x^T], E[target x^T], E[target target^T], E[target]; returns (W, c, cov, total weight)."""
    n = jnp.sum(w)
    d = Ex_in.shape[-1]
    Sxx = jnp.einsum("n,nij->ij", w, Exx_in)
    Sx = jnp.einsum("n,ni->i", w, Ex_in)
    top = jnp.concatenate([Sxx, Sx[:, None]], axis=1)
    bottom = jnp.concatenate([Sx, n[None]])[None]
    Xx = jnp.concatenate([top, bottom], axis=0)
    Yx = jnp.concatenate([jnp.einsum("n,nij->ij", w, Eyx), jnp.einsum("n,ni->i", w, Ey)[:, None]], axis=1)
    Yy = jnp.einsum("n,nij->ij", w, Eyy)
    ok = n > 1e-8
    eye = jnp.eye(d + 1, dtype=Xx.dtype)
    Wc = psd_solve(jnp.where(ok, Xx, eye), jnp.where(ok, Yx, 0.0).T).T
    cov = symmetrize((Yy - Wc @ Yx.T - Yx @ Wc.T + Wc @ Xx @ Wc.T) / jnp.where(ok, n, 1.0))
    return Wc[:, :d], Wc[:, d], cov, ok


def _m_step(model: SLDS, stats, ys, valid, fixed):
    """Closed-form maximiser of E_q[log p(y, x, z)] (stats of a batch: leading axes (B, T))."""
    gamma, counts, Ex, Exx, Exx1 = stats
    B, T, K = gamma.shape
    g = gamma * valid[..., None]
    new = {}
    new["initial_probs"] = jnp.mean(gamma[:, 0], axis=0)
    c = jnp.sum(counts, axis=0)
    rows = jnp.sum(c, axis=1, keepdims=True)
    new["transition_matrix"] = jnp.where(rows > 0, c / jnp.where(rows > 0, rows, 1.0), model.transition_matrix)
    w0 = gamma[:, 0]  # (B, K)
    n0 = jnp.sum(w0, axis=0)
    ok0 = n0 > 1e-8
    m0 = jnp.einsum("bk,bi->ki", w0, Ex[:, 0]) / jnp.where(ok0, n0, 1.0)[:, None]
    S0 = jnp.einsum("bk,bij->kij", w0, Exx[:, 0]) / jnp.where(ok0, n0, 1.0)[:, None, None]
    P0 = symmetrize(S0 - jnp.einsum("ki,kj->kij", m0, m0))
    new["initial_means"] = jnp.where(ok0[:, None], m0, model.initial_means)
    new["initial_covs"] = jnp.where(ok0[:, None, None], P0, model.initial_covs)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    # dynamics: targets x_t (t >= 1), inputs x_{t-1}
    wdyn = flat(g[:, 1:])  # (N, K)
    xin, xxin = flat(Ex[:, :-1]), flat(Exx[:, :-1])
    yx, yy, ey = flat(Exx1), flat(Exx[:, 1:]), flat(Ex[:, 1:])
    F, b, Q, okd = jax.vmap(lambda w: _regression(w, xin, xxin, yx, yy, ey), in_axes=1)(wdyn)
    new["dynamics_matrices"] = jnp.where(okd[:, None, None], F, model.dynamics_matrices)
    new["dynamics_offsets"] = jnp.where(okd[:, None], b, model.dynamics_offsets)
    new["dynamics_covs"] = jnp.where(okd[:, None, None], Q, model.dynamics_covs)
    # emissions: targets y_t, inputs x_t
    y = jnp.where(valid[..., None], ys, 0.0)
    Eyx = jnp.einsum("bti,btj->btij", y, Ex)
    Eyy = jnp.einsum("bti,btj->btij", y, y)
    args = (flat(Ex), flat(Exx), flat(Eyx), flat(Eyy), flat(y))
    if model.shared_emissions:
        H, d, R, oke = _regression(flat(valid.astype(ys.dtype)), *args)
        new["emission_matrices"] = jnp.where(oke, H, model.emission_matrices)
        new["emission_offsets"] = jnp.where(oke, d, model.emission_offsets)
        new["emission_covs"] = jnp.where(oke, R, model.emission_covs)
    else:
        H, d, R, oke = jax.vmap(lambda w: _regression(w, *args), in_axes=1)(flat(g))
        new["emission_matrices"] = jnp.where(oke[:, None, None], H, model.emission_matrices)
        new["emission_offsets"] = jnp.where(oke[:, None], d, model.emission_offsets)
        new["emission_covs"] = jnp.where(oke[:, None, None], R, model.emission_covs)
    names = tuple(f for f in _FIELDS if f not in fixed)
    return eqx.tree_at(lambda m: tuple(getattr(m, f) for f in names), model,
                       tuple(new[f].astype(getattr(model, f).dtype) for f in names))


@partial(jax.jit, static_argnames=("num_iters", "num_vi_iters", "fixed", "show"))
def _fit(model, ys, lengths, *, num_iters, num_vi_iters, fixed, show):
    B, T, _ = ys.shape
    K = model.num_modes
    valid = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None] < lengths[:, None]
    ys_masked = jnp.where(valid[..., None], ys, jnp.nan)

    def e_step(m, gamma):
        params = m.switching_params(T)
        r = jax.vmap(lambda y, g0: S.structured_vi_params(params, y, num_vi_iters, initial_mode_probs=g0))(
            ys_masked, gamma)
        Exx = r.covs + jnp.einsum("bti,btj->btij", r.means, r.means)
        Exx1 = r.cross_covs + jnp.einsum("bti,btj->btij", r.means[:, 1:], r.means[:, :-1])
        return jnp.sum(r.elbo[:, -1]), (r.mode_probs, r.transition_counts, r.means, Exx, Exx1)

    def step(carry, i):
        m, gamma = carry
        elbo, stats = e_step(m, gamma)
        if show:
            prog.report(i, elbo, prog.report_every(num_iters))
        return (_m_step(m, stats, ys, valid, fixed), stats[0]), elbo

    gamma0 = jnp.full((B, T, K), 1.0 / K, ys.dtype)
    (fitted, _), history = lax.scan(step, (model, gamma0), jnp.arange(num_iters))
    return fitted, history


@register_em(SLDS)
def slds_variational_em(model, emissions, num_iters: int = 50, *, lengths=None, num_vi_iters: int = 3, fixed=(), progress=None):
    """Variational EM for a `ps.models.SLDS` (see the module doc).

    Args:
        model: the starting `SLDS` (not modified); positive definite dynamics covariances.
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays (unequal lengths: padding is left
            out); no missing values inside a sequence.
        num_iters: EM iterations.
        lengths: (B,) true lengths of a padded batch.
        num_vi_iters: structured-VI sweeps per E-step (warm-started).
        fixed: field names held at their current values, e.g. ``("emission_matrices",)``.
        progress: show a progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, elbos)``: ``elbos[i]`` (shape (num_iters,)) is the ELBO (summed over the
        batch) of the parameters entering iteration i after its E-step; it never decreases and
        lies below their log-likelihood.

    Raises:
        ValueError: naming the argument: a model with inputs (not learned here), missing values,
            unknown ``fixed`` names, sequences shorter than 2 steps.
    """
    if not isinstance(model, AbstractSwitchingSSM) or model.is_recurrent:
        raise ValueError(f"model: expected a switching linear dynamical system with a Markov mode chain "
                         f"(ps.models.SLDS), got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_vi_iters = checks.positive_int(num_vi_iters, "num_vi_iters")
    if isinstance(fixed, str):
        fixed = (fixed,)
    fixed = tuple(fixed)
    for f in fixed:
        if f not in _FIELDS:
            raise ValueError(f"fixed: {f!r} is not a learnable field of SLDS; expected some of {list(_FIELDS)}")
    if model.input_dim:
        raise ValueError("model: variational EM does not learn input matrices yet; expected a model without inputs")
    shared = (model.emission_matrices.ndim == 2, model.emission_offsets.ndim == 1, model.emission_covs.ndim == 2)
    if len(set(shared)) > 1 and not all(f in fixed for f in _EMISSIONS):
        raise ValueError("fixed: emission_matrices, emission_offsets and emission_covs mix shared and per-mode "
                         f"shapes; give all three per mode or all shared, or hold them fixed (fixed={list(_EMISSIONS)})")
    batch = S.check_arguments(model, emissions, None, lengths, markov=True)
    ys = batch.emissions if batch.batched else batch.emissions[None]
    lengths_b = batch.lengths if (batch.lengths is None or batch.batched) else batch.lengths[None]
    if ys.shape[1] < 2:
        raise ValueError(f"emissions: EM needs sequences of at least 2 time steps, got shape {tuple(ys.shape)}")
    if checks.is_concrete(ys):
        y = np.asarray(ys)
        inside = np.ones(y.shape[:2], bool) if lengths_b is None else np.arange(y.shape[1])[None] < np.asarray(
            lengths_b)[:, None]
        if np.isnan(y[inside]).any():
            raise ValueError("emissions: variational EM needs fully observed sequences (NaN only as padding "
                             "beyond lengths)")
    if checks.is_concrete(model.dynamics_covs):
        checks.psd(model.dynamics_covs, "dynamics_covs", strict=True)
    model = checks.unify_dtypes(model, ys)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "EM", show):
        fitted, history = _fit(model, ys, lengths_b, num_iters=num_iters, num_vi_iters=num_vi_iters, fixed=fixed,
                               show=show)
    return fitted, history
