"""Markov jump processes (`ps.models.MarkovJumpProcess`, `ContinuousTimeHMM`, `ps.ctmc`, EM for rates).

Oracles: scipy.linalg.expm with brute-force enumeration of the discrete paths at the observation
times (tiny problems, 1e-10); the uniformisation series; exact Gillespie marginals against expm
(chi-square) and exponential dwell times (KS); the Fisher identity for the E-step; a direct
scipy L-BFGS optimisation of the panel likelihood for EM's optimum.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from scipy.linalg import expm

import probssm as ps
from probssm.learn.em_ctmc import mjp_expected_statistics, mjp_standard_errors

# a 4-state progression model with an absorbing state 3 (death), structural zeros
Q4 = np.array([[-1.0, 0.6, 0.3, 0.1],
               [0.3, -0.8, 0.3, 0.2],
               [0.0, 0.5, -0.9, 0.4],
               [0.0, 0.0, 0.0, 0.0]])
PI4 = np.array([0.5, 0.3, 0.2, 0.0])
PROC4 = ps.models.MarkovJumpProcess(Q4, PI4)

# an ergodic 3-state chain for the simulation tests
Q3 = np.array([[-1.2, 0.8, 0.4], [0.5, -0.7, 0.2], [0.9, 0.6, -1.5]])
PI3 = np.array([0.6, 0.3, 0.1])
PROC3 = ps.models.MarkovJumpProcess(Q3, PI3)

# misclassification: structural zeros, death seen exactly
E4 = np.array([[0.85, 0.15, 0.0, 0.0],
               [0.1, 0.8, 0.1, 0.0],
               [0.0, 0.2, 0.8, 0.0],
               [0.0, 0.0, 0.0, 1.0]])

# panel data: three subjects of unequal lengths, one with an exact death, one censored record
TIMES = [np.array([0.0, 0.4, 1.1, 2.3, 3.0]), np.array([0.0, 0.7, 1.2]), np.array([0.0, 0.5, 0.9, 2.0])]
STATES = [np.array([0, 1, 1, 2, 3]), np.array([1, 0, 2]), np.array([0, 99, 1, 3])]
CENSORED = {99: (0, 1, 2)}


def panel_brute(Q, pi, times, states, exact=(), censored=None):
    """Per-subject log p(s_1..s_{L-1} | s_0) by summing over every state sequence consistent with the
    records (censored codes expand to their sets), with scipy expm per interval."""
    censored = censored or {}
    out = []
    for t, s in zip(times, states):
        sets = [censored.get(int(v), (int(v),)) for v in s]
        num = 0.0
        for path in itertools.product(*sets):
            w = pi[path[0]] / sum(pi[k] for k in sets[0]) if len(sets[0]) > 1 else 1.0
            for j in range(1, len(path)):
                P = expm(Q * (t[j] - t[j - 1]))
                if path[j] in exact and path[j - 1] != path[j]:
                    w *= sum(P[path[j - 1], k] * Q[k, path[j]] for k in range(len(pi)) if k != path[j])
                else:
                    w *= P[path[j - 1], path[j]]
            num += w
        out.append(np.log(num))
    return np.array(out)


def hmm_brute(Q, pi, E, times, labels):
    """Enumerate all K^T state sequences at the observation times: log p(y), filtered and smoothed
    marginals, the most likely sequence."""
    K, T = len(pi), len(times)
    Ps = [None] + [expm(Q * (times[t] - times[t - 1])) for t in range(1, T)]
    lik = lambda z, t: 1.0 if np.isnan(labels[t]) else E[z, int(labels[t])]
    joint = {}
    for path in itertools.product(range(K), repeat=T):
        w = pi[path[0]] * lik(path[0], 0)
        for t in range(1, T):
            w *= Ps[t][path[t - 1], path[t]] * lik(path[t], t)
        joint[path] = w
    Z = sum(joint.values())
    smoothed = np.zeros((T, K))
    filtered = np.zeros((T, K))
    for path, w in joint.items():
        for t in range(T):
            smoothed[t, path[t]] += w / Z
    for t in range(T):  # p(z_t | y_0..t): sum the prefixes of length t + 1
        pre = {}
        for path in itertools.product(range(K), repeat=t + 1):
            w = pi[path[0]] * lik(path[0], 0)
            for u in range(1, t + 1):
                w *= Ps[u][path[u - 1], path[u]] * lik(path[u], u)
            pre[path] = w
        zt = sum(pre.values())
        for path, w in pre.items():
            filtered[t, path[t]] += w / zt
    best = max(joint, key=joint.get)
    return np.log(Z), filtered, smoothed, np.array(best)


# ----------------------------------------------------------------------------------------------
# Models and validation
# ----------------------------------------------------------------------------------------------
def test_model_structure_and_generator():
    np.testing.assert_allclose(PROC4.generator(), Q4, rtol=0, atol=1e-15)
    assert PROC4.absorbing_states == (3,)
    assert PROC4.structure.sum() == 8  # the positive off-diagonal rates only
    # a structure with room for a rate that is zero now
    mask = Q4 > 0
    mask[2, 0] = True
    proc = ps.models.MarkovJumpProcess(Q4, PI4, structure=mask)
    assert proc.rates.shape == (9,) and float(proc.generator()[2, 0]) == 0.0
    # the protocol: ps.sample with time steps as inputs, and the discretised model on a grid
    states, y = ps.sample(jax.random.key(0), PROC4, 6, inputs=jnp.full((6, 1), 0.3))
    np.testing.assert_array_equal(states, y[:, 0])
    grid = PROC4.on_grid(jnp.array([0.0, 0.3, 1.0]))
    np.testing.assert_allclose(grid.transition_matrices[2], expm(Q4 * 0.7), atol=1e-13)


@pytest.mark.parametrize("bad, match", [
    (lambda: ps.models.MarkovJumpProcess(np.array([[-1.0, 1.0], [-0.5, 0.5]]), np.ones(2) / 2), "generator.*>= 0"),
    (lambda: ps.models.MarkovJumpProcess(np.array([[-1.0, 0.5], [0.5, -0.5]]), np.ones(2) / 2), "generator.*zero"),
    (lambda: ps.models.MarkovJumpProcess(Q3, np.ones(2) / 2), "initial_probs"),
    (lambda: ps.models.MarkovJumpProcess(Q3, np.array([0.5, 0.6, -0.1])), "initial_probs"),
    (lambda: ps.models.MarkovJumpProcess(np.ones((2, 3)), np.ones(2) / 2), "generator"),
    (lambda: ps.models.ContinuousTimeHMM(PROC4, np.ones((3, 2)) / 2), "emissions"),
    (lambda: ps.models.ContinuousTimeHMM(PROC4, np.full((4, 2), 0.6)), "emissions"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0, 0.5]]), np.array([[0, 1, 1]])), "times"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, 4]])), "states"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, -1]])), "states"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0, 2.0]]), np.array([[0, 3, 1]])),
     "states.*absorbing"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, 1]]), exact_states=(1,)),
     "exact_states"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, 1]]), lengths=np.array([3])),
     "lengths"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, 1, 1]])), "states"),
    (lambda: ps.ctmc.panel_log_likelihood(PROC4, np.array([[0.0, 1.0]]), np.array([[0, 7]]), censored={2: (0,)}),
     "censored"),
    (lambda: ps.ctmc.smoother(ps.models.ContinuousTimeHMM(PROC4, E4), np.array([0.0, 2.0, 1.0]),
                              np.array([[0.0], [1.0], [1.0]])), "times"),
    (lambda: ps.ctmc.smoother(ps.models.ContinuousTimeHMM(PROC4, E4), np.array([0.0, 1.0, 2.0]),
                              np.array([[0.0], [5.0], [1.0]])), "emissions"),
    (lambda: ps.ctmc.transition_matrix(np.array([[-1.0, 2.0], [1.0, -1.0]]), 0.5), "proc"),
    (lambda: ps.ctmc.transition_matrix(PROC4, -0.5), "dt"),
    (lambda: ps.ctmc.gillespie(jax.random.key(0), PROC4, -1.0, 5), "t_max"),
    (lambda: ps.ctmc.gillespie(jax.random.key(0), PROC4, 1.0, 0), "max_jumps"),
    (lambda: ps.ctmc.sample_at(jax.random.key(0), PROC4, np.array([1.0, 0.5])), "times"),
    (lambda: ps.ctmc.panel_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC4, -PROC4.rates),
                                          np.array([[0.0, 1.0]]), np.array([[0, 1]])), "generator|rates"),
])
def test_bad_input_raises_value_error_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# ----------------------------------------------------------------------------------------------
# Transition matrices
# ----------------------------------------------------------------------------------------------
DTS = np.array([0.0, 0.05, 0.7, 0.05, 3.0, 25.0])


def test_transition_matrix_equals_scipy_expm_and_uniformisation():
    P = np.asarray(ps.ctmc.transition_matrix(PROC4, DTS))
    ref = np.stack([expm(Q4 * d) for d in DTS])
    np.testing.assert_allclose(P, ref, rtol=0, atol=1e-13)
    U = np.asarray(ps.ctmc.uniformization(PROC4, DTS))
    np.testing.assert_allclose(U, P, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ps.ctmc.uniformization(Q3, 0.8), expm(Q3 * 0.8), rtol=0, atol=1e-14)
    # a dense 8-state generator with fast and slow rates, long and short steps (many squarings)
    F = np.random.default_rng(1).gamma(0.5, 2.0, (8, 8))
    np.fill_diagonal(F, 0.0)
    G = F - np.diag(F.sum(1))
    for d in (1e-4, 0.3, 40.0):
        np.testing.assert_allclose(ps.ctmc.transition_matrix(G, d), expm(G * d), rtol=0, atol=1e-13)
    # too few terms leave a visible truncation error: the series is what is being computed
    assert np.abs(np.asarray(ps.ctmc.uniformization(PROC4, 3.0, num_terms=3)) - expm(Q4 * 3.0)).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Panel likelihood
# ----------------------------------------------------------------------------------------------
def _padded(times, states):
    L = max(len(t) for t in times)
    T = np.stack([np.pad(t, (0, L - len(t)), constant_values=t[-1]) for t in times])
    S = np.stack([np.pad(s, (0, L - len(s)), constant_values=0) for s in states])
    return T, S, np.array([len(t) for t in times])


def test_panel_log_likelihood_equals_enumeration():
    for exact in [(), (3,)]:
        ref = panel_brute(Q4, PI4, TIMES, STATES, exact, CENSORED)
        got = ps.ctmc.panel_log_likelihood(PROC4, TIMES, STATES, exact_states=exact, censored=CENSORED,
                                           per_subject=True)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
        T, S, n = _padded(TIMES, STATES)
        total = ps.ctmc.panel_log_likelihood(PROC4, T, S, lengths=n, exact_states=exact, censored=CENSORED)
        np.testing.assert_allclose(total, ref.sum(), rtol=1e-12)
    # the exact death differs from the plain panel factor (the test can tell them apart)
    assert abs(panel_brute(Q4, PI4, TIMES, STATES, (3,), CENSORED)[0] - panel_brute(Q4, PI4, TIMES, STATES, (),
                                                                                    CENSORED)[0]) > 0.1


def test_panel_log_likelihood_traceable_and_gradient():
    T, S, n = _padded(TIMES, STATES)

    def f(rates):
        return ps.ctmc.panel_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC4, rates), T, S, lengths=n,
                                            exact_states=(3,), censored=CENSORED)

    value, grad = jax.jit(jax.value_and_grad(f))(PROC4.rates)
    np.testing.assert_allclose(value, panel_brute(Q4, PI4, TIMES, STATES, (3,), CENSORED).sum(), rtol=1e-12)
    eps = 1e-6
    fd = [(f(PROC4.rates.at[i].add(eps)) - f(PROC4.rates.at[i].add(-eps))) / (2 * eps) for i in range(4)]
    np.testing.assert_allclose(grad[:4], fd, rtol=1e-6, atol=1e-8)
    # traced times (inside the caller's jit): one exponential per interval, same value
    traced = jax.jit(lambda t: ps.ctmc.panel_log_likelihood(PROC4, t, S, lengths=n, exact_states=(3,),
                                                            censored=CENSORED))(jnp.asarray(T))
    np.testing.assert_allclose(traced, value, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Continuous-time HMM
# ----------------------------------------------------------------------------------------------
HMM_TIMES = np.array([0.0, 0.3, 1.2, 1.5, 2.6])
HMM_LABELS = np.array([0.0, 1.0, np.nan, 1.0, 2.0])


def test_ctmc_hmm_forward_backward_and_viterbi_equal_enumeration():
    hmm = ps.models.ContinuousTimeHMM(PROC4, E4)
    ll, filt, smooth, best = hmm_brute(Q4, PI4, E4, HMM_TIMES, HMM_LABELS)
    r = ps.ctmc.smoother(hmm, HMM_TIMES, HMM_LABELS[:, None])
    np.testing.assert_allclose(r.log_likelihood, ll, rtol=1e-12)
    np.testing.assert_allclose(r.filtered_probs, filt, atol=1e-12)
    np.testing.assert_allclose(r.smoothed_probs, smooth, atol=1e-12)
    np.testing.assert_array_equal(ps.ctmc.viterbi(hmm, HMM_TIMES, HMM_LABELS[:, None]), best)
    # the discretised model on the same grid, through ps.hmm, agrees
    np.testing.assert_allclose(ps.hmm.smoother(hmm.on_grid(HMM_TIMES), HMM_LABELS[:, None]).smoothed_probs, smooth,
                               atol=1e-12)
    # a ragged batch (list) gives each sequence's own result; padding rows are zero
    times = [HMM_TIMES, HMM_TIMES[:3]]
    labels = [HMM_LABELS[:, None], HMM_LABELS[:3, None]]
    rb = ps.ctmc.smoother(hmm, times, labels)
    ll3, _, smooth3, _ = hmm_brute(Q4, PI4, E4, HMM_TIMES[:3], HMM_LABELS[:3])
    np.testing.assert_allclose(rb.log_likelihood, [ll, ll3], rtol=1e-12)
    np.testing.assert_allclose(rb.smoothed_probs[1, :3], smooth3, atol=1e-12)
    assert np.all(np.asarray(rb.smoothed_probs[1, 3:]) == 0)


def test_ctmc_hmm_exact_death_equals_enumeration_and_entry_density():
    """A death label (not misclassified) at a known time: enumeration with the death step's factor
    sum_k P(dt)[i, k] Q[k, 3]; and that factor is d/dt of P(dt)[i, 3] (a central difference of the plain
    filter's likelihood in the death time, which treats death as 'dead by then')."""
    hmm = ps.models.ContinuousTimeHMM(PROC4, E4)
    times = np.array([0.0, 0.3, 1.2, 1.5, 2.6])
    labels = np.array([0.0, 1.0, np.nan, 1.0, 3.0])
    K, T = 4, len(times)
    Ps = [None] + [expm(Q4 * (times[t] - times[t - 1])) for t in range(1, T)]
    PQ = Ps[-1] @ (Q4 - np.diag(np.diag(Q4)))
    joint = {}
    for path in itertools.product(range(K), repeat=T):
        w = PI4[path[0]] * E4[path[0], 0]
        for t in range(1, T):
            lik = 1.0 if np.isnan(labels[t]) else E4[path[t], int(labels[t])]
            step = PQ[path[t - 1], path[t]] if t == T - 1 else Ps[t][path[t - 1], path[t]]
            w *= step * lik
        joint[path] = w
    Z = sum(joint.values())
    smooth = np.zeros((T, K))
    for path, w in joint.items():
        smooth[np.arange(T), path] += w / Z
    best = np.array(max(joint, key=joint.get))
    r = ps.ctmc.smoother(hmm, times, labels[:, None], exact_states=(3,))
    np.testing.assert_allclose(r.log_likelihood, np.log(Z), rtol=1e-12)
    np.testing.assert_allclose(r.smoothed_probs, smooth, atol=1e-12)
    np.testing.assert_array_equal(ps.ctmc.viterbi(hmm, times, labels[:, None], exact_states=(3,)), best)
    h = 1e-5
    plain = [float(np.exp(ps.ctmc.filter(hmm, np.append(times[:-1], times[-1] + d), labels[:, None]).log_likelihood))
             for d in (h, -h)]
    np.testing.assert_allclose(np.exp(float(r.log_likelihood)), (plain[0] - plain[1]) / (2 * h), rtol=1e-8)
    # a later record in the same absorbing state is not a second entry; exact_states must be absorbing
    more = ps.ctmc.filter(hmm, np.append(times, 3.0), np.append(labels, 3.0)[:, None], exact_states=(3,))
    np.testing.assert_allclose(more.log_likelihood, np.log(Z), rtol=1e-12)
    with pytest.raises(ValueError, match="exact_states"):
        ps.ctmc.filter(hmm, times, labels[:, None], exact_states=(2,))


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------
NUM_PATHS = 4000
T_MAX = 30.0
MAX_JUMPS = 80
_paths = jax.jit(jax.vmap(lambda k: ps.ctmc.gillespie(k, PROC3, T_MAX, MAX_JUMPS)))


def _state_at(path, t):
    idx = jnp.searchsorted(path.jump_times, t, side="right") - 1
    return path.states[idx]


def test_gillespie_marginals_and_dwell_times():
    paths = _paths(jax.random.split(jax.random.key(11), NUM_PATHS))
    assert not bool(jnp.any(paths.truncated))
    grid = np.array([0.0, 0.2, 0.7, 1.5, 4.0])
    pvalues = []
    for t in grid:
        z = np.asarray(jax.vmap(_state_at, in_axes=(0, None))(paths, t))
        expected = NUM_PATHS * PI3 @ expm(Q3 * t)
        pvalues.append(scipy.stats.chisquare(np.bincount(z, minlength=3), expected).pvalue)
    assert min(pvalues) > 0.01, pvalues
    # the first sojourn in each state is Exp(|Q_ii|) (t_max = 30 truncates it with probability < e^-20)
    z0 = np.asarray(paths.states[:, 0])
    first = np.asarray(paths.jump_times[:, 1])
    for i in range(3):
        assert scipy.stats.kstest(first[z0 == i], "expon", args=(0, 1 / -Q3[i, i])).pvalue > 0.01
    # the first jump's destination: probabilities Q_ij / |Q_ii|
    for i in range(3):
        dest = np.asarray(paths.states[:, 1])[z0 == i]
        p = np.where(np.arange(3) == i, 0.0, Q3[i] / -Q3[i, i])
        counts = np.bincount(dest, minlength=3)
        assert counts[i] == 0
        keep = np.arange(3) != i
        assert scipy.stats.chisquare(counts[keep], p[keep] * counts.sum()).pvalue > 0.01
    # a wrong generator is rejected by the same check (the test has power)
    z = np.asarray(jax.vmap(_state_at, in_axes=(0, None))(paths, 0.7))
    Q_wrong = Q3.copy()
    Q_wrong[0, 1:] = Q3[0, 2], Q3[0, 1]  # state 0's destinations swapped: expected chi-square about 190
    wrong = NUM_PATHS * PI3 @ expm(Q_wrong * 0.7)
    assert scipy.stats.chisquare(np.bincount(z, minlength=3), wrong).pvalue < 0.01


def test_gillespie_truncation():
    short = ps.ctmc.gillespie(jax.random.key(0), PROC3, 50.0, 3)
    assert bool(short.truncated) and int(short.num_jumps) == 3
    assert np.all(np.diff(np.asarray(short.jump_times)) > 0)


def test_sample_at_marginals():
    grid = jnp.array([0.3, 0.9, 2.0])
    z = np.asarray(jax.vmap(lambda k: ps.ctmc.sample_at(k, PROC3, grid))(jax.random.split(jax.random.key(5), 3000)))
    for j, t in enumerate(np.asarray(grid)):
        expected = 3000 * PI3 @ expm(Q3 * t)
        assert scipy.stats.chisquare(np.bincount(z[:, j], minlength=3), expected).pvalue > 0.01
    # pairs (z(0.9), z(2.0)): the joint law pi P(0.9) x P(1.1)
    joint = (PI3 @ expm(Q3 * 0.9))[:, None] * expm(Q3 * 1.1)
    counts = np.bincount(z[:, 1] * 3 + z[:, 2], minlength=9)
    assert scipy.stats.chisquare(counts, 3000 * joint.ravel()).pvalue > 0.01


# ----------------------------------------------------------------------------------------------
# EM for rates
# ----------------------------------------------------------------------------------------------
def _death_panel(proc, num_subjects, num_records, key, horizon=4.0, dead=3):
    """Gillespie paths seen at random sorted times until death, the death record at its exact time.
    Visit times are on a 0.25 grid and death times rounded to 0.05 (as in clinical records), so the
    panel has few distinct intervals."""
    k1, k2 = jax.random.split(key)
    grids = np.sort(np.round(np.asarray(jax.random.uniform(k1, (num_subjects, num_records))) * horizon * 4) / 4, axis=1)
    grids[:, 0] = 0.0
    paths = jax.vmap(lambda k: ps.ctmc.gillespie(k, proc, horizon, 40))(jax.random.split(k2, num_subjects))
    assert not bool(jnp.any(paths.truncated))
    jt, st, nj = (np.asarray(a) for a in (paths.jump_times, paths.states, paths.num_jumps))
    # absorption ends a path: nothing after the death, the buffer padded with t_max and the last state
    dead_rows = st[np.arange(num_subjects), nj] == dead
    assert dead_rows.any() and np.all(st[dead_rows][np.arange(41)[None, :] >= nj[dead_rows, None]] == dead)
    assert np.all(jt[np.arange(41)[None, :] > nj[:, None]] == horizon)
    times, states = [], []
    for b in range(num_subjects):
        z = st[b][np.searchsorted(jt[b], grids[b], side="right") - 1]
        death = np.round(jt[b, nj[b]] * 20) / 20 if st[b, nj[b]] == dead else np.inf
        keep = grids[b] < death
        t, s = grids[b][keep], z[keep]
        if np.isfinite(death):
            t, s = np.append(t, death), np.append(s, dead)
        times.append(t)
        states.append(s)
    return times, states


EM_TIMES, EM_STATES = _death_panel(PROC4, 150, 6, jax.random.key(3))
START = ps.models.MarkovJumpProcess(
    np.where(Q4 > 0, 0.5, 0.0) - np.diag(np.where(Q4 > 0, 0.5, 0.0).sum(1)), PI4)


def test_e_step_satisfies_the_fisher_identity():
    """d log L / d f_ij = E[N_ij] / f_ij - E[T_i]: the Van Loan expectations against autodiff."""
    st = mjp_expected_statistics(PROC4, TIMES, STATES, exact_states=(3,), censored=CENSORED)
    g = jax.grad(lambda r: ps.ctmc.panel_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC4, r), TIMES, STATES,
                                                        exact_states=(3,), censored=CENSORED))(PROC4.rates)
    rows, cols = np.asarray(PROC4.rows), np.asarray(PROC4.cols)
    np.testing.assert_allclose(np.asarray(st.jumps)[rows, cols] / PROC4.rates - np.asarray(st.dwell)[rows], g,
                               rtol=1e-10, atol=1e-12)
    # dwell times sum to the observed time spent before absorption can be ruled out: the total time
    # of the intervals that start alive (subject 0: 3.0, subject 1: 1.2, subject 2: 2.0)
    np.testing.assert_allclose(np.sum(st.dwell), 3.0 + 1.2 + 2.0, rtol=1e-10)


