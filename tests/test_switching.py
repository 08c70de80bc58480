"""Switching linear dynamical systems: models, exact enumeration, IMM / GPB2, RBPF, most likely modes.

Oracles: a plain-numpy enumeration of all K^T mode paths with the textbook Kalman filter and RTS
smoother of tests/reference.py per path (independent of the engines' kernels); `ps.kalman` for one
mode; unbiasedness of exp(log Z) for the RBPF (tolerance from the sample standard error).
Shapes are shared across tests (K = 2, d = p = 2, T = 8) so each engine compiles once.
"""
from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from reference import one_mode
from reference import kalman_filter_numpy, rts_smoother_numpy

T, D, K = 8, 2, 2


def random_slds(seed, K=K, d=D, p=D, separation=1.0, shared_emissions=False):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(K))
    A = rng.dirichlet(np.ones(K) * 2, size=K) + 2 * np.eye(K)
    A /= A.sum(1, keepdims=True)
    m1 = rng.normal(size=(K, d))
    L = rng.normal(size=(K, d, d)) * 0.3
    P1 = L @ np.swapaxes(L, 1, 2) + 0.5 * np.eye(d)
    F = np.stack([0.9 * np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(K)])
    b = separation * rng.normal(size=(K, d))
    Lq = rng.normal(size=(K, d, d)) * 0.3
    Q = Lq @ np.swapaxes(Lq, 1, 2) + 0.1 * np.eye(d)
    H = rng.normal(size=(p, d)) if shared_emissions else rng.normal(size=(K, p, d))
    dd = separation * rng.normal(size=(K, p))
    Lr = rng.normal(size=(K, p, p)) * 0.2
    R = Lr @ np.swapaxes(Lr, 1, 2) + 0.2 * np.eye(p)
    return ps.models.SLDS(pi, A, m1, P1, F, Q, H, R, dynamics_offsets=b, emission_offsets=dd)


def data(model, seed, missing=True):
    states, y = ps.sample(jax.random.key(seed), model, T)
    y = np.array(y)
    if missing:
        y[3, 0] = np.nan  # a partly missing row
        y[5] = np.nan  # a wholly missing row
    return states, jnp.asarray(y)


def enumerate_numpy(model, y):
    """All K^T paths, a numpy Kalman filter / RTS smoother each: log p(y), p(z_t | y), p(z_t | y_{:t}),
    E[x_t | y], MAP path."""
    Km = model.num_modes
    H = np.broadcast_to(np.asarray(model.emission_matrices), (Km, D, D)) if model.shared_emissions \
        else np.asarray(model.emission_matrices)
    dd = np.broadcast_to(np.asarray(model.emission_offsets), (Km, D))
    R = np.broadcast_to(np.asarray(model.emission_covs), (Km, D, D))
    pi, A = np.asarray(model.initial_probs), np.asarray(model.transition_matrix)
    F, b, Q = (np.asarray(a) for a in (model.dynamics_matrices, model.dynamics_offsets, model.dynamics_covs))
    m1, P1 = np.asarray(model.initial_means), np.asarray(model.initial_covs)
    ys = np.asarray(y)
    joint, prefix, paths, smeans, fmeans = [], [], [], [], []
    for path in itertools.product(range(Km), repeat=len(ys)):
        z = list(path)
        ll_steps = []
        # per-step log-likelihood from the prefix filters
        lp = np.log(pi[z[0]]) + sum(np.log(A[z[t - 1], z[t]]) for t in range(1, len(z)))
        ll, ms, Ps, mps, Pps = kalman_filter_numpy(m1[z[0]], P1[z[0]], F[z], b[z], Q[z], H[z], dd[z], R[z], ys)
        for t in range(len(z)):
            ll_steps.append(kalman_filter_numpy(m1[z[0]], P1[z[0]], F[z], b[z], Q[z], H[z], dd[z], R[z],
                                                ys[: t + 1])[0])
        sm, _ = rts_smoother_numpy(F[z], ms, Ps, mps, Pps)
        joint.append(lp + ll)
        prefix.append(lp + np.array(ll_steps))
        paths.append(z)
        smeans.append(sm)
        fmeans.append(ms)
    joint, prefix, paths = np.array(joint), np.array(prefix), np.array(paths)
    ll = np.logaddexp.reduce(joint)
    w = np.exp(joint - ll)
    onehot = np.eye(Km)[paths]
    wt = np.exp(prefix - np.logaddexp.reduce(prefix, axis=0))
    return dict(ll=ll, smoothed=np.einsum("p,ptk->tk", w, onehot), filtered=np.einsum("pt,ptk->tk", wt, onehot),
                smoothed_means=np.einsum("p,ptd->td", w, np.array(smeans)),
                filtered_means=np.einsum("pt,ptd->td", wt, np.array(fmeans)), map=paths[np.argmax(joint)])


