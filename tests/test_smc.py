"""Particle engines against exact answers (Kalman filter / RTS smoother on a linear-Gaussian model),
against `particles` 0.3 on stochastic volatility, and statistical tests of the resampling schemes.

Monte Carlo checks use fixed keys and independent replicates (a batch of copies of one sequence,
each copy gets its own key); tolerances are z-scores against the replicates' standard error.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import stats

import probssm as ps
from probssm.core.bounded import AbstractBoundedTransitionSSM
from probssm.inference.smc import resampling as rs
from probssm.core import params as P
from probssm.learn import score as score_mod

T, N, R = 20, 400, 48  # steps, particles, independent replicates
A = np.array([[0.9, 0.2], [-0.1, 0.8]])
H = np.array([[1.0, 0.0], [0.3, 1.0]])


class BoundedLGSSM(ps.models.LinearGaussianSSM, AbstractBoundedTransitionSSM):
    """The same linear-Gaussian model, declaring sup f = N(0; 0, Q) (accept-reject backward draws)."""

    def transition_log_bound(self, t, inputs=None):
        return -0.5 * jnp.linalg.slogdet(2 * jnp.pi * self.transition_cov)[1]


def lgssm(cls=ps.models.LinearGaussianSSM, dtype=np.float64):
    return cls(np.zeros(2, dtype), np.eye(2, dtype=dtype), A.astype(dtype), 0.3 * np.eye(2, dtype=dtype),
               H.astype(dtype), 0.5 * np.eye(2, dtype=dtype))


def z_scores(estimates, exact):
    """(mean over independent replicates - exact) / standard error of that mean."""
    e = np.asarray(estimates)
    return (e.mean(0) - np.asarray(exact)) / (e.std(0, ddof=1) / np.sqrt(e.shape[0]))


def batch(y, r=R):
    return jnp.broadcast_to(y, (r,) + y.shape)


def additive_moments():
    """h_0 = (z_0, 0), h_t = (z_t, z_t z_{t-1}^T): sum_t E[z_t] and sum_{t>=1} E[z_t z_{t-1}^T]."""
    return ps.smc.AdditiveFunctional(
        initial=lambda z, y, u: (z, jnp.zeros((2, 2), z.dtype)),
        step=lambda zp, z, t, y, u: (z, jnp.outer(z, zp)))


def exact_moments(sm):
    m = np.asarray(sm.smoothed_means)
    cross = np.asarray(sm.smoothed_cross_covs) + np.einsum("ti,tj->tij", m[1:], m[:-1])
    return m.sum(0), cross.sum(0)


@pytest.fixture(scope="module")
def lg():
    model = lgssm()
    _, y = ps.sample(jax.random.PRNGKey(0), model, T)
    y = y.at[7].set(jnp.nan)  # a missing step: weight one for every particle
    return model, y, ps.kalman.smoother(model, y)


@pytest.fixture(scope="module")
def pf_runs(lg):
    model, y, _ = lg
    return ps.smc.particle_filter(jax.random.PRNGKey(1), model, batch(y), N)


# ----------------------------------------------------------------------------------------------
# particle filters
# ----------------------------------------------------------------------------------------------
def test_likelihood_estimate_unbiased_and_filtering_means(lg, pf_runs):
    model, y, sm = lg
    ratio = np.exp(np.asarray(pf_runs.log_likelihood) - float(sm.log_likelihood))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(R)
    assert ratio.std() > 0  # the estimate is random: the test above has a finite standard error
    # 40 z-scores: P(max |z| > 4.5) < 3e-4 when unbiased (the O(1/N) bias is far below the SE here)
    assert np.abs(z_scores(pf_runs.filtered_means, sm.filtered_means)).max() < 4.5
    assert pf_runs.particles.shape == (R, T, N, 2) and pf_runs.ess.shape == (R, T)
    assert np.all(np.asarray(pf_runs.ess) <= N + 1e-9) and np.all(np.asarray(pf_runs.ess) >= 1 - 1e-9)


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "residual"])
def test_every_resampling_scheme_gives_an_unbiased_likelihood(lg, scheme):
    model, y, sm = lg
    res = ps.smc.particle_filter(jax.random.PRNGKey(2), model, batch(y, 256), 16, resampling=scheme,
                                 ess_threshold=1.0, history=False)
    ratio = np.exp(np.asarray(res.log_likelihood) - float(sm.log_likelihood))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(256)
    assert ratio.std() > 0.05  # small N: a wide distribution, so a biased weight update would show


def test_guided_and_auxiliary_filters_are_unbiased(lg):
    model, y, sm = lg
    Q = 0.3 * np.eye(2)

    def proposal(zp, t, yt, u):  # a deliberately wider proposal: weights must correct it
        if zp is None:
            return ps.models.lgssm.dist.MultivariateNormal(jnp.zeros(2), covariance_matrix=2.0 * jnp.eye(2))
        return ps.models.lgssm.dist.MultivariateNormal(A @ zp, covariance_matrix=2.0 * Q)

    def auxiliary(zp, t, yt, u):  # the exact predictive p(y_t | z_{t-1}) (fully adapted look-ahead)
        S = H @ Q @ H.T + 0.5 * np.eye(2)
        return ps.models.lgssm.dist.MultivariateNormal(H @ (A @ zp), covariance_matrix=S).log_prob(yt)

    for kw in (dict(proposal=proposal), dict(auxiliary=auxiliary)):
        res = ps.smc.particle_filter(jax.random.PRNGKey(3), model, batch(y, 256), 16, **kw)
        ratio = np.exp(np.asarray(res.log_likelihood) - float(sm.log_likelihood))
        assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(256), kw
        assert ratio.std() > 0.05


def test_all_weights_underflow_gives_minus_inf_not_nan():
    model = lgssm(dtype=np.float32)
    _, y = ps.sample(jax.random.PRNGKey(0), model, 10)
    y = y.astype(jnp.float32).at[4].set(3e19)  # (y - Hz)^2 overflows float32: every weight is zero
    res = ps.smc.particle_filter(jax.random.PRNGKey(1), model, y, 64)
    assert res.log_likelihood.dtype == jnp.float32 and float(res.log_likelihood) == -np.inf
    assert np.all(np.isfinite(np.asarray(res.filtered_means)))
    assert np.all(np.isfinite(np.asarray(res.log_weights)))
    # resampling from all -inf log-weights: uniform, valid indices
    a = rs.resample(jax.random.PRNGKey(2), jnp.full((8,), -jnp.inf), "systematic")
    assert np.array_equal(np.sort(np.asarray(a)), np.arange(8))


def test_float32_long_sequence():
    """float32, T = 1000: the log-likelihood estimate is consistent with Kalman's (lognormal correction)."""
    m = ps.models.LinearGaussianSSM(np.zeros(1), np.eye(1), 0.9 * np.eye(1), 0.5 * np.eye(1), np.eye(1),
                                    np.eye(1))
    _, y = ps.sample(jax.random.PRNGKey(5), m, 1000)
    exact = float(ps.kalman.filter(m, y).log_likelihood)
    m32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if hasattr(a, "astype") else a, m)
    res = ps.smc.particle_filter(jax.random.PRNGKey(6), m32, batch(y.astype(jnp.float32), 16), 500,
                                 history=False)
    ll = np.asarray(res.log_likelihood, np.float64)
    assert res.log_likelihood.dtype == jnp.float32 and res.filtered_means.dtype == jnp.float32
    # E[log Zhat] ~ log Z - Var/2 (CLT for the log-estimate)
    corrected = ll.mean() + ll.var(ddof=1) / 2
    assert abs(corrected - exact) < 4 * ll.std(ddof=1) / np.sqrt(16) + 0.01 * ll.var(ddof=1)
    assert np.abs(np.asarray(res.filtered_means, np.float64)[:, :, 0].mean(0)
                  - np.asarray(ps.kalman.filter(m, y).filtered_means)[:, 0]).max() < 0.25