def _penalised(log_rates, a, b):
    """Minus the panel log-likelihood of the EM data plus the Gamma(a, b) log-prior, over log-rates."""
    r = jnp.exp(log_rates)
    ll = ps.ctmc.panel_log_likelihood(eqx.tree_at(lambda m: m.rates, START, r), EM_TIMES, EM_STATES, exact_states=(3,))
    return -(ll + jnp.sum((a - 1.0) * log_rates - b * r))


_penalised_vg = jax.jit(jax.value_and_grad(_penalised))


def _direct_mle(a=1.0, b=0.0):
    """The gradient optimum: scipy L-BFGS-B on log-rates with jax gradients (no EM code involved)."""
    fun = lambda x: [np.asarray(v) for v in _penalised_vg(jnp.asarray(x), a, b)]
    res = scipy.optimize.minimize(fun, np.log(np.asarray(START.rates)), jac=True, method="L-BFGS-B",
                                  options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 2000})
    return np.exp(res.x), -res.fun


@pytest.mark.parametrize("prior", [None, (2.0, 1.0)], ids=["mle", "map"])
def test_em_is_monotone_and_reaches_the_gradient_optimum(prior):
    gp = None if prior is None else ps.emissions.GammaPrior(*prior)
    fitted, history = ps.learn.em(START, (EM_TIMES, EM_STATES), 150, exact_states=(3,), prior=gp)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[:-1])), np.diff(h).min()
    assert h[-1] > h[0] + 1.0
    rates, best = _direct_mle(*(prior or ()))
    np.testing.assert_allclose(fitted.rates, rates, rtol=1e-6)
    np.testing.assert_allclose(h[-1], best, rtol=1e-10)
    # structural zeros stay zero and the absorbing state stays absorbing
    G = np.asarray(fitted.generator())
    np.testing.assert_array_equal(G[Q4 == 0], 0.0)


