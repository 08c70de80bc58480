"""Discriminative Kalman filter: exactness against the Kalman filter on a linear-Gaussian
model, the non-PD correction, the robust variant, a learner, and input checks."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps


def rand_psd(rng, n, jitter=0.5):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)


@pytest.fixture(scope="module")
def linear_case():
    rng = np.random.default_rng(1)
    d, p, T = 3, 4, 50
    A = 0.7 * np.linalg.qr(rng.normal(size=(d, d)))[0]
    G, H, R = rand_psd(rng, d), rng.normal(size=(p, d)), rand_psd(rng, p)
    dkf_model = ps.dkf.exact_linear_gaussian(A, G, H, R)
    S = np.asarray(dkf_model.stationary_cov)
    lin = ps.models.LinearGaussianSSM(np.zeros(d), S, A, G, H, R)
    _, y = ps.sample(jax.random.key(3), lin, T)
    return lin, dkf_model, y


def test_exact_linear_gaussian_equals_kalman(linear_case):
    lin, model, y = linear_case
    ref = ps.kalman.filter(lin, y)
    out = ps.dkf.filter(model, y)
    np.testing.assert_allclose(out.filtered_means, ref.filtered_means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.filtered_covs, ref.filtered_covs, rtol=0, atol=1e-8)
    assert not bool(jnp.any(out.corrected))
    # S is the stationary solution: S = A S A^T + G
    A, G, S = model.transition_matrix, model.transition_cov, model.stationary_cov
    np.testing.assert_allclose(A @ S @ A.T + G, S, atol=1e-10)


def test_missing_rows_are_predictions(linear_case):
    lin, model, y = linear_case
    y = y.at[5].set(jnp.nan).at[17].set(jnp.nan)
    ref = ps.kalman.filter(lin, y)
    out = ps.dkf.filter(model, y)
    np.testing.assert_allclose(out.filtered_means, ref.filtered_means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.filtered_covs, ref.filtered_covs, rtol=0, atol=1e-8)


def _scalar_model(q):
    # S = 1 (A = 0.6, G = 0.64); Q(x) = q: Q^-1 - S^-1 = 1/q - 1 <= 0 when q >= 1
    return ps.dkf.DKFModel(jnp.array([[0.6]]), jnp.array([[0.64]]), jnp.array([[1.0]]),
                           lambda x: x, lambda x: jnp.full((1, 1), q))


def test_non_pd_correction_matches_closed_form():
    q, xs = 2.0, jnp.array([[0.5], [-1.0], [2.0]])
    out = ps.dkf.filter(_scalar_model(q), xs)
    assert bool(jnp.all(out.corrected))
    # corrected: J = 1/q, h = (1/q + 1) x  (f(x) = x, Q <- (1/q + 1)^-1, f unchanged)
    mu, P, ms, Ps = 0.0, 1.0, [], []
    for t, x in enumerate(np.asarray(xs)[:, 0]):
        nu, M = (mu, P) if t == 0 else (0.6 * mu, 0.36 * P + 0.64)
        P = 1 / (1 / M + 1 / q)
        mu = P * (nu / M + (1 / q + 1) * x)
        ms.append(mu), Ps.append(P)
    np.testing.assert_allclose(out.filtered_means[:, 0], ms, atol=1e-12)
    np.testing.assert_allclose(out.filtered_covs[:, 0, 0], Ps, atol=1e-12)
    # valid steps are not corrected
    assert not bool(jnp.any(ps.dkf.filter(_scalar_model(0.5), xs).corrected))
    # "never": update uses J = 1/q - 1 < 0 (different answer, no flag)
    never = ps.dkf.filter(_scalar_model(q), xs, correction="never")
    assert not bool(jnp.any(never.corrected))


def test_robust_variant_closed_form():
    q, xs = 2.0, jnp.array([[0.5], [-1.0], [2.0], [jnp.nan]])
    out = ps.dkf.filter(_scalar_model(q), xs, robust=True)
    assert np.all(np.isfinite(out.filtered_means)) and not bool(jnp.any(out.corrected))
    mu, P, ms = 0.0, 1.0, []
    for t, x in enumerate(np.asarray(xs)[:, 0]):
        nu, M = (mu, P) if t == 0 else (0.6 * mu, 0.36 * P + 0.64)
        if np.isnan(x):
            mu, P = nu, M
        else:
            P = 1 / (1 / M + 1 / q)
            mu = P * (nu / M + x / q)
        ms.append(mu)
    np.testing.assert_allclose(out.filtered_means[:, 0], ms, atol=1e-12)


def test_nadaraya_watson_recovers_function():
    key1, key2 = jax.random.split(jax.random.key(0))
    N = 400
    x = jax.random.uniform(key1, (N, 1), minval=-2, maxval=2)
    z = jnp.sin(2 * x) + 0.05 * jax.random.normal(key2, (N, 1))
    f = ps.dkf.fit_nadaraya_watson(x, z)
    xt = jnp.linspace(-1.5, 1.5, 31)[:, None]
    err = jax.vmap(f)(xt) - jnp.sin(2 * xt)
    # noise sd 0.05: a recovered function is within a few noise sd everywhere in the interior
    assert float(jnp.max(jnp.abs(err))) < 0.1
    # a crude constant fit would be off by ~1
    assert float(jnp.sqrt(jnp.mean(err ** 2))) < 0.05


def test_fit_and_filter_pipeline():
    rng = np.random.default_rng(0)
    T, d, n = 300, 2, 5
    A = np.diag([0.9, 0.8])
    z = np.zeros((T, d))
    for t in range(1, T):
        z[t] = A @ z[t - 1] + 0.3 * rng.normal(size=d)
    W = rng.normal(size=(n, d))
    x = np.tanh(z @ W.T) + 0.1 * rng.normal(size=(T, n))
    model = ps.dkf.fit(z, x, regressor="nw")
    np.testing.assert_allclose(model.transition_matrix, A, atol=0.15)
    out = ps.dkf.filter(model, x[200:])
    rmse = float(jnp.sqrt(jnp.mean((out.filtered_means - z[200:]) ** 2)))
    assert rmse < 0.5 * float(np.std(z))


def test_bad_input(linear_case):
    _, model, y = linear_case
    with pytest.raises(ValueError, match="observations"):
        ps.dkf.filter(model, y[0])
    with pytest.raises(ValueError, match="correction"):
        ps.dkf.filter(model, y, correction="sometimes")
    with pytest.raises(ValueError, match="model"):
        ps.dkf.filter("not a model", y)
    with pytest.raises(ValueError, match="mean_fn"):
        ps.dkf.filter(ps.dkf.DKFModel(np.eye(3) * 0.5, np.eye(3), np.eye(3) * 4 / 3,
                                      lambda x: x[:2], lambda x: jnp.eye(3)), y)
    with pytest.raises(ValueError, match="stationary_cov"):
        ps.dkf.DKFModel(np.eye(2) * 0.5, np.eye(2), -np.eye(2), lambda x: x, lambda x: jnp.eye(2))
    with pytest.raises(ValueError, match="observations"):
        ps.dkf.fit_nadaraya_watson(np.zeros((5, 1)), np.zeros((6, 1)))
    with pytest.raises(ValueError, match="holdout"):
        ps.dkf.fit(np.zeros((10, 1)), np.zeros((10, 1)), holdout=1.5)


def test_float32_long_sequence(linear_case):
    lin, model, y = linear_case
    y_long = jnp.tile(y, (20, 1))  # T = 1000
    ref = ps.kalman.filter(lin, y_long)
    m32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else a, model)
    out = ps.dkf.filter(m32, y_long.astype(jnp.float32))
    assert out.filtered_means.dtype == jnp.float32
    # measured: ~2e-6 over T = 1000 (float32 rounding, no drift)
    np.testing.assert_allclose(out.filtered_means, ref.filtered_means, rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------------
# Learners recover known functions (tolerances from the estimators' standard errors)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regression_data():
    key1, key2 = jax.random.split(jax.random.key(10))
    N = 300
    x = jax.random.uniform(key1, (N, 1), minval=-2, maxval=2)
    z = jnp.sin(2 * x) + 0.05 * jax.random.normal(key2, (N, 1))
    return x, z


def _grid_error(f):
    xt = jnp.linspace(-1.5, 1.5, 31)[:, None]
    return jax.vmap(f)(xt) - jnp.sin(2 * xt)


def test_mlp_recovers_function(regression_data):
    x, z = regression_data
    f = ps.dkf.fit_mlp(jax.random.key(0), x, z, width=32, depth=2, num_steps=1500, learning_rate=1e-2)
    err = _grid_error(f)
    # noise sd 0.05 on 300 points; a constant or linear fit is off by ~0.7
    assert float(jnp.sqrt(jnp.mean(err ** 2))) < 0.05
    assert float(jnp.max(jnp.abs(err))) < 0.12


def test_gp_recovers_function(regression_data):
    x, z = regression_data
    f = ps.dkf.fit_gp(x, z, num_steps=40)
    err = _grid_error(f)
    # GP posterior mean error ~ noise sd / sqrt(points per length-scale) << 0.05
    assert float(jnp.sqrt(jnp.mean(err ** 2))) < 0.03
    assert float(jnp.max(jnp.abs(err))) < 0.08


def test_fit_dynamics_recovers_ar1():
    rng = np.random.default_rng(4)
    N, a, g = 20000, np.array([[0.9, 0.0], [0.2, 0.5]]), np.diag([0.3, 0.1])
    z = np.zeros((N, 2))
    noise = rng.multivariate_normal(np.zeros(2), g, size=N)  # one call, not N (same law)
    for t in range(1, N):
        z[t] = a @ z[t - 1] + noise[t]
    z += np.array([1.0, -2.0])
    A, G, mean, S = ps.dkf.fit_dynamics(z)
    # least-squares AR coefficients: standard error ~ sqrt(g_ii / (N var(z_j))) <= 0.01 here; 5 se
    np.testing.assert_allclose(A, a, atol=0.03)
    # residual covariance: relative se sqrt(2 / N) = 1%; 5 se
    np.testing.assert_allclose(np.diag(G), np.diag(g), rtol=0.05)
    S_true = np.linalg.solve(np.eye(4) - np.kron(a, a), g.reshape(-1)).reshape(2, 2)
    # stationary covariance from a correlated chain (a = 0.9: ~20x fewer effective samples)
    np.testing.assert_allclose(S, S_true, rtol=0.15, atol=0.02)
    np.testing.assert_allclose(mean, [1.0, -2.0], atol=0.1)
    # trials given as a list give the same estimate as one long sequence split in two
    A2, G2, _, _ = ps.dkf.fit_dynamics([z[:10000], z[10000:]])
    np.testing.assert_allclose(A2, A, atol=1e-3)


def test_covariance_learners():
    key1, key2 = jax.random.split(jax.random.key(11))
    N = 2000
    x = jax.random.uniform(key1, (N, 1), minval=-2, maxval=2)
    sd = jnp.where(x > 0, 0.5, 0.1)  # heteroscedastic residuals around f(x) = x
    z = x + sd * jax.random.normal(key2, (N, 1))
    const = ps.dkf.fit_covariance(lambda v: v, x, z, kind="constant")
    r = np.asarray(z - x)
    np.testing.assert_allclose(const(jnp.zeros(1)), r.T @ r / N, rtol=1e-12)
    kern = ps.dkf.fit_covariance(lambda v: v, x, z, kind="kernel")
    for x0, var in ((1.0, 0.25), (-1.0, 0.01)):
        # a kernel-weighted mean of r^2 (chi-square, relative sd sqrt(2)) has relative standard
        # error sqrt(2 / n_eff), n_eff = 1 / sum w_i^2 of the fitted kernel weights at x0
        u = (x0 - kern.x_mean) / kern.x_scale
        w = jax.nn.softmax(-0.5 * jnp.sum((kern.x_train - u) ** 2, -1) / kern.bandwidth ** 2)
        se = float(jnp.sqrt(2 * jnp.sum(w ** 2)))
        assert se < 0.35  # enough points under the kernel for the check to mean something
        np.testing.assert_allclose(float(kern(jnp.array([x0]))[0, 0]), var, rtol=4 * se)
    # the constant one cannot tell the two halves apart
    assert abs(float(const(jnp.array([-1.0]))[0, 0]) - 0.01) > 0.1


@pytest.mark.slow
def test_fit_with_mlp_filters():
    rng = np.random.default_rng(2)
    T = 240
    z = np.zeros((T, 1))
    for t in range(1, T):
        z[t] = 0.9 * z[t - 1] + 0.4 * rng.normal()
    x = np.concatenate([np.sin(z), np.cos(z)], 1) + 0.05 * rng.normal(size=(T, 2))
    for regressor, kw in (("mlp", dict(num_steps=300, width=16)),):
        model = ps.dkf.fit(z[:180], x[:180], regressor=regressor, key=jax.random.key(0), regressor_kwargs=kw)
        out = ps.dkf.filter(model, x[180:])
        rmse = float(jnp.sqrt(jnp.mean((out.filtered_means - z[180:]) ** 2)))
        assert rmse < 0.3 * float(np.std(z)), regressor
    with pytest.raises(ValueError, match="key"):
        ps.dkf.fit(z, x, regressor="mlp")
    with pytest.raises(ValueError, match="regressor"):
        ps.dkf.fit(z, x, regressor="svm")


def test_batch_matches_single(linear_case):
    _, model, y = linear_case
    ys = jnp.stack([y, y[::-1]])
    out = ps.dkf.filter(model, ys)
    for i in range(2):
        np.testing.assert_allclose(out.filtered_means[i], ps.dkf.filter(model, ys[i]).filtered_means, atol=1e-12)


def test_does_not_mutate_input(linear_case):
    _, model, y = linear_case
    y_np = np.array(y)
    y_np[3] = np.nan
    before = y_np.copy()
    ps.dkf.filter(model, y_np)
    np.testing.assert_array_equal(y_np, before)


def test_more_bad_input(linear_case):
    _, model, y = linear_case
    with pytest.raises(ValueError, match="cov_fn"):
        ps.dkf.filter(ps.dkf.DKFModel(np.eye(3) * 0.5, np.eye(3), np.eye(3) * 4 / 3,
                                      lambda x: x[:3], lambda x: jnp.eye(2)), y)
    with pytest.raises(ValueError, match="transition_cov"):
        ps.dkf.DKFModel(np.eye(2) * 0.5, -np.eye(2), np.eye(2), lambda x: x, lambda x: jnp.eye(2))
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.dkf.DKFModel(np.ones((2, 3)), np.eye(2), np.eye(2), lambda x: x, lambda x: jnp.eye(2))
    with pytest.raises(ValueError, match="kind"):
        ps.dkf.fit_covariance(lambda v: v, np.zeros((5, 1)), np.zeros((5, 1)), kind="diag")
    with pytest.raises(ValueError, match="bandwidths"):
        ps.dkf.fit_nadaraya_watson(np.random.rand(10, 1), np.random.rand(10, 1), bandwidths=[-1.0])
    with pytest.raises(ValueError, match="learning_rate"):
        ps.dkf.fit_mlp(jax.random.key(0), np.random.rand(10, 1), np.random.rand(10, 1), learning_rate=0.0)
    with pytest.raises(ValueError, match="observations"):
        ps.dkf.fit_mlp(jax.random.key(0), np.full((10, 1), np.nan), np.random.rand(10, 1))


# ---------------------------------------------------------------------------------------------
# The DKF model implements the protocol; the engine reads only declared members (issue 14)
# ---------------------------------------------------------------------------------------------
import equinox as eqx  # noqa: E402
from jax.scipy.stats import multivariate_normal as mvn  # noqa: E402


def test_model_is_an_ssm_with_honest_emission(linear_case):
    # regression: DKFModel was a plain eqx.Module, not a ps.SSM
    lin, model, y = linear_case
    assert isinstance(model, ps.SSM) and model.input_dim == 0 and model.emission_dim == y.shape[1]
    A, G, S = model.transition_matrix, model.transition_cov, model.stationary_cov
    z = jnp.array([0.3, -1.0, 0.5])
    np.testing.assert_allclose(model.initial().covariance_matrix, S)
    np.testing.assert_allclose(model.transition(z, 1).mean, A @ z, atol=1e-14)
    np.testing.assert_allclose(model.transition(z, 1).covariance_matrix, G)
    # exact linear-Gaussian DKF: the emission is the likelihood ratio p(x | z) / p(x)
    H, R = lin.emission_matrix, lin.emission_cov
    for x in (y[0], y[7]):
        want = mvn.logpdf(x, H @ z, R) - mvn.logpdf(x, jnp.zeros_like(x), H @ S @ H.T + R)
        np.testing.assert_allclose(model.emission(z, 0).log_prob(x), want, rtol=1e-10)
    zs = jnp.stack([z, -z])  # batched states
    np.testing.assert_allclose(model.emission(zs, 0).log_prob(y[0]),
                               [model.emission(zs[i], 0).log_prob(y[0]) for i in range(2)], rtol=1e-12)
    assert float(model.emission(z, 0).log_prob(y[0].at[1].set(jnp.nan))) == 0.0  # missing row: ratio one
    with pytest.raises(NotImplementedError, match="p\\(z \\| x\\)"):
        model.emission(z, 0).sample(jax.random.key(0))
    # the names moved; the old ones are the same objects
    assert ps.dkf.DKFModel is ps.models.DKFModel and ps.dkf.NadarayaWatson is ps.models.dkf.NadarayaWatson
    assert ps.dkf.fit_nadaraya_watson is ps.learn.dkf.fit_nadaraya_watson


def test_particle_filter_on_dkf_model_matches_dkf(linear_case):
    # a particle filter on the protocol targets the exact DKF posterior: on the exact
    # linear-Gaussian DKF that is the Kalman filter (= ps.dkf.filter), up to Monte Carlo error
    _, model, y = linear_case
    y = y[:12]
    ref = ps.dkf.filter(model, y)
    pf = ps.smc.particle_filter(jax.random.key(0), model, y, 4000)
    sd = jnp.sqrt(jnp.diagonal(ref.filtered_covs, axis1=1, axis2=2))
    # max over the 36 entries of |error| / posterior sd: measured over 30 keys, median 0.18, max 0.34
    assert float(jnp.max(jnp.abs(pf.filtered_means - ref.filtered_means) / sd)) < 0.5
    # and the data move the posterior well away from the prior mean (the check can fail)
    assert float(jnp.max(jnp.abs(ref.filtered_means) / sd)) > 1.5


class ScaledIdentity(ps.models.dkf.AbstractDiscriminativeSSM):
    """A user-written discriminative model: f(x) = w * x, Q(x) = q I."""

    transition_matrix: jax.Array
    transition_cov: jax.Array
    stationary_mean: jax.Array
    stationary_cov: jax.Array
    w: jax.Array
    q: jax.Array

    def discriminative_mean(self, x):
        return self.w * x

    def discriminative_cov(self, x):
        return self.q * jnp.eye(x.shape[0], dtype=x.dtype)


def test_user_subclass_and_tree_at_checks():
    A, G = 0.6 * jnp.eye(2), 0.64 * jnp.eye(2)
    user = ScaledIdentity(A, G, jnp.zeros(2), jnp.eye(2), jnp.asarray(0.8), jnp.asarray(0.5))
    xs = jax.random.normal(jax.random.key(1), (6, 2))
    same = ps.dkf.DKFModel(A, G, jnp.eye(2), lambda x: 0.8 * x, lambda x: 0.5 * jnp.eye(2))
    np.testing.assert_allclose(ps.dkf.filter(user, xs).filtered_means, ps.dkf.filter(same, xs).filtered_means,
                               atol=1e-14)
    # checks run at the filter, so they catch models made by eqx.tree_at
    with pytest.raises(ValueError, match="stationary_mean"):
        ps.dkf.filter(eqx.tree_at(lambda m: m.stationary_mean, same, jnp.array([0.0, jnp.nan])), xs)
    with pytest.raises(ValueError, match="stationary_cov"):
        ps.dkf.filter(eqx.tree_at(lambda m: m.stationary_cov, user, -jnp.eye(2)), xs)
    with pytest.raises(ValueError, match="transition_cov"):
        ps.dkf.filter(eqx.tree_at(lambda m: m.transition_cov, same, jnp.ones((3, 3))), xs)
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.dkf.filter(eqx.tree_at(lambda m: m.transition_matrix, same, jnp.full((2, 2), jnp.inf)), xs)
    with pytest.raises(ValueError, match="emission_dim"):
        ps.dkf.filter(ps.dkf.DKFModel(A, G, jnp.eye(2), lambda x: x, lambda x: jnp.eye(2), emission_dim=3), xs)


def test_batches_lists_lengths_and_learner(linear_case):
    _, model, y = linear_case
    ragged = ps.dkf.filter(model, [y, y[:20]])
    np.testing.assert_allclose(ragged.filtered_means[0], ps.dkf.filter(model, y).filtered_means, atol=1e-12)
    # a causal filter: the short sequence's means are the first 20 of the full one's
    np.testing.assert_allclose(ragged.filtered_means[1, :20], ragged.filtered_means[0, :20], atol=1e-12)
    padded = ps.dkf.filter(model, jnp.stack([y, y]), lengths=jnp.array([50, 20]))
    np.testing.assert_allclose(padded.filtered_means[1], ragged.filtered_means[1], atol=1e-12)
    np.testing.assert_allclose(ps.dkf.filter(model, observations=y).filtered_means,
                               ps.dkf.filter(model, y).filtered_means)  # old keyword name
    # the learner follows the conventions: key first, (model, history)
    rng = np.random.default_rng(0)
    z = np.cumsum(rng.normal(size=(60, 1)), 0) * 0.2
    x = np.concatenate([z, z ** 2], 1) + 0.1 * rng.normal(size=(60, 2))
    fitted, history = ps.learn.fit_dkf(jax.random.key(0), z, x, regressor="nw")
    assert isinstance(fitted, ps.models.DKFModel) and fitted.emission_dim == 2
    assert history["num_fit"] + history["num_holdout"] == 60 and float(history["holdout_rmse"]) > 0
    old = ps.dkf.fit(z, observations=x, regressor="nw")
    np.testing.assert_allclose(old.transition_matrix, fitted.transition_matrix)
    with pytest.raises(ValueError, match="key"):
        ps.learn.fit_dkf(None, z, x)