def test_vmap_over_parameter_values():
    y = ps.sample(jax.random.PRNGKey(0), ps.models.StochasticVolatility(), 30)[1]
    rhos = jnp.array([0.5, 0.9, 0.95])
    ll = jax.vmap(lambda r: ps.smc.particle_filter(
        jax.random.PRNGKey(1), ps.models.StochasticVolatility(rho=r), y, 64, history=False).log_likelihood)(rhos)
    one = [float(ps.smc.particle_filter(jax.random.PRNGKey(1), ps.models.StochasticVolatility(rho=float(r)), y,
                                        64, history=False).log_likelihood) for r in rhos]
    np.testing.assert_allclose(np.asarray(ll), one, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(rs.SCHEMES))
def test_resampling_expected_offspring_chi_square(scheme):
    n, reps = 16, 4000
    w = np.array(jax.random.dirichlet(jax.random.PRNGKey(0), 0.7 * np.ones(n)))
    w[[3, 4, 11]] = 0.0
    w = w / w.sum()
    fn = jax.jit(jax.vmap(lambda k: jnp.bincount(rs.SCHEMES[scheme](k, jnp.asarray(w)), length=n)))
    counts = np.asarray(fn(jax.random.split(jax.random.PRNGKey(1), reps)))
    assert np.all(counts.sum(1) == n)
    assert np.all(counts[:, w == 0] == 0)  # zero weights: never an offspring
    observed = counts.sum(0)[w > 0]
    expected = reps * n * w[w > 0]
    # Pearson statistic of the pooled counts: chi2(k - 1) for multinomial, smaller for the
    # lower-variance schemes; a bias of 1% of N w_i would give ~ reps * n * 1e-4 * k >> the threshold
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert stats.chi2.sf(chi2, len(expected) - 1) > 1e-3, chi2
    if scheme == "systematic":  # each count is floor or ceil of N w_i
        assert np.all(np.abs(counts - n * w) < 1.0)


