"""Gaussian-process log marginal likelihood and its gradient: probssm against tinygp and a dense
Cholesky GP, measured in the same run.

    python benchmarks/gp.py            # T = 1e3 .. 1e6 (about 5 minutes on 2 cores)
    python benchmarks/gp.py --quick    # T = 1e3, 1e4

Irregular sorted times (mean spacing 0.1, lengthscales 1 and 3), float64. Two kernels: Matérn-3/2
(state dim 2) and Matérn-3/2 + Matérn-1/2 (state dim 3; tinygp's quasiseparable ``Matern32 +
Exp``). Every GP is rebuilt from the log-hyperparameters (lengthscales, variances, noise) inside
the jitted function, so "lml + grad" is ``jax.jit(jax.value_and_grad(f))`` with respect to all of
them: what an optimiser calls per step. "compile" is the tracing, lowering and XLA compilation
jax reports during the first call; "run" is the median of the calls after it (at least 5, more
up to 50 until they add up to 0.5 s; 2 when the first call took over 3 s). The ratio column is
this row's run time over tinygp's for the same task (< 1: faster than tinygp).

The dense reference (numpy/scipy: ``cho_factor``, and for the gradient ``dpotri`` for K^-1 and
the trace identity d lml = 0.5 tr((a a^T - K^-1) dK)) runs where its matrices fit in ~8 GB
(T <= 1e4, and at 1e4 for Matérn-3/2 only, one call in a subprocess with a time limit,
--dense-limit; T = 1e5 would need 80 GB per matrix); its peak memory is numpy's, via tracemalloc.
The CVI row (T = 1e5 Poisson counts, Matérn-3/2 prior) times `probssm.inference.vi.fit` per
iteration when that module is present.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import scipy.linalg  # noqa: E402

import probssm as ps  # noqa: E402

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event, duration, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def timed(fn, reps=5):
    """(compile seconds from jax's events during the first call, median steady-state seconds).

    benchmarks/kalman.py's timer, except that a call slower than 3 s is repeated only twice:
    at T = 1e6 the sequential gradient alone takes seconds, and the table must fit in minutes."""
    _compile_seconds[0] = 0.0
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    compile_s = _compile_seconds[0]
    if first - compile_s > 3.0:
        reps = 2
    runs = []
    while len(runs) < reps or (sum(runs) < 0.5 and len(runs) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return compile_s, float(np.median(runs))


# ---------------------------------------------------------------------------------------------
# Problems and the three implementations of the same log marginal likelihood

#: log of (lengthscale, variance) per Matérn part, then the noise variance
KERNELS = {
    "Matérn-3/2": np.log([1.0, 1.0, 0.1]),
    "Matérn-3/2 + Matérn-1/2": np.log([1.0, 1.0, 3.0, 0.5, 0.1]),
}


def make_problem(T, seed=0):
    """Sorted uniform times on [0, T / 10] (irregular, mean spacing 0.1) and a smooth signal plus noise."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, T / 10.0, T))
    y = np.sin(t) + 0.5 * np.sin(0.3 * t) + 0.3 * rng.normal(size=T)
    return t, y


def probssm_lml(theta, t, y, parallel=False):
    h = jnp.exp(theta)
    kernel = ps.gp.Matern32(h[0], h[1])
    if theta.shape[0] == 5:
        kernel = kernel + ps.gp.Matern12(h[2], h[3])
    gp = ps.models.MarkovianGP(kernel, noise_variance=h[-1])
    return ps.gp.log_marginal_likelihood(gp, t, y, parallel=parallel)


def tinygp_lml(theta, t, y):
    from tinygp import GaussianProcess
    from tinygp.kernels import quasisep

    h = jnp.exp(theta)
    kernel = quasisep.Matern32(scale=h[0], sigma=jnp.sqrt(h[1]))
    if theta.shape[0] == 5:
        kernel = kernel + quasisep.Exp(scale=h[2], sigma=jnp.sqrt(h[3]))
    return GaussianProcess(kernel, t, diag=h[-1]).log_probability(y)


def _dense_parts(theta, tau, grad):
    """[(K_part, dK_part / d log lengthscale or None)] for each Matérn part, from the distances tau.

    In place wherever possible: at T = 1e4 every (T, T) temporary is 800 MB."""
    h = np.exp(theta)
    parts = []
    r = tau * (np.sqrt(3.0) / h[0])
    e = np.negative(r)
    np.exp(e, out=e)
    dl = None
    if grad:  # d/d log l of s^2 (1 + r) e^-r, with dr / d log l = -r: s^2 r^2 e^-r
        dl = r * r
        dl *= e
        dl *= h[1]
    r += 1.0
    r *= e
    r *= h[1]
    del e
    parts.append((r, dl))
    if theta.shape[0] == 5:
        u = tau / h[2]
        K2 = np.negative(u)
        np.exp(K2, out=K2)
        K2 *= h[3]
        dl2 = None
        if grad:  # d/d log l of s^2 e^-u, u = tau / l: s^2 u e^-u
            u *= K2
            dl2 = u
        del u
        parts.append((K2, dl2))
    return parts


def _symmetrize_lower(a, block=1024):
    """Copy the lower triangle of the square ``a`` onto its upper one, a block of rows at a time
    (no (T, T) temporary)."""
    n = a.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        a[i0:i1, i1:] = a[i1:, i0:i1].T
        d = a[i0:i1, i0:i1]
        d[...] = np.tril(d) + np.tril(d, -1).T


def dense_lml(theta, t, y, grad=False):
    """Dense Cholesky GP: the log marginal likelihood, and with ``grad`` its gradient w.r.t. theta."""
    T = t.shape[0]
    tau = np.abs(t[:, None] - t[None, :])
    parts = _dense_parts(theta, tau, grad)
    del tau
    # the parts are kept for the gradient; with one part and no gradient, factor it in place
    K = parts[0][0].copy() if (grad or len(parts) > 1) else parts[0][0]
    for Kp, _ in parts[1:]:
        K += Kp
    K[np.diag_indices(T)] += np.exp(theta[-1])
    c, low = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)
    alpha = scipy.linalg.cho_solve((c, low), y, check_finite=False)
    lml = -0.5 * y @ alpha - np.sum(np.log(np.diag(c))) - 0.5 * T * np.log(2.0 * np.pi)
    if not grad:
        return lml
    # K^-1 from the factor, in place; then d lml / d theta = 0.5 (a^T dK a - sum(K^-1 * dK))
    Kinv, info = scipy.linalg.lapack.dpotri(c, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotri failed (info {info})")
    _symmetrize_lower(Kinv)

    def half_trace(dK):
        return 0.5 * (alpha @ dK @ alpha - np.einsum("ij,ij->", Kinv, dK))

    g = []
    for Kp, dl in parts:
        g += [half_trace(dl), half_trace(Kp)]
    g.append(0.5 * np.exp(theta[-1]) * (alpha @ alpha - np.trace(Kinv)))
    return lml, np.array(g)


def dense_timed(fn, reps):
    """(value, median seconds, peak MB numpy allocated) of a numpy/scipy call; no compilation."""
    runs, peak = [], 0.0
    for _ in range(reps):
        tracemalloc.start()
        t0 = time.perf_counter()
        value = fn()
        runs.append(time.perf_counter() - t0)
        peak = max(peak, tracemalloc.get_traced_memory()[1] / 1e6)
        tracemalloc.stop()
    return value, float(np.median(runs)), peak


# ---------------------------------------------------------------------------------------------
# The table


DENSE_SNIPPET = """
import sys
sys.path.insert(0, {bench_dir!r})
from gp import KERNELS, dense_lml, dense_timed, make_problem
t, y = make_problem({T})
_, r, mb = dense_timed(lambda: dense_lml(KERNELS[{kname!r}], t, y, {grad}), 1)
print("RESULT", r, mb)
"""


def dense_subprocess(T, kname, grad, limit):
    """(seconds, peak MB) of one dense call in a child process, or (None, None) past ``limit``
    seconds: at T = 1e4 a call takes ~10 s on a quiet machine but minutes when BLAS threads
    compete with other work, and the table must not wait for it."""
    code = DENSE_SNIPPET.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), T=T, kname=kname, grad=grad)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            _, r, mb = line.split()
            return float(r), float(mb)
    return None, None


