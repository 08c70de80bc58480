"""ARPHMM (Juesas, Ramasso, Drujont, Placet): autoregressive HMM whose emission
likelihoods are weighted by prior plausibilities pl_t(k), inside forward-backward
and Baum-Welch. Checks from the ARPHMM paper."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy.optimize import linear_sum_assignment

import probssm as ps


def matched_accuracy(pred, truth, K):
    conf = np.zeros((K, K))
    np.add.at(conf, (pred, truth), 1)
    r, c = linear_sum_assignment(-conf)
    return conf[r, c].sum() / len(truth)


def ar_model(K, P, weights=None, biases=None, variances=1.0, seed=0):
    rng = np.random.default_rng(seed)
    w = 0.1 * rng.normal(size=(K, 1, P)) if weights is None else np.asarray(weights, float).reshape(K, 1, P)
    b = np.zeros((K, 1)) if biases is None else np.asarray(biases, float).reshape(K, 1)
    covs = np.broadcast_to(np.asarray(variances, float).reshape(-1, 1, 1), (K, 1, 1))
    A = np.full((K, K), 0.05 / (K - 1)) + 0.95 * np.eye(K) - 0.05 / (K - 1) * np.eye(K)
    return ps.models.ARHMM(np.ones(K) / K, A, w, b, covs)


@pytest.fixture(scope="module")
def four_levels():
    rng = np.random.default_rng(0)
    levels = np.array([0.0, 1.0, 2.0, 3.0])
    seg = rng.integers(0, 4, 25)
    truth = np.repeat(seg, 16)  # T = 400, segments of 16 steps
    y = levels[truth] + 1.0 * rng.normal(size=truth.size)
    return y[:, None], truth


def test_plausibility_one_is_the_ordinary_arhmm(four_levels):
    y, _ = four_levels
    model = ar_model(4, 1, biases=[0.0, 1.0, 2.0, 3.0])
    plain = ps.hmm.smoother(model, y)
    ones = ps.hmm.smoother(model, y, plausibility=np.ones((len(y), 4)))
    np.testing.assert_allclose(ones.log_likelihood, plain.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(ones.smoothed_probs, plain.smoothed_probs, atol=1e-12)
    # pl scales the emission likelihood: a constant pl = c adds (T - P) log c... and T log c in all
    half = ps.hmm.smoother(model, y, plausibility=np.full((len(y), 4), 0.5))
    np.testing.assert_allclose(half.log_likelihood, plain.log_likelihood + len(y) * np.log(0.5), rtol=1e-12)
    np.testing.assert_allclose(half.smoothed_probs, plain.smoothed_probs, atol=1e-12)
    # lagged inputs built by the model equal explicit ones (first P rows missing)
    explicit = ps.hmm.smoother(model, y, inputs=ps.lagged_inputs(y, 1, fill_value=np.nan))
    np.testing.assert_allclose(explicit.smoothed_probs, plain.smoothed_probs, atol=1e-12)


def test_accuracy_rises_to_one_as_wrong_plausibilities_vanish(four_levels):
    y, truth = four_levels
    T, K = len(y), 4
    init = ar_model(K, 1, biases=[0.5, 1.0, 1.5, 2.0], seed=1)
    accuracies = []
    for eps in (1.0, 0.3, 0.05, 0.0):
        pl = np.full((T, K), eps)
        pl[np.arange(T), truth] = 1.0
        fitted, history = ps.learn.em(init, y, 40, plausibility=pl)
        h = np.asarray(history)
        assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))  # EM stays monotone with plausibilities
        post = ps.hmm.smoother(fitted, y, plausibility=pl).smoothed_probs
        pred = np.asarray(jnp.argmax(post, -1))
        accuracies.append(matched_accuracy(pred, truth, K) if eps == 1.0 else np.mean(pred == truth))
    print("accuracies", accuracies)
    assert accuracies[-1] == 1.0
    assert all(b >= a - 0.01 for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[2] > accuracies[0], accuracies


@pytest.mark.slow
def test_switching_ar2_recovers_coefficients():
    rng = np.random.default_rng(2)
    K, P, T = 3, 2, 5000
    coefs = np.array([[0.6, 0.2], [-0.5, 0.3], [1.2, -0.5]])
    sds = np.array([0.5, 1.0, 0.3])
    A = np.full((K, K), 0.01) + 0.97 * np.eye(K)
    z = np.zeros(T, int)
    y = np.zeros(T)
    for t in range(1, T):
        z[t] = rng.choice(K, p=A[z[t - 1]])
        if t >= 2:
            y[t] = coefs[z[t]] @ y[t - 2:t][::-1] + sds[z[t]] * rng.normal()
    init = ar_model(K, P, variances=[0.3, 0.6, 1.0], seed=3)
    fitted, history = ps.learn.em(init, y[:, None], 60, fixed=("emissions.biases",), num_restarts=4,
                                  key=jax.random.PRNGKey(0))
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))
    est = np.asarray(fitted.emissions.weights)[:, 0, :]
    cost = ((est[:, None] - coefs[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    assert np.abs(est[r] - coefs[c]).max() < 0.05, (est[r], coefs[c])
    np.testing.assert_allclose(np.sqrt(np.asarray(fitted.emissions.covs)[r, 0, 0]), sds[c], rtol=0.1)


def test_negative_plausibility_raises(four_levels):
    y, _ = four_levels
    model = ar_model(4, 1)
    bad = np.ones((len(y), 4))
    bad[3, 2] = -0.1
    with pytest.raises(ValueError, match="plausibility"):
        ps.hmm.smoother(model, y, plausibility=bad)
    with pytest.raises(ValueError, match="plausibility"):
        ps.learn.em(model, y, 3, plausibility=bad)
    zero_row = np.ones((len(y), 4))
    zero_row[5] = 0.0
    with pytest.raises(ValueError, match="plausibility"):
        ps.hmm.filter(model, y, plausibility=zero_row)


def test_load_cmapss_fd001():
    data = ps.datasets.load_cmapss("FD001")
    assert data.train.shape == (20631, 26) and data.test.shape == (13096, 26) and data.test_rul.shape == (100,)
    units = ps.datasets.split_units(data.train)
    assert len(units) == 100 and min(len(u) for u in units) == 128 and max(len(u) for u in units) == 362
    assert data.test_rul.min() == 7 and data.test_rul.max() == 145
    with pytest.raises(ValueError, match="subset"):
        ps.datasets.load_cmapss("FD009")
    with pytest.raises(ValueError, match="data_dir"):
        ps.datasets.load_cmapss("FD002")


def test_m_step_with_fixed_nonzero_biases_is_weighted_least_squares():
    """Regression: with biases held fixed at non-zero values the weight update subtracted
    Sxx b instead of sum_t w_tk x_t b_k^T."""
    rng = np.random.default_rng(5)
    K, D, U, T = 2, 2, 3, 200
    x = rng.normal(size=(T, U)) + 1.0
    y = rng.normal(size=(T, D))
    w = rng.dirichlet(np.ones(K), size=T)
    b = np.array([[1.0, -2.0], [0.5, 3.0]])
    em = ps.emissions.AutoregressiveGaussian(np.zeros((K, D, U)), b, np.stack([np.eye(D)] * K))
    new = em.m_step(jnp.asarray(y), jnp.asarray(w), jnp.asarray(x), fixed=("biases",))
    np.testing.assert_array_equal(new.biases, b)
    for k in range(K):
        sw = np.sqrt(w[:, k])[:, None]
        coef, *_ = np.linalg.lstsq(sw * x, sw * (y - b[k]), rcond=None)  # (U, D)
        np.testing.assert_allclose(new.weights[k], coef.T, atol=1e-10)
        r = y - b[k] - x @ coef
        np.testing.assert_allclose(new.covs[k], (w[:, k, None] * r).T @ r / w[:, k].sum(), atol=1e-10)


def test_sample_arhmm_and_refit_its_weights():
    """Regression: ps.sample failed on an ARHMM (lagged draws were not fed back as inputs)."""
    weights = np.array([[[0.6, 0.2]], [[-0.5, 0.3]]])
    model = ps.models.ARHMM(np.ones(2) / 2, np.array([[0.95, 0.05], [0.05, 0.95]]), weights,
                            np.array([[0.5], [-0.5]]), np.array([[[0.3]], [[0.5]]]))
    assert model.emission_lags == 2 and model.input_dim == 2
    z, y = ps.sample(jax.random.PRNGKey(1), model, 4000)
    assert z.shape == (4000,) and y.shape == (4000, 1)
    assert np.isfinite(float(ps.hmm.filter(model, y).log_likelihood))
    fitted = model.emissions.m_step(y, jax.nn.one_hot(z, 2, dtype=y.dtype))  # regress on the true states
    np.testing.assert_allclose(fitted.weights, weights, atol=0.06)
    np.testing.assert_allclose(fitted.biases, [[0.5], [-0.5]], atol=0.06)
