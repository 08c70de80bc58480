"""Variational EM for switching linear dynamical systems and Laplace-EM for recurrent ones
(both registered with `ps.learn.em`; `rslds_laplace_em` at the end of this module).

    fitted, elbos = ps.learn.em(slds, y, num_iters, lengths=None, num_vi_iters=3, fixed=())

E-step: structured variational inference q(z) q(x) (the sweeps of `ps.switching.structured_vi`,
run through `ps.switching.laplace`'s block-tridiagonal q(x) update, which is the same update for a
Markov mode chain), warm-started from the previous iteration's mode marginals. M-step: closed form, maximising
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
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from probssm.core import checks, progress as prog
from probssm.core.linalg import psd_solve, symmetrize
from probssm.core.optim import line_search
from probssm.core.switching import AbstractSwitchingSSM, path_system
from probssm.inference import kalman
from probssm.inference.switching.laplace import laplace_params
from probssm.inference.switching import slds as S
from probssm.learn.em import register_em
from probssm.models.slds import SLDS, RecurrentSLDS

__all__ = ["slds_variational_em", "slds_particle_em", "rslds_laplace_em"]

_FIELDS = ("initial_probs", "transition_matrix", "initial_means", "initial_covs", "dynamics_matrices",
           "dynamics_offsets", "dynamics_covs", "emission_matrices", "emission_offsets", "emission_covs")
_EMISSIONS = ("emission_matrices", "emission_offsets", "emission_covs")
_RFIELDS = ("initial_probs", "initial_means", "initial_covs", "dynamics_matrices", "dynamics_offsets",
            "dynamics_covs", "emission_matrices", "emission_offsets", "emission_covs", "recurrence_weights",
            "recurrence_biases")


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
    new = _gaussian_updates(model, gamma, Ex, Exx, Exx1, ys, valid)
    c = jnp.sum(counts, axis=0)
    rows = jnp.sum(c, axis=1, keepdims=True)
    new["transition_matrix"] = jnp.where(rows > 0, c / jnp.where(rows > 0, rows, 1.0), model.transition_matrix)
    return _replace(model, new, _FIELDS, fixed)


def _replace(model, new, fields, fixed):
    names = tuple(f for f in fields if f not in fixed)
    return eqx.tree_at(lambda m: tuple(getattr(m, f) for f in names), model,
                       tuple(new[f].astype(getattr(model, f).dtype) for f in names))


def _gaussian_updates(model, gamma, Ex, Exx, Exx1, ys, valid):
    """The closed-form updates shared by the SLDS and the recurrent SLDS: initial mode
    probabilities, initial moments, dynamics and emission regressions (a dict by field name)."""
    B, T, K = gamma.shape
    g = gamma * valid[..., None]
    new = {}
    new["initial_probs"] = jnp.mean(gamma[:, 0], axis=0)
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
    if model.emission_family == "poisson":
        new.update(_poisson_emission_updates(model, g, Ex, Exx, ys, valid))
        return new
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
    return new


def _poisson_emission_updates(model, g, Ex, Exx, ys, valid, num_steps: int = 3):
    """Newton steps (step-halving line search) on each output row (c_ki, d_ki) of the Poisson
    emissions, maximising the expected log-likelihood sum_n w_nk [y_ni (c.m_n + d) -
    exp(c.m_n + d + c^T P_n c / 2)] under q(x_n) = N(m_n, P_n) (exact for the log link). The
    objective is concave in (c, d), so each accepted step raises the ELBO."""
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    m, S = flat(Ex), flat(Exx)
    P = S - jnp.einsum("ni,nj->nij", m, m)
    y = flat(jnp.where(valid[..., None], ys, 0.0))
    w = flat(g)  # (N, K), zero outside the sequences
    if model.shared_emissions:
        w = jnp.sum(w, axis=1, keepdims=True)  # every mode's emission is the same row
    H = model.emission_matrices[None] if model.shared_emissions else model.emission_matrices  # (K or 1, p, d)
    dd = jnp.broadcast_to(model.emission_offsets, H.shape[:2])

    def row(c, d0, wk, yi):
        def objective(theta):
            c_, d_ = theta[:-1], theta[-1]
            eta = m @ c_ + d_
            return jnp.sum(wk * (yi * eta - jnp.exp(eta + 0.5 * jnp.einsum("i,nij,j->n", c_, P, c_))))

        def step(theta, _):
            gr = jax.grad(objective)(theta)
            Hs = symmetrize(-jax.hessian(objective)(theta))
            dx = psd_solve(Hs + 1e-9 * jnp.eye(theta.shape[0], dtype=theta.dtype), gr)
            return line_search(objective, theta, dx), None

        theta, _ = lax.scan(step, jnp.concatenate([c, d0[None]]), None, length=num_steps)
        return theta[:-1], theta[-1]

    # over modes (w's columns) and output rows
    Hn, dn = jax.vmap(lambda Hk, dk, wk: jax.vmap(lambda c, d0, yi: row(c, d0, wk, yi), in_axes=(0, 0, 1))(Hk, dk, y),
                      in_axes=(0, 0, 1))(H, dd, w)
    seen = jnp.sum(w, axis=0) > 1e-8  # a mode q(z) never visits keeps its rows
    Hn = jnp.where(seen[:, None, None], Hn, H)
    dn = jnp.where(seen[:, None], dn, dd)
    if model.shared_emissions:
        return {"emission_matrices": Hn[0], "emission_offsets": dn[0], "emission_covs": model.emission_covs}
    # (per-mode matrices with shared offsets only pass `_em_arguments` with the emissions held fixed)
    return {"emission_matrices": Hn, "emission_offsets": dn, "emission_covs": model.emission_covs}


@partial(jax.jit, static_argnames=("num_iters", "num_vi_iters", "num_newton_steps", "fixed", "show"))
def _fit(model, ys, lengths, *, num_iters, num_vi_iters, num_newton_steps, fixed, show):
    B, T, _ = ys.shape
    K = model.num_modes
    valid = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None] < lengths[:, None]
    ys_masked = jnp.where(valid[..., None], ys, jnp.nan)

    d = model.state_dim
    xi0 = jnp.zeros((T - 1, K, K), ys.dtype)  # read only by a recurrence
    family = model.emission_family

    def e_step(m, gamma, x0):
        params = m.switching_params(T)
        # structured VI's sweeps through the block-tridiagonal Laplace step (the same updates, equal
        # to rounding; tests/test_switching_laplace.py): O(T d^3) per q(x) update instead of a
        # Kalman smoother with K (p + d) pseudo-observations per step. With Gaussian emissions one
        # exact Newton step from anywhere; with Poisson ones Newton steps warm-started at the last mode.
        r = jax.vmap(lambda y, g0, x_0: laplace_params(
            params, y, num_vi_iters, initial_state=(g0, xi0, x_0), missing=lengths is not None,
            num_newton_steps=num_newton_steps, emission_family=family))(ys_masked, gamma, x0)
        Exx = r.covs + jnp.einsum("bti,btj->btij", r.means, r.means)
        Exx1 = r.cross_covs + jnp.einsum("bti,btj->btij", r.means[:, 1:], r.means[:, :-1])
        return jnp.sum(r.elbo[:, -1]), (r.mode_probs, r.transition_counts, r.means, Exx, Exx1)

    def step(carry, i):
        m, gamma, x0 = carry
        elbo, stats = e_step(m, gamma, x0)
        if show:
            prog.report(i, elbo, prog.report_every(num_iters))
        return (_m_step(m, stats, ys, valid, fixed), stats[0], stats[2]), elbo

    gamma0 = jnp.full((B, T, K), 1.0 / K, ys.dtype)
    x0 = jnp.zeros((B, T, d), ys.dtype)
    (fitted, _, _), history = lax.scan(step, (model, gamma0, x0), jnp.arange(num_iters))
    return fitted, history


def _em_arguments(model, emissions, lengths, fixed, *, fields, class_name, method, markov, psd_fields):
    """The checks shared by the SLDS variational EM and the rSLDS Laplace-EM (outside jit): the
    ``fixed`` names, no inputs, consistent emission shapes, sequences of at least 2 fully observed
    steps, positive definite covariances (``psd_fields``: (name, array) pairs). Returns
    (fixed, ys (B, T, p), lengths (B,) or None)."""
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    for f in fixed:
        if f not in fields:
            raise ValueError(f"fixed: {f!r} is not a learnable field of {class_name}; expected some of {list(fields)}")
    if model.input_dim:
        raise ValueError(f"model: {method} does not learn input matrices yet; expected a model without inputs")
    shared = (model.emission_matrices.ndim == 2, model.emission_offsets.ndim == 1, model.emission_covs.ndim == 2)
    if model.emission_family == "poisson":
        shared = shared[:2]  # the covariances are unused
    if len(set(shared)) > 1 and not all(f in fixed for f in _EMISSIONS):
        raise ValueError("fixed: emission_matrices, emission_offsets and emission_covs mix shared and per-mode "
                         f"shapes; give all three per mode or all shared, or hold them fixed (fixed={list(_EMISSIONS)})")
    batch = S.check_arguments(model, emissions, None, lengths, markov=markov, gaussian=False)
    ys = batch.emissions if batch.batched else batch.emissions[None]
    lengths_b = batch.lengths if (batch.lengths is None or batch.batched) else batch.lengths[None]
    if ys.shape[1] < 2:
        raise ValueError(f"emissions: EM needs sequences of at least 2 time steps, got shape {tuple(ys.shape)}")
    if checks.is_concrete(ys):
        y = np.asarray(ys)
        inside = np.ones(y.shape[:2], bool) if lengths_b is None else np.arange(y.shape[1])[None] < np.asarray(
            lengths_b)[:, None]
        if np.isnan(y[inside]).any():
            raise ValueError(f"emissions: {method} needs fully observed sequences (NaN only as padding "
                             "beyond lengths)")
    for name, a in psd_fields:
        if checks.is_concrete(a):
            checks.psd(a, name, strict=True)
    return fixed, ys, lengths_b


@register_em(SLDS)
def _slds_em(model, emissions, num_iters: int = 50, *, method: str = "variational", key=None, **options):
    """`ps.learn.em` on an SLDS: ``method="variational"`` (default) runs `slds_variational_em`;
    ``method="particle_gibbs"`` runs `slds_particle_em` and needs ``key``."""
    if method == "variational":
        if key is not None:
            raise ValueError("key: variational EM is deterministic and takes no key (method='particle_gibbs' does)")
        return slds_variational_em(model, emissions, num_iters, **options)
    if method == "particle_gibbs":
        if key is None:
            raise ValueError("key: method='particle_gibbs' needs a jax.random key, e.g. key=jax.random.key(0)")
        return slds_particle_em(key, model, emissions, num_iters, **options)
    raise ValueError(f"method: expected 'variational' or 'particle_gibbs', got {method!r}")


def slds_variational_em(model, emissions, num_iters: int = 50, *, lengths=None, num_vi_iters: int = 3,
                        num_newton_steps: int = 3, fixed=(), progress=None):
    """Variational EM for a `ps.models.SLDS` (see the module doc).

    Args:
        model: the starting `SLDS` (not modified); positive definite dynamics covariances.
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays (unequal lengths: padding is left
            out); no missing values inside a sequence.
        num_iters: EM iterations.
        lengths: (B,) true lengths of a padded batch.
        num_vi_iters: structured-VI sweeps per E-step (warm-started).
        num_newton_steps: with Poisson emissions, Newton steps per q(x) update (the E-step is then
            `ps.switching.laplace`'s and the emission rows are updated by Newton steps: Laplace-EM;
            unused with Gaussian emissions, where one step is exact).
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
    num_newton_steps = checks.positive_int(num_newton_steps, "num_newton_steps")
    fixed, ys, lengths_b = _em_arguments(model, emissions, lengths, fixed, fields=_FIELDS, class_name="SLDS",
                                         method="variational EM", markov=True, psd_fields=(("dynamics_covs", model.dynamics_covs),))
    model = checks.unify_dtypes(model, ys)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "EM", show):
        fitted, history = _fit(model, ys, lengths_b, num_iters=num_iters, num_vi_iters=num_vi_iters,
                               num_newton_steps=num_newton_steps, fixed=fixed, show=show)
    return fitted, history


