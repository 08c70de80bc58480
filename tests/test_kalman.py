"""Kalman engine against independent oracles: a plain numpy filter/RTS smoother
(tests/reference.py) and pykalman; parallel against sequential; missing data
against the problem with those entries removed."""
import equinox as eqx
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps
from probssm.inference import kalman
from reference import kalman_filter_numpy, rts_smoother_numpy

RTOL = 1e-8


def rand_psd(rng, n, jitter=0.5):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)


def random_model(rng, d, p, T=None, inputs_dim=0):
    """Random stable model; with T, every matrix and offset is time-varying."""
    if T is None:
        F = 0.6 * np.linalg.qr(rng.normal(size=(d, d)))[0]
        Q, H, R = rand_psd(rng, d), rng.normal(size=(p, d)), rand_psd(rng, p)
        b, dd = rng.normal(size=d), rng.normal(size=p)
    else:
        F = np.stack([0.6 * np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(T)])
        Q = np.stack([rand_psd(rng, d) for _ in range(T)])
        H = rng.normal(size=(T, p, d))
        R = np.stack([rand_psd(rng, p) for _ in range(T)])
        b, dd = rng.normal(size=(T, d)), rng.normal(size=(T, p))
    B = rng.normal(size=(d, inputs_dim)) if inputs_dim else None
    D = rng.normal(size=(p, inputs_dim)) if inputs_dim else None
    return ps.models.LinearGaussianSSM(rng.normal(size=d), rand_psd(rng, d), F, Q, H, R, b, dd, B, D)


def per_step(model, T, inputs=None):
    """Expand a model into per-step lists for the numpy reference."""
    def tv(a, base):
        a = np.asarray(a)
        return a if a.ndim > base else np.broadcast_to(a, (T,) + a.shape)

    b, d = tv(model.transition_offset, 1).copy(), tv(model.emission_offset, 1).copy()
    if inputs is not None:
        b = b + inputs @ np.asarray(model.transition_input_matrix).T
        d = d + inputs @ np.asarray(model.emission_input_matrix).T
    return (np.asarray(model.initial_mean), np.asarray(model.initial_cov), tv(model.transition_matrix, 2), b,
            tv(model.transition_cov, 2), tv(model.emission_matrix, 2), d, tv(model.emission_cov, 2))


def assert_close(a, b, rtol=RTOL, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def check_against_reference(model, y, inputs=None, parallel=False, chunk_size=None):
    T = y.shape[0]
    args = per_step(model, T, inputs)
    ll, fm, fP, pm, pP = kalman_filter_numpy(*args, np.asarray(y))
    sm, sP = rts_smoother_numpy(args[2], fm, fP, pm, pP)
    s = ps.kalman.smoother(model, y, inputs=inputs, parallel=parallel, chunk_size=chunk_size)
    assert_close(s.log_likelihood, ll)
    assert_close(s.filtered_means, fm)
    assert_close(s.filtered_covs, fP)
    assert_close(s.smoothed_means, sm)
    assert_close(s.smoothed_covs, sP)
    f = ps.kalman.filter(model, y, inputs=inputs, parallel=parallel, chunk_size=chunk_size)
    assert_close(f.log_likelihood, ll)
    return s


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20261122)


@pytest.mark.parametrize("parallel", [False, True])
def test_time_invariant_with_offsets_matches_reference(rng, parallel):
    model = random_model(rng, 3, 2)
    _, y = ps.sample(jax.random.PRNGKey(1), model, 40)
    check_against_reference(model, y, parallel=parallel)


@pytest.mark.parametrize("parallel", [False, True])
def test_time_varying_with_inputs_matches_reference(rng, parallel):
    T = 30
    model = random_model(rng, 3, 2, T=T, inputs_dim=2)
    u = rng.normal(size=(T, 2))
    _, y = ps.sample(jax.random.PRNGKey(2), model, T, inputs=u)
    check_against_reference(model, y, inputs=u, parallel=parallel)


