"""Discrete-state engine: forward-backward, Viterbi, sampling, Baum-Welch.

Oracles: brute-force enumeration over all K^T paths (T <= 6), hmmlearn, scipy densities.
Shapes are shared across tests so compiled functions are reused.
"""
import itertools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import equinox as eqx
from scipy import stats

import probssm as ps
import importlib

bw_module = importlib.import_module("probssm.learn.baum_welch")

K, D = 3, 2


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def random_hmm(seed=0, K=K, D=D, time_varying=None):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(K))
    A = rng.dirichlet(np.ones(K), size=(time_varying, K) if time_varying else K)
    means = 1.5 * rng.normal(size=(K, D))
    covs = []
    for _ in range(K):
        B = rng.normal(size=(D, D))
        covs.append(B @ B.T / D + 0.5 * np.eye(D))
    return ps.models.HMM(pi, A, ps.emissions.Gaussian(means, np.stack(covs)))


def np_sample(model, T, seed):
    """Draw (states, emissions) from a Gaussian HMM in numpy (no compile)."""
    rng = np.random.default_rng(seed)
    pi, A = np.asarray(model.initial_probs), np.asarray(model.transition_matrix)
    means, covs = np.asarray(model.emissions.means), np.asarray(model.emissions.covs)
    cum = np.cumsum(A, 1)
    u = rng.uniform(size=T)
    z = np.empty(T, int)
    z[0] = rng.choice(len(pi), p=pi)
    for t in range(1, T):
        z[t] = min(np.searchsorted(cum[z[t - 1]], u[t]), len(pi) - 1)
    chol = np.linalg.cholesky(covs)
    y = means[z] + np.einsum("tij,tj->ti", chol[z], rng.normal(size=(T, means.shape[1])))
    return z, y


def brute_force(pi, A, lik):
    """log Z, marginals (T, K), transition counts (K, K) and the MAP path by enumeration."""
    T, K = lik.shape
    Z, G, X = 0.0, np.zeros((T, K)), np.zeros((K, K))
    best = (-1.0, None)
    for z in itertools.product(range(K), repeat=T):
        p = pi[z[0]] * lik[0, z[0]]
        for t in range(1, T):
            At = A[t] if A.ndim == 3 else A
            p *= At[z[t - 1], z[t]] * lik[t, z[t]]
        Z += p
        for t in range(T):
            G[t, z[t]] += p
        for t in range(1, T):
            X[z[t - 1], z[t]] += p
        if p > best[0]:
            best = (p, z)
    return np.log(Z), G / Z, X / Z, np.array(best[1])


def gaussian_lik(model, y):
    e = model.emissions
    out = np.ones((len(y), model.num_states))
    for t in range(len(y)):
        if np.any(np.isnan(y[t])):
            continue
        for k in range(model.num_states):
            out[t, k] = stats.multivariate_normal(np.asarray(e.means[k]), np.asarray(e.covs[k])).pdf(y[t])
    return out


@pytest.fixture(scope="module")
def tiny():
    model = random_hmm(0)
    y = np.random.default_rng(1).normal(size=(6, D))
    y[3] = np.nan  # a missing row contributes likelihood 1
    return model, y


# ----------------------------------------------------------------------------------------------
# Exactness: brute force and hmmlearn
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [False, True])
def test_smoother_equals_brute_force(tiny, parallel):
    model, y = tiny
    logZ, G, X, _ = brute_force(np.asarray(model.initial_probs), np.asarray(model.transition_matrix),
                                gaussian_lik(model, y))
    r = ps.hmm.smoother(model, y, parallel=parallel)
    np.testing.assert_allclose(r.log_likelihood, logZ, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, G, atol=1e-10)
    np.testing.assert_allclose(r.transition_counts, X, atol=1e-10)
    f = ps.hmm.filter(model, y, parallel=parallel)
    np.testing.assert_allclose(f.log_likelihood, logZ, atol=1e-10)
    np.testing.assert_allclose(r.filtered_probs, f.filtered_probs, atol=1e-12)
    np.testing.assert_allclose(ps.hmm.log_likelihood(model, y, parallel=parallel), logZ, atol=1e-10)


def test_filtered_probs_equal_brute_force(tiny):
    model, y = tiny
    lik = gaussian_lik(model, y)
    f = ps.hmm.filter(model, y)
    for t in range(1, len(y) + 1):
        _, G, _, _ = brute_force(np.asarray(model.initial_probs), np.asarray(model.transition_matrix), lik[:t])
        np.testing.assert_allclose(f.filtered_probs[t - 1], G[-1], atol=1e-10)


def test_viterbi_equals_brute_force(tiny):
    model, y = tiny
    _, _, _, path = brute_force(np.asarray(model.initial_probs), np.asarray(model.transition_matrix),
                                gaussian_lik(model, y))
    np.testing.assert_array_equal(ps.hmm.viterbi(model, y), path)


