"""Graph-switching dynamical systems (GRASS): the model, structured VI (exact joint chain and
factorised), variational EM.

Oracles: independent `ps.switching.structured_vi` runs per object when the interactions are off
(W = 0); a plain-numpy enumeration of every joint discrete path (modes and edges) with the
textbook Kalman filter of tests/reference.py per object and mode path (log p(y) exactly, an
upper bound on every ELBO); a numpy enumeration of the edge chain's prior marginals.
Shapes are tiny and shared so that each engine compiles once.
"""
from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from reference import kalman_filter_numpy

K, D, P = 2, 2, 2


def make_grass(seed, N, W, edge_weight=0.8):
    rng = np.random.default_rng(seed)
    F = np.stack([0.9 * np.linalg.qr(rng.normal(size=(D, D)))[0] for _ in range(K)])
    Lq = rng.normal(size=(K, D, D)) * 0.3
    Q = Lq @ np.swapaxes(Lq, 1, 2) + 0.1 * np.eye(D)
    L1 = rng.normal(size=(K, D, D)) * 0.3
    P1 = L1 @ np.swapaxes(L1, 1, 2) + 0.5 * np.eye(D)
    return ps.models.GRASS(N, np.array([0.6, 0.4]), np.array([[0.85, 0.15], [0.25, 0.75]]), np.asarray(W, float),
                           rng.normal(size=(K, D)), P1, F, Q, rng.normal(size=(P, D)), 0.3 * np.eye(P),
                           dynamics_offsets=rng.normal(size=(K, D)), emission_offsets=0.2 * rng.normal(size=P),
                           edge_initial_probs=np.array([0.7, 0.3]), edge_biases=np.array([-1.0, 1.5]),
                           edge_weight=edge_weight)


W_ON = np.array([[1.5, -1.0], [-1.2, 1.0]])


# ----------------------------------------------------------------------------------------------
# Fixtures: models, data and the compiled runs shared by the tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    """One draw of the interacting model (N = 2, K = 2, E = 1): 16 steps and their edge inputs."""
    model = make_grass(3, 2, W_ON)
    u = np.random.default_rng(4).normal(size=(16, 1))
    y = eqx.filter_jit(model.sample)(jax.random.key(5), 16, u).emissions
    return model, y, u


@pytest.fixture(scope="module")
def small(data):
    """Interactions on, T = 4 (the enumeration oracle's size)."""
    model, y, u = data
    return model, y[:4], u[:4]


@pytest.fixture(scope="module")
def off(small):
    """The same shapes with the interactions off (W = 0) and a missing value: the compiled runs are
    shared with the other tests."""
    model, y, u = small
    model = eqx.tree_at(lambda m: m.interaction_weights, model, jnp.zeros((K, K)))
    y = y.at[2, 1, 0].set(jnp.nan)
    runs = {m: ps.switching.grass_structured_vi(model, y, 4, edge_inputs=u, method=m) for m in ("exact", "factorised")}
    return model, y, u, runs


# ----------------------------------------------------------------------------------------------
# numpy oracles
# ----------------------------------------------------------------------------------------------
def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def edge_log_probs(model, u):
    """log p(e_t = i | e_{t-1} = j) at [t, m, j, i] from the model's arrays."""
    c, w = np.asarray(model.edge_biases), float(model.edge_weight)
    on = _sigmoid(c[None, None, :] + w * np.asarray(u)[:, :, None])
    return np.log(np.stack([1 - on, on], axis=-1))


def log_likelihood_by_enumeration(model, y, u):
    """log p(y) summing over all joint paths of (z^1..z^N, e^1..e^E), a Kalman filter per object and mode path."""
    N, E, T = model.num_objects, model.num_edges, y.shape[0]
    pi, Pm, W = (np.asarray(a) for a in (model.initial_probs, model.transition_matrix, model.interaction_weights))
    rho = np.asarray(model.edge_initial_probs)
    F, b, Q = (np.asarray(a) for a in (model.dynamics_matrices, model.dynamics_offsets, model.dynamics_covs))
    m1, P1 = np.asarray(model.initial_means), np.asarray(model.initial_covs)
    H, dd, R = (np.asarray(a) for a in (model.emission_matrices, model.emission_offsets, model.emission_covs))
    ys = np.asarray(y)
    pairs = list(itertools.combinations(range(N), 2))
    mode_paths = list(itertools.product(range(K), repeat=T))
    ll = {}
    for n in range(N):
        for z in mode_paths:
            z = list(z)
            ll[n, tuple(z)] = kalman_filter_numpy(m1[z[0]], P1[z[0]], F[z], b[z], Q[z], [H] * T, [dd] * T, [R] * T,
                                                  ys[:, n])[0]
    le = edge_log_probs(model, u)
    total = []
    for zs in itertools.product(mode_paths, repeat=N):
        for es in itertools.product(itertools.product(range(2), repeat=T), repeat=E):
            lp = sum(np.log(pi[zs[n][0]]) for n in range(N)) + sum(np.log(rho[es[m][0]]) for m in range(E))
            for t in range(1, T):
                lp += sum(le[t, m, es[m][t - 1], es[m][t]] for m in range(E))
                adj = np.zeros((N, N))
                for m, (i, j) in enumerate(pairs):
                    adj[i, j] = adj[j, i] = es[m][t]
                for n in range(N):
                    logits = np.log(Pm[zs[n][t - 1]]) + sum(adj[n, o] * W[zs[o][t - 1]] for o in range(N))
                    lp += logits[zs[n][t]] - np.log(np.sum(np.exp(logits)))
            total.append(lp + sum(ll[n, zs[n]] for n in range(N)))
    total = np.asarray(total)
    mx = total.max()
    return mx + np.log(np.sum(np.exp(total - mx)))