def test_matches_pykalman(rng):
    from pykalman import KalmanFilter

    model = random_model(rng, 2, 3)
    _, y = ps.sample(jax.random.PRNGKey(3), model, 50)
    kf = KalmanFilter(
        transition_matrices=np.asarray(model.transition_matrix), observation_matrices=np.asarray(model.emission_matrix),
        transition_covariance=np.asarray(model.transition_cov), observation_covariance=np.asarray(model.emission_cov),
        transition_offsets=np.asarray(model.transition_offset), observation_offsets=np.asarray(model.emission_offset),
        initial_state_mean=np.asarray(model.initial_mean), initial_state_covariance=np.asarray(model.initial_cov))
    fm, fP = kf.filter(np.asarray(y))
    sm, sP = kf.smooth(np.asarray(y))
    s = ps.kalman.smoother(model, y)
    assert_close(s.log_likelihood, kf.loglikelihood(np.asarray(y)))
    assert_close(s.filtered_means, fm)
    assert_close(s.filtered_covs, fP)
    assert_close(s.smoothed_means, sm)
    assert_close(s.smoothed_covs, sP)


@pytest.mark.parametrize("parallel,chunk_size", [(True, None), (True, 7)])
def test_parallel_equals_sequential(rng, parallel, chunk_size):
    # the shapes of test_time_invariant_with_offsets_matches_reference (d = 3, p = 2, T = 40): the
    # sequential and default parallel smoothers compiled there are reused here
    model = random_model(rng, 3, 2)
    _, y = ps.sample(jax.random.PRNGKey(4), model, 40)
    y = np.array(y)
    y[5, 1] = np.nan
    y[17] = np.nan
    seq = ps.kalman.smoother(model, y)
    par = ps.kalman.smoother(model, y, parallel=parallel, chunk_size=chunk_size)
    for a, b in zip(seq, par):
        assert_close(b, a)


def test_two_level_form_under_grad_and_batches(rng):
    """The two-level parallel form (chunks reduced in parallel, then rerun) on a time-varying model
    with missing rows: its gradient equals the sequential one; on a list of two sequences of
    different lengths (a padded batch) it equals the sequential smoother of each."""
    T = 50
    model = random_model(rng, 3, 2, T=T)
    _, y = ps.sample(jax.random.PRNGKey(6), model, T)
    y = np.array(y)
    y[7] = np.nan
    y[20, 0] = np.nan

    def loglik(scale, parallel):
        m = eqx.tree_at(lambda m: m.transition_cov, model, model.transition_cov * scale)
        return ps.kalman.filter(m, y, parallel=parallel, chunk_size="two-level" if parallel else None).log_likelihood

    assert_close(jax.grad(loglik)(1.2, True), jax.grad(loglik)(1.2, False))
    invariant = random_model(rng, 3, 2)
    ys = [y, y[:37]]
    par = ps.kalman.smoother(invariant, ys, parallel=True, chunk_size="two-level", steady_state=False)
    for i, yi in enumerate(ys):
        seq = ps.kalman.smoother(invariant, yi, steady_state=False)
        n = yi.shape[0]
        assert_close(par.log_likelihood[i], seq.log_likelihood)
        assert_close(par.smoothed_means[i, :n], seq.smoothed_means)
        assert_close(par.smoothed_covs[i, :n], seq.smoothed_covs)


def test_missing_values_equal_removed_entries(rng):
    """Partial and whole missing rows give the filter of the problem without those entries."""
    T = 40
    model = random_model(rng, 3, 3)
    _, y = ps.sample(jax.random.PRNGKey(5), model, T)
    y = np.array(y)
    y[3, 0] = np.nan
    y[4, 1:] = np.nan
    y[10] = np.nan
    y[25:28, 2] = np.nan
    s = check_against_reference(model, y)
    # Whole rows: same as a time-varying model whose emission at those steps carries no information.
    assert np.isfinite(np.asarray(s.log_likelihood))
    # The last step missing: the filtered moment there is the prediction.
    y2 = y.copy()
    y2[-1] = np.nan
    f = ps.kalman.filter(model, y2)
    f_short = ps.kalman.filter(model, y2[:-1])
    assert_close(f.log_likelihood, f_short.log_likelihood)
    m_pred = np.asarray(model.transition_matrix) @ np.asarray(f_short.filtered_means[-1]) + np.asarray(
        model.transition_offset)
    assert_close(f.filtered_means[-1], m_pred)


