# %% [markdown]
# # Remaining useful life of turbofan engines (C-MAPSS FD001-FD004): ARPHMM and ARP-HSMM
#
# Two degradation models on one health indicator, with the remaining useful life (RUL) as an
# exact posterior predictive (`ps.prognostics.rul`: the first-passage distribution into the
# absorbing failure state from the filtered state), against two data-driven baselines.
#
# 1. **Health indicator (HI).** Fourteen sensors (s2, s3, s4, s7, s8, s9, s11, s12, s13, s14,
#    s15, s17, s20, s21), z-scored per operating regime (`normalize_conditions=True`: six
#    regimes in FD002/FD004, a plain z-score in FD001/FD003), mapped to one number by a
#    least-squares regression of the RUL capped at 130 cycles, divided by 130 (so HI ~ 1
#    healthy, ~ 0 at failure). Fitted on training engines only.
# 2. **States tied to RUL windows.** A left-to-right chain of 10-cycle RUL windows covering the
#    longest training life (..., [120, 130), ..., [0, 10)), ending in an absorbing *failure*
#    state entered the cycle after the last one (one missing cycle is appended to each training
#    engine, in the failure state, so the exit of the last window is observed). In training every cycle's
#    window is known, so the plausibilities are crisp (the ARPHMM device: pl_t(k) = 1 on the
#    known state, 0 elsewhere); at test time pl = 1.
# 3. **ARPHMM**: `ps.models.HMM` with AR(1) Gaussian emissions per state, geometric sojourns.
#    **ARP-HSMM**: `ps.models.HSMM` with the same emissions and non-parametric durations over
#    D = 10 cells per state (K * D = 10 * ceil(longest training life / 10) + 10 expanded states:
#    the expanded state is the RUL itself). Both fitted by EM (`ps.learn.em`, the duration
#    pmfs, jumps, initial window and emissions) with the crisp plausibilities. The initial
#    window is the life prior (smoothed over 2 windows); the windows with RUL >= 130, where the
#    HI is flat by construction, share one emission.
# 4. **RUL.** tau = first step in the failure state after the last observed cycle n; since the
#    failure state starts the cycle after the last cycle of life, RUL = tau - 1. The 50% and 90%
#    central intervals come from `ps.prognostics.intervals`, shifted by the same 1. Two point
#    predictions are reported: the posterior median of the RUL, and the posterior mean of the
#    capped RUL, E[min(RUL, 125) | history] (the Bayes estimate under squared error of the target
#    the sensor regression predicts, so the two are compared like with like: above ~125 cycles
#    the sensors carry no information on the RUL, which is why the C-MAPSS literature predicts
#    the capped target).
# 5. **Calibration on training data only.** The training engines are split 80/20; models are
#    fitted on the 80%, and each validation engine is cut 5 times, at lengths drawn from the
#    observed lengths of the test engines (inputs only, the test RULs are never read; the cuts
#    then see histories as long as the test ones). Two settings are chosen on these cuts, by
#    bringing the coverage of the 50% and 90% intervals nearest their nominal levels: the
#    emission variances are inflated by a factor c (the HI errors are
#    autocorrelated and engine-specific, which a per-state AR(1) under-states, so the raw
#    posteriors are over-confident), and only the last 15, 30 or 60 cycles enter as evidence
#    (older ones are treated as missing, exactly), which keeps an engine's persistent offset
#    from accumulating over a long history. The models are then refitted on all training
#    engines. The test RULs are used for scoring only.
# 6. **Baselines**, computed in the same script: the sensor regression (least squares of the RUL
#    capped at 125 on the same normalised sensors, applied at the last cycle, clipped at 0), and
#    a similarity baseline: the last min(n, 60) HI values of a test engine are slid along every
#    training engine's HI; the 10 training engines with the smallest squared distance at their
#    best offset give RUL candidates (their cycles left after the matched window), whose median is
#    the prediction and whose 5-95% (25-75%) spread is the interval.
#
# Metrics on the test set against RUL_FD00x: RMSE, the PHM08 score (sum of exp(-d/13) - 1 for
# early and exp(d/10) - 1 for late predictions, d = predicted - true), coverage of the 50% and 90%
# intervals, and their mean width. `python examples/rul_cmapss.py` runs FD001 (the `make demo`
# default); `--all` (or `--subsets FD001 FD002 FD003 FD004`) runs the four subsets, FD002-FD004
# read from `--data-dir` (default `../shared/data/cmapss`, NASA's files, plain or gzipped).

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

