"""HMM-GLM with plain, Gaussian and one-hot weight priors (Li et al., ICLR 2024): issues 4 and 14."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import scipy.stats as st
from scipy.optimize import linear_sum_assignment

import probssm as ps
from probssm.core import params as core_params
from probssm.datasets import sample_hmmglm, simulate_hmmglm
from probssm.models.hmmglm import (HMMGLM, GaussianPrior, NoPrior, OneHotPrior, exponential_basis,
                                   history_covariates, raised_cosine_basis)
from probssm.learn.hmmglm_em import (coupling_sizes, fit_hmmglm, hmmglm_log_likelihood, init_hmmglm,
                                     m_step_objective, prune_links)


def matched_accuracy(pred, truth, K):
    conf = np.zeros((K, K))
    np.add.at(conf, (np.ravel(pred), np.ravel(truth)), 1)
    r, c = linear_sum_assignment(-conf)
    return conf[r, c].sum() / np.size(truth)


# ----------------------------------------------------------------------------------------------
# Covariates and emission densities against direct formulas
# ----------------------------------------------------------------------------------------------
def test_history_covariates_match_a_direct_loop():
    rng = np.random.default_rng(0)
    y = rng.poisson(1.0, (30, 3)).astype(float)
    basis = np.asarray(raised_cosine_basis(3, 7))
    np.testing.assert_allclose(basis.sum(1), 1.0, rtol=1e-12)
    h = np.asarray(history_covariates(y, basis))
    J, L = basis.shape
    expected = np.zeros((30, 3 * J))
    for t in range(30):
        for n in range(3):
            for j in range(J):
                expected[t, n * J + j] = sum(basis[j, l - 1] * y[t - l, n] for l in range(1, L + 1) if t - l >= 0)
    np.testing.assert_allclose(h, expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(exponential_basis())[0], [.636, .234, .086, .032, .012])


@pytest.mark.parametrize("family,link", [("poisson", "exp"), ("poisson", "softplus"), ("poisson", "sigmoid"),
                                         ("bernoulli", "sigmoid"), ("bernoulli", "softplus"), ("bernoulli", "exp")])
def test_emission_log_likelihoods_match_scipy(family, link):
    rng = np.random.default_rng(1)
    K, N, T = 2, 3, 40
    w = 0.5 * rng.normal(size=(K, N, N, 1))
    b = rng.normal(size=N) - 0.5
    model = HMMGLM(np.ones(K) / K, np.eye(K) * 0.9 + 0.05, b, w, family=family, link=link)
    y = (rng.poisson(0.7, (T, N)) if family == "poisson" else rng.integers(0, 2, (T, N))).astype(float)
    y[0] = 5.0 if family == "poisson" else 1.0  # large counts / certain spikes
    x = np.asarray(model.covariates(y))
    ll = np.asarray(model.emission_log_likelihoods(jnp.asarray(y), jnp.asarray(x)))
    eta = np.einsum("tu,kdu->tkd", x, w.reshape(K, N, N)) + b
    mean = {"exp": np.exp, "softplus": lambda e: np.log1p(np.exp(e)), "sigmoid": lambda e: 1 / (1 + np.exp(-e))}[link](eta)
    if family == "poisson":
        expected = st.poisson.logpmf(y[:, None, :], mean).sum(-1)
    else:
        p = mean if link == "sigmoid" else 1 - np.exp(-mean)
        expected = st.bernoulli.logpmf(y[:, None, :], p).sum(-1)
    np.testing.assert_allclose(ll, expected, rtol=1e-10, atol=1e-10)
    # the emission family object (ps.emissions interface) agrees
    glm = model.glm()
    assert isinstance(glm, ps.emissions.AbstractGLMEmissions)
    np.testing.assert_allclose(np.asarray(glm.log_likelihoods(jnp.asarray(y), jnp.asarray(x))), expected,
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(glm.distribution(1, jnp.asarray(x[3])).log_prob(jnp.asarray(y[3]))),
                               expected[3, 1], rtol=1e-10)
    # the model's discrete structure runs through ps.hmm
    r = ps.hmm.smoother(model, y)
    assert np.isfinite(r.log_likelihood) and r.smoothed_probs.shape == (T, K)


# ----------------------------------------------------------------------------------------------
# Oracle: one state, no prior == per-neuron Poisson GLMs (statsmodels)
# ----------------------------------------------------------------------------------------------
def _numpy_poisson_glm_trials(rng, num_trials, T, W, b):
    """Independent simulator: y_t ~ Poisson(exp(b + W h_t)), h from the exponential basis."""
    phi = np.array([.636, .234, .086, .032, .012])
    N = len(b)
    y = np.zeros((num_trials, T, N))
    for m in range(num_trials):
        for t in range(T):
            h = sum((phi[l - 1] * y[m, t - l] for l in range(1, 6) if t - l >= 0), np.zeros(N))
            y[m, t] = rng.poisson(np.exp(b + W @ h))
    return y


def test_single_state_no_prior_equals_statsmodels_poisson_glm():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(3)
    W = np.array([[-0.5, 0.4, 0.0], [0.3, -0.5, -0.4], [0.0, 0.5, -0.5]])
    y = _numpy_poisson_glm_trials(rng, 2, 500, W, np.array([-0.5, -0.2, -0.8]))
    model = init_hmmglm(jax.random.PRNGKey(0), y, 1, link="exp")
    fitted, history = fit_hmmglm(model, y, 80, learning_rate=0.02)
    x = np.asarray(model.covariates(jnp.asarray(y))).reshape(-1, 3)
    X = sm.add_constant(x)
    llf = 0.0
    for n in range(3):
        res = sm.GLM(y[..., n].ravel(), X, family=sm.families.Poisson()).fit(tol=1e-12)
        np.testing.assert_allclose(float(fitted.biases[n]), res.params[0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(fitted.weights[0, n, :, 0]), res.params[1:], atol=1e-5)
        llf += res.llf
    np.testing.assert_allclose(float(hmmglm_log_likelihood(fitted, y).sum()), llf, rtol=1e-9)
    assert np.all(np.diff(np.asarray(history)) >= -1e-9 * abs(llf))


# ----------------------------------------------------------------------------------------------
# M-step objective: gradients against central finite differences (float64)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior,link,mode", [("none", "softplus", "hard"), ("gaussian", "exp", "hard"),
                                             ("onehot", "softplus", "relaxed"), ("onehot", "sigmoid", "expected")])
def test_m_step_objective_gradients_match_finite_differences(prior, link, mode):
    rng = np.random.default_rng(4)
    K, N, T = 2, 3, 50
    y = rng.poisson(0.8, (2, T, N)).astype(float)
    model = HMMGLM.create(jax.random.PRNGKey(5), K, N, prior=prior, link=link, num_inputs=2, weight_scale=0.3,
                          sparsity=1.5 if prior == "onehot" else 0.0, link_cost=0.7 if prior == "onehot" else 0.0)
    if prior == "gaussian":
        model = eqx_set(model, "prior.weight_mean", 0.2 * rng.normal(size=model.prior.weight_mean.shape))
    if prior == "onehot":
        model = eqx_set(model, "prior.connectome_logits", rng.normal(size=model.prior.connectome_logits.shape))
    u = rng.normal(size=(2, T, 2))
    gamma = rng.dirichlet(np.ones(K), (2, T))
    key = jax.random.PRNGKey(6)
    names = model.emission_paths  # every learnable emission array, as probssm.core.params paths

    def f(params):
        return m_step_objective(core_params.replace(model, names, tuple(params[n] for n in names)), y, gamma, u,
                                mode=mode, key=key)

    f = jax.jit(f)
    params = {n: core_params.get(model, n) for n in names}
    g = jax.jit(jax.grad(f))(params)
    for n in names:
        d = jnp.asarray(rng.normal(size=params[n].shape))
        eps = 1e-5
        plus = {**params, n: params[n] + eps * d}
        minus = {**params, n: params[n] - eps * d}
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = jnp.sum(g[n] * d)
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-6, atol=1e-6 * (1 + abs(float(f(params)))),
                                   err_msg=n)


def eqx_set(model, path, value):
    return core_params.replace(model, (path,), (jnp.asarray(value, core_params.get(model, path).dtype),))


# ----------------------------------------------------------------------------------------------
# EM: objective never decreases; synthetic recovery
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_sim():
    """Two states of 5 neurons wired as opposite excitatory rings (n <- n-1 vs n <- n+1)."""
    N = 5
    ring = np.roll(np.eye(N), 1, axis=1)  # ring[n, n-1] = 1... up to orientation
    w = np.stack([0.9 * ring - 0.6 * np.eye(N), 0.9 * ring.T - 0.6 * np.eye(N)])[..., None]
    model = HMMGLM([0.5, 0.5], [[0.98, 0.02], [0.02, 0.98]], np.full(N, -0.3), w)
    states, spikes = sample_hmmglm(jax.random.PRNGKey(7), model, 400, 4)
    return model, np.asarray(states), np.asarray(spikes)


@pytest.mark.parametrize("prior,family,link", [("gaussian", "poisson", "softplus"), ("onehot", "poisson", "softplus"),
                                               ("none", "bernoulli", "sigmoid")])  # Poisson "none": below
def test_em_objective_never_decreases(small_sim, prior, family, link):
    _, _, y = small_sim
    if family == "bernoulli":
        y = np.minimum(y, 1.0)
    model = init_hmmglm(jax.random.PRNGKey(8), y, 2, prior=prior, family=family, link=link,
                        **({"sparsity": 2.0, "link_cost": "bic"} if prior == "onehot" else {}))
    with pytest.warns(DeprecationWarning, match="return_accepted"):  # learners return (model, history)
        fitted, history, accepted = fit_hmmglm(model, y, 10, key=jax.random.PRNGKey(9), num_m_steps=10,
                                               return_accepted=True)
    h = np.asarray(history)
    assert np.all(np.isfinite(h))
    # generalised EM with the hard-indicator acceptance test: monotone up to rounding
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h).max()), np.diff(h).min()
    assert h[-1] > h[0] + 10.0  # and it does learn
    assert np.asarray(accepted).any()
    # the history is the objective of the parameters entering each iteration: recompute the last one
    # by running one more iteration from the fitted model
    from probssm.learn import hmmglm_em

    compiled = hmmglm_em._fit._cache_size()
    _, h2 = fit_hmmglm(fitted, y, 10, key=jax.random.PRNGKey(10), num_m_steps=10)
    assert hmmglm_em._fit._cache_size() == compiled  # same shapes: the fit is not compiled again
    assert float(h2[0]) >= h[-1] - 1e-9 * abs(h[-1])
    expected = float(hmmglm_log_likelihood(fitted, y).sum() + fitted.log_prior())
    np.testing.assert_allclose(float(h2[0]), expected, rtol=1e-10)
    # the generic entry point dispatches to the same compiled fit
    _, h3 = ps.learn.em(fitted, y, 10, key=jax.random.PRNGKey(10), num_m_steps=10)
    assert hmmglm_em._fit._cache_size() == compiled
    np.testing.assert_allclose(np.asarray(h3), np.asarray(h2), rtol=1e-12)


def test_small_synthetic_state_recovery(small_sim):
    _, truth, y = small_sim
    model = init_hmmglm(jax.random.PRNGKey(11), y, 2, prior="none")
    fitted, history = fit_hmmglm(model, y, 30, num_m_steps=20)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h).max()) and h[-1] > h[0] + 10.0
    pred = np.asarray(ps.hmm.viterbi(fitted, y))
    acc = matched_accuracy(pred, truth, 2)
    # chance after matching is >= 0.5; the states differ in coupling only (same biases)
    assert acc > 0.9, acc


@pytest.mark.slow
def test_simulator_shapes_and_connectome():
    sim = simulate_hmmglm(jax.random.PRNGKey(14), 3, 6, 300, 2, connection_prob=0.6)
    assert sim.spikes.shape == (2, 300, 6) and sim.states.shape == (2, 300)
    C = np.asarray(sim.connectome)
    w = np.asarray(sim.model.weights[..., 0])
    off = ~np.eye(6, dtype=bool)
    assert np.any(C[off] == 1) and np.any(C[off] == -1)
    # every per-state weight has the connectome's sign or is absent in that state
    assert np.all((np.sign(w[:, off]) == C[off]) | (w[:, off] == 0))
    y = np.asarray(sim.spikes)
    assert np.all(y >= 0) and np.all(y == np.round(y))
    # the state path is sticky (0.98): about 2% switches
    assert np.mean(np.diff(np.asarray(sim.states), axis=1) != 0) < 0.06


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    rng = np.random.default_rng(12)
    y = rng.poisson(0.5, (2, 50, 4)).astype(float)
    model = init_hmmglm(jax.random.PRNGKey(0), y, 2)
    neg = y.copy()
    neg[0, 3, 1] = -1
    frac = y.copy()
    frac[1, 2, 0] = 0.5
    for fn in (lambda s: fit_hmmglm(model, s, 1), lambda s: hmmglm_log_likelihood(model, s)):
        with pytest.raises(ValueError, match="emissions.*non-negative"):
            fn(neg)
        with pytest.raises(ValueError, match="emissions.*integer"):
            fn(frac)
        with pytest.raises(ValueError, match="emissions.*4 neurons"):
            fn(y[..., :3])
        with pytest.raises(ValueError, match="basis"):
            fn(y[:, :4])  # the exponential basis has length 5
    long_basis = init_hmmglm(jax.random.PRNGKey(0), y, 2, basis=raised_cosine_basis(2, 60))
    with pytest.raises(ValueError, match="basis"):
        fit_hmmglm(long_basis, y, 1)
    bern = init_hmmglm(jax.random.PRNGKey(0), np.minimum(y, 1), 2, family="bernoulli", link="sigmoid")
    with pytest.raises(ValueError, match="emissions.*0 or 1"):
        fit_hmmglm(bern, y + 1, 1)
    with pytest.raises(ValueError, match="prior"):
        HMMGLM.create(jax.random.PRNGKey(0), 2, 4, prior="laplace")
    with pytest.raises(ValueError, match="link"):
        HMMGLM.create(jax.random.PRNGKey(0), 2, 4, link="probit")
    with pytest.raises(ValueError, match="inputs"):
        fit_hmmglm(init_hmmglm(jax.random.PRNGKey(0), y, 2, num_inputs=1), y, 1)
    with pytest.raises(ValueError, match="fixed"):
        fit_hmmglm(model, y, 1, fixed=("connectome_logits",))


def test_onehot_hard_relaxed_and_expected_weights():
    model = HMMGLM.create(jax.random.PRNGKey(13), 3, 4, prior="onehot")

    @jax.jit
    def parts(m):
        return (m.coupling_weights("hard"), m.indicators("relaxed", jax.random.PRNGKey(0)),
                m.coupling_weights("expected"), m.adjacency_probs, m.strengths)

    hard, relaxed, expected, q, s = (np.asarray(a) for a in parts(model))
    a = np.asarray(model.adjacency_logits).argmax(-1)
    np.testing.assert_allclose(hard, np.where(a == 2, 1, np.where(a == 0, -1, 0))[..., None] * s)
    np.testing.assert_allclose(relaxed.sum(-1), 1.0, rtol=1e-12)
    assert np.all(relaxed >= 0) and np.all(s >= model.min_strength)
    np.testing.assert_allclose(expected, (q[..., 2] - q[..., 0])[..., None] * s, rtol=1e-12)


def test_onehot_log_prior_matches_a_direct_sum():
    """-sum_k KL(q_k || p) + sparsity * sum log p_none - link_cost * sum_k (1 - q_k,none), in numpy."""
    rng = np.random.default_rng(14)
    K, N = 3, 4
    model = HMMGLM.create(jax.random.PRNGKey(15), K, N, prior="onehot", sparsity=2.5, link_cost=1.3)
    model = eqx_set(model, "prior.adjacency_logits", rng.normal(size=(K, N, N, 3)))
    model = eqx_set(model, "prior.connectome_logits", rng.normal(size=(N, N, 3)))
    la, lc = np.asarray(model.adjacency_logits), np.asarray(model.connectome_logits)
    q = np.exp(la) / np.exp(la).sum(-1, keepdims=True)
    p = np.exp(lc) / np.exp(lc).sum(-1, keepdims=True)
    kl = np.sum(q * (np.log(q) - np.log(p)[None]))
    expected = -kl + 2.5 * np.log(p[..., 1]).sum() - 1.3 * (1 - q[..., 1]).sum()
    np.testing.assert_allclose(float(model.log_prior()), expected, rtol=1e-12)
    # the charge is what tilts each state's indicator prior towards "none": with q equal to that
    # tilted prior, p'(c) proportional to p(c) exp(-link_cost [c != none]), the prior term is its
    # log normaliser, the largest value over q
    tilt = p * np.exp(-1.3 * np.array([1.0, 0.0, 1.0]))
    best = eqx_set(model, "prior.adjacency_logits", np.broadcast_to(np.log(tilt), (K, N, N, 3)))
    np.testing.assert_allclose(float(best.log_prior()) - 2.5 * np.log(p[..., 1]).sum(),
                               K * np.log(tilt.sum(-1)).sum(), rtol=1e-12)
    assert float(best.log_prior()) > float(model.log_prior())
    y = rng.poisson(0.5, (2, 60, N)).astype(float)
    bic = init_hmmglm(jax.random.PRNGKey(0), y, K, prior="onehot", link_cost="bic")
    np.testing.assert_allclose(bic.link_cost, 0.5 * np.log(120 / K), rtol=1e-12)
    with pytest.raises(ValueError, match="link_cost"):
        init_hmmglm(jax.random.PRNGKey(0), y, K, prior="onehot", link_cost="aic")
    with pytest.raises(ValueError, match="link_cost"):
        HMMGLM.create(jax.random.PRNGKey(0), K, N, prior="onehot", link_cost=-1.0)


def _two_link_truth(key, num_trials):
    """One state, N = 4 neurons, links 1 <- 0 (+0.9) and 2 <- 3 (-0.9): (true signs, spikes (M, 500, 4))."""
    w = np.zeros((1, 4, 4, 1))
    w[0, 1, 0, 0], w[0, 2, 3, 0] = 0.9, -0.9
    _, y = sample_hmmglm(key, HMMGLM([1.0], [[1.0]], np.full(4, -0.3), w), 500, num_trials)
    return np.sign(w[0, ..., 0]), y


def test_prune_links_turns_weak_spurious_links_to_none():
    """One state, two true links; the start has every other pair excitatory at the strength
    floor with near-indifferent indicators. EM without a link cost keeps some of them; with the
    BIC link cost exactly the true graph remains, and that objective never decreases."""
    N = 4
    truth, y = _two_link_truth(jax.random.PRNGKey(3), 2)
    logits = np.zeros((1, N, N, 3))
    logits[..., 2] = 0.3
    logits[0, 1, 0], logits[0, 2, 3] = [0, 0, 4.0], [4.0, 0, 0]
    sp = np.full((1, N, N, 1), -4.0)
    sp[0, 1, 0] = sp[0, 2, 3] = np.log(np.expm1(0.8))
    start = HMMGLM([1.0], [[1.0]], np.full(N, -0.3), np.zeros((1, N, N, 1)), prior="onehot", strength_params=sp,
                   adjacency_logits=logits, connectome_logits=np.zeros((N, N, 3)))
    signs = lambda m: np.sign(np.asarray(m.coupling_weights("hard"))[0, ..., 0])
    kept, _ = fit_hmmglm(start, y, 10, key=jax.random.PRNGKey(1), num_m_steps=20)
    assert (signs(kept) != truth).sum() > 0  # without the cost, spurious links stay on
    pruned, history = prune_links(start, y, 10, key=jax.random.PRNGKey(1), num_m_steps=20)
    np.testing.assert_array_equal(signs(pruned), truth)
    np.testing.assert_allclose(pruned.link_cost, 0.5 * np.log(1000.0), rtol=1e-12)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h).max())
    assert start.link_cost == 0.0  # the input is not modified
    with pytest.raises(ValueError, match="model.*one-hot"):
        prune_links(init_hmmglm(jax.random.PRNGKey(0), y, 1), y, 1)
    for bad in (-1.0, "aic"):
        with pytest.raises(ValueError, match="link_cost"):
            prune_links(start, y, 1, link_cost=bad)
    with pytest.raises(ValueError, match="lengths"):
        prune_links(start, y, 1, lengths=[500])


def test_threshold_couplings_drops_exactly_the_couplings_the_held_out_data_reject():
    """One state, two true links. Every other cross pair carries a spurious coupling of size 0.3
    (plain: weight +-0.3; one-hot: an indicator switched on at strength 0.3); the self-history
    couplings are 0.5. On held-out trials from the truth, the validated threshold drops exactly
    the spurious couplings, for both priors, and its log-likelihoods are those of the models
    thresholded by hand."""
    N = 4
    truth, y_val = _two_link_truth(jax.random.PRNGKey(5), 8)
    cross = ~np.eye(N, dtype=bool)
    spurious = cross & (truth == 0)
    signs = np.where(spurious, np.where(np.arange(N)[:, None] > np.arange(N), 1.0, -1.0), truth)
    signs[~cross] = 1.0
    size = np.where(spurious, 0.3, np.where(cross, 0.9, 0.5))
    plain = HMMGLM([1.0], [[1.0]], np.full(N, -0.3), (signs * size)[None, ..., None])
    logits = np.stack([signs < 0, np.zeros_like(signs, bool), signs > 0], -1)[None] * 4.0
    onehot = HMMGLM([1.0], [[1.0]], np.full(N, -0.3), np.zeros((1, N, N, 1)), prior="onehot", min_strength=0.1,
                    strength_params=np.log(np.expm1(size - 0.1))[None, ..., None], adjacency_logits=logits)
    np.testing.assert_allclose(onehot.coupling_weights("hard"), plain.weights, rtol=1e-12)
    expected_signs = np.where(spurious, 0.0, signs)
    by_hand = HMMGLM([1.0], [[1.0]], np.full(N, -0.3), (expected_signs * size)[None, ..., None])
    best_ll = float(jnp.sum(hmmglm_log_likelihood(by_hand, y_val)))
    for model in (plain, onehot):
        before = np.asarray(model.coupling_weights("hard"))
        result = ps.learn.threshold_couplings(model, y_val)
        np.testing.assert_array_equal(np.sign(np.asarray(result.model.coupling_weights("hard"))[0, ..., 0]),
                                      expected_signs)
        np.testing.assert_allclose(result.threshold, 0.3, rtol=1e-12)
        lls = np.asarray(result.log_likelihoods)
        assert lls.shape == result.thresholds.shape == (42,) and result.thresholds[0] == 0.0
        np.testing.assert_allclose(lls[0], float(jnp.sum(hmmglm_log_likelihood(model, y_val))), rtol=1e-12)
        np.testing.assert_allclose(lls.max(), best_ll, rtol=1e-12)
        assert lls.max() > lls[0] + 20.0  # the spurious couplings cost the held-out trials
        assert lls[-1] < lls.max() - 20.0  # and so does dropping the true links
        np.testing.assert_array_equal(np.asarray(model.coupling_weights("hard")), before)  # input untouched
    np.testing.assert_array_equal(np.asarray(ps.learn.threshold_couplings(onehot, y_val).model.connectome("support"))[cross],
                                  truth[cross])
    # state-averaged sizes: with one state the same choice
    np.testing.assert_allclose(ps.learn.threshold_couplings(plain, y_val, per_state=False).threshold, 0.3, rtol=1e-12)
    # with two states and two history bases, the sizes are norms over the bases, per state or of the state mean
    w2 = np.random.default_rng(3).normal(size=(2, N, N, 2))
    two = HMMGLM([0.5, 0.5], np.full((2, 2), 0.5), np.zeros(N), w2, basis=raised_cosine_basis(2, 6))
    np.testing.assert_allclose(coupling_sizes(two), np.linalg.norm(w2, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(coupling_sizes(two, per_state=False),
                               np.broadcast_to(np.linalg.norm(w2.mean(0), axis=-1), (2, N, N)), rtol=1e-12)
    with pytest.raises(ValueError, match="levels"):
        ps.learn.threshold_couplings(plain, y_val, levels=0)
    with pytest.raises(ValueError, match="emissions"):
        ps.learn.threshold_couplings(plain, y_val[..., :3])
    with pytest.raises(ValueError, match="model"):
        ps.learn.threshold_couplings("not a model", y_val)


# ----------------------------------------------------------------------------------------------
# Issue 14: priors as Module classes, GLM families with the emissions, simulators in ps.datasets,
# the data argument `emissions`, keys required where randomness is drawn, EM registered
# ----------------------------------------------------------------------------------------------
def test_prior_classes_equal_the_deprecated_prior_strings():
    rng = np.random.default_rng(16)
    K, N, J = 2, 3, 1
    sp, logits, conn = rng.normal(size=(K, N, N, J)), rng.normal(size=(K, N, N, 3)), rng.normal(size=(N, N, 3))
    w, b = 0.3 * rng.normal(size=(K, N, N, J)), np.full(N, -0.3)
    args = (np.ones(K) / K, np.full((K, K), 0.5), b, w)
    old = HMMGLM(*args, prior="onehot", strength_params=sp, adjacency_logits=logits, connectome_logits=conn,
                 sparsity=1.5, link_cost=0.7, min_strength=0.2)
    new = HMMGLM(*args, prior=OneHotPrior(sp, logits, conn, sparsity=1.5, link_cost=0.7, min_strength=0.2))
    assert isinstance(old.prior, OneHotPrior) and old.prior.name == "onehot"
    for m in (old, new):
        np.testing.assert_allclose(float(m.log_prior()), float(new.prior.log_prior(w)), rtol=1e-12)
        np.testing.assert_allclose(m.coupling_weights("hard"), new.prior.coupling_weights(w, "hard"), rtol=1e-12)
    assert old.link_cost == new.link_cost == 0.7 and new.min_strength == 0.2  # deprecated field aliases
    gauss = HMMGLM(*args, prior=GaussianPrior(np.zeros((N, N, J)), 0.5, min_weight_scale=0.2))
    np.testing.assert_allclose(float(gauss.log_prior()),
                               st.norm.logpdf(w, 0.0, 0.2 + np.log1p(np.exp(0.5))).sum(), rtol=1e-12)
    assert float(HMMGLM(*args, prior=NoPrior()).log_prior()) == 0.0
    # the learnable arrays, as probssm.core.params paths
    assert new.emission_paths == ("biases", "input_weights", "prior.strength_params", "prior.adjacency_logits",
                                  "prior.connectome_logits")
    assert "prior.weight_mean" in core_params.paths(gauss) and "basis" not in core_params.paths(gauss)
    with pytest.raises(ValueError, match="adjacency_logits"):
        HMMGLM(*args, prior=OneHotPrior(sp, logits[:, :2]))
    with pytest.raises(ValueError, match="sparsity"):
        HMMGLM(*args, prior=OneHotPrior(sp, logits), sparsity=1.0)  # parameters belong in the prior object


def test_layout_aliases_emissions_argument_and_keys():
    # GLM families live with the emission families; simulators in ps.datasets (old names kept)
    assert ps.emissions.PoissonGLM is ps.models.PoissonGLM and ps.emissions.BernoulliGLM is ps.models.BernoulliGLM
    assert ps.models.simulate_hmmglm is ps.datasets.simulate_hmmglm
    assert ps.models.sample_hmmglm is ps.datasets.sample_hmmglm
    from probssm.models.hmmglm import sample_hmmglm as old_path

    assert old_path is sample_hmmglm
    rng = np.random.default_rng(17)
    y = rng.poisson(0.5, (2, 30, 3)).astype(float)
    model = init_hmmglm(jax.random.PRNGKey(0), y, 2)
    ll = np.asarray(hmmglm_log_likelihood(model, y))
    with pytest.warns(DeprecationWarning, match="spikes"):
        np.testing.assert_allclose(np.asarray(hmmglm_log_likelihood(model, spikes=y)), ll, rtol=1e-12)
    with pytest.raises(ValueError, match="spikes"):
        hmmglm_log_likelihood(model, y, spikes=y)
    # a list of trials of different lengths equals the padded batch with lengths
    ragged = np.asarray(hmmglm_log_likelihood(model, [y[0, :20], y[1]]))
    np.testing.assert_allclose(ragged, hmmglm_log_likelihood(model, y, lengths=np.array([20, 30])), rtol=1e-12)
    np.testing.assert_allclose(ragged[1], ll[1], rtol=1e-12)
    # randomness needs a key: the one-hot prior's Gumbel noise, random mini-batches
    onehot = init_hmmglm(jax.random.PRNGKey(0), y, 2, prior="onehot")
    with pytest.raises(ValueError, match="key"):
        fit_hmmglm(onehot, y, 1)
    with pytest.raises(ValueError, match="key"):
        fit_hmmglm(model, y, 1, batch_size=10)
    with pytest.raises(ValueError, match="key"):
        prune_links(onehot, y, 1)


def test_protocol_agrees_with_the_exact_structure_and_integer_counts():
    """The protocol reads the lagged spikes (zeros before the trial) as its inputs, as declared by
    emission_lags; its emission log-densities equal discrete_params' for integer and float counts
    (on the base commit integer counts cast the history basis to int: every history was zero)."""
    rng = np.random.default_rng(18)
    y = rng.poisson(1.0, (12, 3))  # integer counts
    np.testing.assert_allclose(history_covariates(y, exponential_basis()),
                               history_covariates(y.astype(float), exponential_basis()), rtol=1e-12)
    for U in (0, 1):
        model = HMMGLM.create(jax.random.PRNGKey(4), 2, 3, num_inputs=U, weight_scale=0.5)
        u = rng.normal(size=(12, U)) if U else None
        assert model.emission_lags == (0 if U else 5) and model.input_dim == (None if U else 15)
        rows = model.protocol_inputs(y, u) if U else model.default_inputs(y)
        ll = np.asarray(model.discrete_params(y, u).log_likelihoods)
        proto = np.array([[float(model.emission(k, t, rows[t]).log_prob(y[t])) for k in range(2)] for t in range(12)])
        np.testing.assert_allclose(proto, ll, rtol=1e-10)