def test_particle_random_draws_per_key_and_standard():
    """The engines' bit generator: one key gives the same words batched (vmap, nested too) or
    alone; the float32 inverse-erf normals and the uniforms have the right law."""
    from probssm.inference.smc import common as C

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    batched = np.asarray(jax.jit(jax.vmap(lambda k: C.random_bits(k, (7,))))(keys))
    alone = np.stack([np.asarray(C.random_bits(k, (7,))) for k in keys])
    np.testing.assert_array_equal(batched, alone)
    assert len(np.unique(alone)) == alone.size
    nested = np.asarray(jax.vmap(jax.vmap(lambda k: C.random_bits(k, (7,))))(jnp.stack([keys, keys])))
    np.testing.assert_array_equal(nested[1], alone)
    n = 200_000
    z = np.asarray(C.standard_normal(jax.random.PRNGKey(1), (n,), jnp.float64))
    assert z.dtype == np.float64 and abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = np.asarray(C.uniform(jax.random.PRNGKey(2), (n,), jnp.float64))
    assert u.min() >= 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual"])
def test_resampling_offspring_unbiased_per_particle(scheme):
    """Mean offspring counts over fixed keys equal N w_i within 5 standard errors, particle by
    particle (zero weights included: never an offspring)."""
    n, reps = 32, 3000
    w = np.array(jax.random.dirichlet(jax.random.PRNGKey(5), 0.5 * np.ones(n)))
    w[[0, 7, 31]] = 0.0
    w = w / w.sum()
    fn = jax.jit(jax.vmap(lambda k: jnp.bincount(rs.SCHEMES[scheme](k, jnp.asarray(w)), length=n)))
    counts = np.asarray(fn(jax.random.split(jax.random.PRNGKey(6), reps)), np.float64)
    assert np.all(counts[:, w == 0] == 0)
    se = counts.std(0) / np.sqrt(reps)
    assert np.all(np.abs(counts.mean(0) - n * w) <= 5 * se + 1e-9)


@pytest.mark.parametrize("scheme", sorted(rs.SCHEMES))
def test_resampling_float32_cumulative_sums(scheme):
    """float32 weights whose running sum drifts from one (n = 2e5): counts sum to n, zeros get none."""
    n = 200_000
    w = jax.random.uniform(jax.random.PRNGKey(3), (n,), jnp.float32) ** 4
    w = w.at[::7].set(0.0).at[-5:].set(0.0)
    a = np.asarray(jax.jit(rs.SCHEMES[scheme])(jax.random.PRNGKey(4), w))
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() < n
    counts = np.bincount(a, minlength=n)
    wn = np.asarray(w, np.float64) / np.asarray(w, np.float64).sum()
    assert np.all(counts[wn == 0] == 0)
    # aggregate over 100 blocks of 2000 particles: offspring within 5 binomial SDs of n * block weight
    blocks = counts.reshape(100, -1).sum(1)
    expect = n * wn.reshape(100, -1).sum(1)
    assert np.all(np.abs(blocks - expect) < 5 * np.sqrt(expect) + 1)
    if scheme == "systematic":
        assert np.abs(counts - n * wn).max() < 1.0 + 1e-2


# ----------------------------------------------------------------------------------------------
# smoothing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "rejection"])
def test_backward_simulation_matches_rts(lg, pf_runs, method):
    model, y, sm = lg
    mdl = lgssm(BoundedLGSSM) if method == "rejection" else model
    paths = np.asarray(ps.smc.backward_sample(jax.random.PRNGKey(4), mdl, pf_runs, 32, method=method))
    assert paths.shape == (R, 32, T, 2)
    means = paths.mean(1)  # (R, T, 2) one estimate per independent replicate
    assert np.abs(z_scores(means, sm.smoothed_means)).max() < 4.5
    var = paths.var(1, ddof=1)
    exact_var = np.diagonal(np.asarray(sm.smoothed_covs), axis1=1, axis2=2)
    assert np.abs(z_scores(var, exact_var)).max() < 4.5
    lag1 = np.mean((paths[:, :, 1:] - paths[:, :, 1:].mean(1, keepdims=True))
                   * (paths[:, :, :-1] - paths[:, :, :-1].mean(1, keepdims=True)), axis=1) * 32 / 31
    exact_lag1 = np.diagonal(np.asarray(sm.smoothed_cross_covs), axis1=1, axis2=2)
    assert np.abs(z_scores(lag1, exact_lag1)).max() < 4.5


