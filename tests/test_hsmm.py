"""Hidden semi-Markov models (`ps.models.HSMM`) on `ps.hmm`'s engine, and their EM.

Oracles: the HMM with the same geometric durations (log-likelihood and marginals); brute-force
enumeration of every segmentation with explicit durations (scipy pmfs, right-censored last
segment); the empirical durations of `ps.sample`; Baum-Welch on the equivalent HMM (geometric
EM); scipy's optimiser on the weighted duration log-likelihood (parametric M-steps).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

import probssm as ps

M = ps.models
K = 3
MEANS = np.array([[-1.0], [0.2], [1.3]])
SDS = np.array([0.7, 0.5, 0.9])
PI = np.array([0.2, 0.5, 0.3])
JUMPS = np.array([[0.0, 0.7, 0.3], [0.4, 0.0, 0.6], [0.25, 0.75, 0.0]])
STAY = np.array([0.6, 0.8, 0.35])
EMISSIONS = ps.emissions.Gaussian(jnp.asarray(MEANS), jnp.asarray(SDS[:, None, None] ** 2))

_rng = np.random.default_rng(3)
Y12 = _rng.normal(size=(12, 1))
Y12[4] = np.nan  # a missing step
PL12 = _rng.uniform(0.2, 1.0, size=(12, K))
Y5 = _rng.normal(size=(5, 1))
PL5 = _rng.uniform(0.1, 1.0, size=(5, K))

smoother = jax.jit(lambda m, y, pl: ps.hmm.smoother_params(m.discrete_params(y), plausibility=pl))
viterbi = jax.jit(lambda m, y: ps.hmm.viterbi_params(m.discrete_params(y)))


def geometric_hsmm(D):
    return M.HSMM(PI, JUMPS, M.GeometricDuration(STAY, D), EMISSIONS)


def equivalent_hmm():
    return M.HMM(PI, np.diag(STAY) + (1 - STAY)[:, None] * JUMPS, EMISSIONS)


# ----------------------------------------------------------------------------------------------
# Geometric durations = the HMM
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 4])
def test_geometric_durations_equal_the_hmm(D):
    hsmm, hmm = geometric_hsmm(D), equivalent_hmm()
    pl = jnp.asarray(PL12)
    a = smoother(hsmm, jnp.asarray(Y12), hsmm.expand_plausibility(pl))
    b = smoother(hmm, jnp.asarray(Y12), pl)
    assert abs(float(a.log_likelihood - b.log_likelihood)) < 1e-10
    np.testing.assert_allclose(hsmm.state_marginals(a.smoothed_probs), b.smoothed_probs, atol=1e-10, rtol=0)
    np.testing.assert_allclose(hsmm.state_marginals(a.filtered_probs), b.filtered_probs, atol=1e-10, rtol=0)


def test_geometric_durations_equal_the_hmm_public_engines():
    """Through the checked public functions, on a padded batch."""
    hsmm, hmm = geometric_hsmm(3), equivalent_hmm()
    y = np.stack([Y12, np.where(np.arange(12)[:, None] < 9, Y12[::-1], 0.0)])
    lengths = np.array([12, 9])
    a = ps.hmm.smoother(hsmm, y, lengths=lengths)
    b = ps.hmm.smoother(hmm, y, lengths=lengths)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, atol=1e-10, rtol=0)
    np.testing.assert_allclose(hsmm.state_marginals(a.smoothed_probs), b.smoothed_probs, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------
# Brute-force enumeration over segmentations with explicit durations
# ----------------------------------------------------------------------------------------------
def _oracle_duration(kind, D):
    """(pmf(k, d), survival(k, l) = P(d >= l)) from scipy / closed forms, independent of the model code."""
    if kind == "nonparametric":
        table = np.random.default_rng(7).dirichlet(np.ones(D), size=K)
        pmf = lambda k, d: table[k, d - 1] if d <= D else 0.0
    elif kind == "poisson":
        rates = np.array([1.5, 0.7, 2.5])
        norm = stats.poisson.cdf(D - 1, rates)
        pmf = lambda k, d: stats.poisson.pmf(d - 1, rates[k]) / norm[k] if d <= D else 0.0
    else:  # geometric, untruncated
        pmf = lambda k, d: (1 - STAY[k]) * STAY[k] ** (d - 1)
        return pmf, lambda k, l: STAY[k] ** (l - 1)
    return pmf, lambda k, l: sum(pmf(k, d) for d in range(l, D + 1))


def _model(kind, D):
    if kind == "nonparametric":
        dur = M.NonParametricDuration(np.random.default_rng(7).dirichlet(np.ones(D), size=K))
    elif kind == "poisson":
        dur = M.PoissonDuration(np.array([1.5, 0.7, 2.5]), D, truncation_tol=None)
    else:
        dur = M.GeometricDuration(STAY, D)
    return M.HSMM(PI, JUMPS, dur, EMISSIONS)


def _segmentations(T):
    """Every composition of T into segment lengths."""
    for cuts in itertools.product([0, 1], repeat=T - 1):
        lengths, run = [], 1
        for c in cuts:
            if c:
                lengths.append(run)
                run = 1
            else:
                run += 1
        lengths.append(run)
        yield lengths


def _brute_force(kind, D, y, pl):
    pmf, surv = _oracle_duration(kind, D)
    T = len(y)
    dens = np.array([[stats.norm.pdf(y[t, 0], MEANS[k, 0], SDS[k]) for k in range(K)] for t in range(T)]) * pl
    total, marg = 0.0, np.zeros((T, K))
    best, best_path = -1.0, None
    for lengths in _segmentations(T):
        for states in itertools.product(range(K), repeat=len(lengths)):
            p = PI[states[0]]
            for i in range(len(lengths) - 1):
                p *= pmf(states[i], lengths[i]) * JUMPS[states[i], states[i + 1]]
            path = np.repeat(states, lengths)
            emis = np.prod(dens[np.arange(T), path])
            w = p * surv(states[-1], lengths[-1]) * emis
            total += w
            marg[np.arange(T), path] += w
            # Viterbi over expanded paths: the censored last segment takes its most likely completion
            v = p * max(pmf(states[-1], d) for d in range(lengths[-1], D + 1)) * emis if D >= lengths[-1] else 0
            if v > best:
                best, best_path = v, path
    return np.log(total), marg / total, best_path


@pytest.mark.parametrize("kind,D", [("nonparametric", 4), ("poisson", 5), ("geometric", 2)])
def test_forward_backward_equals_brute_force(kind, D):
    model = _model(kind, D)
    ll, marg, path = _brute_force(kind, D, Y5, PL5)
    r = smoother(model, jnp.asarray(Y5), model.expand_plausibility(jnp.asarray(PL5)))
    assert abs(float(r.log_likelihood) - ll) < 1e-10
    np.testing.assert_allclose(model.state_marginals(r.smoothed_probs), marg, atol=1e-10, rtol=0)
    if kind == "nonparametric":
        # plain Viterbi (no plausibility) against the enumerated maximiser
        _, _, path = _brute_force(kind, D, Y5, np.ones_like(PL5))
        np.testing.assert_array_equal(model.segment_states(viterbi(model, jnp.asarray(Y5))), path)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def test_sampled_durations_match_the_pmf():
    """Complete segments of one long `ps.sample` path: every duration frequency within 4.5 binomial SE."""
    D = 4
    table = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25], [0.0, 0.6, 0.0, 0.4]])
    model = M.HSMM(PI, JUMPS, M.NonParametricDuration(table), EMISSIONS)
    z, _ = ps.sample(jax.random.key(11), model, 3000)
    k = np.asarray(model.segment_states(z))
    r = np.asarray(model.remaining_durations(z))
    # a segment starts where the previous one ended (r = 1 before) and lasts its first remaining duration
    starts = np.flatnonzero(np.r_[True, r[:-1] == 1])
    complete = starts[starts + r[starts] <= len(z)]  # drop the censored last segment
    assert np.all(k[complete[1:]] != k[complete[1:] - 1])  # jumps change state (zero diagonal)
    for state in range(K):
        d = r[complete][k[complete] == state]
        n = d.size
        assert n > 250
        freq = np.array([(d == j).mean() for j in range(1, D + 1)])
        p = table[state]
        se = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-12), (state, freq, p)
    # and the remaining duration really counts down inside a segment
    inside = r[:-1] > 1
    np.testing.assert_array_equal(r[1:][inside], r[:-1][inside] - 1)


# ----------------------------------------------------------------------------------------------
# EM
# ----------------------------------------------------------------------------------------------
Y_EM = np.stack([_rng.normal(size=(30, 1)) + np.repeat([-1.0, 1.0, 0.0], 10)[:, None] for _ in range(3)])
Y_EM[0, 5] = np.nan
LEN_EM = np.array([30, 24, 17])


def _start(durations, emissions=EMISSIONS):
    return M.HSMM(np.ones(K) / K, np.array([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]]), durations, emissions)


@pytest.mark.parametrize("durations", [
    M.NonParametricDuration(np.ones((K, 6)) / 6),
    pytest.param(M.PoissonDuration(np.array([2.0, 3.0, 4.0]), 12, truncation_tol=None), marks=pytest.mark.slow),
    pytest.param(M.NegativeBinomialDuration(np.array([2.0, 2.0, 2.0]), np.array([0.6, 0.6, 0.6]), 12,
                                            truncation_tol=None), marks=pytest.mark.slow),
    pytest.param(M.GammaDuration(np.array([2.0, 3.0, 1.5]), np.array([0.5, 0.6, 0.4]), 12, truncation_tol=None),
                 marks=pytest.mark.slow),
    pytest.param(M.WeibullDuration(np.array([2.0, 3.0, 1.5]), np.array([4.0, 4.0, 4.0]), 12, truncation_tol=None),
                 marks=pytest.mark.slow),
], ids=["nonparametric", "poisson", "negbin", "gamma", "weibull"])
def test_em_is_monotone(durations):
    _, history = ps.learn.em(_start(durations), Y_EM, 12, lengths=LEN_EM)
    h = np.asarray(history)
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:])), np.diff(h)
    assert h[-1] > h[0] + 1.0  # it does learn


def test_em_autoregressive_with_plausibility_is_monotone():
    """The ARP-HSMM: AR(2) emissions, a left-to-right chain, crisp plausibilities on life segments."""
    ar = ps.emissions.AutoregressiveGaussian(np.zeros((K, 1, 2)), np.zeros((K, 1)), np.full((K, 1, 1), 0.5))
    model = M.HSMM(np.array([1.0, 0.0, 0.0]), M.left_to_right(K), M.NonParametricDuration(np.ones((K, 8)) / 8), ar)
    pl = np.ones(Y_EM.shape[:2] + (K,))
    pl[:, :5] = [1.0, 0.0, 0.0]
    fitted, history = ps.learn.em(model, np.nan_to_num(Y_EM), 10, lengths=LEN_EM, plausibility=pl)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:])), np.diff(h)
    np.testing.assert_allclose(fitted.transition_matrix, M.left_to_right(K), atol=1e-12, rtol=0)  # topology kept


def test_geometric_em_equals_baum_welch_on_the_hmm():
    """Geometric durations with one cell: the HSMM's EM and Baum-Welch on the equivalent HMM take the
    same steps. (With more cells the complete data also hold the censored last segment's full
    duration, a different augmentation of the same likelihood: the iterates differ, the fixed points
    do not.)"""
    hsmm_fit, h1 = ps.learn.em(geometric_hsmm(1), Y_EM, 4, lengths=LEN_EM)
    hmm_fit, h2 = ps.learn.baum_welch(equivalent_hmm(), Y_EM, 4, lengths=LEN_EM)
    np.testing.assert_allclose(h1, h2, rtol=1e-11)
    a = np.asarray(hsmm_fit.durations.stay_probs)
    A = np.diag(a) + (1 - a)[:, None] * np.asarray(hsmm_fit.transition_matrix)
    np.testing.assert_allclose(A, hmm_fit.transition_matrix, atol=1e-10)
    np.testing.assert_allclose(hsmm_fit.initial_probs, hmm_fit.initial_probs, atol=1e-10)
    np.testing.assert_allclose(hsmm_fit.emissions.means, hmm_fit.emissions.means, atol=1e-10)


@pytest.mark.slow
def test_em_and_gradient_mle_reach_the_same_maximum():
    """Two independent optimisers of the same likelihood (EM's closed-form / Newton M-steps and Adam on
    ps.hmm.log_likelihood via ps.learn.mle) agree, and both beat the parameters that simulated the data."""
    em = ps.emissions.Gaussian(jnp.array([[-1.0], [1.0]]), jnp.ones((2, 1, 1)))
    jumps = np.array([[0.0, 1.0], [1.0, 0.0]])
    truth = M.HSMM(np.array([0.5, 0.5]), jumps, M.PoissonDuration(np.array([3.0, 6.0]), 20), em)
    _, y = ps.sample(jax.random.key(0), truth, 300)
    start = M.HSMM(np.array([0.5, 0.5]), jumps, M.PoissonDuration(np.array([5.0, 5.0]), 20), em)
    fit_em, h_em = ps.learn.em(start, y, 60, fixed=("emissions",))
    fit_mle, h_mle = ps.learn.mle(start, y, 300, fixed=("emissions",))
    ll = lambda m: float(ps.hmm.filter(m, y).log_likelihood)
    assert ll(fit_em) >= ll(truth) - 1e-9 and ll(fit_mle) >= ll(truth) - 1e-9
    assert abs(ll(fit_em) - ll(fit_mle)) < 1e-3, (ll(fit_em), ll(fit_mle))
    np.testing.assert_allclose(fit_em.durations.rates, fit_mle.durations.rates, rtol=1e-2)


def _scipy_weighted_mle(logpmf, x0, w, D):
    d = np.arange(1, D + 1)

    def nll(theta):
        lp = logpmf(np.exp(theta), d)
        lp = lp - np.log(np.sum(np.exp(lp)))
        return -np.sum(w * lp)

    return np.exp(optimize.minimize(nll, np.log(x0), method="Nelder-Mead",
                                    options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000}).x)


@pytest.mark.parametrize("family", ["poisson", pytest.param("negbin", marks=pytest.mark.slow),
                                    pytest.param("gamma", marks=pytest.mark.slow),
                                    pytest.param("weibull", marks=pytest.mark.slow)])
def test_parametric_duration_m_step_is_the_weighted_mle(family):
    """The M-step maximises sum_d w_d log p(d) (truncated to 1..D) as scipy's optimiser does on
    scipy's pmfs."""
    D = 15
    w = np.random.default_rng(5).gamma(2.0, size=D) * np.exp(-0.5 * ((np.arange(1, D + 1) - 6) / 3) ** 2)
    if family == "poisson":
        dur = M.PoissonDuration([3.0], D, truncation_tol=None)
        logpmf = lambda p, d: stats.poisson.logpmf(d - 1, p[0])
        x0 = [3.0]
    elif family == "negbin":
        dur = M.NegativeBinomialDuration([2.0], [0.6], D, truncation_tol=None)
        logpmf = lambda p, d: stats.nbinom.logpmf(d - 1, p[0], 1 - p[1] / (1 + p[1]))  # p[1] = odds
        x0 = [2.0, 1.5]
    elif family == "gamma":
        dur = M.GammaDuration([2.0], [0.5], D, truncation_tol=None)
        logpmf = lambda p, d: np.log(stats.gamma.cdf(d, p[0], scale=1 / p[1]) - stats.gamma.cdf(d - 1, p[0],
                                                                                              scale=1 / p[1]))
        x0 = [2.0, 0.5]
    else:
        dur = M.WeibullDuration([2.0], [5.0], D, truncation_tol=None)
        logpmf = lambda p, d: np.log(stats.weibull_min.cdf(d, p[0], scale=p[1])
                                     - stats.weibull_min.cdf(d - 1, p[0], scale=p[1]))
        x0 = [2.0, 5.0]
    new = dur.m_step(jnp.asarray(w)[None], jnp.zeros(1), jnp.zeros(1))
    ref = _scipy_weighted_mle(logpmf, x0, w, D)
    got = np.array([float(getattr(new, n)[0]) for n in new.param_names])
    if family == "negbin":
        got[1] = got[1] / (1 - got[1])
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    # and the model's pmf is scipy's truncated pmf at those parameters
    lp = logpmf(ref, np.arange(1, D + 1))
    ref_pmf = np.exp(lp) / np.exp(lp).sum()
    np.testing.assert_allclose(new.pmf()[0], ref_pmf, atol=2e-5)