# ----------------------------------------------------------------------------------------------
# Particle-Gibbs learning: stochastic-approximation EM driven by the conditional RBPF
# ----------------------------------------------------------------------------------------------
class _Totals(NamedTuple):
    """Complete-data sufficient statistics of an SLDS given mode paths (x integrated out by a
    Kalman smoother per path), summed over sequences and time, averaged over paths."""

    init_n: jax.Array  # (K,) #{z_0 = k}
    init_x: jax.Array  # (K, d) sum 1[z_0 = k] E[x_0]
    init_xx: jax.Array  # (K, d, d)
    trans: jax.Array  # (K, K) #{z_{t-1} = i, z_t = j}
    dyn_n: jax.Array  # (K,) #{z_t = k}, t >= 1
    dyn_x: jax.Array  # (K, d) sum 1[z_t = k] E[x_{t-1}]
    dyn_xx: jax.Array  # (K, d, d) ... E[x_{t-1} x_{t-1}^T]
    dyn_yx: jax.Array  # (K, d, d) ... E[x_t x_{t-1}^T]
    dyn_yy: jax.Array  # (K, d, d) ... E[x_t x_t^T]
    dyn_y: jax.Array  # (K, d) ... E[x_t]
    em_n: jax.Array  # (K,) #{z_t = k}, t >= 0
    em_x: jax.Array  # (K, d)
    em_xx: jax.Array  # (K, d, d)
    em_yx: jax.Array  # (K, p, d) sum 1[z_t = k] y_t E[x_t]^T
    em_yy: jax.Array  # (K, p, p)
    em_y: jax.Array  # (K, p)


