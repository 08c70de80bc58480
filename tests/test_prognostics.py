"""Remaining useful life (`ps.prognostics.rul`) and the prognostics metrics.

Oracles: Monte Carlo from the models' own sampler (`ps.core.sample_sequence`, the traceable core
of `ps.sample`): plain frequencies for an unobserved history, self-normalised importance
weights from the emission densities (scipy) for an observed one, tolerances from the
estimators' standard errors; the closed-form geometric first passage of a two-state HMM;
hand-computed PHM08 scores, RMSE, coverage and PIT values.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import probssm as ps

M = ps.models
P = ps.prognostics
K = 3
MEANS = np.array([[1.0], [0.3], [-0.6]])
SD = 0.8
EMISSIONS = ps.emissions.Gaussian(jnp.asarray(MEANS), jnp.full((K, 1, 1), SD ** 2))
H = 40
NUM_PATHS = 20000  # one shape for every Monte Carlo test: one compiled sampler per model family


def degradation_hsmm():
    """Left-to-right: two wear states with gamma / Poisson durations, then the absorbing failure state."""
    durations = M.NonParametricDuration(np.array([
        stats.poisson.pmf(np.arange(12), 4.0) / stats.poisson.cdf(11, 4.0),
        np.r_[0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05, np.zeros(5)],
        np.ones(12) / 12,
    ]))
    return M.HSMM(np.array([0.8, 0.2, 0.0]), M.left_to_right(K), durations, EMISSIONS)


def degradation_hmm():
    A = np.array([[0.85, 0.15, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 1.0]])
    return M.HMM(np.array([0.8, 0.2, 0.0]), A, EMISSIONS)


def _first_passage(segment_states, failure=K - 1):
    """tau per path: the first index whose state is the failure state (len + 1 past the end)."""
    hit = segment_states == failure
    return np.where(hit.any(1), hit.argmax(1), segment_states.shape[1] + 1)


_draw = jax.jit(jax.vmap(lambda k, m: ps.core.sample_sequence(k, m, 5 + H), in_axes=(0, None)))


def _paths(model, num, seed):
    z, y = _draw(jax.random.split(jax.random.key(seed), num), model)
    z = np.asarray(z)
    k = z // model.max_duration if isinstance(model, M.HSMM) else z
    return k, np.asarray(y)


# the HMM's first passage is also checked against its closed form below; its sampling runs are slow-marked
BOTH = [degradation_hsmm, pytest.param(degradation_hmm, marks=pytest.mark.slow)]


@pytest.mark.parametrize("build", BOTH, ids=["hsmm", "hmm"])
def test_rul_of_an_unobserved_history_equals_sampling(build):
    """No data (one missing step): the exact pmf of tau against plain Monte Carlo, cdf within 4.5 SE."""
    model = build()
    r = P.rul(model, np.full((1, 1), np.nan), max_horizon=H)
    np.testing.assert_allclose(np.sum(r.pmf) + r.beyond, 1.0, atol=1e-12)
    k, _ = _paths(model, NUM_PATHS, 0)
    tau = _first_passage(k)
    emp = np.array([(tau <= h).mean() for h in range(H + 1)])
    exact = np.asarray(r.cdf)
    se = np.sqrt(exact * (1 - exact) / tau.size)
    assert np.all(np.abs(emp - exact) <= 4.5 * se + 1e-12), np.max(np.abs(emp - exact) / (se + 1e-300))
    np.testing.assert_allclose(float(r.mean), tau.mean(), atol=4.5 * tau.std() / np.sqrt(tau.size))


@pytest.mark.parametrize("build", BOTH, ids=["hsmm", "hmm"])
def test_rul_given_a_history_equals_importance_sampling(build):
    """Observed y_0..y_4: prior paths from the sampler weighted by p(y_0:4 | states) (scipy densities);
    the self-normalised estimate of P(tau <= r | y) within 4.5 of its delta-method SE."""
    model = build()
    y_obs = np.array([[1.1], [0.9], [0.2], [0.5], [-0.1]])
    r = P.rul(model, y_obs, max_horizon=H)
    k, _ = _paths(model, NUM_PATHS, 1)
    logw = stats.norm.logpdf(y_obs[:, 0][None], MEANS[k[:, :5], 0], SD).sum(1)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    assert 1.0 / np.sum(w ** 2) > 1000  # enough effective samples for the SE to mean something
    tau = _first_passage(k[:, 4:])  # steps after the last observed one
    for h in range(H + 1):
        ind = (tau <= h).astype(float)
        est = np.sum(w * ind)
        se = np.sqrt(np.sum(w ** 2 * (ind - est) ** 2))
        assert abs(est - float(r.cdf[h])) <= 4.5 * se + 1e-12, (h, est, float(r.cdf[h]), se)


def test_rul_of_a_two_state_hmm_is_the_geometric_first_passage():
    """From p_t = p(z_t = 0 | y): P(tau = 0) = 1 - p_t, P(tau = r) = p_t a^(r-1) (1 - a) (closed form)."""
    a = 0.9
    em = ps.emissions.Gaussian(jnp.array([[0.0], [2.0]]), jnp.ones((2, 1, 1)))
    hmm = M.HMM(np.array([0.7, 0.3]), np.array([[a, 1 - a], [0.0, 1.0]]), em)
    y = np.array([[0.1], [0.4], [1.9], [0.3]])
    p0 = float(ps.hmm.filter(hmm, y).filtered_probs[-1, 0])
    r = P.rul(hmm, y, max_horizon=H, quantiles=(0.1, 0.5, 0.9))
    ref = np.r_[1 - p0, p0 * a ** np.arange(H) * (1 - a)]
    np.testing.assert_allclose(r.pmf, ref, atol=1e-14)
    np.testing.assert_allclose(r.beyond, p0 * a ** H, rtol=1e-12)
    cdf = np.cumsum(ref)
    for level, q in zip((0.1, 0.5, 0.9), np.asarray(r.quantiles)):
        assert q == np.argmax(cdf >= level)
    assert float(r.median) == np.argmax(cdf >= 0.5)


def test_rul_batch_with_lengths_equals_each_history():
    """A padded batch of cut points of one engine equals one call per history; plausibilities (T, K)
    per segment state are expanded for an HSMM."""
    model = degradation_hsmm()
    y = np.array([[1.1], [0.9], [0.2], [0.5], [-0.1], [0.4]])
    pl = np.ones((6, K))
    pl[:2] = [1.0, 0.0, 0.0]
    lengths = np.array([6, 3, 4])
    batch = P.rul(model, np.stack([y] * 3), lengths=lengths, plausibility=np.stack([pl] * 3), max_horizon=H)
    for i, n in [(1, 3)]:
        one = P.rul(model, y[:n], plausibility=pl[:n], max_horizon=H)
        for a, b in zip(batch[:-1], one[:-1]):
            np.testing.assert_allclose(a[i], b, atol=1e-13)
    # the crisp plausibility matters (state 1 ruled out on the first two steps)
    plain = P.rul(model, y[:3], plausibility=np.ones((3, K)), max_horizon=H)
    assert np.max(np.abs(np.asarray(plain.pmf) - np.asarray(batch.pmf[1]))) > 1e-3


def test_rul_refuses_models_without_a_reachable_absorbing_failure_state():
    ergodic = M.HMM(np.ones(K) / K, np.full((K, K), 1 / K), EMISSIONS)
    with pytest.raises(ValueError, match="model: the remaining useful life needs an absorbing failure state"):
        P.rul(ergodic, np.zeros((3, 1)), max_horizon=5)
    # state 0 only cycles with state 1: it never reaches the failure state 2
    trapped = M.HSMM(np.ones(K) / K, np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
                     M.NonParametricDuration(np.ones((K, 2)) / 2), EMISSIONS)
    with pytest.raises(ValueError, match="model: state 0 never reaches the failure state 2"):
        P.rul(trapped, np.zeros((3, 1)), max_horizon=5)
    with pytest.raises(ValueError, match="failure_state: state 0 is not absorbing"):
        P.rul(degradation_hsmm(), np.zeros((3, 1)), max_horizon=5, failure_state=0)
    with pytest.raises(ValueError, match="max_horizon"):
        P.rul(degradation_hsmm(), np.zeros((3, 1)), max_horizon=0)
    with pytest.raises(ValueError, match="quantiles"):
        P.rul(degradation_hsmm(), np.zeros((3, 1)), max_horizon=5, quantiles=(0.5, 1.0))
    with pytest.raises(ValueError, match="emissions: expected shape"):
        P.rul(degradation_hsmm(), np.zeros((3, 2)), max_horizon=5)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def test_phm08_score_and_rmse_by_hand():
    predicted = np.array([10.0, 20.0, 30.0, 50.0])
    truth = np.array([13.0, 20.0, 20.0, 76.0])
    # d = -3, 0, 10, -26: exp(3/13) - 1 + 0 + exp(1) - 1 + exp(2) - 1
    hand = (math.exp(3 / 13) - 1) + 0.0 + (math.exp(1.0) - 1) + (math.exp(2.0) - 1)
    assert abs(hand - 8.3669065) < 1e-6  # 0.2595685 + 1.7182818 + 6.3890561
    np.testing.assert_allclose(P.phm08_score(predicted, truth), hand, rtol=1e-14)
    np.testing.assert_allclose(P.rmse(predicted, truth), math.sqrt((9 + 0 + 100 + 676) / 4), rtol=1e-14)
    with pytest.raises(ValueError, match="predicted: expected the shape of truth"):
        P.phm08_score(predicted[:3], truth)


def test_intervals_coverage_and_pit_by_hand():
    pmf = np.array([[0.1, 0.2, 0.4, 0.2, 0.1], [0.0, 0.0, 0.5, 0.3, 0.1]])  # second: 0.1 past the horizon
    iv = P.intervals(pmf, levels=(0.5, 0.9))
    # 0.5: quantiles 0.25 and 0.75; 0.9: 0.05 and 0.95 (smallest r with cdf >= level; 5 = past the horizon)
    np.testing.assert_array_equal(iv, [[[1, 3], [2, 3]], [[0, 4], [2, 5]]])
    truth = np.array([3, 2])
    np.testing.assert_allclose(P.coverage(iv, truth), [1.0, 1.0])
    np.testing.assert_allclose(P.coverage(iv, np.array([4, 6])), [0.0, 0.5])
    # mid-PIT: F(y - 1) + p(y) / 2
    np.testing.assert_allclose(P.pit(pmf, truth), [0.7 + 0.1, 0.0 + 0.25], atol=1e-15)
    np.testing.assert_allclose(P.pit(pmf, np.array([0, 9])), [0.05, 0.95], atol=1e-15)
    with pytest.raises(ValueError, match="intervals: expected shape"):
        P.coverage(iv, truth[:1])


def test_randomised_pit_is_uniform_under_calibration():
    """Truths drawn from their own predictive pmfs: randomised PIT values uniform (bin counts within
    4.5 binomial SE, mean within 4.5 SE of 1/2)."""
    rng = np.random.default_rng(0)
    N, Hh = 4000, 30
    pmf = rng.dirichlet(np.full(Hh + 1, 0.3), size=N)
    truth = np.array([rng.choice(Hh + 1, p=p) for p in pmf])
    u = np.asarray(P.pit(pmf, truth, key=jax.random.key(3)))
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / N
    assert np.all(np.abs(counts - 0.1) <= 4.5 * np.sqrt(0.09 / N))
    assert abs(u.mean() - 0.5) <= 4.5 * np.sqrt(1 / 12 / N)