MODEL = random_slds(0)
STATES, Y = data(MODEL, 1)


@pytest.fixture(scope="module")
def oracle():
    return enumerate_numpy(MODEL, Y)


# ----------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------
def test_exact_matches_numpy_enumeration(oracle):
    r = ps.switching.exact(MODEL, Y)
    assert abs(float(r.log_likelihood) - oracle["ll"]) < 1e-10
    np.testing.assert_allclose(r.smoothed_mode_probs, oracle["smoothed"], atol=1e-10)
    np.testing.assert_allclose(r.filtered_mode_probs, oracle["filtered"], atol=1e-10)
    np.testing.assert_allclose(r.smoothed_means, oracle["smoothed_means"], atol=1e-9)
    np.testing.assert_allclose(r.filtered_means, oracle["filtered_means"], atol=1e-9)
    np.testing.assert_array_equal(r.most_likely_modes, oracle["map"])
    np.testing.assert_array_equal(ps.switching.most_likely_modes(MODEL, Y, method="exact"), oracle["map"])
    assert float(ps.switching.exact_log_likelihood(MODEL, Y)) == pytest.approx(oracle["ll"], abs=1e-10)


def identical_modes(model):
    """K = 2 copies of mode 0 of ``model`` (same shapes as MODEL, so the engines' compiled code is shared)."""
    m1, lg = one_mode(model)
    two = eqx.tree_at(lambda s: (s.initial_means, s.initial_covs, s.dynamics_matrices, s.dynamics_covs,
                                 s.dynamics_offsets, s.emission_matrices, s.emission_covs, s.emission_offsets),
                      model, tuple(jnp.concatenate([a, a]) for a in (
                          m1.initial_means, m1.initial_covs, m1.dynamics_matrices, m1.dynamics_covs,
                          m1.dynamics_offsets, m1.emission_matrices, m1.emission_covs, m1.emission_offsets)))
    return two, lg


# One particle count and one number of VI sweeps for every CI test: each engine compiles once.
NUM_PARTICLES, NUM_SWEEPS, NUM_RUNS = 8, 8, 256


@jax.jit
def _rbpf_runs(model, keys, y):
    """NUM_RUNS independent RBPF runs (the model is an argument: every K = 2 model shares this compile)."""
    return jax.vmap(lambda k: ps.switching.rbpf(k, model, y, NUM_PARTICLES))(keys)


def test_identical_modes_every_engine_equals_kalman():
    """K = 2 copies of one system: the mode is irrelevant, so every engine is the Kalman filter / smoother
    (IMM / GPB2 / RBPF / exact filtering and smoothing, structured VI's q(x) and ELBO), at the CI shapes."""
    two, lg = identical_modes(MODEL)
    kf = ps.kalman.smoother(lg, Y)
    ex = ps.switching.exact(two, Y)
    assert abs(float(ex.log_likelihood - kf.log_likelihood)) < 1e-10
    np.testing.assert_allclose(ex.filtered_means, kf.filtered_means, atol=1e-10)
    np.testing.assert_allclose(ex.smoothed_means, kf.smoothed_means, atol=1e-10)
    np.testing.assert_allclose(ex.smoothed_covs, kf.smoothed_covs, atol=1e-10)
    for engine in (ps.switching.imm, ps.switching.gpb2):
        r = engine(two, Y)
        assert abs(float(r.log_likelihood - kf.log_likelihood)) < 1e-10
        np.testing.assert_allclose(r.filtered_means, kf.filtered_means, atol=1e-10)
        np.testing.assert_allclose(r.filtered_covs, kf.filtered_covs, atol=1e-10)
    pf = _rbpf_runs(two, jax.random.split(jax.random.key(3), NUM_RUNS), Y)  # every run is exact
    np.testing.assert_allclose(pf.log_likelihood, np.full(NUM_RUNS, float(kf.log_likelihood)), atol=1e-10)
    np.testing.assert_allclose(pf.filtered_means, np.broadcast_to(kf.filtered_means, pf.filtered_means.shape), atol=1e-10)
    np.testing.assert_allclose(pf.smoothed_means, np.broadcast_to(kf.smoothed_means, pf.smoothed_means.shape), atol=1e-10)
    vi = ps.switching.structured_vi(two, Y, NUM_SWEEPS)  # the modes are irrelevant: q(z) q(x) is exact
    np.testing.assert_allclose(vi.elbo, kf.log_likelihood, atol=1e-10)
    np.testing.assert_allclose(vi.means, kf.smoothed_means, atol=1e-10)
    np.testing.assert_allclose(vi.covs, kf.smoothed_covs, atol=1e-10)
    np.testing.assert_allclose(vi.cross_covs, kf.smoothed_cross_covs, atol=1e-10)


