"""Gaussian filters (EKF, IEKF, UKF, cubature) against the exact Kalman engine on linear
models, plus properties on nonlinear ones and input checks."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import equinox as eqx

import probssm as ps

TOL = 1e-10


def rand_psd(rng, n, jitter=0.5):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)


def linear_pair(seed=0, d=4, p=3, dtype=jnp.float64):
    """The same linear-Gaussian system as a LinearGaussianSSM and as a NonlinearGaussianSSM
    (the latter's arrays and closed-over constants in ``dtype``)."""
    rng = np.random.default_rng(seed)
    F = 0.6 * np.linalg.qr(rng.normal(size=(d, d)))[0]
    b, H, dd = rng.normal(size=d), rng.normal(size=(p, d)), rng.normal(size=p)
    Q, R, m1, P1 = rand_psd(rng, d), rand_psd(rng, p), rng.normal(size=d), rand_psd(rng, d)
    lin = ps.models.LinearGaussianSSM(m1, P1, F, Q, H, R, b, dd)
    Fj, bj, Hj, dj, m1j, P1j, Qj, Rj = (jnp.asarray(a, dtype) for a in (F, b, H, dd, m1, P1, Q, R))
    nl = ps.models.NonlinearGaussianSSM(m1j, P1j, lambda z, t, u: Fj @ z + bj, Qj, lambda z, t, u: Hj @ z + dj, Rj)
    return lin, nl, (Fj, Hj)


def toy_model():
    f = lambda z, t, u: 0.5 * z + 25 * z / (1 + z ** 2) + 8 * jnp.cos(1.2 * t)
    h = lambda z, t, u: z ** 2 / 20
    return ps.models.NonlinearGaussianSSM(jnp.zeros(1), 5 * jnp.eye(1), f, 10 * jnp.eye(1), h, jnp.eye(1))


@pytest.fixture(scope="module")
def linear_case():
    lin, nl, mats = linear_pair()
    _, y = ps.sample(jax.random.key(0), lin, 60)
    y = y.at[3, 1].set(jnp.nan).at[7].set(jnp.nan)  # partial and whole missing rows
    return lin, nl, mats, y


@pytest.mark.parametrize("method", ps.gaussian.METHODS)
def test_equals_kalman_on_linear_model(linear_case, method):
    lin, nl, _, y = linear_case
    k = ps.kalman.smoother(lin, y)
    s = ps.gaussian.smoother(nl, y, method=method)  # its filter fields are `filter`'s output
    for name, a, b in zip(k._fields, s, k):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


def test_batch_matches_single(linear_case):
    _, nl, _, y = linear_case
    ys = jnp.stack([y, y[::-1]])
    batch = ps.gaussian.filter(nl, ys, method="ukf")
    for i in range(2):
        one = ps.gaussian.filter(nl, ys[i], method="ukf")
        np.testing.assert_allclose(batch.filtered_means[i], one.filtered_means, atol=1e-12)
        np.testing.assert_allclose(batch.log_likelihood[i], one.log_likelihood, atol=1e-10)


def test_user_jacobians_match_autodiff(linear_case):
    _, nl, (F, H), y = linear_case
    a = ps.gaussian.smoother(nl, y, method="ekf")
    b = ps.gaussian.smoother(nl, y, method="ekf", transition_jacobian=lambda z, t, u: F,
                             emission_jacobian=lambda z, t, u: H)
    np.testing.assert_allclose(a.smoothed_means, b.smoothed_means, atol=1e-12)


def test_nonlinear_properties():
    model = toy_model()
    _, y = ps.sample(jax.random.key(1), model, 50)
    ekf = ps.gaussian.filter(model, y, method="ekf")
    iekf1 = ps.gaussian.filter(model, y, method="iekf", num_iter=1)
    np.testing.assert_allclose(ekf.filtered_means, iekf1.filtered_means, atol=1e-12)
    cub = ps.gaussian.filter(model, y, method="cubature")
    ukf0 = ps.gaussian.filter(model, y, method="ukf", alpha=1.0, beta=0.0, kappa=0.0)
    np.testing.assert_allclose(cub.filtered_means, ukf0.filtered_means, atol=1e-12)
    for method in ("iekf", "ukf"):
        s = ps.gaussian.smoother(model, y, method=method)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in s)
        assert bool(jnp.all(s.smoothed_covs[:, 0, 0] > 0))
        # the smoothed variance never exceeds the filtered one
        assert bool(jnp.all(s.smoothed_covs[:, 0, 0] <= s.filtered_covs[:, 0, 0] * (1 + 1e-9)))


