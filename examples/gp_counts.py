# %% [markdown]
# # Event counts: a log-Gaussian Cox process by conjugate-computation VI
#
# Events arrive as an inhomogeneous Poisson process with intensity lambda(t) = exp(f(t)),
# f ~ GP(c, Matérn-3/2). Binned into counts y_i over bins of width w, the model is
#
#     y_i | f ~ Poisson(w exp(f(t_i))),     f ~ GP(c, k),
#
# a linear-Gaussian state-space prior (the Matérn-3/2 SDE, state (f, f')) with a Poisson
# emission. `ps.vi.fit` approximates p(f | y) by a Gaussian whose Kalman-smoother
# form costs O(T) per iteration:
#
# * ``method="cvi"``: conjugate-computation VI (Khan & Lin 2017), natural-gradient steps on the
#   ELBO written as Gaussian sites;
# * ``method="laplace"``: Newton steps to the posterior mode (the Laplace approximation).
#
# The check: the same natural-gradient VI written out for a dense GP (numpy, T = 200: K is
# 200 x 200) must reproduce the state-space CVI iterate for iterate, ELBO included. The events
# are synthetic (a known intensity, thinning), so the posterior can be compared with the truth.

# %%
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import gammaln  # noqa: E402

import probssm as ps  # noqa: E402
vi = ps.vi  # the variational engine

start_clock = time.perf_counter()


# %% Synthetic events: thinning of a homogeneous process at the intensity's upper bound
def true_intensity(t):
    return np.exp(0.3 + np.sin(t / 8.0) + 0.6 * np.cos(t / 2.5))


rng = np.random.default_rng(3)
horizon, T = 100.0, 200
grid = np.linspace(0.0, horizon, 10_001)
bound = 1.05 * true_intensity(grid).max()
candidates = np.sort(rng.uniform(0.0, horizon, rng.poisson(bound * horizon)))
events = candidates[rng.uniform(size=candidates.size) < true_intensity(candidates) / bound]
width = horizon / T
edges = np.linspace(0.0, horizon, T + 1)
counts = np.histogram(events, edges)[0].astype(float)
t = 0.5 * (edges[:-1] + edges[1:])
print(f"{events.size} events in {T} bins of width {width}")

# %% The prior: Matérn-3/2 log-intensity around the log of the average rate (the GP's mean c)
lengthscale, variance = 3.0, 0.6
c = float(np.log(events.size / horizon))
prior = ps.models.MarkovianGP(ps.gp.Matern32(lengthscale=lengthscale, variance=variance),
                              noise_variance=1.0,  # ignored by vi.fit: the Poisson emission replaces it
                              mean=c)
likelihood = vi.Poisson(exposure=width)
num_iters = 15
cvi = vi.fit(prior, likelihood, counts[:, None], num_iters, method="cvi", inputs=t[:, None])
laplace = vi.fit(prior, likelihood, counts[:, None], num_iters, method="laplace", inputs=t[:, None])


# %% [markdown]
# ## The dense reference: the same natural-gradient VI on the 200 x 200 covariance
#
# q(f) = N(m, S) with S = (K^-1 + diag(lam2))^-1 and sites (lam1, lam2) on f. With
# L_i(m_i, S_ii) = E_q[log p(y_i | f_i)] = y_i (m_i + log w) - w exp(m_i + S_ii / 2) - log y_i!,
# one CVI step (step size 1) sets lam2 = -2 dL/dS and lam1 = dL/dm + lam2 m; the ELBO is
# sum_i L_i - KL(q || p).

# %%
def matern32(t1, t2):
    r = np.sqrt(3.0) * np.abs(t1[:, None] - t2[None, :]) / lengthscale
    return variance * (1.0 + r) * np.exp(-r)


def dense_posterior(K, lam1, lam2):
    """Mean and covariance of q(f) from the sites, via B = diag(lam2)^(1/2):
    S = K - K B (I + B K B)^-1 B K, stable for lam2 >= 0 (no inverse of K)."""
    b = np.sqrt(lam2)
    A = np.eye(len(b)) + b[:, None] * K * b[None, :]
    KB = K * b[None, :]
    S = K - KB @ np.linalg.solve(A, KB.T)
    m = c + S @ (lam1 - lam2 * c)  # sites on f = c + g: the linear term on g is lam1 - lam2 c
    return m, S


