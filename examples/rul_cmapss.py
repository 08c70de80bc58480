# %% [markdown]
# # Remaining useful life of turbofan engines (C-MAPSS FD001) with an ARPHMM
#
# The autoregressive partially-hidden Markov model (Juesas, Ramasso, Drujont & Placet,
# PHME 2016) is an AR(P) HMM whose emission likelihoods are weighted by prior
# plausibilities pl_t(k): in training we know roughly where each engine is in its life,
# so each state is tied to a life segment ("crisp" priors); at test time nothing is known
# (pl = 1) and the model infers the degradation state from the health indicator.
#
# 1. **Health indicator (HI).** The ten informative FD001 sensors (s2, s3, s4, s7, s11,
#    s12, s15, s17, s20, s21: the ones that trend with wear; the others are constant or
#    flat in FD001) are standardised on the training set, then mapped to one number by a
#    least-squares fit of HI = 1 on the first 30 cycles of every training engine and
#    HI = 0 on its last 30. The HI falls from about 1 to about 0 over a life.
# 2. **ARPHMM.** Q = 6 degradation states, P = 7 lags, fitted by Baum-Welch on all 100
#    training engines at once (padded batch + lengths), with crisp plausibilities: state
#    k is the only plausible one on the k-th sixth of each engine's life.
# 3. **RUL.** For a test engine, posterior state paths (forward-filter backward-sample)
#    give the cycle s at which it entered its current state k. With six equal life
#    segments, that implies a life L of about 6 s / k, and still being in state k at the
#    last cycle n implies (k + 1) L / 6 > n. Both enter as soft (Gaussian) likelihoods on
#    L, with the training lives (kernel-smoothed) as the prior; RUL = L - n. The median
#    is the point prediction and the 5-95% quantiles the 90% predictive interval.
# 4. **Baselines** computed here too: a linear fit of the HI over the last 60 cycles,
#    extrapolated to the mean HI at failure (noisy HI, so early-life engines get wild
#    extrapolations: a weak baseline, kept because it is the textbook one); "mean training
#    life minus age"; and the usual data-driven baseline, a least-squares regression of the
#    RUL capped at 125 cycles on the standardised sensors, applied to the last cycle.
#
# Metrics on test_FD001 against RUL_FD001: RMSE, the PHM08 score
# (sum of exp(-d/13) - 1 for early and exp(d/10) - 1 for late predictions, d = predicted - true)
# and the coverage of the 90% intervals.

# %%
import os

import jax

jax.config.update("jax_enable_x64", True)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

import probssm as ps  # noqa: E402

SENSORS = [2, 3, 4, 7, 11, 12, 15, 17, 20, 21]
NUM_STATES, NUM_LAGS = 6, 7
NUM_PATHS = 400
data = ps.datasets.load_cmapss("FD001")
train_units = ps.datasets.split_units(data.train)
test_units = ps.datasets.split_units(data.test)
cols = [4 + s for s in SENSORS]  # column 5 is sensor 1
lives = np.array([len(u) for u in train_units])

# %% [markdown]
# ## Health indicator

# %%
X_all = np.concatenate([u[:, cols] for u in train_units])
mean, std = X_all.mean(0), X_all.std(0)
X = np.concatenate([np.r_[u[:30, cols], u[-30:, cols]] for u in train_units])
target = np.concatenate([np.r_[np.ones(30), np.zeros(30)] for _ in train_units])
design = np.c_[(X - mean) / std, np.ones(len(X))]
hi_weights = np.linalg.lstsq(design, target, rcond=None)[0]


def health_indicator(unit):
    return np.c_[(unit[:, cols] - mean) / std, np.ones(len(unit))] @ hi_weights


hi_train = [health_indicator(u) for u in train_units]
hi_test = [health_indicator(u) for u in test_units]
hi_fail = np.mean([h[-5:].mean() for h in hi_train])


def pad(seqs):
    lengths = np.array([len(s) for s in seqs])
    out = np.zeros((len(seqs), lengths.max(), 1))
    for i, s in enumerate(seqs):
        out[i, : len(s), 0] = s
    return out, lengths


# %% [markdown]
# ## ARPHMM fit with crisp priors on six equal life segments