def test_one_mode_engines_equal_kalman():
    """K = 1 (the acceptance case proper): exact, IMM and GPB2 equal ps.kalman in CI; the RBPF and structured
    VI (the costly compiles) at K = 1 run in the slow test below (at K = 2 identical modes they run in CI)."""
    m, lg = one_mode(MODEL)
    kf = ps.kalman.smoother(lg, Y)
    ex = ps.switching.exact(m, Y)
    assert abs(float(ex.log_likelihood - kf.log_likelihood)) < 1e-10
    np.testing.assert_allclose(ex.smoothed_means, kf.smoothed_means, atol=1e-10)
    np.testing.assert_allclose(ex.smoothed_covs, kf.smoothed_covs, atol=1e-10)
    for engine in (ps.switching.imm, ps.switching.gpb2):
        r = engine(m, Y)
        assert abs(float(r.log_likelihood - kf.log_likelihood)) < 1e-10
        np.testing.assert_allclose(r.filtered_means, kf.filtered_means, atol=1e-10)
        np.testing.assert_allclose(r.filtered_covs, kf.filtered_covs, atol=1e-10)


@pytest.mark.slow
def test_one_mode_rbpf_and_structured_vi_equal_kalman():
    m, lg = one_mode(MODEL)
    kf = ps.kalman.smoother(lg, Y)
    pf = ps.switching.rbpf(jax.random.key(0), m, Y, 4)
    assert abs(float(pf.log_likelihood - kf.log_likelihood)) < 1e-10
    np.testing.assert_allclose(pf.filtered_means, kf.filtered_means, atol=1e-10)
    np.testing.assert_allclose(pf.smoothed_means, kf.smoothed_means, atol=1e-10)
    vi = ps.switching.structured_vi(m, Y, 2)
    np.testing.assert_allclose(vi.elbo, kf.log_likelihood, atol=1e-10)
    np.testing.assert_allclose(vi.means, kf.smoothed_means, atol=1e-10)
    np.testing.assert_allclose(vi.covs, kf.smoothed_covs, atol=1e-10)
    np.testing.assert_allclose(vi.cross_covs, kf.smoothed_cross_covs, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# IMM / GPB2: approximation error against the exact log-likelihood
# ----------------------------------------------------------------------------------------------
# Stated in the docstrings of imm / gpb2 (measured on 40 random models of `random_slds`, T = 8,
# offsets scale 0.3: |error| mean 0.24 / max 1.6 nats for IMM, mean 0.05 / max 0.5 for GPB2).
IMM_BOUND, GPB2_BOUND = 2.0, 0.6


def test_imm_gpb2_within_stated_error_of_exact():
    errs = {"imm": [], "gpb2": []}
    for seed in range(8):
        model = random_slds(100 + seed, separation=0.3)
        _, y = data(model, 200 + seed)
        ex = ps.switching.exact(model, y)
        for name, engine in (("imm", ps.switching.imm), ("gpb2", ps.switching.gpb2)):
            errs[name].append(abs(float(engine(model, y).log_likelihood - ex.log_likelihood)))
    assert max(errs["imm"]) < IMM_BOUND and max(errs["gpb2"]) < GPB2_BOUND, errs
    assert np.mean(errs["gpb2"]) < np.mean(errs["imm"]), errs
    # the approximations are not exact on these problems (the test could fail on a wrong oracle)
    assert min(max(errs["gpb2"]), max(errs["imm"])) > 1e-3, errs


def test_gpb2_is_exact_for_two_steps():
    """GPB2 keeps every (z_0, z_1) pair exactly: after two observed steps nothing is collapsed yet. The rows
    from t = 2 on are missing (they add nothing to log p(y)), which keeps the CI shapes (T = 8)."""
    for seed in range(3):
        model = random_slds(100 + seed)
        _, y = data(model, 200 + seed, missing=False)
        y = y.at[2:].set(jnp.nan)
        ex = ps.switching.exact(model, y)
        g = ps.switching.gpb2(model, y)
        assert abs(float(g.log_likelihood - ex.log_likelihood)) < 1e-10
        np.testing.assert_allclose(g.filtered_mode_probs[:2], ex.filtered_mode_probs[:2], atol=1e-10)
        np.testing.assert_allclose(g.filtered_means[:2], ex.filtered_means[:2], atol=1e-10)
    # and the test can fail: with a third observed step GPB2 is no longer exact
    _, y = data(model, 200 + seed, missing=False)
    y = y.at[3:].set(jnp.nan)
    assert abs(float(ps.switching.gpb2(model, y).log_likelihood - ps.switching.exact(model, y).log_likelihood)) > 1e-8


# ----------------------------------------------------------------------------------------------
# RBPF
# ----------------------------------------------------------------------------------------------
def test_rbpf_likelihood_unbiased(oracle):
    lls = np.asarray(_rbpf_runs(MODEL, jax.random.split(jax.random.key(7), NUM_RUNS), Y).log_likelihood)
    ratio = np.exp(lls - oracle["ll"])
    se = ratio.std(ddof=1) / np.sqrt(NUM_RUNS)
    assert se > 1e-4, "the estimator has no variance here: the test cannot fail"
    assert abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)


