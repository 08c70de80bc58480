"""HMM forward-backward and Baum-Welch: probssm against hmmlearn and dynamax, same run.

    python benchmarks/hmm.py            # full table (about a minute)
    python benchmarks/hmm.py --quick    # smaller T

float64 throughout, Gaussian emissions with full covariances. "compile" is the first
call minus the steady-state time; "run" is the median of the calls after it (at least 5,
more up to 50 until they add up to 0.5 s). The ratio column is (other library's run time) / (probssm sequential run time) for the same task,
measured in this process; the last column is hmmlearn 'scaling' run time / this row's
(> 1: faster than hmmlearn's C path). Every forward-backward timing includes computing the emission
log-likelihoods and returns the log-likelihood and the smoothed marginals.
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


def timed(fn, reps=5):
    """(compile seconds = first call - steady state, median steady-state seconds): at least
    ``reps`` calls after the first, more (up to 50) until they add up to 0.5 s."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    while len(runs) < reps or (sum(runs) < 0.5 and len(runs) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    run = float(np.median(runs))
    return max(first - run, 0.0), run


def make_problem(K, D, T, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.dirichlet(np.ones(K), size=K) + 4 * np.eye(K)
    A /= A.sum(1, keepdims=True)
    means = 2.0 * rng.normal(size=(K, D))
    covs = np.stack([np.eye(D) * (0.5 + rng.uniform()) for _ in range(K)])
    model = ps.models.HMM(np.ones(K) / K, A, ps.emissions.Gaussian(means, covs))
    _, y = ps.sample(jax.random.PRNGKey(seed), model, T)
    return model, np.asarray(y)


def hmmlearn_model(model, implementation, **kw):
    from hmmlearn import hmm

    K = model.num_states
    m = hmm.GaussianHMM(K, covariance_type="full", implementation=implementation, init_params="", **kw)
    m.startprob_ = np.asarray(model.initial_probs)
    m.transmat_ = np.asarray(model.transition_matrix)
    m.means_ = np.asarray(model.emissions.means)
    m.covars_ = np.asarray(model.emissions.covs)
    return m


def dynamax_model(model):
    from dynamax.hidden_markov_model import GaussianHMM

    K, D = model.num_states, model.emission_dim
    dm = GaussianHMM(K, D)
    params, props = dm.initialize(initial_probs=model.initial_probs, transition_matrix=model.transition_matrix,
                                  emission_means=model.emissions.means,
                                  emission_covariances=model.emissions.covs)
    return dm, params, props


def forward_backward(K, D, T, rows):
    model, y = make_problem(K, D, T)
    yj = jnp.asarray(y)
    task = f"forward-backward K={K} D={D} T={T:.0e}"
    res = {}
    res["probssm (sequential)"] = timed(lambda: ps.hmm.smoother(model, yj).smoothed_probs)
    res["probssm (parallel, default: two-level)"] = timed(
        lambda: ps.hmm.smoother(model, yj, parallel=True).smoothed_probs)
    res["probssm (parallel, associative chunks of 512)"] = timed(
        lambda: ps.hmm.smoother(model, yj, parallel=True, chunk_size=512).smoothed_probs, reps=3)
    for impl in ("scaling", "log"):
        m = hmmlearn_model(model, impl)
        res[f"hmmlearn '{impl}'"] = timed(lambda: m.score_samples(y)[1])
    dm, params, _ = dynamax_model(model)
    f = jax.jit(lambda p, e: dm.smoother(p, e).smoothed_probs)
    res["dynamax (jit)"] = timed(lambda: f(params, yj))
    base = res["probssm (sequential)"][1]
    ref = res["hmmlearn 'scaling'"][1]
    for name, (c, r) in res.items():
        rows.append((task, name, c, r, r / base, ref / r))
    ll = float(ps.hmm.smoother(model, yj).log_likelihood)
    ll_ref = float(hmmlearn_model(model, "scaling").score(y))
    print(f"<!-- {task}: log-likelihood probssm {ll:.10g}, hmmlearn {ll_ref:.10g} -->")


def parallel_only(K, D, T, rows):
    """Parallel forward-backward at a small T (compile time must not grow with T), against
    the sequential form and hmmlearn at the same size."""
    model, y = make_problem(K, D, T)
    yj = jnp.asarray(y)
    task = f"forward-backward K={K} D={D} T={T:.0e}"
    res = {"probssm (sequential)": timed(lambda: ps.hmm.smoother(model, yj).smoothed_probs),
           "probssm (parallel, default: two-level)": timed(
               lambda: ps.hmm.smoother(model, yj, parallel=True).smoothed_probs),
           "probssm (parallel, associative chunks of 512)": timed(
               lambda: ps.hmm.smoother(model, yj, parallel=True, chunk_size=512).smoothed_probs)}
    m = hmmlearn_model(model, "scaling")
    res["hmmlearn 'scaling'"] = timed(lambda: m.score_samples(y)[1])
    base, ref = res["probssm (sequential)"][1], res["hmmlearn 'scaling'"][1]
    for name, (c, r) in res.items():
        rows.append((task, name, c, r, r / base, ref / r))


def baum_welch(K, D, T, num_iters, rows):
    true, y = make_problem(K, D, T, seed=1)
    rng = np.random.default_rng(2)
    init = ps.models.HMM(np.ones(K) / K, np.full((K, K), 1.0 / K),
                         ps.emissions.Gaussian(rng.normal(size=(K, D)), np.stack([np.eye(D)] * K)))
    yj = jnp.asarray(y)
    task = f"Baum-Welch {num_iters} iterations K={K} D={D} T={T:.0e}"
    res = {}
    res["probssm (sequential)"] = timed(lambda: ps.learn.em(init, yj, num_iters, progress=False)[1], reps=3)

    def hl():
        m = hmmlearn_model(init, "scaling", n_iter=num_iters, tol=-np.inf, params="stmc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(y)
        return m.monitor_.history[-1]

    res["hmmlearn 'scaling'"] = timed(hl, reps=3)
    dm, params, props = dynamax_model(init)
    res["dynamax fit_em (per call)"] = timed(lambda: dm.fit_em(params, props, yj, num_iters=num_iters,
                                                                verbose=False)[1], reps=3)
    base = res["probssm (sequential)"][1]
    ref = res["hmmlearn 'scaling'"][1]
    for name, (c, r) in res.items():
        rows.append((task, name, c, r, r / base, ref / r))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    parallel_only(10, 5, 1_000, rows)
    forward_backward(10, 5, 10_000 if args.quick else 100_000, rows)
    baum_welch(5, 3, 2_000 if args.quick else 10_000, 20, rows)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, float64\n")
    print("| task | library | compile (s) | run (s) | run / probssm sequential | hmmlearn 'scaling' / run |")
    print("|---|---|---|---|---|---|")
    for task, name, c, r, ratio, speedup in rows:
        print(f"| {task} | {name} | {c:.2f} | {r:.4f} | {ratio:.2f}x | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