def _path_totals(params, y, valid, path, K):
    """`_Totals` of one sequence and one mode path (its Kalman smoother gives the x moments)."""
    r = kalman.smoother_params(path_system(params.systems, path), y)
    Ex = r.smoothed_means
    Exx = r.smoothed_covs + jnp.einsum("ti,tj->tij", Ex, Ex)
    Exx1 = r.smoothed_cross_covs + jnp.einsum("ti,tj->tij", Ex[1:], Ex[:-1])
    z = jax.nn.one_hot(path, K, dtype=y.dtype) * valid[:, None]  # (T, K)
    zd = z[1:]
    yv = jnp.where(valid[:, None], y, 0.0)
    return _Totals(
        z[0], z[0][:, None] * Ex[0], z[0][:, None, None] * Exx[0],
        jnp.einsum("ti,tj->ij", z[:-1], zd),
        jnp.sum(zd, 0), zd.T @ Ex[:-1], jnp.einsum("tk,tij->kij", zd, Exx[:-1]),
        jnp.einsum("tk,tij->kij", zd, Exx1), jnp.einsum("tk,tij->kij", zd, Exx[1:]), zd.T @ Ex[1:],
        jnp.sum(z, 0), z.T @ Ex, jnp.einsum("tk,tij->kij", z, Exx), jnp.einsum("tk,ti,tj->kij", z, yv, Ex),
        jnp.einsum("tk,ti,tj->kij", z, yv, yv), z.T @ yv)


