"""Learners for the linear-Gaussian model: EM against pykalman's M-step, monotone EM,
Nile MLE against Durbin & Koopman, compile-once."""
import numpy as np
import pytest
import jax

import probssm as ps
import importlib

from probssm.learn import em_lgssm

mle_module = importlib.import_module("probssm.learn.mle")
from test_kalman import random_model

FIXED_NILE = ("initial_mean", "initial_cov", "transition_matrix", "emission_matrix", "transition_offset",
              "emission_offset")


@pytest.fixture(scope="module")
def nile():
    from statsmodels.datasets import nile

    y = nile.load_pandas().data["volume"].to_numpy(float)[:, None]
    v = float(np.var(y))
    start = ps.models.LinearGaussianSSM(np.zeros(1), 1e7 * np.eye(1), np.eye(1), v * np.eye(1), np.eye(1),
                                       v * np.eye(1))
    return y, start


def test_em_step_equals_pykalman():
    """With offsets fixed, pykalman's M-step is the same joint regression: three iterations agree."""
    from pykalman import KalmanFilter

    rng = np.random.default_rng(1)
    d, p = 2, 3
    truth = random_model(rng, d, p)
    _, y = ps.sample(jax.random.PRNGKey(0), truth, 80)
    H0 = rng.normal(size=(p, d))
    start = ps.models.LinearGaussianSSM(np.zeros(d), np.eye(d), 0.3 * np.eye(d), np.eye(d), H0, np.eye(p))
    fit, _ = ps.learn.em(start, y, 3, fixed=("transition_offset", "emission_offset"), progress=False)
    kf = KalmanFilter(transition_matrices=0.3 * np.eye(d), observation_matrices=H0, transition_covariance=np.eye(d),
                      observation_covariance=np.eye(p), transition_offsets=np.zeros(d),
                      observation_offsets=np.zeros(p), initial_state_mean=np.zeros(d),
                      initial_state_covariance=np.eye(d),
                      em_vars=["transition_matrices", "observation_matrices", "transition_covariance",
                               "observation_covariance", "initial_state_mean", "initial_state_covariance"])
    kf = kf.em(np.asarray(y), n_iter=3)
    pairs = [(fit.transition_matrix, kf.transition_matrices), (fit.transition_cov, kf.transition_covariance),
             (fit.emission_matrix, kf.observation_matrices), (fit.emission_cov, kf.observation_covariance),
             (fit.initial_mean, kf.initial_state_mean), (fit.initial_cov, kf.initial_state_covariance)]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-8, atol=1e-10)


def test_em_never_decreases_with_missing_data_inputs_and_batches():
    rng = np.random.default_rng(2)
    d, p, T = 2, 3, 60
    truth = random_model(rng, d, p, inputs_dim=1)
    u = rng.normal(size=(3, T, 1))
    ys = np.stack([np.asarray(ps.sample(jax.random.PRNGKey(k), truth, T, inputs=u[k])[1]) for k in range(3)])
    ys[0, 5, 1] = np.nan
    ys[1, 10] = np.nan
    ys[2, 40:, :] = np.nan  # a shorter sequence, padded with NaN
    start = random_model(rng, d, p, inputs_dim=1)
    fit, history = ps.learn.em(start, ys, 40, inputs=u, progress=False)
    history = np.asarray(history)
    # Every iteration: the log-likelihood does not decrease beyond float64 rounding.
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    assert history[-1] > history[0] + 1.0
    # The history is the likelihood of the parameters entering each iteration.
    ll_fit = float(ps.kalman.filter(fit, ys, inputs=u).log_likelihood.sum())
    assert ll_fit >= history[-1] - 1e-9 * abs(ll_fit)
    # The starting model is untouched.
    assert np.all(np.isfinite(np.asarray(start.transition_matrix)))


