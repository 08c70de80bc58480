# %% [markdown]
# # Single ion channel: open/shut dwell times of an aggregated Markov process
#
# A channel moves between shut (C) and open (O) states of a Markov jump process, but the patch-clamp
# record shows only whether it is open or shut, with the exact duration of every interval: an
# aggregated Markov process. `ps.ctmc.dwell_log_likelihood` evaluates the Colquhoun-Hawkes likelihood
# ``phi G_OS(t1) G_SO(t2) ...`` (``G_AB(t) = expm(Q_AA t) Q_AB``) and we fit a few candidate
# mechanisms by maximum likelihood (rates on the log scale, L-BFGS through
# `probssm.core.optim.maximize`), comparing them by AIC.
#
# **Data**: `hatton1.txt` (muscle nicotinic acetylcholine receptor, 50 nM ACh, DCPYPS sample
# "AChR H2003"; see `shared/data/mjp/README.md`): 14,056 idealised intervals (duration in ms,
# amplitude, flag). Intervals flagged "duration unusable" (flag bit 8, 449 shut intervals) are dropped
# by splitting the record there into segments; each segment starts in the equilibrium distribution of
# entry into its first class, and its last interval is complete (it ends by a transition).
#
# **Caveats.** No published rate constants exist for this file, so this is an example, not a
# reference test. Missed events are NOT corrected: intervals shorter than the resolution
# (tres = 25 us) are assumed all detected, so the fitted fast rates are biased (HJCFIT's exact
# missed-event likelihood is not implemented). At 50 nM the long shut intervals between activations
# also depend on the number of channels in the patch, which the mechanisms here ignore.
# `--data` (or the environment variable PROBSSM_HATTON1) overrides the path of the file.

# %%
import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import probssm as ps  # noqa: E402
from probssm.core import optim  # noqa: E402

START = time.time()
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
parser = argparse.ArgumentParser(description="open/shut dwell times of a single ion channel")
parser.add_argument("--data", default=os.environ.get("PROBSSM_HATTON1", os.path.join(HERE, "..", "..", "shared",
                                                                                      "data", "mjp", "hatton1.txt")))
parser.add_argument("--iters", type=int, default=45, help="L-BFGS steps per mechanism")
args, _ = parser.parse_known_args()
FIG_DIR = os.path.join(HERE, "figures")

# %% [markdown]
# ## Open and shut sequences
# Class 1 = open (amplitude != 0), class 0 = shut. Openings and shuttings alternate in the file.

# %%
raw = np.loadtxt(args.data)
duration, amplitude, flag = raw[:, 1], raw[:, 2], raw[:, 3].astype(int)
is_open = (amplitude != 0).astype(int)
unusable = (flag & 8) > 0
cuts = np.nonzero(unusable)[0]
segments = [s for s in np.split(np.arange(len(raw)), cuts) if len(s)]
segments = [s[~unusable[s]] for s in segments]
segments = [s for s in segments if len(s)]
times = [duration[s] for s in segments]
labels = [is_open[s] for s in segments]
n_intervals = sum(len(s) for s in segments)
print(f"{len(raw)} intervals, {unusable.sum()} unusable dropped: {len(segments)} segments, {n_intervals} intervals "
      f"({sum(int(c.sum()) for c in labels)} open), total {sum(t.sum() for t in times) / 1e3:.1f} s")
# Segments padded to a common length waste work on padding, so they are grouped by length into three
# padded batches (the log-likelihood is their sum).
order = np.argsort([len(t) for t in times])
batches = []
for group in np.array_split(order, [int(0.6 * len(order)), int(0.9 * len(order))]):
    lengths = np.array([len(times[b]) for b in group])
    T = np.zeros((len(group), lengths.max()))
    Cl = np.zeros((len(group), lengths.max()), int)
    for row, b in enumerate(group):
        T[row, :lengths[row]], Cl[row, :lengths[row]] = times[b], labels[b]
    batches.append((T, Cl, lengths))
print("padded batches:", [T.shape for T, _, _ in batches])

# %% [markdown]
# ## Candidate mechanisms
# Each is a list of reversible edges between named states; all are cycle-free, so they obey detailed
# balance whatever their rates and the fast "spectral" method applies (one symmetric
# eigendecomposition per class instead of a matrix exponential per interval). Rates per ms.

# %%
MECHANISMS = {
    "C-O": (["C1", "O1"], [("C1", "O1")]),
    "C-C-O": (["C2", "C1", "O1"], [("C2", "C1"), ("C1", "O1")]),
    "C-C-C-O, C2-O2": (["C3", "C2", "C1", "O1", "O2"], [("C3", "C2"), ("C2", "C1"), ("C1", "O1"), ("C2", "O2")]),
}