def _regression_from_totals(n, Sx, Sxx, Syx, Syy, Sy):
    """`_regression` fed with summed statistics: one row with weight n carrying their means."""
    nn = jnp.where(n > 0, n, 1.0)
    return _regression(n[None], (Sx / nn)[None], (Sxx / nn)[None], (Syx / nn)[None], (Syy / nn)[None],
                       (Sy / nn)[None])


def _m_step_totals(model: SLDS, s: _Totals, fixed):
    """Closed-form maximiser of the complete-data log-likelihood's expectation under the totals."""
    new = {}
    new["initial_probs"] = s.init_n / jnp.sum(s.init_n)
    ok0 = s.init_n > 1e-8
    n0 = jnp.where(ok0, s.init_n, 1.0)
    m0 = s.init_x / n0[:, None]
    P0 = symmetrize(s.init_xx / n0[:, None, None] - jnp.einsum("ki,kj->kij", m0, m0))
    new["initial_means"] = jnp.where(ok0[:, None], m0, model.initial_means)
    new["initial_covs"] = jnp.where(ok0[:, None, None], P0, model.initial_covs)
    rows = jnp.sum(s.trans, axis=1, keepdims=True)
    new["transition_matrix"] = jnp.where(rows > 0, s.trans / jnp.where(rows > 0, rows, 1.0), model.transition_matrix)
    F, b, Q, okd = jax.vmap(_regression_from_totals)(s.dyn_n, s.dyn_x, s.dyn_xx, s.dyn_yx, s.dyn_yy, s.dyn_y)
    okd = okd & (s.dyn_n > 1e-8)
    new["dynamics_matrices"] = jnp.where(okd[:, None, None], F, model.dynamics_matrices)
    new["dynamics_offsets"] = jnp.where(okd[:, None], b, model.dynamics_offsets)
    new["dynamics_covs"] = jnp.where(okd[:, None, None], Q, model.dynamics_covs)
    em = (s.em_n, s.em_x, s.em_xx, s.em_yx, s.em_yy, s.em_y)
    if model.shared_emissions:
        H, d, R, oke = _regression_from_totals(*(jnp.sum(a, axis=0) for a in em))
        new["emission_matrices"] = jnp.where(oke, H, model.emission_matrices)
        new["emission_offsets"] = jnp.where(oke, d, model.emission_offsets)
        new["emission_covs"] = jnp.where(oke, R, model.emission_covs)
    else:
        H, d, R, oke = jax.vmap(_regression_from_totals)(*em)
        oke = oke & (s.em_n > 1e-8)
        new["emission_matrices"] = jnp.where(oke[:, None, None], H, model.emission_matrices)
        new["emission_offsets"] = jnp.where(oke[:, None], d, model.emission_offsets)
        new["emission_covs"] = jnp.where(oke[:, None, None], R, model.emission_covs)
    return _replace(model, new, _FIELDS, fixed)