def test_gradient_mle_equals_em_optimum():
    """ps.learn.mle on log-rates (L-BFGS through panel_log_likelihood) lands on EM's fixed point."""
    em_fit, em_hist = ps.learn.em(START, (EM_TIMES, EM_STATES), 150, exact_states=(3,))
    fitted, history = ps.learn.mle(START, (EM_TIMES, EM_STATES), 60, exact_states=(3,), progress=False)
    assert isinstance(fitted, ps.models.MarkovJumpProcess)
    np.testing.assert_allclose(fitted.rates, em_fit.rates, rtol=1e-6)
    final = float(ps.ctmc.panel_log_likelihood(fitted, EM_TIMES, EM_STATES, exact_states=(3,)))
    np.testing.assert_allclose(final, float(em_hist[-1]), rtol=1e-10)
    assert history[-1] > history[0] + 1.0
    np.testing.assert_array_equal(np.asarray(fitted.generator())[Q4 == 0], 0.0)  # structural zeros kept
    np.testing.assert_array_equal(fitted.initial_probs, START.initial_probs)  # not identified: held
    with pytest.raises(ValueError, match="unexpected arguments"):
        ps.learn.mle(START, (EM_TIMES, EM_STATES), 5, bogus=1)


@pytest.mark.slow  # the exact Hessian compiles forward-over-reverse through the panel recursion (~7 s)
def test_standard_errors_match_numerical_hessian():
    """Standard errors at the MLE: the autodiff Hessian against second differences of log L."""
    fitted, _ = ps.learn.em(START, (EM_TIMES, EM_STATES), 150, exact_states=(3,))
    se = mjp_standard_errors(fitted, (EM_TIMES, EM_STATES), exact_states=(3,))
    f = lambda r: -float(_penalised_vg(jnp.log(jnp.asarray(r)), 1.0, 0.0)[0])  # log L (compiled above)
    r0, n, h = np.asarray(fitted.rates), fitted.rates.size, 1e-3
    H = np.zeros((n, n))
    for i, j in itertools.combinations_with_replacement(range(n), 2):
        e_i, e_j = np.eye(n)[i] * h, np.eye(n)[j] * h
        H[i, j] = H[j, i] = (f(r0 + e_i + e_j) - f(r0 + e_i - e_j) - f(r0 - e_i + e_j) + f(r0 - e_i - e_j)) / (4 * h * h)
    np.testing.assert_allclose(se.standard_errors, np.sqrt(np.diag(np.linalg.inv(-H))), rtol=1e-4)
    np.testing.assert_allclose(se.generator_standard_errors[Q4 == 0], 0.0)