import probssm as ps  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--subsets", nargs="+", default=["FD001"], choices=["FD001", "FD002", "FD003", "FD004"])
parser.add_argument("--all", action="store_true", help="run FD001-FD004")
parser.add_argument("--data-dir", default=os.environ.get("CMAPSS_DIR", os.path.join(HERE, "..", "..", "shared", "data",
                                                                                    "cmapss")))
args, _ = parser.parse_known_args()
SUBSETS = ["FD001", "FD002", "FD003", "FD004"] if args.all else args.subsets

SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
COLS = [4 + s for s in SENSORS]  # column 5 is sensor 1
HI_CAP, WINDOW = 130, 10
PRIOR_BANDWIDTH = 2.0  # windows: the kernel that smooths the initial-window (life) distribution
NUM_LAGS = 1
EM_ITERS = 3
BASELINE_CYCLES = 10
INFLATION = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
RUL_CAP = 125  # the capped target of the regression baseline and of the capped-mean prediction
MEMORY = (15, 30, 60)  # cycles of evidence
LEVELS = (0.5, 0.9)
FIG_DIR = os.path.join(HERE, "figures")


# %% [markdown]
# ## Building blocks

# %%
def labels(n, J):
    """Crisp state of each cycle of an engine that fails at its last cycle n - 1: state
    k = J - 1 - RUL // WINDOW for J windows (k = 0 the oldest), the failure state is J."""
    rul = np.arange(n)[::-1]
    return J - 1 - rul // WINDOW


def sensors(unit):
    return unit[:, COLS]


def sensors_and_drift(unit):
    """Sensors and their drift from the engine's own first BASELINE_CYCLES cycles (every engine,
    test ones included, starts healthy at cycle 1; the drift removes its manufacturing offset)."""
    x = unit[:, COLS]
    return np.c_[x, x - x[:BASELINE_CYCLES].mean(0)]


def fit_regression(units, cap, features):
    X = np.concatenate([np.c_[features(u), np.ones(len(u))] for u in units])
    y = np.concatenate([np.minimum(np.arange(len(u))[::-1], cap) for u in units])
    return np.linalg.lstsq(X, y, rcond=None)[0]


def apply_regression(w, unit, features=None):
    return np.c_[(features or sensors_and_drift)(unit), np.ones(len(unit))] @ w


def pad(seqs, T=None):
    lengths = np.array([len(s) for s in seqs])
    out = np.zeros((len(seqs), T or lengths.max(), 1))
    for i, s in enumerate(seqs):
        out[i, : len(s), 0] = s
    return out, lengths


def with_failure_step(seqs):
    """Append one missing (NaN) cycle to each run-to-failure HI: the step at which the engine is in
    the failure state. It makes the last window's exit, and so its duration, observed."""
    return [np.r_[h, np.nan] for h in seqs]


def crisp_plausibility(lengths, T, J):
    """pl_t(k) = 1 on the known state: the window of each cycle, then the failure state."""
    pl = np.ones((len(lengths), T, J + 1))
    for i, n in enumerate(lengths):
        pl[i, :n] = np.eye(J + 1)[np.r_[labels(n - 1, J), J]]
    return pl


