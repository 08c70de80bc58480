# %% [markdown]
# # Business-cycle regimes: a Markov-switching autoregression of US real GDP growth
#
# Hamilton's (1989) model: quarterly growth y_t (percent) has a switching mean, recession or
# expansion, and AR(4) dynamics on its deviations from that mean,
#
#     y_t - mu(s_t) = sum_{i=1..4} phi_i (y_{t-i} - mu(s_{t-i})) + N(0, sigma^2),
#     p(s_t = j | s_{t-1} = i) = A[i, j].
#
# Data: real GDP of statsmodels' `macrodata` (US, 1959Q1-2009Q3, public domain, from the
# Federal Reserve's FRED), growth = 100 * diff(log GDP). We fit the model by maximum likelihood
# (`ps.learn.mle`, L-BFGS) and, in the same run, with statsmodels' `MarkovAutoregression`; then
# score the smoothed recession probabilities against the NBER recession quarters (which the
# model never sees).

# %%
import os
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import statsmodels.api as sm  # noqa: E402

import probssm as ps  # noqa: E402

start_time = time.time()
K, P = 2, 4

# %% Data
data = sm.datasets.macrodata.load_pandas().data
dates = data["year"].to_numpy() + (data["quarter"].to_numpy() - 1) / 4
growth = 100 * np.diff(np.log(data["realgdp"].to_numpy()))
dates = dates[1:]

# NBER business-cycle peaks and troughs in the sample (quarters); a quarter after a peak up to
# and including the trough counts as recession.
NBER = [((1960, 2), (1961, 1)), ((1969, 4), (1970, 4)), ((1973, 4), (1975, 1)), ((1980, 1), (1980, 3)),
        ((1981, 3), (1982, 4)), ((1990, 3), (1991, 1)), ((2001, 1), (2001, 4)), ((2007, 4), (2009, 2))]
recession = np.zeros(len(dates), bool)
for (py, pq), (ty, tq) in NBER:
    recession |= (dates > py + (pq - 1) / 4 + 1e-9) & (dates <= ty + (tq - 1) / 4 + 1e-9)

# %% Fit by maximum likelihood. Start: a persistent expansion with mean growth near the sample
# mean, a short-lived recession with negative growth, no autocorrelation.
start = ps.models.MarkovSwitchingAR(
    transition_matrix=jnp.array([[0.75, 0.25], [0.05, 0.95]]),
    means=jnp.array([-0.5, float(growth.mean())]),
    ar_coefs=jnp.zeros(P),
    variances=jnp.array(float(growth.var())),
)
t0 = time.time()
fitted, history = ps.learn.mle(start, growth, 300, progress=False)
ps_seconds = time.time() - t0
t0 = time.time()  # a second fit of the same shapes reuses the compiled program
ps.learn.mle(start, growth, 300, progress=False)[0].means.block_until_ready()
ps_rerun_seconds = time.time() - t0
ll = float(ps.switching.log_likelihood(fitted, growth))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sm_model = sm.tsa.MarkovAutoregression(growth, k_regimes=K, order=P, switching_ar=False,
                                           switching_variance=False)
    t0 = time.time()
    sm_fit = sm_model.fit(disp=False, search_reps=20, search_iter=10)
    sm_seconds = time.time() - t0

smoothed = ps.switching.smoother(fitted, growth)
low = int(np.argmin(np.asarray(fitted.means)))  # the recession regime has the lower mean
p_recession = np.asarray(smoothed.smoothed_probs)[:, low]
# the smoother's probabilities start after the first P observations (the likelihood conditions on them)
truth = recession[P:]
called = p_recession > 0.5

print("## Markov-switching AR(4) of US real GDP growth, 1959Q2-2009Q3\n")
print("| | probssm (`ps.learn.mle`) | statsmodels `MarkovAutoregression.fit` |")
print("|---|---|---|")
print(f"| log-likelihood | {ll:.4f} | {sm_fit.llf:.4f} |")
print(f"| fit time (s), first call incl. compilation | {ps_seconds:.1f} | {sm_seconds:.1f} |")
print(f"| fit time (s), second call | {ps_rerun_seconds:.2f} | |")
A = np.asarray(fitted.transition_matrix)
print(f"\nmeans (recession, expansion): {np.asarray(fitted.means)[[low, 1 - low]].round(3)}; "
      f"AR coefficients {np.asarray(fitted.ar_coefs).round(3)}; innovation s.d. {float(np.sqrt(fitted.variances)):.3f}")
print(f"expected durations: recession {1 / (1 - A[low, low]):.1f} quarters, expansion "
      f"{1 / (1 - A[1 - low, 1 - low]):.1f} quarters")
print(f"\nagainst NBER (never seen by the model): {truth.sum()} recession quarters, "
      f"{(called & truth).sum()} flagged (P > 0.5); {(called & ~truth).sum()} of {(~truth).sum()} "
      f"expansion quarters flagged; accuracy {np.mean(called == truth):.3f}")
print(f"mean P(recession) in NBER recessions {p_recession[truth].mean():.2f}, in expansions "
      f"{p_recession[~truth].mean():.2f}")

# %% Figure: growth with NBER recessions shaded, and the smoothed recession probability.
fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
for ax in axes:
    for (py, pq), (ty, tq) in NBER:
        ax.axvspan(py + (pq - 1) / 4, ty + (tq - 1) / 4, color="0.85", lw=0)
axes[0].plot(dates, growth, "k", lw=1)
axes[0].set_ylabel("GDP growth (%)")
axes[1].plot(dates[P:], p_recession, "C3")
axes[1].set_ylabel("P(recession | all data)")
axes[1].set_ylim(-0.02, 1.02)
axes[1].set_xlabel("year (NBER recessions shaded)")
fig.tight_layout()
os.makedirs(os.path.join(os.path.dirname(__file__), "figures"), exist_ok=True)
path = os.path.join(os.path.dirname(__file__), "figures", "regime_switching.png")
fig.savefig(path, dpi=120)
print(f"\nwrote {path}; total {time.time() - start_time:.0f} s")
