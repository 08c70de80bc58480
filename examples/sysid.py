# %% [markdown]
# # Five system-identification benchmarks: GPSSMs by free-form VI, collapsed VI and PRSSM, a neural SSM by PPG, against a linear floor
#
# The standard suite of the GP state-space model papers (actuator, ballbeam, drive, dryer, gas
# furnace; `ps.datasets.load_sysid`): one input, one output; the first half of each record
# trains and the second half tests, both standardised with the training half's mean and standard
# deviation. Latent dimension 4 and 100 inducing points, as in the papers' protocol.
#
# Models, all with x_t = f(x_{t-1}, u_{t-1}) + N(0, diag(q)) and y_t = x_t[0] + d + N(0, r):
#
# 1. the linear floor: a linear-Gaussian SSM fitted by EM (`ps.learn.em`, 300 iterations, its
#    own basis, full Q; the initial covariance held at I);
# 2. GPSSM, free-form VI (`ps.learn.free_form_vi`, Fan et al., ICML 2023): f(x, u) = A [x; u] + b
#    + g(x, u), g a sparse GP (ARD squared exponential, M = 100 inducing points) whose posterior
#    q(U, x) is a set of 16 SGHMC chains (each kept sample's U redrawn exactly given its x), the
#    kernel, Z, d and the initial mean by Adam;
# 3. the same GPSSM with U integrated out of the chains' target (`method="collapsed"`, 4 chains);
# 4. the same GPSSM by the PRSSM baseline (`method="prssm"`, Doerr et al., ICML 2018: Gaussian
#    q(U), q(x) the model's own dynamics);
# 5. a neural SSM (`ps.models.NeuralSSM`): f(x, u) = A [x; u] + b + MLP(x, u) (two hidden layers
#    of 32 tanh units, last layer starting at 0), learned by particle maximum likelihood with the
#    PPG score (`ps.learn.mle(..., estimator="ppg")`, 100 particles).
#
# Every nonlinear model starts at the linear fit: its state is rotated and scaled so that the
# output reads x[0] (the fixed C = e_1^T) and every hidden coordinate has the output coordinate's
# process noise (the diagonal of Q is constant); A and b are the linear fit's dynamics in that
# basis (eigenvalues of modulus above 0.999 pulled back to 0.999: on ballbeam EM's fit is
# slightly unstable), q the diagonal of its process noise (clipped
# to [1e-4, 0.1]), r its output noise. The free-form and collapsed chains start at the linear
# smoother's states (`initial_states=`). Held at the start (`SYSID_FIXED`): A, b, q, r and the
# initial covariance, so the nonlinear part (g, or the MLP) is what each method learns. Why:
# with A, b, q and r learned as well, the noisy SGHMC gradients moved the linear part and the
# noise levels, and free simulation over hundreds of steps was worse than the linear floor's
# (dryer 0.23-0.37 against 0.081). The GP's prior variance starts at q: a residual the data do
# not ask for stays at the size of the noise the linear fit already allows. The GP has one prior
# variance for all outputs, which is why the basis equalises the noise: in the earlier basis
# (hidden coordinates of unit spread) gas furnace's q was 0.0006 on the output coordinate and
# 0.04-0.08 on the hidden ones, so a prior variance at their mean (0.05) was 80 times the output
# coordinate's noise variance; free-form VI was then behind the linear floor there on two
# seeds of three (0.3652 and 0.3714 against 0.3545), and also with the hyperparameters held
# (0.357-0.366), and particle Gibbs (`ps.learn.gpssm_particle_gibbs`) on the same held model gave
# 0.361-0.373: the model, not the sampler.
#
# Evaluation on the held-out half, in standardised units, the same for every model:
#
# * free simulation: the state is filtered through the training half (outputs and inputs) and
#   then propagated through the test half by the test inputs alone; no test output is read. For
#   the linear model that is the Kalman filter with the test outputs marked missing (its moments
#   there are multi-step forecasts); for the others a bootstrap particle filter
#   (`ps.smc.particle_filter_sequence`, 200 particles) on the same series, once per sample of U
#   (64 samples, spread evenly over the kept chain samples for free-form and collapsed, draws from
#   q(U) for PRSSM; 64 keys for the neural SSM), the predictions pooled (mean of the means; mean
#   of the variances plus variance of the means);
# * RMSE of the predicted output mean against the test outputs;
# * test log-lik: mean over the test steps of log N(y_t; predicted mean, predicted variance),
#   output noise included. Every test step is a forecast from the end of the training half.
#
# Measured (this script as it stands, seed 0, two processes of one core each on a 2-core CPU:
# actuator and dryer in one, the other three in the other; 31 and 29 minutes). RMSE / test log-lik:
#
# | record | linear (EM) | GPSSM start | free-form VI | collapsed VI | PRSSM | neural SSM (PPG) |
# | --- | --- | --- | --- | --- | --- | --- |
# | actuator | 0.696 / -1.35 | 0.697 / -1.24 | 0.562 / -0.74 | 0.521 / -0.69 | 0.681 / -2.51 | 0.399 / -0.51 |
# | ballbeam | 3.2e4 / -6.63 | 1.170 / -1.34 | 2.339 / -2.02 | 2.372 / -2.07 | 1.001 / -2.49 | 1.297 / -3.27 |
# | drive | 1.0808 / -1.50 | 1.0816 / -1.64 | 1.0751 / -1.49 | 1.0809 / -1.49 | 0.919 / -2.26 | 0.998 / -1.38 |
# | dryer | 0.0808 / 1.09 | 0.0808 / 0.85 | 0.0796 / 0.69 | 0.0797 / 0.73 | 0.113 / 0.74 | 0.112 / 0.78 |
# | gas furnace | 0.3545 / -10.66 | 0.3542 / -0.75 | 0.3499 / -0.65 | 0.3476 / -0.65 | 0.407 / -3.99 | 0.362 / -11.79 |
#
# Free-form VI has a lower RMSE than the linear floor on all five records, and a lower one than
# PRSSM on three (actuator, dryer, gas furnace). Other seeds (`SYSID_SEED=1`, `=2`: other keys
# for the learners; `SYSID_METHODS=free_form`) keep it ahead of the floor on every record (floor
# in brackets): actuator 0.5671 and 0.5692 (0.696), ballbeam 2.575 and 3.228 (3.2e4), drive
# 1.0748 and 1.0757 (1.0808), dryer 0.0793 and 0.0787 (0.0808), gas furnace 0.3507 and 0.3511
# (0.3545).
#
# The 16 chains matter on gas furnace: with 4 chains x 64 kept rounds (same basis) seeds 0-2
# gave 0.3452, 0.3491 and 0.3633, with 16 x 16 0.3499, 0.3507 and 0.3511. Each evaluation pools
# 64 samples of U; with 8 its Monte Carlo error (up to 0.007 on gas furnace) exceeded the margins.
#
# Free-form VI's test log-lik is below the floor's on dryer: its predictive variance is
# miscalibrated (a Gaussian with the variance its RMSE implies would score about 1.11, the floor
# scores 1.09). On ballbeam the GP learners leave the stabilised start (1.17) for worse.
#
# Wall time of a whole fit (300 steps, compilation included; per record: gas furnace T = 148,
# drive 250, actuator 512, ballbeam and dryer 500), measured in the run above: free-form 46, 87,
# 183, 185 and 204 s; collapsed 47, 74, 125, 123 and 122 s; PRSSM 18, 27, 43, 41 and 37 s; neural
# PPG 57, 89, 185, 182 and 160 s; EM 6-8 s. One step once compiled (a 150-step fit run twice,
# the second call timed over its 266 rounds; every round moves the chains by 5 SGHMC steps and
# takes one gradient in theta, and they cost the same; one process per core): free-form VI (16
# chains) 80, 150, 392, 383 and 372 ms; collapsed (4 chains) 73, 108, 243, 201 and 178 ms;
# compilation about 10-20 s.
#
# Inputs: row t of the input array holds u_{t-1}, the control that drives the step into x_t (the
# convention of `GPSSM` and `LinearGaussianSSM`); no direct feed-through. Settings are in
# `SETTINGS` (reduced from the papers' for a 2-core CPU); seeds are fixed per record.
# `SYSID_RECORDS=gas_furnace,drive` runs a subset, `SYSID_METHODS=free_form,prssm` a subset of
# the learners, `SYSID_SEED=1` other keys for the learners. The process pins itself to one CPU
# core (the jaxlib CPU deadlock in the README; `SYSID_ALL_CORES=1` skips it): two subsets can run
# side by side, one under `taskset -c 1`.
#
# Published numbers: not quoted. PR-SSM (Doerr et al., ICML 2018) and Fan et al. (ICML 2023)
# report free-simulation RMSE on these five records with the same split points, but their tables
# could not be retrieved in this environment, so no value is claimed here.

