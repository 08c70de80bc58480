# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A Bayesian workflow for a state-space model
#
# Maximum likelihood gives one parameter value; a Bayesian analysis gives a distribution over
# parameters *and* latent states that reflects how much the data actually pin them down. A
# sound workflow (Gelman et al. 2020, "Bayesian workflow") goes round a loop:
#
# 1. choose priors and check them with **prior predictive** simulation;
# 2. sample the posterior (here with **NUTS** on the exact Kalman likelihood, `ps.mcmc.nuts`);
# 3. check the sampler with **ArviZ** diagnostics ($\hat R$, effective sample size, trace plots);
# 4. check the model with **posterior predictive** checks, and revise if needed.
#
# The model is the local-level model (a random walk observed in noise),
#
# $$
# \mu_0 \sim \mathcal N(0, 10^2), \qquad \mu_t = \mu_{t-1} + \eta_t,\ \eta_t \sim \mathcal N(0, q), \qquad
# y_t = \mu_t + \varepsilon_t,\ \varepsilon_t \sim \mathcal N(0, r),
# $$
#
# with unknown variances $q$ and $r$. The sampler settings are deliberately tiny so the notebook
# runs in seconds; use more draws and chains for real work.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import arviz as az  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

import probssm as ps  # noqa: E402

# %% [markdown]
# ## Data
#
# We simulate 100 steps with $q = 0.3$ and $r = 2$, so we can compare the posterior with the
# truth. A local level is just a cumulative sum of Gaussian steps.

# %%
T, q_true, r_true = 100, 0.3, 2.0
rng = np.random.default_rng(7)
level_true = rng.normal() + np.cumsum(rng.normal(0, np.sqrt(q_true), T))
y_np = (level_true + rng.normal(0, np.sqrt(r_true), T))[:, None]
y = jnp.asarray(y_np)

# %% [markdown]
# ## The model and the priors
#
# Every sampler in `ps.mcmc` takes a **builder** `build(params) -> model` and a dict of numpyro
# **priors**, one per entry of `params`. Variances need priors on $(0, \infty)$: half-normal
# priors keep them weakly informative (a `Normal` prior on a variance is refused).

# %%
def build(p):
    return ps.models.LinearGaussianSSM(
        initial_mean=jnp.zeros(1), initial_cov=100.0 * jnp.eye(1),
        transition_matrix=jnp.eye(1), transition_cov=p["q"] * jnp.eye(1),
        emission_matrix=jnp.eye(1), emission_cov=p["r"] * jnp.eye(1))


priors = {"q": dist.HalfNormal(1.0), "r": dist.HalfNormal(5.0)}

# %% [markdown]
# ## Prior predictive check
#
# Before looking at the data: what do datasets drawn from the priors look like? If they are
# wildly implausible (levels in the millions, or flat lines), the priors say something we do
# not believe. We draw parameters from the priors and simulate a series for each.

# %%
num_prior = 200
kq, kr = jax.random.split(jax.random.PRNGKey(0))
q_prior = np.asarray(priors["q"].sample(kq, (num_prior,)))
r_prior = np.asarray(priors["r"].sample(kr, (num_prior,)))
rng_prior = np.random.default_rng(0)
mu0 = rng_prior.normal(0, 10.0, (num_prior, 1))
levels = mu0 + np.cumsum(rng_prior.normal(size=(num_prior, T)) * np.sqrt(q_prior)[:, None], axis=1)
y_prior = levels + rng_prior.normal(size=(num_prior, T)) * np.sqrt(r_prior)[:, None]

fig, axes = plt.subplots(1, 2, figsize=(11, 3.3))
for i in range(30):
    axes[0].plot(y_prior[i], color="C0", alpha=0.3, lw=0.8)
