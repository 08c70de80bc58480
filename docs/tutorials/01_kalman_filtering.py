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
# # Kalman filtering: from first principles to `ps.kalman`
#
# A linear-Gaussian state-space model has a latent state $z_t \in \mathbb{R}^d$ and
# observations $y_t \in \mathbb{R}^p$:
#
# $$
# z_0 \sim \mathcal N(m_0, P_0), \qquad
# z_t = F z_{t-1} + \eta_t,\ \eta_t \sim \mathcal N(0, Q), \qquad
# y_t = H z_t + \varepsilon_t,\ \varepsilon_t \sim \mathcal N(0, R).
# $$
#
# Everything is Gaussian and linear, so the *filtering* distributions
# $p(z_t \mid y_{0:t}) = \mathcal N(m_t, P_t)$ are Gaussian too and can be computed exactly, one
# step at a time. In this tutorial we
#
# 1. write the Kalman filter by hand in numpy and check it against `ps.kalman.filter`;
# 2. smooth with `ps.kalman.smoother` (the Rauch-Tung-Striebel smoother);
# 3. handle missing observations (NaN);
# 4. use the exact log-likelihood to estimate a parameter (a grid, then `ps.learn.mle`);
# 5. compare the sequential and the parallel (associative-scan) filters.

# %%
# %matplotlib inline
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)   # exact engines are compared at 1e-8: use float64
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import probssm as ps  # noqa: E402

# %% [markdown]
# ## A tracking model
#
# An object moves along a line with a nearly constant velocity; we measure its position with
# noise. The state is $z_t = (\text{position}, \text{velocity})$, the time step is $\Delta = 1$:
#
# $$
# F = \begin{pmatrix} 1 & \Delta \\ 0 & 1 \end{pmatrix}, \qquad
# Q = q \begin{pmatrix} \Delta^3/3 & \Delta^2/2 \\ \Delta^2/2 & \Delta \end{pmatrix}, \qquad
# H = \begin{pmatrix} 1 & 0 \end{pmatrix}, \qquad R = r.
# $$
#
# `ps.models.LinearGaussianSSM` holds exactly these matrices. We simulate a trajectory with a
# few lines of numpy (`ps.sample(key, model, T)` draws one from any model too, but compiles a
# sampler first: for a one-off draw of a model this simple, numpy is quicker).

# %%
T = 100
dt = 1.0


def tracking_model(q=0.05, r=4.0):
    F = jnp.array([[1.0, dt], [0.0, 1.0]])
    Q = q * jnp.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
    H = jnp.array([[1.0, 0.0]])
    R = r * jnp.eye(1)
    return ps.models.LinearGaussianSSM(
        initial_mean=jnp.zeros(2), initial_cov=jnp.diag(jnp.array([10.0, 1.0])),
        transition_matrix=F, transition_cov=Q, emission_matrix=H, emission_cov=R)


def simulate(model, T, seed):
    rng = np.random.default_rng(seed)
    m0, P0, F, Q, H, R = (np.asarray(a) for a in (model.initial_mean, model.initial_cov, model.transition_matrix,
                                                    model.transition_cov, model.emission_matrix, model.emission_cov))
    z = np.zeros((T, len(m0)))
    z[0] = rng.multivariate_normal(m0, P0)
    for t in range(1, T):
        z[t] = rng.multivariate_normal(F @ z[t - 1], Q)
    y = z @ H.T + rng.multivariate_normal(np.zeros(len(R)), R, size=T)
    return z, y


model = tracking_model()
states, y_np = simulate(model, T, seed=0)
y = jnp.asarray(y_np)
print("states", states.shape, "observations", y.shape)