def build(names, edges, log_rates):
    K = len(names)
    idx = {n: i for i, n in enumerate(names)}
    pairs = [(idx[a], idx[b]) for a, b in edges] + [(idx[b], idx[a]) for a, b in edges]
    Q = jnp.zeros((K, K)).at[tuple(np.array(pairs).T)].set(jnp.exp(log_rates))
    proc = ps.models.MarkovJumpProcess(Q - jnp.diag(Q.sum(1)), jnp.full((K,), 1.0 / K))
    return proc, pairs


def start_rates(names, edges):
    # forward (toward the open state) and backward rates of a few per ms, slower further from it
    depth = {n: int(n[1]) for n in names}
    return np.log(np.array([2.0 / depth[a] if a[0] == "C" else 1.0 for a, b in edges]
                           + [2.0 if b[0] == "O" else 1.0 / depth[b] for a, b in edges]))


results = {}
for label, (names, edges) in MECHANISMS.items():
    classes = np.array([n.startswith("O") for n in names])
    proc0, pairs = build(names, edges, jnp.asarray(start_rates(names, edges)))

    def log_likelihood(model, classes=classes):
        return sum(ps.ctmc.dwell_log_likelihood(model, T, Cl, classes, lengths=n, method="spectral")
                   for T, Cl, n in batches)

    t0 = time.time()
    fit = eqx.filter_jit(lambda m, ll=log_likelihood: optim.maximize(
        m, ll, float(n_intervals), fixed=("initial_probs",), optimizer=optax.lbfgs(), num_iters=args.iters,
        show=False))
    fitted, history = fit(proc0)
    ll = float(log_likelihood(fitted))
    k = len(pairs)
    Q = np.asarray(fitted.generator())
    results[label] = dict(names=names, classes=classes, Q=Q, pairs=pairs, ll=ll, k=k, aic=2 * k - 2 * ll,
                          seconds=time.time() - t0, proc=fitted)

# %% [markdown]
# ## Fitted rates, log-likelihood and AIC

# %%
best = min(results, key=lambda m: results[m]["aic"])
print(f"\n{'mechanism':<16} {'k':>2} {'log-lik':>12} {'AIC':>12} {'dAIC':>8} {'fit s':>6}")
for label, r in results.items():
    print(f"{label:<16} {r['k']:>2} {r['ll']:>12.2f} {r['aic']:>12.2f} {r['aic'] - results[best]['aic']:>8.2f} "
          f"{r['seconds']:>6.1f}")
for label, r in results.items():
    rates = ", ".join(f"{r['names'][i]}->{r['names'][j]} {r['Q'][i, j]:.4g}" for i, j in r["pairs"])
    print(f"  {label}: {rates}  (per ms)")

# %% [markdown]
# ## Dwell-time histograms with the fitted densities
# Log-binned histograms (counts per bin of log10 t); a density f(t) predicts ``n f(t) t ln(10) dlog10t``
# per bin. The data's open / shut intervals include each segment's first and last.

# %%
os.makedirs(FIG_DIR, exist_ok=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
all_t, all_c = np.concatenate(times), np.concatenate(labels)
for ax, cls, title in ((axes[0], 1, "open"), (axes[1], 0, "shut")):
    x = all_t[all_c == cls]
    x = x[x > 0]
    edges_ = np.logspace(np.log10(x.min()), np.log10(x.max()), 45)
    ax.hist(x, bins=edges_, color="0.8", label=f"{len(x)} {title} intervals")
    grid = np.logspace(np.log10(x.min()), np.log10(x.max()), 300)
    width = np.diff(np.log10(edges_))[0]
    for label, r in results.items():
        f = np.asarray(ps.ctmc.dwell_time_density(r["proc"], grid, r["classes"], cls))
        ax.plot(grid, len(x) * f * grid * np.log(10) * width, lw=1.5 if label == best else 1.0,
                ls="-" if label == best else "--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"{title} time (ms)")
    ax.set_ylabel("intervals per bin")
    ax.set_title(f"{title} times (missed events not corrected)")
    ax.legend(fontsize=7)
fig.tight_layout()
path = os.path.join(FIG_DIR, "ion_channel.png")
fig.savefig(path, dpi=110)
print(f"\nbest by AIC: {best}; figure: {path}; wall time {time.time() - START:.1f} s")
