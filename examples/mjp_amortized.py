# %% [markdown]
# # Amortised rate estimation for Markov jump processes (a small foundation inference model)
#
# After Berghaus et al. (NeurIPS 2024, "Foundation inference models for Markov jump processes"): a
# network is trained once on synthetic processes and then maps a *set* of observed paths (noisy
# labels on irregular grids) to the generator and the initial distribution in one forward pass.
#
# `ps.ctmc.AmortizedRateEstimator` pools transition counts over paths and intervals (binned by the
# interval length dt), so it works for any number of paths and, being equivariant under relabelling
# the states, for any number of states. This script
#
# 1. trains it on fresh synthetic data every step (2-6 states, sparse random rates, symmetric label
#    noise, irregular grids of 20-100 points on horizons 1-5) with Adam, on the CPU in minutes;
# 2. writes the weights (arrays + JSON, `ps.save`) into the package, where
#    `ps.ctmc.AmortizedRateEstimator.pretrained()` finds them;
# 3. compares it with EM on the discrete flashing ratchet (300 paths, the 50-point grid of
#    `mjp_ratchet.py`): (V, r, b) by least squares on the ratchet's parametric form, rate RMSE, time;
# 4. tabulates its error on held-out synthetic processes against the number of states (2-10) and paths.
#
# Pass `--steps N` for a shorter run and `--no-save` to keep the shipped weights.

# %%
import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scipy.optimize  # noqa: E402

import probssm as ps  # noqa: E402
from probssm.inference import ctmc_amortized  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4500)
parser.add_argument("--no-save", action="store_true")
args, _ = parser.parse_known_args(sys.argv[1:] if "__file__" in globals() else [])

BATCH, MAX_PATHS, MAX_POINTS = 12, 1000, 100
STATES = (2, 3, 4, 5, 6)

# %% [markdown]
# ## Synthetic processes
#
# Per process: K states; each off-diagonal rate present with probability p ~ U(0.3, 1) and then
# log-uniform on [0.1, 5]; initial law uniform (half the time) or Dirichlet(1); one irregular grid of
# T ~ U{20..100} points on [0, h], h log-uniform on [1, 5], shared by its paths (the first point at 0);
# the number of paths log-uniform on [20, 1000]; labels flipped to a uniformly chosen other state with
# probability eps (eps = 0 half the time, else U(0, 0.15)). The paths are read at the grid exactly
# (``z(t_j) | z(t_{j-1}) ~ expm(Q dt)``), all processes of a batch in one vmapped scan.


# %%
def random_process(key, K):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    p = jax.random.uniform(k1, (), minval=0.3, maxval=1.0)
    present = jax.random.bernoulli(k2, p, (K, K)) & ~jnp.eye(K, dtype=bool)
    rates = jnp.exp(jax.random.uniform(k3, (K, K), minval=np.log(0.1), maxval=np.log(5.0))) * present
    Q = rates - jnp.diag(rates.sum(1))
    pi = jnp.where(jax.random.bernoulli(k4), jnp.ones(K) / K, jax.random.dirichlet(k5, jnp.ones(K)))
    return Q, pi


def random_grid(key, T_max=MAX_POINTS):
    k1, k2, k3 = jax.random.split(key, 3)
    T = jax.random.randint(k1, (), 20, T_max + 1)
    h = jnp.exp(jax.random.uniform(k2, (), minval=np.log(1.0), maxval=np.log(5.0)))
    u = jnp.where(jnp.arange(T_max) < T, jax.random.uniform(k3, (T_max,)), 2.0)
    grid = jnp.sort(u).at[0].set(0.0) * h
    grid = jnp.where(jnp.arange(T_max) < T, grid, grid[T - 1])  # padding repeats the last time
    return grid, T