@pytest.fixture(scope="module")
def paris_runs(lg):
    model, y, sm = lg
    out = {}
    for method, mdl in (("exact", model), ("rejection", lgssm(BoundedLGSSM)), ("mcmc", model)):
        out[method] = ps.smc.paris(jax.random.PRNGKey(5), mdl, batch(y, 32), additive_moments(), 150,
                                   backward=method)
    return out


@pytest.mark.parametrize("method", ["exact", "rejection", "mcmc"])
def test_paris_additive_functionals_match_rts(lg, paris_runs, method):
    model, y, sm = lg
    sum_m, sum_cross = exact_moments(sm)
    est_m, est_cross = paris_runs[method].estimate
    assert np.abs(z_scores(est_m, sum_m)).max() < 4.5
    assert np.abs(z_scores(est_cross, sum_cross)).max() < 4.5
    # and the estimate is precise: its spread is small compared to the answer's scale
    assert np.all(np.asarray(est_cross).std(0) < 0.1 * (np.abs(sum_cross) + 10))


@pytest.mark.slow  # 32 PaRIS runs; CI checks the PaRIS score on an HMM (test_score_of_nested_hmm_parameters_...)
def test_paris_score_equals_grad_of_kalman_log_likelihood(lg):
    model, y, sm = lg
    spec = P.spec(model, ("transition_offset", "emission_offset"))
    params = P.to_unconstrained(model, spec)
    exact = jax.grad(lambda p: ps.kalman.filter(P.from_unconstrained(model, spec, p), y).log_likelihood)(params)
    functional = score_mod.score_functional(model, spec, params)
    # the public traceable core, inside our own jit / vmap
    fn = jax.jit(jax.vmap(lambda k: ps.smc.paris_sequence(k, model, y, additive_functional=functional,
                                                          num_particles=100, num_backward=2,
                                                          backward="exact").estimate))
    est = fn(jax.random.split(jax.random.PRNGKey(6), 32))
    for name in spec.paths:
        z = z_scores(est[name], exact[name])
        assert np.abs(z).max() < 4.5, (name, z)
    # score_estimate (public) runs and returns the same structure
    s, ll = score_mod.score_estimate(jax.random.PRNGKey(7), model, y, 100,
                                     fixed=("transition_offset", "emission_offset"))
    assert set(s) == set(spec.paths) and np.isfinite(float(ll))


def test_ppg_runs_and_tracks_the_smoothed_functional(lg):
    model, y, sm = lg
    sum_m, sum_cross = exact_moments(sm)
    res = ps.smc.ppg(jax.random.PRNGKey(8), model, y, additive_moments(), 64, 60, burn_in=10)
    tr_m = np.asarray(res.trace[0])
    assert tr_m.shape == (60, 2) and res.log_likelihood.shape == (60,) and res.reference.shape == (T, 2)
    # sweeps are a Markov chain: standard error from batch means (5 batches of 10 sweeps)
    bm = tr_m[10:].reshape(5, 10, 2).mean(1)
    assert np.abs(z_scores(bm, sum_m)).max() < 5.0
    np.testing.assert_allclose(np.asarray(res.estimate[0]), tr_m[10:].mean(0), rtol=1e-12)


def test_conditional_smc_keeps_the_reference():
    model = lgssm()
    _, y = ps.sample(jax.random.PRNGKey(0), model, T)
    ref = np.asarray(ps.kalman.smoother(model, y).smoothed_means)
    out = ps.smc.conditional_smc(jax.random.PRNGKey(9), model, y, ref, 16)
    np.testing.assert_allclose(np.asarray(out.filter.particles[:, 0]), ref, rtol=1e-12)
    assert out.reference.shape == (T, 2)
    # the new reference is one of the particle paths
    parts = np.asarray(out.filter.particles)
    assert all(np.any(np.all(parts[t] == np.asarray(out.reference[t]), axis=1)) for t in range(T))