@pytest.mark.slow
def test_rbpf_mode_marginals_close_to_exact(oracle):
    runs = 16
    f = jax.jit(jax.vmap(lambda k: ps.switching.rbpf(k, MODEL, Y, 400)))
    r = f(jax.random.split(jax.random.key(11), runs))
    for est, exact in ((r.filtered_mode_probs, oracle["filtered"]), (r.smoothed_mode_probs, oracle["smoothed"])):
        est = np.asarray(est)
        mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(runs)
        assert np.all(np.abs(mean - exact) <= 4 * se + 1e-12), (np.abs(mean - exact) / se).max()


@pytest.mark.slow
def test_generic_particle_filter_runs_on_the_protocol_state(oracle):
    """ps.smc's bootstrap filter on the joint state [z, x]: its exp(log Z) is unbiased for the exact p(y).
    (ps.smc drops a partly missing row whole: the data here have whole rows missing only.)"""
    runs = 200
    y = Y.at[3].set(jnp.nan)
    f = jax.jit(jax.vmap(lambda k: ps.smc.particle_filter(k, MODEL, y, 64).log_likelihood))
    ratio = np.exp(np.asarray(f(jax.random.split(jax.random.key(3), runs))) - float(ps.switching.exact(MODEL, y).log_likelihood))
    se = ratio.std(ddof=1) / np.sqrt(runs)
    assert se > 1e-4 and abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)


# ----------------------------------------------------------------------------------------------
# Most likely modes
# ----------------------------------------------------------------------------------------------
def test_most_likely_modes_match_exact_map_when_separated():
    model = random_slds(5, separation=4.0)
    _, y = data(model, 6, missing=False)
    exact = ps.switching.exact(model, y).most_likely_modes
    np.testing.assert_array_equal(ps.switching.most_likely_modes(model, y), exact)
    np.testing.assert_array_equal(ps.switching.most_likely_modes(model, y, method="imm"), exact)


