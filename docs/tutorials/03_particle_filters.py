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
# # Particle filters and smoothing
#
# When the dynamics or the observations are nonlinear, the filtering distributions
# $p(z_t \mid y_{0:t})$ are no longer Gaussian and there is no closed form. A **particle
# filter** represents them by $N$ weighted samples ("particles") and propagates them with
# importance sampling and resampling (sequential Monte Carlo, SMC). In this tutorial we
#
# 1. write a bootstrap particle filter in numpy and compare it with `ps.smc.particle_filter`;
# 2. watch the weights degenerate without resampling, via the effective sample size (ESS);
# 3. compare resampling schemes and see how the variance of the log-likelihood estimate
#    falls with $N$;
# 4. estimate smoothed expectations with **PaRIS** (`ps.smc.paris`) and check them against the
#    exact Kalman smoother on a linear-Gaussian model.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

import probssm as ps  # noqa: E402

# %% [markdown]
# ## The nonlinear growth model
#
# The classic benchmark of Kitagawa (1996) and Gordon, Salmond & Smith (1993):
#
# $$
# z_t = \frac{z_{t-1}}{2} + \frac{25 z_{t-1}}{1 + z_{t-1}^2} + 8\cos(1.2\, t) + v_t, \quad
# v_t \sim \mathcal N(0, 10), \qquad
# y_t = \frac{z_t^2}{20} + w_t, \quad w_t \sim \mathcal N(0, 1),
# $$
#
# with $z_0 \sim \mathcal N(0, 5)$. Observing $z_t^2$ hides the sign of the state, so the
# posterior is often bimodal: no Gaussian approximation fits it. `ps.models.NonlinearGaussianSSM`
# takes the two functions as `f(z_prev, t, inputs)` and `h(z, t, inputs)`; `t` is the index of
# the new state.

# %%
T = 50


def growth(z, t, inputs=None):
    return z / 2 + 25 * z / (1 + z**2) + 8 * jnp.cos(1.2 * t)


def square(z, t, inputs=None):
    return z**2 / 20


ngm = ps.models.NonlinearGaussianSSM(jnp.zeros(1), 5.0 * jnp.eye(1), growth, 10.0 * jnp.eye(1),
                                     square, 1.0 * jnp.eye(1))

rng = np.random.default_rng(3)
z_true = np.zeros(T)
z_true[0] = rng.normal(0, np.sqrt(5.0))
for t in range(1, T):
    z_true[t] = float(growth(z_true[t - 1], t)) + rng.normal(0, np.sqrt(10.0))
y_np = (z_true**2 / 20 + rng.normal(size=T))[:, None]
y = jnp.asarray(y_np)

# %% [markdown]
# ## A bootstrap particle filter by hand
#
# The bootstrap filter proposes from the dynamics and weights by the likelihood:
#
# 1. draw $z_0^{(i)} \sim p(z_0)$;
# 2. at each $t$: *resample* ancestors $a^{(i)}$ in proportion to the previous weights,
#    *propagate* $z_t^{(i)} \sim p(z_t \mid z_{t-1}^{(a^{(i)})})$, *weight*
#    $w_t^{(i)} = p(y_t \mid z_t^{(i)})$;
# 3. the average weight estimates $p(y_t \mid y_{0:t-1})$, and the product of these averages is
#    an **unbiased** estimate of the likelihood $p(y_{0:T-1})$ (its logarithm is biased low).

# %%
def bootstrap_filter_numpy(y, num_particles, rng):
    n = num_particles
    z = rng.normal(0, np.sqrt(5.0), n)
    w = np.full(n, 1.0 / n)
    log_lik, means = 0.0, []
    for t in range(len(y)):
        if t > 0:
            ancestors = rng.choice(n, size=n, p=w)                                # multinomial resampling
            z = np.asarray(growth(z[ancestors], t)) + rng.normal(0, np.sqrt(10.0), n)
        log_w = -0.5 * np.log(2 * np.pi) - 0.5 * (y[t, 0] - z**2 / 20) ** 2        # log N(y_t; z^2/20, 1)
        log_lik += logsumexp(log_w) - np.log(n)
        w = np.exp(log_w - logsumexp(log_w))
        means.append(np.sum(w * z))
    return log_lik, np.array(means)