def table(Ts, dense_limit):
    print("| kernel | T | task | method | compile (s) | run (s) | us/point | run / tinygp run | note |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    agree = []
    fns = {
        ("lml", "probssm sequential"): jax.jit(probssm_lml),
        ("lml", "probssm parallel"): jax.jit(lambda th, t, y: probssm_lml(th, t, y, True)),
        ("lml", "tinygp quasisep"): jax.jit(tinygp_lml),
        ("lml + grad", "probssm sequential"): jax.jit(jax.value_and_grad(probssm_lml)),
        ("lml + grad", "probssm parallel"): jax.jit(jax.value_and_grad(lambda th, t, y: probssm_lml(th, t, y, True))),
        ("lml + grad", "tinygp quasisep"): jax.jit(jax.value_and_grad(tinygp_lml)),
    }
    for kname, theta_np in KERNELS.items():
        theta = jnp.asarray(theta_np)
        for T in Ts:
            t_np, y_np = make_problem(T)
            t, y = jnp.asarray(t_np), jnp.asarray(y_np)
            for task in ("lml", "lml + grad"):
                results, times = {}, {}
                # tinygp first, so that every probssm row can show its ratio
                for method in ("tinygp quasisep", "probssm sequential", "probssm parallel"):
                    f = fns[(task, method)]
                    c, r = timed(lambda: f(theta, t, y))
                    results[method] = jax.tree.map(np.asarray, f(theta, t, y))
                    times[method] = r
                    ratio = "–" if method.startswith("tinygp") else f"{r / times['tinygp quasisep']:.2f}"
                    print(f"| {kname} | {T:.0e} | {task} | {method} | {c:.2f} | {r:.4f} | {1e6 * r / T:.2f} | "
                          f"{ratio} | |", flush=True)
                # the dense GP at T = 1e4 takes tens of seconds a call: Matérn-3/2 only, once
                if T <= 1_000 or (T <= 10_000 and theta_np.shape[0] == 3):
                    grad = task != "lml"
                    reps = 3 if T <= 1_000 else 1
                    if T <= 1_000:
                        results["dense"], r, mb = dense_timed(lambda: dense_lml(theta_np, t_np, y_np, grad), reps)
                    else:
                        r, mb = dense_subprocess(T, kname, grad, dense_limit)
                    if r is None:
                        print(f"| {kname} | {T:.0e} | {task} | dense Cholesky (numpy/scipy) | – | – | – | – | "
                              f"did not finish within {dense_limit:.0f} s |", flush=True)
                    else:
                        print(f"| {kname} | {T:.0e} | {task} | dense Cholesky (numpy/scipy) | – | {r:.4f} | "
                              f"{1e6 * r / T:.2f} | {r / times['tinygp quasisep']:.2f} | peak {mb:.0f} MB |",
                              flush=True)
                elif T == 10_000:
                    print(f"| {kname} | {T:.0e} | {task} | dense Cholesky (numpy/scipy) | – | – | – | – | "
                          "skipped (time; see Matérn-3/2) |", flush=True)
                elif T == 100_000:
                    print(f"| {kname} | {T:.0e} | {task} | dense Cholesky (numpy/scipy) | – | – | – | – | "
                          f"skipped: {8 * T * T / 1e9:.0f} GB per matrix |", flush=True)
                ref = results["tinygp quasisep"]
                for method, val in results.items():
                    if val is None or method == "tinygp quasisep":
                        continue
                    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1.0 + np.abs(np.asarray(b)))))
                               for a, b in zip(jax.tree.leaves(val), jax.tree.leaves(ref)))
                    agree.append((kname, T, task, method, diff))
    worst = max(agree, key=lambda row: row[-1])
    print(f"\nlargest relative difference from tinygp over every row (value and gradient): {worst[-1]:.1e} "
          f"({worst[3]}, {worst[0]}, T = {worst[1]:.0e}, {worst[2]})")