# ----------------------------------------------------------------------------------------------
# Models: protocol, sampling, recurrence
# ----------------------------------------------------------------------------------------------
def test_protocol_joint_density_matches_hand_computation():
    s = np.asarray(STATES)
    u = None
    total = MODEL.initial(u).log_prob(s[0]) + sum(MODEL.transition(s[t - 1], t, u).log_prob(s[t]) for t in range(1, T))
    z, x = s[:, 0].astype(int), s[:, 1:]

    def mvn(v, mu, S):
        r = v - mu
        return -0.5 * (r @ np.linalg.solve(S, r) + np.linalg.slogdet(2 * np.pi * S)[1])

    A, F, b, Q = (np.asarray(a) for a in (MODEL.transition_matrix, MODEL.dynamics_matrices, MODEL.dynamics_offsets,
                                          MODEL.dynamics_covs))
    ref = np.log(MODEL.initial_probs[z[0]]) + mvn(x[0], MODEL.initial_means[z[0]], MODEL.initial_covs[z[0]])
    for t in range(1, T):
        ref += np.log(A[z[t - 1], z[t]]) + mvn(x[t], F[z[t]] @ x[t - 1] + b[z[t]], Q[z[t]])
    assert float(total) == pytest.approx(float(ref), abs=1e-10)
    em = MODEL.emission(s[2], 2, u).log_prob(np.asarray(Y[2]))
    ref_em = mvn(np.asarray(Y[2]), MODEL.emission_matrices[z[2]] @ x[2] + MODEL.emission_offsets[z[2]],
                 MODEL.emission_covs[z[2]])
    assert float(em) == pytest.approx(float(ref_em), abs=1e-10)
    assert set(np.unique(z)) <= {0, 1}


def test_recurrent_with_zero_weights_equals_slds():
    """W = 0 and r[i] = log A[i]: the recurrent model is the Markov SLDS."""
    rs = ps.models.RecurrentSLDS(MODEL.initial_probs, jnp.zeros((K, K, D)), MODEL.initial_means, MODEL.initial_covs,
                                 MODEL.dynamics_matrices, MODEL.dynamics_covs, MODEL.emission_matrices,
                                 MODEL.emission_covs, recurrence_biases=jnp.log(MODEL.transition_matrix),
                                 dynamics_offsets=MODEL.dynamics_offsets, emission_offsets=MODEL.emission_offsets)
    assert rs.is_recurrent
    for engine in (ps.switching.imm, ps.switching.gpb2):
        a, b = engine(rs, Y), engine(MODEL, Y)
        assert abs(float(a.log_likelihood - b.log_likelihood)) < 1e-12


@pytest.mark.slow
def test_recurrent_most_likely_modes_and_sampling():
    rs = ps.models.RecurrentSLDS(MODEL.initial_probs, jnp.zeros((K, K, D)), MODEL.initial_means, MODEL.initial_covs,
                                 MODEL.dynamics_matrices, MODEL.dynamics_covs, MODEL.emission_matrices,
                                 MODEL.emission_covs, recurrence_biases=jnp.log(MODEL.transition_matrix),
                                 dynamics_offsets=MODEL.dynamics_offsets, emission_offsets=MODEL.emission_offsets)
    np.testing.assert_array_equal(ps.switching.most_likely_modes(rs, Y), ps.switching.most_likely_modes(MODEL, Y))
    s, y = ps.sample(jax.random.key(2), rs, T)
    assert s.shape == (T, 1 + D) and y.shape == (T, D)
    assert set(np.unique(np.asarray(s[:, 0]))) <= {0.0, 1.0}


def test_recurrent_transitions_read_the_state():
    W = jnp.array([[[4.0, 0.0], [-4.0, 0.0]], [[4.0, 0.0], [-4.0, 0.0]]])
    rs = ps.models.RecurrentSLDS(MODEL.initial_probs, W, MODEL.initial_means, MODEL.initial_covs,
                                 MODEL.dynamics_matrices, MODEL.dynamics_covs, MODEL.emission_matrices,
                                 MODEL.emission_covs)
    x = jnp.array([1.0, 0.0])
    expected = jax.nn.log_softmax(jnp.array([4.0, -4.0]))
    np.testing.assert_allclose(rs.log_mode_transitions(x, 1)[1], expected, atol=1e-12)
    d = rs.transition(jnp.concatenate([jnp.ones(1), x]), 1)
    draws = d.sample(jax.random.key(0), (400,))
    assert float(jnp.mean(draws[:, 0] == 0)) > 0.99  # p(z = 0) = 1 - 3e-4