def test_batches_equal_single_sequences(rng):
    model = random_model(rng, 2, 2)
    ys = np.stack([np.asarray(ps.sample(jax.random.PRNGKey(k), model, 25)[1]) for k in range(3)])
    ys[1, 4] = np.nan
    batch = ps.kalman.smoother(model, ys)
    for i in range(3):
        single = ps.kalman.smoother(model, ys[i])
        for a, b in zip(single, batch):
            assert_close(b[i], a)


def test_float32_long_sequence():
    rng = np.random.default_rng(7)
    model64 = random_model(rng, 4, 2)
    T = 100_000
    _, y = ps.sample(jax.random.PRNGKey(8), model64, T)
    ll64 = ps.kalman.filter(model64, y).log_likelihood
    model32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), model64)
    for parallel, chunk_size in ((False, None), (True, 4096), (True, "two-level")):
        f32 = ps.kalman.filter(model32, jnp.asarray(y, jnp.float32), parallel=parallel, chunk_size=chunk_size)
        assert f32.log_likelihood.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(f32.filtered_means)))
        assert abs(float(f32.log_likelihood) - float(ll64)) / abs(float(ll64)) < 1e-3


@pytest.mark.parametrize("parallel", [False, True])
def test_backward_samples_match_smoother(rng, parallel):
    model = random_model(rng, 2, 1)
    T, N = 15, 4000
    _, y = ps.sample(jax.random.PRNGKey(9), model, T)
    y = np.array(y)
    y[6] = np.nan
    s = ps.kalman.smoother(model, y)
    z = np.asarray(ps.kalman.sample(jax.random.PRNGKey(10), model, y, N, parallel=parallel))
    assert z.shape == (N, T, 2)
    mean, var = np.asarray(s.smoothed_means), np.diagonal(np.asarray(s.smoothed_covs), axis1=1, axis2=2)
    # 60 means and 60 variances compared; 4.5 standard errors keeps the family-wise false alarm rate < 1e-3.
    z_mean = (z.mean(0) - mean) / np.sqrt(var / N)
    assert np.abs(z_mean).max() < 4.5
    emp_var = z.var(0, ddof=1)
    z_var = (emp_var - var) / (var * np.sqrt(2.0 / (N - 1)))
    assert np.abs(z_var).max() < 4.5
    # Lag-one cross-covariance of the draws against the smoother's.
    emp_cross = np.einsum("nti,ntj->tij", z[:, 1:] - z[:, 1:].mean(0), z[:, :-1] - z[:, :-1].mean(0)) / (N - 1)
    cross = np.asarray(s.smoothed_cross_covs)
    se = np.sqrt((np.einsum("tii,tjj->tij", np.asarray(s.smoothed_covs)[1:], np.asarray(s.smoothed_covs)[:-1])
                  + cross ** 2) / N)
    assert np.abs((emp_cross - cross) / se).max() < 4.5


def test_forecast_equals_filter_on_missing_future(rng):
    model = random_model(rng, 3, 2)
    _, y = ps.sample(jax.random.PRNGKey(11), model, 20)
    k = 5
    fc = ps.kalman.forecast(model, y, k)
    padded = np.concatenate([np.asarray(y), np.full((k, 2), np.nan)])
    f = ps.kalman.filter(model, padded)
    assert_close(fc.means, f.filtered_means[-k:])
    assert_close(fc.covs, f.filtered_covs[-k:])
    H, R = np.asarray(model.emission_matrix), np.asarray(model.emission_cov)
    assert_close(fc.emission_means, np.asarray(f.filtered_means[-k:]) @ H.T + np.asarray(model.emission_offset))
    assert_close(fc.emission_covs, H @ np.asarray(f.filtered_covs[-k:]) @ H.T + R)