def dense_elbo(K, m, S):
    L = np.sum(counts * (m + np.log(width)) - width * np.exp(m + 0.5 * np.diag(S)) - gammaln(counts + 1.0))
    Kc, Sc = np.linalg.cholesky(K), np.linalg.cholesky(S)
    Kinv_S = np.linalg.solve(K, S)
    g = m - c
    kl = 0.5 * (np.trace(Kinv_S) + g @ np.linalg.solve(K, g) - len(g)
                + 2.0 * np.sum(np.log(np.diag(Kc))) - 2.0 * np.sum(np.log(np.diag(Sc))))
    return L - kl


K = matern32(t, t)
lam1, lam2 = np.zeros(T), np.zeros(T)
m, S = np.full(T, c), K  # no sites yet: q is the prior
dense_history = []
for _ in range(num_iters):
    rate = width * np.exp(m + 0.5 * np.diag(S))
    lam2 = rate                      # -2 dL/dS
    lam1 = (counts - rate) + lam2 * m  # dL/dm + (-2 dL/dS) m
    m, S = dense_posterior(K, lam1, lam2)
    dense_history.append(dense_elbo(K, m, S))
dense_history = np.array(dense_history)

# %% Comparison
cvi_m, cvi_v = np.asarray(cvi.f_means[:, 0]), np.asarray(cvi.f_covs[:, 0, 0])
lap_m, lap_v = np.asarray(laplace.f_means[:, 0]), np.asarray(laplace.f_covs[:, 0, 0])
cvi_hist, lap_hist = np.asarray(cvi.elbo_history), np.asarray(laplace.elbo_history)
print("| iteration | ELBO: state-space CVI | dense CVI | state-space Laplace |")
print("|---|---|---|---|")
for i in (0, 1, 2, 4, num_iters - 1):
    print(f"| {i + 1} | {cvi_hist[i]:.6f} | {dense_history[i]:.6f} | {lap_hist[i]:.6f} |")
print(f"state-space CVI vs dense CVI: max |ELBO difference| over the iterations "
      f"{np.max(np.abs(cvi_hist - dense_history)):.2e}, max |mean difference| {np.max(np.abs(cvi_m - m)):.2e}, "
      f"max |variance difference| {np.max(np.abs(cvi_v - np.diag(S))):.2e}")
truth = np.log(true_intensity(t))
for name, mean_f in (("CVI", cvi_m), ("Laplace", lap_m)):
    print(f"{name}: final ELBO {float((cvi if name == 'CVI' else laplace).elbo):.3f}, "
          f"RMSE of the posterior mean log-intensity against the truth {np.sqrt(np.mean((mean_f - truth) ** 2)):.3f}")

# %%
z90 = 1.6448536269514722
fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
ax = axes[0]
ax.bar(t, counts / width, width=width, color="0.85", label="counts / bin width")
ax.plot(grid, true_intensity(grid), color="k", lw=1, label="true intensity")
for name, mean_f, var_f, color in (("CVI", cvi_m, cvi_v, "C0"), ("Laplace", lap_m, lap_v, "C1")):
    ax.plot(t, np.exp(mean_f), color=color, label=f"{name}: exp(posterior median of f)")
    ax.fill_between(t, np.exp(mean_f - z90 * np.sqrt(var_f)), np.exp(mean_f + z90 * np.sqrt(var_f)),
                    color=color, alpha=0.2, lw=0)
ax.plot(t, np.exp(m), ":", color="C3", label="dense CVI (reference)")
ax.set(xlabel="time", ylabel="intensity", title="Log-Gaussian Cox process: 90% bands of the intensity")
ax.legend(fontsize=8, loc="upper left")
ax = axes[1]
iters = np.arange(1, num_iters + 1)
ax.plot(iters, cvi_hist, "o-", label="state-space CVI")
ax.plot(iters, dense_history, "x:", color="C3", label="dense CVI")
ax.plot(iters, lap_hist, "s--", color="C1", label="Laplace (ELBO of its Gaussian)")
ax.set(xlabel="iteration", ylabel="ELBO", title="ELBO per iteration",
       ylim=(min(cvi_hist[-1], lap_hist[-1]) - 20, max(cvi_hist[-1], lap_hist[-1]) + 5))
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs("figures", exist_ok=True)
fig.savefig("figures/gp_counts.png", dpi=120)
print("wrote figures/gp_counts.png")
print(f"total {time.perf_counter() - start_clock:.0f} s")