def test_sigma_points_moments():
    rng = np.random.default_rng(3)
    m, P = jnp.asarray(rng.normal(size=3)), jnp.asarray(rand_psd(rng, 3))
    for method in ("ukf", "cubature"):
        X, wm, wc = ps.gaussian.sigma_points(m, P, method)
        np.testing.assert_allclose(wm @ X, m, atol=1e-12)
        np.testing.assert_allclose((wc[:, None] * (X - m)).T @ (X - m), P, atol=1e-12)


def test_bad_input_raises(linear_case):
    _, nl, (F, H), y = linear_case
    with pytest.raises(ValueError, match="transition_cov"):
        ps.models.NonlinearGaussianSSM(nl.initial_mean, nl.initial_cov, nl.transition_fn,
                                       -jnp.eye(4), nl.emission_fn, nl.emission_cov)
    bad = eqx.tree_at(lambda m: m.emission_cov, nl, -jnp.eye(3))
    with pytest.raises(ValueError, match="emission_cov"):
        ps.gaussian.filter(bad, y)
    with pytest.raises(ValueError, match="emission_jacobian"):
        ps.gaussian.filter(nl, y, emission_jacobian=lambda z, t, u: F)  # (4, 4), expected (3, 4)
    with pytest.raises(ValueError, match="transition_jacobian"):
        ps.gaussian.filter(nl, y, transition_jacobian=lambda z, t, u: H)
    with pytest.raises(ValueError, match="method"):
        ps.gaussian.filter(nl, y, method="pf")
    with pytest.raises(ValueError, match="num_iter"):
        ps.gaussian.filter(nl, y, method="iekf", num_iter=0)
    with pytest.raises(ValueError, match="emissions"):
        ps.gaussian.filter(nl, y[:, :2])
    with pytest.raises(ValueError, match="model"):
        ps.gaussian.filter("not a model", y)


@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_float32_long_sequence(method):
    lin, _, _ = linear_pair(seed=5)
    _, nl32, _ = linear_pair(seed=5, dtype=jnp.float32)
    _, y = ps.sample(jax.random.key(6), lin, 1000)
    ref = ps.kalman.filter(lin, y)
    out = ps.gaussian.filter(nl32, y.astype(jnp.float32), method=method)
    assert out.filtered_means.dtype == jnp.float32
    # measured: ~1e-6 in the means, ~6e-7 relative in the log-likelihood over T = 1000
    np.testing.assert_allclose(out.filtered_means, ref.filtered_means, rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.log_likelihood, ref.log_likelihood, rtol=1e-5)


def test_more_bad_input(linear_case):
    _, nl, (F, H), y = linear_case
    for field in ("initial_cov", "transition_cov"):
        bad = eqx.tree_at(lambda m: getattr(m, field), nl, jnp.diag(jnp.array([1.0, -1.0, 1.0, 1.0])))
        with pytest.raises(ValueError, match=field):
            ps.gaussian.smoother(bad, y)
    with pytest.raises(ValueError, match="transition_jacobian"):
        ps.gaussian.filter(nl, y, method="ukf", transition_jacobian=lambda z, t, u: F)
    with pytest.raises(ValueError, match="emission_jacobian"):
        ps.gaussian.filter(nl, y, emission_jacobian="H")
    with pytest.raises(ValueError, match="alpha"):
        ps.gaussian.filter(nl, y, method="ukf", alpha=0.0)
    with pytest.raises(ValueError, match="kappa"):
        ps.gaussian.filter(nl, y, method="ukf", kappa=-10.0)