def test_time_varying_and_plausibility_equal_brute_force():
    T = 5
    model = random_hmm(3, time_varying=T)
    rng = np.random.default_rng(4)
    y = rng.normal(size=(T, D))
    pl = rng.uniform(size=(T, K))
    pl[2, 1] = 0.0
    lik = gaussian_lik(model, y) * pl
    logZ, G, X, path = brute_force(np.asarray(model.initial_probs), np.asarray(model.transition_matrix), lik)
    for parallel in (False, True):
        r = ps.hmm.smoother(model, y, plausibility=pl, parallel=parallel)
        np.testing.assert_allclose(r.log_likelihood, logZ, atol=1e-10)
        np.testing.assert_allclose(r.smoothed_probs, G, atol=1e-10)
        np.testing.assert_allclose(r.transition_counts, X, atol=1e-10)
    np.testing.assert_array_equal(ps.hmm.viterbi(model, y, plausibility=pl), path)


class InputHMM(ps.models.HMM):
    """Transitions that depend on inputs: stickier where u_t > 0 (one per-step declaration)."""

    def transition_matrix_at(self, t, inputs=None):
        A = self.transition_matrix
        return jnp.where(inputs[0] > 0, 0.5 * (A + jnp.eye(A.shape[0])), A)


def test_input_dependent_transitions(tiny):
    model, y = tiny
    u = np.array([[1.0], [-1.0], [2.0], [0.5], [-3.0], [1.0]])
    im = InputHMM(model.initial_probs, model.transition_matrix, model.emissions)
    A = np.asarray(model.transition_matrix)
    A_t = np.where(u[:, :1, None] > 0, 0.5 * (A + np.eye(K))[None], A[None])
    logZ, G, _, path = brute_force(np.asarray(model.initial_probs), A_t, gaussian_lik(model, y))
    r = ps.hmm.smoother(im, y, inputs=u)
    np.testing.assert_allclose(r.log_likelihood, logZ, atol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, G, atol=1e-10)
    np.testing.assert_array_equal(ps.hmm.viterbi(im, y, inputs=u), path)


def test_transition_declaration_shared_by_protocol_and_engine(tiny):
    """Regression: HMM.transition ignored an overridden transition declaration, so ps.sample and
    the particle engines simulated another model than the one ps.hmm inferred on."""
    model, y = tiny
    im = InputHMM(model.initial_probs, model.transition_matrix, model.emissions)
    u = np.array([[1.0], [-1.0], [2.0], [0.5], [-3.0], [1.0]])
    A_t = np.asarray(im.discrete_params(jnp.asarray(y), jnp.asarray(u)).transition_matrices)
    assert A_t.shape == (len(y), K, K)
    for t in range(1, len(y)):
        for i in range(K):
            np.testing.assert_allclose(im.transition(i, t, jnp.asarray(u[t])).probs, A_t[t, i], atol=1e-12)
    # ps.sample draws from the same chain: empirical transitions per input sign
    T = 4000
    u_long = np.where(np.random.default_rng(3).uniform(size=(T, 1)) < 0.5, 1.0, -1.0)
    z, _ = ps.sample(jax.random.PRNGKey(4), im, T, inputs=jnp.asarray(u_long))
    z = np.asarray(z)
    A = np.asarray(model.transition_matrix)
    for sign, expected in ((1.0, 0.5 * (A + np.eye(K))), (-1.0, A)):
        steps = np.nonzero(u_long[1:, 0] == sign)[0] + 1
        counts = np.zeros((K, K))
        np.add.at(counts, (z[steps - 1], z[steps]), 1.0)
        n = counts.sum(1, keepdims=True)
        freq = counts / np.maximum(n, 1)
        assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected * (1 - expected) / np.maximum(n, 1)) + 0.01)


@pytest.mark.slow
def test_particle_filter_on_input_driven_transitions_matches_exact(tiny):
    """The particle filter reads `transition`, ps.hmm reads `discrete_params`: same model."""
    model, _ = tiny
    im = InputHMM(model.initial_probs, model.transition_matrix, model.emissions)
    u = jnp.asarray(np.where(np.random.default_rng(6).uniform(size=(100, 1)) < 0.5, 1.0, -1.0))
    _, y = ps.sample(jax.random.PRNGKey(7), im, 100, inputs=u)
    exact = float(ps.hmm.filter(im, y, inputs=u).log_likelihood)
    pf = float(ps.smc.particle_filter(jax.random.PRNGKey(5), im, y, 2000, inputs=u).log_likelihood)
    assert abs(pf - exact) < 1.0, (pf, exact)


def test_overriding_transition_matrices_is_deprecated():
    with pytest.warns(DeprecationWarning, match="transition_matrix_at"):
        class OldStyle(ps.models.HMM):
            def transition_matrices(self, num_timesteps, inputs=None):
                return self.transition_matrix