# %%
import os
import time

if hasattr(os, "sched_setaffinity") and not os.environ.get("SYSID_ALL_CORES"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import probssm as ps  # noqa: E402

T_START = time.perf_counter()
LATENT = 4
SETTINGS = dict(
    num_inducing=int(os.environ.get("SYSID_M", 100)),
    em_iters=300,
    # free-form VI: 16 chains x 16 kept rounds (with 4 chains x 64 the gas-furnace RMSE spread over seeds was 0.018)
    free_form=dict(num_iters=int(os.environ.get("SYSID_ITERS", 300)), num_chains=16, sghmc_steps=5, num_warmup=500,
                   num_samples=16, step_size=float(os.environ.get("SYSID_STEP", 0.005)), friction=20.0,
                   learning_rate=float(os.environ.get("SYSID_LR", 3e-3))),
    prssm=dict(num_iters=int(os.environ.get("SYSID_PRSSM_ITERS", 300)), num_chains=4, num_samples=16,
               learning_rate=float(os.environ.get("SYSID_LR", 3e-3))),
    neural=dict(num_iters=int(os.environ.get("SYSID_NEURAL_ITERS", 300)), num_particles=100,
                learning_rate=float(os.environ.get("SYSID_LR", 3e-3))),
    eval_samples=64,   # with 8 the RMSE's Monte Carlo error (up to 0.007 on gas furnace) exceeded the margins
    particles=200,
)
METHODS = os.environ.get("SYSID_METHODS", "free_form,collapsed,prssm,neural").split(",")
RECORDS = os.environ.get("SYSID_RECORDS", ",".join(ps.datasets.SYSID_NAMES)).split(",")
FIXED = tuple(os.environ.get("SYSID_FIXED", "initial_cov,transition_noise,emission_noise,mean_weights,mean_offset").split(","))
# the same choice for the neural SSM: its linear part (network.weights, network.offset) is the GPSSM's mean function
NEURAL_FIXED = tuple({"mean_weights": "network.weights", "mean_offset": "network.offset"}.get(f, f) for f in FIXED)
SETTINGS["collapsed"] = dict(SETTINGS["free_form"], num_chains=4, num_samples=64)   # the same sampler, 4 chains
LABELS = {"free_form": "GPSSM free-form VI", "collapsed": "GPSSM collapsed VI", "prssm": "GPSSM PRSSM", "neural": "neural SSM (PPG)"}


def lagged(u):
    """Row t = u_{t-1} (row 0 repeats u_0: no earlier control is recorded; no transition reads it)."""
    return np.concatenate([u[:1], u[:-1]], axis=0)


# %% [markdown]
# ## The linear floor, and a GPSSM that starts as the linear model

# %%
def fit_linear(y, u, seed):
    rng = np.random.default_rng(seed)
    start = ps.models.LinearGaussianSSM(
        jnp.zeros(LATENT), jnp.eye(LATENT), 0.9 * jnp.eye(LATENT) + 0.05 * rng.normal(size=(LATENT, LATENT)),
        0.1 * jnp.eye(LATENT), rng.normal(size=(1, LATENT)) / np.sqrt(LATENT), 0.1 * jnp.eye(1),
        transition_offset=jnp.zeros(LATENT), emission_offset=jnp.zeros(1),
        transition_input_matrix=0.1 * rng.normal(size=(LATENT, 1)))
    # the initial covariance stays at I: with one sequence EM would shrink it to the smoother's
    fitted, _ = ps.learn.em(start, y, SETTINGS["em_iters"], inputs=u, fixed=("initial_cov",), progress=False)
    return fitted


def output_moments_linear(model, y_train, u_all):
    """Free simulation of the linear model: the Kalman filter with the test outputs missing."""
    T = y_train.shape[0]
    y_all = np.concatenate([y_train, np.full((u_all.shape[0] - T, 1), np.nan)], axis=0)
    f = ps.kalman.filter(model, jnp.asarray(y_all), inputs=jnp.asarray(u_all))
    H, d, R = model.emission_matrix, model.emission_offset, model.emission_cov
    mean = f.filtered_means[T:] @ H.T + d
    var = jnp.einsum("pi,tij,pj->tp", H, f.filtered_covs[T:], H) + jnp.diag(R)
    return np.asarray(mean[:, 0]), np.asarray(var[:, 0])


def stable(F, radius=0.999):
    """F with every eigenvalue of modulus above ``radius`` pulled back onto that circle. Why: EM's
    one-step fit can be slightly unstable (ballbeam), harmless for filtering but not for hundreds of
    steps of free simulation, where the GPSSM would start from an exploding mean."""
    lam, V = np.linalg.eig(F)
    lam = lam * np.minimum(1.0, radius / np.maximum(np.abs(lam), 1e-300))
    return np.real(V @ np.diag(lam) @ np.linalg.inv(V))


def gpssm_from_linear(lin, y, u, seed):
    """A GPSSM f(x, u) = A [x; u] + b + g(x, u) with (A, b) the linear fit in a basis where y reads
    x[0], and g a sparse GP starting at 0; also the linear smoother's states in that basis."""
    sm = ps.kalman.smoother(lin, jnp.asarray(y), inputs=jnp.asarray(u))
    H = np.asarray(lin.emission_matrix)                                   # (1, d)
    null = np.linalg.svd(H)[2][1:]                                        # orthonormal basis of H's null space
    basis = np.concatenate([H, null], axis=0)
    # hidden coordinates scaled so that each has the output coordinate's process noise: g has one
    # prior amplitude for all outputs, and with equal noise levels that amplitude is a residual of
    # the same size, relative to the noise, on every coordinate (with hidden coordinates of unit
    # spread their noise was 70-140 times the output coordinate's on gas furnace)
    noise = np.maximum(np.diag(basis @ np.asarray(lin.transition_cov) @ basis.T), 1e-12)
    Tm = np.sqrt(noise[0] / noise)[:, None] * basis
    Ti = np.linalg.inv(Tm)
    x = np.asarray(sm.smoothed_means) @ Tm.T
    weights = np.concatenate([Tm @ stable(np.asarray(lin.transition_matrix)) @ Ti,
                              Tm @ np.asarray(lin.transition_input_matrix)], axis=1)
    offset = Tm @ np.asarray(lin.transition_offset)
    Q = Tm @ np.asarray(lin.transition_cov) @ Tm.T
    rows = np.concatenate([x[:-1], u[1:]], axis=1)                         # GP inputs (x_{t-1}, u_{t-1})
    M = min(SETTINGS["num_inducing"], rows.shape[0])
    Z = rows[np.sort(np.random.default_rng(seed).choice(rows.shape[0], M, replace=False))]
    q = np.clip(np.diag(Q), 1e-4, 0.1)
    # g's prior amplitude at the process-noise level: a GP residual that the data do not ask for
    # stays as small as the noise the linear fit already allows
    kernel = ps.models.ARDSquaredExponential(2.0 * rows.std(0) + 1e-3, float(np.mean(q)))
    model = ps.models.GPSSM(kernel, Z, np.zeros((M, LATENT)), q,
                            float(np.clip(np.asarray(lin.emission_cov)[0, 0], 1e-3, 0.5)), input_dim=1,
                            initial_mean=x[0], initial_cov=0.1 * np.eye(LATENT),
                            emission_offset=np.asarray(lin.emission_offset), mean_function="linear",
                            mean_weights=weights, mean_offset=offset)
    return model, x


class LinearPlusMLP(eqx.Module):
    """f(x, u) = A [x; u] + b + MLP(x, u), the MLP's last layer starting at zero (f starts linear)."""

    weights: jax.Array
    offset: jax.Array
    mlp: eqx.nn.MLP

    def __call__(self, xu):
        return self.weights @ xu + self.offset + self.mlp(xu)


def neural_from_gpssm(start, seed):
    """The neural SSM with the GPSSM start's linear part, noise levels, offset and initial state."""
    width = start.mean_weights.shape[1]
    mlp = eqx.nn.MLP(width, LATENT, 32, 2, activation=jax.nn.tanh, key=jax.random.PRNGKey(seed))
    mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp,
                      (jnp.zeros_like(mlp.layers[-1].weight), jnp.zeros_like(mlp.layers[-1].bias)))
    network = LinearPlusMLP(start.mean_weights, start.mean_offset, mlp)
    return ps.models.NeuralSSM(None, LATENT, start.transition_noise, start.emission_noise, input_dim=1,
                               network=network, residual=False, initial_mean=start.initial_mean,
                               initial_cov=start.initial_cov, emission_offset=start.emission_offset)