# %%
y_train, n_train = pad(hi_train)
pl_train = np.ones(y_train.shape[:2] + (NUM_STATES,))
for i, n in enumerate(n_train):
    segment = np.minimum(np.arange(n) * NUM_STATES // n, NUM_STATES - 1)
    pl_train[i, :n] = 0.0
    pl_train[i, np.arange(n), segment] = 1.0

A0 = 0.9 * np.eye(NUM_STATES) + 0.1 * np.eye(NUM_STATES, k=1)
A0[-1, -1] = 1.0
init = ps.models.ARHMM(np.full(NUM_STATES, 1.0 / NUM_STATES), A0, np.zeros((NUM_STATES, 1, NUM_LAGS)),
                       np.zeros((NUM_STATES, 1)), np.full((NUM_STATES, 1, 1), 0.05))
arphmm, history = ps.learn.em(init, y_train, 30, lengths=n_train, plausibility=pl_train, tol=1e-4)
print(f"Baum-Welch: log-likelihood {float(history[0]):.1f} -> {float(history[-1]):.1f}")
print("stay probabilities:", np.round(np.diag(np.asarray(arphmm.transition_matrix)), 4))

# %% [markdown]
# ## RUL from posterior state paths

# %%
y_test, n_test = pad(hi_test)
paths = np.asarray(ps.hmm.sample(jax.random.PRNGKey(0), arphmm, y_test, NUM_PATHS, lengths=n_test))
posterior = ps.hmm.smoother(arphmm, y_test, lengths=n_test)

grid = np.arange(100, 551, dtype=float)  # candidate lives
prior = norm.pdf((grid[:, None] - lives[None]) / 12.0).sum(1)
log_prior = np.log(prior / prior.sum())
rng = np.random.default_rng(0)


def rul_samples(z, n):
    """RUL draws for one engine from its posterior state paths z (S, n)."""
    k = z[:, -1][:, None]
    entry = np.argmax(z == k, axis=1)[:, None].astype(float)
    L = grid[None]
    sigma = 0.1 * L / NUM_STATES + 3.0
    logw = (log_prior[None]
            + np.where(k > 0, norm.logpdf(entry, k * L / NUM_STATES, sigma), 0.0)
            + norm.logcdf(((k + 1) * L / NUM_STATES - n) / sigma))
    w = np.exp(logw - logw.max(1, keepdims=True))
    cdf = np.cumsum(w / w.sum(1, keepdims=True), 1)
    life = grid[np.minimum((cdf < rng.uniform(size=(len(z), 1))).sum(1), len(grid) - 1)]
    return np.maximum(life - n, 0.0)


draws = [rul_samples(paths[i, :, :n], n) for i, n in enumerate(n_test)]
pred = np.array([np.median(d) for d in draws])
lower = np.array([np.quantile(d, 0.05) for d in draws])
upper = np.array([np.quantile(d, 0.95) for d in draws])

# %% [markdown]
# ## Baselines and metrics

# %%
def linear_baseline(h):
    n = len(h)
    m = min(n, 60)
    slope, intercept = np.polyfit(np.arange(n - m, n), h[-m:], 1)
    rul = (hi_fail - intercept) / slope - (n - 1) if slope < 0 else lives.mean() - n
    return float(np.clip(rul, 0.0, max(lives.max() - n, 0.0)))


baseline = np.array([linear_baseline(h) for h in hi_test])
mean_life = np.maximum(lives.mean() - n_test, 0.0)
rows = np.concatenate([np.c_[(u[:, cols] - mean) / std, np.ones(len(u))] for u in train_units])
capped = np.concatenate([np.minimum(np.arange(len(u))[::-1], 125.0) for u in train_units])
reg_weights = np.linalg.lstsq(rows, capped, rcond=None)[0]
regression = np.array([np.maximum(np.r_[(u[-1, cols] - mean) / std, 1.0] @ reg_weights, 0.0) for u in test_units])
true = data.test_rul.astype(float)


def rmse(p):
    return float(np.sqrt(np.mean((p - true) ** 2)))


def phm08(p):
    d = p - true
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


coverage = float(np.mean((true >= lower) & (true <= upper)))
print()
print("| method | RMSE | PHM08 score | 90% interval coverage |")
print("|---|---|---|---|")
print(f"| ARPHMM (Q=6, P=7) | {rmse(pred):.1f} | {phm08(pred):.0f} | {coverage:.2f} "
      f"(mean width {np.mean(upper - lower):.0f} cycles) |")
print(f"| linear HI extrapolation | {rmse(baseline):.1f} | {phm08(baseline):.3g} | - |")
print(f"| mean training life - age | {rmse(mean_life):.1f} | {phm08(mean_life):.3g} | - |")
print(f"| linear regression of capped RUL on sensors | {rmse(regression):.1f} | {phm08(regression):.3g} | - |")

# %% [markdown]
# ## Plots

# %%
os.makedirs("figures", exist_ok=True)
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
unit = int(np.argmax(n_test))
n = n_test[unit]
ax = axes[0]
ax.plot(np.arange(1, n + 1), hi_test[unit], color="k", lw=0.8, label="health indicator")
ax2 = ax.twinx()
probs = np.asarray(posterior.smoothed_probs[unit, :n])
ax2.stackplot(np.arange(1, n + 1), probs.T, alpha=0.3, labels=[f"state {k}" for k in range(NUM_STATES)])
ax2.set_ylim(0, 1)
ax2.set_ylabel("p(state | HI)")
ax.set_xlabel("cycle")
ax.set_title(f"test engine {unit + 1}: HI and state posterior")
ax2.legend(loc="lower left", fontsize=7, ncol=3)
ax = axes[1]
order = np.argsort(true)
ax.errorbar(np.arange(len(true)), pred[order], yerr=[pred[order] - lower[order], upper[order] - pred[order]],
            fmt="o", ms=3, lw=0.6, label="ARPHMM median, 90% interval")
ax.plot(np.arange(len(true)), true[order], "k.", label="true RUL")
ax.set_xlabel("test engine (sorted by true RUL)")
ax.set_ylabel("RUL (cycles)")
ax.legend()
fig.tight_layout()
fig.savefig("figures/rul_cmapss.png", dpi=120)
print("wrote figures/rul_cmapss.png")