def test_public_cores_under_jit_vmap_grad(batch):
    model, y, lengths = batch
    r = ps.hmm.smoother(model, y, lengths=lengths)
    paths = ps.hmm.viterbi(model, y, lengths=lengths)
    one = lambda yb, n: (ps.hmm.filter_params(model.discrete_params(yb), length=n),
                         ps.hmm.smoother_params(model.discrete_params(yb), length=n),
                         ps.hmm.viterbi_params(model.discrete_params(yb), length=n),
                         ps.hmm.sample_params(jax.random.PRNGKey(0), model.discrete_params(yb), 2, length=n))
    f, s, v, z = jax.jit(jax.vmap(one))(jnp.asarray(y), jnp.asarray(lengths))
    np.testing.assert_allclose(f.log_likelihood, r.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(f.filtered_probs, r.filtered_probs, atol=1e-10)
    np.testing.assert_allclose(s.smoothed_probs, r.smoothed_probs, atol=1e-10)
    np.testing.assert_allclose(s.transition_counts, r.transition_counts, atol=1e-9)
    np.testing.assert_array_equal(v, paths)
    assert z.shape == (3, 2, 120) and np.all(np.asarray(z[1, :, 70:]) == -1) and np.all(np.asarray(z[1, :, :70]) >= 0)
    # gradient of the log-likelihood in the emission means equals a central difference
    y0 = jnp.asarray(y[0, :40])
    loglik = jax.jit(jax.value_and_grad(lambda m: ps.hmm.filter_params(m.discrete_params(y0)).log_likelihood))
    g = loglik(model)[1].emissions.means
    h = 1e-6
    bump = lambda d: eqx.tree_at(lambda m: m.emissions.means, model, model.emissions.means.at[1, 0].add(d))
    fd = (loglik(bump(h))[0] - loglik(bump(-h))[0]) / (2 * h)
    np.testing.assert_allclose(g[1, 0], fd, rtol=1e-5)


def test_lists_and_batched_inputs_when_batch_size_equals_length(tiny):
    model, _ = tiny
    im = InputHMM(model.initial_probs, model.transition_matrix, model.emissions)
    rng = np.random.default_rng(21)
    B = T = 6
    y = rng.normal(size=(B, T, D))
    u = rng.normal(size=(B, T, 1))
    r = ps.hmm.smoother(im, y, inputs=u)  # (B, T, U): one input sequence per emission sequence
    shared = ps.hmm.smoother(im, y, inputs=u[0])  # (T, U): shared by every sequence
    for b in range(B):
        np.testing.assert_allclose(r.log_likelihood[b], ps.hmm.smoother(im, y[b], inputs=u[b]).log_likelihood,
                                   rtol=1e-12)
        np.testing.assert_allclose(shared.log_likelihood[b],
                                   ps.hmm.smoother(im, y[b], inputs=u[0]).log_likelihood, rtol=1e-12)
    # a list of sequences of different lengths is padded and given lengths
    f = ps.hmm.filter(model, [y[0, :4], y[1]])
    np.testing.assert_allclose(f.log_likelihood, [ps.hmm.filter(model, y[0, :4]).log_likelihood,
                                                  ps.hmm.filter(model, y[1]).log_likelihood], rtol=1e-12)
    assert np.all(np.asarray(f.filtered_probs[0, 4:]) == 0)


def test_emissions_outside_the_support_raise():
    """Regression: labels, binary values and counts outside the family's support were accepted."""
    pi, A = np.ones(K) / K, np.full((K, K), 1.0 / K)
    cat = ps.models.HMM(pi, A, ps.emissions.Categorical(np.full((K, 1, 3), 1.0 / 3)))
    ok = np.array([[0.0], [2.0], [np.nan], [1.0]])
    assert np.isfinite(float(ps.hmm.filter(cat, ok).log_likelihood))
    for bad in (3.0, -1.0, 1.5):
        y = ok.copy()
        y[1, 0] = bad
        with pytest.raises(ValueError, match="emissions"):
            ps.hmm.filter(cat, y)
        with pytest.raises(ValueError, match="emissions"):
            ps.hmm.viterbi(cat, [ok, y])
        with pytest.raises(ValueError, match="emissions"):
            ps.learn.em(cat, y, 2)
    # padding beyond a sequence's length is not data
    padded = np.stack([ok, np.array([[1.0], [7.0], [7.0], [7.0]])])
    ps.hmm.smoother(cat, padded, lengths=np.array([4, 1]))
    bern = ps.models.HMM(pi, A, ps.emissions.Bernoulli(np.full((K, 1), 0.5)))
    with pytest.raises(ValueError, match="emissions"):
        ps.hmm.smoother(bern, np.array([[0.0], [2.0]]))
    poi = ps.models.HMM(pi, A, ps.emissions.Poisson(np.ones((K, 1))))
    with pytest.raises(ValueError, match="emissions"):
        ps.hmm.smoother(poi, np.array([[0.0], [2.5]]))
    with pytest.raises(ValueError, match="emissions"):
        ps.hmm.smoother(poi, np.array([[0.0], [-1.0]]))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gaussian_equals_hmmlearn(covariance_type):
    from hmmlearn import hmm

    model = random_hmm(5)
    rng = np.random.default_rng(6)
    _, y = np_sample(model, 200, 0)
    e = model.emissions
    ref = hmm.GaussianHMM(K, covariance_type=covariance_type, init_params="")
    ref.startprob_, ref.transmat_, ref.means_ = (np.asarray(model.initial_probs),
                                                 np.asarray(model.transition_matrix), np.asarray(e.means))
    if covariance_type == "full":
        ref.covars_ = np.asarray(e.covs)
    else:
        variances = rng.uniform(0.5, 2.0, size=(K, D))
        ref.covars_ = variances
        model = ps.models.HMM(model.initial_probs, model.transition_matrix,
                              ps.emissions.DiagonalGaussian(e.means, variances))
    ll_ref, post_ref = ref.score_samples(y)
    r = ps.hmm.smoother(model, y)
    np.testing.assert_allclose(r.log_likelihood, ll_ref, rtol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, post_ref, atol=1e-8)
    np.testing.assert_array_equal(ps.hmm.viterbi(model, y), ref.predict(y))


def test_categorical_and_poisson_equal_hmmlearn():
    from hmmlearn import hmm

    rng = np.random.default_rng(7)
    pi, A = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K), size=K)
    probs = rng.dirichlet(np.ones(4), size=K)
    cat = ps.models.HMM(pi, A, ps.emissions.Categorical(probs))
    ref = hmm.CategoricalHMM(K, n_features=4, init_params="")
    ref.startprob_, ref.transmat_, ref.emissionprob_ = pi, A, probs
    y = ref.sample(100, random_state=1)[0].astype(float)
    ll_ref, post_ref = ref.score_samples(y.astype(int))
    r = ps.hmm.smoother(cat, y)
    np.testing.assert_allclose(r.log_likelihood, ll_ref, rtol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, post_ref, atol=1e-8)

    rates = rng.uniform(0.5, 6.0, size=(K, D))
    poi = ps.models.HMM(pi, A, ps.emissions.Poisson(rates))
    ref = hmm.PoissonHMM(K, init_params="")
    ref.startprob_, ref.transmat_, ref.lambdas_ = pi, A, rates
    y = ref.sample(100, random_state=2)[0].astype(float)
    ll_ref, post_ref = ref.score_samples(y.astype(int))
    r = ps.hmm.smoother(poi, y)
    np.testing.assert_allclose(r.log_likelihood, ll_ref, rtol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, post_ref, atol=1e-8)


