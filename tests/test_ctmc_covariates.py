"""Covariates on the log-rates of a Markov jump process (proportional intensities, msm's
``covariates``): per-subject and per-interval values, exact death, MLE, bad input."""
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import probssm as ps

jax.config.update("jax_enable_x64", True)

Q = np.array([[-1.0, 0.6, 0.4], [0.3, -0.5, 0.2], [0.0, 0.0, 0.0]])  # state 2 absorbing (death)
PI = np.array([1.0, 0.0, 0.0])
BETA = np.zeros((2, 3, 3))
BETA[0, 0, 1], BETA[0, 1, 2], BETA[0, 0, 2] = 0.7, -0.4, 0.2
BETA[1, 1, 0] = 0.5
TIMES = np.array([[0.0, 0.5, 1.2, 2.0], [0.0, 0.3, 1.0, 1.1], [0.0, 0.4, 0.9, 1.7]])
STATES = np.array([[0, 1, 1, 2], [0, 0, 1, 1], [0, 1, 0, 2]])


def _proc(beta=BETA):
    return ps.models.MarkovJumpProcess(Q, PI, covariate_effects=beta)


def _scaled(x):
    """The generator at covariate values x, written out from the definition."""
    F = Q * (1 - np.eye(3)) * np.exp(np.einsum("p,pij->ij", x, BETA))
    return F - np.diag(F.sum(1))


def test_subject_covariates_equal_one_process_per_subject():
    x = np.array([[0.0, 0.0], [1.0, -0.5], [-0.3, 2.0]])
    ll = ps.ctmc.panel_log_likelihood(_proc(), TIMES, STATES, covariates=x, exact_states=(2,), per_subject=True)
    for b in range(3):
        own = ps.models.MarkovJumpProcess(_scaled(x[b]), PI)
        ref = ps.ctmc.panel_log_likelihood(own, TIMES[b], STATES[b], exact_states=(2,))
        np.testing.assert_allclose(ll[b], ref, rtol=1e-12)
    # ragged lists of subjects take a list of covariate rows (per subject or per record)
    ragged = ([TIMES[0], TIMES[1][:3]], [STATES[0], STATES[1][:3]])
    ll_list = ps.ctmc.panel_log_likelihood(_proc(), *ragged, covariates=[x[0], x[1]], exact_states=(2,),
                                           per_subject=True)
    ll_rec = ps.ctmc.panel_log_likelihood(_proc(), *ragged, covariates=[np.tile(x[0], (4, 1)), np.tile(x[1], (3, 1))],
                                          exact_states=(2,), per_subject=True)
    ref1 = ps.ctmc.panel_log_likelihood(ps.models.MarkovJumpProcess(_scaled(x[1]), PI), TIMES[1][:3], STATES[1][:3])
    np.testing.assert_allclose(ll_list, [ll[0], ref1], rtol=1e-12)
    np.testing.assert_allclose(ll_rec, ll_list, rtol=1e-13)
    # zero covariates are the baseline process
    base = ps.ctmc.panel_log_likelihood(ps.models.MarkovJumpProcess(Q, PI), TIMES, STATES, exact_states=(2,))
    zero = ps.ctmc.panel_log_likelihood(_proc(), TIMES, STATES, covariates=np.zeros((3, 2)), exact_states=(2,))
    np.testing.assert_allclose(zero, base, rtol=1e-13)


def test_record_covariates_equal_a_product_of_interval_exponentials():
    # one subject, the covariates change at every record; the last record is an exact death
    t, s = TIMES[0], STATES[0]
    x = np.array([[0.2, 1.0], [-1.0, 0.5], [0.7, -0.2], [9.0, 9.0]])  # the last row is never used
    ll = ps.ctmc.panel_log_likelihood(_proc(), t, s, covariates=x, exact_states=(2,))
    ref = 0.0
    for j in range(3):
        G = _scaled(x[j])
        P = scipy.linalg.expm(G * (t[j + 1] - t[j]))
        if s[j + 1] == 2:  # exact entry: survive to t in a live state, then jump at t
            ref += np.log(sum(P[s[j], k] * G[k, 2] for k in (0, 1)))
        else:
            ref += np.log(P[s[j], s[j + 1]])
    np.testing.assert_allclose(ll, ref, rtol=1e-12)


