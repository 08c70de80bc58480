"""ps.smc.smoother, the one-call particle smoother, against the exact smoothers (RTS on a small
linear-Gaussian model, forward-backward on an HMM), under jit, on batches and ragged lists; and the
particle engines' refusal of +-inf data.

Monte Carlo checks use fixed keys and R independent replicates (a batch of copies of one sequence,
each copy with its own key): z-scores of the replicates' mean against the exact answer, with the
standard error from the replicates' spread.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import equinox as eqx

import probssm as ps

T, N, R, M = 15, 128, 16, 64  # steps, particles, replicates, ffbsi trajectories
A = np.array([[0.9, 0.2], [-0.1, 0.8]])
H = np.array([[1.0, 0.0], [0.3, 1.0]])
METHODS = ("ffbsi", "ffbsm", "paris", "genealogy")


def lgssm():
    return ps.models.LinearGaussianSSM(np.zeros(2), np.eye(2), A, 0.3 * np.eye(2), H, 0.5 * np.eye(2))


def hmm():
    pi = np.array([0.5, 0.3, 0.2])
    trans = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    return ps.models.HMM(pi, trans, ps.emissions.Gaussian(np.array([[-1.0], [0.0], [1.5]]),
                                                           np.stack([0.5 * np.eye(1)] * 3)))


def z_scores(estimates, exact, floor=0.0):
    """(mean over replicates - exact) / standard error of that mean (sd floored at ``floor``)."""
    e = np.asarray(estimates)
    sd = np.maximum(e.std(0, ddof=1), floor)
    return (e.mean(0) - np.asarray(exact)) / (sd / np.sqrt(e.shape[0]))


@pytest.fixture(scope="module")
def lg_data():
    model = lgssm()
    _, y = ps.sample(jax.random.key(0), model, T)
    return model, y, ps.kalman.smoother(model, y)


@pytest.mark.parametrize("method", METHODS)
def test_lgssm_against_kalman(lg_data, method):
    model, y, exact = lg_data
    sm = ps.smc.smoother(jax.random.key(1), model, jnp.broadcast_to(y, (R,) + y.shape), N, method=method,
                         **({"num_samples": M} if method == "ffbsi" else {}))
    assert sm.smoothed_means.shape == (R, T, 2) and sm.smoothed_covs.shape == (R, T, 2, 2)
    assert np.all(np.isfinite(sm.log_likelihood))
    z = z_scores(sm.smoothed_means, exact.smoothed_means)
    assert np.abs(z).max() < 5, (method, np.abs(z).max())
    if method != "genealogy":  # the genealogy's covariances are biased low far from T-1 (degeneracy)
        # covariances carry an O(1/N) bias: a wrong formula shows as large z everywhere, not in one entry
        zc = z_scores(sm.smoothed_covs, exact.smoothed_covs)
        assert np.mean(np.abs(zc)) < 2.0, (method, np.mean(np.abs(zc)))
    if method in ("ffbsi", "genealogy"):
        m = M if method == "ffbsi" else N
        assert sm.trajectories.shape == (R, m, T, 2) and sm.trajectory_log_weights.shape == (R, m)
        w = np.exp(np.asarray(sm.trajectory_log_weights))
        np.testing.assert_allclose(np.einsum("rm,rmtd->rtd", w, np.asarray(sm.trajectories)),
                                   sm.smoothed_means, rtol=1e-9, atol=1e-9)
    if method == "ffbsm":
        assert sm.smoothed_log_weights.shape == (R, T, N) and sm.particles.shape == (R, T, N, 2)
        np.testing.assert_allclose(np.exp(np.asarray(sm.smoothed_log_weights)).sum(-1), 1.0, atol=1e-9)


def test_paris_mcmc_backward_against_kalman(lg_data):
    """PaRIS with the independent Metropolis-Hastings backward kernel: sums of smoothed means and of
    lag-one products E[z_t,0 z_{t-1},0 | y] (which need correct backward draws, not only correct
    marginals) against the RTS smoother."""
    model, y, exact = lg_data
    fn = ps.smc.AdditiveFunctional(initial=lambda z, yy, u: (z, jnp.zeros(())),
                                   step=lambda zp, z, t, yy, u: (z, z[0] * zp[0]))
    est = ps.smc.paris(jax.random.key(5), model, jnp.broadcast_to(y, (R,) + y.shape), fn, N, 2,
                       backward="mcmc").estimate
    m, cross = np.asarray(exact.smoothed_means), np.asarray(exact.smoothed_cross_covs)
    lag_one = np.sum(cross[:, 0, 0] + m[1:, 0] * m[:-1, 0])
    z = z_scores(np.column_stack([np.asarray(est[0]), np.asarray(est[1])]), np.append(m.sum(0), lag_one))
    assert np.abs(z).max() < 5, np.abs(z).max()


@pytest.mark.parametrize("method", ("ffbsi", "ffbsm", "marginal", "paris"))
def test_hmm_against_forward_backward(method):
    model = hmm()
    _, y = ps.sample(jax.random.key(2), model, T)
    exact = ps.hmm.smoother(model, y).smoothed_probs
    sm = ps.smc.smoother(jax.random.key(3), model, jnp.broadcast_to(y, (R,) + y.shape), N, method=method,
                         **({"num_samples": M} if method == "ffbsi" else {}))
    assert sm.smoothed_probs.shape == (R, T, 3) and sm.smoothed_means.shape == (R, T)
    np.testing.assert_allclose(np.asarray(sm.smoothed_probs).sum(-1), 1.0, atol=1e-9)
    # floor: one particle's share of a replicate's estimate (a marginal near 0 or 1 has no spread)
    z = z_scores(sm.smoothed_probs, exact, floor=1.0 / N)
    assert np.abs(z).max() < 5, (method, np.abs(z).max())
    np.testing.assert_allclose(np.asarray(sm.smoothed_means),
                               np.asarray(sm.smoothed_probs) @ np.arange(3.0), atol=1e-9)


def test_jit_over_key_and_params(lg_data):
    model, y, exact = lg_data

    @jax.jit
    def means(key, q):
        m = eqx.tree_at(lambda mm: mm.transition_cov, model, q * jnp.eye(2))
        return ps.smc.smoother(key, m, y, N, method="ffbsm").smoothed_means

    out = means(jax.random.key(4), jnp.asarray(0.3))
    assert out.shape == (T, 2) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, exact.smoothed_means, atol=0.5)  # one run: sanity, the z-tests are above
    assert not np.allclose(means(jax.random.key(5), jnp.asarray(0.3)), out)


def test_ragged_list_and_lengths(lg_data):
    model, y, _ = lg_data
    ys = [y, y[:9]]
    sm = ps.smc.smoother(jax.random.key(6), model, ys, 32, method="ffbsi", num_samples=8)
    assert sm.smoothed_means.shape == (2, T, 2) and sm.trajectories.shape == (2, 8, T, 2)
    assert np.all(np.isfinite(sm.smoothed_means))
    # the padded sequence's log-likelihood estimate is that of its own 9 steps: same as a run on y[:9]
    short = ps.smc.smoother(jax.random.key(6), model, jnp.stack([y, y]), 32, method="ffbsi", num_samples=8,
                            lengths=np.asarray([T, 9], np.int32))
    np.testing.assert_allclose(short.log_likelihood, sm.log_likelihood)
    exact9 = float(ps.kalman.filter(model, y[:9]).log_likelihood)
    assert abs(float(sm.log_likelihood[1]) - exact9) < 3.0


def test_argument_errors(lg_data):
    model, y, _ = lg_data
    with pytest.raises(ValueError, match="^method"):
        ps.smc.smoother(jax.random.key(0), model, y, N, method="fbs")
    with pytest.raises(ValueError, match="^num_samples"):
        ps.smc.smoother(jax.random.key(0), model, y, N, method="paris", num_samples=3)
    with pytest.raises(ValueError, match="^num_particles"):
        ps.smc.smoother(jax.random.key(0), model, y, 1)
    with pytest.raises(ValueError, match="^emissions"):
        ps.smc.smoother(jax.random.key(0), model, y[:, :1], N)


@pytest.mark.parametrize("bad", (np.inf, -np.inf))
def test_particle_engines_refuse_inf(lg_data, bad):
    model, y, _ = lg_data
    y_bad = np.array(y)
    y_bad[3, 1] = bad
    with pytest.raises(ValueError, match="^emissions: found inf; use NaN"):
        ps.smc.particle_filter(jax.random.key(0), model, y_bad, 16)
    with pytest.raises(ValueError, match="^emissions: found inf"):
        ps.smc.smoother(jax.random.key(0), model, y_bad, 16)
    with pytest.raises(ValueError, match="^emissions: found inf"):
        ps.smc.particle_filter(jax.random.key(0), model, [np.asarray(y), y_bad[:5]], 16)
    # NaN still means missing
    y_nan = np.array(y)
    y_nan[3] = np.nan
    assert np.isfinite(ps.smc.particle_filter(jax.random.key(0), model, y_nan, 16).log_likelihood)
