"""Poisson emissions for (recurrent) SLDS: `ps.switching.laplace` and Laplace-EM through
`ps.learn.em` (Zoltowski, Pillow & Linderman, ICML 2020's spike-count model).

Oracles (independent of the engine's block-tridiagonal code):
* one mode: the Laplace mode and covariances equal a dense trust-region Newton solve of the
  (T d)-dimensional log-posterior (scipy) and the inverse of its dense Hessian; the ELBO equals the
  closed-form E_q[log p(x, y)] + H[q] computed densely; the ELBO lies below log p(y) estimated by
  importance sampling from q(x) (within three standard errors);
* two modes: Laplace-EM from a perturbed start raises its ELBO and segments the modes (Hungarian
  matched) as well as the true parameters do, within 2 points.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, minimize
from scipy.special import gammaln, logsumexp

import probssm as ps

D, P = 2, 5


def rotation(a):
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


@pytest.fixture(scope="module")
def one_mode():
    T = 30
    rng = np.random.default_rng(0)
    F, Q = 0.95 * rotation(0.1), 0.05 * np.eye(D)
    C, dd = 0.5 * rng.normal(size=(P, D)), np.log(2.0) * np.ones(P)
    model = ps.models.SLDS(jnp.ones(1), jnp.ones((1, 1)), jnp.zeros((1, D)), jnp.eye(D)[None], F[None], Q[None], C,
                           None, emission_offsets=dd, emission_family="poisson")
    y = np.asarray(ps.sample(jax.random.key(1), model, T)[1], float)
    y[7, 2] = np.nan  # a missing count: dropped from the likelihood exactly
    return model, y, F, Q, C, dd


def dense_log_joint(x_flat, y, F, Q, C, dd):
    """log p(x, y) of the one-mode Poisson LDS (x_0 ~ N(0, I)), up to nothing: all constants kept."""
    T = y.shape[0]
    x = x_flat.reshape(T, D)
    Qi = jnp.linalg.inv(Q)
    r = x[1:] - x[:-1] @ F.T
    lp = -0.5 * x[0] @ x[0] - 0.5 * jnp.einsum("ti,ij,tj->", r, Qi, r)
    lp = lp - 0.5 * T * D * np.log(2 * np.pi) - 0.5 * (T - 1) * jnp.linalg.slogdet(Q)[1]
    obs = ~np.isnan(y)
    eta = x @ C.T + dd
    return lp + jnp.sum(jnp.where(obs, np.nan_to_num(y) * eta - jnp.exp(eta) - gammaln(np.nan_to_num(y) + 1), 0.0))


def test_one_mode_laplace_equals_a_dense_newton_solve_and_bounds_the_likelihood(one_mode):
    model, y, F, Q, C, dd = one_mode
    T = y.shape[0]
    r = ps.switching.laplace(model, y, 3, num_newton_steps=10)
    f = jax.jit(lambda z: -dense_log_joint(z, y, F, Q, C, dd))
    g, h = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    res = minimize(lambda z: float(f(z)), np.zeros(T * D), jac=lambda z: np.asarray(g(z)),
                   hess=lambda z: np.asarray(h(z)), method="trust-exact", options=dict(gtol=1e-12))
    mode = res.x.reshape(T, D)
    cov = np.linalg.inv(np.asarray(h(res.x)))
    blocks = np.stack([cov[t * D:(t + 1) * D, t * D:(t + 1) * D] for t in range(T)])
    cross = np.stack([cov[(t + 1) * D:(t + 2) * D, t * D:(t + 1) * D] for t in range(T - 1)])
    np.testing.assert_allclose(r.means, mode, atol=1e-7)  # measured 1e-8 (scipy's own tolerance)
    np.testing.assert_allclose(r.covs, blocks, atol=1e-9)
    np.testing.assert_allclose(r.cross_covs, cross, atol=1e-9)

    # the ELBO in closed form: E_q[log p(x)] (quadratic) + E_q[log p(y | x)] (log-normal moments) + H[q]
    mu = mode.ravel()
    no_counts = np.full_like(y, np.nan)  # every count missing: dense_log_joint is log p(x)
    prior_precision = np.asarray(jax.hessian(lambda z: -dense_log_joint(z, no_counts, F, Q, C, dd))(mu))
    e_log_prior = float(dense_log_joint(mu, no_counts, F, Q, C, dd)) - 0.5 * np.trace(prior_precision @ cov)
    eta = mode @ C.T + dd
    var = np.einsum("pi,tij,pj->tp", C, blocks, C)
    obs = ~np.isnan(y)
    yy = np.nan_to_num(y)
    e_log_lik = np.sum(np.where(obs, yy * eta - np.exp(eta + 0.5 * var) - gammaln(yy + 1), 0.0))
    entropy = 0.5 * np.linalg.slogdet(cov)[1] + 0.5 * T * D * (1 + np.log(2 * np.pi))
    np.testing.assert_allclose(r.elbo[-1], e_log_prior + e_log_lik + entropy, rtol=1e-10)

    # ELBO <= log p(y): importance sampling with q(x) as the proposal
    M = 20000
    xs = np.random.default_rng(3).multivariate_normal(mu, cov, size=M)
    log_q = jax.vmap(lambda z: jax.scipy.stats.multivariate_normal.logpdf(z, mu, cov))(xs)
    log_w = np.asarray(jax.vmap(lambda z: dense_log_joint(z, y, F, Q, C, dd))(xs) - log_q)
    log_py = logsumexp(log_w) - np.log(M)
    se = np.std(np.exp(log_w - log_w.max())) / np.mean(np.exp(log_w - log_w.max())) / np.sqrt(M)
    assert float(r.elbo[-1]) <= log_py + 3 * se
    assert float(r.elbo[-1]) > log_py - 1.0  # a near-Gaussian posterior: the bound is tight


@pytest.fixture(scope="module")
def two_modes():
    K, T, B = 2, 300, 2
    rng = np.random.default_rng(0)
    C, dd = 0.6 * rng.normal(size=(10, D)), np.log(3.0) * np.ones(10)
    true = ps.models.SLDS(jnp.ones(K) / K, jnp.array([[0.98, 0.02], [0.03, 0.97]]), jnp.zeros((K, D)),
                          jnp.tile(jnp.eye(D), (K, 1, 1)), np.stack([0.98 * rotation(0.15), 0.98 * rotation(-0.3)]),
                          0.02 * jnp.tile(jnp.eye(D), (K, 1, 1)), C, None, emission_offsets=dd,
                          emission_family="poisson")
    s, y = jax.vmap(lambda k: ps.sample(k, true, T))(jax.random.split(jax.random.key(2), B))
    start = ps.models.SLDS(jnp.ones(K) / K, jnp.array([[0.9, 0.1], [0.1, 0.9]]), jnp.zeros((K, D)),
                           jnp.tile(jnp.eye(D), (K, 1, 1)), 0.95 * np.stack([rotation(0.05), rotation(-0.05)]),
                           0.05 * jnp.tile(jnp.eye(D), (K, 1, 1)), C + 0.3 * rng.normal(size=C.shape), None,
                           emission_offsets=dd, emission_family="poisson")
    return true, start, np.asarray(s[..., 0]).astype(int), np.asarray(y, float)


def matched_accuracy(z, zhat, K=2):
    cm = np.zeros((K, K))
    np.add.at(cm, (z.ravel(), zhat.ravel()), 1)
    rows, cols = linear_sum_assignment(-cm)
    return cm[rows, cols].sum() / cm.sum()


def test_laplace_em_learns_a_poisson_slds(two_modes):
    true, start, z, y = two_modes
    fitted, elbos = ps.learn.em(start, y, 40, progress=False)
    elbos = np.asarray(elbos)
    # Laplace-EM need not raise the ELBO at every step (the Laplace q(x) is not the ELBO's maximiser);
    # measured: it rises at every step here
    assert elbos[-1] > elbos[0] + 100 and np.all(np.diff(elbos) > -1e-3 * np.abs(elbos[1:]))
    at_truth = matched_accuracy(z, np.asarray(ps.switching.laplace(true, y, 10).mode_probs).argmax(-1))
    learned = matched_accuracy(z, np.asarray(ps.switching.laplace(fitted, y, 10).mode_probs).argmax(-1))
    assert learned >= at_truth - 0.02  # measured 0.961 vs 0.966 (T = 400)
    assert fitted.emission_family == "poisson"


def test_recurrent_poisson_laplace_em_runs_and_improves(two_modes):
    _, start, _, y = two_modes
    rs = ps.models.RecurrentSLDS(start.initial_probs, jnp.zeros((2, D)), start.initial_means, start.initial_covs,
                                 start.dynamics_matrices, start.dynamics_covs, start.emission_matrices, None,
                                 emission_offsets=start.emission_offsets, emission_family="poisson")
    fitted, elbos = ps.learn.em(rs, y[:, :60], 5, progress=False)
    assert np.all(np.isfinite(elbos)) and elbos[-1] > elbos[0]
    assert fitted.emission_family == "poisson"


def test_poisson_models_sample_counts_and_run_under_jit_and_vmap(one_mode):
    model, y, *_ = one_mode
    _, counts = ps.sample(jax.random.key(5), model, 20)
    assert jnp.issubdtype(counts.dtype, jnp.integer) and counts.min() >= 0
    ys = jnp.stack([jnp.asarray(y), jnp.asarray(y)[::-1]])
    run = jax.jit(jax.vmap(lambda yy: ps.switching.laplace(model, yy, 3, num_newton_steps=10).elbo[-1]))
    out = run(ys)
    # the same static arguments and shapes as the first test: its compiled program is reused
    np.testing.assert_allclose(out[0], ps.switching.laplace(model, ys[0], 3, num_newton_steps=10).elbo[-1],
                               rtol=1e-9)  # batched linear algebra rounds differently (measured 1e-11)


def test_poisson_bad_input_raises_value_errors_naming_the_argument(one_mode):
    model, y, *_ = one_mode
    with pytest.raises(ValueError, match="model: this engine needs Gaussian emissions"):
        ps.switching.imm(model, y)
    with pytest.raises(ValueError, match="model: this engine needs Gaussian emissions"):
        ps.switching.structured_vi(model, y, 2)
    with pytest.raises(ValueError, match="emissions: Poisson emissions are counts"):
        ps.switching.laplace(model, -np.abs(np.nan_to_num(y)) - 1.0, 2)
    with pytest.raises(ValueError, match="emissions: Poisson emissions are counts"):
        ps.switching.laplace(model, np.nan_to_num(y) + 0.5, 2)
    with pytest.raises(ValueError, match="emission_family"):
        ps.models.SLDS(jnp.ones(1), jnp.ones((1, 1)), jnp.zeros((1, D)), jnp.eye(D)[None], jnp.eye(D)[None],
                       jnp.eye(D)[None], jnp.ones((P, D)), None, emission_family="poison")
    bad = eqx.tree_at(lambda m: m.emission_matrices, model, jnp.full((P, D), jnp.nan))
    with pytest.raises(ValueError, match="emission_matrices"):
        ps.switching.laplace(bad, y, 2)