def test_em_fixed_parameters_stay_fixed():
    rng = np.random.default_rng(3)
    truth = random_model(rng, 2, 2)
    _, y = ps.sample(jax.random.PRNGKey(1), truth, 50)
    start = random_model(rng, 2, 2)
    fit, _ = ps.learn.em(start, y, 5, fixed=("emission_matrix", "transition_cov"), progress=False)
    np.testing.assert_array_equal(np.asarray(fit.emission_matrix), np.asarray(start.emission_matrix))
    np.testing.assert_array_equal(np.asarray(fit.transition_cov), np.asarray(start.transition_cov))
    assert not np.allclose(np.asarray(fit.transition_matrix), np.asarray(start.transition_matrix))


def test_nile_mle_and_em_match_durbin_koopman(nile):
    y, start = nile
    mle_fit, mle_hist = ps.learn.mle(start, y, 60, fixed=FIXED_NILE, progress=False)
    em_fit, em_hist = ps.learn.em(start, y, 500, fixed=FIXED_NILE, progress=False)
    for fit in (mle_fit, em_fit):
        assert abs(float(fit.emission_cov[0, 0]) / 15099.0 - 1) < 0.01
        assert abs(float(fit.transition_cov[0, 0]) / 1469.1 - 1) < 0.01
    # EM and gradient MLE agree with each other far more tightly than with the published rounding.
    assert abs(float(em_fit.emission_cov[0, 0]) / float(mle_fit.emission_cov[0, 0]) - 1) < 1e-3
    assert abs(float(em_fit.transition_cov[0, 0]) / float(mle_fit.transition_cov[0, 0]) - 1) < 1e-3
    assert abs(float(em_hist[-1]) - float(mle_hist[-1])) < 1e-4
    assert np.all(np.diff(np.asarray(em_hist)) >= -1e-9 * np.abs(np.asarray(em_hist[1:])))


def test_fits_compile_once(nile):
    # the same static settings as test_nile_mle_and_em_match_durbin_koopman (500 EM / 60 MLE iterations):
    # with the module's order the first calls below reuse its executables, the second ones must too
    y, start = nile
    ps.learn.em(start, y, 500, fixed=FIXED_NILE, progress=False)
    n_em = em_lgssm._fit._cache_size()
    other = ps.models.LinearGaussianSSM(np.zeros(1), 1e7 * np.eye(1), np.eye(1), 2e3 * np.eye(1), np.eye(1),
                                       1e4 * np.eye(1))
    ps.learn.em(other, y * 1.1, 500, fixed=FIXED_NILE, progress=False)
    assert em_lgssm._fit._cache_size() == n_em
    ps.learn.mle(start, y, 60, fixed=FIXED_NILE, progress=False)
    n_mle = mle_module._fit._cache_size()
    ps.learn.mle(other, y * 1.1, 60, fixed=FIXED_NILE, progress=False)
    assert mle_module._fit._cache_size() == n_mle


def test_mle_with_adam_improves_likelihood():
    import optax

    rng = np.random.default_rng(4)
    truth = random_model(rng, 2, 2)
    _, y = ps.sample(jax.random.PRNGKey(2), truth, 100)
    start = random_model(rng, 2, 2)
    fit, hist = ps.learn.mle(start, y, 50, optimizer=optax.adam(0.05), progress=False)
    assert float(hist[-1]) > float(hist[0])
    # Constraints hold: learned covariances are positive definite.
    for cov in (fit.transition_cov, fit.emission_cov, fit.initial_cov):
        assert np.all(np.linalg.eigvalsh(np.asarray(cov)) > 0)


def test_learner_bad_input():
    rng = np.random.default_rng(5)
    model = random_model(rng, 2, 2)
    y = np.zeros((10, 2))
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.em(model, y, 3, fixed=("no_such_parameter",))
    with pytest.raises(ValueError, match="num_iters"):
        ps.learn.em(model, y, 0)
    with pytest.raises(ValueError, match="emissions"):
        ps.learn.em(model, np.zeros((10, 3)), 3)
    tv = random_model(rng, 2, 2, T=10)
    with pytest.raises(ValueError, match="time-varying"):
        ps.learn.em(tv, y, 3)
    with pytest.raises(ValueError, match="estimator"):
        ps.learn.mle(model, y, 3, estimator="magic")
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.mle(model, y, 3, fixed=("nope",))
