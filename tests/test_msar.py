"""Markov-switching autoregressions: `ps.models.MarkovSwitchingAR` and `ps.switching` (msar).

Oracles:
* statsmodels' ``MarkovAutoregression`` at the same parameters (log-likelihood conditional on
  the first P observations, filtered / predicted / smoothed marginal regime probabilities) and
  its ``fit()`` (maximised log-likelihood and parameters);
* brute-force enumeration of all K^T regime paths in numpy (tiny T): log-likelihood,
  filtered / predicted / smoothed probabilities, the most likely path;
* ``ps.hmm`` on the same model (the expanded-state HMM).

statsmodels 0.15 reshapes switching variances to (K, 1, 1) whatever the order, so for order
P >= 2 they broadcast along axis 1 of its (K,)*(P+1) + (nobs,) conditional log-likelihoods,
i.e. by S_{t-1} instead of S_t (its docstring and its own test, order 1, say S_t). For those
cases the oracle is statsmodels with that one broadcast corrected (`_Corrected`), and the
brute-force enumeration checks the same cases independently of statsmodels.

Data are simulated in numpy from the model (independent of ``ps.sample``); shapes are shared
so compiled functions are reused.
"""
from __future__ import annotations

import itertools
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import statsmodels.api as sm
from scipy.special import logsumexp

import probssm as ps

T = 200  # length of the statsmodels comparisons


class Spec(NamedTuple):
    K: int
    P: int
    switching_ar: bool
    switching_variance: bool
    X: int = 0  # exogenous regressors
    switching_exog: bool = True


def make_params(spec: Spec, seed: int = 0) -> dict:
    """Well-separated regimes (so the probabilities are informative, not all 0 or 1)."""
    rng = np.random.default_rng(seed)
    K, P, X = spec.K, spec.P, spec.X
    A = 0.15 * rng.dirichlet(np.ones(K), size=K) + 0.85 * np.eye(K)
    mu = np.linspace(-1.5, 1.5, K) + 0.1 * rng.normal(size=K)
    ar = rng.uniform(-0.4, 0.5, size=(K, P) if spec.switching_ar else (P,)) / max(P, 1)
    var = rng.uniform(0.3, 0.8, size=(K,) if spec.switching_variance else ())
    beta = None
    if X:
        beta = rng.normal(size=(K, X) if spec.switching_exog else (X,))
    return dict(A=A, mu=mu, ar=ar, var=var, beta=beta)


def to_model(p: dict):
    return ps.models.MarkovSwitchingAR(p["A"], p["mu"], p["ar"], p["var"], p["beta"])


def per_regime(p: dict, K: int):
    P = p["ar"].shape[-1]
    ar = np.broadcast_to(p["ar"], (K, P))
    var = np.broadcast_to(p["var"], (K,))
    beta = None if p["beta"] is None else np.broadcast_to(p["beta"], (K, p["beta"].shape[-1]))
    return ar, var, beta


def regime_means(p: dict, x, n: int):
    """(n, K) m_t(s) = mu_s + x_t . beta_s."""
    K = len(p["mu"])
    _, _, beta = per_regime(p, K)
    m = np.broadcast_to(p["mu"], (n, K)).copy()
    if beta is not None:
        m = m + x @ beta.T
    return m