# ----------------------------------------------------------------------------------------------
# stochastic volatility against particles 0.3
# ----------------------------------------------------------------------------------------------
def test_stochastic_volatility_log_likelihood_matches_particles():
    particles = pytest.importorskip("particles")
    from particles import state_space_models as ssms

    mu, rho, sigma, n, reps = -1.02, 0.9702, 0.178, 200, 40
    model = ps.models.StochasticVolatility(mu, rho, sigma)
    _, y = ps.sample(jax.random.PRNGKey(10), model, 100)
    ours = np.asarray(ps.smc.particle_filter(jax.random.PRNGKey(11), model, batch(y, reps), n,
                                             history=False).log_likelihood)
    np.random.seed(0)
    fk = ssms.Bootstrap(ssm=ssms.StochVol(mu=mu, rho=rho, sigma=sigma), data=np.asarray(y[:, 0]))
    theirs = []
    for _ in range(reps):
        alg = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=0.5, collect=[])
        alg.run()
        theirs.append(alg.logLt)
    theirs = np.asarray(theirs)
    se = np.sqrt(ours.var(ddof=1) / reps + theirs.var(ddof=1) / reps)
    assert abs(ours.mean() - theirs.mean()) < 4 * se
    assert se < 0.5  # a sharp comparison: the estimates themselves are precise


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error(lg):
    model, y, _ = lg
    key = jax.random.PRNGKey(0)
    f = additive_moments()
    with pytest.raises(ValueError, match="num_particles"):
        ps.smc.particle_filter(key, model, y, 1)
    with pytest.raises(ValueError, match="num_particles"):
        ps.smc.paris(key, model, y, f, 1)
    with pytest.raises(ValueError, match="num_particles"):
        ps.smc.ppg(key, model, y, f, 1, 5)
    for thr in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ess_threshold"):
            ps.smc.particle_filter(key, model, y, 10, ess_threshold=thr)
    with pytest.raises(ValueError, match="resampling"):
        ps.smc.particle_filter(key, model, y, 10, resampling="sytematic")
    bad = lambda zp, t, yt, u: ps.models.lgssm.dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3))
    with pytest.raises(ValueError, match="proposal"):
        ps.smc.particle_filter(key, model, y, 10, proposal=bad)
    with pytest.raises(ValueError, match="emissions"):
        ps.smc.particle_filter(key, model, y[:, :1], 10)
    with pytest.raises(ValueError, match="emissions"):
        ps.smc.particle_filter(key, model, y[:, 0], 10)
    with pytest.raises(ValueError, match="backward"):
        ps.smc.paris(key, model, y, f, 10, backward="rejection")  # no declared bound
    with pytest.raises(ValueError, match="num_backward"):
        ps.smc.paris(key, model, y, f, 10, num_backward=0)
    with pytest.raises(ValueError, match="additive_functional"):
        ps.smc.paris(key, model, y, 3.0, 10)
    with pytest.raises(ValueError, match="burn_in"):
        ps.smc.ppg(key, model, y, f, 10, 5, burn_in=5)
    with pytest.raises(ValueError, match="reference"):
        ps.smc.conditional_smc(key, model, y, np.zeros((T, 3)), 10)
    with pytest.raises(ValueError, match="filter_result"):
        ps.smc.backward_sample(key, model, ps.smc.particle_filter(key, model, y, 10, history=False))
    with pytest.raises(ValueError, match="estimator"):
        ps.learn.mle(model, y, 5, estimator="parris", key=key)
    with pytest.raises(ValueError, match="key"):
        ps.learn.mle(model, y, 5, estimator="paris")


# ----------------------------------------------------------------------------------------------
# slow: bias in N, PPG against PaRIS at equal cost, MLE against EM
# ----------------------------------------------------------------------------------------------
def _trace_cross(est):
    return np.trace(np.asarray(est[1]), axis1=-2, axis2=-1)


@pytest.mark.slow
def test_paris_bias_shrinks_like_one_over_n(lg):
    model, y, sm = lg
    exact = np.trace(exact_moments(sm)[1])
    reps, rows = 2000, []
    for n in (10, 20, 40):
        est = _trace_cross(ps.smc.paris(jax.random.PRNGKey(20 + n), model, batch(y, reps), additive_moments(), n,
                                        backward="exact").estimate)
        rows.append((n, est.mean() - exact, est.std(ddof=1) / np.sqrt(reps)))
    print("\nPaRIS bias of sum tr E[z_t z_{t-1}^T]:", [(n, round(b, 4), round(se, 4)) for n, b, se in rows])
    (n1, b1, s1), _, (n3, b3, s3) = rows
    assert abs(b1) > 4 * s1  # the bias is measurable at small N
    # N * bias is constant: (n1 b1) and (n3 b3) agree within 4 combined SE
    assert abs(n1 * b1 - n3 * b3) < 4 * np.hypot(n1 * s1, n3 * s3)


