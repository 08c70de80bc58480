# %% [markdown]
# # Heart-transplant panel data: a multi-state model with exact death times and misclassification
#
# The `cav` data of the R package msm: 622 heart-transplant recipients examined by angiography
# roughly once a year for cardiac allograft vasculopathy (CAV). Each record is a time (years after
# transplant) and a state: 1 no CAV, 2 mild/moderate CAV, 3 severe CAV, 4 death. Deaths are recorded
# at their exact time, the grades only at the examinations, so between two records the process is
# unobserved and the likelihood of a subject is a product of ``P(dt) = expm(Q dt)`` entries, with the
# death record contributing ``sum_k P(dt)[i, k] Q[k, death]`` (alive just before, then the jump).
#
# 1. **Progression model** (msm's "Model 1"): rates 1->2, 1->4, 2->1, 2->3, 2->4, 3->2, 3->4, fitted by
#    EM (`ps.learn.em`) and checked by the gradient MLE on log-rates (`ps.learn.mle`); standard errors
#    from the exact Hessian of the panel likelihood. Then sex as a covariate on every log-rate
#    (proportional intensities, ``covariate_effects``), fitted by the gradient MLE.
# 2. **Misclassification model** (msm's "Model 5"): a one-way progression observed through an
#    angiogram that can confuse neighbouring grades (death is not misclassified), a
#    `ps.models.ContinuousTimeHMM` filtered with ``exact_states=(3,)``; rates and misclassification
#    probabilities fitted on an unconstrained scale, standard errors from the Hessian.
#
# The data are GPL (they ship inside msm), so probssm does not include them. Pass `--data-dir`
# (default `../shared/data/mjp`): it needs `cav.csv`, the `cav` data frame of msm's
# `data/msmdata.rda` written as CSV (see the message printed when it is missing).

# %%
import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

import probssm as ps  # noqa: E402
from probssm.learn.em_ctmc import mjp_standard_errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
parser = argparse.ArgumentParser(description="msm's cav heart-transplant panel: multi-state models")
parser.add_argument("--data-dir", default=os.environ.get("PROBSSM_MJP_DATA", os.path.join(HERE, "..", "..", "shared",
                                                                                          "data", "mjp")))
args, _ = parser.parse_known_args()
CSV = os.path.join(args.data_dir, "cav.csv")
FIG_DIR = os.path.join(HERE, "figures")
NAMES = ["well", "mild", "severe", "death"]
if not os.path.exists(CSV):
    sys.exit(f"{CSV} not found. This example needs msm's `cav` data (GPL, not shipped with probssm):\n"
             "  1. download data/msmdata.rda from the R package msm (https://cran.r-project.org/package=msm, or the\n"
             "     GitHub mirror cran/msm);\n"
             "  2. write its `cav` data frame as CSV, e.g. in Python: pip install pyreadr pandas; then\n"
             "     pyreadr.read_r('msmdata.rda')['cav'].to_csv('cav.csv', index=False);\n"
             "  3. rerun with --data-dir pointing to the folder holding cav.csv.")

# %%
import pandas as pd  # noqa: E402

df = pd.read_csv(CSV)
times, states = [], []
for _, g in df.groupby("PTNUM", sort=False):
    times.append(g.years.to_numpy(float))
    states.append(g.state.to_numpy(int) - 1)
print(f"{len(times)} patients, {len(df)} records; state counts {np.bincount(np.concatenate(states)).tolist()}")


def generator(entries, K=4):
    Q = np.zeros((K, K))
    for (i, j), v in entries.items():
        Q[i, j] = v
    return Q - np.diag(Q.sum(1))


def rate_table(proc, se):
    return "\n".join(f"  {NAMES[i]:>6} -> {NAMES[j]:<6} {r:8.4f}  (se {s:.4f})"
                     for i, j, r, s in zip(proc.rows, proc.cols, np.asarray(proc.rates), np.asarray(se)))


# %% [markdown]
# ## 1. Progression model with exact death times
#
# Started from msm's `twoway4.q` (every allowed rate 0.25, 0.166 out of "mild"). EM's history never
# decreases; the gradient MLE on log-rates must land on the same optimum.

