"""Checks that cannot be bypassed and the data a user passes (issue 15, items 2 and 4).

* `ps.load` validates a file: format version, class, field names, array shapes and dtypes.
* Emission values are checked against the family's support (NaN = missing).
* Mixed float32 / float64 models run in the promoted dtype.
* Complex data, T = 0 refused by name; a 1-D series is one (T, 1) sequence.
* Ragged lists work for every engine and learner that takes batches (equal to running the
  sequences one by one), hmmlearn-style concatenated data with ``lengths`` (equal to
  hmmlearn's own score), and EM with one T = 1 sequence among longer ones.
"""
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from conformance_models import make_models

MODELS = make_models()
K = 2
A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
RNG = np.random.default_rng(0)


def _hmm(emissions, pi=None):
    return ps.models.HMM(jnp.ones(K) / K if pi is None else pi, A, emissions)


GAUSS = _hmm(ps.emissions.Gaussian(jnp.array([[-1.0], [1.0]]), jnp.ones((K, 1, 1))))
LGSSM = MODELS["lgssm"]


# ----------------------------------------------------------------------------------------------
# 1. ps.load validates the file
# ----------------------------------------------------------------------------------------------
def _io_models():
    out = {n: m for n, m in MODELS.items() if type(m).__module__.startswith("probssm")
           and n != "nonlinear"}
    out["diagonal"] = _hmm(ps.emissions.DiagonalGaussian(jnp.zeros((K, 2)), jnp.ones((K, 2))))
    out["student_t"] = _hmm(ps.emissions.StudentT(jnp.zeros((K, 2)), jnp.tile(jnp.eye(2), (K, 1, 1)), 4 * jnp.ones(K)))
    out["bernoulli"] = _hmm(ps.emissions.Bernoulli(0.5 * jnp.ones((K, 2))))
    out["poisson_glm"] = _hmm(ps.emissions.PoissonGLM(jnp.zeros((K, 2, 3)), jnp.zeros((K, 2))))
    out["time_varying"] = ps.models.HMM(jnp.ones(K) / K, jnp.tile(A, (5, 1, 1)), ps.emissions.Poisson(jnp.ones((K, 1))))
    return out


@pytest.mark.parametrize("name", sorted(_io_models()))
def test_roundtrip_every_family(tmp_path, name):
    model = _io_models()[name]
    ps.save(tmp_path / name, model)
    loaded = ps.load(tmp_path / name)
    assert type(loaded) is type(model)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)) and a.dtype == b.dtype, model, loaded)
    assert jax.tree_util.tree_all(same)