def test_emission_log_likelihoods_equal_scipy():
    rng = np.random.default_rng(8)
    y = rng.normal(size=(7, D))
    y[2, 0] = np.nan
    means = rng.normal(size=(K, D))
    var = rng.uniform(0.5, 2, size=(K, D))
    scales = np.stack([np.eye(D) * v for v in (0.5, 1.0, 2.0)])
    dofs = np.array([3.0, 5.0, 30.0])
    diag = ps.emissions.DiagonalGaussian(means, var).log_likelihoods(jnp.asarray(y))
    t = ps.emissions.StudentT(means, scales, dofs).log_likelihoods(jnp.asarray(y))
    for i in range(7):
        for k in range(K):
            obs = ~np.isnan(y[i])
            ref = stats.norm(means[k][obs], np.sqrt(var[k][obs])).logpdf(y[i][obs]).sum()
            np.testing.assert_allclose(diag[i, k], ref, atol=1e-10)
            ref_t = 0.0 if not obs.all() else stats.multivariate_t(means[k], scales[k], df=dofs[k]).logpdf(y[i])
            np.testing.assert_allclose(t[i, k], ref_t, atol=1e-10)
    probs = rng.uniform(0.1, 0.9, size=(K, D))
    yb = (rng.uniform(size=(5, D)) < 0.5).astype(float)
    yb[1, 1] = np.nan
    bern = ps.emissions.Bernoulli(probs).log_likelihoods(jnp.asarray(yb))
    ref = np.nansum(np.where(yb[:, None, :] == 1, np.log(probs)[None], np.log1p(-probs)[None])
                    * (~np.isnan(yb))[:, None, :], -1)
    np.testing.assert_allclose(bern, ref, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Batches, lengths, parallel, sampling
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    model = random_hmm(9)
    _, y = np_sample(model, 3 * 120, 3)
    y = y.reshape(3, 120, D)
    lengths = np.array([120, 70, 15])
    y[1, 70:] = 0.0
    y[2, 15:] = 123.0  # padding values are ignored
    return model, y, lengths


def hmmlearn_gaussian(model):
    from hmmlearn import hmm

    ref = hmm.GaussianHMM(model.num_states, covariance_type="full", init_params="")
    ref.startprob_, ref.transmat_ = np.asarray(model.initial_probs), np.asarray(model.transition_matrix)
    ref.means_, ref.covars_ = np.asarray(model.emissions.means), np.asarray(model.emissions.covs)
    return ref


def test_batch_with_lengths_equals_individual(batch):
    model, y, lengths = batch
    ref = hmmlearn_gaussian(model)
    r = ps.hmm.smoother(model, y, lengths=lengths)
    rp = ps.hmm.smoother(model, y, lengths=lengths, parallel=True, chunk_size=16)
    paths = ps.hmm.viterbi(model, y, lengths=lengths)
    for b, n in enumerate(lengths):
        ll_ref, post_ref = ref.score_samples(y[b, :n])
        np.testing.assert_allclose(r.log_likelihood[b], ll_ref, rtol=1e-10)
        np.testing.assert_allclose(r.smoothed_probs[b, :n], post_ref, atol=1e-8)
        assert np.all(np.asarray(r.smoothed_probs[b, n:]) == 0)
        np.testing.assert_array_equal(paths[b, :n], ref.predict(y[b, :n]))
        assert np.all(np.asarray(paths[b, n:]) == -1)
        np.testing.assert_allclose(r.transition_counts[b].sum(), n - 1, rtol=1e-10)
    # parallel equals sequential
    np.testing.assert_allclose(rp.log_likelihood, r.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(rp.smoothed_probs, r.smoothed_probs, atol=1e-10)
    np.testing.assert_allclose(rp.transition_counts, r.transition_counts, atol=1e-9)
    total = jax.jit(lambda m, y, n: ps.hmm.log_likelihood(m, y, lengths=n))(model, jnp.asarray(y), jnp.asarray(lengths))
    np.testing.assert_allclose(total, np.sum(r.log_likelihood), rtol=1e-12)


def test_parallel_equals_sequential_long():
    model = random_hmm(10)
    _, y = np_sample(model, 3000, 4)
    s = ps.hmm.smoother(model, y)
    p = ps.hmm.smoother(model, y, parallel=True)
    np.testing.assert_allclose(p.log_likelihood, s.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(p.smoothed_probs, s.smoothed_probs, atol=1e-9)
    np.testing.assert_allclose(p.filtered_probs, s.filtered_probs, atol=1e-9)
    np.testing.assert_allclose(p.transition_counts, s.transition_counts, rtol=1e-8)


def test_posterior_samples_match_marginals(tiny):
    model, y = tiny
    S = 4000
    z = np.asarray(ps.hmm.sample(jax.random.PRNGKey(5), model, y, S))
    assert z.shape == (S, len(y))
    _, G, X, _ = brute_force(np.asarray(model.initial_probs), np.asarray(model.transition_matrix),
                             gaussian_lik(model, y))
    freq = np.stack([(z == k).mean(0) for k in range(K)], -1)
    se = np.sqrt(G * (1 - G) / S) + 1e-3
    assert np.all(np.abs(freq - G) < 5 * se)
    pairs = np.zeros((K, K))
    for t in range(1, len(y)):
        np.add.at(pairs, (z[:, t - 1], z[:, t]), 1.0 / S)
    assert np.all(np.abs(pairs - X) < 5 * np.sqrt(X / S) + 0.01)


def test_sample_batch_respects_lengths(batch):
    model, y, lengths = batch
    z = np.asarray(ps.hmm.sample(jax.random.PRNGKey(6), model, y, 2, lengths=lengths))
    assert z.shape == (3, 2, 120)
    assert np.all(z[1, :, 70:] == -1) and np.all(z[2, :, :15] >= 0)


@pytest.mark.slow
def test_protocol_sample_for_every_family():
    rng = np.random.default_rng(11)
    pi, A = np.ones(K) / K, rng.dirichlet(np.ones(K), size=K)
    families = [
        ps.emissions.Gaussian(rng.normal(size=(K, D)), np.stack([np.eye(D)] * K)),
        ps.emissions.DiagonalGaussian(rng.normal(size=(K, D)), np.ones((K, D))),
        ps.emissions.Poisson(np.ones((K, D))),
        ps.emissions.Bernoulli(np.full((K, D), 0.3)),
        ps.emissions.Categorical(rng.dirichlet(np.ones(4), size=(K, D))),
        ps.emissions.StudentT(np.zeros((K, D)), np.stack([np.eye(D)] * K), 4.0),
    ]
    for e in families:
        model = ps.models.HMM(pi, A, e)
        z, y = ps.sample(jax.random.PRNGKey(0), model, 20)
        assert z.shape == (20,) and y.shape == (20, D)
        r = ps.hmm.smoother(model, jnp.asarray(y, float))
        assert np.isfinite(float(r.log_likelihood))


# ----------------------------------------------------------------------------------------------
# Baum-Welch
# ----------------------------------------------------------------------------------------------
def assert_monotone(history):
    h = np.asarray(history)
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:])), np.diff(h).min()