axes[0].plot(y_np[:, 0], color="k", lw=1.2, label="observed (for reference)")
axes[0].set_title("30 prior predictive series", fontsize=9)
axes[0].legend(fontsize=8)
axes[1].hist(np.ptp(y_prior, axis=1), bins=30, color="C0", alpha=0.7, label="prior predictive")
axes[1].axvline(np.ptp(y_np), color="k", label="observed")
axes[1].set_xlabel("range of the series, max - min")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The observed series is well inside what the priors allow, and the priors do not rule out
# much more or much less variable series: they are weakly informative, as intended.
#
# ## NUTS on the exact likelihood
#
# `ps.mcmc.nuts(key, build, priors, emissions, ...)` runs numpyro's No-U-Turn sampler on the
# variances, with the states integrated out exactly by the Kalman filter (the likelihood is
# `ps.mcmc.MarginalLikelihood`, a numpyro distribution over whole series). After sampling it
# draws one latent path per parameter draw by forward-filtering backward-sampling, so the
# result also carries the joint posterior of the states.
#
# (To write your own numpyro model instead, use `ps.mcmc.MarginalLikelihood(model,
# num_timesteps=T)` as the observation site: it needs the number of time steps to know the
# event shape.)

# %%
result = ps.mcmc.nuts(jax.random.PRNGKey(1), build, priors, y, num_warmup=300, num_samples=300, num_chains=2,
                      init_params={"q": 1.0, "r": 1.0})
print("samples:", {k: v.shape for k, v in result.samples.items()}, "states:", result.states.shape)
print("divergent transitions:", int(np.sum(result.stats["diverging"])))

# %% [markdown]
# ## Diagnostics with ArviZ
#
# `ps.mcmc.to_arviz` converts the result to `arviz.InferenceData` (dimensions `chain`, `draw`,
# and `time`, `state` for the latent paths). The checks to make every time:
#
# * $\hat R$ (`r_hat`) close to 1 (below 1.01): the chains agree with each other;
# * bulk and tail effective sample sizes (`ess_bulk`, `ess_tail`) in the hundreds: enough
#   independent information for means and for quantiles;
# * no divergent transitions, and trace plots that look like stationary noise.

# %%
idata = ps.mcmc.to_arviz(result)
summary = az.summary(idata, var_names=["q", "r"])
print(summary)
assert (summary["r_hat"] < 1.05).all(), "the chains have not mixed"
assert (summary["ess_bulk"] > 100).all()

az.plot_trace(idata, var_names=["q", "r"], figsize=(10, 4))
plt.tight_layout()
plt.show()

# %% [markdown]
# The posterior is wide: with 100 observations the split of the variance between the level
# ($q$) and the noise ($r$) is only loosely identified, and the two are negatively correlated
# (a wigglier level leaves less for the noise to explain). A pair plot shows it.