@pytest.mark.slow
def test_ppg_bias_below_paris_at_equal_cost(lg):
    """Equal cost: PaRIS averaged over K independent runs of N particles vs PPG, K sweeps of N particles."""
    model, y, sm = lg
    exact = np.trace(exact_moments(sm)[1])
    n, k, reps = 10, 30, 200
    f = additive_moments()
    paris = _trace_cross(ps.smc.paris(jax.random.PRNGKey(30), model, batch(y, reps * k), f, n,
                                      backward="exact").estimate).reshape(reps, k).mean(1)
    ppg = jax.jit(jax.vmap(lambda key: ps.smc.ppg_sequence(key, model, y, additive_functional=f, num_particles=n,
                                                           num_backward=2, num_iters=k, burn_in=5,
                                                           backward="exact").estimate))
    ppg_est = _trace_cross(ppg(jax.random.split(jax.random.PRNGKey(31), reps)))
    b_paris, se_paris = paris.mean() - exact, paris.std(ddof=1) / np.sqrt(reps)
    b_ppg, se_ppg = ppg_est.mean() - exact, ppg_est.std(ddof=1) / np.sqrt(reps)
    print(f"\nN={n}, K={k}: PaRIS bias {b_paris:.4f} (SE {se_paris:.4f}); PPG bias {b_ppg:.4f} (SE {se_ppg:.4f})")
    assert abs(b_paris) > 4 * se_paris
    assert abs(b_ppg) < abs(b_paris) - 2 * np.hypot(se_paris, se_ppg)


@pytest.mark.slow
@pytest.mark.parametrize("estimator, num_particles, backward, num_seeds", [
    # PaRIS's O(1/N) self-normalisation bias, summed over T = 300 steps, moves the fixed point of
    # the score ascent: measured transition_cov 0.479 (SE 0.004) against EM's 0.607 at N = 100.
    # Removing that bias is what PPG is for; this case documents it (strict: it must keep failing).
    pytest.param("paris", 100, "exact", 4,
                 marks=pytest.mark.xfail(strict=True, reason="PaRIS score bias at N=100, T=300")),
    ("paris", 1000, "mcmc", 2),  # ten times the particles: the bias shrinks below the tolerance
    ("ppg", 100, "exact", 4),
    ("hmc_smc", 100, "exact", 4),  # backward is a PaRIS / PPG setting, unused here
])
def test_particle_mle_matches_em(estimator, num_particles, backward, num_seeds):
    fixed = ("initial_mean", "initial_cov", "emission_matrix", "transition_offset", "emission_offset")
    truth = BoundedLGSSM(np.zeros(1), np.eye(1), 0.8 * np.eye(1), 0.5 * np.eye(1), np.eye(1), 0.3 * np.eye(1))
    _, y = ps.sample(jax.random.PRNGKey(40), truth, 300)
    start = BoundedLGSSM(np.zeros(1), np.eye(1), 0.5 * np.eye(1), 1.0 * np.eye(1), np.eye(1), 1.0 * np.eye(1))
    em_fit, _ = ps.learn.em(ps.models.LinearGaussianSSM(np.zeros(1), np.eye(1), 0.5 * np.eye(1), np.eye(1),
                                                        np.eye(1), np.eye(1)), y, 300, fixed=fixed)
    names = ("transition_matrix", "transition_cov", "emission_cov")
    em = np.array([float(getattr(em_fit, k).squeeze()) for k in names])
    fits = []
    for seed in range(num_seeds):
        fit, hist = ps.learn.mle(start, y, 300, estimator=estimator, key=jax.random.PRNGKey(seed),
                                 num_particles=num_particles, fixed=fixed, backward=backward, progress=False)
        fits.append([float(getattr(fit, k).squeeze()) for k in names])
    fits = np.asarray(fits)
    se = fits.std(0, ddof=1) / np.sqrt(num_seeds)
    print(f"\n{estimator}: EM {em}, particle MLE mean {fits.mean(0)} (SE {se})")
    # Monte Carlo error: spread over seeds; 0.02 floors it at the optimiser's final step size
    assert np.all(np.abs(fits.mean(0) - em) < 4 * se + 0.02)


# ----------------------------------------------------------------------------------------------
# discrete states (HMM), batches, ragged lengths, the public traceable cores
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hmm_data():
    hmm = ps.models.HMM(np.array([0.6, 0.4]), np.array([[0.85, 0.15], [0.2, 0.8]]),
                        ps.emissions.Gaussian(np.array([[-1.0], [1.0]]), 0.8 * np.ones((2, 1, 1))))
    _, y = ps.sample(jax.random.PRNGKey(0), hmm, T)
    y = y.at[5].set(jnp.nan)
    return hmm, y, ps.hmm.smoother(hmm, y), ps.hmm.filter(hmm, y)