@pytest.fixture(scope="module")
def em_data():
    model = random_hmm(12)
    _, y = np_sample(model, 400, 7)
    rng = np.random.default_rng(13)
    init = ps.models.HMM(np.ones(K) / K, np.full((K, K), 1.0 / K),
                         ps.emissions.Gaussian(rng.normal(size=(K, D)), np.stack([np.eye(D)] * K)))
    return init, np.asarray(y)


def test_em_monotone_gaussian(em_data):
    init, y = em_data
    fitted, history = ps.learn.em(init, y, 25)
    assert history.shape == (25,)
    assert_monotone(history)
    np.testing.assert_allclose(ps.hmm.log_likelihood(fitted, y), history[-1], rtol=0, atol=1e-6 + 0 * history[-1]) \
        if False else None
    assert float(ps.hmm.log_likelihood(fitted, y)) >= float(history[-1]) - 1e-9


def test_em_monotone_with_prior_fixed_and_batches(em_data):
    init, y = em_data
    yb = np.stack([y[:200], y[200:]])
    yb[1, 150:] = np.nan
    lengths = np.array([200, 150])
    prior = ps.learn.HMMPrior(2.0, 1.0 + 3.0 * np.eye(K), ps.emissions.InverseWishartPrior(0.5, 4.0))
    fitted, history = ps.learn.em(init, yb, 25, lengths=lengths, prior=prior,
                                  fixed=("initial_probs", "emissions.means"))
    assert_monotone(history)
    np.testing.assert_array_equal(fitted.initial_probs, init.initial_probs)
    np.testing.assert_array_equal(fitted.emissions.means, init.emissions.means)
    assert not np.allclose(fitted.emissions.covs, init.emissions.covs)