def test_nonparametric_tail_equals_geometric_durations_and_em_keeps_it_exact():
    """A non-parametric pmf with a geometric tail on its last cell: with the geometric body
    (1 - a) a^(d - 1), d < D, and P(d >= D) = a^(D - 1) it is the same law as GeometricDuration
    (log-likelihood and marginals to 1e-10); one EM step from both gives the same model."""
    D = 4
    d = np.arange(1, D + 1)
    body = np.where(d < D, (1 - STAY[:, None]) * STAY[:, None] ** (d - 1), STAY[:, None] ** (D - 1))
    tail = M.HSMM(PI, JUMPS, M.NonParametricDuration(body, tail_probs=STAY), EMISSIONS)
    geo = geometric_hsmm(D)
    pl = jnp.asarray(PL12)
    a = smoother(tail, jnp.asarray(Y12), tail.expand_plausibility(pl))
    b = smoother(geo, jnp.asarray(Y12), geo.expand_plausibility(pl))
    assert abs(float(a.log_likelihood - b.log_likelihood)) < 1e-10
    np.testing.assert_allclose(a.smoothed_probs, b.smoothed_probs, atol=1e-10, rtol=0)
    np.testing.assert_allclose(tail.durations.mean(), 1 / (1 - STAY), rtol=1e-12)
    # one EM step: the pmf is the normalised expected entries and q the loops over the visits of the
    # last cell (both from the E-step statistics of the same sequence)
    st = ps.learn.hsmm_statistics(tail, jnp.asarray(Y12))
    entries = np.asarray(st.initial) + np.asarray(st.jumps).sum(0)
    ft, ht = ps.learn.em(tail, Y12, 3)
    f1, _ = ps.learn.em(tail, Y12, 1)
    np.testing.assert_allclose(f1.durations.probs, entries / entries.sum(1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(f1.durations.tail, st.loops / (st.loops + st.exits), atol=1e-12)
    assert np.all(np.diff(np.asarray(ht)) >= -1e-9 * np.abs(np.asarray(ht)[1:]))
    # a pmf without a tail keeps q = 0 through EM
    ft0, _ = ps.learn.em(M.HSMM(PI, JUMPS, M.NonParametricDuration(body), EMISSIONS), Y_EM, 2, lengths=LEN_EM)
    assert np.all(np.asarray(ft0.durations.tail) == 0.0)
    with pytest.raises(ValueError, match="tail_probs: expected values in"):
        M.NonParametricDuration(body, tail_probs=[0.5, 1.0, 0.2])
    with pytest.raises(ValueError, match="tail_probs: expected shape"):
        M.NonParametricDuration(body, tail_probs=[0.5, 0.2])


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    dur = M.NonParametricDuration(np.ones((K, 3)) / 3)
    with pytest.raises(ValueError, match="transition_matrix: expected a zero diagonal"):
        M.HSMM(PI, np.diag(STAY) + (1 - STAY)[:, None] * JUMPS, dur, EMISSIONS)
    with pytest.raises(ValueError, match="transition_matrix: expected shape"):
        M.HSMM(PI, JUMPS[:2], dur, EMISSIONS)
    with pytest.raises(ValueError, match="initial_probs: expected shape"):
        M.HSMM(PI[:2], JUMPS, dur, EMISSIONS)
    with pytest.raises(ValueError, match="durations: expected 3 states"):
        M.HSMM(PI, JUMPS, M.NonParametricDuration(np.ones((2, 3)) / 3), EMISSIONS)
    with pytest.raises(ValueError, match="durations: expected a duration family"):
        M.HSMM(PI, JUMPS, np.ones((K, 3)) / 3, EMISSIONS)
    with pytest.raises(ValueError, match="pmf: puts probability .* above max_duration=2"):
        M.NonParametricDuration(np.ones((K, 3)) / 3, max_duration=2)
    with pytest.raises(ValueError, match="max_duration: state 1 puts probability"):
        M.PoissonDuration([1.0, 9.0, 2.0], 10)
    with pytest.raises(ValueError, match="rates: expected positive"):
        M.PoissonDuration([1.0, -1.0, 2.0], 10)
    with pytest.raises(ValueError, match="stay_probs: expected values in"):
        M.GeometricDuration([0.5, 1.0, 0.2], 2)
    with pytest.raises(ValueError, match="plausibility: expected shape"):
        _model("nonparametric", 3).expand_plausibility(np.ones((5, 2)))
    with pytest.raises(ValueError, match="fixed: unknown"):
        ps.learn.em(_model("nonparametric", 3), Y5, 2, fixed=("durations.probs",))
    # ps.hmm sees K * D expanded states: a (T, K) plausibility must be expanded first
    with pytest.raises(ValueError, match="plausibility: expected shape"):
        ps.hmm.filter(_model("nonparametric", 3), Y5, plausibility=PL5)


def test_models_made_by_tree_at_are_checked_where_inference_starts():
    """eqx.tree_at bypasses the constructor: ps.hmm, ps.prognostics and ps.learn.em re-run its checks
    and name the HSMM's own parameters (not the expanded chain's)."""
    import equinox as eqx

    base = ps.models.HSMM(PI, JUMPS, M.PoissonDuration(jnp.array([2.0, 3.0, 2.0]), 12), EMISSIONS)
    ltr = ps.models.HSMM(np.r_[1.0, 0, 0], M.left_to_right(K), M.NonParametricDuration(np.ones((K, 3)) / 3),
                         EMISSIONS)
    bad = [
        (eqx.tree_at(lambda m: m.durations.rates, base, jnp.array([2.0, -3.0, 2.0])), "durations.rates"),
        (eqx.tree_at(lambda m: m.initial_probs, base, jnp.array([0.5, 0.5])), r"initial_probs: expected shape \(3,\)"),
        (eqx.tree_at(lambda m: m.transition_matrix, base, jnp.asarray(JUMPS + 0.1 * np.eye(K)) / 1.1),
         "transition_matrix: expected a zero diagonal"),
        (eqx.tree_at(lambda m: m.durations.probs, ltr, -jnp.ones((K, 3)) / 3), "durations.pmf: expected non-negative"),
    ]
    for model, message in bad:
        with pytest.raises(ValueError, match=message):
            ps.hmm.filter(model, Y5)
        with pytest.raises(ValueError, match=message):
            ps.learn.em(model, Y5, 1)
    with pytest.raises(ValueError, match="durations.pmf: expected non-negative"):
        ps.prognostics.rul(bad[-1][0], Y5, max_horizon=10)