def initial_models(hi, lengths, J):
    """Starting points: emission means per state from the labels, uniform durations."""
    K = J + 1
    lab = np.concatenate([labels(n, J) for n in lengths])
    vals = np.concatenate(hi)
    bias = np.array([vals[lab == k].mean() if np.any(lab == k) else vals.max() for k in range(K)])
    bias[J] = bias[J - 1]
    weights = np.zeros((K, 1, NUM_LAGS))
    covs = np.full((K, 1, 1), np.var(vals))
    pi = np.r_[np.ones(J) / J, 0.0]
    stay = (1 - 1 / WINDOW) * np.eye(K) + np.eye(K, k=1) / WINDOW
    stay[J, J] = 1.0
    if NUM_LAGS:
        emissions = ps.emissions.AutoregressiveGaussian(weights, bias[:, None], covs)
    else:
        emissions = ps.emissions.Gaussian(bias[:, None], covs)
    arphmm = ps.models.HMM(pi, stay, emissions)
    durations = ps.models.NonParametricDuration(np.ones((K, WINDOW)) / WINDOW)
    hsmm = ps.models.HSMM(pi, ps.models.left_to_right(K), durations, emissions)
    return {"ARPHMM": arphmm, "ARP-HSMM": hsmm}


def tie_and_smooth(m, J):
    """After EM: (i) the windows with RUL >= HI_CAP, where the HI is flat by construction, share
    the emission of the youngest of them (estimated from every engine; the oldest windows see
    only the longest-lived engines), and so does the never-observed failure state with the last
    window; (ii) the initial-window probabilities (the training life distribution) are smoothed
    by a Gaussian kernel of PRIOR_BANDWIDTH windows, as 80-260 engines leave gaps."""
    healthy = J - 1 - HI_CAP // WINDOW  # the window [HI_CAP, HI_CAP + WINDOW)
    src = np.r_[np.full(healthy, healthy), np.arange(healthy, J), J - 1]
    m = eqx.tree_at(lambda mm: mm.emissions, m, jax.tree_util.tree_map(lambda x: x[src], m.emissions))
    k = np.arange(J + 1)
    kernel = np.exp(-0.5 * ((k[:, None] - k[None]) / PRIOR_BANDWIDTH) ** 2)
    kernel[:, J] = kernel[J, :] = 0.0
    pi = np.asarray(m.initial_probs) @ kernel
    return eqx.tree_at(lambda mm: mm.initial_probs, m, jnp.asarray(pi / pi.sum()))


def fit_models(units, J):
    """HI regression and both state-space models on a set of run-to-failure engines."""
    w = fit_regression(units, HI_CAP, sensors_and_drift)
    hi = [apply_regression(w, u) / HI_CAP for u in units]
    y, n = pad(with_failure_step(hi))
    pl = crisp_plausibility(n, y.shape[1], J)
    fitted = {}
    for name, model in initial_models(hi, n - 1, J).items():
        # crisp plausibilities fix the state path: EM is at its fixed point after the first step
        m, history = ps.learn.em(model, y, EM_ITERS, lengths=n, plausibility=pl)
        fitted[name] = tie_and_smooth(m, J)
        print(f"  {name}: EM log-likelihood {float(history[0]):.1f} -> {float(history[-1]):.1f}")
    return w, fitted


def inflate(model, c):
    return eqx.tree_at(lambda m: m.emissions.covs, model, model.emissions.covs * c)


def capped_mean(pmf, cap=RUL_CAP):
    """Posterior mean of min(RUL, cap) from the RUL pmf over 0, 1, ..."""
    return pmf @ np.minimum(np.arange(pmf.shape[1]), cap) / pmf.sum(1)


def predict(model, hi_seqs, horizon, memory=None):
    """Median RUL and central intervals (RUL = tau - 1), and the RUL pmf over 0..horizon - 1.
    ``memory``: only the last ``memory`` cycles enter as evidence (older ones are missing)."""
    y, n = pad(hi_seqs)
    if memory is not None:
        old = np.arange(y.shape[1])[None] < (n - memory)[:, None]
        y[old] = np.nan
    r = ps.prognostics.rul(model, y, lengths=n, max_horizon=horizon)
    iv = np.asarray(ps.prognostics.intervals(r, LEVELS)) - 1.0
    return np.asarray(r.median) - 1.0, np.maximum(iv, 0.0), np.asarray(r.pmf)[:, 1:]