def _saved(tmp_path, model, stem="m"):
    ps.save(tmp_path / stem, model)
    header = json.loads((tmp_path / f"{stem}.json").read_text())
    with np.load(tmp_path / f"{stem}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    return header, arrays


def _write(tmp_path, header, arrays, stem="m"):
    (tmp_path / f"{stem}.json").write_text(json.dumps(header))
    np.savez(tmp_path / f"{stem}.npz", **arrays)


def _array_tamper(key, fn):
    def edit(header, arrays):
        arrays[key] = fn(arrays[key])
    return edit


def _rename_field(header, arrays):
    f = header["model"]["fields"]
    f["emision_cov"] = f.pop("emission_cov")


def _drop_field(header, arrays):
    del header["model"]["fields"]["emission_cov"]


def _unknown_class(header, arrays):
    header["model"]["__module__"] = "probssm.models.lgssm:LinearGaussianSSMX"


def _foreign_class(header, arrays):
    header["model"]["__module__"] = "os:system"


def _bump_format(header, arrays):
    header["format"] = "probssm-model-v2"


def _missing_array(header, arrays):
    del arrays["emission_cov"]


TAMPER_LGSSM = {
    "renamed field": (_rename_field, "emision_cov"),
    "missing field": (_drop_field, "emission_cov"),
    "unknown class": (_unknown_class, "unknown probssm class"),
    "foreign class": (_foreign_class, "outside probssm"),
    "format version": (_bump_format, "format"),
    "missing array": (_missing_array, "emission_cov"),
    "wrong shape": (_array_tamper("emission_cov", lambda a: np.eye(2)), "emission_cov"),
    "int dtype": (_array_tamper("transition_matrix", lambda a: np.ones(a.shape, np.int64)), "transition_matrix"),
    "complex dtype": (_array_tamper("emission_matrix", lambda a: a + 1j), "emission_matrix"),
    "string dtype": (_array_tamper("emission_matrix", lambda a: np.array(["x"])), "emission_matrix"),
    "NaN covariance": (_array_tamper("transition_cov", lambda a: np.full(a.shape, np.nan)), "transition_cov"),
    "asymmetric covariance": (_array_tamper("transition_cov", lambda a: a + np.triu(np.ones(a.shape), 1)),
                              "transition_cov"),
}


@pytest.mark.parametrize("case", sorted(TAMPER_LGSSM))
def test_tampered_lgssm_file_raises_naming_the_field(tmp_path, case):
    edit, match = TAMPER_LGSSM[case]
    header, arrays = _saved(tmp_path, LGSSM)
    edit(header, arrays)
    _write(tmp_path, header, arrays)
    with pytest.raises(ValueError, match=match):
        ps.load(tmp_path / "m")


TAMPER_HMM = {
    "nested wrong shape": (_array_tamper("emissions/covs", lambda a: np.ones((K, 2, 2))), "emissions/covs"),
    "nested int dtype": (_array_tamper("emissions/means", lambda a: np.ones(a.shape, np.int32)), "emissions/means"),
    "not a simplex": (_array_tamper("initial_probs", lambda a: np.array([0.7, 0.7])), "initial_probs"),
    "wrong K": (_array_tamper("initial_probs", lambda a: np.ones(3) / 3), "initial_probs"),
    "nested class": (lambda h, a: h["model"]["fields"]["emissions"].update(
        {"__module__": "probssm.models.emissions.gaussian:Gausian"}), "emissions"),
}


@pytest.mark.parametrize("case", sorted(TAMPER_HMM))
def test_tampered_hmm_file_raises_naming_the_field(tmp_path, case):
    edit, match = TAMPER_HMM[case]
    header, arrays = _saved(tmp_path, GAUSS)
    edit(header, arrays)
    _write(tmp_path, header, arrays)
    with pytest.raises(ValueError, match=match):
        ps.load(tmp_path / "m")


def test_corrupted_files(tmp_path):
    ps.save(tmp_path / "m", LGSSM)
    raw = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "m.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="npz"):
        ps.load(tmp_path / "m")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ps.load(tmp_path / "m")
    assert zipfile  # the truncated archive above is what zipfile cannot read


def test_like_checks_shapes_and_dtypes(tmp_path):
    header, arrays = _saved(tmp_path, LGSSM)
    arrays["emission_cov"] = np.eye(3)
    _write(tmp_path, header, arrays)
    with pytest.raises(ValueError, match="emission_cov"):
        ps.load(tmp_path / "m", like=LGSSM)


# ----------------------------------------------------------------------------------------------
# 2. emission values against the family's support
# ----------------------------------------------------------------------------------------------
CATEGORICAL = _hmm(ps.emissions.Categorical(jnp.array([[[0.7, 0.2, 0.1]], [[0.1, 0.2, 0.7]]])))
BERNOULLI = _hmm(ps.emissions.Bernoulli(jnp.array([[0.3], [0.7]])))
POISSON = _hmm(ps.emissions.Poisson(jnp.array([[1.0], [3.0]])))
POISSON_GLM = _hmm(ps.emissions.PoissonGLM(jnp.zeros((K, 1, 1)), jnp.zeros((K, 1)), "exp"))
BERNOULLI_GLM = _hmm(ps.emissions.BernoulliGLM(jnp.zeros((K, 1, 1)), jnp.zeros((K, 1))))
HMMGLM = MODELS["hmmglm"]
U5 = np.ones((5, 1))

SUPPORT = [("categorical", CATEGORICAL, v) for v in (3.0, -1.0, 1.5)] + [
    ("bernoulli", BERNOULLI, 2.0), ("bernoulli", BERNOULLI, 0.5), ("poisson", POISSON, 2.5),
    ("poisson", POISSON, -1.0), ("poisson_glm", POISSON_GLM, 2.5), ("poisson_glm", POISSON_GLM, -1.0),
    ("bernoulli_glm", BERNOULLI_GLM, 2.0), ("hmmglm", HMMGLM, 2.5), ("hmmglm", HMMGLM, -1.0)]


def _data_for(name, value=None):
    D = 2 if name == "hmmglm" else 1
    y = np.zeros((12 if name == "hmmglm" else 5, D))
    y[1] = 1.0
    if value is not None:
        y[3, -1] = value
    return y, (U5 if name.endswith("_glm") else None)


@pytest.mark.parametrize("name,model,value", SUPPORT, ids=[f"{n}-{v}" for n, _, v in SUPPORT])
def test_emissions_outside_support_refused(name, model, value):
    y, u = _data_for(name, value)
    with pytest.raises(ValueError, match="^emissions: .*expects"):
        ps.hmm.filter(model, y, inputs=u)


@pytest.mark.parametrize("name,model", [("categorical", CATEGORICAL), ("poisson", POISSON),
                                        ("bernoulli_glm", BERNOULLI_GLM), ("hmmglm", HMMGLM)])
def test_nan_still_means_missing(name, model):
    y, u = _data_for(name)
    y_nan = y.copy()
    y_nan[3, -1] = np.nan
    ll = float(ps.hmm.filter(model, y_nan, inputs=u).log_likelihood)
    assert np.isfinite(ll)
    if model.emission_dim == 1:  # a fully missing step: no emission term, the chain still moves
        ll_ref = float(ps.hmm.filter(model, y, inputs=u, plausibility=np.where(
            np.arange(5)[:, None] == 3, 1.0 / np.exp(np.asarray(model.discrete_params(
                y, u).log_likelihoods))[3], 1.0)).log_likelihood)
        np.testing.assert_allclose(ll, ll_ref, rtol=1e-10)


def test_support_check_skipped_under_tracing():
    y, _ = _data_for("categorical")
    ll = jax.jit(lambda y: ps.hmm.filter(CATEGORICAL, y).log_likelihood)(y)
    np.testing.assert_allclose(ll, ps.hmm.filter(CATEGORICAL, y).log_likelihood, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# 3. mixed float32 / float64 models run in the promoted dtype
# ----------------------------------------------------------------------------------------------
Y6 = RNG.normal(size=(6, 1))
F32 = jnp.float32
MIXED = {
    "initial_probs": _hmm(GAUSS.emissions, pi=jnp.ones(K, F32) / K),
    "means": _hmm(ps.emissions.Gaussian(jnp.array([[-1.0], [1.0]], F32), jnp.ones((K, 1, 1)))),
    "ar_weights": ps.models.ARHMM(jnp.ones(K) / K, A, jnp.array([[[0.8]], [[-0.5]]], F32), jnp.zeros((K, 1)),
                                  jnp.ones((K, 1, 1))),
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_dtypes_run_promoted(name):
    model = MIXED[name]
    ref = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                 model)
    for fn in (ps.hmm.filter, ps.hmm.smoother):
        out, want = fn(model, Y6), fn(ref, Y6)
        assert out.log_likelihood.dtype == jnp.float64
        np.testing.assert_allclose(out.log_likelihood, want.log_likelihood, rtol=1e-6)
    fitted, history = ps.learn.em(model, Y6, 2, progress=False)
    assert history.dtype == jnp.float64 and np.all(np.isfinite(history))
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(fitted)
               if jnp.issubdtype(a.dtype, jnp.floating))
    _, history = ps.learn.mle(model, Y6, 2, progress=False)
    assert np.all(np.isfinite(history))


# ----------------------------------------------------------------------------------------------
# 4-6. complex data, T = 0, 1-D series
# ----------------------------------------------------------------------------------------------
KEY = jax.random.PRNGKey(0)
NONLINEAR = MODELS["nonlinear"]
ENGINES = {
    "kalman.filter": lambda y, **k: ps.kalman.filter(LGSSM, y, **k),
    "hmm.filter": lambda y, **k: ps.hmm.filter(GAUSS, y, **k),
    "gaussian.filter": lambda y, **k: ps.gaussian.filter(NONLINEAR, y, **k),
    "smc.particle_filter": lambda y, **k: ps.smc.particle_filter(KEY, GAUSS, y, 8, **k),
    "learn.em": lambda y, **k: ps.learn.em(GAUSS, y, 1, progress=False, **k),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_complex_emissions_refused(engine):
    with pytest.raises(ValueError, match="^emissions.*real"):
        ENGINES[engine](np.ones((4, 1)) + 1j)
    with pytest.raises(ValueError, match="^emissions.*real"):
        ENGINES[engine]([np.ones((4, 1)), np.ones((3, 1)) * 1j])


def test_complex_inputs_refused():
    arhmm = MODELS["arhmm"]
    with pytest.raises(ValueError, match="^inputs.*real"):
        ps.hmm.filter(arhmm, np.ones((4, 1)), inputs=np.ones((4, 1)) * 1j)
    with pytest.raises(ValueError, match="^inputs.*real"):
        ps.core.batching.as_batch(np.ones((4, 1)), np.ones((4, 2)) + 0j)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_no_time_step_says_T_at_least_one(engine):
    with pytest.raises(ValueError, match=r"^emissions: expected at least one time step \(T >= 1\), got shape \(0, 1\)"):
        ENGINES[engine](np.ones((0, 1)))
    with pytest.raises(ValueError, match=r"^emissions\[1\]: expected at least one time step \(T >= 1\)"):
        ENGINES[engine]([np.ones((3, 1)), np.ones((0, 1))])


ONE_D = {
    "kalman.filter": (lambda y: ps.kalman.filter(LGSSM, y).log_likelihood),
    "hmm.filter": (lambda y: ps.hmm.filter(GAUSS, y).log_likelihood),
    "smc.particle_filter": (lambda y: ps.smc.particle_filter(KEY, GAUSS, y, 8).log_likelihood),
    "learn.em lgssm": (lambda y: ps.learn.em(LGSSM, y, 2, progress=False)[1]),
    "learn.em hmm": (lambda y: ps.learn.em(GAUSS, y, 2, progress=False)[1]),
}


@pytest.mark.parametrize("engine", sorted(ONE_D))
def test_one_dimensional_series_is_one_column(engine):
    y = RNG.normal(size=6)
    np.testing.assert_allclose(ONE_D[engine](y), ONE_D[engine](y[:, None]), rtol=1e-12)


def test_one_dimensional_lists_and_wrong_width():
    ys = [RNG.normal(size=5), RNG.normal(size=3)]
    out = ps.hmm.filter(GAUSS, ys)
    ref = ps.hmm.filter(GAUSS, [y[:, None] for y in ys])
    np.testing.assert_allclose(out.log_likelihood, ref.log_likelihood, rtol=1e-12)
    two = _hmm(ps.emissions.Gaussian(jnp.zeros((K, 2)), jnp.tile(jnp.eye(2), (K, 1, 1))))
    with pytest.raises(ValueError, match=r"^emissions: expected shape \(T, 2\)"):
        ps.hmm.filter(two, np.ones(5))


# ----------------------------------------------------------------------------------------------
# 7. ragged lists: every engine equals running the sequences one by one
# ----------------------------------------------------------------------------------------------
def _seqs(D, lens, kind="gauss", seed=1):
    rng = np.random.default_rng(seed)
    if kind == "pois":
        return [rng.poisson(2.0, size=(T, D)).astype(float) for T in lens]
    if kind == "cat":
        return [rng.integers(0, 3, size=(T, D)).astype(float) for T in lens]
    return [rng.normal(size=(T, D)) for T in lens]


FUNCTIONAL = ps.smc.AdditiveFunctional(lambda z, y, u: z[0], lambda zp, z, t, y, u: z[0])
DKF = ps.dkf.DKFModel(jnp.array([[0.6]]), jnp.array([[0.64]]), jnp.array([[1.0]]), lambda x: x,
                      lambda x: jnp.full((1, 1), 0.5))
HMM_KINDS = {"hmm_gaussian": "gauss", "hmm_poisson": "pois", "hmm_categorical": "cat", "arhmm": "gauss",
             "hmmglm": "pois"}


def _ragged_cases():
    cases = {
        "kalman.filter": (LGSSM, "gauss", lambda m, y, k: ps.kalman.filter(m, y).filtered_means),
        "kalman.smoother": (LGSSM, "gauss", lambda m, y, k: ps.kalman.smoother(m, y).smoothed_covs),
        "gaussian.ekf": (NONLINEAR, "gauss", lambda m, y, k: ps.gaussian.smoother(m, y).smoothed_means),
        "gaussian.ukf": (NONLINEAR, "gauss", lambda m, y, k: ps.gaussian.filter(m, y, method="ukf").filtered_means),
        "imap": (NONLINEAR, "gauss", lambda m, y, k: ps.imap.filter_ssm(m, y, optimizer="adam", num_iters=3,
                                                                        learning_rate=0.1)[0]),
        "dkf": (DKF, "gauss", lambda m, y, k: ps.dkf.filter(m, y).filtered_means),
        "smc.particle_filter": (MODELS["stochastic_volatility"], "gauss",
                                lambda m, y, k: ps.smc.particle_filter(k, m, y, 16).log_likelihood),
        "smc.particle_filter lgssm": (LGSSM, "gauss",
                                      lambda m, y, k: ps.smc.particle_filter(k, m, y, 16).log_likelihood),
    }
    for name, kind in HMM_KINDS.items():
        cases[f"hmm.filter {name}"] = (MODELS[name], kind, lambda m, y, k: ps.hmm.filter(m, y).filtered_probs)
        cases[f"hmm.viterbi {name}"] = (MODELS[name], kind, lambda m, y, k: ps.hmm.viterbi(m, y))
    cases["hmm.smoother"] = (GAUSS, "gauss", lambda m, y, k: ps.hmm.smoother(m, y).smoothed_probs)
    cases["hmm.smoother counts"] = (GAUSS, "gauss", lambda m, y, k: ps.hmm.smoother(m, y).transition_counts)
    return cases


RAGGED = _ragged_cases()


@pytest.mark.parametrize("case", sorted(RAGGED))
def test_ragged_list_equals_one_by_one(case):
    model, kind, fn = RAGGED[case]
    lens = (12, 9) if "hmmglm" in case else (6, 4)
    ys = _seqs(model.emission_dim or 1, lens, kind)
    keys = jax.random.split(KEY, len(ys))
    out = np.asarray(fn(model, ys, KEY))
    for b, y in enumerate(ys):
        one = np.asarray(fn(model, y, keys[b]))
        got = out[b]
        if got.shape != one.shape:  # (T_max, ...) -> (T_b, ...); the padding is zero / -1
            got = got[: one.shape[0]]
        np.testing.assert_allclose(got, one, rtol=1e-10, atol=1e-10)


def test_ragged_list_in_paris():
    # PaRIS draws its backward indices over the padded length, so a ragged list equals the padded
    # batch with lengths (same random streams), not separate runs (other streams, same law)
    model = MODELS["stochastic_volatility"]
    ys = _seqs(1, (6, 4))
    pad, n = ps.core.batching.pad_sequences(ys)
    out = ps.smc.paris(KEY, model, ys, FUNCTIONAL, 16).estimate
    np.testing.assert_allclose(out, ps.smc.paris(KEY, model, pad, FUNCTIONAL, 16, lengths=n).estimate, rtol=1e-12)
    assert out.shape == (2,) and bool(jnp.all(jnp.isfinite(out)))


def test_ragged_posterior_and_log_likelihood():
    ys = _seqs(1, (6, 4))
    total = sum(float(ps.hmm.filter(GAUSS, y).log_likelihood) for y in ys)
    np.testing.assert_allclose(jax.jit(lambda ys: ps.hmm.log_likelihood(GAUSS, ys))(ys), total, rtol=1e-12)
    pad, n = ps.core.batching.pad_sequences(ys)
    post = jax.jit(lambda y, n: ps.hmm.posterior(GAUSS, y, length=n))(pad[1], n[1])
    np.testing.assert_allclose(post.log_likelihood, ps.hmm.filter(GAUSS, ys[1]).log_likelihood, rtol=1e-12)


def _exact_ll(model, y):
    if isinstance(model, ps.core.AbstractLinearGaussianSSM):
        return float(ps.kalman.filter(model, y).log_likelihood)
    return float(ps.hmm.filter(model, y).log_likelihood)


LEARNERS = {
    "em lgssm": (LGSSM, "gauss", lambda m, y, **k: ps.learn.em(m, y, 2, progress=False, **k)),
    "em hmm": (GAUSS, "gauss", lambda m, y, **k: ps.learn.em(m, y, 2, progress=False, **k)),
    "em arhmm": (MODELS["arhmm"], "gauss", lambda m, y, **k: ps.learn.em(m, y, 2, progress=False, **k)),
    "em hmmglm": (HMMGLM, "pois", lambda m, y, **k: ps.learn.em(m, y, 2, progress=False, **k)),
    "baum_welch categorical": (MODELS["hmm_categorical"], "cat",
                               lambda m, y, **k: ps.learn.baum_welch(m, y, 2, progress=False, **k)),
    "mle hmm": (MODELS["hmm_poisson"], "pois", lambda m, y, **k: ps.learn.mle(m, y, 2, progress=False, **k)),
}


@pytest.mark.parametrize("case", sorted(LEARNERS))
def test_ragged_list_in_learners(case):
    model, kind, fit = LEARNERS[case]
    ys = _seqs(model.emission_dim, (12, 9) if "hmmglm" in case else (6, 4), kind)
    fitted, history = fit(model, ys)
    # the first entry is the log-likelihood of the starting model: the sum over the sequences
    np.testing.assert_allclose(history[0], sum(_exact_ll(model, y) for y in ys), rtol=1e-10)
    pad, n = ps.core.batching.pad_sequences(ys)
    _, history_padded = fit(model, pad, lengths=n)
    np.testing.assert_allclose(history, history_padded, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# 8. hmmlearn-style concatenated data with lengths
# ----------------------------------------------------------------------------------------------
def test_concatenated_lengths_match_hmmlearn():
    hmmlearn = pytest.importorskip("hmmlearn.hmm")
    means = np.array([[-1.0, 0.5], [1.0, -0.5]])
    covs = np.array([[[1.0, 0.3], [0.3, 0.8]], [[0.5, -0.1], [-0.1, 1.2]]])
    pi = np.array([0.6, 0.4])
    ref = hmmlearn.GaussianHMM(n_components=2, covariance_type="full", init_params="", params="")
    ref.startprob_, ref.transmat_, ref.means_, ref.covars_ = pi, np.asarray(A), means, covs
    lengths = [3, 5, 2]
    X = RNG.normal(size=(sum(lengths), 2))
    model = ps.models.HMM(jnp.asarray(pi), A, ps.emissions.Gaussian(jnp.asarray(means), jnp.asarray(covs)))
    out = ps.hmm.filter(model, X, lengths=lengths)
    assert out.filtered_probs.shape == (3, 5, 2)
    np.testing.assert_allclose(jnp.sum(out.log_likelihood), ref.score(X, lengths), rtol=0, atol=1e-8)
    np.testing.assert_allclose(ps.hmm.log_likelihood(model, X, lengths=lengths), ref.score(X, lengths), atol=1e-8)
    post = ps.hmm.smoother(model, X, lengths=lengths).smoothed_probs
    flat = np.concatenate([np.asarray(post[b, :n]) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(flat, ref.predict_proba(X, lengths), atol=1e-8)
    # EM accepts the same data; its first entry is hmmlearn's score of the starting model
    _, history = ps.learn.em(model, X, 2, lengths=lengths, progress=False)
    np.testing.assert_allclose(history[0], ref.score(X, lengths), atol=1e-8)


def test_concatenated_lengths_errors_and_inputs():
    X = np.ones((10, 1))
    with pytest.raises(ValueError, match=r"^lengths: .*sum\(lengths\) must equal T = 10, got sum 9"):
        ps.hmm.filter(GAUSS, X, lengths=[3, 4, 2])
    with pytest.raises(ValueError, match="^lengths: expected every length >= 1"):
        ps.hmm.filter(GAUSS, X, lengths=[10, 0])
    # a scalar lengths keeps its meaning: the true length of one padded sequence
    one = ps.hmm.filter(GAUSS, X, lengths=4)
    np.testing.assert_allclose(one.log_likelihood, ps.hmm.filter(GAUSS, X[:4]).log_likelihood, rtol=1e-12)
    # inputs (sum(lengths), U) are split like the emissions
    ar = MODELS["arhmm"]
    y = RNG.normal(size=(9, 1))
    u = ar.default_inputs(jnp.asarray(y))
    cat = ps.hmm.filter(ar, y, inputs=u, lengths=[4, 5])
    for b, (s, e) in enumerate([(0, 4), (4, 9)]):
        np.testing.assert_allclose(cat.log_likelihood[b], ps.hmm.filter(ar, y[s:e], inputs=u[s:e]).log_likelihood,
                                   rtol=1e-12)
    with pytest.raises(ValueError, match=r"^inputs: with concatenated sequences"):
        ps.hmm.filter(ar, y, inputs=u[:8], lengths=[4, 5])


# ----------------------------------------------------------------------------------------------
# 9. EM on T = 1
# ----------------------------------------------------------------------------------------------
def test_em_refuses_single_step_and_handles_one_short_sequence():
    with pytest.raises(ValueError, match="^emissions: EM needs sequences of at least 2 time steps"):
        ps.learn.em(LGSSM, np.ones((1, 1)), 2, progress=False)
    for model in (LGSSM, GAUSS):
        ys = [RNG.normal(size=(6, 1)), RNG.normal(size=(1, 1)), RNG.normal(size=(4, 1))]
        fitted, history = ps.learn.em(model, ys, 3, progress=False)
        assert np.all(np.isfinite(history)) and np.all(np.diff(history) >= -1e-8)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(fitted)
                   if hasattr(a, "dtype"))
        np.testing.assert_allclose(history[0], sum(_exact_ll(model, y) for y in ys), rtol=1e-10)
