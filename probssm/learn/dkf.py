"""Learners for the discriminative Kalman filter's model (`probssm.models.dkf.DKFModel`).

Paired training data: states (N, d) and the observations (emissions) x (N, n) recorded with
them. `fit_dynamics` (A, G by least squares, S = cov(z)); `fit_nadaraya_watson` (Gaussian
kernel, bandwidth by leave-one-out error), `fit_mlp` (equinox MLP trained with optax),
`fit_gp` (GP regression, hyperparameters by marginal likelihood); `fit_covariance` (Q constant
or kernel-regressed on held-out residual outer products). `fit_dkf` puts them together and,
like every learner, returns ``(model, history)``; `fit` is its older form (returns the model).

The part fitters return the fitted part (a module from `probssm.models.dkf`), not a model.
Deprecated keyword names still accepted: ``observations=`` (now ``emissions=``) and
``num_steps=`` (now ``num_iters=``).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from probssm.core.deprecation import renamed
from probssm.core import checks
from probssm.core.linalg import symmetrize
from probssm.core.optim import descend
from probssm.models.dkf import (ConstantCovariance, DKFModel, GPRegressor, KernelCovariance, MLPRegressor,
                                NadarayaWatson)

__all__ = ["fit_dkf", "fit", "fit_dynamics", "fit_nadaraya_watson", "fit_mlp", "fit_gp", "fit_covariance"]


def _sqdist(a, b):
    return jnp.maximum(jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2 * a @ b.T, 0.0)


def _standardise(x):
    mean = jnp.mean(x, 0)
    scale = jnp.std(x, 0)
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x - mean) / scale, mean, scale


def _default_bandwidths(d2, dtype):
    med = jnp.sqrt(jnp.median(d2[d2 > 0]))
    return med * jnp.logspace(-1.5, 0.5, 24, dtype=dtype)


def _to_2d(a, name):
    a = jnp.asarray(a)
    a = jnp.asarray(a, jnp.result_type(a.dtype, float))
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, dim), got shape {tuple(a.shape)}")
    checks.finite(a, name)
    return a


def _check_pair(x, z):
    x, z = _to_2d(x, "emissions (observations)"), _to_2d(z, "states")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"emissions: expected {z.shape[0]} rows of observations to pair with states, "
                         f"got {x.shape[0]}")
    if x.shape[0] < 3:
        raise ValueError(f"states: expected at least 3 paired rows, got {x.shape[0]}")
    return x, z


@renamed(observations="emissions")
def fit_nadaraya_watson(emissions, states, *, bandwidths=None) -> NadarayaWatson:
    """Nadaraya-Watson regression of z on x; bandwidth minimises the leave-one-out squared error.

    Args:
        emissions: (N, n) training observations x (``observations=``: deprecated name).
        states: (N, d) training z.
        bandwidths: candidate bandwidths (in units of standardised x); default 24 values
            log-spaced around the median pairwise distance.
    """
    x, z = _check_pair(emissions, states)
    u, mean, scale = _standardise(x)
    d2 = _sqdist(u, u)
    hs = _default_bandwidths(d2, u.dtype) if bandwidths is None else jnp.asarray(bandwidths, u.dtype)
    if hs.ndim != 1 or not bool(jnp.all(hs > 0)):
        raise ValueError("bandwidths: expected a 1-D array of positive numbers")
    eye = jnp.eye(u.shape[0], dtype=bool)

    def loo_error(h):
        logw = jnp.where(eye, -jnp.inf, -0.5 * d2 / h ** 2)
        pred = jax.nn.softmax(logw, axis=1) @ z
        return jnp.mean(jnp.sum((pred - z) ** 2, -1))

    errs = lax.map(loo_error, hs)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    return NadarayaWatson(u, z, mean, scale, hs[jnp.argmin(errs)])


@eqx.filter_jit
def _train_mlp(mlp, u, v, num_iters, learning_rate, weight_decay):
    # module level, so a second fit with the same shapes and settings reuses the compilation
    opt = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_iters), weight_decay=weight_decay)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def loss(p):
        net = eqx.combine(p, static)
        return jnp.mean((jax.vmap(net)(u) - v) ** 2)

    return eqx.combine(descend(loss, params, opt, num_iters), static)


@renamed(observations="emissions", num_steps="num_iters")
def fit_mlp(key, emissions, states, *, width: int = 64, depth: int = 2, num_iters: int = 2000,
            learning_rate: float = 3e-3, weight_decay: float = 1e-4) -> MLPRegressor:
    """A small equinox MLP regressing z on x, trained full-batch with optax AdamW (one `lax.scan`).

    Args:
        key: a `jax.random` key (initial weights).
        emissions: (N, n) training observations x; states: (N, d) training z.
        num_iters: optimiser steps (``num_steps=``: deprecated name).
    """
    x, z = _check_pair(emissions, states)
    width, depth = checks.positive_int(width, "width"), checks.positive_int(depth, "depth")
    num_iters = checks.positive_int(num_iters, "num_iters")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: expected a number > 0, got {learning_rate}")
    u, xm, xs = _standardise(x)
    v, zm, zs = _standardise(z)
    mlp = eqx.nn.MLP(x.shape[1], z.shape[1], width, depth, activation=jax.nn.gelu, key=key)
    mlp = jax.tree_util.tree_map(lambda a: a.astype(x.dtype) if eqx.is_inexact_array(a) else a, mlp)
    params = _train_mlp(mlp, u, v, num_iters, float(learning_rate), float(weight_decay))
    return MLPRegressor(params, xm, xs, zm, zs)


def _gp_gram(theta, d2):
    ell, sf2, sn2 = jnp.exp(theta[0]), jnp.exp(theta[1]), jnp.exp(theta[2]) + 1e-6
    return ell, sf2, sf2 * jnp.exp(-0.5 * d2 / ell ** 2) + sn2 * jnp.eye(d2.shape[0], dtype=d2.dtype)


@partial(jax.jit, static_argnums=3)
def _fit_gp_hyper(theta, d2, v, num_iters):
    opt = optax.adam(0.05)

    def nll(th):
        L = jnp.linalg.cholesky(_gp_gram(th, d2)[2])
        a = jax.scipy.linalg.cho_solve((L, True), v)
        return 0.5 * jnp.sum(v * a) + v.shape[1] * jnp.sum(jnp.log(jnp.diagonal(L)))

    theta = descend(nll, theta, opt, num_iters)
    ell, sf2, K = _gp_gram(theta, d2)
    return ell, sf2, jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(K), True), v)


@renamed(observations="emissions", num_steps="num_iters")
def fit_gp(emissions, states, *, max_points: int = 1000, num_iters: int = 200) -> GPRegressor:
    """GP regression of z (N, d) on x (N, n) (shared kernel over output dimensions); the
    length-scale, signal and noise variances maximise the marginal likelihood (``num_iters``
    optax Adam steps). The first ``max_points`` rows are used (exact GP, O(N^3))."""
    x, z = _check_pair(emissions, states)
    max_points = checks.positive_int(max_points, "max_points", 3)
    num_iters = checks.positive_int(num_iters, "num_iters")
    x, z = x[:max_points], z[:max_points]
    u, xm, xs = _standardise(x)
    v, zm, zs = _standardise(z)
    d2 = _sqdist(u, u)
    init = jnp.array([jnp.log(jnp.sqrt(jnp.median(d2[d2 > 0]))), 0.0, jnp.log(0.1)], u.dtype)
    ell, sf2, alpha = _fit_gp_hyper(init, d2, v, num_iters)
    return GPRegressor(u, alpha, xm, xs, zm, zs, ell, sf2)


@renamed(observations="emissions")
def fit_covariance(mean_fn, emissions, states, *, kind: str = "constant", bandwidths=None, ridge: float = 1e-3):
    """Q for p(z | x) from residuals r_i = z_i - f(x_i) on held-out pairs.

    Args:
        mean_fn: the fitted f.
        emissions, states: held-out (N, n) observations and (N, d) states, not used to fit f.
        kind: "constant" (Q = mean of r r^T) or "kernel" (Nadaraya-Watson regression of
            r r^T on x, bandwidth by leave-one-out Gaussian log-likelihood of the residuals).
        ridge: added to the kernel estimate as ``ridge * mean(diag(constant Q)) * I``.

    Returns:
        `ConstantCovariance` or `KernelCovariance`.
    """
    x, z = _check_pair(emissions, states)
    if kind not in ("constant", "kernel"):
        raise ValueError(f"kind: expected 'constant' or 'kernel', got {kind!r}")
    r = z - jax.vmap(mean_fn)(x)
    Q = symmetrize(r.T @ r / r.shape[0])
    if kind == "constant":
        return ConstantCovariance(Q)
    u, mean, scale = _standardise(x)
    d2 = _sqdist(u, u)
    hs = _default_bandwidths(d2, u.dtype) if bandwidths is None else jnp.asarray(bandwidths, u.dtype)
    outer = r[:, :, None] * r[:, None, :]
    ridge_m = ridge * jnp.mean(jnp.diagonal(Q)) * jnp.eye(Q.shape[0], dtype=Q.dtype)
    eye = jnp.eye(u.shape[0], dtype=bool)

    def loo_nll(h):
        w = jax.nn.softmax(jnp.where(eye, -jnp.inf, -0.5 * d2 / h ** 2), axis=1)
        Qs = jnp.einsum("ni,ijk->njk", w, outer) + ridge_m
        L = jnp.linalg.cholesky(Qs)
        s = jax.scipy.linalg.solve_triangular(L, r[..., None], lower=True)[..., 0]
        return jnp.mean(0.5 * jnp.sum(s ** 2, -1) + jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2)), -1))

    errs = lax.map(loo_nll, hs)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    return KernelCovariance(u, outer, mean, scale, hs[jnp.argmin(errs)], ridge_m)


def fit_dynamics(states):
    """A, G by least squares and the stationary mean and covariance S = cov(z).

    Args:
        states: (T, d) one sequence, or a list of (T_i, d) sequences (trials).

    Returns:
        ``(A (d, d), G (d, d), mean (d,), S (d, d))``.
    """
    seqs = list(states) if isinstance(states, (list, tuple)) else [states]
    seqs = [_to_2d(s, "states") for s in seqs]
    allz = jnp.concatenate(seqs)
    mean = jnp.mean(allz, 0)
    S = symmetrize(jnp.cov(allz.T, bias=True).reshape(allz.shape[1], allz.shape[1]))
    z0 = jnp.concatenate([s[:-1] for s in seqs]) - mean
    z1 = jnp.concatenate([s[1:] for s in seqs]) - mean
    if z0.shape[0] < allz.shape[1]:
        raise ValueError(f"states: expected at least {allz.shape[1] + 1} time steps, got {allz.shape[0]}")
    A = jnp.linalg.lstsq(z0, z1)[0].T
    res = z1 - z0 @ A.T
    G = symmetrize(res.T @ res / res.shape[0])
    return A, G, mean, S


def _fit(key, states, emissions, regressor, covariance, holdout, regressor_kwargs):
    if not 0 < holdout < 1:
        raise ValueError(f"holdout: expected a fraction in (0, 1), got {holdout}")
    A, G, mean, S = fit_dynamics(states)
    z = jnp.concatenate(states) if isinstance(states, (list, tuple)) else states
    x = jnp.concatenate(emissions) if isinstance(emissions, (list, tuple)) else emissions
    x, z = _check_pair(x, z)
    n_fit = int(round(x.shape[0] * (1 - holdout)))
    if n_fit < 3 or x.shape[0] - n_fit < 3:
        raise ValueError(f"holdout: leaves too few rows on one side of the split ({n_fit} / {x.shape[0]})")
    kw = dict(regressor_kwargs or {})
    if regressor == "nw":
        f = fit_nadaraya_watson(x[:n_fit], z[:n_fit], **kw)
    elif regressor == "mlp":
        if key is None:
            raise ValueError("key: the 'mlp' regressor needs a jax.random key, got None")
        f = fit_mlp(key, x[:n_fit], z[:n_fit], **kw)
    elif regressor == "gp":
        f = fit_gp(x[:n_fit], z[:n_fit], **kw)
    elif callable(regressor):
        f = regressor(x[:n_fit], z[:n_fit])
    else:
        raise ValueError(f"regressor: expected 'nw', 'mlp', 'gp' or a callable, got {regressor!r}")
    Q = fit_covariance(f, x[n_fit:], z[n_fit:], kind=covariance)
    residual = z[n_fit:] - jax.vmap(f)(x[n_fit:])
    history = {"holdout_rmse": jnp.sqrt(jnp.mean(jnp.sum(residual ** 2, -1))),
               "num_fit": n_fit, "num_holdout": x.shape[0] - n_fit}
    return DKFModel(A, G, S, f, Q, mean, emission_dim=x.shape[1]), history


@renamed(observations="emissions")
def fit_dkf(key, states, emissions, *, regressor="nw", covariance: str = "constant", holdout: float = 0.25,
            regressor_kwargs: Optional[dict] = None) -> tuple[DKFModel, dict]:
    """Learn a `DKFModel` from paired training data.

    Args:
        key: a `jax.random` key (used by the "mlp" regressor; required for every regressor,
            so that a call does not change meaning with the regressor).
        states: (N, d) latent states, in time order (or a list of trials).
        emissions: (N, n) observations x paired with ``states`` (or a list of trials).
        regressor: "nw" (Nadaraya-Watson), "mlp", "gp", or a callable
            ``(emissions, states) -> f`` fitting your own.
        covariance: "constant" or "kernel" (see `fit_covariance`).
        holdout: fraction of the (last) rows held out from f to fit Q on residuals, in (0, 1).
        regressor_kwargs: passed to the regressor's fit function.

    Returns:
        ``(model, history)``; history: ``holdout_rmse`` (root mean squared error of f on the
        held-out rows), ``num_fit`` and ``num_holdout`` rows.

    Example:
        >>> model, history = ps.learn.fit_dkf(jax.random.key(0), z_train, x_train, regressor="nw")
        >>> ps.dkf.filter(model, x_test).filtered_means
    """
    if key is None:
        raise ValueError("key: expected a jax.random key, got None")
    return _fit(key, states, emissions, regressor, covariance, holdout, regressor_kwargs)


@renamed(observations="emissions")
def fit(states, emissions, *, regressor="nw", covariance: str = "constant", holdout: float = 0.25,
        key=None, regressor_kwargs: Optional[dict] = None) -> DKFModel:
    """Older form of `fit_dkf` (kept as ``ps.dkf.fit``): returns only the model, and needs
    ``key`` only for the "mlp" regressor (a missing key is an error there, never made up)."""
    return _fit(key, states, emissions, regressor, covariance, holdout, regressor_kwargs)[0]