@partial(jax.jit, static_argnames=("num_iters", "num_particles", "burn_in", "fixed", "show"))
def _fit_particle(key, model, ys, lengths, step_exponent, *, num_iters, num_particles, burn_in, fixed, show):
    B, T, _ = ys.shape
    K = model.num_modes
    valid = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None] < lengths[:, None]
    ys_masked = jnp.where(valid[..., None], ys, jnp.nan)
    key_init, key_iters = jax.random.split(key)

    def start(k, y):  # the initial reference: one path of an unconditional RBPF, drawn by its final weights
        k1, k2 = jax.random.split(k)
        r = S.rbpf_params(k1, model.switching_params(T), y, num_particles)
        return r.mode_paths[jax.random.categorical(k2, r.log_weights[-1])]

    refs0 = jax.vmap(start)(jax.random.split(key_init, B), ys_masked)

    def totals(m, refs, k):
        params = m.switching_params(T)

        def one(y, v, ref, kb):
            r = S.conditional_rbpf_params(kb, params, y, ref, num_particles)
            # Rao-Blackwellised over the N traced paths (equal weights), not only the new reference
            tot = jax.vmap(lambda path: _path_totals(params, y, v, path, K))(r.mode_paths)
            return r.reference, jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), tot), r.log_likelihood

        new_refs, tot, ll = jax.vmap(one)(ys_masked, valid, refs, jax.random.split(k, B))
        return new_refs, jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tot), jnp.sum(ll)

    def step(carry, xs):
        m, refs, acc = carry
        i, k = xs
        refs, tot, ll = totals(m, refs, k)
        after = jnp.maximum(i - burn_in + 1, 1).astype(ys.dtype)
        gamma = jnp.where(i < burn_in, 1.0, after ** (-step_exponent))
        acc = jax.tree_util.tree_map(lambda a, s: (1.0 - gamma) * a + gamma * s, acc, tot)
        if show:
            prog.report(i, ll, prog.report_every(num_iters))
        return (_m_step_totals(m, acc, fixed), refs, acc), ll

    # zero running statistics (gamma_0 = 1 overwrites them); eval_shape: no sweep is run for the shapes
    shapes = jax.eval_shape(lambda: totals(model, refs0, key_init)[1])
    acc0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (fitted, _, _), history = lax.scan(step, (model, refs0, acc0),
                                       (jnp.arange(num_iters), jax.random.split(key_iters, num_iters)))
    return fitted, history