R, N = 20, 500
rng_pf = np.random.default_rng(0)
ll_numpy = np.array([bootstrap_filter_numpy(y_np, N, rng_pf)[0] for _ in range(R)])
print(f"numpy bootstrap filter, N = {N}: log p(y) ~ {ll_numpy.mean():.2f} +- {ll_numpy.std(ddof=1):.2f}"
      f" (sd over {R} runs)")

# %% [markdown]
# ## `ps.smc.particle_filter`
#
# `ps.smc.particle_filter(key, model, emissions, num_particles)` runs the same algorithm for
# any model (it only needs the model's `initial`, `transition` and `emission` distributions),
# compiled and vectorised over particles. By default it resamples (systematically) only when
# the ESS falls below half the particles. The result carries `log_likelihood`,
# `filtered_means` (T, d), `particles` (T, N, d), `log_weights` (T, N) and `ess` (T,).
#
# A batch of emissions (B, T, D) runs B independent filters, each with its own key: an easy way
# to get replicates. The two implementations estimate the same number, so their averages must
# agree within Monte Carlo error.

# %%
pf = ps.smc.particle_filter(jax.random.PRNGKey(0), ngm, y, N)
R_lib = 40
batch = jnp.tile(y, (R_lib, 1, 1))                               # R_lib replicates of the same series
ll_lib = np.asarray(ps.smc.particle_filter(jax.random.PRNGKey(1), ngm, batch, N, history=False).log_likelihood)
print(f"ps.smc.particle_filter, N = {N}: log p(y) ~ {ll_lib.mean():.2f} +- {ll_lib.std(ddof=1):.2f}")
z_score = (ll_lib.mean() - ll_numpy.mean()) / np.sqrt(ll_lib.var(ddof=1) / R_lib + ll_numpy.var(ddof=1) / R)
print(f"difference of the means in standard errors: {z_score:+.2f}")
assert abs(z_score) < 4

particles = np.asarray(pf.particles[..., 0])                    # (T, N)
weights = np.exp(np.asarray(pf.log_weights))                     # normalised weights (T, N)
fig, ax = plt.subplots(figsize=(10, 3.5))
for t in range(T):
    ax.scatter(np.full(N, t), particles[t], s=40 * weights[t], color="C0", alpha=0.3, lw=0)