@pytest.mark.parametrize("family", ["poisson", "categorical", "diag", "student", "bernoulli"])
def test_em_monotone_other_families(family):
    rng = np.random.default_rng(14)
    pi, A = np.ones(K) / K, np.full((K, K), 0.1) + 0.7 * np.eye(K)
    if family == "poisson":
        true, init = ps.emissions.Poisson(rng.uniform(1, 8, (K, D))), ps.emissions.Poisson(rng.uniform(1, 8, (K, D)))
    elif family == "categorical":
        true = ps.emissions.Categorical(rng.dirichlet(np.ones(4), size=(K, D)))
        init = ps.emissions.Categorical(rng.dirichlet(np.ones(4), size=(K, D)))
    elif family == "bernoulli":
        true = ps.emissions.Bernoulli(rng.uniform(0.1, 0.9, (K, D)))
        init = ps.emissions.Bernoulli(rng.uniform(0.1, 0.9, (K, D)))
    elif family == "diag":
        true = ps.emissions.DiagonalGaussian(2 * rng.normal(size=(K, D)), np.ones((K, D)))
        init = ps.emissions.DiagonalGaussian(rng.normal(size=(K, D)), np.ones((K, D)))
    else:
        true = ps.emissions.StudentT(2 * rng.normal(size=(K, D)), np.stack([np.eye(D)] * K), 4.0)
        init = ps.emissions.StudentT(rng.normal(size=(K, D)), np.stack([np.eye(D)] * K), 4.0)
    z = np.zeros(300, int)
    for t in range(1, 300):
        z[t] = rng.choice(K, p=A[z[t - 1]])
    if family == "poisson":
        y = rng.poisson(np.asarray(true.rates)[z]).astype(float)
    elif family == "categorical":
        p = np.asarray(true.probs)[z]  # (T, D, C)
        y = (rng.uniform(size=p.shape[:2])[..., None] > np.cumsum(p, -1)).sum(-1).astype(float)
    elif family == "bernoulli":
        y = (rng.uniform(size=(300, D)) < np.asarray(true.probs)[z]).astype(float)
    elif family == "diag":
        y = np.asarray(true.means)[z] + rng.normal(size=(300, D))
    else:
        y = np.asarray(true.means)[z] + rng.standard_t(4.0, size=(300, D))
    y[10:13, 0] = np.nan
    _, history = ps.learn.em(ps.models.HMM(pi, np.full((K, K), 1 / K), init), y, 20)
    assert_monotone(history)


