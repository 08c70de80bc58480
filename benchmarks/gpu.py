"""Sequential against parallel-in-time forms, and particle throughput, on the default device.

    python benchmarks/gpu.py            # GPU: T = 1e3..1e6, N = 1e3..1e6 (under 5 minutes)
    python benchmarks/gpu.py --cpu      # the reduced CPU sizes (also what runs without a GPU)

Kalman filter (d = 4, p = 2 and d = 32, p = 16; time-invariant, so the steady-state forms run,
and the general "full recursion" form, steady_state=False), HMM forward-backward (K = 10,
D = 5, Gaussian emissions) and the bootstrap particle filter on the stochastic-volatility model
(T = 1e3). float64 unless --float32. "compile" is the tracing, lowering and XLA compilation jax reports
during the first call, "run" the median of the calls after it (benchmarks/kalman.py's `timed`). A size is skipped once a smaller one of the same row took
more than --budget seconds. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="reduced sizes (the default without a GPU)")
parser.add_argument("--float32", action="store_true")
parser.add_argument("--budget", type=float, default=20.0, help="seconds per call above which larger sizes are skipped")
ARGS = parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hmm import make_problem as make_hmm_problem  # noqa: E402  (the problems of the CPU benchmarks)
from kalman import make_problem, timed  # noqa: E402  (timed: compile time from jax's events)

jax.config.update("jax_enable_x64", not ARGS.float32)  # after those imports, which turn x64 on

import probssm as ps  # noqa: E402

ON_CPU = ARGS.cpu or jax.default_backend() == "cpu"
TS = [1_000, 10_000] if ON_CPU else [1_000, 10_000, 100_000, 1_000_000]
NS = [1_000, 10_000] if ON_CPU else [1_000, 10_000, 100_000, 1_000_000]


def kalman_problem(d, p, T, seed=0):
    model, y = make_problem(d, p, T, seed)
    return model, jax.numpy.asarray(y, jax.numpy.result_type(float))


def hmm_problem(K, D, T, seed=0):
    return make_hmm_problem(K, D, T, seed)


def main():
    rows = []

    def run_row(task, form, sizes, make_fn, unit):
        for size in sizes:
            try:
                c, r = timed(make_fn(size))
            except Exception as err:  # out of memory at the largest sizes: say so, go on
                rows.append((task, form, size, None, None, unit, f"failed: {type(err).__name__}"))
                break
            rows.append((task, form, size, c, r, unit, ""))
            if r > ARGS.budget:
                break

    for d, p in ((4, 2), (32, 16)):
        problems = {}

        def kalman(parallel, steady, d=d, p=p, problems=problems):
            def make(T):
                if T not in problems:
                    problems.clear()
                    problems[T] = kalman_problem(d, p, T)
                model, y = problems[T]
                return lambda: ps.kalman.filter(model, y, parallel=parallel, steady_state=steady).log_likelihood
            return make

        task = f"Kalman filter d={d} p={p}"
        run_row(task, "sequential", TS, kalman(False, True), "T")
        run_row(task, "parallel", TS, kalman(True, True), "T")
        run_row(task, "sequential, full recursion", TS, kalman(False, False), "T")
        run_row(task, "parallel, full recursion", TS, kalman(True, False), "T")

    hmm_cache = {}

    def hmm(parallel):
        def make(T):
            if T not in hmm_cache:
                hmm_cache.clear()
                hmm_cache[T] = hmm_problem(10, 5, T)
            model, y = hmm_cache[T]
            return lambda: ps.hmm.smoother(model, y, parallel=parallel).smoothed_probs
        return make

    run_row("HMM forward-backward K=10 D=5", "sequential", TS, hmm(False), "T")
    run_row("HMM forward-backward K=10 D=5", "parallel", TS, hmm(True), "T")

    sv = ps.models.StochasticVolatility(-1.02, 0.9702, 0.178)
    _, y_sv = ps.sample(jax.random.PRNGKey(0), sv, 1000)

    def pf(n):
        return lambda: ps.smc.particle_filter(jax.random.PRNGKey(1), sv, y_sv, n, history=False).log_likelihood

    run_row("bootstrap PF, stochastic volatility, T=1e3", "sequential in T, vmapped over N", NS, pf, "N")

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, "
          f"jax {jax.__version__}, {'float32' if ARGS.float32 else 'float64'}\n")
    print("| task | form | size | compile (s) | run (s) | us per step | note |")
    print("|---|---|---|---|---|---|---|")
    for task, form, size, c, r, unit, note in rows:
        if r is None:
            print(f"| {task} | {form} | {unit}={size:.0e} | – | – | – | {note} |")
            continue
        per = 1e6 * r / (1000 if unit == "N" else size)
        print(f"| {task} | {form} | {unit}={size:.0e} | {c:.2f} | {r:.4f} | {per:.2f} | {note} |")


if __name__ == "__main__":
    main()
