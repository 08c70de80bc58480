"""Simulation-based calibration of NUTS on the exact likelihood (local-level model). Slow: `make test-all`."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from scipy import stats

import probssm as ps

NUM_REPS, T, NUM_DRAWS, THIN = 500, 50, 990, 10  # 99 thinned draws: ranks 0..99, 10 equal bins
PRIORS = {"q": dist.HalfNormal(1.0), "r": dist.HalfNormal(1.0)}


def build(p):
    return ps.models.LinearGaussianSSM(jnp.zeros(1), 10.0 * jnp.eye(1), jnp.eye(1), p["q"] * jnp.eye(1),
                                       jnp.eye(1), p["r"] * jnp.eye(1))


def one_replication(key):
    """theta ~ prior, y ~ p(y | theta), posterior draws by blackjax NUTS on `ps.mcmc.log_density`; ranks."""
    import blackjax

    k_theta, k_y, k_adapt, k_run = jax.random.split(key, 4)
    kq, kr = jax.random.split(k_theta)
    theta = {"q": PRIORS["q"].sample(kq), "r": PRIORS["r"].sample(kr)}
    _, y = ps.core.protocol.sample_sequence(k_y, build(theta), T, None)
    logdensity, to_constrained = ps.mcmc.log_density(build, PRIORS, y)
    u0 = {"q": jnp.zeros(()), "r": jnp.zeros(())}
    warmup = blackjax.window_adaptation(blackjax.nuts, logdensity)
    (state, params), _ = warmup.run(k_adapt, u0, num_steps=500)
    kernel = blackjax.nuts(logdensity, **params).step

    def step(state, k):
        state, _ = kernel(k, state)
        return state, state.position

    _, us = jax.lax.scan(step, state, jax.random.split(k_run, NUM_DRAWS))
    draws = to_constrained(jax.tree_util.tree_map(lambda a: a[::THIN], us))
    return {k: jnp.sum(draws[k] < theta[k]) for k in PRIORS}  # rank in 0..NUM_DRAWS // THIN


@pytest.mark.slow
def test_simulation_based_calibration_local_level():
    keys = jax.random.split(jax.random.PRNGKey(2024), NUM_REPS)
    ranks = jax.jit(jax.vmap(one_replication))(keys)
    num_ranks = NUM_DRAWS // THIN + 1
    for name, r in ranks.items():
        counts = np.bincount(np.asarray(r) * 10 // num_ranks, minlength=10)  # 10 equal-width bins of ranks
        p = stats.chisquare(counts).pvalue
        print(f"SBC {name}: bin counts {counts.tolist()}, chi-square p = {p:.3f}")
        assert p > 0.01
