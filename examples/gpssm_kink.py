# %% [markdown]
# # Learning the "kink" transition function with a GPSSM
#
# A one-dimensional state-space model with a sharply nonlinear transition
# (the kink function of the GPSSM literature, used by Fan, Bonilla, O'Kane & Sisson, ICML 2023)::
#
#     x_t = f(x_{t-1}) + N(0, 0.05),   f(x) = 0.8 + (x + 0.2) (1 - 5 / (1 + exp(-2 x)))
#     y_t = x_t + N(0, 0.1)
#
# Both 0.05 and 0.1 are variances. The process-noise variance 0.05 is the one the kink
# experiments use; the paper's emission noise could not be checked here, so R = 0.1 (a variance)
# is our choice. T = 120 observations. We fit a GPSSM (SE kernel, 16 inducing points, zero mean
# function so f = g) four ways, and a neural SSM two ways:
#
# * free-form VI (`free_form_vi`, method "free_form"): q(U, x) is a set of SGHMC chains
#   targeting p(U, x | y, theta); the kernel, Z, Q and R follow Adam on the sample-estimated ELBO;
# * its collapsed variant (method "collapsed"): the chains run over x alone, U integrated out;
# * the PRSSM baseline (Doerr et al., ICML 2018): Gaussian q(U), q(x) the prior dynamics;
# * particle Gibbs (`gpssm_particle_gibbs`): conditional SMC for x, exact draws of U, Adam on theta;
# * a neural SSM (MLP transition) by particle maximum likelihood, with the PPG score and with the
#   HMC-SMC score.
#
# and compare the learned mean of f on a grid of [-3, 1] with the truth (RMSE) and the fraction of
# the grid where the truth lies inside the learned 2-sigma band (targets: RMSE <= 0.2, >= 90%).

# %%
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import probssm as ps  # noqa: E402

Q, R, T, M = 0.05, 0.1, 120, 16


def kink(x):
    return 0.8 + (x + 0.2) * (1.0 - 5.0 / (1.0 + np.exp(-2.0 * x)))


def simulate(seed):
    rng = np.random.default_rng(seed)
    x = np.zeros(T)
    x[0] = rng.normal()
    for t in range(1, T):
        x[t] = kink(x[t - 1]) + np.sqrt(Q) * rng.normal()
    return x, (x + np.sqrt(R) * rng.normal(size=T))[:, None]


x_true, y = simulate(0)

# %% [markdown]
# The starting model: unit lengthscale and variance, Q and R at twice the truth (both learned),
# Z spread over the range of the data (learned). The emission (C = 1, d = 0) and the initial state
# N(0, 1) are held fixed: with d free the level of x is not identified.

# %%
kernel = ps.models.ARDSquaredExponential(jnp.ones(1), 1.0)
Z = jnp.linspace(float(y.min()) - 0.5, float(y.max()) + 0.5, M)[:, None]
start = ps.models.GPSSM(kernel, Z, jnp.zeros((M, 1)), 2 * Q, 2 * R, mean_function="zero")
fixed = ("emission_offset", "initial_mean", "initial_cov")
grid = np.linspace(-3.0, 1.0, 200)


def score(model, inducing_samples):
    fm = ps.learn.transition_function_moments(model, inducing_samples, jnp.asarray(grid)[:, None])
    mean, sd = np.asarray(fm.mean[:, 0]), np.sqrt(np.asarray(fm.variance[:, 0]))
    rmse = float(np.sqrt(np.mean((mean - kink(grid)) ** 2)))
    coverage = float(np.mean(np.abs(mean - kink(grid)) <= 2.0 * sd))
    return mean, sd, rmse, coverage


results = {}


def report(name, fitted, history, seconds):
    mean, sd, rmse, coverage = score(fitted, history.inducing_outputs)
    results[name] = (fitted, mean, sd)
    print(f"{name:22s} RMSE of the mean of f on [-3, 1]: {rmse:.3f}   truth inside the 2-sigma band: "
          f"{100 * coverage:.0f}%   Q = {float(fitted.transition_noise[0]):.3f}   "
          f"R = {float(fitted.emission_noise[0]):.3f}   ({seconds:.0f} s incl. compilation)")


runs = {"free-form VI (SGHMC)": dict(method="free_form", num_iters=1500, learning_rate=1e-2),
        "collapsed free-form VI": dict(method="collapsed", num_iters=1500, learning_rate=1e-2),
        "PRSSM baseline": dict(method="prssm", num_iters=1500, learning_rate=2e-2)}
for name, kw in runs.items():
    t0 = time.perf_counter()
    fitted, history = ps.learn.free_form_vi(jax.random.PRNGKey(1), start, y, kw["num_iters"], method=kw["method"],
                                   learning_rate=kw["learning_rate"], fixed=fixed, progress=False)
    jax.block_until_ready(history.objective)
    report(name, fitted, history, time.perf_counter() - t0)