# %% [markdown]
# ## Free simulation of a fitted GPSSM over the test half

# %%
@eqx.filter_jit
def _pf_moments(model, U, y_all, u_all, key):
    """Pooled predictive moments of the output over one particle filter per U sample (U None: the
    model as it is, 8 filters with different keys)."""
    def one(Us, k):
        m = model if Us is None else model.with_inducing_outputs(Us)
        res = ps.smc.particle_filter_sequence(k, m, y_all, u_all, num_particles=SETTINGS["particles"])
        w = jax.nn.softmax(res.log_weights, axis=-1)                          # (T, N)
        y_part = res.particles @ model.emission_matrix[0] + model.emission_offset[0]   # (T, N)
        mean = jnp.sum(w * y_part, -1)
        var = jnp.sum(w * (y_part - mean[:, None]) ** 2, -1) + model.emission_noise[0]
        return mean, var

    keys = jax.random.split(key, SETTINGS["eval_samples"] if U is None else U.shape[0])
    means, vars_ = jax.vmap(one)(U, keys)
    return jnp.mean(means, 0), jnp.mean(vars_, 0) + jnp.var(means, 0)


def output_moments_particles(model, U_samples, y_train, u_all, seed):
    T = y_train.shape[0]
    if U_samples is not None:
        U_samples = U_samples[np.linspace(0, U_samples.shape[0] - 1, SETTINGS["eval_samples"]).round().astype(int)]
    y_all = np.concatenate([y_train, np.full((u_all.shape[0] - T, 1), np.nan)], axis=0)
    mean, var = _pf_moments(model, U_samples, jnp.asarray(y_all), jnp.asarray(u_all), jax.random.PRNGKey(seed))
    return np.asarray(mean[T:]), np.asarray(var[T:])


