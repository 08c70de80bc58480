# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Brain states in the locust antennal lobe: HMM-GLMs on real spike trains
#
# Data: experiment locust20010214, tetrode B (Christophe Pouzat; sorted spike trains from the
# `zenodo-locust-datasets-analysis` repository, GPL-3). They are **read at run time** from a data
# directory (default `../shared/data/neural` next to the repository; `--data-dir` to change it),
# never copied into the package. Following the data README: units 1-7 only (8-10 are poorly
# isolated), spike times are in samples at 15 kHz, exact duplicates are dropped (`np.unique`),
# and trial k occupies [30 k, 30 k + 29) s.
#
# We bin the spikes of spontaneous-activity trials and odour (cis-3-hexen-1-ol) trials, fit
# HMM-GLMs with the three weight priors (plain, Gaussian, one-hot) to both kinds of trials
# together, and compare
#
# * held-out log-likelihood per bin (every 5th trial held out),
# * the state raster aligned to the trial, and state occupancy over trial time, spontaneous vs odour,
# * per-state connectivity matrices and the one-hot model's learned connectome.
#
# Figures go to `figures/`. Runs in well under 5 minutes on 2 CPU cores.

# %%
import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np

import probssm as ps
from probssm.learn.hmmglm_em import fit_hmmglm, hmmglm_log_likelihood, init_hmmglm, prune_links
from probssm.models import GaussianPrior, NoPrior, OneHotPrior

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "neural"
parser = argparse.ArgumentParser(description="HMM-GLM brain states on the locust antennal-lobe recordings")
parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                    help="folder holding locust20010214_spike_trains/ (default: %(default)s)")
parser.add_argument("--bin-ms", type=float, default=20.0, help="bin width in ms")
parser.add_argument("--states", type=int, default=3, help="number of hidden states K")
parser.add_argument("--iters", type=int, default=60, help="EM iterations")
parser.add_argument("--groups", nargs="+", default=["Spontaneous_1", "C3H_1"],
                    help="recording groups (Spontaneous_* are spontaneous, the others odour)")
parser.add_argument("--out", type=Path, default=Path("figures"))
args, _ = parser.parse_known_args()

UNITS = range(1, 8)
FS = 15000.0  # samples per second
TRIAL_PERIOD, TRIAL_LENGTH = 30.0, 29.0  # seconds


