# %% [markdown]
# # Discrete flashing ratchet: rates from irregular snapshots by EM and NUTS
#
# A Brownian particle on three positions i = 0, 1, 2 of a periodic, tilted potential that is switched
# on and off (the test case of Berghaus et al., NeurIPS 2024). States 0-2: potential on, jumps
# i -> j at rate exp(-V (j - i) / 2); states 3-5: potential off, free jumps at rate b; on <-> off at
# the same position at rate r. With V = r = b = 1 there are 18 free rates.
#
# Data: Gillespie paths observed at a 50-point irregular grid on [0, 2.5] (the states only, not the
# jumps). The panel likelihood is exact (``P(dt) = expm(Q dt)`` per distinct interval), so
#
# * EM (`ps.learn.em`, expected jumps and dwell times by Van Loan integrals) gives the MLE;
# * NUTS over the 18 log-rates (numpyro, with `ps.ctmc.panel_log_likelihood` as the likelihood
#   factor: the marginal likelihood of the snapshots is exact, no path augmentation) gives the
#   posterior.

# %%
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

import probssm as ps  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIG_DIR = os.path.join(HERE, "figures")
NUM_PATHS, NUM_POINTS, T_MAX = 5000, 50, 2.5
NUM_PATHS_NUTS = 300  # the amount of data of the foundation model's tutorial


def ratchet_generator(V=1.0, r=1.0, b=1.0):
    F = np.zeros((6, 6))
    for i in range(3):
        for j in range(3):
            if i != j:
                F[i, j] = np.exp(-V * (j - i) / 2.0)
                F[3 + i, 3 + j] = b
        F[i, 3 + i] = F[3 + i, i] = r
    return F - np.diag(F.sum(1))


Q = ratchet_generator()
truth = ps.models.MarkovJumpProcess(Q, np.ones(6) / 6)
rng = np.random.default_rng(0)
grid = np.sort(rng.uniform(0.0, T_MAX, NUM_POINTS))
grid[0] = 0.0
times = np.broadcast_to(grid, (NUM_PATHS, NUM_POINTS))

# %% [markdown]
# ## Data: Gillespie paths read at the grid

# %%
t0 = time.time()
paths = jax.jit(jax.vmap(lambda k: ps.ctmc.gillespie(k, truth, T_MAX, 60)))(jax.random.split(jax.random.key(1),
                                                                                            NUM_PATHS))
assert not bool(jnp.any(paths.truncated))
idx = jax.vmap(lambda jt: jnp.searchsorted(jt, jnp.asarray(grid), side="right") - 1)(paths.jump_times)
states = np.asarray(jnp.take_along_axis(paths.states, idx, axis=1))
print(f"{NUM_PATHS} Gillespie paths ({float(jnp.mean(paths.num_jumps)):.1f} jumps each on average) in "
      f"{time.time() - t0:.1f} s")

# %% [markdown]
# ## EM

# %%
start = ps.models.MarkovJumpProcess(np.where(Q > 0, 1.0, 0.0) - np.diag((Q > 0).sum(1) * 1.0), np.ones(6) / 6)
t0 = time.time()
fitted, history = ps.learn.em(start, (times, states), 300)
t_em = time.time() - t0
rmse_em = float(np.sqrt(np.mean((np.asarray(fitted.rates) - np.asarray(truth.rates)) ** 2)))
print(f"EM (300 iterations, {t_em:.1f} s): rate RMSE {rmse_em:.4f} over {truth.rates.size} rates; "
      f"last step changed log L by {float(history[-1] - history[-2]):.1e}")

# %% [markdown]
# ## NUTS over log-rates
#
# Prior log f_ij ~ N(0, 1.5^2) on every free rate; the first snapshot of each path is conditioned on.

# %%
sub_t, sub_s = times[:NUM_PATHS_NUTS], states[:NUM_PATHS_NUTS]


def bayes():
    log_rates = numpyro.sample("log_rates", dist.Normal(0.0, 1.5).expand([truth.rates.size]).to_event(1))
    proc = ps.models.MarkovJumpProcess(jnp.zeros((6, 6)), jnp.ones(6) / 6, structure=truth.structure)
    proc = ps.models.MarkovJumpProcess.with_generator(proc, _generator(jnp.exp(log_rates)))
    numpyro.factor("panel", ps.ctmc.panel_log_likelihood(proc, sub_t, sub_s))


def _generator(rates):
    G = jnp.zeros((6, 6)).at[np.asarray(truth.rows), np.asarray(truth.cols)].set(rates)
    return G - jnp.diag(G.sum(1))


t0 = time.time()
mcmc = MCMC(NUTS(bayes), num_warmup=300, num_samples=300, num_chains=1, progress_bar=False)
mcmc.run(jax.random.key(2))
t_nuts = time.time() - t0
draws = np.exp(np.asarray(mcmc.get_samples()["log_rates"]))
post_mean = draws.mean(0)
lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
true_rates = np.asarray(truth.rates)
rmse_nuts = float(np.sqrt(np.mean((post_mean - true_rates) ** 2)))
cover = float(np.mean((lo <= true_rates) & (true_rates <= hi)))
fit_small, _ = ps.learn.em(start, (sub_t, sub_s), 300)
rmse_em_small = float(np.sqrt(np.mean((np.asarray(fit_small.rates) - true_rates) ** 2)))
print(f"NUTS on {NUM_PATHS_NUTS} paths (300 + 300 draws, {t_nuts:.1f} s): posterior-mean rate RMSE {rmse_nuts:.4f} "
      f"(EM on the same paths: {rmse_em_small:.4f}); 90% intervals cover {cover:.0%} of the 18 true rates; "
      f"divergences {int(mcmc.get_extra_fields()['diverging'].sum())}")

# %% [markdown]
# ## True vs estimated rates

# %%
fig, ax = plt.subplots(figsize=(5, 4.5))
ax.plot([0, 3.0], [0, 3.0], "k:", lw=1)
ax.errorbar(true_rates + 0.02, post_mean, yerr=[post_mean - lo, hi - post_mean], fmt="C1o", ms=4, capsize=2,
            label=f"NUTS posterior mean, 90% ({NUM_PATHS_NUTS} paths)")
ax.plot(true_rates - 0.02, np.asarray(fitted.rates), "C0s", ms=4, label=f"EM ({NUM_PATHS} paths)")
ax.set_xlabel("true rate")
ax.set_ylabel("estimated rate")
ax.set_title(f"flashing ratchet (V = r = b = 1): EM RMSE {rmse_em:.3f}")
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs(FIG_DIR, exist_ok=True)
fig.savefig(os.path.join(FIG_DIR, "mjp_ratchet.png"), dpi=110)
print("figure:", os.path.join(FIG_DIR, "mjp_ratchet.png"))