# %% [markdown]
# ## The Kalman filter by hand
#
# Each step alternates two operations on a Gaussian belief $\mathcal N(m, P)$:
#
# * **predict** (push the belief through the dynamics):
#   $m^- = F m$, $P^- = F P F^\top + Q$;
# * **update** (condition on $y_t$): the innovation $v = y_t - H m^-$ has covariance
#   $S = H P^- H^\top + R$; the Kalman gain is $K = P^- H^\top S^{-1}$, and
#   $m = m^- + K v$, $P = (I - K H) P^-$.
#
# The innovations also give the log-likelihood for free, because
# $p(y_{0:T-1}) = \prod_t p(y_t \mid y_{0:t-1})$ and
# $p(y_t \mid y_{0:t-1}) = \mathcal N(y_t; H m^-, S)$. At $t = 0$ the "prediction" is the prior
# $\mathcal N(m_0, P_0)$. A missing observation (NaN) simply skips the update.

# %%
def kalman_filter_numpy(m0, P0, F, Q, H, R, y):
    m, P = np.asarray(m0, float), np.asarray(P0, float)
    F, Q, H, R = (np.asarray(a, float) for a in (F, Q, H, R))
    means, covs, log_lik = [], [], 0.0
    for t in range(len(y)):
        if t > 0:                                     # predict
            m = F @ m
            P = F @ P @ F.T + Q
        if not np.any(np.isnan(y[t])):                # update (skipped when y_t is missing)
            v = y[t] - H @ m
            S = H @ P @ H.T + R
            K = np.linalg.solve(S, H @ P).T           # P H^T S^{-1}  (S and P are symmetric)
            m = m + K @ v
            P = P - K @ S @ K.T
            log_lik += -0.5 * (len(v) * np.log(2 * np.pi) + np.linalg.slogdet(S)[1]
                               + v @ np.linalg.solve(S, v))
        means.append(m)
        covs.append(P)
    return np.array(means), np.array(covs), log_lik


args = (model.initial_mean, model.initial_cov, model.transition_matrix, model.transition_cov,
        model.emission_matrix, model.emission_cov)
means_np, covs_np, ll_np = kalman_filter_numpy(*args, y_np)
print(f"hand-written filter: log p(y) = {ll_np:.6f}")

# %% [markdown]
# ## The same with `ps.kalman.filter`
#
# `ps.kalman.filter(model, emissions)` returns a `FilterResult` with `log_likelihood`,
# `filtered_means` (T, d) and `filtered_covs` (T, d, d). It is a compiled `lax.scan`, so it
# also runs under `jax.jit`, `jax.grad` and `jax.vmap`.

# %%
filt = ps.kalman.filter(model, y)
print(f"ps.kalman.filter:    log p(y) = {float(filt.log_likelihood):.6f}")
np.testing.assert_allclose(filt.filtered_means, means_np, rtol=1e-8, atol=1e-8)
np.testing.assert_allclose(filt.filtered_covs, covs_np, rtol=1e-8, atol=1e-8)
np.testing.assert_allclose(filt.log_likelihood, ll_np, rtol=1e-10)
print("hand-written and library filters agree")

# %% [markdown]
# ## Smoothing
#
# The filter uses the past only. The **smoother** conditions every $z_t$ on *all* the data,
# $p(z_t \mid y_{0:T-1})$, with a backward pass over the filtered moments (Rauch-Tung-Striebel):
#
# $$
# G_t = P_t F^\top (P^-_{t+1})^{-1}, \quad
# m^s_t = m_t + G_t (m^s_{t+1} - m^-_{t+1}), \quad
# P^s_t = P_t + G_t (P^s_{t+1} - P^-_{t+1}) G_t^\top .
# $$
#
# `ps.kalman.smoother` returns the filter's fields plus `smoothed_means` and `smoothed_covs`.
# The smoothed band is narrower than the filtered one: later data carry information about the
# past.