# ----------------------------------------------------------------------------------------------
# Batches, missing data, transforms
# ----------------------------------------------------------------------------------------------
def test_batch_with_lengths_equals_single_sequences():
    y2 = jnp.stack([Y, jnp.where(jnp.arange(T)[:, None] < 5, Y[::-1], 0.0)])
    r = ps.switching.gpb2(MODEL, y2, lengths=jnp.array([T, 5]))
    single = ps.switching.gpb2(MODEL, jnp.where(jnp.arange(T)[:, None] < 5, Y[::-1], jnp.nan))
    assert float(r.log_likelihood[0]) == pytest.approx(float(ps.switching.gpb2(MODEL, Y).log_likelihood), abs=1e-12)
    assert float(r.log_likelihood[1]) == pytest.approx(float(single.log_likelihood), abs=1e-12)


@pytest.mark.slow
def test_rbpf_and_exact_on_a_padded_batch_equal_kalman_with_one_mode():
    m, lg = one_mode(MODEL)
    y2 = jnp.stack([Y, jnp.where(jnp.arange(T)[:, None] < 5, Y[::-1], 0.0)])
    lengths = jnp.array([T, 5])
    kf = ps.kalman.filter(lg, y2, lengths=lengths)
    pf = ps.switching.rbpf(jax.random.key(0), m, y2, 4, lengths=lengths)
    ex = ps.switching.exact(m, y2, lengths=lengths)
    np.testing.assert_allclose(pf.log_likelihood, kf.log_likelihood, atol=1e-10)
    np.testing.assert_allclose(ex.log_likelihood, kf.log_likelihood, atol=1e-10)
    assert pf.modes.shape == (2, T, 4)


@pytest.mark.slow
def test_grad_of_imm_log_likelihood_matches_finite_difference():
    def f(scale):
        m = eqx.tree_at(lambda s: s.emission_covs, MODEL, MODEL.emission_covs * scale)
        return ps.switching.imm(m, Y).log_likelihood

    g = jax.jit(jax.grad(f))(1.0)
    h = 1e-5
    fd = (f(1.0 + h) - f(1.0 - h)) / (2 * h)
    assert float(g) == pytest.approx(float(fd), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _args(**over):
    a = dict(initial_probs=MODEL.initial_probs, transition_matrix=MODEL.transition_matrix,
             initial_means=MODEL.initial_means, initial_covs=MODEL.initial_covs,
             dynamics_matrices=MODEL.dynamics_matrices, dynamics_covs=MODEL.dynamics_covs,
             emission_matrices=MODEL.emission_matrices, emission_covs=MODEL.emission_covs)
    a.update(over)
    return a


def test_bad_parameters_raise_naming_the_argument():
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.models.SLDS(**_args(transition_matrix=jnp.array([[0.5, 0.6], [0.5, 0.5]])))
    with pytest.raises(ValueError, match="dynamics_covs.*definite"):
        ps.models.SLDS(**_args(dynamics_covs=-jnp.stack([jnp.eye(D)] * K)))
    with pytest.raises(ValueError, match="emission_matrices"):
        ps.models.SLDS(**_args(emission_matrices=jnp.ones((3, D, D))))
    with pytest.raises(ValueError, match="initial_probs"):
        ps.models.SLDS(**_args(initial_probs=jnp.array([0.7, 0.7])))
    a = _args()
    del a["transition_matrix"]
    with pytest.raises(ValueError, match="recurrence_weights"):
        ps.models.RecurrentSLDS(recurrence_weights=jnp.zeros((K, 3)), **a)
    with pytest.raises(ValueError, match="recurrence_biases"):
        ps.models.RecurrentSLDS(recurrence_weights=jnp.zeros((K, D)), recurrence_biases=jnp.zeros(3), **a)


def test_engines_check_models_changed_after_construction():
    bad_A = eqx.tree_at(lambda s: s.transition_matrix, MODEL, jnp.array([[0.5, 0.6], [0.5, 0.5]]))
    bad_Q = eqx.tree_at(lambda s: s.dynamics_covs, MODEL, -MODEL.dynamics_covs)
    for engine in (ps.switching.exact, ps.switching.imm, ps.switching.gpb2, ps.switching.most_likely_modes):
        with pytest.raises(ValueError, match="transition_matrix"):
            engine(bad_A, Y)
        with pytest.raises(ValueError, match="dynamics_covs"):
            engine(bad_Q, Y)
    with pytest.raises(ValueError, match="transition_matrix"):
        ps.switching.rbpf(jax.random.key(0), bad_A, Y, 4)
    rs = ps.models.RecurrentSLDS(MODEL.initial_probs, jnp.zeros((K, K, D)), MODEL.initial_means, MODEL.initial_covs,
                                 MODEL.dynamics_matrices, MODEL.dynamics_covs, MODEL.emission_matrices,
                                 MODEL.emission_covs)
    bad_W = eqx.tree_at(lambda s: s.recurrence_weights, rs, jnp.zeros((K, 3)))
    with pytest.raises(ValueError, match="recurrence_weights"):
        ps.switching.imm(bad_W, Y)
    with pytest.raises(ValueError, match="model.*Markov"):
        ps.switching.exact(rs, Y)
    with pytest.raises(ValueError, match="model.*Markov"):
        ps.switching.rbpf(jax.random.key(0), rs, Y, 4)


def test_bad_data_and_options_raise():
    with pytest.raises(ValueError, match="emissions.*max_paths"):
        ps.switching.exact(MODEL, jnp.zeros((13, D)))
    with pytest.raises(ValueError, match="emissions"):
        ps.switching.imm(MODEL, jnp.zeros((T, 3)))
    with pytest.raises(ValueError, match="emissions.*inf"):
        ps.switching.gpb2(MODEL, Y.at[0, 0].set(jnp.inf))
    with pytest.raises(ValueError, match="num_particles"):
        ps.switching.rbpf(jax.random.key(0), MODEL, Y, 1)
    with pytest.raises(ValueError, match="method"):
        ps.switching.most_likely_modes(MODEL, Y, method="nope")
    with pytest.raises(ValueError, match="model"):
        ps.switching.imm(ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.eye(1), jnp.eye(1), jnp.eye(1),
                                                     jnp.eye(1)), Y[:, :1])