def ergodic(A):
    """Left eigenvector of A for eigenvalue 1 (numpy; independent of the library's linear solve)."""
    w, v = np.linalg.eig(A.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def simulate(p: dict, n: int, seed: int, x=None, burn: int = 50):
    """(regimes, y) of the model in numpy; the AR recursion runs on the deviations from m_t(s_t)."""
    rng = np.random.default_rng(seed)
    K = len(p["mu"])
    ar, var, _ = per_regime(p, K)
    P = ar.shape[1]
    if x is not None:
        x = np.concatenate([rng.normal(size=(burn, x.shape[1])), x])
    m = regime_means(p, x, n + burn)
    s = np.zeros(n + burn, int)
    s[0] = rng.choice(K, p=ergodic(p["A"]))
    dev = np.zeros(n + burn)
    for t in range(n + burn):
        if t:
            s[t] = rng.choice(K, p=p["A"][s[t - 1]])
        dev[t] = sum(ar[s[t], i - 1] * dev[t - i] for i in range(1, P + 1) if t - i >= 0)
        dev[t] += np.sqrt(var[s[t]]) * rng.normal()
    y = m[np.arange(n + burn), s] + dev
    return s[burn:], y[burn:]


# ----------------------------------------------------------------------------------------------
# statsmodels
# ----------------------------------------------------------------------------------------------
class _Corrected(sm.tsa.MarkovAutoregression):
    """statsmodels with its switching variances indexed by S_t for every order (see the docstring)."""

    def _conditional_loglikelihoods(self, params):
        resid = self._resid(params)
        variance = params[self.parameters["variance"]].squeeze()
        if self.switching_variance:
            variance = np.reshape(variance, (self.k_regimes,) + (1,) * (self.order + 1))
        return -0.5 * resid ** 2 / variance - 0.5 * np.log(2 * np.pi * variance)


def sm_model(spec: Spec, y, x=None):
    cls = _Corrected if (spec.switching_variance and spec.P >= 2) else sm.tsa.MarkovAutoregression
    return cls(y, k_regimes=spec.K, order=spec.P, exog=x, switching_ar=spec.switching_ar,
               switching_variance=spec.switching_variance, switching_exog=spec.switching_exog)


def sm_params(mod, p: dict) -> np.ndarray:
    """Our parameters in statsmodels' order, by name: p[i->j] = A[i, j] (j < K - 1)."""
    K = len(p["mu"])
    vals = {}
    for i in range(K):
        for j in range(K - 1):
            vals[f"p[{i}->{j}]"] = p["A"][i, j]
        vals[f"const[{i}]"] = p["mu"][i]
    ar, var = p["ar"], p["var"]
    for i in range(K):
        vals[f"sigma2[{i}]"] = var[i] if var.ndim else var
    vals["sigma2"] = var
    for lag in range(ar.shape[-1]):
        vals[f"ar.L{lag + 1}"] = ar[lag] if ar.ndim == 1 else np.nan
        for i in range(K):
            vals[f"ar.L{lag + 1}[{i}]"] = ar[i, lag] if ar.ndim == 2 else np.nan
    if p["beta"] is not None:
        b = p["beta"]
        for c in range(b.shape[-1]):
            vals[f"x{c + 1}"] = b[c] if b.ndim == 1 else np.nan
            for i in range(K):  # statsmodels 0.15 names a shared coefficient x1[K-1]
                vals[f"x{c + 1}[{i}]"] = b[i, c] if b.ndim == 2 else b[c]
    out = np.array([vals[n] for n in mod.param_names], float)
    assert np.all(np.isfinite(out)), mod.param_names
    return out


def from_sm(mod, spec: Spec, params) -> dict:
    d = dict(zip(mod.param_names, np.asarray(params)))
    K, P, X = spec.K, spec.P, spec.X
    A = np.zeros((K, K))
    for i in range(K):
        A[i, :K - 1] = [d[f"p[{i}->{j}]"] for j in range(K - 1)]
        A[i, K - 1] = 1 - A[i, :K - 1].sum()
    mu = np.array([d[f"const[{i}]"] for i in range(K)])
    if spec.switching_ar:
        ar = np.array([[d[f"ar.L{j + 1}[{i}]"] for j in range(P)] for i in range(K)])
    else:
        ar = np.array([d[f"ar.L{j + 1}"] for j in range(P)])
    var = np.array([d[f"sigma2[{i}]"] for i in range(K)]) if spec.switching_variance else np.array(d["sigma2"])
    beta = None
    if X:
        if spec.switching_exog:
            beta = np.array([[d[f"x{c + 1}[{i}]"] for c in range(X)] for i in range(K)])
        else:
            beta = np.array([d.get(f"x{c + 1}", d.get(f"x{c + 1}[{K - 1}]")) for c in range(X)])
    return dict(A=A, mu=mu, ar=ar, var=var, beta=beta)


CASES = {
    "K2-P1-ar": Spec(2, 1, switching_ar=True, switching_variance=False),
    "K2-P2-var": Spec(2, 2, switching_ar=False, switching_variance=True),
    "K3-P1-ar-var": Spec(3, 1, switching_ar=True, switching_variance=True),
    "K3-P2-shared": Spec(3, 2, switching_ar=False, switching_variance=False),
    "K3-P2-ar-var": Spec(3, 2, switching_ar=True, switching_variance=True),
    "K2-P1-exog": Spec(2, 1, switching_ar=False, switching_variance=True, X=2, switching_exog=True),
    "K2-P2-exog-shared": Spec(2, 2, switching_ar=True, switching_variance=False, X=1, switching_exog=False),
}


def case_data(name: str, n: int = T):
    spec = CASES[name]
    seed = sorted(CASES).index(name)
    p = make_params(spec, seed)
    x = np.random.default_rng(100 + seed).normal(size=(n, spec.X)) if spec.X else None
    s, y = simulate(p, n, seed, x)
    return spec, p, x, s, y


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_statsmodels(name):
    """Log-likelihood and the filtered, predicted and smoothed marginal regime probabilities
    (the T - P steps after the conditioning ones) equal statsmodels' at the same parameters."""
    spec, p, x, s, y = case_data(name)
    mod = sm_model(spec, y, x)
    ref = mod.smooth(sm_params(mod, p))
    r = ps.switching.smoother(to_model(p), y, x)
    assert r.smoothed_probs.shape == (T - spec.P, spec.K)
    assert abs(float(r.log_likelihood) - ref.llf) <= 1e-10 * abs(ref.llf)
    np.testing.assert_allclose(r.filtered_probs, ref.filtered_marginal_probabilities, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.predicted_probs, ref.predicted_marginal_probabilities, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.smoothed_probs, ref.smoothed_marginal_probabilities, rtol=0, atol=1e-9)
    # the comparison is informative: every regime is the likely one somewhere, and some steps are uncertain
    sp = np.asarray(r.smoothed_probs)
    assert np.all(sp.max(0) > 0.5) and np.mean(sp.max(1) < 0.99) >= 0.02


def test_public_functions_agree_with_each_other_and_with_hmm():
    """filter / log_likelihood / most_likely_regimes are the smoother's pieces, and ps.hmm on the
    model (its expanded state) gives the same numbers."""
    spec, p, x, s, y = case_data("K2-P1-ar")
    ms = to_model(p)
    r = ps.switching.smoother(ms, y)
    f = ps.switching.filter(ms, y)
    np.testing.assert_allclose(f.filtered_probs, r.filtered_probs, atol=1e-12)
    np.testing.assert_allclose(f.predicted_probs, r.predicted_probs, atol=1e-12)
    np.testing.assert_allclose(ps.switching.log_likelihood(ms, y), r.log_likelihood, rtol=1e-12)
    h = ps.hmm.smoother(ms, y[:, None])
    assert h.smoothed_probs.shape == (T, spec.K ** (spec.P + 1))
    np.testing.assert_allclose(h.log_likelihood, r.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(ms.regime_probs(h.smoothed_probs)[spec.P:], r.smoothed_probs, atol=1e-12)
    path = ps.switching.most_likely_regimes(ms, y)
    # the data are informative enough that the most likely path recovers the simulated regimes
    assert np.mean(np.asarray(path) == s[spec.P:]) > 0.85


# ----------------------------------------------------------------------------------------------
# Brute force over all regime paths (tiny T)
# ----------------------------------------------------------------------------------------------
def brute_force(p: dict, y, x=None):
    """Enumerate every path s_0..s_{T-1}: log-likelihood of y_P.. given y_:P, filtered, predicted
    and smoothed regime probabilities at t = P..T-1, and the most likely path's s_P.."""
    n, K = len(y), len(p["mu"])
    ar, var, _ = per_regime(p, K)
    P = ar.shape[1]
    m = regime_means(p, x, n)
    paths = np.array(list(itertools.product(range(K), repeat=n)))  # (N, T)
    rows = np.arange(n)
    dev = y[None, :] - m[rows[None, :], paths]  # (N, T)
    log_prior = np.log(ergodic(p["A"]))[paths[:, 0]] + np.log(p["A"][paths[:, :-1], paths[:, 1:]]).sum(1)
    ll = np.zeros((len(paths), n))
    for t in range(P, n):
        st = paths[:, t]
        r = dev[:, t] - sum(ar[st, i - 1] * dev[:, t - i] for i in range(1, P + 1))
        ll[:, t] = -0.5 * r ** 2 / var[st] - 0.5 * np.log(2 * np.pi * var[st])
    cum = np.cumsum(ll, axis=1)
    total = log_prior + cum[:, -1]
    loglik = logsumexp(total)

    def marg(logw, t):
        w = np.exp(logw - logsumexp(logw))
        return np.array([w[paths[:, t] == k].sum() for k in range(K)])

    filtered = np.array([marg(log_prior + cum[:, t], t) for t in range(P, n)])
    predicted = np.array([marg(log_prior + cum[:, t - 1], t) for t in range(P, n)])
    smoothed = np.array([marg(total, t) for t in range(P, n)])
    return loglik, filtered, predicted, smoothed, paths[np.argmax(total), P:]


TINY = {  # (spec name, T): K^T paths
    "K3-P2-ar-var": 6,
    "K2-P2-exog-shared": 8,
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_brute_force_enumeration(name):
    n = TINY[name]
    spec, p, x, s, y = case_data(name, n)
    ll, filt, pred, smooth, path = brute_force(p, y, x)
    ms = to_model(p)
    r = ps.switching.smoother(ms, y, x)
    np.testing.assert_allclose(r.log_likelihood, ll, rtol=1e-12)
    np.testing.assert_allclose(r.filtered_probs, filt, atol=1e-12)
    np.testing.assert_allclose(r.predicted_probs, pred, atol=1e-12)
    np.testing.assert_allclose(r.smoothed_probs, smooth, atol=1e-12)
    np.testing.assert_array_equal(ps.switching.most_likely_regimes(ms, y, x), path)
    # missing values at the end are marginalised exactly: the same numbers as the truncated record
    cut = n - 2
    ll, filt, pred, smooth, _ = brute_force(p, y[:cut], None if x is None else x[:cut])
    r = ps.switching.smoother(ms, np.where(np.arange(n) < cut, y, np.nan), x)
    np.testing.assert_allclose(r.log_likelihood, ll, rtol=1e-12)
    for got, want in ((r.filtered_probs, filt), (r.predicted_probs, pred), (r.smoothed_probs, smooth)):
        np.testing.assert_allclose(got[:cut - spec.P], want, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Batches, lengths, trailing missing values
# ----------------------------------------------------------------------------------------------
def test_batches_and_lengths():
    """A padded batch with lengths (and the same data as a list) equals the sequences run one by
    one, with zeros (-1 for regimes) beyond each length. The second sequence's reference is its
    trailing-NaN form, exact by `test_brute_force_enumeration` (and shape-shared: no new compile)."""
    spec, p, _, _, y1 = case_data("K2-P1-ar")
    _, y2 = simulate(p, T, seed=7)
    n2 = 150
    ms = to_model(p)
    tail = np.where(np.arange(T) < n2, y2, np.nan)
    batch = np.stack([y1, tail])[..., None]  # (2, T, 1)
    lengths = jnp.array([T, n2])
    r1, r2 = ps.switching.smoother(ms, y1), ps.switching.smoother(ms, tail)
    for res in (ps.switching.smoother(ms, batch, lengths=lengths), ps.switching.smoother(ms, [y1, y2[:n2]])):
        assert res.smoothed_probs.shape == (2, T - 1, 2)
        np.testing.assert_allclose(res.log_likelihood, [r1.log_likelihood, r2.log_likelihood], rtol=1e-12)
        for field in ("filtered_probs", "predicted_probs", "smoothed_probs"):
            np.testing.assert_allclose(getattr(res, field)[0], getattr(r1, field), atol=1e-12)
            np.testing.assert_allclose(getattr(res, field)[1, :n2 - 1], getattr(r2, field)[:n2 - 1], atol=1e-12)
            np.testing.assert_array_equal(getattr(res, field)[1, n2 - 1:], 0.0)
    np.testing.assert_allclose(ps.switching.log_likelihood(ms, batch, lengths=lengths),
                               r1.log_likelihood + r2.log_likelihood, rtol=1e-12)
    regimes = ps.switching.most_likely_regimes(ms, batch, lengths=lengths)
    np.testing.assert_array_equal(regimes[0], ps.switching.most_likely_regimes(ms, y1))
    assert np.all(np.asarray(regimes[1, :n2 - 1]) >= 0)
    np.testing.assert_array_equal(regimes[1, n2 - 1:], -1)


# ----------------------------------------------------------------------------------------------
# Sampling through the protocol (ps.sample)
# ----------------------------------------------------------------------------------------------
def test_ps_sample_follows_the_model():
    """ps.sample draws consistent expanded states (the shared digits shift), and the innovations
    recovered from the drawn regimes are N(0, 1): mean and variance within 4 standard errors."""
    spec, p, _, _, _ = case_data("K2-P2-var")
    ms = to_model(p)
    n = 4000
    z, y = ps.sample(jax.random.key(3), ms, n)
    z, y = np.asarray(z), np.asarray(y)[:, 0]
    K, P = spec.K, spec.P
    assert np.all(z[1:] % K ** P == z[:-1] // K), "expanded states do not shift their regimes"
    s = z // K ** P
    ar, var, _ = per_regime(p, K)
    dev = y - p["mu"][s]
    t = np.arange(P, n)
    e = (dev[t] - sum(ar[s[t], i - 1] * dev[t - i] for i in range(1, P + 1))) / np.sqrt(var[s[t]])
    m = len(e)
    assert abs(e.mean()) < 4 / np.sqrt(m)
    assert abs(e.var() - 1) < 4 * np.sqrt(2 / m)
    # the regimes visit both states about as often as the ergodic law says (loose: the chain is sticky)
    assert abs(np.mean(s == 0) - ergodic(p["A"])[0]) < 0.15


# ----------------------------------------------------------------------------------------------
# jit, vmap, grad
# ----------------------------------------------------------------------------------------------
def _theta_model(p, th):
    """The case's model with the stay probabilities and the first mean driven by theta."""
    A = jnp.asarray(p["A"])
    A = A.at[0].set(jnp.stack([th, 1 - th]))
    return ps.models.MarkovSwitchingAR(A, jnp.asarray(p["mu"]).at[0].add(th), p["ar"], p["var"])


def test_jit_vmap_grad():
    """Inside jit and vmap the functions give the eager values; the gradient of the log-likelihood
    (through the ergodic initial law and the emissions) matches central finite differences."""
    spec, p, _, _, y = case_data("K2-P1-ar")
    yj = jnp.asarray(y)

    def ll(th):
        return ps.switching.log_likelihood(_theta_model(p, th), yj)

    ths = jnp.array([0.8, 0.9])
    batched = jax.jit(jax.vmap(ll))(ths)
    np.testing.assert_allclose(batched, [ll(0.8), ll(0.9)], rtol=1e-12)
    g = jax.jit(jax.grad(ll))(0.85)
    h = 1e-5
    fd = (ll(0.85 + h) - ll(0.85 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_float32_stays_close_to_float64():
    """float32 model and data: log-likelihood within 1e-5 relative, probabilities within 1e-4
    (T = 200; measured 1e-8 and 2e-7)."""
    spec, p, _, _, y = case_data("K2-P1-ar")
    ms = to_model(p)
    m32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), ms)
    r32, r64 = ps.switching.smoother(m32, y.astype(np.float32)), ps.switching.smoother(ms, y)
    assert r32.log_likelihood.dtype == jnp.float32 and r32.smoothed_probs.dtype == jnp.float32
    np.testing.assert_allclose(r32.log_likelihood, r64.log_likelihood, rtol=1e-5)
    np.testing.assert_allclose(r32.smoothed_probs, r64.smoothed_probs, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Maximum likelihood against statsmodels' fit()
# ----------------------------------------------------------------------------------------------
def _mle_against_statsmodels(name, num_iters):
    """Both optimisers start from the same point, the true parameters perturbed by 5%: from its own
    start_params statsmodels' fit() stops at a poorer local maximum on "K2-P1-exog" (-297.19, where
    ps.learn.mle from the same start_params reaches -228.60)."""
    spec, p, x, _, y = case_data(name)
    mod = sm_model(spec, y, x)
    start = sm_params(mod, p)
    start = start * (1 + 0.05 * np.random.default_rng(0).normal(size=start.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' optimiser warnings
        ref = mod.fit(start_params=start, disp=False)
    fitted, history = ps.learn.mle(to_model(from_sm(mod, spec, start)), y, num_iters, inputs=x, progress=False)
    ll = float(ps.switching.log_likelihood(fitted, y, x))
    assert np.isfinite(np.asarray(history)).all()
    assert ll > mod.loglike(sm_params(mod, p))  # above the value at the truth: a maximum was found
    assert abs(ll - ref.llf) <= 1e-6 * abs(ref.llf), (ll, ref.llf)
    ours = sm_params(mod, dict(A=np.asarray(fitted.transition_matrix), mu=np.asarray(fitted.means),
                               ar=np.asarray(fitted.ar_coefs), var=np.asarray(fitted.variances),
                               beta=None if fitted.exog_coefs is None else np.asarray(fitted.exog_coefs)))
    np.testing.assert_allclose(ours, ref.params, atol=1e-3)


def test_mle_matches_statsmodels_fit():
    """ps.learn.mle (L-BFGS on unconstrained parameters: simplex rows, positive variances) reaches
    statsmodels' maximum: log-likelihood to 1e-6 relative, parameters to 1e-3 (measured: 1e-11
    and 4e-6)."""
    _mle_against_statsmodels("K2-P1-exog", 200)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["K2-P2-exog-shared", "K2-P2-var"])
def test_mle_matches_statsmodels_fit_more(name):
    _mle_against_statsmodels(name, 200)


@pytest.mark.slow
def test_hamilton_1989_gnp():
    """Hamilton's (1989) US real GNP growth model (K = 2, P = 4, switching mean, shared AR and
    variance) on the series statsmodels ships in its tests: the log-likelihood at the published
    estimates is statsmodels' (-181.26339), and ps.learn.mle from statsmodels' start values reaches
    statsmodels' fit()."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module declares pytest marks this project does not register
        from statsmodels.tsa.regime_switching.tests.test_markov_autoregression import rgnp

    y = np.asarray(rgnp)
    spec = Spec(2, 4, switching_ar=False, switching_variance=False)
    mod = sm_model(spec, y)
    published = np.r_[0.754673, 0.095915, -0.358811, 1.163516, np.exp(-0.262658) ** 2,
                      0.013486, -0.057521, -0.246983, -0.212923]
    p = from_sm(mod, spec, published)
    r = ps.switching.smoother(to_model(p), y)
    np.testing.assert_allclose(r.log_likelihood, mod.loglike(published), rtol=1e-10)
    np.testing.assert_allclose(r.log_likelihood, -181.26339, atol=1e-4)
    np.testing.assert_allclose(r.smoothed_probs, mod.smooth(published).smoothed_marginal_probabilities, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = mod.fit(disp=False)
    fitted, _ = ps.learn.mle(to_model(from_sm(mod, spec, mod.start_params)), y, 300, progress=False)
    ll = float(ps.switching.log_likelihood(fitted, y))
    assert abs(ll - ref.llf) <= 1e-6 * abs(ref.llf)  # measured 1e-10 (ours -181.2633942626, statsmodels -181.2633942812)
    np.testing.assert_allclose(ll, -181.26339, atol=1e-4)
    ours = sm_params(mod, dict(A=np.asarray(fitted.transition_matrix), mu=np.asarray(fitted.means),
                               ar=np.asarray(fitted.ar_coefs), var=np.asarray(fitted.variances), beta=None))
    np.testing.assert_allclose(ours, ref.params, atol=1e-3)  # measured 1e-5


@pytest.mark.slow
def test_order_zero_is_statsmodels_markov_regression():
    """P = 0 (ar_coefs of shape (0,)) is a switching regression: statsmodels' MarkovRegression."""
    p = dict(A=np.array([[0.9, 0.1], [0.2, 0.8]]), mu=np.array([-1.0, 1.0]), ar=np.zeros(0), var=np.array([0.5, 0.8]),
             beta=None)
    _, y = simulate(p, 100, seed=5)
    r = ps.switching.smoother(to_model(p), y)
    ref = sm.tsa.MarkovRegression(y, k_regimes=2, switching_variance=True).smooth(np.r_[0.9, 0.2, -1.0, 1.0, 0.5, 0.8])
    np.testing.assert_allclose(r.log_likelihood, ref.llf, rtol=1e-10)
    np.testing.assert_allclose(r.smoothed_probs, ref.smoothed_marginal_probabilities, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
A2 = np.array([[0.9, 0.1], [0.2, 0.8]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(transition_matrix=[[0.9, 0.2], [0.2, 0.8]]), "transition_matrix: expected rows that sum to one"),
    (dict(transition_matrix=[[1.1, -0.1], [0.2, 0.8]]), "transition_matrix: expected non-negative"),
    (dict(transition_matrix=np.ones((2, 3)) / 3), "transition_matrix: expected a square shape"),
    (dict(transition_matrix=np.eye(2)), "transition_matrix: the chain has no unique stationary"),
    (dict(means=[0.0, 1.0, 2.0]), r"means: expected shape \(2,\)"),
    (dict(means=[0.0, np.nan]), "means: expected finite"),
    (dict(ar_coefs=np.zeros((3, 1))), r"ar_coefs: expected shape \(P,\) shared or \(2, P\)"),
    (dict(variances=[1.0, 1.0, 1.0]), r"variances: expected shape \(\) shared or \(2,\)"),
    (dict(variances=[1.0, 0.0]), "variances: expected positive"),
    (dict(variances=-1.0), "variances: expected positive"),
    (dict(exog_coefs=np.zeros((3, 1))), r"exog_coefs: expected shape \(X,\) shared or \(2, X\)"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    args = dict(transition_matrix=A2, means=[0.0, 1.0], ar_coefs=[0.5], variances=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ps.models.MarkovSwitchingAR(**args)


def test_inference_entry_rejects_bad_models_and_data():
    ms = ps.models.MarkovSwitchingAR(A2, [0.0, 1.0], [0.5], 1.0)
    y = np.random.default_rng(0).normal(size=20)
    # models changed after construction are checked where inference starts
    bad_var = eqx.tree_at(lambda m: m.variances, ms, jnp.array(-1.0))
    bad_mu = eqx.tree_at(lambda m: m.means, ms, jnp.zeros(3))
    bad_A = eqx.tree_at(lambda m: m.transition_matrix, ms, jnp.array([[0.5, 0.6], [0.2, 0.8]]))
    for fn in (ps.switching.log_likelihood, ps.switching.smoother, ps.switching.most_likely_regimes):
        with pytest.raises(ValueError, match="model.variances: expected positive"):
            fn(bad_var, y)
    with pytest.raises(ValueError, match=r"model.means: expected shape \(2,\)"):
        ps.switching.filter(bad_mu, y)
    with pytest.raises(ValueError, match="model.transition_matrix: expected rows that sum to one"):
        ps.switching.filter(bad_A, y)
    with pytest.raises(ValueError, match="model.variances"):
        ps.hmm.filter(bad_var, y[:, None])
    with pytest.raises(ValueError, match=r"model.means: expected shape \(2,\)"):
        ps.learn.mle(bad_mu, y, 2)
    with pytest.raises(ValueError, match="model: expected a regime-switching autoregression"):
        ps.switching.log_likelihood(ps.models.ARHMM(np.ones(2) / 2, A2, np.zeros((2, 1, 1)), np.zeros((2, 1)),
                                                    np.ones((2, 1, 1))), y)
    # data
    gap = y.copy()
    gap[5] = np.nan
    with pytest.raises(ValueError, match="emissions: found an observed value at step 6 after a missing one"):
        ps.switching.log_likelihood(ms, gap)
    with pytest.raises(ValueError, match="emissions: found an observed value"):
        ps.hmm.smoother(ms, gap[:, None])
    with pytest.raises(ValueError, match="emissions: expected more than P = 1"):
        ps.switching.log_likelihood(ms, y[:1])
    with pytest.raises(ValueError, match=r"emissions: expected shape \(T, 1\)"):
        ps.switching.log_likelihood(ms, np.stack([y, y]))  # (B, T): a batch is (B, T, 1)
    with pytest.raises(ValueError, match="lengths: expected lengths > P = 1"):
        ps.switching.log_likelihood(ms, np.stack([y, y])[..., None], lengths=jnp.array([20, 1]))
    with pytest.raises(ValueError, match="inputs: the model has no exogenous regressors"):
        ps.switching.log_likelihood(ms, y, np.ones((20, 1)))
    # exogenous regressors
    mx = ps.models.MarkovSwitchingAR(A2, [0.0, 1.0], [0.5], 1.0, exog_coefs=[[1.0], [2.0]])
    with pytest.raises(ValueError, match="inputs: the model has 1 exogenous regressors; expected"):
        ps.switching.smoother(mx, y)
    with pytest.raises(ValueError, match=r"inputs: expected shape \(20, 1\)"):
        ps.switching.smoother(mx, y, np.ones((20, 2)))
    x = np.ones((20, 1))
    x[3] = np.nan
    with pytest.raises(ValueError, match="inputs: found NaN at a step whose observation is present"):
        ps.switching.smoother(mx, y, x)


@pytest.mark.slow
def test_particle_filter_through_the_protocol_is_unbiased():
    """The protocol (initial / transition / emission on the expanded state) is the same model: the
    bootstrap particle filter's exp(log Z) is unbiased for the exact conditional likelihood (mean
    ratio 1 within 4 standard errors of R runs), without regressors (the engines build the lags,
    NaN for the first P steps, which they drop) and with them (`protocol_inputs`, y[:P] masked)."""
    n, R, N = 40, 64, 256
    for name in ("K2-P2-var", "K2-P1-exog"):
        spec, p, x, _, y = case_data(name, n)
        ms = to_model(p)
        exact = float(ps.switching.log_likelihood(ms, y, x))
        inputs = None if x is None else ms.protocol_inputs(y[:, None], x)
        masked = np.where(np.arange(n) < spec.P, np.nan, y) if x is not None else y
        ys = jnp.broadcast_to(jnp.asarray(masked)[:, None], (R, n, 1))
        pf = ps.smc.particle_filter(jax.random.key(11), ms, ys, N, inputs=inputs)
        ratio = np.exp(np.asarray(pf.log_likelihood) - exact)
        se = np.std(ratio, ddof=1) / np.sqrt(R)
        assert abs(ratio.mean() - 1.0) < 4 * se, (name, ratio.mean(), se)
        assert abs(np.mean(np.asarray(pf.log_likelihood)) - exact) < 0.5
