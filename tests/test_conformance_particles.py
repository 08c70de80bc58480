"""Conformance of the particle engines on every family, against the exact oracles where they exist
(models: tests/conformance_models.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from conformance_models import (MODELS, N, R, T, _first_coordinate_functional,
                                exact_functional, exact_log_likelihood, inputs_for, make_data)


# CI runs the smoothers on one family of each kind (exact linear-Gaussian oracle, exact discrete
# oracle, a nonlinear additive model, a user-written SSM); `make test-all` runs every family.
CI_FAMILIES = ("lgssm", "hmm_categorical", "nonlinear", "user_ssm")
EVERY_FAMILY = [name if name in CI_FAMILIES else pytest.param(name, marks=pytest.mark.slow) for name in MODELS]


@pytest.fixture(scope="module")
def data():
    return make_data()


# ----------------------------------------------------------------------------------------------
# Particle engines on every family
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_particle_filter_is_unbiased_against_the_exact_oracle(name, data):
    """exp(log Z_hat) is unbiased for p(y): the mean of Z_hat / Z over R runs is 1 within
    4 standard errors (families without an exact oracle: finite and consistent)."""
    model, y, u = MODELS[name], data[name], inputs_for(name)
    ys = jnp.broadcast_to(y, (R,) + y.shape)
    pf = ps.smc.particle_filter(jax.random.PRNGKey(7), model, ys, N, inputs=u)
    lls = np.asarray(pf.log_likelihood)
    assert lls.shape == (R,) and np.isfinite(lls).all()
    assert pf.particles.shape[:3] == (R, T, N)
    exact = exact_log_likelihood(name, y)
    if exact is None:  # no free oracle here (test_smc checks these against `particles`): independent runs
        assert np.unique(lls).size == R
        return
    ratio = np.exp(lls - exact)
    se = np.std(ratio, ddof=1) / np.sqrt(R)
    assert abs(ratio.mean() - 1.0) < 4 * se + 1e-12, (ratio.mean(), se)
    assert abs(np.mean(lls) - exact) < 0.5  # and not merely unbiased with a wild spread


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_paris_and_ppg_smooth_every_family(name, data):
    model, y, u = MODELS[name], data[name], inputs_for(name)
    fn = _first_coordinate_functional(name)
    ys = jnp.broadcast_to(y, (R,) + y.shape)
    est = np.asarray(ps.smc.paris(jax.random.PRNGKey(8), model, ys, fn, N, inputs=u).estimate)
    assert est.shape == (R,) and np.isfinite(est).all()
    exact = exact_functional(name, y)
    if exact is not None:
        se = np.std(est, ddof=1) / np.sqrt(R)
        # PaRIS is consistent with an O(1/N) bias; allow it on top of 4 standard errors.
        assert abs(est.mean() - exact) < 4 * se + 0.02 * T / np.sqrt(N), (est.mean(), exact, se)
    g = ps.smc.ppg(jax.random.PRNGKey(9), model, y, fn, 32, 4, inputs=u)
    assert np.isfinite(np.asarray(g.estimate)).all()


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_backward_sampling_and_conditional_smc_on_every_family(name, data):
    model, y, u = MODELS[name], data[name], inputs_for(name)
    pf = ps.smc.particle_filter(jax.random.PRNGKey(1), model, y, 64, inputs=u)
    paths = ps.smc.backward_sample(jax.random.PRNGKey(2), model, pf, 4, inputs=u)
    assert paths.shape[:2] == (4, T)
    ref = paths[0]
    c = ps.smc.conditional_smc(jax.random.PRNGKey(3), model, y, ref, 32, inputs=u)
    assert c.reference.shape[0] == T
    assert np.isfinite(np.asarray(c.filter.log_likelihood)).all()


@pytest.mark.parametrize("name", ("lgssm", "nonlinear", "user_additive", "stochastic_volatility"))
def test_hmc_smc_on_continuous_families(name, data):
    model, y = MODELS[name], data[name]
    r = ps.smc.hmc_smc(jax.random.PRNGKey(4), model, y, 64)
    assert np.isfinite(float(r.log_likelihood))


def _shifted(name, shift):
    """The family's model with one parameter moved by ``shift`` (a builder for the samplers)."""
    import equinox as eqx

    model = MODELS[name]
    if name == "hmm_gaussian":
        return eqx.tree_at(lambda m: m.emissions.means, model, model.emissions.means + shift)
    return eqx.tree_at(lambda m: m.initial_mean, model, model.initial_mean + shift)


@pytest.mark.parametrize("name", (pytest.param("hmm_gaussian", marks=pytest.mark.slow), "nonlinear"))
def test_parameter_samplers_on_discrete_and_nonlinear_families(name, data):
    import numpyro.distributions as dist

    y = data[name]
    build = lambda p: _shifted(name, p["shift"])  # noqa: E731
    priors = {"shift": dist.Normal(0.0, 1.0)}
    pm = ps.mcmc.pmmh(jax.random.PRNGKey(0), build, priors, y, num_particles=16, num_warmup=5, num_samples=10,
                      num_chains=1, init_params={"shift": 0.0})
    pg = ps.mcmc.particle_gibbs(jax.random.PRNGKey(1), build, priors, y, num_particles=8, num_warmup=3,
                                num_samples=5, num_chains=1, init_params={"shift": 0.0})
    assert np.isfinite(np.asarray(pm.samples["shift"])).all() and pm.samples["shift"].shape == (1, 10)
    assert np.isfinite(np.asarray(pg.samples["shift"])).all() and pg.states.shape[:3] == (1, 5, T)
    if name == "hmm_gaussian":  # an exact likelihood: NUTS too
        nu = ps.mcmc.nuts(jax.random.PRNGKey(2), build, priors, y, num_warmup=20, num_samples=20, num_chains=1)
        assert np.isfinite(np.asarray(nu.samples["shift"])).all() and nu.states.shape[:3] == (1, 20, T)