def test_gradient_and_jit_with_traced_covariates():
    x = np.array([[0.0, 1.0], [1.0, -0.5], [-0.3, 2.0]])
    f = jax.jit(lambda m, xx: ps.ctmc.panel_log_likelihood(m, TIMES, STATES, covariates=xx, exact_states=(2,)))
    np.testing.assert_allclose(f(_proc(), x), ps.ctmc.panel_log_likelihood(_proc(), TIMES, STATES, covariates=x,
                                                                            exact_states=(2,)), rtol=1e-13)
    g = jax.grad(lambda m: ps.ctmc.panel_log_likelihood(m, TIMES, STATES, covariates=x, exact_states=(2,)))(_proc())
    eps = 1e-6
    for i in range(g.covariate_effects.size):
        d = np.zeros(g.covariate_effects.size)
        d[i] = eps
        shift = lambda m, s: eqx.tree_at(lambda q: q.covariate_effects, m,
                                         m.covariate_effects + s * d.reshape(m.covariate_effects.shape))
        fd = (f(shift(_proc(), 1.0), x) - f(shift(_proc(), -1.0), x)) / (2 * eps)
        np.testing.assert_allclose(g.covariate_effects.ravel()[i], fd, rtol=1e-6, atol=1e-8)


def test_mle_with_a_group_indicator_equals_separate_fits_per_group():
    # a saturated group effect (one per free rate): the covariate model's MLE is the two groups' own MLEs
    structure = (Q != 0) & ~np.eye(3, dtype=bool)
    F = np.where(structure, 0.5, 0.0)
    G0 = F - np.diag(F.sum(1))
    start = ps.models.MarkovJumpProcess(G0, PI, structure=structure, covariate_effects=np.zeros((1, 3, 3)))
    truth = [Q, _scaled(np.array([1.0, 0.0]))]
    grid = np.array([0.0, 0.4, 0.9, 1.5, 2.2, 3.0])
    key = jax.random.PRNGKey(3)
    data = []
    for g, G in enumerate(truth):
        key, sub = jax.random.split(key)
        data.append(np.asarray(ps.ctmc.sample_at(sub, ps.models.MarkovJumpProcess(G, PI), np.tile(grid, (150, 1)))))
    times = np.tile(grid, (300, 1))
    states = np.concatenate(data)
    group = np.repeat([0.0, 1.0], 150)[:, None]
    # L-BFGS converges here by step ~22 (the log-likelihood is then constant to 1e-9), so 60 steps leave a 3x
    # margin; the fitted generators equal those after 300 steps to machine precision
    fitted, _ = ps.learn.mle(start, (times, states, group), 60, progress=False)
    base = ps.models.MarkovJumpProcess(G0, PI, structure=structure)
    for g in range(2):
        own, _ = ps.learn.mle(base, (times[:150], data[g]), 60, progress=False)
        got = np.asarray(fitted.generator(np.array([float(g)])))
        np.testing.assert_allclose(got, np.asarray(own.generator()), rtol=1e-5, atol=1e-8)


def test_save_and_load_keep_the_covariate_effects(tmp_path):
    ps.save(tmp_path / "mjp", _proc())
    back = ps.load(tmp_path / "mjp")
    np.testing.assert_array_equal(back.covariate_effects, _proc().covariate_effects)


