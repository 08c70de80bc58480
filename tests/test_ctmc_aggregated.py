"""Aggregated Markov processes observed with exact dwell times (`ps.ctmc.dwell_log_likelihood`,
`ps.ctmc.dwell_time_density`).

Oracles: a numpy loop over the sojourns with scipy.linalg.expm on the class blocks (1e-10); the
exactly observed path likelihood when every class has one state; Gillespie simulation aggregated to
classes (closed-form mean dwell times; MLE of the rates of C2 - C1 - O within the inverse Fisher
information); central finite differences for the gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.stats

import probssm as ps

# C2 <-> C1 <-> O (2 shut, 1 open): rates C2->C1, C1->C2, C1->O, O->C1
CCO_RATES = {(0, 1): 1.0, (1, 0): 2.0, (1, 2): 3.0, (2, 1): 1.5}
CCO_OPEN = np.array([False, False, True])


def generator(rates, K):
    Q = np.zeros((K, K))
    for (i, j), r in rates.items():
        Q[i, j] = r
    return Q - np.diag(Q.sum(1))


def make_proc(rates_vec, pairs, K, pi=None):
    Q = jnp.zeros((K, K), jnp.float64).at[tuple(np.array(pairs).T)].set(rates_vec)
    Q = Q - jnp.diag(Q.sum(1))
    return ps.models.MarkovJumpProcess(Q, jnp.full((K,), 1.0 / K) if pi is None else pi)


def oracle(Q, t, c, classes, initial=None, censor=False):
    """Colquhoun-Hawkes product, one sojourn at a time, in the class blocks; long dwells are split so
    that nothing underflows."""
    K = Q.shape[0]
    idx = [np.nonzero(classes == a)[0] for a in range(classes.max() + 1)]
    A = idx[c[0]]
    if initial is None:
        p = scipy.linalg.null_space(Q.T)[:, 0]
        p = p / p.sum()
        notA = np.setdiff1d(np.arange(K), A)
        v = p[notA] @ Q[np.ix_(notA, A)]
    else:
        v = np.asarray(initial, float)[A]
    v = v / v.sum()
    ll = 0.0
    for j in range(len(t)):
        A = idx[c[j]]
        pieces = max(1, int(np.ceil(t[j] * np.abs(Q).max() / 20)))
        step = scipy.linalg.expm(Q[np.ix_(A, A)] * t[j] / pieces)
        for _ in range(pieces):
            v = v @ step
            s = v.sum()
            ll += np.log(s)
            v = v / s
        if j < len(t) - 1:
            v = v @ Q[np.ix_(A, idx[c[j + 1]])]
        elif not censor:
            v = v @ Q[np.ix_(A, np.setdiff1d(np.arange(K), A))]
        s = v.sum()
        ll += np.log(s)
        v = v / s
    return ll


def random_sequence(rng, C, n):
    c = [int(rng.integers(C))]
    while len(c) < n:
        c.append(int(rng.choice([a for a in range(C) if a != c[-1]])))
    return np.array(c)


def reversible_chain(rng, K):
    """A linear chain 0 - 1 - ... - K-1 (cycle-free, hence in detailed balance)."""
    Q = np.zeros((K, K))
    for i in range(K - 1):
        Q[i, i + 1], Q[i + 1, i] = rng.uniform(0.3, 3.0, 2)
    return Q - np.diag(Q.sum(1))


# ----------------------------------------------------------------------------------------------
# (a) the numpy / scipy oracle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["expm", "spectral"])
def test_equals_scipy_loop_oracle(method):
    rng = np.random.default_rng(0)
    K = 5
    R = rng.uniform(0.2, 3.0, (K, K)) * (1 - np.eye(K))
    if method == "spectral":       # detailed balance: Q_ij = S_ij / p_i with S symmetric
        R = (R + R.T) / rng.dirichlet(np.ones(K))[:, None]
    Q = R - np.diag(R.sum(1))
    classes = np.array([0, 1, 0, 2, 1])
    records = [random_sequence(rng, 3, n) for n in (1, 4, 9)]
    times = [rng.exponential(1.0, len(c)) * rng.choice([0.01, 1.0, 30.0], len(c)) for c in records]
    times[2][3] = 0.0                                  # a zero dwell is allowed
    censor = np.array([False, True, False])
    got = ps.ctmc.dwell_log_likelihood(Q, times, records, classes, censor_last=censor, method=method,
                                       per_record=True)
    want = [oracle(Q, t, c, classes, censor=bool(z)) for t, c, z in zip(times, records, censor)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-10)
    # a padded (B, N) batch with lengths and a given initial distribution
    N = 9
    tb = np.zeros((3, N))
    cb = np.zeros((3, N), int)
    for b, (t, c) in enumerate(zip(times, records)):
        tb[b, :len(t)], cb[b, :len(c)] = t, c
    init = rng.dirichlet(np.ones(K))
    got = ps.ctmc.dwell_log_likelihood(Q, tb, cb, classes, lengths=np.array([1, 4, 9]), initial=init,
                                       method=method)
    want = sum(oracle(Q, t, c, classes, initial=init) for t, c in zip(times, records))
    np.testing.assert_allclose(float(got), want, rtol=1e-12, atol=1e-10)


def test_methods_agree_and_long_dwells_stay_finite():
    rng = np.random.default_rng(1)
    Q = reversible_chain(rng, 4)
    classes = np.array([0, 0, 1, 1])
    c = random_sequence(rng, 2, 6)
    t = np.array([1e-4, 2.0, 500.0, 3.0, 1e3, 0.5])      # q t up to ~1e4: expm(Q_AA t) underflows
    a = ps.ctmc.dwell_log_likelihood(Q, t, c, classes, method="expm")
    b = ps.ctmc.dwell_log_likelihood(Q, t, c, classes, method="spectral")
    assert np.isfinite(float(a))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-11)
    np.testing.assert_allclose(float(a), oracle(Q, t, c, classes), rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# (b) one state per class: the exactly observed path
# ----------------------------------------------------------------------------------------------
def test_one_state_per_class_equals_path_log_likelihood():
    rng = np.random.default_rng(2)
    K = 4
    R = rng.uniform(0.2, 3.0, (K, K)) * (1 - np.eye(K))
    Q = R - np.diag(R.sum(1))
    proc = ps.models.MarkovJumpProcess(Q, np.full(K, 0.25))
    classes = np.array([2, 0, 3, 1])               # a relabelling: class classes[k] is state k
    state_of = np.argsort(classes)
    B, n = 3, 7
    dwell_c = np.stack([random_sequence(rng, K, n) for _ in range(B)])
    dwell_t = rng.exponential(0.7, (B, n))
    states = state_of[dwell_c]
    jump_times = np.concatenate([np.zeros((B, 1)), np.cumsum(dwell_t, axis=1)[:, :-1]], axis=1)
    t_end = dwell_t.sum(1)
    path = ps.ctmc.path_log_likelihood(proc, jump_times, states, t_end=t_end, per_subject=True)
    got = ps.ctmc.dwell_log_likelihood(proc, dwell_t, dwell_c, classes, censor_last=True, per_record=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(path), rtol=1e-12, atol=1e-10)
    # an uncensored last sojourn ends by a jump out of its state: one more factor q_i
    got = ps.ctmc.dwell_log_likelihood(proc, dwell_t, dwell_c, classes, per_record=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(path) + np.log(-np.diag(Q)[states[:, -1]]),
                               rtol=1e-12, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# (c) Monte Carlo: Gillespie paths aggregated to open / shut
# ----------------------------------------------------------------------------------------------
def aggregate(paths, t_max, classes):
    """Merge consecutive sojourns in the same class: per path (dwell times, classes); the last sojourn
    is censored at t_max."""
    times, labels = [], []
    for jt, st, nj in zip(np.asarray(paths.jump_times), np.asarray(paths.states), np.asarray(paths.num_jumps)):
        starts, cls = jt[:nj + 1], classes[st[:nj + 1]]
        keep = np.concatenate([[True], cls[1:] != cls[:-1]])
        s = starts[keep]
        times.append(np.diff(np.concatenate([s, [t_max]])))
        labels.append(cls[keep])
    return times, labels


@pytest.fixture(scope="module")
def cco_data():
    K = 3
    Q = generator(CCO_RATES, K)
    pi = np.array([0.4, 0.3, 0.3])
    proc = ps.models.MarkovJumpProcess(Q, pi)
    t_max, num_paths = 400.0, 12
    keys = jax.random.split(jax.random.PRNGKey(20240519), num_paths)
    paths = jax.vmap(lambda k: ps.ctmc.gillespie(k, proc, t_max, 1500))(keys)
    assert not np.any(np.asarray(paths.truncated))
    times, labels = aggregate(paths, t_max, CCO_OPEN.astype(int))
    return Q, pi, times, labels


def test_mean_dwell_times_match_closed_form(cco_data):
    Q, _, times, labels = cco_data
    # complete sojourns only (not the first, which starts at time 0, nor the censored last one)
    opens = np.concatenate([t[1:-1][c[1:-1] == 1] for t, c in zip(times, labels)])
    shuts = np.concatenate([t[1:-1][c[1:-1] == 0] for t, c in zip(times, labels)])
    mean_open = 1.0 / CCO_RATES[(2, 1)]
    # shut: phi_S (-Q_SS)^{-1} 1, phi_S the equilibrium entry into the shut states (only through C1)
    Qss = Q[:2, :2]
    phi = np.array([0.0, 1.0])
    mean_shut = phi @ np.linalg.solve(-Qss, np.ones(2))
    second_shut = 2 * phi @ np.linalg.solve(Qss @ Qss, np.ones(2))
    for x, m, m2 in ((opens, mean_open, 2 * mean_open ** 2), (shuts, mean_shut, second_shut)):
        se = np.sqrt((m2 - m ** 2) / len(x))
        assert abs(x.mean() - m) < 4 * se, (x.mean(), m, se)
    # the library's density has that mean, and integrates to one
    grid = np.linspace(0, 60, 24001)
    f = np.asarray(ps.ctmc.dwell_time_density(Q, grid, CCO_OPEN, 0))
    np.testing.assert_allclose(scipy.integrate.simpson(f, x=grid), 1.0, atol=1e-8)
    np.testing.assert_allclose(scipy.integrate.simpson(grid * f, x=grid), mean_shut, rtol=1e-8)
    # and the distribution of complete shut times is that density (KS)
    cdf = scipy.interpolate.interp1d(grid, scipy.integrate.cumulative_trapezoid(f, grid, initial=0.0))
    assert scipy.stats.kstest(shuts[shuts < 60], cdf).pvalue > 1e-3


def test_mle_from_aggregated_data_recovers_the_rates(cco_data):
    Q, pi, times, labels = cco_data
    pairs = list(CCO_RATES)
    truth = np.log(np.array([CCO_RATES[p] for p in pairs]))
    n = np.array([len(t) for t in times])
    N = n.max()
    tb = np.zeros((len(times), N))
    cb = np.zeros((len(times), N), int)
    for b, (t, c) in enumerate(zip(times, labels)):
        tb[b, :len(t)], cb[b, :len(c)] = t, c

    def nll(log_rates):
        proc = make_proc(jnp.exp(log_rates), pairs, 3, jnp.asarray(pi))
        # each path starts at time 0 in pi, and its last sojourn is cut by t_max
        return -ps.ctmc.dwell_log_likelihood(proc, tb, cb, CCO_OPEN, lengths=n, initial=pi, censor_last=True,
                                             method="spectral")

    vg = jax.jit(jax.value_and_grad(nll))
    res = scipy.optimize.minimize(lambda x: tuple(np.asarray(v) for v in vg(jnp.asarray(x))), np.zeros(4),
                                  jac=True, method="L-BFGS-B")
    assert res.success, res
    H = np.asarray(jax.hessian(nll)(jnp.asarray(res.x)))          # observed Fisher information (log rates)
    cov = np.linalg.inv(H)
    se = np.sqrt(np.diag(cov))
    err = res.x - truth
    # each log rate within 4 standard errors, and jointly within the 99.9% chi-square(4) ellipsoid
    assert np.all(np.abs(err) < 4 * se), (err, se)
    assert err @ H @ err < scipy.stats.chi2(4).ppf(0.999), err @ H @ err
    assert np.all(se < 0.15)                                      # the data carry real information


# ----------------------------------------------------------------------------------------------
# (d) jit / vmap / grad
# ----------------------------------------------------------------------------------------------
def test_jit_vmap_grad_and_finite_differences():
    rng = np.random.default_rng(3)
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    classes = np.array([0, 0, 1, 1])
    c = random_sequence(rng, 2, 8)
    t = rng.exponential(1.0, 8)
    rates = jnp.asarray(rng.uniform(0.5, 2.0, len(pairs)))

    def ll(r, method):
        return ps.ctmc.dwell_log_likelihood(make_proc(r, pairs, 4), t, c, classes, method=method)

    for method in ("expm", "spectral"):
        f = jax.jit(lambda r, m=method: ll(r, m))
        np.testing.assert_allclose(float(f(rates)), float(ll(rates, "auto")), rtol=1e-12)
        batch = jnp.stack([rates, 1.3 * rates])
        np.testing.assert_allclose(np.asarray(jax.vmap(f)(batch)), [float(f(rates)), float(f(1.3 * rates))],
                                   rtol=1e-12)
        g = np.asarray(jax.grad(f)(rates))
        h = 1e-6
        fd = np.array([(float(f(rates.at[i].add(h))) - float(f(rates.at[i].add(-h)))) / (2 * h)
                       for i in range(len(pairs))])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_spectral_gradient_is_finite_at_repeated_eigenvalues():
    # star C1 - O - C2 with equal rates: the shut block is diag(-k, -k) (a repeated eigenvalue)
    pairs = [(0, 2), (2, 0), (1, 2), (2, 1)]
    classes = np.array([0, 0, 1])
    c = np.array([1, 0, 1, 0, 1])
    t = np.array([0.3, 1.2, 0.7, 0.1, 2.0])
    rates = jnp.array([1.0, 0.5, 1.0, 0.5])
    g = {m: np.asarray(jax.grad(lambda r, m=m: ps.ctmc.dwell_log_likelihood(make_proc(r, pairs, 3), t, c, classes,
                                                                             method=m))(rates))
         for m in ("expm", "spectral")}
    assert np.all(np.isfinite(g["spectral"]))
    np.testing.assert_allclose(g["spectral"], g["expm"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# (e) bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_argument():
    Q = generator(CCO_RATES, 3)
    f = ps.ctmc.dwell_log_likelihood
    t, c = np.array([0.5, 1.0, 0.2]), np.array([0, 1, 0])
    with pytest.raises(ValueError, match="dwell_times"):
        f(Q, np.array([0.5, -1.0, 0.2]), c, CCO_OPEN)
    with pytest.raises(ValueError, match="dwell_times"):
        f(Q, np.array([0.5, np.nan, 0.2]), c, CCO_OPEN)
    with pytest.raises(ValueError, match="dwell_classes"):
        f(Q, t, np.array([0, 2, 0]), CCO_OPEN)
    with pytest.raises(ValueError, match="dwell_classes.*consecutive"):
        f(Q, t, np.array([0, 1, 1]), CCO_OPEN)
    with pytest.raises(ValueError, match="classes: class 1 has no states"):
        f(Q, t, c, np.array([0, 0, 2]))
    with pytest.raises(ValueError, match="classes"):
        f(Q, t, c, np.array([0, 1]))
    with pytest.raises(ValueError, match="lengths"):
        f(Q, t[None], c[None], CCO_OPEN, lengths=np.array([4]))
    with pytest.raises(ValueError, match="initial"):
        f(Q, t, c, CCO_OPEN, initial=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="censor_last"):
        f(Q, t, c, CCO_OPEN, censor_last=np.array([True, False]))
    with pytest.raises(ValueError, match="method"):
        f(Q, t, c, CCO_OPEN, method="eig")
    cyc = np.array([[-3.0, 2.0, 1.0], [0.5, -1.0, 0.5], [2.0, 1.0, -3.0]])   # a cycle out of detailed balance
    with pytest.raises(ValueError, match="method"):
        f(cyc, t, c, CCO_OPEN, method="spectral")
    absorbing = np.array([[0.0, 0.0, 0.0], [0.5, -1.0, 0.5], [0.0, 0.0, 0.0]])   # no unique equilibrium
    with pytest.raises(ValueError, match="initial"):
        f(absorbing, t, c, CCO_OPEN)
    # padding beyond lengths is not checked, and the checks skip traced data
    tb = np.array([[0.5, 1.0, -5.0]])
    cb = np.array([[0, 1, 1]])
    assert np.isfinite(float(f(Q, tb, cb, CCO_OPEN, lengths=np.array([2]))))
    assert np.isfinite(float(jax.jit(lambda tt: f(Q, tt, c, CCO_OPEN))(jnp.asarray(t))))
