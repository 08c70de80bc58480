# %% [markdown]
# # Bayesian local level: NUTS on the exact likelihood vs particle MCMC
#
# The Nile local-level model (see `nile.py`) with half-normal priors on the two
# variances. Three samplers target the same posterior:
#
# * NUTS over the variances with the exact Kalman marginal likelihood, then one
#   smoothing draw of the level per parameter draw;
# * PMMH: random-walk Metropolis with a bootstrap-filter likelihood estimate;
# * particle Gibbs with ancestor sampling (conditional SMC for the level,
#   random-walk MH for the variances given the level).
#
# The posterior means must agree within Monte Carlo error (the z column: the
# difference to NUTS over the combined Monte Carlo standard errors).

# %%
import os

import jax

jax.config.update("jax_enable_x64", True)
import arviz as az  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from statsmodels.datasets import nile  # noqa: E402

import probssm as ps  # noqa: E402

data = nile.load_pandas().data
years = data["year"].to_numpy().astype(int)
y = data["volume"].to_numpy(float)[:, None]


def build(p):
    return ps.models.LinearGaussianSSM(jnp.zeros(1), 1e7 * jnp.eye(1), jnp.eye(1), p["q"] * jnp.eye(1),
                                       jnp.eye(1), p["r"] * jnp.eye(1))


priors = {"q": dist.HalfNormal(1e4), "r": dist.HalfNormal(5e4)}  # level and observation variances
init = {"q": 1500.0, "r": 15000.0}

# %% Run the three samplers.
runs = {
    "NUTS (exact likelihood)": ps.mcmc.nuts(jax.random.PRNGKey(1), build, priors, y, num_warmup=500,
                                            num_samples=2000, num_chains=2, init_params=init),
    "PMMH (200 particles)": ps.mcmc.pmmh(jax.random.PRNGKey(0), build, priors, y, num_particles=200,
                                         num_warmup=1000, num_samples=4000, num_chains=2, init_params=init),
    "particle Gibbs (50 particles)": ps.mcmc.particle_gibbs(jax.random.PRNGKey(0), build, priors, y,
                                                            num_particles=50, num_warmup=500, num_samples=2000,
                                                            num_chains=2, init_params=init),
}
summaries = {name: az.summary(ps.mcmc.to_arviz(res), var_names=["q", "r"]) for name, res in runs.items()}
ref = summaries["NUTS (exact likelihood)"]
print("| sampler | parameter | mean | sd | MCSE | ESS (bulk) | R-hat | z vs NUTS |")
print("|---|---|---|---|---|---|---|---|")
for name, s in summaries.items():
    for p in ("q", "r"):
        z = (s.loc[p, "mean"] - ref.loc[p, "mean"]) / np.hypot(s.loc[p, "mcse_mean"], ref.loc[p, "mcse_mean"])
        z_text = "–" if s is ref else f"{z:+.2f}"
        print(f"| {name} | {p} | {s.loc[p, 'mean']:.0f} | {s.loc[p, 'sd']:.0f} | {s.loc[p, 'mcse_mean']:.0f} "
              f"| {s.loc[p, 'ess_bulk']:.0f} | {s.loc[p, 'r_hat']:.2f} | {z_text} |")

# %% Figures: the variance posteriors overlaid, and the level's posterior band.
os.makedirs("figures", exist_ok=True)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for ax, p, label in ((axes[0], "q", r"$\sigma_\eta^2$ (level)"), (axes[1], "r", r"$\sigma_\varepsilon^2$ (noise)")):
    for name, res in runs.items():
        ax.hist(np.asarray(res.samples[p]).ravel(), bins=60, density=True, histtype="step", label=name)
    ax.set_xlabel(label)
axes[0].legend(fontsize=7)
states = np.asarray(runs["NUTS (exact likelihood)"].states)[..., 0].reshape(-1, len(years))
lo, mid, hi = np.percentile(states, [5, 50, 95], axis=0)
axes[2].plot(years, y[:, 0], ".", color="0.4", label="flow")
axes[2].plot(years, mid, color="C0", label="level, posterior median")
axes[2].fill_between(years, lo, hi, color="C0", alpha=0.3, label="90% band (parameters integrated)")
axes[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig("figures/bayesian_local_level.png", dpi=120)
print("wrote figures/bayesian_local_level.png")