def slds_particle_em(key, model, emissions, num_iters: int = 100, *, num_particles: int = 16, burn_in=None,
                     step_exponent: float = 0.7, lengths=None, fixed=(), progress=None):
    """Particle-Gibbs learning of a `ps.models.SLDS`: particle stochastic-approximation EM
    (PSAEM; Lindsten 2013, Svensson, Schoen & Lindsten 2014) with the conditional RBPF with
    ancestor sampling (`ps.switching.conditional_rbpf`) as its Markov kernel. Unlike variational
    EM it makes no mean-field assumption: with decreasing step sizes it converges to a maximum of
    the exact likelihood (the asymptotically exact alternative to `slds_variational_em`).

    Iteration i, per sequence: one conditional-RBPF sweep from the current reference mode path;
    for each of the N traced paths, a Kalman smoother gives the complete-data statistics
    (x integrated out exactly); their average s_i enters the running statistics
    S_i = (1 - g_i) S_{i-1} + g_i s_i with g_i = 1 for i < burn_in, then (i - burn_in + 1)^(-step_exponent);
    the M-step is the closed-form maximiser at S_i (initial probabilities and moments, transition
    counts, per-mode dynamics and emission regressions). The whole fit is one compiled `lax.scan`.
    The first reference path is drawn from an unconditional `ps.switching.rbpf`.

    Args:
        key: a `jax.random` key.
        model: the starting `SLDS` (not modified): Markov mode chain, Gaussian emissions, no inputs,
            positive definite dynamics and emission covariances.
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays (padding beyond ``lengths`` is
            left out); no missing values inside a sequence.
        num_iters: iterations (static).
        num_particles: N >= 2 particles per sequence (static); 10-30 is usual with ancestor sampling.
        burn_in: iterations with step size 1 (pure stochastic EM) before the step sizes decrease
            (static; default ``num_iters // 4``).
        step_exponent: in (0.5, 1]: the decay of the step sizes after burn-in.
        lengths: (B,) true lengths of a padded batch.
        fixed: field names held at their current values, e.g. ``("emission_matrices",)``.
        progress: show a progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, history)``: ``history[i]`` (shape (num_iters,)) is the conditional
        filter's log normalising-constant estimate at iteration i, summed over the batch: a
        progress diagnostic (biased towards the reference path), not a likelihood; for a
        likelihood use `ps.switching.rbpf` at the fitted model.

    Raises:
        ValueError: naming the argument: a recurrent model or one with Poisson emissions or
            inputs, missing values, unknown ``fixed`` names, sequences shorter than 2 steps,
            ``num_particles`` < 2, ``burn_in`` outside [0, num_iters], ``step_exponent`` outside (0.5, 1].
    """
    if not isinstance(model, AbstractSwitchingSSM) or model.is_recurrent:
        raise ValueError(f"model: expected a switching linear dynamical system with a Markov mode chain "
                         f"(ps.models.SLDS), got {type(model).__name__}")
    if model.emission_family != "gaussian":
        raise ValueError(f"model: particle-Gibbs EM needs Gaussian emissions (the conditional RBPF runs a Kalman "
                         f"filter per particle); the model has {model.emission_family} emissions")
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_particles = checks.positive_int(num_particles, "num_particles")
    if num_particles < 2:
        raise ValueError(f"num_particles: expected an int >= 2, got {num_particles}")
    burn_in = num_iters // 4 if burn_in is None else burn_in
    if isinstance(burn_in, bool) or not isinstance(burn_in, (int, np.integer)) or not 0 <= burn_in <= num_iters:
        raise ValueError(f"burn_in: expected an int in [0, num_iters = {num_iters}], got {burn_in!r}")
    if checks.is_concrete(step_exponent) and not 0.5 < float(step_exponent) <= 1.0:
        raise ValueError(f"step_exponent: expected a float in (0.5, 1], got {step_exponent!r}")
    fixed, ys, lengths_b = _em_arguments(model, emissions, lengths, fixed, fields=_FIELDS, class_name="SLDS",
                                         method="particle-Gibbs EM", markov=True,
                                         psd_fields=(("dynamics_covs", model.dynamics_covs),
                                                     ("emission_covs", model.emission_covs)))
    model = checks.unify_dtypes(model, ys)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "particle EM", show):
        fitted, history = _fit_particle(key, model, ys, lengths_b, jnp.asarray(step_exponent, ys.dtype),
                                        num_iters=num_iters, num_particles=num_particles, burn_in=int(burn_in),
                                        fixed=fixed, show=show)
    return fitted, history