def test_no_retrace_on_repeated_calls(rng):
    model = random_model(rng, 2, 2)
    _, y = ps.sample(jax.random.PRNGKey(12), model, 33)
    ps.kalman.filter(model, y)
    before = kalman._run._cache_size()
    other = random_model(rng, 2, 2)
    ps.kalman.filter(other, y + 1.0)
    ps.kalman.filter(model, y)
    assert kalman._run._cache_size() == before


def test_generic_sample_shapes_and_inputs(rng):
    model = random_model(rng, 3, 2, inputs_dim=1)
    u = np.ones((12, 1))
    z, y = ps.sample(jax.random.PRNGKey(0), model, 12, inputs=u)
    assert z.shape == (12, 3) and y.shape == (12, 2)


def test_lagged_inputs():
    y = np.arange(10.0).reshape(5, 2)
    lag = np.asarray(ps.lagged_inputs(y, 2))
    assert lag.shape == (5, 4)
    np.testing.assert_array_equal(lag[3], [4.0, 5.0, 2.0, 3.0])
    np.testing.assert_array_equal(lag[0], [0.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def good_args():
    return dict(initial_mean=np.zeros(2), initial_cov=np.eye(2), transition_matrix=np.eye(2),
                transition_cov=np.eye(2), emission_matrix=np.ones((1, 2)), emission_cov=np.eye(1))


@pytest.mark.parametrize("name,value", [
    ("initial_cov", np.eye(3)),
    ("transition_matrix", np.eye(3)),
    ("transition_cov", -np.eye(2)),
    ("emission_cov", np.array([[1.0, 2.0], [0.0, 1.0]])),
    ("emission_matrix", np.ones((1, 3))),
    ("initial_mean", np.array([np.nan, 0.0])),
    ("transition_matrix", np.array([[np.inf, 0.0], [0.0, 1.0]])),
    ("initial_cov", np.array([[1.0, 0.0], [0.0, -1.0]])),
])
def test_bad_parameters_raise(name, value):
    kwargs = good_args()
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        ps.models.LinearGaussianSSM(**kwargs)


def test_bad_emissions_and_arguments_raise():
    model = ps.models.LinearGaussianSSM(**good_args())
    with pytest.raises(ValueError, match="emissions"):
        ps.kalman.filter(model, np.zeros((10, 2)))
    with pytest.raises(ValueError, match="emissions"):
        ps.kalman.filter(model, np.zeros((2, 2, 10, 1)))
    # a 1-D series is one sequence of a 1-D emission, (T,) -> (T, 1)
    assert float(ps.kalman.filter(model, np.zeros(10)).log_likelihood) == \
        float(ps.kalman.filter(model, np.zeros((10, 1))).log_likelihood)
    with pytest.raises(ValueError, match="emissions"):
        ps.kalman.filter(model, np.full((10, 1), np.inf))
    with pytest.raises(ValueError, match="inputs"):
        ps.kalman.filter(model, np.zeros((10, 1)), inputs=np.zeros((10, 1)))
    with pytest.raises(ValueError, match="num_samples"):
        ps.kalman.sample(jax.random.PRNGKey(0), model, np.zeros((10, 1)), 0)
    with pytest.raises(ValueError, match="num_steps"):
        ps.kalman.forecast(model, np.zeros((10, 1)), -1)
    with pytest.raises(ValueError, match="chunk_size"):
        ps.kalman.filter(model, np.zeros((10, 1)), parallel=True, chunk_size=0)
    tv = ps.models.LinearGaussianSSM(**{**good_args(), "transition_matrix": np.stack([np.eye(2)] * 5)})
    with pytest.raises(ValueError, match="model"):
        ps.kalman.filter(tv, np.zeros((10, 1)))
    with pytest.raises(ValueError, match="model"):
        ps.kalman.filter("not a model", np.zeros((10, 1)))
