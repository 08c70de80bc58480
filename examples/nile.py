# %% [markdown]
# # The Nile: a local-level model
#
# Annual flow of the Nile at Aswan, 1871-1970. The local-level model
#
#     y_t = mu_t + eps_t,    eps_t ~ N(0, sigma_eps^2)
#     mu_{t+1} = mu_t + eta_t,   eta_t ~ N(0, sigma_eta^2)
#
# is a linear-Gaussian SSM with one state. We fit the two variances by maximum
# likelihood (L-BFGS on the exact Kalman log-likelihood) and by EM, compare them
# with Durbin & Koopman's published estimates (15099, 1469.1), and plot the
# smoothed level with a 90% band. The first level is nearly diffuse (variance 1e7).

# %%
import os

import jax

jax.config.update("jax_enable_x64", True)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from statsmodels.datasets import nile  # noqa: E402

import probssm as ps  # noqa: E402

data = nile.load_pandas().data
years = data["year"].to_numpy().astype(int)
y = data["volume"].to_numpy(float)[:, None]

# %% Fit: only the two variances are free.
var = float(np.var(y))
start = ps.models.LinearGaussianSSM(
    initial_mean=np.zeros(1), initial_cov=1e7 * np.eye(1),
    transition_matrix=np.eye(1), transition_cov=var * np.eye(1),
    emission_matrix=np.eye(1), emission_cov=var * np.eye(1))
fixed = ("initial_mean", "initial_cov", "transition_matrix", "emission_matrix",
         "transition_offset", "emission_offset")
mle_model, mle_trace = ps.learn.mle(start, y, 60, fixed=fixed)
em_model, em_trace = ps.learn.em(start, y, 500, fixed=fixed)

rows = [("Durbin & Koopman (2012)", 15099.0, 1469.1, float("nan")),
        ("probssm MLE (L-BFGS)", float(mle_model.emission_cov[0, 0]), float(mle_model.transition_cov[0, 0]),
         float(mle_trace[-1])),
        ("probssm EM (500 iterations)", float(em_model.emission_cov[0, 0]), float(em_model.transition_cov[0, 0]),
         float(em_trace[-1]))]
print("| estimate | sigma_eps^2 | sigma_eta^2 | log-likelihood |")
print("|---|---|---|---|")
for name, e, h, ll in rows:
    print(f"| {name} | {e:.1f} | {h:.1f} | {ll:.4f} |")

# %% Smoothed level with a 90% band, and a 10-year forecast.
post = ps.kalman.smoother(mle_model, y)
level = np.asarray(post.smoothed_means[:, 0])
sd = np.sqrt(np.asarray(post.smoothed_covs[:, 0, 0]))
fc = ps.kalman.forecast(mle_model, y, 10)
fc_mean = np.asarray(fc.means[:, 0])
fc_sd = np.sqrt(np.asarray(fc.emission_covs[:, 0, 0]))
fc_years = years[-1] + 1 + np.arange(10)
z90 = 1.6448536269514722

fig, ax = plt.subplots(figsize=(9, 4))
ax.plot(years, y[:, 0], ".", color="0.4", label="annual flow")
ax.plot(years, level, color="C0", label="smoothed level")
ax.fill_between(years, level - z90 * sd, level + z90 * sd, color="C0", alpha=0.25, label="90% band")
ax.plot(fc_years, fc_mean, color="C1", label="forecast")
ax.fill_between(fc_years, fc_mean - z90 * fc_sd, fc_mean + z90 * fc_sd, color="C1", alpha=0.25,
                label="90% predictive band")
ax.set_xlabel("year")
ax.set_ylabel("flow (1e8 m^3)")
ax.set_title("Nile: local-level model, MLE variances")
ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()
os.makedirs("figures", exist_ok=True)
fig.savefig("figures/nile.png", dpi=120)
print("smoothed level 1871: %.3f, 1970: %.3f" % (level[0], level[-1]))
print("wrote figures/nile.png")
