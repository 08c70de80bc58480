# %% [markdown]
# # Implicit-MAP filtering of network weights: online classification under drift
#
# The state is the weight pytree of a small equinox MLP (about 1,200 parameters); the
# data arrive as a stream of mini-batches whose decision boundary rotates slowly (a full
# turn over the stream), so yesterday's classifier goes stale. `ps.imap.filter` treats
# the weights as a latent state with identity dynamics and, at every step, takes K Adam
# steps on the batch's cross-entropy starting from the previous weights: the optimiser and
# K define the (implicit) prior, no covariance over the weights is ever formed.
#
# Reported: accuracy on each batch *before* it is used (prequential accuracy), averaged
# over the stream, for a classifier frozen after the first 20 batches, and IMAP with
# K = 1, 5, 20 Adam steps.
# Run:  python examples/imap_online_classification.py   (seconds on 2 CPU cores)

# %%
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import probssm as ps

T, BATCH = 400, 32
key = jax.random.key(0)
k_net, k_x, k_noise = jax.random.split(key, 3)


def stream(key):
    """Batches of 2-D points; label = side of a curved boundary that rotates over time."""
    X = jax.random.normal(key, (T, BATCH, 2))
    angle = 2 * jnp.pi * jnp.arange(T) / T
    w = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)  # (T, 2)
    score = jnp.einsum("tbd,td->tb", X, w) + 0.3 * (X[..., 0] ** 2 - 1)
    flip = jax.random.bernoulli(k_noise, 0.05, score.shape)  # 5% label noise
    return {"X": X, "y": jnp.where(flip, score <= 0, score > 0).astype(jnp.float32)}


data = stream(k_x)
net = eqx.nn.MLP(2, 1, 32, 2, activation=jax.nn.tanh, key=k_net)
params, static = eqx.partition(net, eqx.is_inexact_array)
num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))


def logits(p, X):
    return jax.vmap(eqx.combine(p, static))(X)[:, 0]


def loss(p, batch, t):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(p, batch["X"]), batch["y"]))


def accuracy(p, batch):
    return jnp.mean((logits(p, batch["X"]) > 0) == (batch["y"] > 0.5))


def prequential(states):
    """Accuracy on batch t of the weights estimated from batches 0..t-1."""
    prev = jax.tree_util.tree_map(lambda a: a[:-1], states)
    nxt = jax.tree_util.tree_map(lambda a: a[1:], data)
    return jax.vmap(accuracy)(prev, nxt)


if __name__ == "__main__":
    print(f"MLP with {num_params} weights, {T} batches of {BATCH}; boundary turns once over the stream")
    print(f"| {'method':<23} | {'prequential accuracy':>20} | {'last 100 batches':>16} | {'time (s)':>8} |")
    print(f"|{'-' * 25}|{'-' * 22}|{'-' * 18}|{'-' * 10}|")

    # frozen: fit once on the first 20 batches (IMAP run on them with many steps), then keep
    warm = jax.tree_util.tree_map(lambda a: a[:20], data)
    fit = ps.imap.filter(lambda p, t: p, loss, params, warm, optimizer=optax.adam(1e-2), num_iters=50)
    frozen = jax.tree_util.tree_map(lambda a: a[-1], fit.filtered_states)
    acc = jax.vmap(accuracy, in_axes=(None, 0))(frozen, jax.tree_util.tree_map(lambda a: a[1:], data))
    print(f"| {'frozen after 20 batches':<23} | {float(acc.mean()):20.3f} | {float(acc[-100:].mean()):16.3f} | "
          f"{'':>8} |")

    for K in (1, 5, 20):
        t0 = time.perf_counter()
        out = ps.imap.filter(lambda p, t: p, loss, params, data, optimizer=optax.adam(1e-2), num_iters=K)
        acc = jax.block_until_ready(prequential(out.filtered_states))
        dt = time.perf_counter() - t0
        print(f"| {f'IMAP Adam, K = {K}':<23} | {float(acc.mean()):20.3f} | {float(acc[-100:].mean()):16.3f} | "
              f"{dt:8.2f} |")