# ----------------------------------------------------------------------------------------------
# Slow: the discrete flashing ratchet (Berghaus et al. 2024), 5000 paths on a 50-point grid
# ----------------------------------------------------------------------------------------------
def ratchet_generator(V=1.0, r=1.0, b=1.0):
    """States 0-2: potential on (position i, jumps i -> j at exp(-V (j - i) / 2)); 3-5: off (free
    jumps at rate b); switching on <-> off at rate r at the same position."""
    F = np.zeros((6, 6))
    for i in range(3):
        for j in range(3):
            if i != j:
                F[i, j] = np.exp(-V * (j - i) / 2.0)
                F[3 + i, 3 + j] = b
        F[i, 3 + i] = F[3 + i, i] = r
    return F - np.diag(F.sum(1))


@pytest.mark.slow
def test_em_ratchet_rate_rmse():
    Q = ratchet_generator()
    proc = ps.models.MarkovJumpProcess(Q, np.ones(6) / 6)
    grid = np.sort(np.random.default_rng(0).uniform(0.0, 2.5, 50))
    grid[0] = 0.0
    states = np.asarray(ps.ctmc.sample_at(jax.random.key(7), proc, np.broadcast_to(grid, (5000, 50))))
    start = ps.models.MarkovJumpProcess(np.where(Q > 0, 1.0, 0.0) - np.diag((Q > 0).sum(1) * 1.0), np.ones(6) / 6)
    fitted, history = ps.learn.em(start, (np.broadcast_to(grid, (5000, 50)), states), 300)
    assert np.all(np.diff(np.asarray(history)) >= -1e-9 * np.abs(np.asarray(history[:-1])))
    rmse = float(np.sqrt(np.mean((np.asarray(fitted.rates) - np.asarray(proc.rates)) ** 2)))
    print(f"ratchet rate RMSE over {proc.rates.size} rates: {rmse:.4f}")
    assert rmse < 0.1


# ----------------------------------------------------------------------------------------------
# Endpoint-conditioned paths (uniformisation)
# ----------------------------------------------------------------------------------------------
NUM_BRIDGES = 4000
_bridges = jax.jit(jax.vmap(lambda k: ps.ctmc.sample_bridge(k, PROC3, 0, 2, 1.5, 40)))


