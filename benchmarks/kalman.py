"""Kalman filter and smoother: probssm against dynamax and pykalman, measured in the same run.

    python benchmarks/kalman.py            # full table (a few minutes)
    python benchmarks/kalman.py --quick    # T = 1e3 only

float64 throughout. "compile" is the first call minus the steady-state time; "run" is
the median of 5 calls after it. Ratios compare libraries measured in this process.
dynamax's parallel (associative-scan) filter is run in a subprocess with a time limit,
because on CPU it compiles slowly and has been seen to hang at T >= 1e4.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)

import probssm as ps  # noqa: E402


def timed(fn, reps=5):
    """(first call seconds, median steady-state seconds); fewer repetitions for slow calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    if first > 5.0:
        reps = 2
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    run = float(np.median(runs))
    return max(first - run, 0.0), run


def make_problem(d, p, T, seed=0):
    rng = np.random.default_rng(seed)
    F = 0.95 * np.linalg.qr(rng.normal(size=(d, d)))[0]
    A = rng.normal(size=(d, d))
    Q = A @ A.T / d + 0.1 * np.eye(d)
    H = rng.normal(size=(p, d))
    B = rng.normal(size=(p, p))
    R = B @ B.T / p + 0.5 * np.eye(p)
    model = ps.models.LinearGaussianSSM(np.zeros(d), np.eye(d), F, Q, H, R)
    _, y = ps.sample(jax.random.PRNGKey(seed), model, T)
    return model, np.asarray(y)


def dynamax_params(model):
    from dynamax.linear_gaussian_ssm.inference import make_lgssm_params

    return make_lgssm_params(model.initial_mean, model.initial_cov, model.transition_matrix, model.transition_cov,
                             model.emission_matrix, model.emission_cov)


DYNAMAX_PARALLEL_SNIPPET = """
import sys, time, numpy as np, jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {bench_dir!r})
from kalman import make_problem, dynamax_params, timed
from dynamax.linear_gaussian_ssm.parallel_inference import lgssm_filter
model, y = make_problem({d}, {p}, {T})
params = dynamax_params(model)
f = jax.jit(lgssm_filter)
c, r = timed(lambda: f(params, y).marginal_loglik, reps=3)
print("RESULT", c, r)
"""


def dynamax_parallel(d, p, T, limit):
    code = DYNAMAX_PARALLEL_SNIPPET.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), d=d, p=p, T=T)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            _, c, r = line.split()
            return float(c), float(r)
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dynamax-parallel-limit", type=float, default=120.0,
                        help="seconds allowed to dynamax's parallel filter (compile + 4 runs)")
    args = parser.parse_args()
    configs = [(4, 2, 1_000)] if args.quick else [(4, 2, 1_000), (4, 2, 100_000), (32, 16, 10_000)]

    from dynamax.linear_gaussian_ssm.inference import lgssm_filter as dx_filter, lgssm_smoother as dx_smoother

    print("| d | p | T | method | compile (s) | run (s) | us/step | dynamax run / this run |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for d, p, T in configs:
        model, y = make_problem(d, p, T)
        params = dynamax_params(model)
        dx_f = jax.jit(dx_filter)
        dx_s = jax.jit(dx_smoother)
        base = {}

        def row(name, val):
            if val is None:
                print(f"| {d} | {p} | {T} | {name} | did not finish within {args.dynamax_parallel_limit:.0f} s "
                      f"| – | – | – |", flush=True)
                return
            c, r = val
            kind = "smoother" if "smoother" in name else "filter"
            base.setdefault(kind, r)
            print(f"| {d} | {p} | {T} | {name} | {c:.2f} | {r:.4f} | {1e6 * r / T:.2f} | {base[kind] / r:.2f}x |",
                  flush=True)

        row("dynamax filter", timed(lambda: dx_f(params, y).marginal_loglik))
        row("probssm filter", timed(lambda: ps.kalman.filter(model, y).log_likelihood))
        row("dynamax smoother", timed(lambda: dx_s(params, y).smoothed_means))
        row("probssm smoother", timed(lambda: ps.kalman.smoother(model, y).smoothed_means))
        chunk = None if T <= 4096 else 4096
        row("probssm parallel filter", timed(
            lambda: ps.kalman.filter(model, y, parallel=True, chunk_size=chunk).log_likelihood))
        row("probssm parallel smoother", timed(
            lambda: ps.kalman.smoother(model, y, parallel=True, chunk_size=chunk).smoothed_means))
        row("dynamax parallel filter", dynamax_parallel(d, p, T, args.dynamax_parallel_limit))
        if T <= 1_000:
            from pykalman import KalmanFilter

            kf = KalmanFilter(transition_matrices=np.asarray(model.transition_matrix),
                              observation_matrices=np.asarray(model.emission_matrix),
                              transition_covariance=np.asarray(model.transition_cov),
                              observation_covariance=np.asarray(model.emission_cov),
                              initial_state_mean=np.asarray(model.initial_mean),
                              initial_state_covariance=np.asarray(model.initial_cov))
            t0 = time.perf_counter()
            kf.loglikelihood(y)
            row("pykalman filter", (0.0, time.perf_counter() - t0))
            t0 = time.perf_counter()
            kf.smooth(y)
            row("pykalman smoother", (0.0, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