def cvi(T=100_000, num_iters=10):
    """Time per CVI iteration on T Poisson counts with a Matérn-3/2 prior (log-rate)."""
    try:
        from probssm.inference import vi
    except ImportError:
        print("\nCVI (probssm.inference.vi): skipped (module not present)")
        return
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0.0, T / 10.0, T))
    rate = np.exp(0.5 + np.sin(0.2 * t) + 0.5 * np.sin(1.3 * t))
    counts = rng.poisson(rate).astype(float)[:, None]
    prior = ps.models.MarkovianGP(ps.gp.Matern32(lengthscale=2.0, variance=1.0), noise_variance=1.0)
    inputs = jnp.asarray(t[:, None])
    print("\n| task | T | method | compile (s) | run (s) | per iteration (s) | final ELBO |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for parallel in (False, True):
        def fit():
            return vi.fit(prior, vi.Poisson(), counts, num_iters, method="cvi", inputs=inputs,
                          parallel=parallel).elbo
        c, r = timed(fit, reps=3)
        name = "parallel" if parallel else "sequential"
        print(f"| CVI, Poisson counts, Matérn-3/2 prior | {T:.0e} | {name}, {num_iters} iterations | {c:.2f} | "
              f"{r:.3f} | {r / num_iters:.4f} | {float(fit()):.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="T = 1e3, 1e4 only, CVI at T = 1e4")
    parser.add_argument("--dense-limit", type=float, default=60.0,
                        help="seconds allowed to one dense-GP call at T = 1e4 (run in a subprocess)")
    args = parser.parse_args()
    start = time.perf_counter()
    table([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000], args.dense_limit)
    cvi(10_000 if args.quick else 100_000)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, {jax.device_count()} {jax.default_backend()} device(s)")


if __name__ == "__main__":
    main()