# %%
q_draws = np.asarray(result.samples["q"]).ravel()
r_draws = np.asarray(result.samples["r"]).ravel()
print(f"posterior correlation of q and r: {np.corrcoef(q_draws, r_draws)[0, 1]:+.2f}")
fig, ax = plt.subplots(figsize=(4.5, 3.8))
ax.scatter(q_draws, r_draws, s=4, alpha=0.4)
ax.plot(q_true, r_true, "k*", ms=12, label="truth")
ax.set_xlabel("q (level variance)")
ax.set_ylabel("r (noise variance)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Posterior predictive checks
#
# If the model is adequate, data simulated from the posterior should look like the data we
# have. For each posterior draw (a pair $(q, r)$ and a latent path $\mu_{0:T-1}$) we simulate a
# replicated series $y^{\text{rep}}_t = \mu_t + \varepsilon_t$ and compare
#
# * the observed series with the band of replicated ones, and
# * test statistics $s(y^{\text{rep}})$ with $s(y)$: the posterior predictive p-value
#   $P(s(y^{\text{rep}}) \ge s(y) \mid y)$ should be neither close to 0 nor to 1.
#
# Statistics that the model does not fit directly are the informative ones: here the standard
# deviation and the lag-1 autocorrelation of the first differences $y_t - y_{t-1}$ (for a local
# level the differences are MA(1) with a negative lag-1 correlation).

# %%
states = np.asarray(result.states)[..., 0].reshape(-1, T)            # (draws, T) latent levels
r_flat = r_draws
rng_pp = np.random.default_rng(1)
y_rep = states + rng_pp.normal(size=states.shape) * np.sqrt(r_flat)[:, None]


def diff_sd(a):
    return np.diff(a, axis=-1).std(axis=-1)


def diff_lag1(a):
    d = np.diff(a, axis=-1)
    d = d - d.mean(axis=-1, keepdims=True)
    return (d[..., 1:] * d[..., :-1]).sum(-1) / (d**2).sum(-1)


fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
lo, hi = np.percentile(y_rep, [5, 95], axis=0)
axes[0].fill_between(np.arange(T), lo, hi, color="C0", alpha=0.3, label="90% posterior predictive")
axes[0].plot(y_np[:, 0], "k.", ms=3, label="observed")
axes[0].legend(fontsize=8)
coverage = np.mean((y_np[:, 0] >= lo) & (y_np[:, 0] <= hi))
axes[0].set_title(f"coverage of the 90% band: {coverage:.2f}", fontsize=9)
for ax, stat, name in ((axes[1], diff_sd, "sd of differences"), (axes[2], diff_lag1, "lag-1 autocorr. of differences")):
    s_rep, s_obs = stat(y_rep), float(stat(y_np[:, 0]))
    p_value = np.mean(s_rep >= s_obs)
    ax.hist(s_rep, bins=30, color="C0", alpha=0.7)
    ax.axvline(s_obs, color="k")
    ax.set_title(f"{name}: p = {p_value:.2f}", fontsize=9)
    print(f"{name:32s} observed {s_obs:+.3f}, posterior predictive p-value {p_value:.2f}")
fig.tight_layout()
plt.show()

# %% [markdown]
# The observed statistics sit comfortably inside their posterior predictive distributions: no
# evidence against the model here (as expected, since the data came from it). Note that these
# replicates reuse the posterior latent path, so they check the observation model most
# sharply; simulating fresh paths from $(q, r)$ alone checks the dynamics too (exercise 3).
#
# `ps.mcmc` has two more samplers with the same interface, for models without an exact
# likelihood: `ps.mcmc.pmmh` (particle marginal Metropolis-Hastings) and
# `ps.mcmc.particle_gibbs`; `examples/bayesian_local_level.py` checks that all three agree on
# the Nile data.
#
# ## Model comparison: PSIS-LOO
#
# `ps.mcmc.nuts` also records, for every draw, the pointwise log-likelihood
# $\log p(y_t \mid y_{0:t-1}, \theta)$ of each time step, and `to_arviz` puts it in the
# `log_likelihood` group, so ArviZ's leave-one-out cross-validation runs directly. (Each unit
# is one step's one-step-ahead predictive term; for time series this is an approximation to
# leave-future-out validation, and a Pareto $k$ above 0.7 flags a step it handles badly.)

# %%
loo = az.loo(idata)
print(loo)

# %% [markdown]
# ## Exercises
#
# 1. **Prior sensitivity.** Replace the priors by `HalfNormal(0.1)` on $q$ and rerun. How do
#    the posterior and the posterior predictive checks change? Which prior does the data
#    overrule, and which does it not?
# 2. **More draws.** Run 4 chains of 1000 draws. How do `ess_bulk` and the Monte Carlo
#    standard error (`mcse_mean` in `az.summary`) scale with the number of draws?
# 3. **Fresh replicates.** Simulate replicated series from $(q, r)$ alone (a new random walk
#    for each draw, as in the prior predictive check) and repeat the posterior predictive
#    checks. Which statistics become less sharp?
# 4. **A misspecified model.** Add a few outliers to `y` (e.g. `y_np[[20, 60]] += 15`) and rerun.
#    Which posterior predictive statistic detects them? (Hint: try the maximum absolute
#    difference.) How would a Student-t observation model (a `ps.models.NonlinearGaussianSSM`
#    will not do; think of `ps.mcmc.pmmh` with your own `ps.SSM` subclass) change the picture?
# 5. **The states.** Plot the 90% posterior band of the latent level from `result.states`
#    and compare with the Kalman smoother's band at the posterior mean of $(q, r)$
#    (`ps.kalman.smoother(build(...), y)`). Which is wider, and why?
