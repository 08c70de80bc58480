"""Kalman filter and smoother: probssm against dynamax and pykalman, measured in the same run.

    python benchmarks/kalman.py            # full table and the figure (about 10 minutes)
    python benchmarks/kalman.py --quick    # T = 1e3 only

float64 throughout. "compile" is the tracing, lowering and XLA compilation jax reports
during the first call; "run" is the median of the calls after it (at least 5, more up to 50
until they add up to 0.5 s). Ratios compare libraries measured in this process.
dynamax's parallel (associative-scan) filter is run in a subprocess with a time limit,
because on CPU it compiles slowly and has been seen to hang at T >= 1e4. The model is
time-invariant without missing data, so probssm's filters switch to the steady-state gain once
the covariance recursion has converged; the "full recursion" rows (steady_state=False) show the
general forms that time-varying models and missing data run. The sweep at the end writes
benchmarks/kalman_time_per_step.png (time per step against T and against d, probssm
sequential and parallel, dynamax, statsmodels).
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


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event, duration, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def timed(fn, reps=5):
    """(compile seconds, median steady-state seconds); fewer repetitions for slow calls.

    Compile time is what jax reports for tracing, lowering and XLA compilation during the
    first call (every function it compiles, the argument checks' included), so first-touch
    allocation of large outputs is not counted as compilation."""
    _compile_seconds[0] = 0.0
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    compile_s = _compile_seconds[0]
    if first > 5.0:
        reps = 2
    runs = []
    # at least ``reps`` calls, more (up to 50) until they add up to 0.5 s: millisecond calls are noisy
    while len(runs) < reps or (sum(runs) < 0.5 and len(runs) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return compile_s, float(np.median(runs))


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


def sample_draw(model, y, parallel, steady_state=True):
    return lambda: ps.kalman.sample(jax.random.PRNGKey(0), model, y, 1, parallel=parallel, steady_state=steady_state)


def table(configs, limit):
    """The markdown table: every form of probssm against dynamax (and pykalman at T = 1e3)."""
    from dynamax.linear_gaussian_ssm.inference import lgssm_filter as dx_filter, lgssm_smoother as dx_smoother

    print("| d | p | T | method | compile (s) | run (s) | us/step | dynamax run / this run | this / sequential |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for d, p, T in configs:
        model, y = make_problem(d, p, T)
        params = dynamax_params(model)
        dx_f = jax.jit(dx_filter)
        dx_s = jax.jit(dx_smoother)
        base, seq = {}, {}

        def row(name, val):
            if val is None:
                print(f"| {d} | {p} | {T} | {name} | did not finish within {limit:.0f} s | – | – | – | – |", flush=True)
                return
            c, r = val
            kind = "smoother" if "smoother" in name else "sampler" if "sampler" in name else "filter"
            general = "full recursion" in name
            key = (kind, general)
            if name.startswith("dynamax"):
                base.setdefault(kind, r)
            if name.startswith("probssm") and "parallel" not in name:
                seq.setdefault(key, r)
            vs_dx = f"{base[kind] / r:.2f}x" if kind in base and not name.startswith("dynamax") else "–"
            vs_seq = f"{r / seq[key]:.2f}x" if "parallel" in name and key in seq else "–"
            print(f"| {d} | {p} | {T} | {name} | {c:.2f} | {r:.4f} | {1e6 * r / T:.2f} | {vs_dx} | {vs_seq} |",
                  flush=True)

        row("dynamax filter", timed(lambda: dx_f(params, y).marginal_loglik))
        row("probssm filter", timed(lambda: ps.kalman.filter(model, y).log_likelihood))
        row("probssm parallel filter", timed(lambda: ps.kalman.filter(model, y, parallel=True).log_likelihood))
        row("dynamax smoother", timed(lambda: dx_s(params, y).smoothed_means))
        row("probssm smoother", timed(lambda: ps.kalman.smoother(model, y).smoothed_means))
        row("probssm parallel smoother", timed(lambda: ps.kalman.smoother(model, y, parallel=True).smoothed_means))
        row("probssm sampler (1 draw)", timed(sample_draw(model, y, False)))
        row("probssm parallel sampler (1 draw)", timed(sample_draw(model, y, True)))
        # the general forms (what a time-varying model or missing data runs), steady_state=False
        row("probssm filter, full recursion", timed(
            lambda: ps.kalman.filter(model, y, steady_state=False).log_likelihood))
        row("probssm parallel filter, full recursion", timed(
            lambda: ps.kalman.filter(model, y, parallel=True, steady_state=False).log_likelihood))
        row("probssm smoother, full recursion", timed(
            lambda: ps.kalman.smoother(model, y, steady_state=False).smoothed_means))
        row("probssm parallel smoother, full recursion", timed(
            lambda: ps.kalman.smoother(model, y, parallel=True, steady_state=False).smoothed_means))
        row("probssm sampler (1 draw), full recursion", timed(sample_draw(model, y, False, False)))
        row("probssm parallel sampler (1 draw), full recursion", timed(sample_draw(model, y, True, False)))
        if T <= 10_000:
            row("dynamax parallel filter", dynamax_parallel(d, p, T, limit))
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


def statsmodels_filter(model, y):
    """statsmodels' Kalman filter (Cython) on the same model: seconds per call, median of 3."""
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    d, p = model.state_dim, model.emission_dim
    kf = KalmanFilter(k_endog=p, k_states=d)
    kf.bind(np.ascontiguousarray(np.asarray(y)))
    kf.design = np.asarray(model.emission_matrix)
    kf.obs_cov = np.asarray(model.emission_cov)
    kf.transition = np.asarray(model.transition_matrix)
    kf.selection = np.eye(d)
    kf.state_cov = np.asarray(model.transition_cov)
    kf.initialize_known(np.asarray(model.initial_mean), np.asarray(model.initial_cov))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        kf.loglike()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def sweep(out_png):
    """Filter time per step against T (d = 4, p = 2) and against d (T = 1e4, p = d / 2): probssm
    (sequential and parallel), dynamax, statsmodels; writes a two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dynamax.linear_gaussian_ssm.inference import lgssm_filter as dx_filter

    dx_f = jax.jit(dx_filter)

    def measure(d, p, T):
        model, y = make_problem(d, p, T)
        params = dynamax_params(model)
        out = {
            "probssm": timed(lambda: ps.kalman.filter(model, y).log_likelihood, reps=3)[1],
            "probssm parallel": timed(lambda: ps.kalman.filter(model, y, parallel=True).log_likelihood, reps=3)[1],
            "dynamax": timed(lambda: dx_f(params, y).marginal_loglik, reps=3)[1],
            "statsmodels": statsmodels_filter(model, y),
        }
        return {k: 1e6 * v / T for k, v in out.items()}

    Ts = [1_000, 10_000, 100_000]
    ds = [2, 4, 8, 16, 32]
    by_T = [measure(4, 2, T) for T in Ts]
    by_d = [measure(d, max(1, d // 2), 10_000) for d in ds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"probssm": "o-", "probssm parallel": "s--", "dynamax": "^-", "statsmodels": "v-"}
    for name, style in styles.items():
        axes[0].plot(Ts, [r[name] for r in by_T], style, label=name)
        axes[1].plot(ds, [r[name] for r in by_d], style, label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="T (d = 4, p = 2)", ylabel="microseconds per step",
                title="Kalman filter: time per step against T")
    axes[1].set(xscale="log", yscale="log", xlabel="state dimension d (p = d / 2, T = 1e4)",
                ylabel="microseconds per step", title="against d")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[1].set_xticks(ds, [str(d) for d in ds])
    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    fig.suptitle(f"float64, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    print(f"\nwrote {out_png}")
    print("\n| d | T | " + " | ".join(styles) + " |  (us/step)")
    print("|---|---|" + "---|" * len(styles))
    for (d, T), r in zip([(4, T) for T in Ts] + [(d, 10_000) for d in ds], by_T + by_d):
        print(f"| {d} | {T} | " + " | ".join(f"{r[k]:.2f}" for k in styles) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="T = 1e3 only, no figure")
    parser.add_argument("--dynamax-parallel-limit", type=float, default=60.0,
                        help="seconds allowed to dynamax's parallel filter (compile + 4 runs)")
    parser.add_argument("--figure", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "kalman_time_per_step.png"))
    args = parser.parse_args()
    configs = [(4, 2, 1_000)] if args.quick else [(4, 2, 1_000), (4, 2, 100_000), (32, 16, 1_000),
                                                  (32, 16, 10_000), (32, 16, 100_000)]
    table(configs, args.dynamax_parallel_limit)
    if not args.quick:
        sweep(args.figure)


if __name__ == "__main__":
    main()
