"""Steady-state Kalman forms (time-invariant F, Q, H, R, no missing data): the switch to the
constant gain equals the full covariance recursion (1e-8) and the numpy reference, sequential and
parallel, batched, with inputs, under grad, and in float32 on a long sequence."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps
from probssm.inference import kalman
from reference import kalman_filter_numpy, rts_smoother_numpy
from test_kalman import assert_close, per_step, rand_psd

T = 200


def model_with(rng, d, p, rho, inputs_dim=0):
    F = rho * np.linalg.qr(rng.normal(size=(d, d)))[0]
    B = rng.normal(size=(d, inputs_dim)) if inputs_dim else None
    D = rng.normal(size=(p, inputs_dim)) if inputs_dim else None
    return ps.models.LinearGaussianSSM(rng.normal(size=d), rand_psd(rng, d), F, rand_psd(rng, d, 0.1),
                                       rng.normal(size=(p, d)), rand_psd(rng, p), rng.normal(size=d),
                                       rng.normal(size=p), B, D)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(2026_12_04)
    model = model_with(rng, 3, 2, 0.9, inputs_dim=1)
    u = rng.normal(size=(T, 1))
    _, y = ps.sample(jax.random.PRNGKey(3), model, T, inputs=u)
    return model, np.asarray(y), u


def steady_steps(model, y, u=None):
    params = model.linear_gaussian_params(y.shape[0], u)
    flags = kalman._steady_forward(params, jnp.asarray(y))[3]
    return int(np.sum(np.asarray(flags)))


@pytest.mark.parametrize("parallel", [False, True])
def test_steady_state_equals_full_recursion_and_reference(problem, parallel):
    model, y, u = problem
    assert steady_steps(model, y, u) > T // 2  # the switch happened: the test exercises it
    full = ps.kalman.smoother(model, y, inputs=u, steady_state=False)
    fast = ps.kalman.smoother(model, y, inputs=u, parallel=parallel)
    for name in full._fields:
        assert_close(getattr(fast, name), getattr(full, name))
    args = per_step(model, T, u)
    ll, fm, fP, pm, pP = kalman_filter_numpy(*args, y)
    sm, sP = rts_smoother_numpy(args[2], fm, fP, pm, pP)
    for got, want in [(fast.log_likelihood, ll), (fast.filtered_means, fm), (fast.filtered_covs, fP),
                      (fast.smoothed_means, sm), (fast.smoothed_covs, sP)]:
        assert_close(got, want)
    f = ps.kalman.filter(model, y, inputs=u, parallel=parallel)
    assert_close(f.log_likelihood, ll)
    assert_close(f.filtered_means, fm)


def test_slowly_converging_recursion_within_tolerance():
    """Local level with signal-to-noise 1e-4: the gain converges slowly (contraction ~0.99)."""
    model = ps.models.LinearGaussianSSM(np.zeros(1), np.eye(1), np.eye(1), 1e-4 * np.eye(1), np.eye(1), np.eye(1))
    _, y = ps.sample(jax.random.PRNGKey(4), model, 3000)
    assert steady_steps(model, y) > 0
    full = ps.kalman.smoother(model, y, steady_state=False)
    for parallel in (False, True):
        fast = ps.kalman.smoother(model, y, parallel=parallel)
        for name in full._fields:
            assert_close(getattr(fast, name), getattr(full, name))


def test_batch_shares_covariances_and_equals_single_sequences(problem):
    model, y, u = problem
    ys = np.stack([y, y[::-1], 2.0 * y])
    us = np.stack([u, -u, u])
    batch = ps.kalman.smoother(model, ys, inputs=us)
    for i in range(3):
        single = ps.kalman.smoother(model, ys[i], inputs=us[i], steady_state=False)
        for a, b in zip(single, batch):
            assert_close(b[i], a)


def test_missing_data_and_time_varying_models_take_the_full_recursion(problem):
    model, y, u = problem
    y = y.copy()
    y[50, 0] = np.nan
    assert_close(ps.kalman.filter(model, y, inputs=u).log_likelihood,
                 ps.kalman.filter(model, y, inputs=u, steady_state=False).log_likelihood, rtol=0, atol=0)


def test_gradient_equals_full_recursion(problem):
    model, y, u = problem

    def loglik(scale, steady):
        m = ps.models.LinearGaussianSSM(model.initial_mean, model.initial_cov, model.transition_matrix,
                                        scale * model.transition_cov, model.emission_matrix, model.emission_cov,
                                        model.transition_offset, model.emission_offset,
                                        model.transition_input_matrix, model.emission_input_matrix)
        return ps.kalman.filter(m, y, inputs=u, steady_state=steady).log_likelihood

    g_fast = jax.grad(loglik)(1.3, True)
    g_full = jax.grad(loglik)(1.3, False)
    assert_close(g_fast, g_full, rtol=1e-7)


def test_float32_long_sequence_against_float64_full_recursion():
    rng = np.random.default_rng(11)
    model = model_with(rng, 4, 2, 0.95)
    _, y = ps.sample(jax.random.PRNGKey(5), model, 20_000)
    ll64 = float(ps.kalman.filter(model, y, steady_state=False).log_likelihood)
    model32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), model)
    for parallel in (False, True):
        f = ps.kalman.filter(model32, jnp.asarray(y, jnp.float32), parallel=parallel)
        assert f.log_likelihood.dtype == jnp.float32
        # float32 rounding of 20000 summed terms of size ~5: a relative error of 1e-4 is ~100 ulp
        assert abs(float(f.log_likelihood) - ll64) / abs(ll64) < 1e-4


def test_affine_recurrence_equals_loop():
    rng = np.random.default_rng(1)
    A = 0.9 * np.linalg.qr(rng.normal(size=(3, 3)))[0]
    u = rng.normal(size=(77, 3))
    x, want = np.zeros(3), []
    for ut in u:
        x = A @ x + ut
        want.append(x)
    for chunk in (None, 1, 8, 32, 100):
        assert_close(kalman.affine_recurrence(jnp.asarray(A), jnp.asarray(u), chunk), np.array(want))


def test_no_retrace_for_new_data_of_the_same_shape(problem):
    model, y, u = problem
    for parallel in (False, True):
        ps.kalman.smoother(model, y, inputs=u, parallel=parallel)
        before = kalman._run._cache_size()
        ps.kalman.smoother(model, y + 1.0, inputs=u + 1.0, parallel=parallel)
        assert kalman._run._cache_size() == before


@pytest.mark.parametrize("parallel", [False, True])
def test_backward_samples_on_the_steady_path_match_the_smoother(problem, parallel):
    model, y, u = problem
    N = 2000
    s = ps.kalman.smoother(model, y, inputs=u, steady_state=False)
    z = np.asarray(ps.kalman.sample(jax.random.PRNGKey(21), model, y, N, inputs=u, parallel=parallel))
    assert z.shape == (N, T, 3)
    mean, var = np.asarray(s.smoothed_means), np.diagonal(np.asarray(s.smoothed_covs), axis1=1, axis2=2)
    # 600 means and 600 variances; 5 standard errors keeps the family-wise false alarm rate < 1e-3
    assert np.abs((z.mean(0) - mean) / np.sqrt(var / N)).max() < 5.0
    z_var = (z.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (N - 1)))
    assert np.abs(z_var).max() < 5.0
    emp_cross = np.einsum("nti,ntj->tij", z[:, 1:] - z[:, 1:].mean(0), z[:, :-1] - z[:, :-1].mean(0)) / (N - 1)
    cross = np.asarray(s.smoothed_cross_covs)
    covs = np.asarray(s.smoothed_covs)
    se = np.sqrt((np.einsum("tii,tjj->tij", covs[1:], covs[:-1]) + cross ** 2) / N)
    assert np.abs((emp_cross - cross) / se).max() < 5.0


def test_affine_recurrence_under_jit_and_vmap_and_bad_input():
    A = jnp.array([[0.9, 0.1], [-0.1, 0.8]])
    u = jnp.asarray(np.random.default_rng(2).normal(size=(3, 40, 2)))
    want = np.stack([np.asarray(kalman.affine_recurrence(A, ui, 8)) for ui in u])
    got = jax.jit(jax.vmap(lambda ui: kalman.affine_recurrence(A, ui, 8)))(u)
    assert_close(got, want)
    with pytest.raises(ValueError, match="A, u"):
        kalman.affine_recurrence(jnp.eye(3), u[0])
    with pytest.raises(ValueError, match="chunk_size"):
        kalman.affine_recurrence(A, u[0], 0)
    assert kalman.steady_state_rtol(jnp.float64) == 1e-12
    with pytest.raises(ValueError, match="dtype"):
        kalman.steady_state_rtol(jnp.int32)


def test_tree_at_model_with_a_bad_value_raises_on_the_steady_path(problem):
    import equinox as eqx

    model, y, u = problem
    bad = eqx.tree_at(lambda m: m.transition_cov, model, -jnp.eye(3))
    for fn in (ps.kalman.filter, ps.kalman.smoother):
        for parallel in (False, True):
            with pytest.raises(ValueError, match="transition_cov"):
                fn(bad, y, inputs=u, parallel=parallel)