def test_bad_covariates_raise_naming_the_argument():
    proc = _proc()
    for bad, msg in [(np.zeros((3, 3)), "covariates: expected shape"), (np.zeros((2, 2)), "covariates: expected shape"),
                     (np.full((3, 2), np.nan), "covariates: expected finite"),
                     ([np.zeros(2), np.zeros(3), np.zeros(2)], "covariates: expected a list")]:
        with pytest.raises(ValueError, match=msg):
            ps.ctmc.panel_log_likelihood(proc, TIMES, STATES, covariates=bad)
    with pytest.raises(ValueError, match="covariates: the process has no covariate_effects"):
        ps.ctmc.panel_log_likelihood(ps.models.MarkovJumpProcess(Q, PI), TIMES, STATES, covariates=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="covariate_effects: expected shape"):
        ps.models.MarkovJumpProcess(Q, PI, covariate_effects=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="covariate_effects"):
        ps.models.MarkovJumpProcess(Q, PI, covariate_effects=np.full((1, 3, 3), np.inf))
    # a model made by tree_at is checked where inference starts
    broken = eqx.tree_at(lambda m: m.covariate_effects, proc, jnp.zeros((2, 7)))
    with pytest.raises(ValueError, match="covariate_effects: expected shape"):
        ps.ctmc.panel_log_likelihood(broken, TIMES, STATES, covariates=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="covariates: fit their effects with ps.learn.mle"):
        ps.learn.em(proc, (TIMES, STATES, np.zeros((3, 2))), 5)


# ----------------------------------------------------------------------------------------------
# Published oracle: msm's regression tests on the cav heart-transplant panel with covariates = ~ sex
# ----------------------------------------------------------------------------------------------
CAV = Path(os.environ.get("PROBSSM_MJP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "mjp")) / "cav.csv"
TWOWAY4 = np.array([[-0.5, 0.25, 0, 0.25], [0.166, -0.498, 0.166, 0.166], [0, 0.25, -0.5, 0.25], [0, 0, 0, 0]])


def _cav_with_sex():
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(CAV)
    times, states, sex = [], [], []
    for _, g in df.groupby("PTNUM", sort=False):
        times.append(g.years.to_numpy(float))
        states.append(g.state.to_numpy(int) - 1)
        sex.append(g.sex.to_numpy(float))
    # msm centres covariates (center = TRUE) at their mean over the records that start an interval
    centre = np.mean(np.concatenate([s[:-1] for s in sex]))
    return times, states, [(s - centre)[:, None] for s in sex]


@pytest.mark.skipif(not CAV.exists(), reason="msm's cav data (GPL) not present; see ../shared/data/mjp/README.md")
def test_cav_with_sex_matches_msm_at_its_initial_values():
    """msm's test "simple model, covariates" (tests/testthat/test_models.r): twoway4.q, exact death,
    every sex effect 0.01, fixedpars: -2 log L = 4909.17147259115."""
    times, states, x = _cav_with_sex()
    beta = np.where(TWOWAY4 > 0, 0.01, 0.0)[None] * (1 - np.eye(4))[None]
    proc = ps.models.MarkovJumpProcess(TWOWAY4, np.array([1.0, 0, 0, 0]), covariate_effects=beta)
    minus2ll = -2 * float(ps.ctmc.panel_log_likelihood(proc, times, states, exact_states=(3,), covariates=x))
    np.testing.assert_allclose(minus2ll, 4909.17147259115, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not CAV.exists(), reason="msm's cav data (GPL) not present; see ../shared/data/mjp/README.md")
def test_cav_with_sex_fit_matches_msm():
    """msm's slow test "cav model fit with covariates": -2 log L = 3954.77700438268 at its fit."""
    times, states, x = _cav_with_sex()
    proc = ps.models.MarkovJumpProcess(TWOWAY4, np.array([1.0, 0, 0, 0]), covariate_effects=np.zeros((1, 4, 4)))
    fitted, _ = ps.learn.mle(proc, (times, states, x), 300, exact_states=(3,), progress=False)
    minus2ll = -2 * float(ps.ctmc.panel_log_likelihood(fitted, times, states, exact_states=(3,), covariates=x))
    np.testing.assert_allclose(minus2ll, 3954.77700438268, rtol=1e-6)
    assert minus2ll <= 3954.77700438268 + 1e-9  # at least as far as msm's BFGS
