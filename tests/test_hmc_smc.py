"""HMC-SMC against the Kalman filter (exact answers), including a regime where the bootstrap filter degenerates."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps

T, N, R = 20, 200, 64  # steps, particles, independent runs (a batch of copies of one sequence)


def lgssm(emission_var, emission_matrix):
    A = np.array([[0.9, 0.2], [-0.1, 0.8]])
    return ps.models.LinearGaussianSSM(np.zeros(2), np.eye(2), A, 0.3 * np.eye(2), emission_matrix,
                                       emission_var * np.eye(emission_matrix.shape[0]))


def runs(model, y, key=1, **kw):
    batch = jnp.broadcast_to(y, (R,) + y.shape)
    return ps.smc.hmc_smc(jax.random.PRNGKey(key), model, batch, N, **kw)


def z_scores(estimates, exact):
    """(mean over independent runs - exact) / standard error of that mean."""
    e = np.asarray(estimates)
    return (e.mean(0) - np.asarray(exact)) / (e.std(0, ddof=1) / np.sqrt(e.shape[0]))


@pytest.fixture(scope="module")
def informative_data():
    """Observation noise 100x smaller than the transition noise in standard deviation."""
    model = lgssm(1e-4, np.array([[1.0, 0.0], [0.3, 1.0]]))
    _, y = ps.sample(jax.random.PRNGKey(0), model, T)
    return model, y


@pytest.fixture(scope="module")
def informative(informative_data):
    model, y = informative_data
    return model, y, ps.kalman.filter(model, y), runs(model, y)


# The Monte Carlo comparisons against the Kalman filter are heavy (R independent HMC-SMC runs):
# `make test-all` runs them; CI runs HMC-SMC on four families in test_conformance_particles.


@pytest.mark.slow
def test_filtering_moments_match_kalman(informative):
    model, y, kf, res = informative
    # 40 z-scores each: P(max |z| > 4.5) < 3e-4 when unbiased
    assert np.abs(z_scores(res.filtered_means, kf.filtered_means)).max() < 4.5
    var = np.diagonal(np.asarray(res.filtered_covs), axis1=2, axis2=3)
    exact_var = np.diagonal(np.asarray(kf.filtered_covs), axis1=1, axis2=2)
    assert np.abs(z_scores(var, exact_var)).max() < 4.5


@pytest.mark.slow
def test_likelihood_estimate_matches_kalman(informative):
    model, y, kf, res = informative
    ratio = np.exp(np.asarray(res.log_likelihood) - float(kf.log_likelihood))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(R)


@pytest.mark.slow
def test_ess_stays_high_where_the_bootstrap_filter_degenerates(informative):
    model, y, kf, res = informative
    pf = ps.smc.particle_filter(jax.random.PRNGKey(2), model, jnp.broadcast_to(y, (R,) + y.shape), N,
                                ess_threshold=1.0)
    assert float(np.mean(np.asarray(pf.ess)[:, 1:])) < 0.05 * N  # bootstrap: a handful of particles
    assert float(np.min(np.asarray(res.ess))) >= 0.5 * N  # every tempering stage keeps ESS >= target_ess * N
    assert float(np.mean(np.asarray(res.acceptance_rate))) > 0.3


@pytest.mark.slow
def test_missing_steps_are_skipped(informative):
    model, y, kf, _ = informative
    y_missing = np.asarray(y).copy()
    y_missing[5:8] = np.nan
    kf_m = ps.kalman.filter(model, y_missing)
    res = runs(model, y_missing)
    assert np.all(np.asarray(res.num_stages)[:, 5:8] == 1)
    assert np.abs(z_scores(res.filtered_means, kf_m.filtered_means)).max() < 4.5


def test_bad_input(informative_data):
    model, y = informative_data
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_particles"):
        ps.smc.hmc_smc(key, model, y, 1)
    with pytest.raises(ValueError, match="target_ess"):
        ps.smc.hmc_smc(key, model, y, 10, target_ess=0.0)
    with pytest.raises(ValueError, match="step_size"):
        ps.smc.hmc_smc(key, model, y, 10, step_size=-1.0)
    with pytest.raises(ValueError, match="num_mcmc_steps"):
        ps.smc.hmc_smc(key, model, y, 10, num_mcmc_steps=0)
    with pytest.raises(ValueError, match="emissions"):
        ps.smc.hmc_smc(key, model, np.asarray(y)[:, :1], 10)