def similarity(hi_train, hi_seqs, neighbours=10, window=60):
    """Median and quantile spread of the RULs of the best-matching training trajectories."""
    pred, iv = [], np.zeros((len(LEVELS), len(hi_seqs), 2))
    for i, h in enumerate(hi_seqs):
        m = min(len(h), window)
        q = h[-m:]
        cand, dist = [], []
        for g in hi_train:
            if len(g) < m:
                continue
            win = np.lib.stride_tricks.sliding_window_view(g, m)
            sse = ((win - q) ** 2).sum(1)
            e = int(np.argmin(sse))
            cand.append(len(g) - (e + m))  # cycles left after the matched window's last cycle
            dist.append(sse[e])
        best = np.asarray(cand, float)[np.argsort(dist)[:neighbours]]
        pred.append(np.median(best))
        for j, lv in enumerate(LEVELS):
            iv[j, i] = np.quantile(best, [(1 - lv) / 2, (1 + lv) / 2])
    return np.array(pred), iv


def validation_cuts(units, lengths, rng, cuts=5):
    """Cut each run-to-failure engine ``cuts`` times, at history lengths drawn from ``lengths``
    (those the engine outlives by at least 5 cycles); the truth is the cycles left."""
    seqs, truth = [], []
    for u in units:
        n = len(u)
        allowed = lengths[lengths <= n - 5]
        for m in rng.choice(allowed if len(allowed) else np.array([n // 2]), size=cuts):
            seqs.append(u[:m])
            truth.append(n - m)
    return seqs, np.array(truth, float)


def scores(pred, truth, iv=None):
    row = {"RMSE": float(ps.prognostics.rmse(pred, truth)), "PHM08": float(ps.prognostics.phm08_score(pred, truth))}
    if iv is not None:
        cov = np.asarray(ps.prognostics.coverage(iv, truth))
        row.update(cov50=float(cov[0]), cov90=float(cov[1]), width90=float(np.mean(iv[1, :, 1] - iv[1, :, 0])))
    return row


# %% [markdown]
# ## One subset: calibrate on a validation split, refit, score on the test engines

# %%
def run_subset(subset):
    t0 = time.time()
    data = ps.datasets.load_cmapss(subset, None if subset == "FD001" else args.data_dir, normalize_conditions=True)
    train_units = ps.datasets.split_units(data.train)
    test_units = ps.datasets.split_units(data.test)
    truth = data.test_rul.astype(float)
    horizon = int(max(len(u) for u in train_units)) + 50
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(train_units))
    n_val = len(train_units) // 5
    fit_units = [train_units[i] for i in perm[n_val:]]
    val_units = [train_units[i] for i in perm[:n_val]]
    print(f"{subset}: {len(train_units)} training engines ({len(fit_units)} fit / {len(val_units)} validation), "
          f"{len(test_units)} test engines")

    # calibration of the variance inflation on the validation engines
    J = -(-max(len(u) for u in train_units) // WINDOW)  # windows covering the longest training life
    w, models = fit_models(fit_units, J)
    val_seqs, val_truth = validation_cuts(val_units, np.array([len(u) for u in test_units]), rng)
    val_hi = [apply_regression(w, u) / HI_CAP for u in val_seqs]
    chosen = {}
    for name, model in models.items():
        best = None
        for memory in MEMORY:
            for c in INFLATION:
                _, iv, _ = predict(inflate(model, c), val_hi, horizon, memory)
                cov = np.asarray(ps.prognostics.coverage(iv, val_truth))
                miss = abs(cov[0] - 0.5) + abs(cov[1] - 0.9)
                if best is None or miss < best[0] - 1e-9:
                    best = (miss, (memory, c), cov)
        chosen[name] = best[1]
        print(f"  {name}: memory {best[1][0]} cycles, variance inflation c = {best[1][1]:g} (validation coverage "
              f"50%: {best[2][0]:.2f}, 90%: {best[2][1]:.2f})")

    # refit on all training engines, score on the test set
    w, models = fit_models(train_units, J)
    hi_train = [apply_regression(w, u) / HI_CAP for u in train_units]
    hi_test = [apply_regression(w, u) / HI_CAP for u in test_units]
    rows, preds = {}, {}
    for name, model in models.items():
        memory, c = chosen[name]
        pred, iv, pmf = predict(inflate(model, c), hi_test, horizon, memory)
        rows[f"{name} (last {memory} cycles, c = {c:g}), median RUL"] = scores(pred, truth, iv)
        rows[f"{name} (last {memory} cycles, c = {c:g}), mean of min(RUL, {RUL_CAP})"] = scores(
            capped_mean(pmf), truth, iv)
        preds[name] = (pred, iv, pmf)
    sim_pred, sim_iv = similarity(hi_train, hi_test)
    rows["HI similarity (10 nearest training engines)"] = scores(sim_pred, truth, sim_iv)
    w125 = fit_regression(train_units, RUL_CAP, sensors)
    reg = np.array([max(apply_regression(w125, u, sensors)[-1], 0.0) for u in test_units])
    rows[f"linear regression of capped RUL ({RUL_CAP}) on sensors"] = scores(reg, truth)
    # the HI itself read as a RUL at the last cycle: what the state-space models add over it
    rows["HI at the last cycle (x 130)"] = scores(np.array([max(h[-1] * HI_CAP, 0.0) for h in hi_test]), truth)

    print(f"\n{subset} ({len(test_units)} test engines, {time.time() - t0:.0f} s)\n")
    print("| method | RMSE | PHM08 | 50% coverage | 90% coverage | mean 90% width |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        cov = (f"{r['cov50']:.2f} | {r['cov90']:.2f} | {r['width90']:.0f}" if "cov50" in r else "- | - | -")
        print(f"| {name} | {r['RMSE']:.1f} | {r['PHM08']:.3g} | {cov} |")
    print()
    plot(subset, truth, preds, hi_test)
    return rows


# %% [markdown]
# ## Calibration figure: PIT histograms and predicted vs true RUL with 90% intervals

# %%
def plot(subset, truth, preds, hi_test):
    os.makedirs(FIG_DIR, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    key = jax.random.PRNGKey(0)
    ax = axes[0]
    for name, (_, _, pmf) in preds.items():
        u = np.asarray(ps.prognostics.pit(jnp.asarray(pmf), jnp.asarray(truth.astype(int)), key))
        ax.hist(u, bins=10, range=(0, 1), histtype="step", lw=1.5, label=name)
    ax.axhline(len(truth) / 10, color="k", ls=":", lw=1, label="uniform (calibrated)")
    ax.set_xlabel("randomised PIT of the true RUL")
    ax.set_title(f"{subset}: PIT histogram")
    ax.legend(fontsize=8)
    order = np.argsort(truth)
    for ax, name in zip(axes[1:], preds):
        pred, iv, _ = preds[name]
        x = np.arange(len(truth))
        ax.fill_between(x, iv[1, order, 0], iv[1, order, 1], color="C0", alpha=0.25, step="mid", label="90% interval")
        ax.fill_between(x, iv[0, order, 0], iv[0, order, 1], color="C0", alpha=0.4, step="mid", label="50% interval")
        ax.plot(x, pred[order], "C0.", ms=4, label="median")
        ax.plot(x, truth[order], "k.", ms=3, label="true RUL")
        ax.set_xlabel("test engine (sorted by true RUL)")
        ax.set_ylabel("RUL (cycles)")
        ax.set_title(f"{subset}: {name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(FIG_DIR, f"rul_cmapss_{subset}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")


# %%
results = {s: run_subset(s) for s in SUBSETS}
