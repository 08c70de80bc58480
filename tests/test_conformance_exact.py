"""Conformance of the exact and Gaussian-approximation engines (models: tests/conformance_models.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from conformance_models import (ADDITIVE, DISCRETE, LINEAR, MODELS, T, _first_coordinate_functional,
                                inputs_for, make_data)


@pytest.fixture(scope="module")
def data():
    return make_data()


# ----------------------------------------------------------------------------------------------
# Exact engines
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LINEAR)
def test_kalman_and_em_on_linear_gaussian_families(name, data):
    model, y, u = MODELS[name], data[name], inputs_for(name)
    s = ps.kalman.smoother(model, y, inputs=u)
    assert s.smoothed_means.shape == (T, model.state_dim) and np.isfinite(float(s.log_likelihood))
    draws = ps.kalman.sample(jax.random.PRNGKey(0), model, y, 3, inputs=u)
    assert draws.shape == (3, T, model.state_dim)
    fit, history = ps.learn.em(model, y, 5, inputs=u, progress=False)
    history = np.asarray(history)
    assert np.all(np.diff(history) >= -1e-8 * np.abs(history[1:]))
    fit, history = ps.learn.mle(model, y, 5, inputs=u, progress=False)
    assert np.isfinite(np.asarray(history)).all()


@pytest.mark.parametrize("name", DISCRETE)
def test_hmm_engine_and_em_on_discrete_families(name, data):
    model, y = MODELS[name], data[name]
    s = ps.hmm.smoother(model, y)
    np.testing.assert_allclose(np.asarray(s.smoothed_probs.sum(-1)), 1.0, atol=1e-10)
    assert ps.hmm.viterbi(model, y).shape == (T,)
    assert ps.hmm.sample(jax.random.PRNGKey(0), model, y, 2).shape == (2, T)
    fit, history = ps.learn.em(model, y, 3, progress=False)
    history = np.asarray(history)
    assert np.all(np.diff(history) >= -1e-8 * np.abs(history[1:]))


@pytest.mark.parametrize("name", ADDITIVE)
@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_gaussian_filters_on_additive_gaussian_families(name, method, data):
    model, y = MODELS[name], data[name]
    f = ps.gaussian.filter(model, y, method=method)
    assert f.filtered_means.shape == (T, model.state_dim) and np.isfinite(float(f.log_likelihood))
    if name == "lgssm":  # exact on a linear-Gaussian model
        k = ps.kalman.filter(model, y)
        np.testing.assert_allclose(float(f.log_likelihood), float(k.log_likelihood), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(f.filtered_means), np.asarray(k.filtered_means), atol=1e-10)


@pytest.mark.parametrize("name", ADDITIVE)
def test_imap_on_additive_gaussian_families(name, data):
    model, y = MODELS[name], data[name]
    f = ps.imap.filter_ssm(model, y, optimizer="adam", learning_rate=0.1, num_iters=5)
    assert f.filtered_means.shape == (T, model.state_dim)
    assert np.isfinite(np.asarray(f.filtered_means)).all()


# ----------------------------------------------------------------------------------------------
# Public cores compose with the user's jit / vmap; checks hold for models made by tree_at
# ----------------------------------------------------------------------------------------------
def test_public_cores_run_inside_jit_and_vmap(data):
    import equinox as eqx

    lg, y_lg = MODELS["lgssm"], data["lgssm"]
    hmm, y_hmm = MODELS["hmm_gaussian"], data["hmm_gaussian"]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    fn = _first_coordinate_functional("lgssm")

    @jax.jit
    def exact(y1, y2):
        params = lg.linear_gaussian_params(T)
        return (ps.kalman.filter_params(params, y1).log_likelihood
                + ps.hmm.filter_params(hmm.discrete_params(y2)).log_likelihood)

    want = float(ps.kalman.filter(lg, y_lg).log_likelihood + ps.hmm.filter(hmm, y_hmm).log_likelihood)
    np.testing.assert_allclose(float(exact(y_lg, y_hmm)), want, rtol=1e-12)

    @eqx.filter_jit
    def particles(k):
        pf = ps.smc.particle_filter_sequence(k, lg, y_lg, num_particles=16)
        paths = ps.smc.backward_sample_sequence(k, lg, pf, num_samples=2)
        est = ps.smc.paris_sequence(k, lg, y_lg, additive_functional=fn, num_particles=16).estimate
        c = ps.smc.conditional_smc_sequence(k, lg, y_lg, reference=paths[0], num_particles=16)
        g = ps.smc.ppg_sequence(k, lg, y_lg, additive_functional=fn, num_particles=16, num_iters=2).estimate
        z, y = ps.core.sample_sequence(k, lg, T)
        return pf.log_likelihood, paths, est, c.reference, g, y

    out = jax.vmap(particles)(keys)
    assert out[0].shape == (3,) and out[1].shape[:3] == (3, 2, T) and out[5].shape == (3, T, 1)
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.isfinite(np.asarray(leaf, float)).all()
    # vmap does not mix the keys: run 1 equals the filter run alone (the filter only: compiling the whole
    # unbatched program again cost a third of this test)
    one = jax.jit(lambda k: ps.smc.particle_filter_sequence(k, lg, y_lg, num_particles=16).log_likelihood)(keys[1])
    np.testing.assert_allclose(float(one), float(out[0][1]), rtol=1e-10)


def test_checks_run_where_inference_starts_on_models_made_by_tree_at(data):
    import equinox as eqx

    lg = eqx.tree_at(lambda m: m.emission_cov, MODELS["lgssm"], -jnp.eye(1))
    with pytest.raises(ValueError, match="emission_cov"):
        ps.kalman.filter(lg, data["lgssm"])
    with pytest.raises(ValueError, match="emission_cov"):
        ps.gaussian.filter(lg, data["lgssm"])
    hmm = eqx.tree_at(lambda m: m.transition_matrix, MODELS["hmm_gaussian"], jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.hmm.filter(hmm, data["hmm_gaussian"])
    with pytest.raises(ValueError, match="emissions"):
        ps.hmm.filter(MODELS["hmm_categorical"], jnp.full((T, 1), 3.0))   # label outside 0..2