def scores(mean, var, y):
    y = y[:, 0]
    rmse = float(np.sqrt(np.mean((mean - y) ** 2)))
    loglik = float(np.mean(-0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)))
    return rmse, loglik


# %% [markdown]
# ## The five records

# %%
rows, wins, timings = [], [], []
for name in RECORDS:
    i = ps.datasets.SYSID_NAMES.index(name)   # seeds follow the record, not its place in the list
    data = ps.datasets.load_sysid(name)
    y_tr, y_te = data.train_outputs, data.test_outputs
    u_all = lagged(np.concatenate([data.train_inputs, data.test_inputs], axis=0))
    u_tr = u_all[:y_tr.shape[0]]
    res, stamps = {}, []
    t0 = time.perf_counter()
    lin = fit_linear(y_tr, u_tr, seed=i)
    res["linear (EM)"] = scores(*output_moments_linear(lin, y_tr, u_all), y_te)
    stamps.append(f"EM {time.perf_counter() - t0:.0f} s")
    start, x_lin = gpssm_from_linear(lin, y_tr, u_tr, seed=i)
    if os.environ.get("SYSID_START", "1") != "0":   # the nonlinear models' common start, before learning
        res["GPSSM at its start"] = scores(*output_moments_particles(start, start.inducing_mean[None], y_tr, u_all, 99), y_te)
    for method in METHODS:
        t0 = time.perf_counter()
        key = jax.random.PRNGKey(10 + i + 1000 * int(os.environ.get("SYSID_SEED", 0)))
        if method == "neural":
            kw = SETTINGS["neural"]
            n = kw["num_iters"]
            fit, _ = ps.learn.mle(neural_from_gpssm(start, seed=i), y_tr, n, inputs=u_tr, estimator="ppg", key=key,
                                  num_particles=kw["num_particles"], optimizer=optax.adam(kw["learning_rate"]),
                                  fixed=NEURAL_FIXED, progress=False)
            U = None
        else:
            kw = dict(SETTINGS[method])
            n = kw.pop("num_iters")
            extra = {} if method == "prssm" else dict(initial_states=x_lin)
            fit, hist = ps.learn.free_form_vi(key, start, y_tr, n, inputs=u_tr, method=method, fixed=FIXED,
                                              progress=False, **extra, **kw)
            U = hist.inducing_outputs
        jax.block_until_ready(jax.tree_util.tree_leaves(fit))
        t_fit = time.perf_counter() - t0
        res[LABELS[method]] = scores(*output_moments_particles(fit, U, y_tr, u_all, 100 + i), y_te)
        stamps.append(f"{method} {t_fit:.0f} s ({1e3 * t_fit / n:.0f} ms/step)")
    for label, (rmse, ll) in res.items():
        rows.append(f"| {name} | {label} | {rmse:.4f} | {ll:.3f} |")
        print(rows[-1], flush=True)
    wins.append(f"{name}: lowest RMSE {min(res, key=lambda k: res[k][0])}; highest test log-lik "
                f"{max(res, key=lambda k: res[k][1])}")
    timings.append(f"{name}: {', '.join(stamps)}")
    print(wins[-1], "|", timings[-1], flush=True)

print(f"\nLatent dim {LATENT}, {SETTINGS['num_inducing']} inducing points; {SETTINGS}\n")
print("| record | model | RMSE | test log-lik |")
print("| --- | --- | --- | --- |")
print("\n".join(rows))
print("\n" + "\n".join(wins) + "\n\n" + "\n".join(timings))
print(f"\nTotal {time.perf_counter() - T_START:.0f} s")