# %%
EM_ITERS = 200
t0 = time.time()
start = ps.models.MarkovJumpProcess(
    generator({(0, 1): .25, (0, 3): .25, (1, 0): .166, (1, 2): .166, (1, 3): .166, (2, 1): .25, (2, 3): .25}),
    np.array([1.0, 0, 0, 0]))
fit1, hist1 = ps.learn.em(start, (times, states), EM_ITERS, exact_states=(3,))
t_em = time.time() - t0
m2ll_1 = -2 * float(ps.ctmc.panel_log_likelihood(fit1, times, states, exact_states=(3,)))
mle1, _ = ps.learn.mle(start, (times, states), 100, exact_states=(3,), progress=False)
m2ll_mle = -2 * float(ps.ctmc.panel_log_likelihood(mle1, times, states, exact_states=(3,)))
se1 = mjp_standard_errors(fit1, (times, states), exact_states=(3,)).standard_errors
print(f"Model 1 (EM, {EM_ITERS} iterations, {t_em:.1f} s; total with MLE and Hessian {time.time() - t0:.1f} s): -2 log L = {m2ll_1:.4f} "
      f"(gradient MLE: {m2ll_mle:.4f}; msm's BFGS fit: 3968.7979)")
print(f"  EM's last step changed -2 log L by {-2 * float(hist1[-1] - hist1[-2]):.1e}; max relative difference of "
      "the EM and gradient-MLE rates: "
      f"{np.max(np.abs(np.asarray(fit1.rates) / np.asarray(mle1.rates) - 1)):.2e}")
print(rate_table(fit1, se1))

# %% [markdown]
# ## 1b. Sex as a covariate on every log-rate (proportional intensities)
#
# ``rate_ij(x) = rate_ij exp(beta_ij x)`` with x = sex centred at its mean over the records that start
# an interval (msm's ``center = TRUE``), so the baseline rates are those of an "average" patient. Fitted
# by gradient MLE from model 1's rates; msm's regression test gives -2 log L = 3954.77700438268.

# %%
sex = [g.sex.to_numpy(float) for _, g in df.groupby("PTNUM", sort=False)]
centre = np.mean(np.concatenate([x[:-1] for x in sex]))
sex_x = [(x - centre)[:, None] for x in sex]
t0 = time.time()
start_sex = ps.models.MarkovJumpProcess(fit1.generator(), np.array([1.0, 0, 0, 0]), covariate_effects=np.zeros((1, 4, 4)))
fit_sex, _ = ps.learn.mle(start_sex, (times, states, sex_x), 200, exact_states=(3,), progress=False)
m2ll_sex = -2 * float(ps.ctmc.panel_log_likelihood(fit_sex, times, states, exact_states=(3,), covariates=sex_x))
print(f"Model 1 + sex (L-BFGS, {time.time() - t0:.1f} s): -2 log L = {m2ll_sex:.5f} (msm: 3954.77700; "
      f"likelihood-ratio statistic against model 1: {m2ll_1 - m2ll_sex:.2f} on 7 df)")
for i, j, b in zip(fit_sex.rows, fit_sex.cols, np.asarray(fit_sex.covariate_effects)[0]):
    print(f"  {NAMES[i]:>6} -> {NAMES[j]:<6} hazard ratio female / male {np.exp(b):8.3g}")

# %% [markdown]
# ## 2. Misclassification model
#
# One-way progression (1->2, 1->4, 2->3, 2->4, 3->4); the observed grade can be one off the true grade
# (e12, e21, e23, e32), death is recorded exactly and correctly; everybody starts well. At msm's
# starting values (its test suite) the likelihood reproduces msm's -2 log L = 4296.9155995778.

# %%
ONEWAY = [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]
MISC = [(0, 1), (1, 0), (1, 2), (2, 1)]
labels = [s.astype(float)[:, None] for s in states]


def misc_model(x):
    """log-rates (5) and log-odds of each misclassification against the correct grade (4) -> model."""
    rates, logits = jnp.exp(x[:5]), x[5:]
    Q = jnp.zeros((4, 4)).at[tuple(np.array(ONEWAY).T)].set(rates)
    L = jnp.full((4, 4), -jnp.inf).at[np.arange(4), np.arange(4)].set(0.0).at[tuple(np.array(MISC).T)].set(logits)
    # structural zeros sit at 1e-300 (a change far below double precision in the likelihood) so that the
    # emission log-probabilities and their gradients stay finite
    E = jnp.where(jnp.isfinite(L), jax.nn.softmax(L, axis=1), 1e-300)
    proc = ps.models.MarkovJumpProcess(Q - jnp.diag(Q.sum(1)), jnp.array([1.0, 0, 0, 0]),
                                       structure=np.isin(np.arange(16).reshape(4, 4),
                                                         [4 * i + j for i, j in ONEWAY]))
    return ps.models.ContinuousTimeHMM(proc, E)