# ----------------------------------------------------------------------------------------------
# Laplace-EM for the recurrent SLDS
# ----------------------------------------------------------------------------------------------
def _recurrence_m_step(model, xi, xhat, covs, valid, penalty, num_steps):
    """Newton steps (step-halving line search) on the recurrence weights and biases, maximising
    sum_{b, t >= 1} sum_ij q(z_{t-1} = i, z_t = j) E_q(x)[log p(z_t = j | z_{t-1} = i, x_{t-1})]
    - penalty / 2 |theta|^2, the expectation by the same second-order delta method as the E-step,
    f(m) + 1/2 tr(Hess_x f(m) P) at q(x_{t-1}) = N(m, P), so the update raises the E-step's ELBO
    (with the plug-in mean alone the ELBO fell as the weights grew: the curvature term
    -1/2 tr(W^T (diag p - p p^T) W P) penalises sharp softmaxes where q(x) is uncertain). The
    ridge fixes the softmax's shift invariance; the Newton matrix is made positive definite by
    flooring its eigenvalues at the ridge (the delta term need not be concave)."""
    B, T, d = xhat.shape
    K = xi.shape[-1]
    theta0, unravel = ravel_pytree((model.recurrence_weights, model.recurrence_biases))
    w = (xi * valid[:, 1:, None, None]).reshape(-1, K, K)
    xs = xhat[:, :-1].reshape(-1, d)
    Ps = covs[:, :-1].reshape(-1, d, d)

    def objective(theta):
        W, r = unravel(theta)
        W = W if W.ndim == 3 else jnp.broadcast_to(W, (K,) + W.shape)
        r = r if r.ndim == 2 else jnp.broadcast_to(r, (K, K))
        # the delta method written out for a softmax (what the E-step gets by autodiff): the
        # Hessian of log softmax_j(W_i x + r_i) in x is -W_i^T (diag p_i - p_i p_i^T) W_i for every j
        lp = jax.nn.log_softmax(jnp.einsum("ijd,nd->nij", W, xs) + r, axis=-1)  # (N, K, K)
        p = jnp.exp(lp)
        quad = jnp.einsum("ijd,nde,ije->nij", W, Ps, W)  # w_ij^T P w_ij
        mbar = jnp.einsum("nij,ijd->nid", p, W)  # W_i^T p_i
        corr = -0.5 * (jnp.sum(p * quad, -1) - jnp.einsum("nid,nde,nie->ni", mbar, Ps, mbar))
        return jnp.sum(w * (lp + corr[..., None])) - 0.5 * penalty * jnp.sum(theta * theta)

    def step(theta, _):
        g = jax.grad(objective)(theta)
        evals, evecs = jnp.linalg.eigh(symmetrize(-jax.hessian(objective)(theta)))
        dx = evecs @ ((evecs.T @ g) / jnp.maximum(evals, penalty))
        return line_search(objective, theta, dx), None

    theta, _ = lax.scan(step, theta0, None, length=num_steps)
    W, r = unravel(theta)
    return {"recurrence_weights": W, "recurrence_biases": r}


@partial(jax.jit, static_argnames=("num_iters", "num_laplace_iters", "num_newton_steps", "num_recurrence_steps",
                                   "fixed", "show", "missing"))
def _fit_rslds(model, ys, lengths, penalty, *, num_iters, num_laplace_iters, num_newton_steps, num_recurrence_steps,
               fixed, show, missing):
    B, T, _ = ys.shape
    K, d = model.num_modes, model.state_dim
    valid = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None] < lengths[:, None]
    ys_masked = jnp.where(valid[..., None], ys, jnp.nan)

    def e_step(m, state):
        params = m.switching_params(T)
        r = jax.vmap(lambda y, st: laplace_params(params, y, num_laplace_iters, model=m, initial_state=st,
                                                     num_newton_steps=num_newton_steps, missing=missing,
                                                     emission_family=m.emission_family))(
            ys_masked, state)
        return jnp.sum(r.elbo[:, -1]), r

    def step(carry, i):
        m, state = carry
        elbo, r = e_step(m, state)
        if show:
            prog.report(i, elbo, prog.report_every(num_iters))
        Exx = r.covs + jnp.einsum("bti,btj->btij", r.means, r.means)
        Exx1 = r.cross_covs + jnp.einsum("bti,btj->btij", r.means[:, 1:], r.means[:, :-1])
        new = _gaussian_updates(m, r.mode_probs, r.means, Exx, Exx1, ys, valid)
        if not ("recurrence_weights" in fixed and "recurrence_biases" in fixed):
            rec = _recurrence_m_step(m, r.pairwise_mode_probs, r.means, r.covs, valid, penalty,
                                     num_recurrence_steps)
            new.update(rec)
        else:
            new.update(recurrence_weights=m.recurrence_weights, recurrence_biases=m.recurrence_biases)
        return (_replace(m, new, _RFIELDS, fixed), (r.mode_probs, r.pairwise_mode_probs, r.means)), elbo

    state0 = (jnp.full((B, T, K), 1.0 / K, ys.dtype), jnp.full((B, T - 1, K, K), 1.0 / K ** 2, ys.dtype),
              jnp.zeros((B, T, d), ys.dtype))
    (fitted, _), history = lax.scan(step, (model, state0), jnp.arange(num_iters))
    return fitted, history


