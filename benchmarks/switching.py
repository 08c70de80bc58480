"""Switching systems: Markov-switching AR against statsmodels, and the SLDS engines, same run.

    python benchmarks/switching.py            # full table (about a minute)
    python benchmarks/switching.py --quick    # smaller T

float64 throughout. "compile" is the first call minus the steady-state time; "run" is the
median of 3 calls after it. For the Markov-switching AR (Hamilton's K = 2, AR(4), switching
mean; an HMM on 2^5 expanded states) the anchor is statsmodels' `MarkovAutoregression` at the
same parameters (its Cython Hamilton filter and Kim smoother); the ratio column is statsmodels'
run time / probssm's (> 1: probssm faster). No library we can install has SLDS engines to
anchor against (dynamax has none; Linderman's `ssm` does not build with numpy 2), so the SLDS
rows give probssm's absolute times per time step: the IMM and GPB2 filters, the
Rao-Blackwellised particle filter (1000 particles; T <= 1e3, as it costs about 5 ms per step) and
one structured-VI iteration (K = 3 modes, d = 4 states, p = 4 outputs).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import probssm as ps  # noqa: E402


def timed(fn, reps=3):
    """(compile seconds = first call - steady state, median steady-state seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    run = float(np.median(runs))
    return max(first - run, 0.0), run


HAMILTON = dict(transition_matrix=np.array([[0.75, 0.25], [0.10, 0.90]]), means=np.array([-0.36, 1.16]),
                ar_coefs=np.array([0.013, -0.058, -0.247, -0.213]), variances=np.array(0.59))


def msar_rows(T, rows):
    model = ps.models.MarkovSwitchingAR(**{k: jnp.asarray(v) for k, v in HAMILTON.items()})
    _, y = ps.sample(jax.random.PRNGKey(0), model, T)
    y = np.asarray(y)[:, 0]
    import statsmodels.api as sm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_model = sm.tsa.MarkovAutoregression(y, k_regimes=2, order=4, switching_ar=False, switching_variance=False)
    # statsmodels' parameter order: p[0->0], p[1->0], means, sigma2, AR coefficients
    A = HAMILTON["transition_matrix"]
    params = np.r_[A[0, 0], A[1, 0], HAMILTON["means"], HAMILTON["variances"], HAMILTON["ar_coefs"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task, ours, theirs in [
            ("log-likelihood", lambda: ps.switching.log_likelihood(model, y), lambda: sm_model.loglike(params)),
            ("smoothed regimes", lambda: ps.switching.smoother(model, y).smoothed_probs,
             lambda: sm_model.smooth(params).smoothed_marginal_probabilities),
        ]:
            c, r = timed(ours)
            _, r_sm = timed(theirs)
            rows.append((f"MSAR K=2 AR(4) {task} T={T:.0e}", "probssm", c, r, r_sm / r))
            rows.append((f"MSAR K=2 AR(4) {task} T={T:.0e}", "statsmodels", 0.0, r_sm, 1.0))
        # the same task: the two log-likelihoods agree
        np.testing.assert_allclose(float(ps.switching.log_likelihood(model, y)), sm_model.loglike(params), rtol=1e-8)


def slds_problem(T, K=3, d=4, p=4, seed=0):
    rng = np.random.default_rng(seed)
    trans = 0.9 * np.eye(K) + 0.1 / K
    trans /= trans.sum(1, keepdims=True)
    dyn = np.stack([0.95 * np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(K)])
    model = ps.models.SLDS(np.ones(K) / K, trans, np.zeros((K, d)), np.tile(np.eye(d), (K, 1, 1)), dyn,
                           np.tile(0.05 * np.eye(d), (K, 1, 1)), rng.normal(size=(p, d)), 0.1 * np.eye(p))
    _, y = ps.sample(jax.random.PRNGKey(seed), model, T)
    return model, jnp.asarray(y)


def slds_rows(T, rows):
    model, y = slds_problem(T)
    key = jax.random.PRNGKey(1)
    for name, fn in [
        ("IMM filter", lambda: ps.switching.imm(model, y).log_likelihood),
        ("GPB2 filter", lambda: ps.switching.gpb2(model, y).log_likelihood),
        *([("RBPF N=1000", lambda: ps.switching.rbpf(key, model, y, 1000).log_likelihood)] if T <= 1000 else []),
        ("structured VI, 1 iteration", lambda: ps.switching.structured_vi(model, y, 1).elbo),
    ]:
        c, r = timed(fn)
        rows.append((f"SLDS K=3 d=4 {name} T={T:.0e}", "probssm", c, r, float("nan")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    for T in ([200, 2000] if args.quick else [200, 2000, 20000]):
        msar_rows(T, rows)
    for T in ([100, 1000] if args.quick else [100, 1000, 10000]):
        slds_rows(T, rows)
    print("| task | library | compile (s) | run (s) | run per step (us) | statsmodels run / this run |")
    print("|---|---|---|---|---|---|")
    for task, lib, c, r, ratio in rows:
        T = float(task.rsplit("T=", 1)[1])
        ratio_text = "" if np.isnan(ratio) else f"{ratio:.1f}x"
        print(f"| {task} | {lib} | {c:.2f} | {r:.4f} | {1e6 * r / T:.1f} | {ratio_text} |")


if __name__ == "__main__":
    main()
