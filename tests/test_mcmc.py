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