# %%
smooth = ps.kalman.smoother(model, y)
t_axis = np.arange(T)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, i, name in ((axes[0], 0, "position"), (axes[1], 1, "velocity")):
    ax.plot(t_axis, states[:, i], color="k", lw=1, label="true state")
    for res_mean, res_cov, label, c in ((filt.filtered_means, filt.filtered_covs, "filtered", "C0"),
                                        (smooth.smoothed_means, smooth.smoothed_covs, "smoothed", "C1")):
        m, s = np.asarray(res_mean[:, i]), np.sqrt(np.asarray(res_cov[:, i, i]))
        ax.plot(t_axis, m, color=c, label=label)
        ax.fill_between(t_axis, m - 2 * s, m + 2 * s, color=c, alpha=0.2)
    if i == 0:
        ax.plot(t_axis, y[:, 0], ".", color="0.5", ms=3, label="observations")
    ax.set_title(name)
    ax.set_xlabel("t")
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()

print("mean filtered sd of the velocity:", float(jnp.sqrt(filt.filtered_covs[:, 1, 1]).mean()))
print("mean smoothed sd of the velocity:", float(jnp.sqrt(smooth.smoothed_covs[:, 1, 1]).mean()))

# %% [markdown]
# ## Missing data
#
# In probssm **NaN means missing**: the engines drop those entries exactly (for a multivariate
# observation, a partly missing row keeps its observed entries). Here the sensor fails for
# twenty steps; during the gap the filter only predicts, so its uncertainty grows, and the
# smoother bridges the gap from both sides.

# %%
y_gap = y.at[40:60].set(jnp.nan)
filt_gap = ps.kalman.filter(model, y_gap)
smooth_gap = ps.kalman.smoother(model, y_gap)

means_gap_np, _, ll_gap_np = kalman_filter_numpy(*args, np.asarray(y_gap))
np.testing.assert_allclose(filt_gap.filtered_means, means_gap_np, rtol=1e-8, atol=1e-8)
np.testing.assert_allclose(filt_gap.log_likelihood, ll_gap_np, rtol=1e-10)
print(f"log p(observed y) = {float(filt_gap.log_likelihood):.4f} (hand-written: {ll_gap_np:.4f})")

fig, ax = plt.subplots(figsize=(8, 3.5))
ax.axvspan(40, 59, color="0.9", label="missing")
ax.plot(t_axis, states[:, 0], color="k", lw=1, label="true position")
ax.plot(t_axis, y_gap[:, 0], ".", color="0.5", ms=3)
for res_mean, res_cov, label, c in ((filt_gap.filtered_means, filt_gap.filtered_covs, "filtered", "C0"),
                                    (smooth_gap.smoothed_means, smooth_gap.smoothed_covs, "smoothed", "C1")):
    m, s = np.asarray(res_mean[:, 0]), np.sqrt(np.asarray(res_cov[:, 0, 0]))
    ax.plot(t_axis, m, color=c, label=label)
    ax.fill_between(t_axis, m - 2 * s, m + 2 * s, color=c, alpha=0.2)
ax.set_xlabel("t")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The log-likelihood and a quick maximum-likelihood fit
#
# The filter gives the exact log-likelihood $\log p(y_{0:T-1} \mid \theta)$, a smooth function
# of the parameters. Let us pretend we do not know the process-noise scale $q$ (the truth is
# 0.05). `ps.kalman.log_likelihood` is traceable, so `jax.vmap` evaluates a whole grid in one
# compiled call.

# %%
log_q_grid = jnp.linspace(np.log(1e-3), np.log(2.0), 60)
grid_ll = jax.jit(jax.vmap(lambda lq: ps.kalman.log_likelihood(tracking_model(q=jnp.exp(lq)), y)))(log_q_grid)
q_grid_best = float(jnp.exp(log_q_grid[jnp.argmax(grid_ll)]))
print(f"grid maximiser: q = {q_grid_best:.4f}")

# %% [markdown]
# The grid does not scale to many parameters; gradients do. Because `ps.kalman.log_likelihood`
# is an ordinary JAX function, `jax.value_and_grad` differentiates it through the whole filter,
# and any optimiser can use it. We optimise over $(\log q, \log r)$ so that both stay positive,
# with scipy's L-BFGS.
#
# (`ps.learn.mle(model, y, num_iters, fixed=...)` does this for every learnable array of a model
# at once, covariances included, and `ps.learn.em` fits the same model by expectation-maximisation;
# both are worth trying, see the exercises.)

