"""Property-based tests (hypothesis) over the public API (issue 15, item 5).

Each property draws shapes, dtypes, NaN patterns, scales or malformed parameters and checks that
the engine either returns finite results equal to a reference (a tiny numpy Kalman filter or
forward algorithm written here, the sequential vs the parallel form, a batch vs one sequence at a
time, a padded batch vs a list, brute-force enumeration, float32 vs float64) or raises a
``ValueError`` whose message starts with the argument's name; and that numpy inputs are never
mutated.

Profiles (registered in conftest.py, chosen by the env var HYPOTHESIS_PROFILE): "ci" (default,
12 derandomised examples per property) and "all" (200). JAX compiles once per shape, so the
shape strategies draw from small fixed sets; the values come from a drawn seed.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from itertools import product

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from scipy import stats
from scipy.special import logsumexp

import probssm as ps

LOG_2PI = np.log(2 * np.pi)
seeds = st.integers(0, 2 ** 31 - 1)
nan_patterns = st.sampled_from(["none", "rows", "entries", "mixed"])
KALMAN_SHAPES = st.sampled_from([(1, 1, 1), (6, 2, 2), (6, 2, 1)])  # (T, d, p)
FEW_SHAPES = st.sampled_from([(1, 1, 1), (6, 2, 2)])
HMM_SHAPES = st.sampled_from([(1, 2), (7, 2), (7, 3)])  # (T, K)


def raises_naming(arg: str):
    """pytest.raises(ValueError) whose message starts with the argument's name (a model's field may
    come as ``model.<field>``, the form of `SSM.check_parameters`)."""
    return pytest.raises(ValueError, match=rf"^(model\.)?{re.escape(arg)}")


# ----------------------------------------------------------------------------------------------
# Random models and data (values from a seed: hypothesis draws the seed and the options)
# ----------------------------------------------------------------------------------------------
def _psd(rng, n, floor=0.1):
    M = rng.normal(size=(n, n))
    return M @ M.T / n + floor * np.eye(n)


def lgssm_arrays(seed, d, p):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    A = 0.9 * A / max(1.0, np.max(np.abs(np.linalg.eigvals(A))))
    return dict(initial_mean=rng.normal(size=d), initial_cov=_psd(rng, d), transition_matrix=A,
                transition_cov=_psd(rng, d), emission_matrix=rng.normal(size=(p, d)), emission_cov=_psd(rng, p))


def lgssm(arrays, dtype=np.float64):
    return ps.models.LinearGaussianSSM(**{k: np.asarray(v, dtype) for k, v in arrays.items()})


def with_nans(y, pattern, seed):
    """A copy of y (T, p) with missing values: whole rows, single entries, or both (never all)."""
    rng = np.random.default_rng(seed + 1)
    y = np.array(y, dtype=np.float64)
    T, p = y.shape
    if pattern in ("rows", "mixed") and T > 1:
        y[rng.random(T) < 0.3] = np.nan
    if pattern in ("entries", "mixed"):
        y[rng.random((T, p)) < 0.2] = np.nan
    if np.all(np.isnan(y)):
        y[0, 0] = 0.5
    return y


def np_kalman(a, ys):
    """Reference Kalman filter: log p(y) and filtered means, dropping missing entries."""
    m, P = np.array(a["initial_mean"], float), np.array(a["initial_cov"], float)
    F, Q, H, R = (np.asarray(a[k], float) for k in ("transition_matrix", "transition_cov", "emission_matrix",
                                                    "emission_cov"))
    ll, means = 0.0, []
    for t, y in enumerate(ys):
        if t > 0:
            m, P = F @ m, F @ P @ F.T + Q
        o = ~np.isnan(y)
        if o.any():
            Ho, r = H[o], y[o] - H[o] @ m
            S = Ho @ P @ Ho.T + R[np.ix_(o, o)]
            K = np.linalg.solve(S, Ho @ P).T
            ll += -0.5 * (o.sum() * LOG_2PI + np.linalg.slogdet(S)[1] + r @ np.linalg.solve(S, r))
            m, P = m + K @ r, P - K @ S @ K.T
        means.append(m)
    return ll, np.array(means)


def hmm_arrays(seed, K, D=1):
    rng = np.random.default_rng(seed)
    return dict(pi=rng.dirichlet(np.ones(K)), A=rng.dirichlet(np.ones(K), size=K),
                means=rng.normal(size=(K, D)) * 2, covs=np.stack([_psd(rng, D, 0.3) for _ in range(K)]))


def gaussian_hmm(a, dtype=np.float64):
    return ps.models.HMM(np.asarray(a["pi"], dtype), np.asarray(a["A"], dtype),
                         ps.emissions.Gaussian(np.asarray(a["means"], dtype), np.asarray(a["covs"], dtype)))


def gaussian_loglik(a, ys):
    """(T, K) emission log-likelihoods; a row with any NaN counts as missing (0)."""
    K = a["means"].shape[0]
    out = np.zeros((ys.shape[0], K))
    for t, y in enumerate(ys):
        if not np.any(np.isnan(y)):
            out[t] = [stats.multivariate_normal(a["means"][k], a["covs"][k]).logpdf(y) for k in range(K)]
    return out


def np_forward(pi, A, logB):
    """Reference forward algorithm: log p(y) and filtered probabilities."""
    la = np.log(pi) + logB[0]
    out = [la]
    for t in range(1, logB.shape[0]):
        la = logsumexp(out[-1][:, None] + np.log(A), axis=0) + logB[t]
        out.append(la)
    out = np.array(out)
    return logsumexp(out[-1]), np.exp(out - logsumexp(out, axis=1, keepdims=True))


def hmm_data(seed, T, D=1):
    return np.random.default_rng(seed + 7).normal(size=(T, D)) * 2


# ----------------------------------------------------------------------------------------------
# ps.kalman: references
# ----------------------------------------------------------------------------------------------
@given(seeds, KALMAN_SHAPES, nan_patterns)
def test_kalman_filter_equals_numpy_reference(seed, shape, pattern):
    T, d, p = shape
    a = lgssm_arrays(seed, d, p)
    y = with_nans(np.random.default_rng(seed).normal(size=(T, p)), pattern, seed)
    f = ps.kalman.filter(lgssm(a), y)
    ll, means = np_kalman(a, y)
    np.testing.assert_allclose(f.log_likelihood, ll, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(f.filtered_means, means, rtol=1e-6, atol=1e-8)


@given(seeds, FEW_SHAPES, nan_patterns)
def test_kalman_parallel_equals_sequential(seed, shape, pattern):
    T, d, p = shape
    model = lgssm(lgssm_arrays(seed, d, p))
    y = with_nans(np.random.default_rng(seed).normal(size=(T, p)), pattern, seed)
    s, q = ps.kalman.smoother(model, y), ps.kalman.smoother(model, y, parallel=True)
    for a, b in zip(s, q):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@given(seeds, FEW_SHAPES, nan_patterns)
def test_kalman_smoother_consistent_with_filter(seed, shape, pattern):
    """Last smoothed = last filtered; smoothed covariances are symmetric PSD and no larger
    than the filtered ones (trace)."""
    T, d, p = shape
    model = lgssm(lgssm_arrays(seed, d, p))
    y = with_nans(np.random.default_rng(seed).normal(size=(T, p)), pattern, seed)
    s = ps.kalman.smoother(model, y)
    np.testing.assert_allclose(s.smoothed_means[-1], s.filtered_means[-1], rtol=1e-10, atol=1e-12)
    C = np.asarray(s.smoothed_covs)
    np.testing.assert_allclose(C, np.swapaxes(C, -1, -2), atol=1e-10)
    assert np.all(np.linalg.eigvalsh(C) > -1e-10)
    assert np.all(np.trace(C, axis1=1, axis2=2) <= np.trace(np.asarray(s.filtered_covs), axis1=1, axis2=2) + 1e-9)


@given(seeds, st.sampled_from([2, 3]), nan_patterns)
def test_kalman_batch_equals_one_by_one(seed, B, pattern):
    a = lgssm_arrays(seed, 2, 2)
    model = lgssm(a)
    ys = np.stack([with_nans(np.random.default_rng(seed + b).normal(size=(6, 2)), pattern, seed + b)
                   for b in range(B)])
    batch = ps.kalman.filter(model, ys)
    for b in range(B):
        one = ps.kalman.filter(model, ys[b])
        np.testing.assert_allclose(batch.log_likelihood[b], one.log_likelihood, rtol=1e-10)
        np.testing.assert_allclose(batch.filtered_means[b], one.filtered_means, rtol=1e-8, atol=1e-12)


@given(seeds, st.sampled_from([1, 3, 6]), st.booleans())
def test_kalman_list_equals_padded_and_single(seed, n, first_long):
    """A list of unequal sequences = the NaN-padded batch with lengths = each sequence alone;
    log_likelihood sums them."""
    lengths = [6, n] if first_long else [n, 6]  # one padded shape (2, 6, 2): one compilation
    model = lgssm(lgssm_arrays(seed, 2, 2))
    rng = np.random.default_rng(seed)
    seqs = [rng.normal(size=(m, 2)) for m in lengths]
    Tmax = max(lengths)
    padded = np.stack([np.concatenate([s, np.full((Tmax - len(s), 2), 7.0)]) for s in seqs])
    from_list = ps.kalman.filter(model, seqs)
    from_pad = ps.kalman.filter(model, padded, lengths=np.array(lengths))
    singles = np.array([ps_ll(model, s) for s in seqs])
    np.testing.assert_allclose(from_list.log_likelihood, singles, rtol=1e-9)
    np.testing.assert_allclose(from_pad.log_likelihood, singles, rtol=1e-9)
    np.testing.assert_allclose(ps.kalman.log_likelihood(model, seqs), singles.sum(), rtol=1e-9)


def ps_ll(model, y):
    return float(ps.kalman.filter(model, y).log_likelihood)


@given(seeds, nan_patterns)
def test_kalman_float32_close_to_float64(seed, pattern):
    a = lgssm_arrays(seed, 2, 2)
    y = with_nans(np.random.default_rng(seed).normal(size=(6, 2)), pattern, seed)
    f64 = ps.kalman.filter(lgssm(a), y)
    f32 = ps.kalman.filter(lgssm(a, np.float32), y.astype(np.float32))
    assert f32.filtered_means.dtype == jnp.float32
    np.testing.assert_allclose(f32.log_likelihood, f64.log_likelihood, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(f32.filtered_means, f64.filtered_means, rtol=1e-3, atol=1e-3)


@given(seeds, st.sampled_from([1e-6, 1e-3, 1e3, 1e6]), nan_patterns)
def test_kalman_emission_scale_equivariance(seed, c, pattern):
    """y -> c y with H -> c H, R -> c^2 R, d -> c d: log p changes by -(#observed) log c, the
    filtered means do not change (extreme scales included)."""
    a = lgssm_arrays(seed, 2, 2)
    y = with_nans(np.random.default_rng(seed).normal(size=(6, 2)), pattern, seed)
    b = dict(a, emission_matrix=c * a["emission_matrix"], emission_cov=c * c * a["emission_cov"])
    f, g = ps.kalman.filter(lgssm(a), y), ps.kalman.filter(lgssm(b), c * y)
    n_obs = np.sum(~np.isnan(y))
    np.testing.assert_allclose(g.log_likelihood, f.log_likelihood - n_obs * np.log(c), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(g.filtered_means, f.filtered_means, rtol=1e-5, atol=1e-7)


@given(seeds, FEW_SHAPES, nan_patterns)
def test_kalman_log_likelihood_equals_filter(seed, shape, pattern):
    T, d, p = shape
    model = lgssm(lgssm_arrays(seed, d, p))
    y = with_nans(np.random.default_rng(seed).normal(size=(T, p)), pattern, seed)
    np.testing.assert_allclose(ps.kalman.log_likelihood(model, y), ps.kalman.filter(model, y).log_likelihood,
                               rtol=1e-10)


@given(seeds)
def test_kalman_all_missing_row_is_a_prediction(seed):
    """An all-NaN row contributes nothing: log p(y) equals that of the model whose step is
    predicted through, and its filtered mean is F m_{t-1}."""
    a = lgssm_arrays(seed, 2, 2)
    y = np.random.default_rng(seed).normal(size=(6, 2))
    y[3] = np.nan
    f = ps.kalman.filter(lgssm(a), y)
    np.testing.assert_allclose(f.filtered_means[3], a["transition_matrix"] @ np.asarray(f.filtered_means[2]),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f.log_likelihood, np_kalman(a, y)[0], rtol=1e-9)


@given(seeds, st.sampled_from(["forecast", "sample"]))
def test_kalman_forecast_and_sample_shapes_finite(seed, which):
    model = lgssm(lgssm_arrays(seed, 2, 2))
    y = with_nans(np.random.default_rng(seed).normal(size=(6, 2)), "mixed", seed)
    if which == "forecast":
        out = ps.kalman.forecast(model, y, 3)
        assert out.means.shape == (3, 2) and out.emission_covs.shape == (3, 2, 2)
        assert np.all(np.linalg.eigvalsh(np.asarray(out.emission_covs)) > 0)
    else:
        out = ps.kalman.sample(jax.random.key(seed), model, y, 4)
        assert out.shape == (4, 6, 2)
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))


# ----------------------------------------------------------------------------------------------
# ps.kalman: exact diffuse initialisation and huge initial covariances (issue 15, item 3)
# ----------------------------------------------------------------------------------------------
def local_level(P1, q=0.5, r=1.0):
    return ps.models.LinearGaussianSSM(np.zeros(1), np.array([[P1]]), np.eye(1), q * np.eye(1), np.eye(1),
                                       r * np.eye(1))


@given(seeds, st.sampled_from([0.1, 1.0, 10.0]))
def test_kalman_exact_diffuse_is_the_limit(seed, q):
    """Durbin & Koopman: log L_d = lim_{kappa -> inf} [log L(kappa) + (q/2) log kappa], here q = 1."""
    y = np.cumsum(np.random.default_rng(seed).normal(size=(8, 1)), axis=0) * 3
    kappa = 1e7
    limit = ps_ll(local_level(kappa, q), y) + 0.5 * np.log(kappa)
    np.testing.assert_allclose(ps_ll(local_level(np.inf, q), y), limit, rtol=1e-5, atol=1e-4)


@given(seeds, st.sampled_from([1e12, 1e20, 1e30]))
def test_kalman_huge_initial_cov_right_or_warned(seed, kappa):
    """initial_cov = kappa gives log L(kappa) = log L_d - 0.5 log kappa + O(1/kappa), or warns."""
    y = np.cumsum(np.random.default_rng(seed).normal(size=(8, 1)), axis=0) * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll = ps_ll(local_level(kappa), y)
    if any(issubclass(w.category, UserWarning) for w in caught):
        return
    exact = ps_ll(local_level(1e7), y) + 0.5 * np.log(1e7) - 0.5 * np.log(kappa)
    np.testing.assert_allclose(ll, exact, rtol=1e-6, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# ps.kalman / ps.gaussian: malformed parameters and data
# ----------------------------------------------------------------------------------------------
COV_FIELDS = ["initial_cov", "transition_cov", "emission_cov"]
MATRIX_FIELDS = ["initial_mean", "transition_matrix", "emission_matrix", "initial_cov", "transition_cov",
                 "emission_cov"]


@given(seeds, st.sampled_from(COV_FIELDS), st.sampled_from(["negative", "asymmetric"]),
       st.sampled_from(["constructor", "tree_at"]))
def test_lgssm_non_psd_cov_raises_naming_it(seed, field, kind, where):
    a = lgssm_arrays(seed, 2, 2)
    bad = -np.eye(2) if kind == "negative" else np.array([[1.0, 0.9], [-0.9, 1.0]])
    y = np.zeros((4, 2))
    with raises_naming(field):
        if where == "constructor":
            lgssm(dict(a, **{field: bad}))
        else:
            ps.kalman.filter(eqx.tree_at(lambda m: getattr(m, field), lgssm(a), jnp.asarray(bad)), y)


@given(seeds, st.sampled_from(MATRIX_FIELDS), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.sampled_from(["constructor", "tree_at"]))
def test_lgssm_non_finite_parameter_raises_naming_it(seed, field, value, where):
    a = lgssm_arrays(seed, 2, 2)
    assume(not (field == "initial_cov" and value == np.inf))  # inf there is the diffuse prior
    bad = np.array(a[field], float)
    bad.flat[0] = value
    y = np.zeros((4, 2))
    with raises_naming(field):
        if where == "constructor":
            lgssm(dict(a, **{field: bad}))
        else:
            ps.kalman.filter(eqx.tree_at(lambda m: getattr(m, field), lgssm(a), jnp.asarray(bad)), y)


@given(seeds, st.sampled_from(COV_FIELDS + ["emission_matrix", "transition_matrix"]))
def test_lgssm_wrong_shape_after_tree_at_raises(seed, field):
    """The issue's silent wrong answer: a (3, 3) emission_cov for a 2-D emission set by tree_at."""
    model = lgssm(lgssm_arrays(seed, 2, 2))
    wrong = jnp.ones((2, 3)) if field == "emission_matrix" else jnp.eye(3)  # rows kept: p stays 2
    with raises_naming(field):
        ps.kalman.filter(eqx.tree_at(lambda m: getattr(m, field), model, wrong), np.zeros((4, 2)))


@given(seeds, st.sampled_from(["kalman", "smoother", "gaussian", "imap"]), st.sampled_from(["inf", "width"]))
def test_continuous_engines_reject_bad_emissions(seed, engine, kind):
    model = lgssm(lgssm_arrays(seed, 2, 2))
    y = np.random.default_rng(seed).normal(size=(5, 2 if kind == "inf" else 3))
    if kind == "inf":
        y[2, 1] = np.inf
    call = {"kalman": lambda: ps.kalman.filter(model, y), "smoother": lambda: ps.kalman.smoother(model, y),
            "gaussian": lambda: ps.gaussian.filter(model, y, method="ukf"),
            "imap": lambda: ps.imap.filter_ssm(model, y, optimizer="sgd", learning_rate=0.1, num_iters=2)}[engine]
    with raises_naming("emissions"):
        call()


@given(seeds, st.sampled_from(["kalman", "hmm", "smc", "gaussian"]))
def test_complex_emissions_refused(seed, engine):
    y = np.random.default_rng(seed).normal(size=(5, 1)) * (1 + 1j)
    call = {"kalman": lambda: ps.kalman.filter(local_level(1.0), y),
            "hmm": lambda: ps.hmm.filter(gaussian_hmm(hmm_arrays(seed, 2)), y),
            "smc": lambda: ps.smc.particle_filter(jax.random.key(0), local_level(1.0), y, 8),
            "gaussian": lambda: ps.gaussian.filter(local_level(1.0), y)}[engine]
    with raises_naming("emissions"):
        call()


@given(st.sampled_from(["kalman", "hmm", "smc", "gaussian", "dkf"]))
def test_zero_time_steps_message(engine):
    """T = 0: a ValueError naming emissions that says T must be >= 1."""
    y = np.zeros((0, 1))
    dkf = ps.dkf.exact_linear_gaussian(0.5 * np.eye(1), np.eye(1), np.eye(1), np.eye(1))
    call = {"kalman": lambda: ps.kalman.filter(local_level(1.0), y),
            "hmm": lambda: ps.hmm.filter(gaussian_hmm(hmm_arrays(0, 2)), y),
            "smc": lambda: ps.smc.particle_filter(jax.random.key(0), local_level(1.0), y, 8),
            "gaussian": lambda: ps.gaussian.filter(local_level(1.0), y),
            "dkf": lambda: ps.dkf.filter(dkf, y)}[engine]
    with pytest.raises(ValueError, match=r"^emissions.*T >= 1"):
        call()


@given(seeds, st.sampled_from(["kalman", "hmm", "gaussian", "smc"]))
def test_one_dimensional_series_reads_as_column(seed, engine):
    """A 1-D series (T,) where the model has one emission dimension equals (T, 1)."""
    y = np.random.default_rng(seed).normal(size=6)
    if engine == "kalman":
        f = lambda v: ps.kalman.filter(local_level(1.0), v).log_likelihood
    elif engine == "hmm":
        f = lambda v: ps.hmm.filter(gaussian_hmm(hmm_arrays(seed, 2)), v).log_likelihood
    elif engine == "gaussian":
        f = lambda v: ps.gaussian.filter(local_level(1.0), v, method="ekf").log_likelihood
    else:
        f = lambda v: ps.smc.particle_filter(jax.random.key(1), local_level(1.0), v, 8).log_likelihood
    np.testing.assert_allclose(f(y), f(y[:, None]), rtol=1e-12)


@given(seeds, st.sampled_from(["ekf", "iekf", "ukf", "cubature"]), st.sampled_from(["none", "mixed"]))
def test_gaussian_filters_exact_on_linear_models(seed, method, pattern):
    """Every linearisation of a linear model is exact: ps.gaussian = ps.kalman (filter and smoother)."""
    model = lgssm(lgssm_arrays(seed, 2, 2))
    y = with_nans(np.random.default_rng(seed).normal(size=(6, 2)), pattern, seed)
    g, k = ps.gaussian.smoother(model, y, method=method), ps.kalman.smoother(model, y)
    np.testing.assert_allclose(g.log_likelihood, k.log_likelihood, rtol=1e-8)
    np.testing.assert_allclose(g.smoothed_means, k.smoothed_means, rtol=1e-6, atol=1e-9)


@given(seeds)
def test_dkf_exact_linear_gaussian_is_a_kalman_filter(seed):
    """exact_linear_gaussian's DKF is the Kalman filter started from the stationary covariance."""
    a = lgssm_arrays(seed, 2, 2)
    dkf = ps.dkf.exact_linear_gaussian(a["transition_matrix"], a["transition_cov"], a["emission_matrix"],
                                       a["emission_cov"])
    S = np.asarray(dkf.stationary_cov)
    ref = dict(a, initial_mean=np.zeros(2), initial_cov=S)
    y = np.random.default_rng(seed).normal(size=(6, 2))
    np.testing.assert_allclose(ps.dkf.filter(dkf, y).filtered_means, np_kalman(ref, y)[1], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# ps.hmm: references
# ----------------------------------------------------------------------------------------------
@given(seeds, HMM_SHAPES, st.sampled_from(["none", "rows"]))
def test_hmm_filter_equals_numpy_forward(seed, shape, pattern):
    T, K = shape
    a = hmm_arrays(seed, K)
    y = with_nans(hmm_data(seed, T), pattern, seed)
    f = ps.hmm.filter(gaussian_hmm(a), y)
    ll, probs = np_forward(a["pi"], a["A"], gaussian_loglik(a, y))
    np.testing.assert_allclose(f.log_likelihood, ll, rtol=1e-9)
    np.testing.assert_allclose(f.filtered_probs, probs, rtol=1e-7, atol=1e-10)


@given(seeds, HMM_SHAPES, st.sampled_from(["none", "rows"]))
def test_hmm_parallel_equals_sequential(seed, shape, pattern):
    T, K = shape
    model = gaussian_hmm(hmm_arrays(seed, K))
    y = with_nans(hmm_data(seed, T), pattern, seed)
    s, q = ps.hmm.smoother(model, y), ps.hmm.smoother(model, y, parallel=True)
    for a, b in zip(s, q):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


@given(seeds, HMM_SHAPES)
def test_hmm_smoother_probabilities_are_consistent(seed, shape):
    T, K = shape
    s = ps.hmm.smoother(gaussian_hmm(hmm_arrays(seed, K)), hmm_data(seed, T))
    P = np.asarray(s.smoothed_probs)
    assert np.all(P >= 0) and np.allclose(P.sum(-1), 1.0)
    np.testing.assert_allclose(np.sum(s.transition_counts), T - 1, atol=1e-9)
    # marginals of the pair counts are the smoothed probabilities of steps 1..T-1
    np.testing.assert_allclose(np.sum(s.transition_counts, 0), P[1:].sum(0), atol=1e-9)
    np.testing.assert_allclose(P[-1], s.filtered_probs[-1], rtol=1e-9, atol=1e-12)


@given(seeds, st.sampled_from([2, 3]), st.randoms(use_true_random=False))
def test_hmm_invariant_under_state_permutation(seed, K, rnd):
    a = hmm_arrays(seed, K)
    perm = list(range(K))
    rnd.shuffle(perm)
    perm = np.array(perm)
    b = dict(pi=a["pi"][perm], A=a["A"][np.ix_(perm, perm)], means=a["means"][perm], covs=a["covs"][perm])
    y = with_nans(hmm_data(seed, 7), "rows", seed)
    s, t = ps.hmm.smoother(gaussian_hmm(a), y), ps.hmm.smoother(gaussian_hmm(b), y)
    np.testing.assert_allclose(t.log_likelihood, s.log_likelihood, rtol=1e-10)
    np.testing.assert_allclose(t.smoothed_probs, np.asarray(s.smoothed_probs)[:, perm], rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(perm[np.asarray(ps.hmm.viterbi(gaussian_hmm(b), y))],
                                  np.asarray(ps.hmm.viterbi(gaussian_hmm(a), y)))


@given(seeds, st.sampled_from([2, 3]))
def test_hmm_brute_force_mixture_identity_and_viterbi(seed, K):
    """For T = 4: p(y) = sum over all K^T paths of p(z, y) (a mixture); Viterbi is the argmax."""
    a = hmm_arrays(seed, K)
    y = hmm_data(seed, 4)
    logB = gaussian_loglik(a, y)
    joint = {z: np.log(a["pi"][z[0]]) + sum(np.log(a["A"][z[t - 1], z[t]]) for t in range(1, 4))
             + sum(logB[t, z[t]] for t in range(4)) for z in product(range(K), repeat=4)}
    model = gaussian_hmm(a)
    np.testing.assert_allclose(ps.hmm.filter(model, y).log_likelihood, logsumexp(list(joint.values())), rtol=1e-10)
    path = tuple(int(v) for v in np.asarray(ps.hmm.viterbi(model, y)))
    np.testing.assert_allclose(joint[path], max(joint.values()), rtol=1e-10)


@given(seeds, st.sampled_from([1, 4, 7]), st.booleans())
def test_hmm_list_padded_and_batch_agree(seed, n, first_long):
    lengths = [7, n] if first_long else [n, 7]
    model = gaussian_hmm(hmm_arrays(seed, 2))
    seqs = [hmm_data(seed + i, n) for i, n in enumerate(lengths)]
    Tmax = max(lengths)
    padded = np.stack([np.concatenate([s, np.full((Tmax - len(s), 1), 3.0)]) for s in seqs])
    singles = np.array([float(ps.hmm.filter(model, s).log_likelihood) for s in seqs])
    np.testing.assert_allclose(ps.hmm.filter(model, seqs).log_likelihood, singles, rtol=1e-10)
    np.testing.assert_allclose(ps.hmm.filter(model, padded, lengths=np.array(lengths)).log_likelihood, singles,
                               rtol=1e-10)
    np.testing.assert_allclose(ps.hmm.log_likelihood(model, seqs), singles.sum(), rtol=1e-10)


@given(seeds, st.lists(st.sampled_from([1, 4, 7]), min_size=2, max_size=3))
def test_hmm_concatenated_with_lengths_equals_list(seed, lengths):
    """hmmlearn-style data: the sequences concatenated (sum(lengths), D) with a 1-D lengths."""
    model = gaussian_hmm(hmm_arrays(seed, 2))
    seqs = [hmm_data(seed + i, n) for i, n in enumerate(lengths)]
    got = ps.hmm.filter(model, np.concatenate(seqs), lengths=np.array(lengths)).log_likelihood
    np.testing.assert_allclose(got, ps.hmm.filter(model, seqs).log_likelihood, rtol=1e-10)


@given(seeds, HMM_SHAPES)
def test_hmm_float32_close_to_float64(seed, shape):
    T, K = shape
    a = hmm_arrays(seed, K)
    y = hmm_data(seed, T)
    f64 = ps.hmm.filter(gaussian_hmm(a), y)
    f32 = ps.hmm.filter(gaussian_hmm(a, np.float32), y.astype(np.float32))
    np.testing.assert_allclose(f32.log_likelihood, f64.log_likelihood, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(f32.filtered_probs, f64.filtered_probs, atol=1e-3)


@given(seeds, st.sampled_from(["initial_probs", "transition_matrix", "means", "covs"]))
def test_hmm_mixed_float32_parameters_promote(seed, which):
    """One float32 array in a float64 model (x64 on): runs in float64, same answer."""
    a = hmm_arrays(seed, 2)
    y = hmm_data(seed, 7)
    arrays = dict(initial_probs=a["pi"], transition_matrix=a["A"], means=a["means"], covs=a["covs"])
    arrays[which] = arrays[which].astype(np.float32)
    mixed = ps.models.HMM(arrays["initial_probs"], arrays["transition_matrix"],
                          ps.emissions.Gaussian(arrays["means"], arrays["covs"]))
    ref = ps.hmm.filter(gaussian_hmm(a), y).log_likelihood
    np.testing.assert_allclose(ps.hmm.filter(mixed, y).log_likelihood, ref, rtol=1e-5)


@given(seeds, st.sampled_from([np.float32, np.float64]))
def test_poisson_hmm_equals_numpy(seed, dtype):
    rng = np.random.default_rng(seed)
    pi, A, rates = rng.dirichlet(np.ones(2)), rng.dirichlet(np.ones(2), size=2), rng.uniform(0.5, 5, size=(2, 2))
    y = rng.poisson(2.0, size=(7, 2)).astype(float)
    y[rng.random((7, 2)) < 0.2] = np.nan
    logB = np.nansum(stats.poisson.logpmf(y[:, None, :], rates[None]), -1)
    model = ps.models.HMM(pi.astype(dtype), A.astype(dtype), ps.emissions.Poisson(rates.astype(dtype)))
    tol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(ps.hmm.filter(model, y.astype(dtype)).log_likelihood, np_forward(pi, A, logB)[0],
                               rtol=tol)


@given(seeds, st.sampled_from([2, 3]))
def test_categorical_hmm_equals_numpy(seed, C):
    rng = np.random.default_rng(seed)
    pi, A, probs = rng.dirichlet(np.ones(2)), rng.dirichlet(np.ones(2), size=2), rng.dirichlet(np.ones(C), size=2)
    y = rng.integers(0, C, size=(7, 1)).astype(float)
    y[rng.random(7) < 0.2] = np.nan
    logB = np.where(np.isnan(y), 0.0, np.log(probs[:, np.nan_to_num(y[:, 0]).astype(int)].T))
    model = ps.models.HMM(pi, A, ps.emissions.Categorical(probs))
    np.testing.assert_allclose(ps.hmm.filter(model, y).log_likelihood, np_forward(pi, A, logB)[0], rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# ps.hmm: malformed parameters and data
# ----------------------------------------------------------------------------------------------
@given(seeds, st.sampled_from(["initial_probs", "transition_matrix"]),
       st.sampled_from(["negative", "unnormalised", "nan", "wrong_shape"]), st.sampled_from(["constructor", "tree_at"]))
def test_hmm_bad_probabilities_raise_naming_them(seed, field, kind, where):
    a = hmm_arrays(seed, 3)
    good = a["pi"] if field == "initial_probs" else a["A"]
    bad = {"negative": good - 2 * good.max(), "unnormalised": good * 1.5,
           "nan": np.where(np.arange(good.size).reshape(good.shape) == 0, np.nan, good),
           "wrong_shape": np.ones((2,) * good.ndim) / 2}[kind]
    y = hmm_data(seed, 5)
    with raises_naming(field):
        if where == "constructor":
            ps.models.HMM(bad if field == "initial_probs" else a["pi"], bad if field != "initial_probs" else a["A"],
                          ps.emissions.Gaussian(a["means"], a["covs"]))
        else:
            ps.hmm.filter(eqx.tree_at(lambda m: getattr(m, field), gaussian_hmm(a), jnp.asarray(bad)), y)


def test_hmm_wrong_shape_initial_probs_after_tree_at_named():
    a = hmm_arrays(0, 3)
    with raises_naming("initial_probs"):
        ps.hmm.filter(eqx.tree_at(lambda m: m.initial_probs, gaussian_hmm(a), jnp.ones(2) / 2), hmm_data(0, 5))


@given(st.sampled_from([3.0, -1.0, 1.5, 7.0]), st.sampled_from(["filter", "smoother", "viterbi", "sample"]))
def test_categorical_labels_outside_support(label, fn):
    model = ps.models.HMM(np.ones(2) / 2, np.full((2, 2), 0.5), ps.emissions.Categorical(np.full((2, 3), 1 / 3)))
    y = np.array([[0.0], [2.0], [np.nan], [label]])
    call = {"filter": lambda: ps.hmm.filter(model, y), "smoother": lambda: ps.hmm.smoother(model, y),
            "viterbi": lambda: ps.hmm.viterbi(model, y),
            "sample": lambda: ps.hmm.sample(jax.random.key(0), model, y)}[fn]
    with raises_naming("emissions"):
        call()


@given(st.sampled_from([("bernoulli", 2.0), ("bernoulli", -1.0), ("bernoulli", 0.5), ("poisson", 2.5),
                        ("poisson", -1.0)]))
def test_count_families_outside_support(case):
    family, value = case
    em = ps.emissions.Bernoulli(np.array([[0.2], [0.7]])) if family == "bernoulli" else \
        ps.emissions.Poisson(np.array([[1.0], [3.0]]))
    model = ps.models.HMM(np.ones(2) / 2, np.full((2, 2), 0.5), em)
    with raises_naming("emissions"):
        ps.hmm.filter(model, np.array([[1.0], [np.nan], [value]]))


@given(seeds, st.sampled_from(["hmm", "kalman", "smc"]), st.sampled_from([0, -3]))
def test_lengths_out_of_range_raise(seed, engine, bad):
    y = np.random.default_rng(seed).normal(size=(2, 5, 1))
    lengths = np.array([5, bad])
    call = {"hmm": lambda: ps.hmm.filter(gaussian_hmm(hmm_arrays(seed, 2)), y, lengths=lengths),
            "kalman": lambda: ps.kalman.filter(local_level(1.0), y, lengths=lengths),
            "smc": lambda: ps.smc.particle_filter(jax.random.key(0), local_level(1.0), y, 8, lengths=lengths)}[engine]
    with raises_naming("lengths"):
        call()


@given(st.sampled_from([0, 1, -4, 2.5, True]),
       st.sampled_from(["particle_filter", "paris", "kalman.sample", "hmm.sample", "forecast"]))
def test_bad_counts_raise_naming_them(n, fn):
    """num_particles < 2, num_samples / num_steps < 1 or not an integer: ValueError naming it."""
    y = np.zeros((4, 1))
    key = jax.random.key(0)
    model = local_level(1.0)
    if fn in ("particle_filter", "paris"):
        assume(not (isinstance(n, int) and not isinstance(n, bool) and n >= 2))
        call = (lambda: ps.smc.particle_filter(key, model, y, n)) if fn == "particle_filter" else \
            (lambda: ps.smc.paris(key, model, y, lambda zp, z, t, yy, u: z, n))
        name = "num_particles"
    else:
        assume(not (isinstance(n, int) and not isinstance(n, bool) and n >= 1))
        call = {"kalman.sample": lambda: ps.kalman.sample(key, model, y, n),
                "hmm.sample": lambda: ps.hmm.sample(key, gaussian_hmm(hmm_arrays(0, 2)), y, n),
                "forecast": lambda: ps.kalman.forecast(model, y, n)}[fn]
        name = "num_steps" if fn == "forecast" else "num_samples"
    with raises_naming(name):
        call()


# ----------------------------------------------------------------------------------------------
# Particle engines
# ----------------------------------------------------------------------------------------------
@given(seeds, st.sampled_from(["lgssm", "hmm"]), st.sampled_from(["none", "rows"]))
def test_particle_filter_output_is_well_formed(seed, which, pattern):
    model = local_level(1.0) if which == "lgssm" else gaussian_hmm(hmm_arrays(seed, 2))
    y = with_nans(hmm_data(seed, 6), pattern, seed)
    N = 16
    pf = ps.smc.particle_filter(jax.random.key(seed), model, y, N)
    assert np.isfinite(pf.log_likelihood)
    lw = np.asarray(pf.log_weights)
    np.testing.assert_allclose(logsumexp(lw, axis=1), 0.0, atol=1e-8)  # normalised log-weights
    ess = np.asarray(pf.ess)
    assert np.all((ess >= 1 - 1e-9) & (ess <= N + 1e-9))
    anc = np.asarray(pf.ancestors)
    assert anc.min() >= 0 and anc.max() < N
    paths = ps.smc.backward_sample(jax.random.key(seed + 1), model, pf, 3)
    assert paths.shape[:2] == (3, 6)


@given(seeds, st.sampled_from([np.inf, -np.inf]), st.sampled_from(["particle_filter", "paris", "hmc_smc"]))
def test_particle_engines_refuse_inf_data(seed, value, fn):
    """The particle filter treats inf like the other engines: ValueError naming emissions."""
    y = np.random.default_rng(seed).normal(size=(5, 1))
    y[2, 0] = value
    key, model = jax.random.key(0), local_level(1.0)
    call = {"particle_filter": lambda: ps.smc.particle_filter(key, model, y, 8),
            "paris": lambda: ps.smc.paris(key, model, y, lambda zp, z, t, yy, u: z, 8),
            "hmc_smc": lambda: ps.smc.hmc_smc(key, model, y, 8)}[fn]
    with raises_naming("emissions"):
        call()


@given(seeds)
def test_particle_filter_exact_on_a_one_step_model(seed):
    """T = 1 with the bootstrap filter: log-likelihood estimate = log mean of N(y; z_i, r) over
    prior draws, close to the exact value for N = 2000 (5 standard errors)."""
    y = np.random.default_rng(seed).normal(size=(1, 1)) * 2
    model = local_level(1.0)
    pf = ps.smc.particle_filter(jax.random.key(seed), model, y, 2000)
    exact = ps_ll(model, y)
    w = np.exp(np.asarray(pf.log_weights[0]))
    # standard error of the log of the mean weight (delta method) from the normalised weights
    se = np.sqrt(np.sum(w ** 2) - 1 / 2000 + 1e-12)
    assert abs(float(pf.log_likelihood) - exact) < 5 * max(se, 1e-3)


# ----------------------------------------------------------------------------------------------
# ps.sample, ps.mcmc, ps.load
# ----------------------------------------------------------------------------------------------
@given(seeds, st.sampled_from([1, 2, 9]), st.sampled_from(["lgssm", "hmm", "poisson"]))
def test_ps_sample_shapes_and_support(seed, T, which):
    if which == "lgssm":
        model = lgssm(lgssm_arrays(seed, 2, 1))
    elif which == "hmm":
        model = gaussian_hmm(hmm_arrays(seed, 3))
    else:
        model = ps.models.HMM(np.ones(2) / 2, np.full((2, 2), 0.5), ps.emissions.Poisson(np.array([[1.0], [4.0]])))
    z, y = ps.sample(jax.random.key(seed), model, T)
    assert z.shape[0] == T and y.shape == (T, 1)
    assert np.all(np.isfinite(np.asarray(y)))
    if which != "lgssm":
        assert np.all((np.asarray(z) >= 0) & (np.asarray(z) < model.num_states))
    if which == "poisson":
        assert np.all(np.asarray(y) >= 0) and np.all(np.asarray(y) == np.round(np.asarray(y)))


@given(st.sampled_from([0, -1, 2.0, None]))
def test_ps_sample_bad_num_timesteps(T):
    with raises_naming("num_timesteps"):
        ps.sample(jax.random.key(0), local_level(1.0), T)


@given(seeds, st.sampled_from(["lgssm", "hmm"]), st.sampled_from(["none", "rows"]))
def test_marginal_likelihood_equals_engine(seed, which, pattern):
    y = with_nans(hmm_data(seed, 6), pattern, seed)
    if which == "lgssm":
        model = local_level(2.0)
        ref = ps.kalman.filter(model, y).log_likelihood
    else:
        model = gaussian_hmm(hmm_arrays(seed, 2))
        ref = ps.hmm.filter(model, y).log_likelihood
    np.testing.assert_allclose(ps.mcmc.MarginalLikelihood(model, 6).log_prob(y), ref, rtol=1e-10)


@given(seeds)
def test_complete_log_likelihood_is_the_joint_density(seed):
    """log p(z, y) of a linear-Gaussian path from scipy's densities."""
    a = lgssm_arrays(seed, 2, 1)
    rng = np.random.default_rng(seed)
    z, y = rng.normal(size=(5, 2)), rng.normal(size=(5, 1))
    ref = stats.multivariate_normal(a["initial_mean"], a["initial_cov"]).logpdf(z[0])
    ref += sum(stats.multivariate_normal(a["transition_matrix"] @ z[t - 1], a["transition_cov"]).logpdf(z[t])
               for t in range(1, 5))
    ref += sum(stats.multivariate_normal(a["emission_matrix"] @ z[t], a["emission_cov"]).logpdf(y[t])
               for t in range(5))
    np.testing.assert_allclose(ps.mcmc.complete_log_likelihood(lgssm(a), z, y), ref, rtol=1e-9)


def _tamper(base, kind):
    npz, js = base + ".npz", base + ".json"
    with open(js) as fh:
        header = json.load(fh)
    fields = header["model"]["fields"]
    if kind == "class":
        header["model"]["__module__"] = "probssm.models.lgssm:NotAModel"
    elif kind == "foreign_class":
        header["model"]["__module__"] = "os:system"
    elif kind == "rename_field":
        fields["emission_kov"] = fields.pop("emission_cov")
    elif kind == "drop_field":
        del fields["transition_matrix"]
    elif kind == "format":
        header["format"] = "probssm-model-v99"
    else:
        arrays = dict(np.load(npz))
        key = fields["emission_cov"]["__array__"]
        arrays[key] = {"shape": np.eye(3), "dtype": np.array([["a", "b"], ["c", "d"]]),
                       "nan": np.full((1, 1), np.nan), "non_psd": -np.eye(1)}[kind]
        np.savez(npz, **arrays)
    with open(js, "w") as fh:
        json.dump(header, fh)


@given(st.sampled_from(["class", "foreign_class", "rename_field", "drop_field", "format", "shape", "dtype", "nan",
                        "non_psd"]))
def test_load_tampered_file_raises(kind):
    """A tampered model file raises ValueError at load (or, for values, at the first filter)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "m")
        ps.save(base, local_level(1.0))
        _tamper(base, kind)
        with pytest.raises(ValueError):
            ps.kalman.filter(ps.load(base), np.zeros((3, 1)))


# ----------------------------------------------------------------------------------------------
# Inputs are never mutated
# ----------------------------------------------------------------------------------------------
_MUTATION_CALLS = {
    "kalman.filter": lambda m, h, y, L: ps.kalman.filter(m, y, lengths=L),
    "kalman.smoother[parallel]": lambda m, h, y, L: ps.kalman.smoother(m, y, lengths=L, parallel=True),
    "kalman.sample": lambda m, h, y, L: ps.kalman.sample(jax.random.key(0), m, y, 2, lengths=L),
    "gaussian.smoother": lambda m, h, y, L: ps.gaussian.smoother(m, y, lengths=L, method="ukf"),
    "hmm.smoother": lambda m, h, y, L: ps.hmm.smoother(h, y, lengths=L),
    "hmm.viterbi": lambda m, h, y, L: ps.hmm.viterbi(h, y, lengths=L),
    "smc.particle_filter": lambda m, h, y, L: ps.smc.particle_filter(jax.random.key(0), m, y, 8, lengths=L),
    "imap.filter_ssm": lambda m, h, y, L: ps.imap.filter_ssm(m, y, optimizer="sgd", learning_rate=0.1, num_iters=2,
                                                             lengths=L),
}


@given(seeds, st.sampled_from(sorted(_MUTATION_CALLS)), st.just("mixed"))
def test_inputs_never_mutated(seed, fn, pattern):
    y = np.stack([with_nans(hmm_data(seed + b, 5), pattern, seed + b) for b in range(2)])
    lengths = np.array([5, 3])
    m_arrays = {k: np.array(v) for k, v in lgssm_arrays(seed, 1, 1).items()}
    model = ps.models.LinearGaussianSSM(**m_arrays)
    h = hmm_arrays(seed, 2)
    hmm = ps.models.HMM(h["pi"], h["A"], ps.emissions.Gaussian(h["means"], h["covs"]))
    copies = [a.copy() for a in (y, lengths, *m_arrays.values(), *h.values())]
    _MUTATION_CALLS[fn](model, hmm, y, lengths)
    for before, after in zip(copies, (y, lengths, *m_arrays.values(), *h.values())):
        np.testing.assert_array_equal(before, after)