def test_particle_filter_on_hmm_matches_forward_backward(hmm_data):
    """Regression: the particle engines on an HMM (integer states) raised TypeError (a float dummy
    state indexed the emission parameters). The estimate is unbiased for ps.hmm's exact p(y)."""
    hmm, y, sm, fb = hmm_data
    res = ps.smc.particle_filter(jax.random.PRNGKey(50), hmm, batch(y, 64), 50)
    assert res.particles.shape == (64, T, 50) and jnp.issubdtype(res.particles.dtype, jnp.integer)
    ll = np.asarray(res.log_likelihood)
    ratio = np.exp(ll - float(fb.log_likelihood))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(64)
    assert 0 < ll.std() < 1.0  # random, and reasonably precise at N = 50
    # filtered means of the integer state = p(z_t = 1 | y_{0:t})
    assert np.abs(z_scores(res.filtered_means, np.asarray(fb.filtered_probs)[:, 1])).max() < 4.5
    # backward simulation draws integer paths from p(z | y)
    paths = ps.smc.backward_sample(jax.random.PRNGKey(51), hmm, res, 16)
    assert paths.shape == (64, 16, T) and jnp.issubdtype(paths.dtype, jnp.integer)
    # per-replicate path frequencies of z_t = 1; where p = p(z_t = 1 | y) is ~0 or ~1 every replicate may
    # agree (zero spread), so the standard error gets the floor of 64 * 16 independent draws
    freq, p = np.asarray(paths).mean(1), np.asarray(sm.smoothed_probs)[:, 1]
    se = np.maximum(freq.std(0, ddof=1) / np.sqrt(64), np.sqrt(p * (1 - p) / (64 * 16)))
    assert np.all(np.abs(freq.mean(0) - p) < 4.5 * se)


def test_paris_ppg_csmc_on_hmm(hmm_data):
    hmm, y, sm, _ = hmm_data
    f = ps.smc.AdditiveFunctional(initial=lambda z, yy, u: (z == 1).astype(jnp.float64),
                                  step=lambda zp, z, t, yy, u: (z == 1).astype(jnp.float64))
    exact = float(np.asarray(sm.smoothed_probs)[:, 1].sum())
    est = ps.smc.paris(jax.random.PRNGKey(52), hmm, batch(y, 32), f, 50).estimate
    assert abs(float(z_scores(est, exact))) < 4.5
    res = ps.smc.ppg(jax.random.PRNGKey(53), hmm, y, f, 20, 20, burn_in=5)
    assert res.reference.shape == (T,) and jnp.issubdtype(res.reference.dtype, jnp.integer)
    assert abs(float(res.estimate) - exact) < 3.0
    ref = np.asarray(ps.hmm.viterbi(hmm, y))
    out = ps.smc.conditional_smc(jax.random.PRNGKey(54), hmm, y, ref, 8)
    np.testing.assert_array_equal(np.asarray(out.filter.particles[:, 0]), ref)
    assert jnp.issubdtype(out.reference.dtype, jnp.integer)


def _input_lgssm():
    return ps.models.LinearGaussianSSM(np.zeros(1), np.eye(1), 0.9 * np.eye(1), 0.3 * np.eye(1), np.eye(1),
                                       0.5 * np.eye(1), transition_input_matrix=np.eye(1))


def test_batch_of_size_T_with_per_sequence_inputs():
    """Regression: (B, T, U) inputs with B == T were read as one shared (T, U) input, and backward
    sampling closed over unbatched inputs. Each sequence of a batch gives what it gives alone."""
    model, n = _input_lgssm(), 5
    us = jax.random.normal(jax.random.PRNGKey(60), (n, n, 1)) * 3.0
    ys = jnp.stack([ps.sample(k, model, n, us[b])[1] for b, k in enumerate(jax.random.split(jax.random.PRNGKey(61), n))])
    key = jax.random.PRNGKey(62)
    pf = ps.smc.particle_filter(key, model, ys, 16, inputs=us)
    # backward sampling on a batched result (3 of the sequences: B != T) with per-sequence inputs
    sub = jax.tree_util.tree_map(lambda a: a[:3], pf)
    paths = ps.smc.backward_sample(jax.random.PRNGKey(63), model, sub, 4, inputs=us[:3])
    keys, bkeys = jax.random.split(key, n), jax.random.split(jax.random.PRNGKey(63), 3)
    for b in range(n):
        one = ps.smc.particle_filter(keys[b], model, ys[b], 16, inputs=us[b])
        np.testing.assert_allclose(float(pf.log_likelihood[b]), float(one.log_likelihood), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(pf.particles[b]), np.asarray(one.particles), rtol=1e-12)
        if b < 3:
            alone = ps.smc.backward_sample(bkeys[b], model, one, 4, inputs=us[b])
            np.testing.assert_allclose(np.asarray(paths[b]), np.asarray(alone), rtol=1e-12)
    # conditional SMC takes batches too: per-sequence references and inputs
    refs = jnp.zeros((n, n, 1))
    cs = ps.smc.conditional_smc(key, model, ys, refs, 8, inputs=us)
    for b in range(n):
        one = ps.smc.conditional_smc(keys[b], model, ys[b], refs[b], 8, inputs=us[b])
        np.testing.assert_allclose(np.asarray(cs.reference[b]), np.asarray(one.reference), rtol=1e-12)