def test_em_never_nan_when_a_state_empties(em_data):
    init, y = em_data
    means = np.asarray(init.emissions.means).copy()
    means[2] = 1e4  # state 2 gets exactly zero responsibility
    model = ps.models.HMM(np.array([0.5, 0.5, 0.0]), init.transition_matrix,
                          ps.emissions.Gaussian(means, init.emissions.covs))
    fitted, single = ps.learn.em(model, y, 10)
    assert_monotone(single)
    for leaf in jax.tree_util.tree_leaves(fitted):
        assert np.all(np.isfinite(np.asarray(leaf)))
    np.testing.assert_allclose(np.asarray(fitted.transition_matrix).sum(1), 1.0)
    # a Dirichlet concentration of exactly 1 (dynamax's NaN case) and restarts stay finite too
    fitted, history = ps.learn.em(model, y, 10, prior=ps.learn.HMMPrior(1.0, 1.0), num_restarts=3,
                                  key=jax.random.PRNGKey(0))
    assert_monotone(history)
    # restarts return the best of restart 0 (the given model, fitted above without restarts: the
    # same deterministic run) and the random ones
    assert float(history[-1]) >= float(single[-1]) - 1e-9


def test_em_compiles_once(em_data):
    init, y = em_data
    ps.learn.em(init, y, 10)
    size = bw_module._fit._cache_size()
    other = ps.models.HMM(np.array([0.2, 0.3, 0.5]), init.transition_matrix,
                          ps.emissions.Gaussian(np.asarray(init.emissions.means) + 1.0, init.emissions.covs))
    ps.learn.em(other, y + 0.5, 10)
    assert bw_module._fit._cache_size() == size


def test_engine_compiles_once_per_shape(em_data):
    init, y = em_data
    engine = importlib.import_module("probssm.inference.hmm")
    ps.hmm.smoother(init, y)
    size = engine._run._cache_size()
    other = ps.models.HMM(np.array([0.2, 0.3, 0.5]), init.transition_matrix,
                          ps.emissions.Gaussian(np.asarray(init.emissions.means) - 1.0, init.emissions.covs))
    ps.hmm.smoother(other, y + 1.0)
    assert engine._run._cache_size() == size


def _count_traces(monkeypatch, module, name):
    """Wrap ``module.name`` with a Python-side counter; the wrapper runs only while jax traces."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("parallel", [False, True])
def test_forward_backward_traces_once(em_data, monkeypatch, parallel):
    """A second smoother call on new data and a new model of the same shapes does not re-trace
    (a shape unused elsewhere, so the first call traces here)."""
    init, y = em_data
    fb_module = importlib.import_module("probssm.inference.forward_backward")
    calls = _count_traces(monkeypatch, fb_module, "_smooth_one")
    y = y[:123]
    first = ps.hmm.smoother(init, y, parallel=parallel)
    assert len(calls) == 1
    other = ps.models.HMM(np.array([0.2, 0.3, 0.5]), init.transition_matrix,
                          ps.emissions.Gaussian(np.asarray(init.emissions.means) + 0.5, init.emissions.covs))
    second = ps.hmm.smoother(other, y + 0.25, parallel=parallel)
    assert len(calls) == 1
    assert not np.allclose(first.log_likelihood, second.log_likelihood)


def test_baum_welch_traces_once(em_data, monkeypatch):
    """A second fit with new data of the same shape (and a new starting model) does not re-trace
    the compiled fit: the E-step's forward-backward is traced once."""
    init, y = em_data
    calls = _count_traces(monkeypatch, bw_module.hmm_engine, "smoother_params")
    y = y[:131]
    ps.learn.em(init, y, 5, progress=False)
    assert len(calls) == 1
    size = bw_module._fit._cache_size()
    other = ps.models.HMM(np.array([0.2, 0.3, 0.5]), init.transition_matrix,
                          ps.emissions.Gaussian(np.asarray(init.emissions.means) - 0.5, init.emissions.covs))
    _, history = ps.learn.em(other, y - 0.25, 5, progress=False)
    assert len(calls) == 1
    assert bw_module._fit._cache_size() == size
    assert np.all(np.isfinite(np.asarray(history)))


def test_em_tol_stops_updating(em_data):
    init, y = em_data
    _, h = ps.learn.em(init, y, 10, tol=20.0)
    assert_monotone(h)
    assert float(h[-1]) == float(h[-2])


# ----------------------------------------------------------------------------------------------
# GLM interface
# ----------------------------------------------------------------------------------------------
class SoftplusPoissonGLM(ps.emissions.AbstractGLMEmissions):
    weights: jax.Array
    biases: jax.Array
    num_m_steps = 30

    def mean_function(self, eta):
        return jax.nn.softplus(eta)

    def log_prob(self, y, mean):
        return y * jnp.log(mean) - mean - jax.scipy.special.gammaln(y + 1.0)

    def distribution(self, state, inputs=None):
        import numpyro.distributions as dist

        return dist.Poisson(self.mean_function(self.weights[state] @ inputs + self.biases[state])).to_event(1)