# %% [markdown]
# The same model learned by particle Gibbs (`gpssm_particle_gibbs`): a Gibbs sampler over the
# states (conditional SMC with ancestor sampling, 32 particles) and U (its exact Gaussian
# conditional), with an Adam step on theta along the complete-data gradient at each draw (by
# Fisher's identity an unbiased estimate of the gradient of log p(y | theta)).

# %%
t0 = time.perf_counter()
fitted, history = ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(1), start, y, 1500, num_particles=32,
                                                num_samples=500, learning_rate=1e-2, fixed=fixed, progress=False)
jax.block_until_ready(history.objective)
report("particle Gibbs", fitted, history, time.perf_counter() - t0)

# %% [markdown]
# A neural SSM (`ps.models.NeuralSSM`, an MLP with two hidden layers of 32 tanh units, f = MLP)
# learned by particle maximum likelihood: Adam along a particle estimate of the score (Fisher's
# identity, `ps.learn.mle`), 100 particles, 1000 steps, two ways: the PPG estimate (Parisian
# particle Gibbs, `estimator="ppg"`) and the HMC-SMC estimate (`estimator="hmc_smc"`: a tempered
# particle filter whose particles are moved by HMC, the score summed along its particle paths).
# Each gives a point estimate of f (no band).

# %%
import optax  # noqa: E402

for estimator in ("ppg", "hmc_smc"):
    name = f"neural SSM ({estimator.upper().replace('_', '-')})"
    t0 = time.perf_counter()
    neural = ps.models.NeuralSSM(jax.random.PRNGKey(0), 1, 2 * Q, 2 * R, width_size=32, depth=2, residual=False)
    neural, _ = ps.learn.mle(neural, y, 1000, estimator=estimator, key=jax.random.PRNGKey(1), num_particles=100,
                             optimizer=optax.adam(1e-2), fixed=fixed, progress=False)
    neural_mean = np.asarray(jax.vmap(lambda x: neural.network(x[None]))(jnp.asarray(grid))[:, 0])
    results[name] = (None, neural_mean, np.zeros_like(grid))
    print(f"{name:22s} RMSE of f on [-3, 1]: {np.sqrt(np.mean((neural_mean - kink(grid)) ** 2)):.3f}   "
          f"Q = {float(neural.transition_noise[0]):.3f}   R = {float(neural.emission_noise[0]):.3f}   "
          f"({time.perf_counter() - t0:.0f} s incl. compilation)")

# %% [markdown]
# Measured on this data set (seed 0): free-form RMSE 0.15 with 100% of the grid inside the band;
# collapsed RMSE 0.12, 100% (Q learned at 0.059); PRSSM RMSE 1.35, 54%; particle Gibbs RMSE 0.17,
# 100% (0.14 when it runs alone, as in tests/test_gpssm_pg.py: the sampler amplifies last-bit
# differences of the compiled code). The results depend on the draw of the data: on seed 1 we measured free-form RMSE
# 0.25-0.28 and 75-86% coverage (three sampler settings), collapsed 0.23 and 76%, particle Gibbs
# 0.27 and 63% (seeds 2 and 3: 0.21 and 0.17), the learned f rounding off the peak near x = -0.5
# with too narrow a band there; free-form learns Q at ~0.12 (true 0.05) on both seeds: the misfit
# of f goes into the process noise. The neural SSM by PPG: RMSE 0.19 (seed 0), 0.31 (seed 1); by
# HMC-SMC: 0.26 (seed 0), 0.28 (seed 1), both within the 0.3 target for particle learning (with
# 2000 steps instead of 1000: 0.18 and 0.34). A whole HMC-SMC fit took 44-76 s on one core,
# compilation included, against 70-84 s for PPG.
#
# PRSSM's q(x) is the prior's free simulation and ignores the observations, so over 120 steps
# of these dynamics its trajectories lose the data; it explains them by a large R and learns
# little of f. The free-form posterior over (U, x) conditions the states on the data.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
axes = axes.ravel()
for ax, (name, (fitted, mean, sd)) in zip(axes, results.items()):
    ax.plot(x_true[:-1], x_true[1:], ".", color="0.6", ms=4, label="data $(x_{t-1}, x_t)$")
    ax.plot(grid, kink(grid), "k--", lw=1.5, label="true f")
    ax.plot(grid, mean, color="C0", label="learned mean of f")
    ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.25, label="2-sigma band")
    if fitted is not None:  # the GPSSMs' inducing inputs
        ax.plot(np.asarray(fitted.inducing_inputs[:, 0]), np.full(M, -4.5), "|", color="C3", ms=8, label="Z")
    ax.set_xlim(-3.5, 1.5)
    ax.set_ylim(-5, 2.5)
    ax.set_title(name)
    ax.set_xlabel("$x_{t-1}$")
axes[0].set_ylabel("$x_t$")
axes[3].set_ylabel("$x_t$")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"), exist_ok=True)
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "gpssm_kink.png"), dpi=120)