def test_ragged_list_padding_is_missing_data(lg):
    """A list of sequences of different lengths: padding is missing data, so each sequence's
    log-likelihood estimate is unbiased for its own length, and PaRIS drops the padded terms."""
    model, y, sm = lg
    short = 12
    seqs = [y] * 32 + [y[:short]] * 32
    res = ps.smc.particle_filter(jax.random.PRNGKey(70), model, seqs, 64, history=False)
    for part, exact in ((slice(0, 32), sm.log_likelihood), (slice(32, 64), ps.kalman.filter(model, y[:short]).log_likelihood)):
        ratio = np.exp(np.asarray(res.log_likelihood[part]) - float(exact))
        assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(32)
    f = ps.smc.AdditiveFunctional(initial=lambda z, yy, u: z, step=lambda zp, z, t, yy, u: z)
    padded = jnp.concatenate([y[:short], jnp.full((T - short, 2), jnp.nan)])
    est = ps.smc.paris(jax.random.PRNGKey(71), model, batch(padded, 32), f, 50,
                       lengths=jnp.full((32,), short)).estimate
    exact = np.asarray(ps.kalman.smoother(model, y[:short]).smoothed_means).sum(0)
    assert np.abs(z_scores(est, exact)).max() < 4.5


def test_score_of_nested_hmm_parameters_matches_forward_backward(hmm_data):
    """The particle score covers parameters nested in sub-modules (the HMM's emission means),
    through ps.core.params paths; it matches the gradient of ps.hmm's exact log-likelihood."""
    hmm, y, _, _ = hmm_data
    spec = P.spec(hmm, fixed=("emissions.covs",))
    assert "emissions.means" in spec.paths
    params = P.to_unconstrained(hmm, spec)
    exact = jax.grad(lambda p: ps.hmm.filter(P.from_unconstrained(hmm, spec, p), y).log_likelihood)(params)
    functional = score_mod.score_functional(hmm, spec, params)
    est = jax.jit(jax.vmap(lambda k: ps.smc.paris_sequence(k, hmm, y, additive_functional=functional,
                                                           num_particles=50).estimate))(
        jax.random.split(jax.random.PRNGKey(80), 32))
    for name in spec.paths:
        assert np.abs(z_scores(est[name], exact[name])).max() < 4.5, name


def test_score_reaches_an_equinox_network_inside_the_model():
    import equinox as eqx

    class Dynamics(eqx.Module):
        mlp: eqx.nn.MLP

        def __call__(self, z, t, u):
            return 0.5 * z + self.mlp(z)

    mlp = eqx.nn.MLP(1, 1, 4, 1, key=jax.random.PRNGKey(90))
    mlp = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
    model = ps.models.NonlinearGaussianSSM(np.zeros(1), np.eye(1), Dynamics(mlp), 0.3 * np.eye(1),
                                           lambda z, t, u: z, 0.5 * np.eye(1))
    _, y = ps.sample(jax.random.PRNGKey(91), model, 10)
    fixed = ("initial_mean", "initial_cov", "transition_cov", "emission_cov")
    score, ll = score_mod.score_estimate(jax.random.PRNGKey(92), model, y, 20, fixed=fixed)
    assert "transition_fn.mlp.layers.0.weight" in score and np.isfinite(float(ll))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in score.values())
    # a ragged list of sequences: their scores add, padding carries no term
    fit, hist = score_mod.score_mle(model, [y, y[:6]], 3, key=jax.random.PRNGKey(93), num_particles=20,
                                   fixed=fixed, progress=False)
    assert hist.shape == (3,) and np.all(np.isfinite(np.asarray(hist)))
    assert not np.allclose(np.asarray(fit.transition_fn.mlp.layers[0].weight), np.asarray(mlp.layers[0].weight))
    np.testing.assert_array_equal(np.asarray(fit.transition_cov), np.asarray(model.transition_cov))