def neg2ll(x):
    return -2 * jnp.sum(ps.ctmc.filter(misc_model(x), times, labels, exact_states=(3,)).log_likelihood)


msm_start = np.concatenate([np.log([0.148, 0.0171, 0.202, 0.081, 0.126]), np.log(np.full(4, 0.1 / 0.9))])
msm_start[6:8] = np.log(0.1 / 0.8)  # row "mild": 0.1 / 0.8 / 0.1
t0 = time.time()
at_msm = float(neg2ll(jnp.asarray(msm_start)))
print(f"Misclassification model at msm's test values: -2 log L = {at_msm:.10f} (msm: 4296.9155995778, "
      f"difference {at_msm - 4296.9155995778:.1e})")
vg = jax.jit(jax.value_and_grad(neg2ll))
res = scipy.optimize.minimize(lambda x: [np.asarray(v) for v in vg(jnp.asarray(x))], msm_start, jac=True,
                              method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-7, "maxiter": 500})
H = np.asarray(jax.jit(jax.hessian(neg2ll))(jnp.asarray(res.x))) / 2  # observed information
cov = np.linalg.inv(H)
se_x = np.sqrt(np.diag(cov))
fit5 = misc_model(jnp.asarray(res.x))
E5 = np.asarray(fit5.emissions.probs[:, 0])


def misc_probs(x):
    E = misc_model(x).emissions.probs[:, 0]
    return jnp.stack([E[i, j] for i, j in MISC])


J = np.asarray(jax.jacobian(misc_probs)(jnp.asarray(res.x)))
se_e = np.sqrt(np.diag(J @ cov @ J.T))  # delta method on the softmax rows
print(f"Model 5 (L-BFGS, {res.nit} iterations, {time.time() - t0:.1f} s): -2 log L = {res.fun:.4f}")
print(rate_table(fit5.process, np.exp(res.x[:5]) * se_x[:5]))  # delta method: se(rate) = rate se(log-rate)
for (i, j), s in zip(MISC, se_e):
    print(f"  P(observed {NAMES[j]:<6} | true {NAMES[i]:<6}) = {E5[i, j]:.4f}  (se {s:.4f})")

# %% [markdown]
# ## State occupancy: fitted curves against the observed prevalence
#
# Fitted: ``(1, 0, 0, 0) expm(Q t)`` for both models. Observed (as msm's `prevalence.msm`): at each
# time t, the state of every patient still under follow-up at their latest record at or before t
# (death carried forward).

# %%
grid = np.linspace(0, 15, 61)
occ1 = np.asarray(ps.ctmc.transition_matrix(fit1, grid))[:, 0]
occ5 = np.asarray(ps.ctmc.transition_matrix(fit5.process, grid))[:, 0]
years = np.arange(0, 16)
prev = np.zeros((len(years), 4))
for t, s in zip(times, states):
    for y_i, y in enumerate(years):
        if y <= t[-1] or s[-1] == 3:
            k = np.searchsorted(t, y, side="right") - 1
            prev[y_i, s[max(k, 0)]] += 1
prev /= np.maximum(prev.sum(1, keepdims=True), 1)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharex=True)
for k, ax in enumerate(axes):
    ax.plot(years, 100 * prev[:, k], "ko", ms=4, label="observed")
    ax.plot(grid, 100 * occ1[:, k], "C0-", label="progression model")
    ax.plot(grid, 100 * occ5[:, k], "C1--", label="misclassification model")
    ax.set_title(NAMES[k])
    ax.set_xlabel("years after transplant")
axes[0].set_ylabel("prevalence (%)")
axes[0].legend(fontsize=8)
fig.tight_layout()
os.makedirs(FIG_DIR, exist_ok=True)
fig.savefig(os.path.join(FIG_DIR, "mjp_panel.png"), dpi=110)
print("figure:", os.path.join(FIG_DIR, "mjp_panel.png"))
