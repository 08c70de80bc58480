"""ps.mcmc ergonomics: compiled once per model structure (trace counts), the pointwise
log-likelihood in ArviZ's log_likelihood group (az.loo / az.waic), MarginalLikelihood's
num_timesteps, and progress bars that move while a compiled fit runs."""
import time

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import probssm as ps
from probssm.core import progress as prog
from probssm.learn import mcmc

T = 30
TRACES = {"build": 0}


def local_level(params):
    """Local level: z_t = z_{t-1} + N(0, q), y_t = z_t + N(0, r)."""
    if isinstance(params["q"], jax.core.Tracer):
        TRACES["build"] += 1  # a Python side effect: runs only when JAX traces the builder
    return ps.models.LinearGaussianSSM(jnp.zeros(1), 10.0 * jnp.eye(1), jnp.eye(1), params["q"] * jnp.eye(1),
                                       jnp.eye(1), params["r"] * jnp.eye(1))


def series(seed):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(T, 1)), 0) + 0.7 * rng.normal(size=(T, 1))


PRIORS = {"q": dist.HalfNormal(2.0), "r": dist.HalfNormal(2.0)}
SETTINGS = dict(num_warmup=60, num_samples=60, num_chains=2)


@pytest.fixture(scope="module")
def first_fit():
    return mcmc.nuts(jax.random.key(0), local_level, PRIORS, series(0), **SETTINGS)


def test_nuts_second_call_does_not_recompile(first_fit):
    traces, cache = TRACES["build"], mcmc._nuts_core._cache_size()
    assert traces > 0 and cache >= 1
    # new data of the same shape, new prior hyperparameters, a new key: same structure
    priors = {"q": dist.HalfNormal(3.0), "r": dist.HalfNormal(1.5)}
    t0 = time.perf_counter()
    res = mcmc.nuts(jax.random.key(1), local_level, priors, series(1), **SETTINGS)
    elapsed = time.perf_counter() - t0
    assert TRACES["build"] == traces, "the second nuts call traced the model again (recompiled)"
    assert mcmc._nuts_core._cache_size() == cache
    assert elapsed < 10.0  # the first call compiles for 10-60 s; the second only runs
    assert not np.allclose(res.samples["q"], first_fit.samples["q"])
    assert res.samples["q"].shape == (2, 60) and res.states.shape == (2, 60, T, 1)
    np.testing.assert_allclose(np.asarray(res.pointwise_log_likelihood).sum(-1), res.log_likelihood, rtol=1e-9)


def test_pmmh_second_call_does_not_recompile():
    kw = dict(num_particles=16, num_warmup=5, num_samples=5, num_chains=1)
    mcmc.pmmh(jax.random.key(0), local_level, PRIORS, series(0), **kw)
    traces, cache = TRACES["build"], mcmc._pmmh_core._cache_size()
    mcmc.pmmh(jax.random.key(1), local_level, {"q": dist.HalfNormal(1.0), "r": dist.HalfNormal(1.0)}, series(1),
              **kw)
    assert TRACES["build"] == traces and mcmc._pmmh_core._cache_size() == cache


def test_loo_and_waic_run(first_fit):
    import arviz as az

    idata = mcmc.to_arviz(first_fit)
    assert "log_likelihood" in idata.groups()
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "time") and ll.shape == (2, 60, T)
    loo = az.loo(idata)
    waic = az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(loo.p_loo)
    assert np.isfinite(waic.elpd_waic) and np.isfinite(waic.p_waic)
    # the pointwise terms are the one-step-ahead predictive log-densities of the exact filter
    theta = {k: v[0, 0] for k, v in first_fit.samples.items()}
    full = ps.kalman.filter(local_level(theta), series(0)).log_likelihood
    first5 = ps.kalman.filter(local_level(theta), series(0)[:5]).log_likelihood
    np.testing.assert_allclose(float(ll[0, 0].sum()), float(full), rtol=1e-9)
    np.testing.assert_allclose(float(ll[0, 0, :5].sum()), float(first5), rtol=1e-9)


def test_pointwise_batch_and_missing():
    y = series(2)
    y_nan = y.copy()
    y_nan[4] = np.nan
    samples = {"q": jnp.full((1, 2), 0.8), "r": jnp.full((1, 2), 0.5)}
    out = mcmc.pointwise_log_likelihood(local_level, samples, [y, y_nan[:20]])
    assert out.shape == (1, 2, 2, T)
    out = np.asarray(out)
    assert out[0, 0, 1, 4] == 0.0 and np.all(out[0, 0, 1, 20:] == 0.0)
    exact = ps.kalman.filter(local_level({"q": 0.8, "r": 0.5}), y_nan[:20]).log_likelihood
    np.testing.assert_allclose(out[0, 0, 1].sum(), float(exact), rtol=1e-9)


def test_marginal_likelihood_needs_num_timesteps():
    ssm = local_level({"q": jnp.asarray(1.0), "r": jnp.asarray(1.0)})
    with pytest.raises(ValueError, match="^num_timesteps: required"):
        mcmc.MarginalLikelihood(ssm)
    with pytest.raises(ValueError, match="^num_timesteps"):
        mcmc.MarginalLikelihood(ssm, 0)
    with pytest.raises(ValueError, match="^num_timesteps"):
        mcmc.MarginalLikelihood(ssm, 2.5)
    assert mcmc.MarginalLikelihood(ssm, num_timesteps=T).event_shape == (T, 1)
    assert "num_timesteps" in mcmc.MarginalLikelihood.__doc__ and "Example" in mcmc.MarginalLikelihood.__doc__


def test_build_must_be_hashable():
    class Unhashable:
        __hash__ = None

        def __call__(self, params):
            return local_level(params)

    with pytest.raises(ValueError, match="^build"):
        mcmc.nuts(jax.random.key(0), Unhashable(), PRIORS, series(0))


class RecordingBar:
    """Stands in for tqdm: records when each update reaches the host."""

    def __init__(self, *args, **kwargs):
        self.n, self.times = 0, []
        RecordingBar.last = self

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, k):
        self.n += k
        self.times.append(time.perf_counter())

    def close(self):
        pass


def test_progress_bar_moves_while_the_compiled_fit_runs(monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    K, n_iter = 3, 300
    model = ps.models.HMM(np.full(K, 1.0 / K), np.full((K, K), 0.1) + 0.7 * np.eye(K),
                          ps.emissions.Gaussian(np.array([[-2.0], [0.0], [2.0]]), np.stack([np.eye(1)] * K)))
    _, y = ps.sample(jax.random.key(0), model, 3000)
    fit = lambda: ps.learn.baum_welch(model, y, n_iter, progress=True, tol=None)  # noqa: E731
    fit()  # compile (the same static flags as below)
    t0 = time.perf_counter()
    _, hist = fit()
    jax.block_until_ready(hist)
    t1 = time.perf_counter()
    times = np.asarray(RecordingBar.last.times)
    assert RecordingBar.last.n == n_iter and len(times) >= 50
    # the first update arrives early in the run and the updates are spread over it: not all at the end
    assert times[0] - t0 < 0.3 * (t1 - t0), (times[0] - t0, t1 - t0)
    assert times[len(times) // 2] - t0 < 0.8 * (t1 - t0)


def test_progress_tick_tolerates_batched_and_out_of_order_reports():
    bar = RecordingBar()
    prog._ACTIVE.append(bar)
    try:
        prog._tick(np.asarray([4, 9]), np.asarray([1.0, np.nan]))
        prog._tick(np.asarray(2), np.asarray(0.5))
    finally:
        prog._ACTIVE.remove(bar)
    assert bar.n == 10