def test_sample_bridge_matches_conditional_law_and_van_loan_expectations():
    paths = _bridges(jax.random.split(jax.random.key(21), NUM_BRIDGES))
    assert not bool(jnp.any(paths.truncated))
    n = np.asarray(paths.num_jumps)
    jt, st = np.asarray(paths.jump_times), np.asarray(paths.states)
    assert np.all(st[np.arange(NUM_BRIDGES), n] == 2)  # every path ends in the end point
    # the state at s = 0.6: P(s)[a, k] P(t - s)[k, b] / P(t)[a, b]
    z = st[np.arange(NUM_BRIDGES), np.sum(jt <= 0.6, axis=1) - 1]
    law = expm(Q3 * 0.6)[0] * expm(Q3 * 0.9)[:, 2]
    assert scipy.stats.chisquare(np.bincount(z, minlength=3), NUM_BRIDGES * law / law.sum()).pvalue > 0.01
    # Monte Carlo means of dwell times and jump counts against the Van Loan expectations of the E-step,
    # within 4 standard errors each
    durations = np.diff(jt, axis=1)
    dwell = np.stack([np.sum(np.where(st[:, :-1] == i, durations, 0.0), axis=1) for i in range(3)], axis=1)
    valid = np.arange(40)[None, :] < n[:, None]
    jumps = np.zeros((NUM_BRIDGES, 3, 3))
    for i, j in itertools.permutations(range(3), 2):
        jumps[:, i, j] = np.sum(valid & (st[:, :-1] == i) & (st[:, 1:] == j), axis=1)
    # Van Loan in scipy: int_0^t P(s)[a, i] P(t - s)[j, b] ds is the (a, b) entry of the upper-right block
    # of expm([[Q, E_ij], [0, Q]] t); E[T_i] divides the i = j integral by P(t)[a, b], E[N_ij] also
    # multiplies by Q_ij
    def van_loan(i, j):
        M = np.zeros((6, 6))
        M[:3, :3] = M[3:, 3:] = Q3
        M[i, 3 + j] = 1.0
        return expm(M * 1.5)[0, 3 + 2] / expm(Q3 * 1.5)[0, 2]

    ref_dwell = np.array([van_loan(i, i) for i in range(3)])
    ref_jumps = np.array([[0.0 if i == j else Q3[i, j] * van_loan(i, j) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(ref_dwell.sum(), 1.5, rtol=1e-12)
    for mc, expected in [(dwell, ref_dwell), (jumps.reshape(NUM_BRIDGES, 9), ref_jumps.ravel())]:
        se = mc.std(0) / np.sqrt(NUM_BRIDGES)
        np.testing.assert_array_less(np.abs(mc.mean(0) - expected), 4 * se + 1e-12)


# ----------------------------------------------------------------------------------------------
# EM for a continuous-time HMM with misclassification (rates, initial probabilities, labels)
# ----------------------------------------------------------------------------------------------
QH = np.array([[-0.6, 0.4, 0.2], [0.3, -0.5, 0.2], [0.0, 0.5, -0.5]])
EH = np.array([[0.85, 0.15, 0.0], [0.1, 0.8, 0.1], [0.0, 0.15, 0.85]])


def _misclassified_panel(num_seq=80, num_obs=8, seed=4):
    rng = np.random.default_rng(seed)
    times = np.sort(np.round(rng.uniform(0.0, 6.0, (num_seq, num_obs)) * 4) / 4, axis=1)
    times[:, 0] = 0.0
    z = np.asarray(ps.ctmc.sample_at(jax.random.key(seed), ps.models.MarkovJumpProcess(QH, np.ones(3) / 3), times))
    labels = np.array([[rng.choice(3, p=EH[k]) for k in row] for row in z], float)
    labels[rng.uniform(size=labels.shape) < 0.1] = np.nan  # some missing labels
    return times, labels[..., None]


HMM_EM_TIMES, HMM_EM_LABELS = _misclassified_panel()
HMM_START = ps.models.ContinuousTimeHMM(
    ps.models.MarkovJumpProcess(np.where(QH > 0, 0.3, 0.0) - np.diag(np.where(QH > 0, 0.3, 0.0).sum(1)), np.ones(3) / 3),
    np.array([[0.7, 0.3, 0.0], [0.2, 0.6, 0.2], [0.0, 0.3, 0.7]]))
_E_FREE = EH > 0


def _hmm_from(x):
    n = HMM_START.process.rates.size
    rates, logits, init = jnp.exp(x[:n]), x[n:n + 9].reshape(3, 3), x[n + 9:]
    E = jax.nn.softmax(jnp.where(_E_FREE, logits, -jnp.inf), axis=1)
    proc = eqx.tree_at(lambda m: (m.rates, m.initial_probs), HMM_START.process, (rates, jax.nn.softmax(init)))
    return eqx.tree_at(lambda m: (m.process, m.emissions.probs), HMM_START, (proc, E[:, None, :]))


def _hmm_neg_ll(x):
    """-log L of the EM data by ps.hmm's forward pass on A_t = expm(Q dt_t), with a log-likelihood table
    that keeps the gradient finite at the structural zeros of the misclassification matrix."""
    m = _hmm_from(x)
    E = m.emissions.probs[:, 0]
    logE = jnp.where(E > 0, jnp.log(jnp.where(E > 0, E, 1.0)), -jnp.inf)
    seen = ~np.isnan(HMM_EM_LABELS[..., 0])
    lab = np.where(seen, HMM_EM_LABELS[..., 0], 0).astype(int)

    def one(t, lab_b, seen_b):
        ll = jnp.where(seen_b[:, None], logE[:, lab_b].T, 0.0)
        A = ps.core.continuous_time.transition_matrices_at(m.generator(), t)
        return ps.hmm.filter_params(ps.core.DiscreteParams(m.process.initial_probs, A, ll)).log_likelihood

    return -jnp.sum(jax.vmap(one)(jnp.asarray(HMM_EM_TIMES), lab, seen))


_hmm_vg = jax.jit(jax.value_and_grad(_hmm_neg_ll))


@pytest.mark.slow  # about 13 s of compilation and 600 EM iterations; the rate EM above runs in CI
def test_ct_hmm_em_is_monotone_and_reaches_the_gradient_optimum():
    fitted, history = ps.learn.em(HMM_START, (HMM_EM_TIMES, HMM_EM_LABELS), 600)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[:-1])), np.diff(h).min()
    assert h[-1] > h[0] + 10.0
    E = np.asarray(fitted.emissions.probs[:, 0])
    np.testing.assert_array_equal(E[~_E_FREE], 0.0)  # structural zeros of the misclassification kept
    x0 = np.concatenate([np.log(np.asarray(HMM_START.process.rates)), np.log(np.where(_E_FREE, 0.5, 1.0)).ravel(),
                         np.zeros(3)])
    res = scipy.optimize.minimize(lambda x: [np.asarray(v) for v in _hmm_vg(jnp.asarray(x))], x0, jac=True,
                                  method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
    best = _hmm_from(jnp.asarray(res.x))
    final = float(jnp.sum(ps.ctmc.filter(fitted, HMM_EM_TIMES, HMM_EM_LABELS).log_likelihood))
    print("ct-hmm EM vs L-BFGS:", final, -res.fun, np.abs(np.asarray(fitted.process.rates) /
                                                        np.asarray(best.process.rates) - 1).max(),
          np.abs(E - np.asarray(best.emissions.probs[:, 0])).max())
    np.testing.assert_allclose(final, -res.fun, rtol=1e-9)
    np.testing.assert_allclose(fitted.process.rates, best.process.rates, rtol=2e-6)
    np.testing.assert_allclose(E, best.emissions.probs[:, 0], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Published oracle: msm's "Model 1" of the cav heart-transplant panel (exact death times)
# ----------------------------------------------------------------------------------------------
CAV = Path(os.environ.get("PROBSSM_MJP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "mjp")) / "cav.csv"


@pytest.mark.slow
@pytest.mark.skipif(not CAV.exists(), reason="msm's cav data (GPL) not present; see ../shared/data/mjp/README.md")
def test_cav_panel_matches_msm():
    """msm's own regression tests (cran/msm tests) on the 4-state CAV model with exact death times
    (death = TRUE): -2 log L = 4908.81676837903 at its ``twoway4.q`` and 3968.7978930519 at msm's fit
    (checked there to a relative 1e-6)."""
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(CAV)
    times, states = [], []
    for _, g in df.groupby("PTNUM", sort=False):
        times.append(g.years.to_numpy(float))
        states.append(g.state.to_numpy(int) - 1)
    twoway4 = np.array([[-0.5, 0.25, 0, 0.25], [0.166, -0.498, 0.166, 0.166], [0, 0.25, -0.5, 0.25], [0, 0, 0, 0]])
    start = ps.models.MarkovJumpProcess(twoway4, np.array([1.0, 0, 0, 0]))
    at_start = -2 * float(ps.ctmc.panel_log_likelihood(start, times, states, exact_states=(3,)))
    np.testing.assert_allclose(at_start, 4908.81676837903, rtol=1e-10)
    fitted, history = ps.learn.em(start, (times, states), 300, exact_states=(3,))
    minus2ll = -2 * float(ps.ctmc.panel_log_likelihood(fitted, times, states, exact_states=(3,)))
    print(f"cav: -2 log L = {at_start:.8f} at twoway4.q, {minus2ll:.6f} at the EM fit (msm: 3968.7978930519)")
    np.testing.assert_allclose(minus2ll, 3968.7978930519, rtol=1e-6)
    assert minus2ll <= 3968.7978930519 + 1e-9  # EM converges at least as far as msm's BFGS


@pytest.mark.slow
@pytest.mark.skipif(not CAV.exists(), reason="msm's cav data (GPL) not present; see ../shared/data/mjp/README.md")
def test_cav_misclassification_matches_msm():
    """msm's regression test "cav misclassification model with no covariates" (cran/msm tests): the
    one-way 4-state model with its ``oneway4.q`` rates, the misclassification matrix with 0.1 between
    neighbouring grades, initprobs (1, 0, 0, 0), deathexact = 4: -2 log L = 4296.9155995778 (msm checks
    its own value to a relative 1e-6)."""
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(CAV)
    times, labels = [], []
    for _, g in df.groupby("PTNUM", sort=False):
        times.append(g.years.to_numpy(float))
        labels.append((g.state.to_numpy(int) - 1).astype(float)[:, None])
    Q = np.zeros((4, 4))
    Q[0, 1], Q[0, 3], Q[1, 2], Q[1, 3], Q[2, 3] = 0.148, 0.0171, 0.202, 0.081, 0.126
    Q -= np.diag(Q.sum(1))
    E = np.array([[0.9, 0.1, 0, 0], [0.1, 0.8, 0.1, 0], [0, 0.1, 0.9, 0], [0, 0, 0, 1.0]])
    model = ps.models.ContinuousTimeHMM(ps.models.MarkovJumpProcess(Q, np.array([1.0, 0, 0, 0])), E)
    minus2ll = -2 * float(jnp.sum(ps.ctmc.filter(model, times, labels, exact_states=(3,)).log_likelihood))
    print(f"cav misclassification: -2 log L = {minus2ll:.10f} (msm: 4296.9155995778)")
    np.testing.assert_allclose(minus2ll, 4296.9155995778, rtol=1e-10)


def test_state_probs_at_any_time_equals_enumeration():
    """A query time between observations is an unobserved point of the chain: enumeration with a NaN label there."""
    hmm = ps.models.ContinuousTimeHMM(PROC4, E4)
    query = np.array([2.0, 0.7, 3.5])  # between records, and after the last one
    got = np.asarray(ps.ctmc.state_probs_at(hmm, HMM_TIMES, HMM_LABELS[:, None], query))
    for s, row in zip(query, got):
        t = np.sort(np.append(HMM_TIMES, s))
        pos = int(np.searchsorted(t, s))
        lab = np.insert(HMM_LABELS, pos, np.nan)
        _, _, smooth, _ = hmm_brute(Q4, PI4, E4, t, lab)
        np.testing.assert_allclose(row, smooth[pos], atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Exactly observed paths: path_log_likelihood, path_statistics; NUTS with the conjugate Gamma posterior
# ----------------------------------------------------------------------------------------------
# three subjects of PROC4 (absorbing state 3): start record, then the jump times and the states entered
PATH_TIMES = [np.array([0.0, 0.3, 1.1, 1.6]), np.array([0.5]), np.array([0.0, 0.9, 2.2, 2.4, 3.1])]
PATH_STATES = [np.array([0, 1, 2, 3]), np.array([2]), np.array([1, 0, 2, 1, 3])]
PATH_T_END = np.array([2.0, 1.7, 4.0])


def path_log_likelihood_loop(Q, times, states, t_end):
    """Per-subject log-likelihood of exactly observed paths, one sojourn at a time (the oracle)."""
    out = []
    for t, s, te in zip(times, states, t_end):
        ll = 0.0
        for j in range(len(t)):
            end = t[j + 1] if j + 1 < len(t) else te
            ll -= -Q[s[j], s[j]] * (end - t[j])
            if j + 1 < len(t):
                ll += np.log(Q[s[j], s[j + 1]])
        out.append(ll)
    return np.array(out)


def _pad_rows(seqs, fill):
    L = max(len(a) for a in seqs)
    return np.stack([np.pad(np.asarray(a, float), (0, L - len(a)), constant_values=fill) for a in seqs])


def test_path_log_likelihood_equals_the_loop_oracle_in_every_layout():
    want = path_log_likelihood_loop(Q4, PATH_TIMES, PATH_STATES, PATH_T_END)
    got_list = ps.ctmc.path_log_likelihood(PROC4, PATH_TIMES, PATH_STATES, t_end=PATH_T_END, per_subject=True)
    n = np.array([len(a) for a in PATH_TIMES], np.int32)
    t_pad, s_pad = _pad_rows(PATH_TIMES, 99.0), _pad_rows(PATH_STATES, 2).astype(int)  # padding holds junk
    got_pad = ps.ctmc.path_log_likelihood(PROC4, t_pad, s_pad, lengths=n, t_end=PATH_T_END, per_subject=True)
    err = max(np.max(np.abs(np.asarray(got_list) - want)), np.max(np.abs(np.asarray(got_pad) - want)))
    print(f"path log-likelihood vs loop oracle: max abs error {err:.2e}")
    assert err < 1e-12
    total = ps.ctmc.path_log_likelihood(PROC4, t_pad, s_pad, lengths=n, t_end=PATH_T_END)
    np.testing.assert_allclose(total, want.sum(), rtol=1e-13)
    # one subject as 1-D arrays; a scalar t_end; t_end=None ends at the last record (no censored sojourn)
    one = ps.ctmc.path_log_likelihood(PROC4, PATH_TIMES[2], PATH_STATES[2], t_end=4.0)
    np.testing.assert_allclose(one, want[2], rtol=1e-13)
    no_tail = ps.ctmc.path_log_likelihood(PROC4, PATH_TIMES, PATH_STATES, per_subject=True)
    last = [t[-1] for t in PATH_TIMES]
    np.testing.assert_allclose(no_tail, path_log_likelihood_loop(Q4, PATH_TIMES, PATH_STATES, last), rtol=1e-13)
    # the sufficient statistics: counts of each jump, time in each state (summing to the observed spans)
    stats = ps.ctmc.path_statistics(PROC4, t_pad, s_pad, lengths=n, t_end=PATH_T_END, per_subject=True)
    np.testing.assert_allclose(np.asarray(stats.dwell).sum(-1), PATH_T_END - np.array([a[0] for a in PATH_TIMES]),
                               rtol=1e-14)
    N = np.zeros((4, 4))
    for s in PATH_STATES:
        np.add.at(N, (s[:-1], s[1:]), 1.0)
    np.testing.assert_array_equal(np.asarray(stats.jumps).sum(0), N)
    # a jump along a zero rate (structural) is impossible: -inf, not an error
    assert float(ps.ctmc.path_log_likelihood(PROC4, np.array([0.0, 1.0]), np.array([2, 0]))) == -np.inf


def test_path_log_likelihood_under_jit_vmap_and_grad():
    n = np.array([len(a) for a in PATH_TIMES], np.int32)
    t_pad, s_pad = _pad_rows(PATH_TIMES, 0.0), _pad_rows(PATH_STATES, 0).astype(int)
    want = path_log_likelihood_loop(Q4, PATH_TIMES, PATH_STATES, PATH_T_END)
    f = jax.jit(lambda proc, t, s, n, te: ps.ctmc.path_log_likelihood(proc, t, s, lengths=n, t_end=te,
                                                                        per_subject=True))
    np.testing.assert_allclose(f(PROC4, t_pad, s_pad, n, PATH_T_END), want, rtol=1e-13)  # data traced: unchecked
    # vmap over rate scalings: log L(c Q) = log L(Q) + N log c - (c - 1) sum_i q_i T_i
    stats = ps.ctmc.path_statistics(PROC4, t_pad, s_pad, lengths=n, t_end=PATH_T_END)
    scales = jnp.array([0.5, 1.0, 2.0])
    got = jax.vmap(lambda c: ps.ctmc.path_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC4, c * PROC4.rates),
                                                         t_pad, s_pad, lengths=n, t_end=PATH_T_END))(scales)
    exit_time = float(np.sum(np.asarray(stats.dwell) * -np.diag(Q4)))
    np.testing.assert_allclose(got, want.sum() + float(np.sum(stats.jumps)) * np.log(scales) - (scales - 1) * exit_time,
                               rtol=1e-12)
    # gradient over the free rates: N_ij / q_ij - T_i
    g = jax.grad(lambda r: ps.ctmc.path_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC4, r), t_pad, s_pad,
                                                      lengths=n, t_end=PATH_T_END))(PROC4.rates)
    rows, cols = np.array(PROC4.rows), np.array(PROC4.cols)
    expected = np.asarray(stats.jumps)[rows, cols] / Q4[rows, cols] - np.asarray(stats.dwell)[rows]
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(times=[np.array([0.0, 1.0, 0.5])], states=[np.array([0, 1, 2])]), "times"),
    (dict(times=[np.array([0.0, np.nan])], states=[np.array([0, 1])]), "times"),
    (dict(times=[np.array([0.0, 1.0])], states=[np.array([0, 4])]), "states"),
    (dict(times=[np.array([0.0, 1.0])], states=[np.array([-1, 1])]), "states"),
    (dict(times=[np.array([0.0, 1.0])], states=[np.array([0.5, 1.0])]), "states"),
    (dict(times=[np.array([0.0, 1.0, 2.0])], states=[np.array([0, 1, 1])]), "states.*itself"),
    (dict(times=[np.array([0.0, 1.0, 2.0])], states=[np.array([0, 3, 1])]), "states.*absorbing"),
    (dict(times=[np.array([0.0, 1.0])], states=[np.array([0, 1])], t_end=0.5), "t_end"),
    (dict(times=[np.array([0.0, 1.0])], states=[np.array([0, 1])], t_end=np.array([2.0, 3.0])), "t_end"),
    (dict(times=np.array([[0.0, 1.0]]), states=np.array([[0, 1]]), lengths=np.array([3])), "lengths"),
    (dict(times=np.array([[0.0, 1.0]]), states=np.array([[0, 1, 2]])), "states"),
    (dict(times=np.array([[0.0, 1.0]]), states=[np.array([0, 1])]), "states"),
])
def test_path_log_likelihood_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    kwargs = dict(kwargs)
    times, states = kwargs.pop("times"), kwargs.pop("states")
    with pytest.raises(ValueError, match=match):
        ps.ctmc.path_log_likelihood(PROC4, times, states, **kwargs)
    with pytest.raises(ValueError, match=match):
        ps.ctmc.path_statistics(PROC4, times, states, **kwargs)