def test_glm_interface_generalised_em():
    rng = np.random.default_rng(15)
    T, U = 300, 2
    u = rng.normal(size=(T, U))
    true = SoftplusPoissonGLM(jnp.asarray(rng.normal(size=(K, D, U))), jnp.asarray(rng.normal(size=(K, D))))
    z = rng.integers(0, K, T)
    mean = np.asarray(true.mean_function(true.predictor(jnp.asarray(u))))[np.arange(T), z]
    y = rng.poisson(mean).astype(float)
    init = SoftplusPoissonGLM(jnp.zeros((K, D, U)), jnp.asarray(rng.normal(size=(K, D))))
    model = ps.models.HMM(np.ones(K) / K, np.full((K, K), 1 / K), init)
    _, history = ps.learn.em(model, y, 8, inputs=u)
    h = np.asarray(history)
    assert np.all(np.isfinite(h)) and h[-1] > h[0]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_argument(em_data):
    init, y = em_data
    e = init.emissions
    with pytest.raises(ValueError, match="initial_probs"):
        ps.models.HMM(np.array([0.5, 0.4, 0.3]), init.transition_matrix, e)
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.models.HMM(init.initial_probs, np.full((K, K), 0.5), e)
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.models.HMM(init.initial_probs, np.full((K, K + 1), 1 / (K + 1)), e)
    with pytest.raises(ValueError, match="emissions"):
        ps.models.HMM(init.initial_probs, init.transition_matrix, "gaussian")
    with pytest.raises(ValueError, match="covs"):
        ps.emissions.Gaussian(np.zeros((K, D)), -np.stack([np.eye(D)] * K))
    with pytest.raises(ValueError, match="probs"):
        ps.emissions.Categorical(np.full((K, 3), 0.5))
    with pytest.raises(ValueError, match="emissions"):
        ps.hmm.smoother(init, y[:, :1])
    with pytest.raises(ValueError, match="plausibility"):
        ps.hmm.smoother(init, y, plausibility=-np.ones((len(y), K)))
    with pytest.raises(ValueError, match="plausibility"):
        ps.hmm.smoother(init, y, plausibility=np.ones((len(y), K + 1)))
    with pytest.raises(ValueError, match="lengths"):
        ps.hmm.smoother(init, np.stack([y, y]), lengths=np.array([len(y), len(y) + 1]))
    with pytest.raises(ValueError, match="lengths"):
        ps.hmm.smoother(init, np.stack([y, y]), lengths=np.array([3]))
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.em(init, y, 3, fixed=("emissions.bogus",))
    with pytest.raises(ValueError, match="prior"):
        ps.learn.em(init, y, 3, prior=ps.learn.HMMPrior(0.5, 1.0))
    with pytest.raises(ValueError, match="key"):
        ps.learn.em(init, y, 3, num_restarts=2)
    with pytest.raises(ValueError, match="model"):
        ps.hmm.smoother(random_hmm(0, time_varying=7), y)


# ----------------------------------------------------------------------------------------------
# float32 and statistics
# ----------------------------------------------------------------------------------------------
def test_float32_long_sequence():
    T = 100_000
    model64 = random_hmm(16, D=1)
    _, y = np_sample(model64, T, 9)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    e = model64.emissions
    model32 = ps.models.HMM(f32(model64.initial_probs), f32(model64.transition_matrix),
                            ps.emissions.Gaussian(f32(e.means), f32(e.covs)))
    r64 = ps.hmm.smoother(model64, y)
    r32 = ps.hmm.smoother(model32, f32(y))
    p32 = ps.hmm.smoother(model32, f32(y), parallel=True)
    assert r32.smoothed_probs.dtype == jnp.float32
    for r in (r32, p32):
        assert np.all(np.isfinite(np.asarray(r.smoothed_probs)))
        np.testing.assert_allclose(float(r.log_likelihood), float(r64.log_likelihood), rtol=1e-5)
        assert np.abs(np.asarray(r.smoothed_probs, np.float64) - np.asarray(r64.smoothed_probs)).max() < 1e-3


@pytest.mark.slow
def test_em_recovers_gaussian_means():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(17)
    means = np.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]])
    true = ps.models.HMM(np.ones(K) / K, np.full((K, K), 0.05) + 0.85 * np.eye(K),
                         ps.emissions.Gaussian(means, np.stack([np.eye(D)] * K)))
    _, y = np_sample(true, 10_000, 10)
    init = ps.models.HMM(np.ones(K) / K, np.full((K, K), 1 / K),
                         ps.emissions.Gaussian(rng.normal(size=(K, D)), np.stack([np.eye(D)] * K)))
    fitted, history = ps.learn.em(init, y, 100, num_restarts=4, key=jax.random.PRNGKey(2))
    assert_monotone(history)
    est = np.asarray(fitted.emissions.means)
    cost = ((est[:, None] - means[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    assert np.abs(est[r] - means[c]).max() < 0.05
