"""Markovian GP (`ps.models.MarkovianGP`, `ps.gp`) against dense GP regression with the same kernel.

The oracle is numpy: the T x T covariance from each kernel's exact ``__call__`` (its state-space
form, for the approximate kernels), a Cholesky factor, and the textbook formulas for log p(y) and the
posterior at new times. Times are irregular, and a missing value is dropped from the dense problem.
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import equinox as eqx
import scipy.optimize

import probssm as ps

RNG = np.random.default_rng(3)
T = 30
TIMES = np.sort(RNG.uniform(0.0, 6.0, T))
TIMES[5] = TIMES[4] + 1e-3  # a close pair: a near-singular step the filter must take
Y = np.sin(1.3 * TIMES) + 0.3 * RNG.normal(size=T)
Y_MISSING = Y.copy()
Y_MISSING[[7, 18]] = np.nan
T_NEW = np.array([-1.0, TIMES[0], 0.5 * (TIMES[10] + TIMES[11]), TIMES[-1] + 0.7, 3.0, 9.0])
NOISE, MEAN = 0.09, 0.2


def _kernels():
    gp = ps.gp
    out = {
        "matern12": gp.Matern12(0.8, 1.1),
        "matern32": gp.Matern32(1.3, 0.8),
        "matern52": gp.Matern52(0.9, 1.4),
    }
    names = set(gp.__all__)
    if "Sum" in names:
        out["sum"] = gp.Sum(gp.Matern32(1.3, 0.8), gp.Matern12(3.0, 0.3))
    if "Periodic" in names:
        out["periodic"] = gp.Periodic(lengthscale=1.2, variance=0.7, period=2.0)
        out["quasi_periodic"] = gp.Product(gp.Periodic(lengthscale=1.2, variance=0.7, period=2.0), gp.Matern32(4.0, 1.0))
    if "Cosine" in names:
        out["cosine_plus_matern"] = gp.Sum(gp.Cosine(variance=0.5, period=3.0), gp.Matern52(1.0, 0.5))
    if "SquaredExponential" in names:
        out["squared_exponential"] = gp.SquaredExponential(lengthscale=1.0, variance=0.9)
    if "Linear" in names:
        out["linear_plus_matern"] = gp.Sum(gp.Linear(variance=0.2), gp.Matern32(1.0, 0.5))
    return out


KERNELS = _kernels()


def _has_approximate(k):
    approx = tuple(getattr(ps.gp, n) for n in ("SquaredExponential", "Periodic") if n in ps.gp.__all__)
    return isinstance(k, approx) or any(_has_approximate(p) for p in getattr(k, "kernels", ()))


def _cov(k, a, b):
    """Dense covariance of f between times a and b: the exact kernel where the state-space form
    is exact, the represented (truncated / approximate) kernel otherwise."""
    if "Sum" in ps.gp.__all__ and isinstance(k, ps.gp.Sum):
        return sum(_cov(p, a, b) for p in k.kernels)
    if _has_approximate(k):
        f = jax.jit(jax.vmap(jax.vmap(k.ssm_covariance, (None, 0)), (0, None)))
        return np.asarray(f(jnp.asarray(a), jnp.asarray(b)))
    return np.asarray(k(np.asarray(a)[:, None], np.asarray(b)[None, :]))


def dense_gp(k, t, y, t_new, noise=NOISE, mean=MEAN):
    """log p(y), and the posterior mean / variance of f at t_new (numpy; NaN rows dropped)."""
    n = len(t)
    full = _cov(k, np.r_[t, t_new], np.r_[t, t_new])  # one dense matrix (one compile for the oracle)
    keep = ~np.isnan(y)
    K = full[:n, :n][np.ix_(keep, keep)] + noise * np.eye(keep.sum())
    L = np.linalg.cholesky(K)
    r = y[keep] - mean
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, r))
    lml = -0.5 * r @ alpha - np.log(np.diag(L)).sum() - 0.5 * len(r) * np.log(2 * np.pi)
    Ks = full[n:, :n][:, keep]
    V = np.linalg.solve(L, Ks.T)
    var = np.diag(full[n:, n:]) - (V * V).sum(0)
    return lml, Ks @ alpha, var


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_markovian_gp_equals_dense_gp(name):
    """log p(y) and the posterior of f, at new times (before, between, after, repeating a training
    time) and at the training times, with and without missing values: one compiled call each."""
    k = KERNELS[name]
    gp = ps.models.MarkovianGP(k, noise_variance=NOISE, mean=MEAN)
    points = np.r_[T_NEW, TIMES]
    for y in (Y, Y_MISSING):
        lml, mean, var = dense_gp(k, TIMES, y, points)
        np.testing.assert_allclose(ps.gp.log_marginal_likelihood(gp, TIMES, y), lml, rtol=1e-8)
        m, v = ps.gp.predict(gp, TIMES, y, points)
        np.testing.assert_allclose(m, mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(v, var, rtol=1e-8, atol=1e-10)


def test_parallel_equals_sequential_and_kalman_runs_the_model_unchanged():
    gp = ps.models.MarkovianGP(KERNELS.get("sum", KERNELS["matern52"]), noise_variance=NOISE, mean=MEAN)
    lml = ps.gp.log_marginal_likelihood(gp, TIMES, Y_MISSING)
    np.testing.assert_allclose(ps.gp.log_marginal_likelihood(gp, TIMES, Y_MISSING, parallel=True), lml, rtol=1e-10)
    m, v = ps.gp.predict(gp, TIMES, Y_MISSING, T_NEW)
    mp, vp = ps.gp.predict(gp, TIMES, Y_MISSING, T_NEW, parallel=True)
    np.testing.assert_allclose(mp, m, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(vp, v, rtol=1e-8, atol=1e-12)
    # the noisy outputs y: the latent posterior plus the mean and the noise
    my, vy = ps.gp.predict(gp, TIMES, Y_MISSING, T_NEW, observed=True)
    np.testing.assert_allclose(my, m + MEAN, rtol=1e-12)
    np.testing.assert_allclose(vy, v + NOISE, rtol=1e-12)
    # the model is an AbstractLinearGaussianSSM: times as inputs, or held by the model
    y = Y_MISSING[:, None]
    for parallel in (False, True):
        f = ps.kalman.filter(gp, y, inputs=TIMES[:, None], parallel=parallel)
        np.testing.assert_allclose(f.log_likelihood, lml, rtol=1e-10)
        s = ps.kalman.smoother(gp.at(TIMES), y, parallel=parallel)
        np.testing.assert_allclose(s.log_likelihood, lml, rtol=1e-10)
    # a padded batch with its own time grid per sequence
    batch = np.stack([y, np.concatenate([y[:20], np.full((10, 1), np.nan)])])
    times = np.stack([TIMES, np.concatenate([TIMES[:20], np.full(10, TIMES[19])])])[..., None]
    fb = ps.kalman.filter(gp, batch, inputs=times, lengths=np.array([30, 20]))
    np.testing.assert_allclose(fb.log_likelihood[1], ps.gp.log_marginal_likelihood(gp, TIMES[:20], Y_MISSING[:20]),
                               rtol=1e-10)


def test_several_outputs_share_latent_functions():
    k = (ps.gp.Matern32(1.0, 1.0), ps.gp.Matern12(2.0, 0.5))
    W = np.array([[1.0, 0.5], [0.3, -1.0], [0.0, 2.0]])
    noise = np.array([0.1, 0.2, 0.05])
    gp = ps.models.MarkovianGP(k, noise_variance=noise, mixing=W)
    y = np.stack([np.sin(TIMES), np.cos(TIMES), TIMES / 6], axis=1)
    y[3, 1] = np.nan
    # dense: cov of stacked outputs (time-major)
    K = sum(np.kron(_cov(kk, TIMES, TIMES), np.outer(W[:, l], W[:, l])) for l, kk in enumerate(k))
    K = K + np.kron(np.eye(T), np.diag(noise))
    keep = ~np.isnan(y.ravel())
    K, yv = K[np.ix_(keep, keep)], y.ravel()[keep]
    _, logdet = np.linalg.slogdet(K)
    lml = -0.5 * yv @ np.linalg.solve(K, yv) - 0.5 * logdet - 0.5 * len(yv) * np.log(2 * np.pi)
    np.testing.assert_allclose(ps.gp.log_marginal_likelihood(gp, TIMES, y), lml, rtol=1e-8)
    m, v = ps.gp.predict(gp, TIMES, y, T_NEW)
    assert m.shape == v.shape == (len(T_NEW), 2)
    m, v = ps.gp.predict(gp, TIMES, y, T_NEW, observed=True)
    assert m.shape == v.shape == (len(T_NEW), 3)


def _dense_lml_of(log_params):
    ell, var, noise, mean = np.exp(log_params[:3]).tolist() + [log_params[3]]
    k = ps.gp.Matern32(ell, var)
    return dense_gp(k, TIMES, Y, T_NEW[:1], noise=noise, mean=mean)[0]


def test_gradient_equals_finite_differences_and_mle_equals_dense_mle():
    gp = ps.models.MarkovianGP(ps.gp.Matern32(1.0, 1.0), noise_variance=0.2, mean=0.0)
    grad = jax.jit(jax.grad(lambda g: ps.gp.log_marginal_likelihood(g, TIMES, Y)))(gp)
    eps = 1e-6
    for path, g in (("kernels.0.lengthscale", grad.kernels[0].lengthscale), ("noise_variance", grad.noise_variance[0]),
                    ("mean", grad.mean[0])):
        def at(delta):
            return float(ps.gp.log_marginal_likelihood(
                ps.core.params.replace(gp, (path,), (ps.core.params.get(gp, path) + delta,)), TIMES, Y))
        np.testing.assert_allclose(g, (at(eps) - at(-eps)) / (2 * eps), rtol=1e-6)
    fitted, history = ps.learn.mle(gp, Y[:, None], 60, inputs=TIMES[:, None], progress=False)
    assert history[-1] >= history[0]
    ref = scipy.optimize.minimize(lambda p: -_dense_lml_of(p), np.zeros(4), method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    got = np.array([float(fitted.kernels[0].lengthscale), float(fitted.kernels[0].variance),
                    float(fitted.noise_variance[0]), float(fitted.mean[0])])
    np.testing.assert_allclose(np.log(got[:3]), ref.x[:3], atol=1e-4)
    np.testing.assert_allclose(got[3], ref.x[3], atol=1e-4)
    np.testing.assert_allclose(history[-1], -ref.fun, rtol=1e-9)


def test_float32_long_sequence_and_vmap_over_hyperparameters():
    n = 20000
    t = 0.1 * np.arange(n) + 0.05 * np.random.default_rng(1).uniform(size=n)  # distinct in float32
    y = np.sin(t) + 0.2 * np.random.default_rng(2).normal(size=n)
    gp64 = ps.models.MarkovianGP(ps.gp.Matern32(1.0, 1.0), noise_variance=0.04)
    gp32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, gp64)
    l64 = float(ps.gp.log_marginal_likelihood(gp64, t, y))
    l32 = ps.gp.log_marginal_likelihood(gp32, t.astype(np.float32), y.astype(np.float32))
    assert l32.dtype == jnp.float32
    np.testing.assert_allclose(float(l32), l64, rtol=2e-4)
    ells = jnp.array([0.5, 1.0, 2.0])
    batched = jax.jit(jax.vmap(lambda e: ps.gp.log_marginal_likelihood(
        eqx.tree_at(lambda g: g.kernels[0].lengthscale, gp64, e), TIMES, Y)))(ells)
    for e, b in zip(ells, batched):
        np.testing.assert_allclose(b, dense_gp(ps.gp.Matern32(float(e), 1.0), TIMES, Y, T_NEW[:1], noise=0.04,
                                               mean=0.0)[0], rtol=1e-8)


@pytest.mark.parametrize("case, match", [
    (lambda gp: ps.gp.log_marginal_likelihood(gp, TIMES[::-1], Y), "t: expected sorted"),
    (lambda gp: ps.gp.log_marginal_likelihood(gp, np.r_[TIMES[:1], TIMES[:-1]], Y), "t: expected distinct"),
    (lambda gp: ps.gp.log_marginal_likelihood(gp, TIMES, Y[:-1]), r"y: expected shape \(30,\)"),
    (lambda gp: ps.gp.log_marginal_likelihood(gp, np.r_[TIMES[:-1], np.inf], Y), "t: expected finite"),
    (lambda gp: ps.gp.predict(gp, TIMES, Y, np.array([0.0, np.nan])), "t_new: expected finite"),
    (lambda gp: ps.gp.predict(gp, TIMES, Y, np.array([1e308, -1e308])), "t_new: times up to"),
    (lambda gp: ps.gp.predict(gp, TIMES, Y, np.zeros((2, 2))), r"t_new: expected shape \(T_new,\)"),
    (lambda gp: ps.gp.log_marginal_likelihood(eqx.tree_at(lambda g: g.kernels[0].lengthscale, gp, -1.0), TIMES, Y),
     "kernels.0.lengthscale"),
    (lambda gp: ps.kalman.filter(eqx.tree_at(lambda g: g.kernels[0].variance, gp, jnp.array(0.0)), Y[:, None]),
     "kernels.0.variance"),
    (lambda gp: ps.models.MarkovianGP(ps.gp.Matern32(), noise_variance=[0.1, 0.2], mixing=np.ones((3, 1))),
     "noise_variance"),
    (lambda gp: ps.models.MarkovianGP("matern"), "kernel: expected a ps.gp kernel"),
])
def test_bad_input_names_the_argument(case, match):
    gp = ps.models.MarkovianGP(ps.gp.Matern32(1.0, 1.0), noise_variance=0.1)
    with pytest.raises(ValueError, match=match):
        case(gp)


def test_checks_do_not_break_tracing():
    gp = ps.models.MarkovianGP(ps.gp.Matern32(1.0, 1.0), noise_variance=0.1)
    f = jax.jit(lambda ell, t: ps.gp.predict(eqx.tree_at(lambda g: g.kernels[0].lengthscale, gp, ell), t, Y, T_NEW))
    m, _ = f(1.0, TIMES)
    np.testing.assert_allclose(m, ps.gp.predict(gp, TIMES, Y, T_NEW).mean, rtol=1e-12)


@pytest.mark.slow
def test_a_million_points_in_float64():
    n = 1_000_000
    t = np.cumsum(np.random.default_rng(4).exponential(1.0, n))
    y = np.sin(0.01 * t) + 0.1 * np.random.default_rng(5).normal(size=n)
    gp = ps.models.MarkovianGP(ps.gp.Matern32(50.0, 1.0), noise_variance=0.01)
    assert np.isfinite(float(ps.gp.log_marginal_likelihood(gp, t, y)))


def test_hand_written_adjoint_equals_autodiff_of_the_kalman_filter():
    """The sequential log-likelihood has a hand-written reverse pass: its gradient with respect to the
    hyperparameters, the times and the observations equals reverse-mode autodiff of the general
    Kalman filter on the same system, with two outputs and missing entries."""
    k = (ps.gp.Matern52(1.0, 0.7), ps.gp.Matern12(2.0, 0.5))
    gp = ps.models.MarkovianGP(k, noise_variance=np.array([0.1, 0.3]), mixing=np.array([[1.0, 0.4], [-0.5, 1.0]]),
                               mean=np.array([0.2, -0.1]))
    y = np.stack([Y_MISSING, np.cos(TIMES)], axis=1)
    y[11, 1] = np.nan

    def reference(g, t, ys):
        return ps.kalman.filter_params(g.params_at(t), ys).log_likelihood

    def ours(g, t, ys):
        return ps.gp.log_marginal_likelihood(g, t, ys)

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(gp, jnp.asarray(TIMES), jnp.asarray(y))
    ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(gp, jnp.asarray(TIMES), jnp.asarray(y))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(ref[1])):
        np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-8, atol=1e-10)
