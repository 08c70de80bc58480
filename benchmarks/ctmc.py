"""Markov jump processes: panel likelihood + gradient, EM iterations and Gillespie simulation, probssm
against a naive numpy/scipy loop measured in the same run.

    python benchmarks/ctmc.py            # K = 4, 8, 16 (about 2-3 minutes on 2 cores)
    python benchmarks/ctmc.py --quick    # K = 4

Panel: 600 subjects x 5 records, irregular times (intervals Exp(1), so all 2400 intervals are distinct
and each needs its own matrix exponential), a dense generator (all K (K - 1) rates free, drawn
U(0.1, 1) / K), states drawn exactly by `ps.ctmc.sample_at`. "lml + grad" is
``jax.jit(jax.value_and_grad(f))`` of `ps.ctmc.panel_log_likelihood` with respect to the log-rates
(what an optimiser calls per step); "EM iteration" is `ps.learn.em` (one compiled scan) per iteration;
"Gillespie" is `ps.ctmc.gillespie` vmapped over 10,000 keys on [0, 10] (buffer of 32 jumps, about
6 times the mean number; the truncated count is printed: the fixed-buffer scan always runs all 32 steps).

The naive baseline is the textbook Python loop: ``scipy.linalg.expm`` per interval and a forward
recursion per subject for the likelihood (its gradient would take K (K - 1) + 1 such evaluations by
finite differences; the row reports that multiple of the measured value time), and a numpy Gillespie
loop per path (timed on 500 paths, reported per path). "compile" is the tracing, lowering and XLA
compilation jax reports during the first call; "run" is the median of the later calls (at least 5, up
to 50 until they add up to 0.5 s). The ratio column is naive time / probssm time (> 1: probssm faster).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
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
    """(compile seconds from jax's events during the first call, median steady-state seconds)."""
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


def wall(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Problems
def make_problem(K, num_subjects=600, num_records=5, seed=0):
    rng = np.random.default_rng(seed)
    F = rng.uniform(0.1, 1.0, (K, K)) / K
    np.fill_diagonal(F, 0.0)
    proc = ps.models.MarkovJumpProcess(F - np.diag(F.sum(1)), np.ones(K) / K)
    times = np.cumsum(rng.exponential(1.0, (num_subjects, num_records)), axis=1)
    states = np.asarray(ps.ctmc.sample_at(jax.random.key(seed), proc, times))
    return proc, times, states


def naive_panel_ll(Q, times, states):
    """The textbook loop: one scipy expm per interval, a product of transition probabilities."""
    total = 0.0
    for t, s in zip(times, states):
        for j in range(1, len(t)):
            total += np.log(scipy.linalg.expm(Q * (t[j] - t[j - 1]))[s[j - 1], s[j]])
    return total


def naive_gillespie(rng, Q, t_max):
    K = Q.shape[0]
    z, t, n = rng.integers(K), 0.0, 0
    while True:
        rate = -Q[z, z]
        t += rng.exponential(1.0 / rate)
        if t > t_max:
            return n
        p = np.maximum(Q[z], 0.0)
        z = rng.choice(K, p=p / p.sum())
        n += 1


# ---------------------------------------------------------------------------------------------
def rows_for(K):
    proc, times, states = make_problem(K)
    Q = np.asarray(proc.generator())
    n_free = K * (K - 1)

    def f(log_rates):
        return ps.ctmc.panel_log_likelihood(eqx.tree_at(lambda m: m.rates, proc, jnp.exp(log_rates)), times, states)

    vg = jax.jit(jax.value_and_grad(f))
    x = jnp.log(proc.rates)
    c_vg, r_vg = timed(lambda: vg(x))
    value = float(vg(x)[0])
    v_naive, t_naive = wall(lambda: naive_panel_ll(Q, times, states))
    assert abs(v_naive - value) < 1e-8 * abs(value), (v_naive, value)
    out = [(K, "panel lml + grad (600 x 5)", "probssm (jit value_and_grad)", c_vg, r_vg, None),
           (K, "panel lml (600 x 5)", "naive scipy expm loop", None, t_naive, None),
           (K, "panel lml + grad (600 x 5)", f"naive, finite differences ({n_free + 1} evaluations)", None,
            (n_free + 1) * t_naive, (n_free + 1) * t_naive / r_vg)]
    start = ps.models.MarkovJumpProcess(np.where(Q > 0, 0.5 / K, 0.0) - np.diag(np.where(Q > 0, 0.5 / K, 0.0).sum(1)),
                                        np.ones(K) / K)
    ps.learn.em(start, (times, states), 20)  # compile
    (_, hist), t_em = wall(lambda: jax.block_until_ready(ps.learn.em(start, (times, states), 20)))
    out.append((K, "EM iteration (600 x 5)", "probssm ps.learn.em (20 iterations)", None, t_em / 20, None))
    num_paths, t_max, buf = 10_000, 10.0, 32  # about 5 jumps expected; the scan runs the whole buffer
    sim = jax.jit(jax.vmap(lambda k: ps.ctmc.gillespie(k, proc, t_max, buf)))
    keys = jax.random.split(jax.random.key(1), num_paths)
    c_g, r_g = timed(lambda: sim(keys))
    truncated = int(jnp.sum(sim(keys).truncated))
    rng = np.random.default_rng(1)
    _, t_ng = wall(lambda: [naive_gillespie(rng, Q, t_max) for _ in range(500)])
    per_path, naive_per_path = r_g / num_paths, t_ng / 500
    out.append((K, f"Gillespie path on [0, 10] (truncated {truncated}/{num_paths})", "probssm (vmap over 10,000 keys)",
                c_g, per_path, None))
    out.append((K, "Gillespie path on [0, 10]", "naive numpy loop (500 paths)", None, naive_per_path,
                naive_per_path / per_path))
    out[1] = out[1][:5] + (t_naive / r_vg,)  # value alone against value + gradient
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="K = 4 only")
    args = parser.parse_args()
    start = time.perf_counter()
    print("| K | task | method | compile (s) | run (s) | naive / probssm |")
    print("|---|---|---|---|---|---|", flush=True)
    for K in ((4,) if args.quick else (4, 8, 16)):
        for K_, task, method, c, r, ratio in rows_for(K):
            cs = "–" if c is None else f"{c:.2f}"
            rs = f"{r:.3g}"
            ratios = "–" if ratio is None else f"{ratio:.0f}"
            print(f"| {K_} | {task} | {method} | {cs} | {rs} | {ratios} |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, {jax.device_count()} {jax.default_backend()} device(s)")


if __name__ == "__main__":
    main()