ax.plot(z_true, "k-", lw=1, label="true state")
ax.plot(np.asarray(pf.filtered_means[:, 0]), "C1--", lw=1, label="filtered mean")
ax.set_xlabel("t")
ax.set_ylabel("z")
ax.set_title("particles (dot size = weight): the filter keeps both signs when y cannot tell them apart",
             fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Weight degeneracy and the effective sample size
#
# Without resampling, the weights multiply up over time, and after a few steps one particle
# carries nearly all of the weight: the other particles are wasted. The **effective sample
# size** $\mathrm{ESS}_t = 1 / \sum_i (w_t^{(i)})^2$ (with normalised weights) measures this;
# it is $N$ for equal weights and 1 when a single particle has all the weight.
# `ess_threshold` sets when to resample (when ESS $\le$ threshold $\times N$): 1 resamples at
# every step, a tiny value never does.

# %%
ess = {}
for label, threshold in (("never resample", 1e-9), ("adaptive (ESS < N/2)", 0.5), ("every step", 1.0)):
    r = ps.smc.particle_filter(jax.random.PRNGKey(2), ngm, y, N, ess_threshold=threshold)
    ess[label] = np.asarray(r.ess)
    print(f"{label:22s} mean ESS {ess[label].mean():6.1f}, log-likelihood {float(r.log_likelihood):8.2f}")

fig, ax = plt.subplots(figsize=(8, 3))
for label, e in ess.items():
    ax.plot(e, label=label)
ax.set_yscale("log")
ax.set_xlabel("t")
ax.set_ylabel("ESS")
ax.set_title(f"effective sample size, N = {N}", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Resampling schemes and the variance of the log-likelihood
#
# Multinomial resampling (what we wrote by hand) draws the ancestors independently.
# Systematic resampling (the default) uses a single uniform for all of them; it keeps the same
# expected offspring numbers but adds less noise (`"stratified"` and `"residual"` are the other
# two schemes on offer). We compare the two by the spread of the log-likelihood estimate over
# independent runs, then look at how that spread shrinks with $N$: the variance of
# $\log \hat p(y)$ falls roughly like $1/N$ (and grows roughly linearly with $T$). Each new
# $N$ or scheme compiles a new filter, so we keep the list short.

# %%
schemes = ("multinomial", "systematic")
ll_scheme = {s: np.asarray(ps.smc.particle_filter(jax.random.PRNGKey(3), ngm, batch, N, resampling=s,
                                                  history=False).log_likelihood) for s in schemes}
for s, v in ll_scheme.items():
    print(f"{s:12s} N = {N}: mean {v.mean():8.2f}, sd {v.std(ddof=1):.3f}")

sizes = (125, 500, 2000)
ll_size = {n: np.asarray(ps.smc.particle_filter(jax.random.PRNGKey(4), ngm, batch, n,
                                                history=False).log_likelihood) for n in sizes}
var_size = np.array([ll_size[n].var(ddof=1) for n in sizes])
print("variance of log p-hat for N =", sizes, ":", np.round(var_size, 3))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
axes[0].boxplot([ll_scheme[s] for s in schemes])
axes[0].set_xticks(range(1, len(schemes) + 1), schemes, fontsize=8)
axes[0].set_ylabel("log-likelihood estimate")
axes[0].set_title(f"N = {N}, {R_lib} runs each", fontsize=9)
axes[1].loglog(sizes, var_size, "o-", label="observed")
axes[1].loglog(sizes, var_size[-1] * sizes[-1] / np.asarray(sizes), "k--", label="1/N")
axes[1].set_xlabel("N")
axes[1].set_ylabel("variance of log p-hat")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Systematic and multinomial resampling differ little here (the gain of systematic resampling
# is larger when the weights are more even). The variance does fall like $1/N$ once $N$ is large
# enough, but look at the smallest $N$: its variance is far above the $1/N$ line. With too few
# particles the filter now and then loses the state altogether (no particle near the truth, in
# the mode of the wrong sign), and the log-likelihood estimate of that run collapses: a heavy
# lower tail, not a slightly larger spread. This is the practical sign that $N$ is too small.

# %% [markdown]
# ## Smoothing with PaRIS, checked against the Kalman smoother
#
# Smoothing expectations such as $E[z_t \mid y_{0:T-1}]$ cannot be read off the filter's
# particles: after resampling, few distinct ancestors survive far back in time (path
# degeneracy). **PaRIS** (Olsson & Westerborn 2017) estimates smoothed expectations of an
# *additive functional* $S(z_{0:T-1}) = h_0(z_0) + \sum_{t \ge 1} h_t(z_{t-1}, z_t)$ in one
# forward pass, drawing a few backward indices per particle at every step, with memory
# independent of $T$.
#
# The function $h_t(z_{t-1}, z_t) = z_t\, e_t$ (with $e_t$ the $t$-th unit vector of length $T$)
# gives the whole vector of smoothed means $(E[z_t \mid y])_{t}$ at once. On a linear-Gaussian
# model the Kalman smoother gives the exact answer, so we can check PaRIS: an AR(1) state
# observed in noise, and 16 independent replicates (a batch) to estimate the Monte Carlo error.
# (Helper "ergonomics" is adding `ps.smc.smoother(key, model, emissions, num_particles,
# method=...)`, a one-call particle smoother; here we use PaRIS directly.)

# %%
T_lg = 40
lg = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.5 * jnp.eye(1),
                                 jnp.eye(1), 1.0 * jnp.eye(1))
rng = np.random.default_rng(5)
x = np.zeros(T_lg)
x[0] = rng.normal()
for t in range(1, T_lg):
    x[t] = 0.9 * x[t - 1] + rng.normal(0, np.sqrt(0.5))
y_lg = jnp.asarray((x + rng.normal(size=T_lg))[:, None])

kalman = ps.kalman.smoother(lg, y_lg)

smoothed_means = ps.smc.AdditiveFunctional(
    initial=lambda z, y, u: jax.nn.one_hot(0, T_lg) * z[0],
    step=lambda z_prev, z, t, y, u: jax.nn.one_hot(t, T_lg) * z[0])
R_paris, N_paris = 16, 100
res = ps.smc.paris(jax.random.PRNGKey(6), lg, jnp.tile(y_lg, (R_paris, 1, 1)), smoothed_means, N_paris)
est = np.asarray(res.estimate)                                   # (R, T): one estimate per replicate
paris_mean, paris_se = est.mean(0), est.std(0, ddof=1) / np.sqrt(R_paris)
z_scores = (paris_mean - np.asarray(kalman.smoothed_means[:, 0])) / paris_se
print(f"PaRIS vs Kalman smoother: max |z| over {T_lg} steps = {np.abs(z_scores).max():.2f}, "
      f"mean |error| {np.abs(paris_mean - kalman.smoothed_means[:, 0]).mean():.4f}, mean SE {paris_se.mean():.4f}")
assert np.abs(z_scores).max() < 4.5          # agreement within Monte Carlo error (PaRIS bias is O(1/N))

fig, ax = plt.subplots(figsize=(9, 3.3))
ax.plot(x, "k-", lw=1, label="true state")
sd = np.sqrt(np.asarray(kalman.smoothed_covs[:, 0, 0]))
km = np.asarray(kalman.smoothed_means[:, 0])
ax.fill_between(np.arange(T_lg), km - 2 * sd, km + 2 * sd, color="C1", alpha=0.2, label="Kalman smoother, 2 sd")
ax.plot(km, "C1-", label="Kalman smoothed mean")
ax.errorbar(np.arange(T_lg), paris_mean, yerr=2 * paris_se, fmt="o", ms=3, color="C0",
            label=f"PaRIS (N = {N_paris}), 2 SE")
ax.plot(np.asarray(kalman.filtered_means[:, 0]), "C2:", label="filtered mean (not smoothed)")
ax.set_xlabel("t")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. **Systematic resampling by hand.** Replace `rng.choice` in `bootstrap_filter_numpy` by
#    systematic resampling (one uniform $u \sim U(0, 1/N)$, points $u + i/N$, `np.searchsorted`
#    on the cumulative weights). Does the spread of the log-likelihood over runs shrink?
# 2. **Informative observations.** Divide the observation noise of the growth model by 100
#    (`emission_cov = 0.01`). What happens to the ESS and to the variance of the log-likelihood?
#    Why does the bootstrap proposal struggle, and how does a guided `proposal=` help?
# 3. **Variance versus T.** Repeat the variance-versus-N experiment for T = 25, 50 and 100.
#    How should $N$ grow with $T$ to keep the variance of $\log \hat p(y)$ constant?
# 4. **Path degeneracy.** With `pf.ancestors` (the ancestor indices of each step), trace the
#    final particles back to $t = 0$ and count the distinct ancestors at each $t$. Compare
#    with `ps.smc.backward_sample(key, model, pf, 100)`, which draws smoothed paths by backward
#    simulation.
# 5. **Smoothed second moments.** Change the additive functional to also return
#    $z_t^2 e_t$ (a tuple of two vectors) and check the smoothed variances
#    $E[z_t^2 \mid y] - E[z_t \mid y]^2$ against `kalman.smoothed_covs`.