@register_em(RecurrentSLDS)
def rslds_laplace_em(model, emissions, num_iters: int = 50, *, lengths=None, num_laplace_iters: int = 2,
                     num_newton_steps: int = 2, num_recurrence_steps: int = 3, recurrence_penalty: float = 1e-2,
                     fixed=(), progress=None):
    """Laplace-EM for a `ps.models.RecurrentSLDS` (Zoltowski, Pillow & Linderman, ICML 2020).

    E-step: ``num_laplace_iters`` sweeps of `ps.switching.laplace` (q(x) by Newton's method,
    then q(z) by forward-backward), warm-started from the previous iteration's q(z) and q(x)
    (uniform q(z) and x = 0 at the start). M-step: the closed-form regressions of the SLDS's
    variational EM for the initial, dynamics and emission parameters (from E[x_t], E[x_t x_t^T],
    E[x_t x_{t-1}^T] under q(x) and q(z_t)); the recurrence weights and biases by
    ``num_recurrence_steps`` Newton steps on
    sum_t sum_ij q(z_{t-1} = i, z_t = j) E_q(x)[log softmax_j(W_i x_{t-1} + r_i)] - penalty / 2 |(W, r)|^2,
    the expectation by the second-order delta method at q(x_{t-1}), as in the E-step's ELBO.

    The whole fit is one compiled `lax.scan`. Laplace-EM is not guaranteed to raise its objective
    at every iteration (the Laplace q(x) is not the ELBO's maximiser on a recurrent model); in
    practice it rises up to small wiggles.

    Args:
        model: the starting `RecurrentSLDS` (not modified); no inputs; positive definite dynamics
            and emission covariances.
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays; no missing values inside a
            sequence (NaN only as padding).
        num_iters: EM iterations.
        lengths: (B,) true lengths of a padded batch.
        num_laplace_iters: Laplace sweeps per E-step.
        num_newton_steps: Newton steps per q(x) update.
        num_recurrence_steps: Newton steps on the recurrence parameters per M-step.
        recurrence_penalty: ridge on the recurrence weights and biases (> 0).
        fixed: field names held at their current values.
        progress: show a progress bar (default: when num_iters >= 100).

    Returns:
        ``(fitted_model, elbos)``: ``elbos[i]`` is the (Laplace) ELBO, summed over the batch, of
        the parameters entering iteration i after its E-step.

    Raises:
        ValueError: naming the argument: a model with inputs, missing values, unknown ``fixed``
            names, sequences shorter than 2 steps, a non-positive ``recurrence_penalty``.
    """
    if not isinstance(model, AbstractSwitchingSSM) or not model.is_recurrent:
        raise ValueError(f"model: expected a recurrent switching linear dynamical system (ps.models.RecurrentSLDS), "
                         f"got {type(model).__name__}")
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_laplace_iters = checks.positive_int(num_laplace_iters, "num_laplace_iters")
    num_newton_steps = checks.positive_int(num_newton_steps, "num_newton_steps")
    num_recurrence_steps = checks.positive_int(num_recurrence_steps, "num_recurrence_steps")
    if checks.is_concrete(recurrence_penalty) and not float(recurrence_penalty) > 0:
        raise ValueError(f"recurrence_penalty: expected a positive float, got {recurrence_penalty!r}")
    fixed, ys, lengths_b = _em_arguments(model, emissions, lengths, fixed, fields=_RFIELDS,
                                         class_name="RecurrentSLDS", method="Laplace-EM", markov=False,
                                         psd_fields=(("dynamics_covs", model.dynamics_covs),
                                                     ("emission_covs", model.emission_covs)))  # identity if Poisson
    model = checks.unify_dtypes(model, ys)
    penalty = jnp.asarray(recurrence_penalty, ys.dtype)
    show = prog.default_enabled(progress, num_iters)
    with prog.progress_bar(num_iters, "Laplace-EM", show):
        fitted, history = _fit_rslds(model, ys, lengths_b, penalty, num_iters=num_iters,
                                     num_laplace_iters=num_laplace_iters, num_newton_steps=num_newton_steps,
                                     num_recurrence_steps=num_recurrence_steps, fixed=fixed, show=show,
                                     missing=lengths_b is not None)
    return fitted, history