def test_gillespie_paths_likelihood_ratio_has_mean_one_and_the_mle_is_counts_over_dwell():
    """Under the law of Q, exp(log L_Q'(path) - log L_Q(path)) (same first state, same window) is the density
    ratio of the path laws, so its mean is exactly 1; the censored last sojourn is needed for that. And
    N_ij / T_i maximises log L over the free rates."""
    t_max, num = 3.0, 4000
    paths = jax.jit(jax.vmap(lambda k: ps.ctmc.gillespie(k, PROC3, t_max, 40)))(jax.random.split(jax.random.key(21),
                                                                                                 num))
    assert not bool(jnp.any(paths.truncated))
    data = (paths.jump_times, paths.states)
    n = paths.num_jumps + 1
    stats = ps.ctmc.path_statistics(PROC3, *data, lengths=n, t_end=t_max, per_subject=True)
    np.testing.assert_array_equal(np.asarray(stats.jumps).sum((1, 2)), np.asarray(paths.num_jumps))
    np.testing.assert_allclose(np.asarray(stats.dwell).sum(1), t_max, rtol=1e-13)
    Q_alt = np.array([[-0.8, 0.5, 0.3], [0.6, -0.9, 0.3], [0.6, 0.5, -1.1]])
    ll = ps.ctmc.path_log_likelihood(PROC3, *data, lengths=n, t_end=t_max, per_subject=True)
    ll_alt = ps.ctmc.path_log_likelihood(Q_alt, *data, lengths=n, t_end=t_max, per_subject=True)
    w = np.exp(np.asarray(ll_alt) - np.asarray(ll))
    se = w.std() / np.sqrt(num)
    print(f"E[L_alt / L] = {w.mean():.4f} +- {se:.4f} (exact 1)")
    assert abs(w.mean() - 1.0) < 4 * se and se < 0.02
    # the same ratio without the censored last sojourn is off by many standard errors (the check has power)
    w_cut = np.exp(np.asarray(ps.ctmc.path_log_likelihood(Q_alt, *data, lengths=n, per_subject=True)
                              - ps.ctmc.path_log_likelihood(PROC3, *data, lengths=n, per_subject=True)))
    se_cut = w_cut.std() / np.sqrt(num)
    print(f"without the censored sojourn: {w_cut.mean():.4f} +- {se_cut:.4f}")
    assert abs(w_cut.mean() - 1.0) > 8 * se_cut  # about 18 standard errors
    # the closed-form MLE: zero gradient, and every perturbation lowers the log-likelihood
    total = ps.ctmc.path_statistics(PROC3, *data, lengths=n, t_end=t_max)
    rows, cols = np.array(PROC3.rows), np.array(PROC3.cols)
    mle = np.asarray(total.jumps)[rows, cols] / np.asarray(total.dwell)[rows]

    def ll_at(r):
        return ps.ctmc.path_log_likelihood(eqx.tree_at(lambda m: m.rates, PROC3, r), *data, lengths=n, t_end=t_max)

    best, grad = jax.value_and_grad(ll_at)(jnp.asarray(mle))
    scale = np.asarray(total.dwell)[rows]
    print(f"gradient at N/T relative to dwell times: {np.max(np.abs(grad) / scale):.1e}")
    assert np.max(np.abs(np.asarray(grad)) / scale) < 1e-12
    deltas = np.asarray(jax.random.normal(jax.random.key(3), (20, mle.size))) * 0.05
    others = np.array([float(ll_at(jnp.asarray(mle * np.exp(d)))) for d in deltas])
    assert np.all(others < float(best))
    # the MLE recovers the generator (about 2000 jumps per state: a few per cent)
    np.testing.assert_allclose(mle, Q3[rows, cols], rtol=0.15)


