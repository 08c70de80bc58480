"""Bayesian inference over parameters with exact likelihoods (numpyro NUTS)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import probssm as ps
from probssm.learn import mcmc

T = 20
P1, R, S0 = 2.0, 1.5, 3.0  # level variance, noise variance, prior sd of the level's mean


def build(params):
    # A constant level z ~ N(mu, P1) seen through noise: y_t = z + N(0, R). mu is the parameter.
    return ps.models.LinearGaussianSSM(params["mu"][None], P1 * jnp.eye(1), jnp.eye(1), jnp.zeros((1, 1)),
                                       jnp.eye(1), R * jnp.eye(1))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z = 1.3 + np.sqrt(P1) * rng.normal()
    return z + np.sqrt(R) * rng.normal(size=(T, 1))


def exact_posterior(y):
    """y ~ N(mu 1, P1 11^T + R I), mu ~ N(0, S0^2): Gaussian posterior in closed form."""
    one = np.ones(T)
    cov = P1 * np.outer(one, one) + R * np.eye(T)
    prec = 1 / S0 ** 2 + one @ np.linalg.solve(cov, one)
    return (one @ np.linalg.solve(cov, y[:, 0])) / prec, np.sqrt(1 / prec)


def test_marginal_likelihood_distribution_is_exact(data):
    ssm = build({"mu": jnp.asarray(0.7)})
    d = mcmc.MarginalLikelihood(ssm, T)
    cov = P1 * np.ones((T, T)) + R * np.eye(T)
    from scipy.stats import multivariate_normal

    ref = multivariate_normal(0.7 * np.ones(T), cov).logpdf(data[:, 0])
    np.testing.assert_allclose(float(d.log_prob(jnp.asarray(data))), ref, rtol=1e-10)
    assert d.sample(jax.random.PRNGKey(0), (3,)).shape == (3, T, 1)


def test_nuts_matches_conjugate_posterior(data):
    mean, sd = exact_posterior(data)
    res = mcmc.nuts(jax.random.PRNGKey(1), build, {"mu": dist.Normal(0.0, S0)}, data, num_warmup=300,
                    num_samples=600, num_chains=1, draw_states=True)
    draws = np.asarray(res.samples["mu"]).ravel()
    import arviz as az

    idata = mcmc.to_arviz(res)
    summary = az.summary(idata, var_names=["mu"])
    ess = float(summary["ess_bulk"].iloc[0])
    # Monte Carlo standard error of the posterior mean from the effective sample size.
    assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(ess)
    # Standard deviation: relative standard error about 1/sqrt(2 ESS).
    assert abs(draws.std() / sd - 1) < 4 / np.sqrt(2 * ess)
    assert res.states.shape == (1, 600, T, 1)
    assert "states" in idata.posterior and idata.posterior["states"].dims[-2:] == ("time", "state")


def test_bad_input():
    y = np.zeros((5, 1))
    with pytest.raises(ValueError, match="priors"):
        mcmc.nuts(jax.random.PRNGKey(0), build, {"mu": 3.0}, y)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.nuts(jax.random.PRNGKey(0), build, {"mu": dist.Normal(0, 1)}, y, num_chains=0)
    with pytest.raises(ValueError, match="init_params"):
        mcmc.nuts(jax.random.PRNGKey(0), build, {"mu": dist.Normal(0, 1)}, y, init_params={"mu": np.nan})
    with pytest.raises(ValueError, match="init_params"):
        mcmc.nuts(jax.random.PRNGKey(0), lambda p: build({"mu": p["s"]}), {"s": dist.HalfNormal(1.0)}, y,
                  init_params={"s": -1.0})
    with pytest.raises(ValueError, match="ssm"):
        mcmc.MarginalLikelihood("not a model", 5)


# ---------------------------------------------------------------- particle MCMC
def small_lgssm():
    rng = np.random.default_rng(3)
    A = np.array([[0.9, 0.2], [-0.1, 0.8]])
    return ps.models.LinearGaussianSSM(np.zeros(2), np.eye(2), A, 0.3 * np.eye(2), rng.normal(size=(1, 2)),
                                       0.5 * np.eye(1))


def test_conditional_smc_leaves_the_smoothing_distribution_invariant():
    """Start M chains from exact smoothing draws; after one sweep each is still an exact draw."""
    model = small_lgssm()
    T, M, N = 15, 4000, 8
    _, y = ps.sample(jax.random.PRNGKey(0), model, T)
    sm = ps.kalman.smoother(model, y)
    refs = ps.kalman.sample(jax.random.PRNGKey(1), model, y, M)
    sweep = jax.jit(jax.vmap(lambda k, r: ps.smc.conditional_smc_sequence(k, model, y, reference=r, num_particles=N,
                                                                          ancestor_sampling=True).reference))
    out = np.asarray(sweep(jax.random.split(jax.random.PRNGKey(2), M), refs))
    assert not np.allclose(out, np.asarray(refs))  # the sweep moved the paths
    sd = np.sqrt(np.diagonal(np.asarray(sm.smoothed_covs), axis1=1, axis2=2))
    z_mean = (out.mean(0) - np.asarray(sm.smoothed_means)) / (sd / np.sqrt(M))
    # sample variance of M Gaussian draws: relative standard error sqrt(2 / (M - 1))
    z_var = (out.var(0, ddof=1) / sd ** 2 - 1) / np.sqrt(2 / (M - 1))
    # 30 z-scores each: P(max |z| > 4.5) < 3e-4 under invariance
    assert np.abs(z_mean).max() < 4.5, np.abs(z_mean).max()
    assert np.abs(z_var).max() < 4.5, np.abs(z_var).max()


def nile_setup():
    from statsmodels.datasets import nile

    y = nile.load_pandas().data["volume"].to_numpy(float)[:, None]

    def build_nile(p):
        return ps.models.LinearGaussianSSM(jnp.zeros(1), 1e7 * jnp.eye(1), jnp.eye(1), p["q"] * jnp.eye(1),
                                           jnp.eye(1), p["r"] * jnp.eye(1))

    priors = {"q": dist.HalfNormal(1e4), "r": dist.HalfNormal(5e4)}
    return y, build_nile, priors, {"q": 1500.0, "r": 15000.0}


def _z_between(res_a, res_b, name):
    import arviz as az

    a = az.summary(mcmc.to_arviz(res_a), var_names=[name])
    b = az.summary(mcmc.to_arviz(res_b), var_names=[name])
    return float((a["mean"].iloc[0] - b["mean"].iloc[0]) / np.hypot(a["mcse_mean"].iloc[0], b["mcse_mean"].iloc[0]))


@pytest.mark.slow
def test_pmmh_and_particle_gibbs_agree_with_nuts_on_nile():
    y, build_nile, priors, init = nile_setup()
    ref = mcmc.nuts(jax.random.PRNGKey(1), build_nile, priors, y, num_warmup=500, num_samples=2000, num_chains=2,
                    init_params=init, draw_states=False)
    pm = mcmc.pmmh(jax.random.PRNGKey(0), build_nile, priors, y, num_particles=200, num_warmup=1000,
                   num_samples=4000, num_chains=2, init_params=init)
    pg = mcmc.particle_gibbs(jax.random.PRNGKey(0), build_nile, priors, y, num_particles=50, num_warmup=500,
                             num_samples=2000, num_chains=2, init_params=init)
    for name in ("q", "r"):
        assert abs(_z_between(pm, ref, name)) < 2.0
        assert abs(_z_between(pg, ref, name)) < 2.0


def test_particle_samplers_run_and_convert_to_arviz():
    import arviz as az

    y, build_nile, priors, init = nile_setup()
    # pmmh's run on one sequence with two chains and its ArviZ summary: in test_particle_samplers_take_ragged_batches
    # (one compiled pmmh call for both tests; one-sequence pmmh runs in test_conformance_particles and
    # test_mcmc_ergonomics)
    y = y[:40]
    pg = mcmc.particle_gibbs(jax.random.PRNGKey(0), build_nile, priors, y, num_particles=10, num_warmup=20,
                             num_samples=50, num_chains=2, init_params=init)
    assert pg.states.shape == (2, 50, 40, 1) and np.all(np.isfinite(pg.states))
    summary = az.summary(mcmc.to_arviz(pg), var_names=["q", "r"])
    assert np.all(summary["sd"] > 0)
    assert np.all(np.asarray(pg.samples["q"]) > 0)
    idata = mcmc.to_arviz(pg, time_coords=np.arange(1871, 1911))
    assert idata.posterior["states"].dims == ("chain", "draw", "time", "state")
    assert int(idata.posterior["time"][0]) == 1871


def test_particle_samplers_take_ragged_batches():
    """pmmh and particle Gibbs on a list of sequences that share the parameters (padding is missing data)."""
    y, build_nile, priors, init = nile_setup()
    seqs = [y[:30], y[30:50]]
    import arviz as az

    pm = mcmc.pmmh(jax.random.PRNGKey(0), build_nile, priors, seqs, num_particles=50, num_warmup=50,
                   num_samples=100, num_chains=2, init_params=init)
    pg = mcmc.particle_gibbs(jax.random.PRNGKey(0), build_nile, priors, seqs, num_particles=8, num_warmup=5,
                             num_samples=10, num_chains=1, init_params=init)
    assert pm.samples["q"].shape == (2, 100) and np.all(np.isfinite(np.asarray(pm.log_likelihood)))
    assert 0.0 < float(pm.stats["accepted"].mean()) < 1.0
    summary = az.summary(mcmc.to_arviz(pm), var_names=["q", "r"])
    assert np.all(summary["sd"] > 0) and np.all(np.asarray(pm.samples["q"]) > 0)
    assert pg.states.shape == (1, 10, 2, 30, 1) and np.all(np.isfinite(np.asarray(pg.states)))
    assert np.all(np.asarray(pg.samples["r"]) > 0)


def test_particle_samplers_bad_input():
    y, build_nile, priors, init = nile_setup()
    for fn in (mcmc.pmmh, mcmc.particle_gibbs):
        with pytest.raises(ValueError, match="num_particles"):
            fn(jax.random.PRNGKey(0), build_nile, priors, y, num_particles=1)
        with pytest.raises(ValueError, match="num_chains"):
            fn(jax.random.PRNGKey(0), build_nile, priors, y, num_chains=0)
        with pytest.raises(ValueError, match="init_params"):
            fn(jax.random.PRNGKey(0), build_nile, priors, y, init_params={"q": -1.0, "r": 1.0})
        with pytest.raises(ValueError, match="init_params"):
            fn(jax.random.PRNGKey(0), build_nile, priors, y, init_params={"q": np.inf})
        with pytest.raises(ValueError, match="priors"):
            fn(jax.random.PRNGKey(0), build_nile, {"q": 1.0}, y)
        with pytest.raises(ValueError, match="emissions"):  # a 1-D series is read as (T, 1): a wrong width
            fn(jax.random.PRNGKey(0), build_nile, priors, np.hstack([y, y]))
        with pytest.raises(ValueError, match="support"):  # a Normal prior on a variance
            fn(jax.random.PRNGKey(0), build_nile, {"q": dist.Normal(0.0, 1e3), "r": priors["r"]}, y)
    with pytest.raises(ValueError, match="support"):
        mcmc.nuts(jax.random.PRNGKey(0), build_nile, {"q": dist.Normal(0.0, 1e3), "r": priors["r"]}, y)
    with pytest.raises(ValueError, match="support"):
        mcmc.log_density(build_nile, {"q": dist.Normal(0.0, 1e3), "r": priors["r"]}, y)


def test_numpyro_svi_on_marginal_likelihood_finds_the_posterior_mode(data):
    """A numpyro model with MarginalLikelihood as its observation site works with SVI (AutoDelta = MAP)."""
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoDelta

    mean, _ = exact_posterior(data)  # Gaussian posterior: mode = mean
    model = mcmc.numpyro_model(build, {"mu": dist.Normal(0.0, S0)}, data)
    svi = SVI(model, AutoDelta(model), numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 1500, progress_bar=False)
    np.testing.assert_allclose(float(result.params["mu_auto_loc"]), mean, rtol=1e-4)