def prior_edge_marginals(model, u):
    """q(e_t = 1) of each edge chain under its prior, by forward recursion."""
    le = np.exp(edge_log_probs(model, u))
    T, E = le.shape[:2]
    out = np.zeros((T, E))
    for m in range(E):
        p = np.asarray(model.edge_initial_probs, float)
        out[0, m] = p[1]
        for t in range(1, T):
            p = p @ le[t, m]
            out[t, m] = p[1]
    return out


# ----------------------------------------------------------------------------------------------
# 1. Interactions off: independent SLDS per object
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "factorised"])
def test_interactions_off_equals_independent_slds(off, method):
    model, y, u, runs = off
    r = runs[method]
    slds = model.as_slds()
    elbo = 0.0
    for n in range(model.num_objects):
        s = ps.switching.structured_vi(slds, y[:, n], 4)
        elbo = elbo + s.elbo
        np.testing.assert_allclose(r.mode_probs[:, n], s.mode_probs, atol=1e-10)
        np.testing.assert_allclose(r.means[:, n], s.means, atol=1e-10)
        np.testing.assert_allclose(r.covs[:, n], s.covs, atol=1e-10)
    # the edges decouple: their chain contributes exactly zero and q(e) is their prior
    np.testing.assert_allclose(r.elbo, elbo, rtol=0, atol=1e-10 * max(1.0, float(np.max(np.abs(elbo)))))
    np.testing.assert_allclose(r.edge_probs, prior_edge_marginals(model, u), atol=1e-10)


def test_joint_chain_matches_the_numpy_transition_law(small):
    model, _, u = small
    log_init, logA = model.joint_chain(4, u)
    modes, edges = model.joint_states()
    np.testing.assert_allclose(np.exp(jax.scipy.special.logsumexp(logA, axis=-1)), 1.0, atol=1e-12)
    le = edge_log_probs(model, u)
    Pm, W = np.asarray(model.transition_matrix), np.asarray(model.interaction_weights)
    for s0, s1 in [(0, 7), (5, 2), (3, 3), (6, 1)]:
        e, z0, z1 = edges[s1, 0], modes[s0], modes[s1]
        want = le[2, 0, edges[s0, 0], e]
        for n, o in ((0, 1), (1, 0)):
            logits = np.log(Pm[z0[n]]) + e * W[z0[o]]
            want += logits[z1[n]] - np.log(np.exp(logits).sum())
        np.testing.assert_allclose(logA[1, s0, s1], want, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_init).sum(), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Interactions on: bounded by the exact log-likelihood; EM raises the ELBO
# ----------------------------------------------------------------------------------------------
def test_elbo_below_exact_log_likelihood(small):
    model, y, u = small
    ll = log_likelihood_by_enumeration(model, y, u)
    for method in ("exact", "factorised"):
        r = ps.switching.grass_structured_vi(model, y, 4, edge_inputs=u, method=method)
        assert np.all(np.diff(r.elbo) >= -1e-9), (method, r.elbo)
        assert r.elbo[-1] <= ll + 1e-9, (method, r.elbo[-1], ll)
        assert r.elbo[-1] > ll - 5.0, (method, r.elbo[-1], ll)  # a sensible bound, not a vacuous one
        np.testing.assert_allclose(r.mode_probs.sum(-1), 1.0, atol=1e-10)
        assert r.mode_probs.shape == (4, 2, K) and r.edge_probs.shape == (4, 1) and r.means.shape == (4, 2, D)


def test_exact_first_sweep_equals_dense_forward_backward(small):
    """The exact engine's factorised-transition forward-backward against a dense one on the
    model's (S, S) joint chain: from uniform q(z), sweep 1's ELBO is log Z(psi) + sum_n H[q(x^n)]."""
    model, y, u = small
    r = ps.switching.grass_structured_vi(model, y, 4, edge_inputs=u)  # the compiled run of the test above
    params = model.switching_params(4)
    slds = ps.switching.slds

    @jax.jit
    def per_object(yn):
        m, Pc, Cc, Exx, Exx1 = slds.qx_given_modes(params, yn, jnp.full((4, K), 0.5))
        return slds.expected_log_potentials(params, yn, m, Exx, Exx1), slds.gaussian_chain_entropy(Pc, Cc)

    out = [per_object(y[:, n]) for n in range(2)]
    modes, _ = model.joint_states()
    psi = sum(np.asarray(out[n][0])[:, modes[:, n]] for n in range(2))  # (T, S)
    entropy = sum(float(o[1]) for o in out)
    log_init, logA = (np.asarray(a) for a in model.joint_chain(4, u))
    la = log_init + psi[0]
    for t in range(1, 4):
        la = np.logaddexp.reduce(la[:, None] + logA[t - 1], axis=0) + psi[t]
    np.testing.assert_allclose(r.elbo[0], np.logaddexp.reduce(la) + entropy, rtol=1e-12)