def sample_paths(key, Q, pi, grid, num_paths):
    """(num_paths, T) states at the grid, all paths at once (one expm per interval)."""
    K = Q.shape[0]
    Ps = jax.vmap(lambda d: jax.scipy.linalg.expm(Q * d))(jnp.diff(grid))
    k0, k1 = jax.random.split(key)
    z0 = jax.random.categorical(k0, jnp.log(pi + 1e-30), shape=(num_paths,))

    def step(z, x):
        P, k = x
        u = jax.random.uniform(k, (num_paths, 1))
        z = jnp.minimum(jnp.sum(u > jnp.cumsum(P[z], -1), -1), K - 1)
        return z, z

    zs = jax.lax.scan(step, z0, (Ps, jax.random.split(k1, grid.shape[0] - 1)))[1]
    return jnp.concatenate([z0[None], zs], 0).T


def noisy(key, z, K, eps):
    k1, k2 = jax.random.split(key)
    flip = jax.random.bernoulli(k1, eps, z.shape)
    other = (z + jax.random.randint(k2, z.shape, 1, K)) % K
    return jnp.where(flip, other, z)


def synthetic(key, K, num_paths=MAX_PATHS, T_max=MAX_POINTS):
    """One training data set: its statistics and its truth (vmappable over keys)."""
    kp, kg, ks, kn, ke, kc = jax.random.split(key, 6)
    Q, pi = random_process(kp, K)
    grid, T = random_grid(kg, T_max)
    z = sample_paths(ks, Q, pi, grid, num_paths)
    eps = jnp.where(jax.random.bernoulli(ke), 0.0, jax.random.uniform(ke, (), maxval=0.15))
    y = noisy(kn, z, K, eps)
    n_paths = jnp.exp(jax.random.uniform(kc, (), minval=np.log(20.0), maxval=np.log(num_paths)))
    mask = (jnp.arange(num_paths)[:, None] < n_paths) & (jnp.arange(T_max)[None, :] < T)
    stats = ctmc_amortized.interval_statistics(jnp.broadcast_to(grid, y.shape).astype(jnp.float32), y, mask, K)
    return stats, Q.astype(jnp.float32), pi.astype(jnp.float32)


# %% [markdown]
# ## Training
#
# Loss per process: the squared rate error normalised by the mean squared true rate (so that fast
# and slow processes weigh alike), plus the squared error of the square roots of the rates (which
# keeps small and zero rates honest), plus the KL divergence of the true from the estimated initial
# law. Fresh data every step; Adam with a cosine-decayed learning rate.


# %%
def loss_one(net, stats, Q, pi):
    est = net.from_statistics(stats)
    K = Q.shape[0]
    off = 1.0 - jnp.eye(K)
    r_hat, r = est.generator * off, Q * off
    scale = jnp.sum(r ** 2) / (K * (K - 1)) + 0.05
    mse = jnp.sum((r_hat - r) ** 2) / (K * (K - 1)) / scale
    root = jnp.sum((jnp.sqrt(r_hat + 1e-8) - jnp.sqrt(r)) ** 2) / (K * (K - 1))
    kl = jnp.sum(pi * (jnp.log(pi + 1e-8) - jnp.log(est.initial_probs + 1e-8)))
    return mse + root + 0.2 * kl


def make_step(K, opt):
    @jax.jit
    def step(net, opt_state, key):
        stats, Q, pi = jax.vmap(lambda k: synthetic(k, K))(jax.random.split(key, BATCH))

        def loss(n):
            return jnp.mean(jax.vmap(lambda s, q, p: loss_one(n, s, q, p))(stats, Q, pi))

        value, grads = jax.value_and_grad(loss)(net)
        updates, opt_state = opt.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, value

    return step


