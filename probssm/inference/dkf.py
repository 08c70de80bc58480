"""Discriminative Kalman filter (Burkhart, Brandman, Franco, Hochberg & Harrison,
Neural Computation 2020): the engine.

The model (`probssm.models.dkf`: `DKFModel`, or any `AbstractDiscriminativeSSM`) is a
stationary linear-Gaussian state chain with a learned *discriminative* Gaussian
p(z | x) ~ N(f(x), Q(x)) in place of an observation model:

    z_0 ~ N(mu0, S),   z_t - mu0 = A (z_{t-1} - mu0) + N(0, G),   S = A S A^T + G
    p(z_t | x_t) ~= N(f(x_t), Q(x_t))

Since p(x | z) is proportional to p(z | x) / p(z), the filter is a Kalman recursion in
information form (``mu0`` is the stationary mean, zero in the paper)::

    mu, Sigma = mu0, S                                   # predicted moments of z_0
    for t in 0..T-1:
        if t > 0:  nu, M = mu0 + A (mu - mu0), A Sigma A^T + G
        else:      nu, M = mu, Sigma
        J = Q(x_t)^{-1} - S^{-1};  h = Q(x_t)^{-1} f(x_t) - S^{-1} mu0
        Sigma = (M^{-1} + J)^{-1};  mu = Sigma (M^{-1} nu + h)

The update needs Q^{-1} - S^{-1} positive definite. Where it is not, ``correction="auto"``
(default) replaces Q by (Q^{-1} + S^{-1})^{-1} for that step, which makes J = Q^{-1} positive
definite. ``robust=True`` runs the variant that never divides by the stationary prior,
Sigma = (M^{-1} + Q^{-1})^{-1}, mu = Sigma (M^{-1} nu + Q^{-1} f(x)) (the authors' fallback
update used at every step): it treats N(f(x), Q(x)) as a likelihood, so it stays well defined
under prior misspecification (e.g. non-stationary data) at the price of double-counting the
prior. Missing data: a step whose observation row holds any NaN is a pure prediction (f cannot
take a partial x).

The engine reads only what `AbstractDiscriminativeSSM` declares. Regressors and learners:
`probssm.models.dkf` (fitted parts: `NadarayaWatson`, `MLPRegressor`, ...) and
`probssm.learn.dkf` (`fit_dkf`, `fit_dynamics`, `fit_nadaraya_watson`, ...). Their old names
``ps.dkf.<name>`` keep working (deprecated aliases for the learners).
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core.deprecation import renamed
from probssm.core import checks
from probssm.core.batching import as_batch
from probssm.core.linalg import cho_solve_lower, cholesky, mm, solve_lower, symmetrize
from probssm.models.dkf import (AbstractDiscriminativeSSM, ConstantCovariance, DKFModel, GPRegressor,
                                KernelCovariance, LinearMap, MLPRegressor, NadarayaWatson, exact_linear_gaussian,
                                inv_psd)

__all__ = ["DKFResult", "filter", "filter_sequence", "DKFModel", "AbstractDiscriminativeSSM", "NadarayaWatson",
           "MLPRegressor", "GPRegressor", "KernelCovariance", "ConstantCovariance", "LinearMap",
           "exact_linear_gaussian"]

# learners, now in probssm.learn.dkf: still reachable as ps.dkf.<name> (deprecated), loaded on first use


class DKFResult(NamedTuple):
    filtered_means: jax.Array  # (T, d)  approximate E[z_t | x_{0:t}]
    filtered_covs: jax.Array  # (T, d, d)
    corrected: jax.Array  # (T,) bool: step t used Q <- (Q^-1 + S^-1)^-1 (always False when robust)


def _information(model, xs, correction, robust):
    """Per-step information (J_t, h_t) that x_t adds about z_t, all steps at once."""
    S_inv = inv_psd(model.stationary_cov)
    mu0 = model.stationary_mean

    def one(x):
        observed = jnp.all(~jnp.isnan(x))
        x = jnp.where(jnp.isnan(x), 0.0, x)
        f = model.discriminative_mean(x)
        Q_inv = inv_psd(symmetrize(model.discriminative_cov(x)))
        if robust:
            J, h, fixed = Q_inv, Q_inv @ f, jnp.array(False)
        else:
            J = symmetrize(Q_inv - S_inv)
            bad = ~jnp.all(jnp.isfinite(cholesky(J)))  # the factorisation fails (NaN) unless J is PD
            fixed = bad if correction == "auto" else jnp.array(False)
            # Q <- (Q^-1 + S^-1)^-1:  Q^-1 -> Q^-1 + S^-1, so J -> Q^-1
            J = jnp.where(fixed, Q_inv, J)
            h = jnp.where(fixed, (Q_inv + S_inv) @ f, Q_inv @ f) - S_inv @ mu0
        zero = jnp.zeros_like(J)
        return jnp.where(observed, J, zero), jnp.where(observed, h, 0.0), fixed & observed

    return jax.vmap(one)(xs)


def filter_sequence(model: AbstractDiscriminativeSSM, emissions: jax.Array, length=None, *,
                    correction: str = "auto", robust: bool = False) -> DKFResult:
    """`filter` on one sequence without input checks: the public traceable core.

    Args:
        model: an `AbstractDiscriminativeSSM` (e.g. `DKFModel`).
        emissions: (T, n) observations x_t, floating point; a row with any NaN is a prediction.
        length: optional int (traced is fine): steps t >= length are treated as missing.
        correction, robust: static, as in `filter`.

    Returns:
        `DKFResult` with filtered_means (T, d), filtered_covs (T, d, d), corrected (T,).
    """
    xs = emissions
    if length is not None:
        keep = jnp.arange(xs.shape[0]) < length
        xs = jnp.where(keep[:, None], xs, jnp.nan)
    Js, hs, fixed = _information(model, xs, correction, robust)
    A, G, mu0 = model.transition_matrix, model.transition_cov, model.stationary_mean

    eye = jnp.eye(A.shape[0], dtype=A.dtype)

    def update(nu, M, J, h):
        # Sigma = (M^-1 + J)^-1 = L B^-1 L^T with M = L L^T, B = I + L^T J L (SPD, eigenvalues >= 1);
        # mu = Sigma (M^-1 nu + h) = L B^-1 (L^-1 nu + L^T h). No inverse of M or of J is formed,
        # so J may be singular (a skipped step has J = 0).
        L = cholesky(M)
        C = cholesky(symmetrize(eye + mm(mm(L.T, J), L)))
        mu = mm(L, cho_solve_lower(C, solve_lower(L, nu) + mm(L.T, h)))
        W = solve_lower(C, L.T)  # C^-1 L^T, so Sigma = W^T W
        return mu, mm(W.T, W)

    m0, P0 = update(mu0, model.stationary_cov, Js[0], hs[0])

    def step(carry, inp):
        mu, Sigma = carry
        J, h = inp
        nu = mu0 + mm(A, mu - mu0)
        M = symmetrize(mm(mm(A, Sigma), A.T) + G)
        mu, Sigma = update(nu, M, J, h)
        return (mu, Sigma), (mu, Sigma)

    _, (ms, Ps) = lax.scan(step, (m0, P0), (Js[1:], hs[1:]))
    return DKFResult(jnp.concatenate([m0[None], ms]), jnp.concatenate([P0[None], Ps]), fixed)


_run = eqx.filter_jit(filter_sequence)


def _check_model(model, n, dtype):
    """Checks on the declared members (so they also run on models made by eqx.tree_at)."""
    if not isinstance(model, AbstractDiscriminativeSSM):
        raise ValueError("model: expected a DKF model (ps.models.DKFModel or an AbstractDiscriminativeSSM), "
                         f"got {type(model).__name__}")
    A = jnp.asarray(model.transition_matrix)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"transition_matrix: expected shape (d, d), got shape {tuple(A.shape)}")
    d = A.shape[0]
    checks.finite(A, "transition_matrix")
    checks.shape(jnp.asarray(model.transition_cov), "transition_cov", (d, d), f"({d}, {d})")
    checks.shape(jnp.asarray(model.stationary_cov), "stationary_cov", (d, d), f"({d}, {d})")
    mu0 = checks.shape(jnp.asarray(model.stationary_mean), "stationary_mean", (d,), f"({d},)")
    checks.finite(mu0, "stationary_mean")
    checks.psd(model.transition_cov, "transition_cov", strict=False)
    checks.psd(model.stationary_cov, "stationary_cov")
    if model.emission_dim is not None and n != model.emission_dim:
        raise ValueError(f"emissions: expected observation rows of width {model.emission_dim} (the model's "
                         f"emission_dim), got width {n}")
    x = jax.ShapeDtypeStruct((n,), dtype)
    try:
        f_out = jax.eval_shape(model.discriminative_mean, x)
    except Exception as e:  # noqa: BLE001 - report the user's function failing on this shape
        raise ValueError(f"mean_fn: the discriminative mean failed on an observation of shape {x.shape}: {e}") from e
    if f_out.shape != (d,):
        raise ValueError(f"mean_fn: expected the discriminative mean to have shape ({d},), got {f_out.shape}")
    try:
        q_out = jax.eval_shape(model.discriminative_cov, x)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cov_fn: the discriminative covariance failed on an observation of shape {x.shape}: "
                         f"{e}") from e
    if q_out.shape != (d, d):
        raise ValueError(f"cov_fn: expected the discriminative covariance to have shape ({d}, {d}), "
                         f"got {q_out.shape}")


@renamed(observations="emissions")
def filter(model: AbstractDiscriminativeSSM, emissions, *, correction: str = "auto", robust: bool = False,
           lengths=None) -> DKFResult:
    """Discriminative Kalman filter.

    Args:
        model: a `DKFModel` (built by hand, by `exact_linear_gaussian` or by
            `ps.learn.fit_dkf`) or any `AbstractDiscriminativeSSM`.
        emissions: the observations x, (T, n), a batch (B, T, n) or a list of (T_b, n) arrays
            (padded, lengths set); a row with any NaN is skipped (pure prediction).
            ``observations=`` is the deprecated name.
        correction: "auto" replaces Q(x_t) by (Q^-1 + S^-1)^-1 at steps where Q^-1 - S^-1 is
            not positive definite; "never" leaves it (the update may then be invalid).
        robust: run the robust variant (no division by the stationary prior; see module doc).
        lengths: () or (B,) ints: steps t >= length are treated as missing (padding).

    Returns:
        `DKFResult`: filtered_means (T, d), filtered_covs (T, d, d), corrected (T,); a leading
        B axis for a batch.

    Example:
        >>> model, _ = ps.learn.fit_dkf(key, z_train, x_train, regressor="nw")
        >>> ps.dkf.filter(model, x_test).filtered_means
    """
    if correction not in ("auto", "never"):
        raise ValueError(f"correction: expected 'auto' or 'never', got {correction!r}")
    if not isinstance(emissions, (list, tuple)) and jnp.ndim(emissions) not in (2, 3):
        raise ValueError("emissions: expected observations of shape (T, n), (B, T, n) or a list of (T_b, n) "
                         f"arrays, got shape {tuple(jnp.shape(emissions))}")
    batch = as_batch(emissions, None, lengths)
    xs = batch.emissions
    _check_model(model, xs.shape[-1], xs.dtype)
    robust = bool(robust)
    return batch.map(lambda x, u, n: _run(model, x, n, correction=correction, robust=robust))
