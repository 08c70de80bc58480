"""Particle engines against `particles` 0.3 on the stochastic-volatility model.

    python benchmarks/smc.py            # prints a markdown table

Bootstrap filter (systematic resampling, ESS threshold 0.5) at T = 1e3, N = 1e3 and 1e4 against
`particles.SMC` with a bootstrap Feynman-Kac model; PaRIS (Ñ = 2, accept-reject backward draws)
at N = 1e3 against our plain filter and against `particles`' PaRIS collector (same accept-reject
draws, pure Python; timed on the first 5 steps and scaled: its accept-reject has no fallback and can stall on an outlying particle); PaRIS cost in N
and T. Steady-state times are medians after a warm-up; ratios are measured in the same run.
float64 (jax x64), CPU.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import probssm as ps  # noqa: E402

MU, RHO, SIGMA = -1.02, 0.9702, 0.178
REPS = int(os.environ.get("BENCH_REPS", "5"))


def timed(fn, reps=REPS):
    """(median steady-state seconds, compile seconds = first call - steady state): at least
    ``reps`` calls after the first, more (up to 50) until they add up to 0.5 s, each with a new
    key (20 ms calls vary by +-15% from call to call; five of them gave a noisy median)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(0))
    first = time.perf_counter() - t0
    ts = []
    while len(ts) < reps or (sum(ts) < 0.5 and len(ts) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(len(ts) + 1))
        ts.append(time.perf_counter() - t0)
    run = float(np.median(ts))
    return run, max(first - run, 0.0)


def ours_filter(model, y, n):
    return lambda i: ps.smc.particle_filter(jax.random.PRNGKey(i), model, y, n, history=False).log_likelihood


FUNCTIONAL = ps.smc.AdditiveFunctional(initial=lambda z, yy, u: z, step=lambda zp, z, t, yy, u: z)


def ours_paris(model, y, n, backward="rejection"):
    return lambda i: ps.smc.paris(jax.random.PRNGKey(i), model, y, FUNCTIONAL, n, 2, backward=backward).estimate


def theirs(y, n, paris=False, reps=REPS):
    import particles
    from particles import collectors as col
    from particles import state_space_models as ssms

    class SV(ssms.StochVol):
        def add_func(self, t, xp, x):
            return x

        def upper_bound_log_pt(self, t):
            return -0.5 * np.log(2 * np.pi) - np.log(self.sigma)

    class ScalarQueue(col.rs.MultinomialQueue):  # col.Paris stores dequeue(1)'s 1-array in an int slot,
        def dequeue(self, k):                      # which numpy >= 2 refuses; hand it the scalar
            out = super().dequeue(k)
            return out[0] if k == 1 else out

    class Paris(col.Paris):  # particles 0.3's collector reads self.N, which it never sets
        def update(self, smc):
            self.N = smc.N
            queue, col.rs.MultinomialQueue = col.rs.MultinomialQueue, ScalarQueue
            try:
                super().update(smc)
            finally:
                col.rs.MultinomialQueue = queue

    class FK(ssms.Bootstrap):  # the Feynman-Kac model must expose the bound and the functional
        def upper_bound_log_pt(self, t):
            return self.ssm.upper_bound_log_pt(t)

        def add_func(self, t, xp, x):
            return x

    fk = FK(ssm=SV(mu=MU, rho=RHO, sigma=SIGMA), data=np.asarray(y[:, 0]))
    ts = []
    while len(ts) < reps or (sum(ts) < 0.5 and len(ts) < 50 and not paris):  # the same rule as `timed`
        np.random.seed(len(ts))
        alg = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=0.5,
                            collect=[Paris(Nparis=2)] if paris else [])
        t0 = time.perf_counter()
        alg.run()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    model = ps.models.StochasticVolatility(MU, RHO, SIGMA)
    _, y = ps.sample(jax.random.PRNGKey(0), model, 1000)
    rows = []
    for n in (1000, 10000):
        run, comp = timed(ours_filter(model, y, n))
        th = theirs(y, n)
        rows.append((f"bootstrap filter, T=1e3, N={n:.0e}", run, comp, th, th / run, "particles.SMC"))
    pf_run, _ = timed(ours_filter(model, y, 1000))
    for backward in ("mcmc", "rejection"):
        run, comp = timed(ours_paris(model, y, 1000, backward))
        rows.append((f"PaRIS Ñ=2 ({backward}), T=1e3, N=1e3 (vs our filter)", run, comp, pf_run, run / pf_run,
                     "ratio = PaRIS / filter"))
        pr_run, pr_comp = run, comp
    if os.environ.get("BENCH_PARTICLES_PARIS", "1") == "1":
        th = theirs(y[:5], 1000, paris=True, reps=1) * 200  # pure-Python PaRIS: T=5, scaled to T=1e3
        rows.append(("PaRIS Ñ=2 (rejection), T=1e3, N=1e3 (vs particles)", pr_run, pr_comp, th, th / pr_run,
                     "particles col.Paris, timed at T=5 x200"))
    print("| task | probssm run (s) | compile (s) | reference (s) | ratio | reference |")
    print("|---|---|---|---|---|---|")
    for name, run, comp, ref, ratio, what in rows:
        print(f"| {name} | {run:.3f} | {comp:.2f} | {ref:.3f} | {ratio:.2f}x | {what} |")

    print("\nPaRIS cost in N (Ñ=2, mcmc backward, T=1e3), seconds per run:\n")
    print("| N | 250 | 500 | 1000 | 2000 |")
    print("|---|---|---|---|---|")
    cells = [timed(ours_paris(model, y, n, "mcmc"), reps=3)[0] for n in (250, 500, 1000, 2000)]
    print("| seconds | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
