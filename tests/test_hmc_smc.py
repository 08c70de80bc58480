"""HMC-SMC against the Kalman filter (exact answers), including a regime where the bootstrap filter degenerates."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import equinox as eqx

import probssm as ps
from probssm.core import params as P
from probssm.learn.score import score_functional

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


# ----------------------------------------------------------------------------------------------
# additive functionals along the particle paths (the "hmc_smc" score of ps.learn.mle)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_along_the_paths_matches_the_kalman_gradient(informative_data):
    """Fisher's identity in the informative regime: the path-space sum of grad log p(z, y) against
    jax.grad of the Kalman log-likelihood; z-scores over R independent runs."""
    model, y = informative_data
    spec = P.spec(model, ("transition_offset", "emission_offset"))
    params = P.to_unconstrained(model, spec)
    exact = jax.grad(lambda p: ps.kalman.filter(P.from_unconstrained(model, spec, p), y).log_likelihood)(params)
    est = runs(model, y, key=5, additive_functional=score_functional(model, spec, params)).estimate
    for name in spec.paths:
        z = z_scores(est[name], exact[name])
        assert np.abs(z).max() < 4.5, (name, z)


def _count_and_state():
    """h_0 = (1, z_0), h_t = (1, z_t): the count is exact whatever the particles do."""
    return ps.smc.AdditiveFunctional(initial=lambda z, y, u: (jnp.ones((), z.dtype), z),
                                     step=lambda zp, z, t, y, u: (jnp.ones((), z.dtype), z))


def test_functional_sums_every_step_and_drops_the_padding(informative_data):
    model, y = informative_data
    padded = jnp.stack([y, y.at[12:].set(0.0)])
    res = ps.smc.hmc_smc(jax.random.PRNGKey(3), model, padded, 16, max_stages=3, lengths=jnp.array([T, 12]),
                         additive_functional=_count_and_state())
    count, states = res.estimate
    np.testing.assert_array_equal(np.asarray(count), [T, 12])
    assert states.shape == (2, 2) and np.all(np.isfinite(np.asarray(states)))
    # without a functional there is no estimate
    assert ps.smc.hmc_smc(jax.random.PRNGKey(3), model, y, 16, max_stages=3).estimate is None


def test_sequence_core_inside_jit_vmap_equals_the_public_function(informative_data):
    model, y = informative_data
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    f = _count_and_state()
    core = jax.jit(jax.vmap(lambda k: ps.smc.hmc_smc_sequence(k, model, y, num_particles=16, max_stages=3,
                                                              additive_functional=f)))(keys)
    for i in range(2):
        one = ps.smc.hmc_smc(keys[i], model, y, 16, max_stages=3, additive_functional=f)
        np.testing.assert_allclose(np.asarray(core.log_likelihood[i]), np.asarray(one.log_likelihood), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(core.estimate[1][i]), np.asarray(one.estimate[1]), rtol=1e-10)


def test_functional_and_score_bad_input(informative_data):
    model, y = informative_data
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="additive_functional"):
        ps.smc.hmc_smc(key, model, y, 10, additive_functional=3.0)
    with pytest.raises(ValueError, match="num_particles"):
        ps.smc.hmc_smc_sequence(key, model, y, num_particles=1)
    with pytest.raises(ValueError, match="step_size"):
        ps.smc.hmc_smc_sequence(key, model, y, num_particles=8, step_size=0.0)
    # every entry point checks the model it is given, also one made by eqx.tree_at
    bad = eqx.tree_at(lambda m: m.transition_cov, model, -np.eye(2))
    with pytest.raises(ValueError, match="transition_cov"):
        ps.learn.mle(bad, y, 5, estimator="hmc_smc", key=key)
    with pytest.raises(ValueError, match="transition_cov"):
        ps.smc.hmc_smc(key, bad, y, 10, additive_functional=_count_and_state())
    with pytest.raises(ValueError, match="transition_cov"):
        ps.smc.hmc_smc_sequence(key, bad, y, num_particles=10, additive_functional=_count_and_state())
    hmm = ps.models.HMM(np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.1, 0.9]]),
                        ps.emissions.Gaussian(np.zeros((2, 2)), np.ones((2, 2, 2)) * np.eye(2)))
    with pytest.raises(ValueError, match="model"):
        ps.learn.mle(hmm, y, 5, estimator="hmc_smc", key=key)