# ----------------------------------------------------------------------------------------------
# Structured VI and variational EM
# ----------------------------------------------------------------------------------------------
def test_structured_vi_elbo_below_exact_and_rising(oracle):
    r = ps.switching.structured_vi(MODEL, Y, NUM_SWEEPS)
    elbo = np.asarray(r.elbo)
    assert np.all(np.diff(elbo) >= -1e-10 * np.abs(elbo[1:])), np.diff(elbo)
    assert elbo[-1] <= oracle["ll"] + 1e-10
    assert oracle["ll"] - elbo[-1] < 0.1  # a near-deterministic mode posterior: a tight bound here
    np.testing.assert_allclose(r.mode_probs.sum(1), 1.0, atol=1e-12)


@pytest.mark.slow
def test_variational_em_elbo_rises_and_stays_below_log_likelihood():
    ys = jnp.stack([ps.sample(jax.random.key(s), MODEL, T)[1] for s in range(6)])
    start = random_slds(42)
    fitted, elbos = ps.learn.em(start, ys, 12)
    elbos = np.asarray(elbos)
    assert np.all(np.diff(elbos) > -1e-8 * np.abs(elbos[1:])), np.diff(elbos)
    ll_fitted = float(ps.switching.exact_log_likelihood(fitted, ys))
    assert elbos[-1] <= ll_fitted + 1e-8
    assert ll_fitted > float(ps.switching.exact_log_likelihood(start, ys)) + 100  # it learned something
    # a padded batch of unequal lengths runs and rises too
    f2, e2 = ps.learn.em(start, ys, 4, lengths=jnp.array([8, 5, 7, 8, 6, 8]))
    assert np.all(np.diff(np.asarray(e2)) > -1e-8 * np.abs(np.asarray(e2)[1:]))


def test_variational_em_refuses_bad_arguments():
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.em(MODEL, Y, 2, fixed=("nope",))
    with pytest.raises(ValueError, match="emissions.*fully observed"):
        ps.learn.em(MODEL, Y, 2)  # Y has missing values
