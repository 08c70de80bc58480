"""Amortised rate estimation (`ps.ctmc.AmortizedRateEstimator`, the shipped pretrained weights).

Oracles: the structure of a generator; exact symmetries of the architecture (relabelling the states
permutes the output, reordering the paths changes nothing); jit / vmap against the eager call; a
3-state process with known rates, simulated exactly at a grid (clean and with 10% label noise),
within tolerances set from the measured errors with a fixed seed.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import probssm as ps

GRID = np.sort(np.random.default_rng(0).uniform(0.0, 2.5, 50))
GRID[0] = 0.0
Q3 = np.array([[-1.5, 1.0, 0.5],  # binary fractions: exact rows sums in float32
               [0.75, -1.25, 0.5],
               [0.25, 1.25, -1.5]])


@pytest.fixture(scope="module")
def est():
    return ps.ctmc.AmortizedRateEstimator.pretrained()


def random_labels(K, N=40, T=30, seed=0):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, 3.0, (N, T)), axis=1)
    # sticky labels, so that the intervals carry transitions of every kind but are not pure noise
    labels = np.zeros((N, T), np.int32)
    labels[:, 0] = rng.integers(0, K, N)
    for t in range(1, T):
        jump = rng.uniform(size=N) < 0.3
        labels[:, t] = np.where(jump, rng.integers(0, K, N), labels[:, t - 1])
    lengths = rng.integers(2, T + 1, N)
    return times, labels, lengths


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6, 9])
def test_pretrained_gives_a_valid_generator(est, K):
    times, labels, lengths = random_labels(K, seed=K)
    fit = est(times, labels, lengths=lengths, num_states=K)
    G, pi = np.asarray(fit.generator), np.asarray(fit.initial_probs)
    assert G.shape == (K, K) and pi.shape == (K,)
    assert np.all(np.isfinite(G)) and np.all(G[~np.eye(K, dtype=bool)] >= 0)
    np.testing.assert_allclose(G.sum(1), 0.0, atol=1e-5 * np.abs(G).max())
    assert np.all(pi >= 0) and abs(pi.sum() - 1.0) < 1e-5
    # in float64 (x64, as in these tests) the estimate passes the model's own checks
    ps.models.MarkovJumpProcess(G, pi)


def test_relabelling_the_states_permutes_the_estimate(est):
    K = 5
    times, labels, lengths = random_labels(K, seed=1)
    perm = np.array([3, 0, 4, 1, 2])  # state k is called perm[k]
    a = est(times, labels, lengths=lengths, num_states=K)
    b = est(times, perm[labels], lengths=lengths, num_states=K)
    np.testing.assert_allclose(np.asarray(b.generator)[np.ix_(perm, perm)], a.generator, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.initial_probs)[perm], a.initial_probs, rtol=1e-4, atol=1e-7)


def test_the_order_of_the_paths_does_not_matter(est):
    times, labels, lengths = random_labels(4, seed=2)
    order = np.random.default_rng(3).permutation(times.shape[0])
    a = est(times, labels, lengths=lengths, num_states=4)
    b = est(times[order], labels[order], lengths=lengths[order], num_states=4)
    np.testing.assert_allclose(b.generator, a.generator, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.initial_probs, a.initial_probs, rtol=1e-5, atol=1e-7)


def test_jit_and_vmap_agree_with_the_eager_call(est):
    data = [random_labels(3, seed=s) for s in (4, 5)]
    eager = [est(t, y, lengths=n, num_states=3) for t, y, n in data]
    jitted = jax.jit(lambda t, y, n: est(t, y, lengths=n, num_states=3))(*data[0])
    np.testing.assert_allclose(jitted.generator, eager[0].generator, rtol=1e-5, atol=1e-6)
    stacked = [jnp.stack([d[i] for d in data]) for i in range(3)]
    batched = jax.vmap(lambda t, y, n: est(t, y, lengths=n, num_states=3))(*stacked)
    for i in range(2):
        np.testing.assert_allclose(batched.generator[i], eager[i].generator, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.initial_probs[i], eager[i].initial_probs, rtol=1e-5, atol=1e-7)
    # a shared (T,) grid is the same as the grid repeated per path
    t, y, _ = data[0]
    grid_fit = est(t[0], y, num_states=3)
    np.testing.assert_allclose(grid_fit.generator, est(np.broadcast_to(t[0], y.shape), y, num_states=3).generator)


def test_bad_inputs_raise_naming_the_argument(est):
    times, labels, lengths = random_labels(3, seed=6)
    bad_t = times.copy()
    bad_t[0, 5] = bad_t[0, 4] - 0.1
    with pytest.raises(ValueError, match="^times: .*non-decreasing"):
        est(bad_t, labels)
    with pytest.raises(ValueError, match="^times: expected shape"):
        est(times[:, :-1], labels)
    with pytest.raises(ValueError, match="^labels: expected integer labels in 0..2"):
        est(times, labels + 1, num_states=3)
    with pytest.raises(ValueError, match="^labels: expected integer labels"):
        est(times, labels - 1)
    with pytest.raises(ValueError, match="^labels: expected shape"):
        est(times, labels[None])
    with pytest.raises(ValueError, match="^lengths: "):
        est(times, labels, lengths=lengths[:-1])
    with pytest.raises(ValueError, match="^lengths: "):
        est(times, labels, lengths=np.zeros(times.shape[0], int))
    with pytest.raises(ValueError, match="^num_states: "):
        jax.jit(lambda t, y: est(t, y).generator)(times, labels)
    # a network edited with eqx.tree_at is checked where estimation starts
    W, b = est.rate_head[0]
    wrong = eqx.tree_at(lambda e: e.rate_head, est, ((jnp.zeros((W.shape[0] + 1, 1)), b),))
    with pytest.raises(ValueError, match=r"^estimator.rate_head\[0\]: expected weights of shape"):
        wrong(times, labels, num_states=3)
    nan = eqx.tree_at(lambda e: e.rate_head, est, ((jnp.full_like(W, jnp.nan), b),))
    with pytest.raises(ValueError, match=r"^estimator.rate_head\[0\]: expected finite"):
        nan(times, labels, num_states=3)
    # padding past a path's length is ignored, whatever it holds
    padded = labels.copy()
    padded[np.arange(labels.shape[1])[None, :] >= lengths[:, None]] = -7
    np.testing.assert_array_equal(est(times, padded, lengths=lengths, num_states=3).generator,
                                  est(times, labels, lengths=lengths, num_states=3).generator)


def three_state_data(seed, eps):
    """1000 paths of the 3-state process read at the 50-point grid (exactly: ``z(t_j) | z(t_{j-1}) ~
    expm(Q dt)``, one matrix per interval, shared by the paths), each label replaced by a uniformly
    chosen other state with probability eps."""
    rng = np.random.default_rng(seed)
    z = np.zeros((1000, GRID.size), int)
    z[:, 0] = rng.choice(3, 1000, p=[0.5, 0.3, 0.2])
    for t, dt in enumerate(np.diff(GRID), start=1):
        cum = np.cumsum(scipy.linalg.expm(Q3 * dt)[z[:, t - 1]], axis=1)
        z[:, t] = np.minimum((rng.uniform(size=(1000, 1)) > cum).sum(1), 2)
    flip = rng.uniform(size=z.shape) < eps
    return np.where(flip, (z + rng.integers(1, 3, z.shape)) % 3, z)


@pytest.mark.parametrize("eps, rate_tol", [(0.0, 0.04), (0.1, 0.2)])
def test_recovers_a_three_state_process_from_many_paths(est, eps, rate_tol):
    fit = est(GRID, three_state_data(0, eps), num_states=3)
    off = ~np.eye(3, dtype=bool)
    rmse = float(np.sqrt(np.mean((np.asarray(fit.generator)[off] - Q3[off]) ** 2)))
    # measured with seeds 0-5: RMSE 0.011-0.044 (0.011 with seed 0) without noise, 0.043-0.106 (0.085) with
    # 10% noise; the tolerances are at least twice seed 0's. The crude estimate the network starts from
    # (transitions per unit of observed time) is off by 0.06-0.09 without noise and by 1.6-1.7 with 10%
    # noise (a mislabelling counts as two jumps), so both cases test the learnt correction. The initial
    # law: within 0.035 in all of these runs.
    assert rmse < rate_tol, (rmse, np.asarray(fit.generator))
    np.testing.assert_allclose(fit.initial_probs, [0.5, 0.3, 0.2], atol=0.05)