# %% Load and bin
def load_group(folder: Path, group: str, bin_s: float):
    """(trials, bins, 7) spike counts of units 1-7 of one recording group."""
    trains = []
    for u in UNITS:
        f = folder / f"locust20010214_{group}_tetB_u{u}.txt"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found; pass --data-dir (the folder holding "
                                    "locust20010214_spike_trains/)")
        trains.append(np.unique(np.loadtxt(f, ndmin=1)) / FS)  # de-duplicate, samples -> seconds
    num_trials = int(max(t.max() for t in trains) // TRIAL_PERIOD) + 1
    edges = np.arange(0.0, TRIAL_LENGTH + 1e-9, bin_s)
    counts = np.zeros((num_trials, len(edges) - 1, len(trains)))
    for n, t in enumerate(trains):
        trial = (t // TRIAL_PERIOD).astype(int)
        within = t - TRIAL_PERIOD * trial
        for k in range(num_trials):
            counts[k, :, n] = np.histogram(within[trial == k], edges)[0]
    return counts


folder = args.data_dir / "locust20010214_spike_trains"
bin_s = args.bin_ms / 1000.0
t0 = time.perf_counter()
data = {g: load_group(folder, g, bin_s) for g in args.groups}
spikes = np.concatenate([data[g] for g in args.groups])
kind = np.concatenate([np.full(len(data[g]), "spontaneous" if g.startswith("Spontaneous") else "odour")
                       for g in args.groups])
M, T, N = spikes.shape
test = np.arange(M) % 5 == 4
print(f"loaded {M} trials ({', '.join(f'{g}: {len(data[g])}' for g in args.groups)}) x {T} bins of "
      f"{args.bin_ms:g} ms x {N} units in {time.perf_counter() - t0:.1f} s; mean rate "
      f"{spikes.mean() / bin_s:.1f} Hz per unit, max count per bin {int(spikes.max())}")
for g in args.groups:
    print(f"  {g}: rates per unit (Hz) {np.round(data[g].mean((0, 1)) / bin_s, 1)}")

# %% Fit the three priors (all trials of both kinds together; every 5th trial held out)
K = args.states
fits, table = {}, []
for prior, prior_class in (("none", NoPrior), ("gaussian", GaussianPrior), ("onehot", OneHotPrior)):
    model = init_hmmglm(jax.random.PRNGKey(1), spikes[~test], K, prior=prior_class,
                        **({"sparsity": 3.0} if prior == "onehot" else {}))
    t = time.perf_counter()
    fitted, history = fit_hmmglm(model, spikes[~test], args.iters, key=jax.random.PRNGKey(2), batch_size=8000)
    if prior == "onehot":  # then charge each connection switched on its BIC price: weak spurious links turn off
        fitted, _ = prune_links(fitted, spikes[~test], 30, key=jax.random.PRNGKey(3), batch_size=8000)
    jax.block_until_ready(history)
    fit_s = time.perf_counter() - t
    ll = np.asarray(hmmglm_log_likelihood(fitted, spikes[test]))
    fits[prior] = fitted
    table.append((prior, ll.sum() / (test.sum() * T), fit_s, float(history[0]), float(history[-1])))
    print(f"{prior:9s} fitted in {fit_s:.1f} s", flush=True)

# a one-state GLM (no switching) as the reference
glm1 = init_hmmglm(jax.random.PRNGKey(1), spikes[~test], 1)
glm1, _ = fit_hmmglm(glm1, spikes[~test], args.iters, key=jax.random.PRNGKey(4), batch_size=8000)  # random mini-batches
ll1 = float(np.asarray(hmmglm_log_likelihood(glm1, spikes[test])).sum()) / (test.sum() * T)

print(f"\nK={K}, {args.bin_ms:g} ms bins, {int((~test).sum())} training / {int(test.sum())} held-out trials")
print("| model | held-out LL / bin | gain over 1-state GLM (nats / bin) | fit time (s) | train objective: start -> end |")
print("|---|---|---|---|---|")
print(f"| 1-state GLM | {ll1:.4f} | 0 | - | - |")
for prior, ll, fit_s, h0, h1 in table:
    print(f"| HMM-GLM, {prior} prior | {ll:.4f} | {ll - ll1:+.4f} | {fit_s:.1f} | {h0:.1f} -> {h1:.1f} |")

# %% States: spontaneous vs odour trials
model = fits["onehot"]
paths = np.asarray(ps.hmm.viterbi(model, spikes))  # (M, T)
post = np.asarray(ps.hmm.smoother(model, spikes).smoothed_probs)  # (M, T, K)
time_s = (np.arange(T) + 0.5) * bin_s
print("\nfraction of time in each state (one-hot model):")
for k_ in ("spontaneous", "odour"):
    occ = post[kind == k_].mean((0, 1))
    print(f"  {k_:12s} " + "  ".join(f"state {i}: {o:.2f}" for i, o in enumerate(occ)))
window = (time_s >= 10.0) & (time_s < 12.0)
for k_ in ("spontaneous", "odour"):
    occ = post[kind == k_][:, window].mean((0, 1))
    print(f"  {k_:12s} 10-12 s: " + "  ".join(f"state {i}: {o:.2f}" for i, o in enumerate(occ)))

# %% Figures
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap

os.makedirs(args.out, exist_ok=True)
cmap = ListedColormap(plt.get_cmap("tab10").colors[:K])

fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                         gridspec_kw=dict(height_ratios=[(kind == "spontaneous").sum(), (kind == "odour").sum(), 12]))
for ax, k_ in zip(axes[:2], ("spontaneous", "odour")):
    ax.imshow(paths[kind == k_], aspect="auto", cmap=cmap, vmin=-0.5, vmax=K - 0.5, interpolation="nearest",
              extent=(0, T * bin_s, (kind == k_).sum(), 0))
    ax.set_ylabel(f"{k_} trial")
    ax.set_title(f"Viterbi states (one-hot HMM-GLM, K={K}), {k_} trials")
for i in range(K):
    for k_, ls in (("spontaneous", "--"), ("odour", "-")):
        axes[2].plot(time_s, post[kind == k_, :, i].mean(0), ls, color=cmap(i), label=f"state {i}, {k_}")
axes[2].set_ylabel("P(state)")
axes[2].set_xlabel("time in trial (s)")
axes[2].legend(ncol=K, fontsize=7)
fig.tight_layout()
fig.savefig(args.out / "locust_state_raster.png", dpi=110)

fig, axes = plt.subplots(3, K, figsize=(3 * K, 8.5), squeeze=False)
for r, prior in enumerate(("none", "gaussian", "onehot")):
    W = np.asarray(fits[prior].coupling_weights("hard")).sum(-1)  # (K, N, N)
    lim = max(np.abs(W).max(), 1e-6)
    for k in range(K):
        im = axes[r, k].imshow(W[k], cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[r, k].set_title(f"{prior}: state {k}", fontsize=9)
        axes[r, k].set_xticks(range(N), [f"u{u}" for u in UNITS], fontsize=6)
        axes[r, k].set_yticks(range(N), [f"u{u}" for u in UNITS], fontsize=6)
    fig.colorbar(im, ax=axes[r].tolist(), shrink=0.8, label="w (post <- pre)")
fig.suptitle("per-state coupling weights (row: postsynaptic unit, column: presynaptic unit)")
fig.savefig(args.out / "locust_state_connectivity.png", dpi=110)

p = np.asarray(model.connectome_probs)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
im = axes[0].imshow(p[..., 2] - p[..., 0], cmap="RdBu_r", vmin=-1, vmax=1)
axes[0].set_title("shared prior p: p(exc) - p(inh)")
fig.colorbar(im, ax=axes[0])
axes[1].imshow(np.asarray(model.connectome()), cmap=ListedColormap(["tab:blue", "white", "tab:red"]), vmin=-1.5,
               vmax=1.5)
axes[1].set_title("connectome (state consensus): blue inh, red exc")
for ax in axes:
    ax.set_xticks(range(N), [f"u{u}" for u in UNITS])
    ax.set_yticks(range(N), [f"u{u}" for u in UNITS])
fig.tight_layout()
fig.savefig(args.out / "locust_connectome.png", dpi=110)
print(f"\nwrote {args.out}/locust_state_raster.png, locust_state_connectivity.png, locust_connectome.png")