# a 3-state process with all six rates free, rebuilt from sampled rates (a module-level, hashable builder)
_ROWS3, _COLS3 = np.array(PROC3.rows), np.array(PROC3.cols)


def _build_proc3(params):
    r = params["rates"]
    Q = jnp.zeros((3, 3), r.dtype).at[_ROWS3, _COLS3].set(r)
    return ps.models.MarkovJumpProcess(Q - jnp.diag(jnp.sum(Q, axis=1)), jnp.asarray(PI3, r.dtype),
                                       structure=PROC3.structure)


def _build_ct_hmm3(misclassification, params):
    return ps.models.ContinuousTimeHMM(_build_proc3(params), misclassification)


def test_nuts_on_exact_paths_matches_the_conjugate_gamma_posterior():
    """Gamma(a, b) priors on the free rates and exactly observed paths: the posterior of q_ij is
    Gamma(a + N_ij, b + T_i). NUTS means and standard deviations agree within 4 Monte Carlo standard errors,
    with the effective sample size from arviz capped at the number of draws (never credited with better than
    independent draws)."""
    import arviz as az
    import numpyro.distributions as dist

    t_max = 5.0
    paths = jax.jit(jax.vmap(lambda k: ps.ctmc.gillespie(k, PROC3, t_max, 40)))(jax.random.split(jax.random.key(1), 6))
    stats = ps.ctmc.path_statistics(PROC3, paths.jump_times, paths.states, lengths=paths.num_jumps + 1, t_end=t_max)
    a, b = 2.0, 1.0
    shape = a + np.asarray(stats.jumps)[_ROWS3, _COLS3]
    rate = b + np.asarray(stats.dwell)[_ROWS3]
    mean, sd = shape / rate, np.sqrt(shape) / rate
    priors = {"rates": dist.Gamma(a * jnp.ones(6), b * jnp.ones(6))}
    num_chains, num_samples = 2, 1000
    r = ps.mcmc.nuts(jax.random.key(2), _build_proc3, priors, stats, num_warmup=300, num_samples=num_samples,
                     num_chains=num_chains)
    assert r.states is None and r.pointwise_log_likelihood is None
    assert not np.any(np.asarray(r.stats["diverging"]))
    x = np.asarray(r.samples["rates"])  # (chains, draws, 6)
    # the recorded log-likelihood of each draw is the path log-likelihood
    np.testing.assert_allclose(r.log_likelihood[0, :3], [ps.ctmc.path_log_likelihood(
        _build_proc3({"rates": jnp.asarray(x[0, i])}), paths.jump_times, paths.states, lengths=paths.num_jumps + 1,
        t_end=t_max) for i in range(3)], rtol=1e-10)
    z_mean, z_sd = [], []
    for i in range(6):
        xi = x[..., i]
        ess = min(float(az.ess(xi)), xi.size)
        z_mean.append((xi.mean() - mean[i]) / (sd[i] / np.sqrt(ess)))
        # sd of the sample sd: sd sqrt((kurtosis - 1) / (4 n)), Gamma kurtosis 3 + 6 / shape; n from the ESS of
        # the squared deviations
        ess2 = min(float(az.ess((xi - mean[i]) ** 2)), xi.size)
        z_sd.append((xi.std() - sd[i]) / (sd[i] * np.sqrt((2.0 + 6.0 / shape[i]) / (4.0 * ess2))))
        # the tolerance is tight enough to reject the prior, or a posterior off by a third of its sd
        assert 4 / np.sqrt(ess) < 0.33 and abs(a / b - mean[i]) > 4 * sd[i] / np.sqrt(ess)
    print("NUTS vs Gamma posterior, in MC standard errors: mean", np.round(z_mean, 2), "sd", np.round(z_sd, 2))
    assert np.all(np.abs(z_mean) < 4) and np.all(np.abs(z_sd) < 4)
    idata = ps.mcmc.to_arviz(r)
    assert idata.posterior["rates"].shape == (num_chains, num_samples, 6)