# %%
from scipy.optimize import minimize  # noqa: E402


@jax.jit
def negative_ll_and_grad(log_theta):
    def nll(lt):
        return -ps.kalman.log_likelihood(tracking_model(q=jnp.exp(lt[0]), r=jnp.exp(lt[1])), y)
    return jax.value_and_grad(nll)(log_theta)


path = [np.log([1.0, 1.0])]
opt = minimize(lambda lt: tuple(np.asarray(v) for v in negative_ll_and_grad(jnp.asarray(lt))), path[0],
               jac=True, method="L-BFGS-B", callback=lambda lt: path.append(np.copy(lt)))
q_hat, r_hat = np.exp(opt.x)
print(f"MLE: q = {q_hat:.4f} (truth 0.05), r = {r_hat:.3f} (truth 4.0), "
      f"log-likelihood {-opt.fun:.3f} in {opt.nit} iterations")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(np.exp(log_q_grid), grid_ll)
axes[0].axvline(0.05, color="k", ls="--", label="true q")
axes[0].set_xscale("log")
axes[0].set_xlabel("q (r = 4 fixed)")
axes[0].set_ylabel("log p(y | q)")
axes[0].legend()
path = np.exp(np.array(path))
axes[1].plot(path[:, 0], path[:, 1], "o-", ms=3, label="L-BFGS path")
axes[1].plot(0.05, 4.0, "k*", ms=10, label="truth")
axes[1].set_xscale("log")
axes[1].set_xlabel("q")
axes[1].set_ylabel("r")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sequential and parallel filtering
#
# The recursion above is inherently sequential: $T$ dependent steps. Särkkä & García-Fernández
# (2021) rewrote the filter as an **associative scan**: each step becomes an element of a
# monoid and the prefix "sums" are combined in $O(\log T)$ parallel depth. On a GPU that wins
# for long series; on a small CPU the sequential scan is usually faster. Both give the same
# numbers, selected by `parallel=`:

# %%
filt_par = ps.kalman.filter(model, y, parallel=True)
np.testing.assert_allclose(filt_par.filtered_means, filt.filtered_means, rtol=1e-7, atol=1e-8)
np.testing.assert_allclose(filt_par.log_likelihood, filt.log_likelihood, rtol=1e-10)

for parallel in (False, True):
    ps.kalman.filter(model, y, parallel=parallel).log_likelihood.block_until_ready()   # compiled
    t0 = time.perf_counter()
    for _ in range(20):
        ps.kalman.filter(model, y, parallel=parallel).log_likelihood.block_until_ready()
    print(f"parallel={parallel}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms per call (T = {T})")

# %% [markdown]
# ## Exercises
#
# 1. **Joseph form.** Replace $P = P^- - K S K^\top$ in `kalman_filter_numpy` by the Joseph
#    form $(I - KH) P^- (I - KH)^\top + K R K^\top$. Do the results change? Try a nearly
#    diffuse prior (`initial_cov` = 1e12) in float32 and in float64.
# 2. **Write the smoother.** Implement the RTS backward pass in numpy from the filtered moments
#    (you will need the predicted moments $m^-_{t+1}, P^-_{t+1}$) and check it against
#    `ps.kalman.smoother(...).smoothed_means` with `np.testing.assert_allclose`.
# 3. **Forecasting.** Use `ps.kalman.forecast(model, y, 20)` to predict the next 20 positions,
#    and plot the forecast mean with a 95% band. How fast does the band grow, and why?
#    (Hint: the velocity uncertainty integrates into the position.)
# 4. **Both variances.** Make a 2-D grid over $(\log q, \log r)$ with a nested `jax.vmap` and
#    draw the contours of the log-likelihood. Is the maximiser near the truth? Repeat with
#    T = 1000 (how does the curvature change?).
# 5. **Gradients.** `jax.grad(lambda lq: ps.kalman.log_likelihood(tracking_model(q=jnp.exp(lq)), y))`
#    gives the score. Check it against a central finite difference.
