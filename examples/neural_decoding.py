# %% [markdown]
# # Decoding velocity from neurons: Kalman filter vs discriminative Kalman filter
#
# A simulated population of tuned neurons encodes a 2-D hand velocity z_t (the setting in
# which Burkhart et al., Neural Computation 2020, used the DKF for BrainGate2 cursor
# control). The velocity is a stationary AR(1) process; neuron i fires Poisson counts
# per 50 ms bin with a log-rate that is cosine-tuned to direction and grows with speed:
#
#     z_t = A z_{t-1} + N(0, G)
#     x_{t,i} ~ Poisson(exp(b_i + k_i ||z_t|| cos(angle(z_t) - pd_i) + s_i ||z_t||))
#
# so the mean of x given z is far from linear. Decoders, all trained on the same paired
# (z, x) data and tested on a held-out stretch:
#
#   KF       the classic linear decoder: x = H z + d + N(0, R) fitted by least squares,
#            A, G by least squares, run with `ps.kalman.filter`;
#   DKF-NW   `ps.learn.fit_dkf(key, z, x, regressor="nw")`: p(z | x) ~ N(f(x), Q), f by
#            Nadaraya-Watson (leave-one-out bandwidth), Q from held-out residuals; run with
#            `ps.dkf.filter`;
#   DKF-MLP  the same with a small equinox MLP for f.
#
# Counts are square-root transformed first (variance stabilising for Poisson).
# Metrics on the test stretch: velocity RMSE and mean absolute angle error (degrees).
# Run:  python examples/neural_decoding.py   (about a minute on 2 CPU cores)

# %%
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import probssm as ps  # noqa: E402

NEURONS, T_TRAIN, T_TEST = 40, 4000, 2000
key = jax.random.key(0)
k_pd, k_b, k_k, k_s, k_z, k_x, k_mlp = jax.random.split(key, 7)

# velocity dynamics: slowly rotating, strongly correlated in time
theta = 0.05
A_true = 0.97 * jnp.array([[jnp.cos(theta), -jnp.sin(theta)], [jnp.sin(theta), jnp.cos(theta)]])
G_true = 0.06 * jnp.eye(2)

# tuning: preferred directions, baselines, depth of direction and speed tuning
pd = jax.random.uniform(k_pd, (NEURONS,), minval=0, maxval=2 * jnp.pi)
base = jax.random.uniform(k_b, (NEURONS,), minval=0.0, maxval=1.5)
depth = jax.random.uniform(k_k, (NEURONS,), minval=0.8, maxval=1.6)
speed_gain = jax.random.uniform(k_s, (NEURONS,), minval=-0.5, maxval=1.0)


def simulate(key, T):
    kz, kx = jax.random.split(key)
    S = 0.06 / (1 - 0.97 ** 2) * jnp.eye(2)  # stationary covariance of a scaled rotation
    z0 = jax.random.multivariate_normal(kz, jnp.zeros(2), S)

    def step(z, k):
        z = A_true @ z + jax.random.multivariate_normal(k, jnp.zeros(2), G_true)
        return z, z

    _, zs = jax.lax.scan(step, z0, jax.random.split(kz, T - 1))
    zs = jnp.concatenate([z0[None], zs])
    speed = jnp.linalg.norm(zs, axis=1, keepdims=True)
    angle = jnp.arctan2(zs[:, 1], zs[:, 0])[:, None]
    log_rate = base + depth * speed * jnp.cos(angle - pd) + speed_gain * speed
    counts = jax.random.poisson(kx, jnp.exp(log_rate)).astype(jnp.float64)
    return zs, jnp.sqrt(counts)


z, x = simulate(k_z, T_TRAIN + T_TEST)
z_tr, x_tr, z_te, x_te = z[:T_TRAIN], x[:T_TRAIN], z[T_TRAIN:], x[T_TRAIN:]


# %% [markdown]
# ## Decoders

# %%
def fit_kf(z, x):
    A, G, mean, S = ps.learn.dkf.fit_dynamics(z)
    Z = jnp.concatenate([z, jnp.ones((z.shape[0], 1))], axis=1)
    W = jnp.linalg.lstsq(Z, x)[0]  # x ~ H z + d
    H, d = W[:2].T, W[2]
    res = x - Z @ W
    R = res.T @ res / res.shape[0]
    # z_t - mean = A (z_{t-1} - mean) + noise  ->  offset b = (I - A) mean
    return ps.models.LinearGaussianSSM(mean, S, A, G, H, R, (jnp.eye(2) - A) @ mean, d)


def metrics(pred, truth):
    rmse = float(jnp.sqrt(jnp.mean(jnp.sum((pred - truth) ** 2, axis=1))))
    ang = jnp.arctan2(pred[:, 1], pred[:, 0]) - jnp.arctan2(truth[:, 1], truth[:, 0])
    ang = jnp.abs((ang + jnp.pi) % (2 * jnp.pi) - jnp.pi)
    return rmse, float(jnp.degrees(jnp.mean(ang)))


decoders = {
    "KF": lambda: ps.kalman.filter(fit_kf(z_tr, x_tr), x_te).filtered_means,
    "DKF-NW": lambda: ps.dkf.filter(ps.learn.fit_dkf(k_mlp, z_tr, x_tr, regressor="nw")[0], x_te).filtered_means,
    "DKF-MLP": lambda: ps.dkf.filter(ps.learn.fit_dkf(k_mlp, z_tr, x_tr, regressor="mlp",
                                                      regressor_kwargs=dict(width=64, depth=2, num_iters=1500))[0],
                                     x_te).filtered_means,
}

if __name__ == "__main__":
    print(f"{NEURONS} neurons, {T_TRAIN} training bins, {T_TEST} test bins; "
          f"velocity sd {float(jnp.std(z_te)):.2f} per axis")
    print(f"| {'decoder':<8} | {'RMSE':>6} | {'mean angle error (deg)':>22} | {'fit + filter (s)':>16} |")
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 24}|{'-' * 18}|")
    rmse0, ang0 = metrics(jnp.zeros_like(z_te) + 1e-9, z_te)
    for name, run in decoders.items():
        t0 = time.perf_counter()
        pred = jax.block_until_ready(run())
        dt = time.perf_counter() - t0
        rmse, ang = metrics(pred, z_te)
        print(f"| {name:<8} | {rmse:6.3f} | {ang:22.1f} | {dt:16.2f} |")
    print(f"(predicting zero velocity: RMSE {rmse0:.3f})")