def test_em_raises_the_elbo(data):
    model, y, u = data
    # a batch of 2 sequences (B, T, N, p) with their own edge inputs (B, T, E)
    ys, us = y[4:].reshape(2, 6, 2, P), u[4:].reshape(2, 6, 1)
    start = eqx.tree_at(lambda m: (m.dynamics_offsets, m.emission_covs), model,
                        (0.5 * model.dynamics_offsets, 2.0 * model.emission_covs))
    fitted, elbos = ps.learn.em(start, ys, 6, edge_inputs=us, method="exact", fixed=("edge_weight",))
    assert elbos.shape == (6,)
    assert np.all(np.diff(np.asarray(elbos)) >= -1e-8), elbos
    assert elbos[-1] > elbos[0] + 1.0
    assert float(fitted.edge_weight) == float(start.edge_weight)
    assert not np.allclose(fitted.interaction_weights, start.interaction_weights)
    fitted.check_parameters()


# ----------------------------------------------------------------------------------------------
# 3. Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument(small):
    model, y, u = small
    good = dict(num_objects=2, initial_probs=np.ones(K) / K, transition_matrix=np.eye(K), interaction_weights=np.zeros((K, K)),
                initial_means=np.zeros((K, D)), initial_covs=np.eye(D), dynamics_matrices=np.stack([np.eye(D)] * K),
                dynamics_covs=np.stack([np.eye(D)] * K), emission_matrices=np.eye(P, D), emission_covs=np.eye(P))
    ps.models.GRASS(**good)
    for field, value in [("transition_matrix", np.array([[0.5, 0.6], [0.5, 0.5]])),
                         ("interaction_weights", np.zeros((K, K + 1))),
                         ("edge_initial_probs", np.array([0.5, 0.6])),
                         ("dynamics_covs", -np.stack([np.eye(D)] * K))]:
        with pytest.raises(ValueError, match=field):
            ps.models.GRASS(**{**good, field: value})
    for field, value in [("transition_matrix", jnp.array([[0.5, 0.6], [0.5, 0.5]])),
                         ("interaction_weights", jnp.zeros((K + 1, K))),
                         ("edge_initial_probs", jnp.array([0.2, 0.2])), ("edge_biases", jnp.array([jnp.nan, 0.0]))]:
        bad = eqx.tree_at(lambda m: getattr(m, field), model, value)
        with pytest.raises(ValueError, match=field):
            ps.switching.grass_structured_vi(bad, y, 2, edge_inputs=u)
    with pytest.raises(ValueError, match="emissions"):
        ps.switching.grass_structured_vi(model, y[:, :1], 2)
    with pytest.raises(ValueError, match="emissions"):
        ps.switching.grass_structured_vi(model, y.reshape(4, -1), 2)
    with pytest.raises(ValueError, match="edge_inputs"):
        ps.switching.grass_structured_vi(model, y, 2, edge_inputs=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="method"):
        ps.switching.grass_structured_vi(model, y, 2, method="mean-field")
    with pytest.raises(ValueError, match="model"):
        ps.switching.grass_structured_vi(model.as_slds(), y, 2)
    big = ps.models.GRASS(**{**good, "num_objects": 5})  # 2^5 2^10 = 32768 joint states
    with pytest.raises(ValueError, match="model.*factorised"):
        ps.switching.grass_structured_vi(big, jnp.zeros((3, 5, P)), 2)
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.em(model, y, 2, fixed=("nope",))
    # a bad value put in by tree_at is caught where learning starts too
    bad = eqx.tree_at(lambda m: m.interaction_weights, model, jnp.zeros((K + 1, K)))
    with pytest.raises(ValueError, match="interaction_weights"):
        ps.learn.em(bad, y, 2, edge_inputs=u)


# ----------------------------------------------------------------------------------------------
# 4. Inside a user's jit and vmap
# ----------------------------------------------------------------------------------------------
def test_jit_and_vmap_over_a_batch(small):
    model, y, u = small
    ys = jnp.stack([y, y[::-1], 0.5 * y])
    run = jax.jit(jax.vmap(lambda yy: ps.switching.grass_structured_vi(model, yy, 4, edge_inputs=u).elbo))
    out = run(ys)
    assert out.shape == (3, 4)
    for b in range(3):  # the engine's own compiled run on each sequence (cached from the tests above)
        one = ps.switching.grass_structured_vi(model, ys[b], 4, edge_inputs=u)
        np.testing.assert_allclose(out[b], one.elbo, rtol=1e-10)