# float32 weights: half the file size, and the statistics are counts and sums of intervals
net = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                             ps.ctmc.AmortizedRateEstimator(jax.random.key(0), hidden=64))
schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, max(args.steps, 200), 1e-4)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
opt_state = opt.init(net)
steps = {K: make_step(K, opt) for K in STATES}
key = jax.random.key(1)
t0, history = time.time(), []
for i in range(args.steps):
    key, sub = jax.random.split(key)
    net, opt_state, value = steps[STATES[i % len(STATES)]](net, opt_state, sub)
    history.append(float(value))
    if (i + 1) % 250 == 0 or i == 0:
        print(f"step {i + 1:5d}: loss {np.mean(history[-250:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
t_train = time.time() - t0
print(f"trained {args.steps} steps in {t_train / 60:.1f} min")
if not args.no_save:
    os.makedirs(os.path.dirname(ctmc_amortized.WEIGHTS), exist_ok=True)
    ps.save(ctmc_amortized.WEIGHTS, net)
    print("weights:", ctmc_amortized.WEIGHTS, f"({os.path.getsize(ctmc_amortized.WEIGHTS + '.npz') / 1e3:.0f} kB)")

# %% [markdown]
# ## The flashing ratchet: amortised vs EM on 300 paths
#
# The data of `mjp_ratchet.py` (Gillespie paths read at a 50-point irregular grid on [0, 2.5]), the
# first 300 paths. EM is told the sparsity pattern of the generator (18 free rates) and runs 300
# iterations; the amortised estimator is told nothing but K = 6. (V, r, b) are then fitted by least
# squares of the estimated off-diagonal generator on the ratchet's form.


# %%
def ratchet_generator(V=1.0, r=1.0, b=1.0, xp=np):
    F = xp.zeros((6, 6))
    for i in range(3):
        for j in range(3):
            if i != j:
                F = _set(F, i, j, xp.exp(-V * (j - i) / 2.0), xp)
                F = _set(F, 3 + i, 3 + j, b, xp)
        F = _set(F, i, 3 + i, r, xp)
        F = _set(F, 3 + i, i, r, xp)
    return F - xp.diag(F.sum(1))


def _set(F, i, j, v, xp):
    if xp is np:
        F[i, j] = v
        return F
    return F.at[i, j].set(v)


def fit_ratchet(G):
    """(V, r, b) minimising the squared error of the off-diagonal rates of G."""
    off = ~np.eye(6, dtype=bool)
    res = scipy.optimize.least_squares(lambda p: (ratchet_generator(*p) - G)[off], np.ones(3))
    return res.x


NUM_PATHS, NUM_POINTS, T_MAX = 300, 50, 2.5
Q_true = ratchet_generator()
truth = ps.models.MarkovJumpProcess(Q_true, np.ones(6) / 6)
rng = np.random.default_rng(0)
grid = np.sort(rng.uniform(0.0, T_MAX, NUM_POINTS))
grid[0] = 0.0


def ratchet_data(key, num_paths):
    paths = jax.vmap(lambda k: ps.ctmc.gillespie(k, truth, T_MAX, 60))(jax.random.split(key, num_paths))
    idx = jax.vmap(lambda jt: jnp.searchsorted(jt, jnp.asarray(grid), side="right") - 1)(paths.jump_times)
    return np.asarray(jnp.take_along_axis(paths.states, idx, axis=1))


off = ~np.eye(6, dtype=bool)
nz = Q_true > 0
start = ps.models.MarkovJumpProcess(np.where(nz, 1.0, 0.0) - np.diag(nz.sum(1) * 1.0), np.ones(6) / 6)
warm = ratchet_data(jax.random.key(99), NUM_PATHS)
t0 = time.time()
ps.learn.em(start, (np.broadcast_to(grid, warm.shape), warm), 300)  # compiles EM's E-step (timed apart)
print(f"EM, first call (with compilation): {time.time() - t0:.2f} s")
rows = []
for seed in range(5):
    states = ratchet_data(jax.random.key(100 + seed), NUM_PATHS)
    times = np.broadcast_to(grid, states.shape)
    est_fn = jax.jit(lambda t, s: net(t, s, num_states=6))
    est_fn(times, states).generator.block_until_ready()  # compile outside the timing
    t0 = time.time()
    G_am = np.asarray(est_fn(times, states).generator, np.float64)
    t_am = time.time() - t0
    t0 = time.time()
    fitted, _ = ps.learn.em(start, (times, states), 300)
    t_em = time.time() - t0
    G_em = np.asarray(fitted.generator())
    rows.append(dict(seed=seed, vrb_am=fit_ratchet(G_am), vrb_em=fit_ratchet(G_em),
                     rmse_am=np.sqrt(np.mean((G_am - Q_true)[off] ** 2)),
                     rmse_am18=np.sqrt(np.mean((G_am - Q_true)[nz] ** 2)),
                     rmse_em=np.sqrt(np.mean((G_em - Q_true)[nz] ** 2)), t_am=t_am, t_em=t_em))
    r = rows[-1]
    print(f"seed {seed}: amortised (V, r, b) = ({', '.join(f'{v:.3f}' for v in r['vrb_am'])}), rate RMSE "
          f"{r['rmse_am']:.3f} (30 off-diagonal), {r['rmse_am18']:.3f} (18 true rates), {1e3 * t_am:.1f} ms | "
          f"EM (V, r, b) = ({', '.join(f'{v:.3f}' for v in r['vrb_em'])}), rate RMSE {r['rmse_em']:.3f}, "
          f"{1e3 * t_em:.0f} ms", flush=True)
print("mean |(V, r, b) - 1|: amortised", np.round(np.mean([np.abs(r["vrb_am"] - 1) for r in rows], 0), 3),
      "EM", np.round(np.mean([np.abs(r["vrb_em"] - 1) for r in rows], 0), 3))
print(f"mean rate RMSE (18 true rates): amortised {np.mean([r['rmse_am18'] for r in rows]):.3f}, EM "
      f"{np.mean([r['rmse_em'] for r in rows]):.3f}; mean wall time: amortised "
      f"{1e3 * np.mean([r['t_am'] for r in rows]):.1f} ms, EM {1e3 * np.mean([r['t_em'] for r in rows]):.0f} ms")

# %% [markdown]
# ## Held-out synthetic processes: error against the number of states and paths
#
# Fresh processes from the training law (new keys), observed on the ratchet's grid (50 points on
# [0, 2.5]) with label noise eps = 0.05; relative rate error ``||F_hat - F||_F / ||F||_F`` over the
# off-diagonal entries, mean over 20 processes. K = 8 and 10 were never seen in training.


# %%
def heldout(key, K, num_paths, eps=0.05):
    kp, ks, kn = jax.random.split(key, 3)
    Q, pi = random_process(kp, K)
    z = sample_paths(ks, Q, pi, jnp.asarray(grid), num_paths)
    y = noisy(kn, z, K, eps)
    est = net(jnp.broadcast_to(jnp.asarray(grid), y.shape), y, num_states=K)
    o = 1.0 - jnp.eye(K)
    norm = jnp.sum((Q * o) ** 2)
    # a process without any rate (possible for small K) has no relative error: left out of the mean
    return jnp.where(norm > 0, jnp.sqrt(jnp.sum(((est.generator - Q) * o) ** 2) / jnp.where(norm > 0, norm, 1.0)),
                     jnp.nan)


print("relative rate error (mean over 20 held-out processes; 50-point grid on [0, 2.5], 5% label noise)")
print("K  " + "".join(f"{n:>10d}" for n in (50, 300, 1000)))
for K in (2, 3, 4, 5, 6, 8, 10):
    keys = jax.random.split(jax.random.key(7 + K), 20)
    errs = [float(jnp.nanmean(jax.jit(jax.vmap(lambda k: heldout(k, K, n)))(keys))) for n in (50, 300, 1000)]
    print(f"{K:<3d}" + "".join(f"{e:10.3f}" for e in errs), flush=True)