def test_compiles_once_per_configuration(linear_case):
    _, nl, _, y = linear_case
    traces = []

    def h(z, t, u):
        traces.append(1)  # runs only while tracing
        return nl.emission_fn(z, t, u)

    model = eqx.tree_at(lambda m: m.emission_fn, nl, h)
    ps.gaussian.filter(model, y, method="ukf")
    n = len(traces)
    ps.gaussian.filter(model, y + 1.0, method="ukf")
    assert len(traces) == n


# ---------------------------------------------------------------------------------------------
# Additive-Gaussian structure: any ps.core.AbstractAdditiveGaussianSSM runs through ps.gaussian
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_linear_gaussian_ssm_itself_equals_kalman(linear_case, method):
    lin, _, _, y = linear_case
    assert isinstance(lin, ps.core.AbstractAdditiveGaussianSSM)
    k = ps.kalman.smoother(lin, y)
    s = ps.gaussian.smoother(lin, y, method=method)
    for name, a, b in zip(k._fields, s, k):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)
    bad = eqx.tree_at(lambda m: m.emission_cov, lin, -jnp.eye(3))
    with pytest.raises(ValueError, match="emission_cov"):
        ps.gaussian.filter(bad, y, method=method)


class UserAdditive(ps.core.AbstractAdditiveGaussianSSM):
    """A user's own additive-Gaussian model: z_t = a sin(z_{t-1}) + u_t + noise, y_t = z_t^2 / 20 + noise."""

    a: jax.Array
    q: jax.Array
    r: jax.Array

    @property
    def state_dim(self):
        return 1

    @property
    def emission_dim(self):
        return 1

    def initial_moments(self, inputs=None):
        return jnp.zeros(1), jnp.eye(1)

    def transition_mean(self, z_prev, t, inputs=None):
        return self.a * jnp.sin(z_prev) + inputs

    def transition_noise_cov(self, t, inputs=None):
        return self.q * jnp.eye(1)

    def emission_mean(self, z, t, inputs=None):
        return z ** 2 / 20

    def emission_noise_cov(self, t, inputs=None):
        return self.r * jnp.eye(1)


def test_user_additive_subclass_runs_and_matches_the_nonlinear_model():
    user = UserAdditive(jnp.asarray(0.9), jnp.asarray(0.5), jnp.asarray(1.0))
    nl = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), lambda z, t, u: 0.9 * jnp.sin(z) + (0.0 if u is None else u),
                                        0.5 * jnp.eye(1), lambda z, t, u: z ** 2 / 20, jnp.eye(1))
    u = jnp.asarray(np.random.default_rng(0).normal(size=(40, 1)))
    _, y = ps.sample(jax.random.key(3), user, 40, inputs=u)
    for method in ("ekf", "ukf"):
        a = ps.gaussian.smoother(user, y, method=method, inputs=u)
        b = ps.gaussian.smoother(nl, y, method=method, inputs=u)
        for name, x, z in zip(a._fields, a, b):
            np.testing.assert_allclose(x, z, atol=1e-12, err_msg=name)
    bad = eqx.tree_at(lambda m: m.q, user, jnp.asarray(-1.0))
    with pytest.raises(ValueError, match="transition_cov"):
        ps.gaussian.filter(bad, y, inputs=u)


def test_lengths_equal_truncated_sequence(linear_case):
    _, nl, _, y = linear_case
    ys = jnp.stack([y, jnp.concatenate([y[:25], jnp.zeros((35, 3))])])
    f = ps.gaussian.filter(nl, ys, method="ukf", lengths=np.array([60, 25]))
    one = ps.gaussian.filter(nl, y[:25], method="ukf")
    np.testing.assert_allclose(f.log_likelihood[1], one.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(f.filtered_means[1, :25], one.filtered_means, atol=1e-12)
