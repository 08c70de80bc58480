"""Exact diffuse initialisation of the Kalman filter and smoother (Durbin & Koopman ch. 5),
against statsmodels' exact diffuse filter (use_exact_diffuse=True / Initialization 'diffuse')."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

import probssm as ps  # noqa: E402

sm = pytest.importorskip("statsmodels.api")
from statsmodels.tsa.statespace.initialization import Initialization  # noqa: E402
from statsmodels.tsa.statespace.mlemodel import MLEModel  # noqa: E402

INF = np.inf
EPS, ETA = 15099.0, 1469.1


@pytest.fixture(scope="module")
def nile():
    return sm.datasets.nile.load_pandas().data["volume"].to_numpy(dtype=float)


def local_level(eps=EPS, eta=ETA, p1=INF):
    return ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.array([[p1]]), jnp.eye(1), eta * jnp.eye(1),
                                       jnp.eye(1), eps * jnp.eye(1))


def sm_local_level(y, eps=EPS, eta=ETA):
    return sm.tsa.UnobservedComponents(y, "local level", use_exact_diffuse=True).smooth([eps, eta])


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def test_nile_log_likelihood_equals_statsmodels_exact_diffuse(nile):
    ref = sm.tsa.UnobservedComponents(nile, "local level", use_exact_diffuse=True).loglike([EPS, ETA])
    assert abs(ref - (-633.46456)) < 1e-5
    model = local_level()
    ll = ps.kalman.filter(model, nile[:, None]).log_likelihood
    assert abs(float(ll) - ref) < 1e-8
    assert abs(float(ps.kalman.log_likelihood(model, nile[:, None])) - ref) < 1e-8
    # an explicit mask on a finite initial_cov: the masked rows and columns are ignored
    finite = local_level(p1=1e7)
    assert abs(float(ps.kalman.filter(finite, nile[:, None], diffuse=np.array([True])).log_likelihood) - ref) < 1e-8


def test_nile_filter_and_smoother_equal_statsmodels(nile):
    ref = sm_local_level(nile)
    s = ps.kalman.smoother(local_level(), nile[:, None])
    assert rel(s.smoothed_means[:, 0], ref.smoothed_state[0]) < 1e-6
    assert rel(s.smoothed_covs[:, 0, 0], ref.smoothed_state_cov[0, 0]) < 1e-6
    assert rel(s.filtered_means[:, 0], ref.filtered_state[0]) < 1e-6
    assert rel(s.filtered_covs[:, 0, 0], ref.filtered_state_cov[0, 0]) < 1e-6
    assert abs(float(s.log_likelihood) - ref.llf) < 1e-8


def test_nile_mle_reaches_the_book_values(nile):
    fixed = ("initial_mean", "initial_cov", "transition_matrix", "transition_offset", "emission_matrix",
             "emission_offset")
    fitted, history = ps.learn.mle(local_level(10000.0, 1000.0), nile[:, None], 60, fixed=fixed, progress=False)
    est = np.array([float(fitted.emission_cov[0, 0]), float(fitted.transition_cov[0, 0])])
    assert np.all(np.abs(est / np.array([EPS, ETA]) - 1) < 5e-4), est
    assert np.isinf(fitted.initial_cov[0, 0])
    assert float(history[-1]) > -633.4646


def _llt(level, slope, eps, p1=(INF, INF)):
    return ps.models.LinearGaussianSSM(jnp.zeros(2), jnp.diag(jnp.array(p1)), jnp.array([[1.0, 1.0], [0.0, 1.0]]),
                                       jnp.diag(jnp.array([level, slope])), jnp.array([[1.0, 0.0]]),
                                       eps * jnp.eye(1))


@pytest.mark.parametrize("missing", [(), (0,), (0, 1, 5)])
def test_local_linear_trend_equals_statsmodels(nile, missing):
    y = nile.copy()
    y[list(missing)] = np.nan  # missing entries inside the diffuse phase do not end it
    params = [12000.0, 1200.0, 15.0]
    ref = sm.tsa.UnobservedComponents(y, "local linear trend", use_exact_diffuse=True).smooth(params)
    s = ps.kalman.smoother(_llt(params[1], params[2], params[0]), y[:, None])
    assert abs(float(s.log_likelihood) - ref.llf) < 1e-8
    assert rel(s.smoothed_means, ref.smoothed_state.T) < 1e-6
    assert rel(s.smoothed_covs, np.moveaxis(ref.smoothed_state_cov, -1, 0)) < 1e-6
    # the filter reports +inf variance until the data identify a component (statsmodels: P_inf != 0)
    n_inf = int(np.argmax(~np.isnan(y)))  # the first observed step
    assert np.isinf(s.filtered_covs[n_inf, 1, 1]) and np.isfinite(s.filtered_covs[n_inf + 1]).all()
    assert rel(s.filtered_means[n_inf + 1:], ref.filtered_state.T[n_inf + 1:]) < 1e-6


def test_mixed_diffuse_and_known_components_equal_statsmodels(nile):
    # a diffuse random-walk level plus a stationary AR(1) component with a known initial law
    phi, q1, q2, r, m2 = 0.7, 1469.1, 3000.0, 12000.0, 50.0
    y = nile.copy()
    y[3] = np.nan
    mod = MLEModel(y, k_states=2)
    mod["design"] = np.array([[1.0, 1.0]])
    mod["transition"] = np.array([[1.0, 0.0], [0.0, phi]])
    mod["selection"] = np.eye(2)
    mod["state_cov"] = np.diag([q1, q2])
    mod["obs_cov"] = np.array([[r]])
    init = Initialization(2)
    init.set(0, "diffuse")
    init.set(1, "known", constant=[m2], stationary_cov=[[q2 / (1 - phi ** 2)]])
    mod.ssm.initialization = init
    ref = mod.ssm.smooth()
    model = ps.models.LinearGaussianSSM(jnp.array([0.0, m2]), jnp.diag(jnp.array([INF, q2 / (1 - phi ** 2)])),
                                        jnp.diag(jnp.array([1.0, phi])), jnp.diag(jnp.array([q1, q2])),
                                        jnp.array([[1.0, 1.0]]), r * jnp.eye(1))
    s = ps.kalman.smoother(model, y[:, None])
    assert abs(float(s.log_likelihood) - ref.llf) < 1e-8
    assert rel(s.smoothed_means, ref.smoothed_state.T) < 1e-6
    assert rel(s.smoothed_covs, np.moveaxis(ref.smoothed_state_cov, -1, 0)) < 1e-6


def test_no_diffuse_component_matches_the_standard_smoother(nile):
    # the diffuse form with an all-False mask is the ordinary filter and RTS smoother
    model = _llt(1469.1, 15.0, 15099.0, p1=(1e4, 1e2))
    y = nile[:30, None]
    params = model.linear_gaussian_params(30)
    a = ps.kalman.smoother_params(params, y)
    b = ps.kalman.smoother_params(params, y, diffuse=jnp.zeros(2, bool))
    for name in ("log_likelihood", "filtered_means", "filtered_covs", "smoothed_means", "smoothed_covs",
                 "smoothed_cross_covs"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-8, atol=1e-8, err_msg=name)


def test_jit_and_grad_of_the_diffuse_log_likelihood(nile):
    y = nile[:, None]

    def loglik(log_var):
        eps, eta = jnp.exp(log_var)
        return ps.kalman.log_likelihood(local_level(eps, eta), y)

    x = jnp.log(jnp.array([EPS, ETA]))
    ref = sm.tsa.UnobservedComponents(nile, "local level", use_exact_diffuse=True).loglike([EPS, ETA])
    assert abs(float(jax.jit(loglik)(x)) - ref) < 1e-8  # traced initial_cov: decided at run time
    g = jax.jit(jax.grad(loglik))(x)
    h = 1e-5
    fd = [(loglik(x + h * e) - loglik(x - h * e)) / (2 * h) for e in jnp.eye(2)]
    np.testing.assert_allclose(g, jnp.array(fd), rtol=1e-5, atol=1e-6)
    # the traceable core, under jit with a traced mask
    params = local_level(p1=1.0).linear_gaussian_params(len(nile))
    f = jax.jit(lambda p, m: ps.kalman.filter_params(p, y, diffuse=m).log_likelihood)
    assert abs(float(f(params, jnp.array([True]))) - ref) < 1e-8


def test_huge_finite_initial_cov_is_right_or_warns(nile):
    y = nile[:, None]
    exact = float(ps.kalman.filter(local_level(), y).log_likelihood)
    with pytest.warns(UserWarning, match="initial_cov"):
        ll30 = float(ps.kalman.filter(local_level(p1=1e30), y).log_likelihood)
    # log L(kappa) = log L_d - log(kappa) / 2 + O(R / kappa)
    assert abs(ll30 - (exact - 0.5 * np.log(1e30))) < 1e-8
    with pytest.warns(UserWarning, match="initial_cov"):
        ll300 = float(ps.kalman.filter(local_level(p1=1e300), y).log_likelihood)
    assert np.isfinite(ll300)
    with pytest.warns(UserWarning, match="initial_cov"):
        ps.kalman.filter(_llt(1469.1, 15.0, 15099.0, p1=(1e30, 1e30)), y)


def test_model_and_argument_checks(nile):
    y = nile[:20, None]
    bad = {"nan": [[np.nan, 0.0], [0.0, 1.0]], "-inf": [[-INF, 0.0], [0.0, 1.0]],
           "off-diagonal inf": [[1.0, INF], [INF, 1.0]], "coupled": [[INF, 0.5], [0.5, 1.0]]}
    for name, P1 in bad.items():
        with pytest.raises(ValueError, match="^initial_cov"):
            ps.models.LinearGaussianSSM(jnp.zeros(2), jnp.array(P1), jnp.eye(2), jnp.eye(2), jnp.ones((1, 2)),
                                        jnp.eye(1))
    model = local_level()
    with pytest.raises(ValueError, match="^parallel"):
        ps.kalman.filter(model, y, parallel=True)
    with pytest.raises(ValueError, match="^diffuse"):
        ps.kalman.filter(model, y, diffuse=np.array([1.0]))
    with pytest.raises(ValueError, match="^model"):
        ps.kalman.sample(jax.random.PRNGKey(0), model, y)
    with pytest.raises(Exception, match="initial_cov"):  # a flat prior has no draws
        ps.sample(jax.random.PRNGKey(0), model, 5)
    # a model with inf changed in by eqx.tree_at is checked where inference starts
    import equinox as eqx
    tampered = eqx.tree_at(lambda m: m.initial_cov, model, jnp.array([[-INF]]))
    with pytest.raises(ValueError, match="^initial_cov"):
        ps.kalman.filter(tampered, y)


def test_initial_form_is_concrete_only_and_traceable(nile):
    y = nile[:, None]
    assert ps.kalman.initial_form(local_level(), y) == (True,)
    assert ps.kalman.initial_form(local_level(p1=1e7), y) is False
    # under jit / vmap the covariance is traced: undecided, and nothing raises
    seen = []
    jax.jit(lambda p1: seen.append(ps.kalman.initial_form(local_level(p1=p1), y)) or p1)(1.0)
    jax.vmap(lambda p1: seen.append(ps.kalman.initial_form(local_level(p1=p1), y)) or p1)(jnp.ones(2))
    assert seen == [None, None]
    # a bad value set by eqx.tree_at is still refused where inference starts
    import equinox as eqx
    bad = eqx.tree_at(lambda m: m.emission_cov, local_level(), -jnp.eye(1))
    with pytest.raises(ValueError, match="emission_cov"):
        ps.kalman.filter(bad, y)