def test_nuts_on_panel_records_targets_the_panel_likelihood():
    """The pair (times, states) of panel records goes through ps.mcmc.nuts as through ps.learn.mle: each
    draw's recorded log-likelihood is ps.ctmc.panel_log_likelihood of the model built from it."""
    import numpyro.distributions as dist

    times = [np.array([0.0, 0.4, 1.1, 2.3]), np.array([0.0, 0.7, 1.2]), np.array([0.0, 0.5, 0.9, 2.0])]
    states = [np.array([0, 1, 1, 2]), np.array([1, 0, 2]), np.array([0, 2, 1, 0])]
    priors = {"rates": dist.Gamma(2.0 * jnp.ones(6), 2.0 * jnp.ones(6))}
    r = ps.mcmc.nuts(jax.random.key(4), _build_proc3, priors, (times, states), num_warmup=20, num_samples=4,
                     num_chains=1)
    x = np.asarray(r.samples["rates"])[0]
    want = [ps.ctmc.panel_log_likelihood(_build_proc3({"rates": jnp.asarray(v)}), times, states) for v in x]
    np.testing.assert_allclose(r.log_likelihood[0], want, rtol=1e-10)
    assert np.all(np.isfinite(x)) and np.all(x > 0)
    # the same target for blackjax, also for a hidden-state model's (times, emissions)
    u = {"rates": jnp.linspace(-0.5, 0.5, 6)}
    log_prior = float(jnp.sum(priors["rates"].log_prob(jnp.exp(u["rates"])) + u["rates"]))
    ld, _ = ps.mcmc.log_density(_build_proc3, priors, (times, states))
    want = ps.ctmc.panel_log_likelihood(_build_proc3({"rates": jnp.exp(u["rates"])}), times, states)
    np.testing.assert_allclose(ld(u), log_prior + want, rtol=1e-12)
    E3 = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.1, 0.9]])
    labels = [s[:, None].astype(float) for s in states]
    ld, _ = ps.mcmc.log_density(lambda p: _build_ct_hmm3(E3, p), priors, (times, labels))
    want = ps.ctmc.filter(_build_ct_hmm3(E3, {"rates": jnp.exp(u["rates"])}), times, labels).log_likelihood
    np.testing.assert_allclose(ld(u), log_prior + float(jnp.sum(want)), rtol=1e-12)
    with pytest.raises(ValueError, match="emissions"):
        ps.mcmc.nuts(jax.random.key(4), _build_proc3, priors, (times, states, times, times), num_warmup=2,
                     num_samples=2)
    with pytest.raises(ValueError, match="covariates: the process has no covariate_effects"):
        ps.mcmc.nuts(jax.random.key(4), _build_proc3, priors, (times, states, times), num_warmup=2, num_samples=2)
    with pytest.raises(ValueError, match="inputs"):
        ps.mcmc.nuts(jax.random.key(4), _build_proc3, priors, (times, states), inputs=np.ones((4, 1)),
                     num_warmup=2, num_samples=2)
