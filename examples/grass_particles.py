# %% [markdown]
# # Interacting particles: GRASS against per-object switching baselines
#
# The ODE-driven particles benchmark of GRASS (Liu, Magliacane, Kofinas, Gavves; ICML 2023):
# three objects move in a 2-D box, each in one of three modes (constant velocity,
# Lotka-Volterra, spiral); when two collide, the lower-index one adopts the other's mode
# (`ps.datasets.simulate_interacting_particles`). The task: recover every object's mode sequence
# from its noisy positions alone.
#
# Baselines treat each object as a separate sequence (a batch of B * N sequences), so they cannot
# see interactions:
#
# * ARHMM, an AR(2) on the observed positions (the initialisation of the two below);
# * SLDS with the "velocity-like" state x_t = (p_t, p_{t-1}) (d = 4), fitted by variational EM;
# * recurrent SLDS with the same state, per-previous-mode recurrence, fitted by Laplace-EM.
#
# GRASS (`ps.models.GRASS`), fitted on the objects of each sequence jointly with the distances
# between observed positions as edge inputs, can use the interactions. Scores, on test
# sequences pooled over objects and time after Hungarian matching of the labels: accuracy,
# weighted F1, NMI and ARI (metrics below, numpy/scipy only).

# %%
import os
import time

# jaxlib 0.10 on CPU can deadlock here: two batched LAPACK calls (triangular solves under vmap)
# run at once on XLA's intra-op pool and each waits for pool threads the other holds (seen on this
# 2-core machine during the GRASS EM: every pool thread blocked in ParallelBatchMap). A pool of one
# thread cannot deadlock, so this script pins itself to one core before JAX starts (the measured
# run times below are single-core). Set PROBSSM_ALL_CORES=1 to skip the pinning.
if hasattr(os, "sched_setaffinity") and not os.environ.get("PROBSSM_ALL_CORES"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

import probssm as ps  # noqa: E402

start_time = time.time()
K, P, LAGS = 3, 2, 2  # modes, observed dimension, AR order
NUM_TRAIN, NUM_TEST, T, N = 64, 32, 100, 3
NUM_ARHMM_ITERS, NUM_SLDS_ITERS, NUM_RSLDS_ITERS = 50, 30, 20
Q_SCALE, R_SCALE = 0.5, 0.25  # SLDS noises from the AR residual covariance (see below)
MODE_NAMES = ["constant velocity", "Lotka-Volterra", "spiral"]


# %% [markdown]
# ## Segmentation metrics
# All four start from the contingency table C[i, j] = #(true i, predicted j). Accuracy and F1
# need a one-to-one relabelling (Hungarian matching maximising the matched counts); NMI and ARI
# are invariant to relabelling.

# %%
def contingency(z_true, z_pred):
    """C[i, j] = number of points with true label i and predicted label j (non-negative labels)."""
    z_true, z_pred = np.ravel(z_true), np.ravel(z_pred)
    table = np.zeros((z_true.max() + 1, z_pred.max() + 1))
    np.add.at(table, (z_true, z_pred), 1)
    return table


def match_labels(z_true, z_pred):
    """The predicted labels renamed by the Hungarian matching that maximises agreement; predicted
    labels left unmatched (more predicted than true labels) become -1, which never agrees."""
    table = contingency(z_true, z_pred)
    rows, cols = linear_sum_assignment(-table)
    rename = np.full(table.shape[1], -1)
    rename[cols] = rows
    return rename[np.asarray(z_pred)]


def matched_accuracy(z_true, z_pred):
    return float(np.mean(np.ravel(z_true) == np.ravel(match_labels(z_true, z_pred))))


def weighted_f1(z_true, z_pred):
    """Per true class F1 after matching, averaged with weights proportional to class support."""
    z_true, z_hat = np.ravel(z_true), np.ravel(match_labels(z_true, z_pred))
    scores, support = [], []
    for k in np.unique(z_true):
        tp = np.sum((z_true == k) & (z_hat == k))
        predicted, actual = np.sum(z_hat == k), np.sum(z_true == k)
        scores.append(0.0 if tp == 0 else 2 * tp / (predicted + actual))
        support.append(actual)
    return float(np.average(scores, weights=support))


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def nmi(z_true, z_pred):
    """Mutual information over the arithmetic mean of the two entropies (sklearn's default)."""
    table = contingency(z_true, z_pred)
    n = table.sum()
    pij = table / n
    outer = np.outer(table.sum(1), table.sum(0)) / n ** 2
    nz = pij > 0
    mi = float(np.sum(pij[nz] * np.log(pij[nz] / outer[nz])))
    h_true, h_pred = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_true == 0 and h_pred == 0:
        return 1.0  # both labelings constant: identical partitions
    return mi / max((h_true + h_pred) / 2, 1e-300)


def ari(z_true, z_pred):
    """Adjusted Rand index (Hubert & Arabie): pair agreements corrected for chance."""
    table = contingency(z_true, z_pred)

    def pairs(x):
        return np.sum(x * (x - 1) / 2)

    index, a, b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = a * b / pairs(np.array(table.sum()))
    maximum = (a + b) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def scores(z_true, z_pred):
    return dict(accuracy=matched_accuracy(z_true, z_pred), weighted_f1=weighted_f1(z_true, z_pred),
                nmi=nmi(z_true, z_pred), ari=ari(z_true, z_pred))


# %% [markdown]
# ## Data
# Objects become separate sequences for the baselines: (B, T, N, 2) -> (B * N, T, 2).

# %%
train = ps.datasets.simulate_interacting_particles(jax.random.key(0), NUM_TRAIN, T, N)
test = ps.datasets.simulate_interacting_particles(jax.random.key(1), NUM_TEST, T, N)


def per_object(a):
    """(B, T, N, ...) -> (B * N, T, ...), object-major within each sequence."""
    a = np.asarray(a)
    return np.moveaxis(a, 2, 1).reshape(a.shape[0] * a.shape[2], a.shape[1], *a.shape[3:])


def per_sequence(a, num_sequences):
    """The inverse of `per_object` for (B * N, T) labels."""
    a = np.asarray(a)
    return np.moveaxis(a.reshape(num_sequences, -1, a.shape[1]), 1, 2)


y_train, y_test = per_object(train.observations), per_object(test.observations)
z_test = np.asarray(test.modes)
print(f"train: {y_train.shape[0]} object sequences, collisions per sequence "
      f"{np.asarray(train.collisions).sum((1, 2)).mean():.2f}; "
      f"time in each mode {np.bincount(np.asarray(train.modes).ravel(), minlength=K)}")


# %% [markdown]
# ## ARHMM initialisation
# k-means-free start: label each step by the sign of the turn between consecutive displacements
# (straight, anticlockwise, clockwise: the three modes' signature near the centre), fit an AR(2)
# per label by least squares, then run EM.

# %%
def turn_labels(y, threshold=0.03):
    """0 where consecutive displacements barely turn, 1 anticlockwise, 2 clockwise: the sine of
    the turn angle per step, smoothed over 9 steps (the noise is a third of a step's length)."""
    d = np.diff(y, axis=1)
    cross = d[:, 1:, 0] * d[:, :-1, 1] - d[:, 1:, 1] * d[:, :-1, 0]  # > 0: clockwise
    cross = cross / (np.linalg.norm(d[:, 1:], axis=-1) * np.linalg.norm(d[:, :-1], axis=-1) + 1e-12)
    kernel = np.ones(9) / 9
    smooth = np.stack([np.convolve(c, kernel, mode="same") for c in cross])
    z = np.where(smooth > threshold, 2, np.where(smooth < -threshold, 1, 0))
    return np.pad(z, ((0, 0), (2, 0)), mode="edge")


def ar_regressions(y, z):
    """Per label k, least squares y_t ~ W_k (y_{t-1}, y_{t-2}) + b_k; returns (W, b, covs)."""
    lags = np.asarray(ps.lagged_inputs(jnp.asarray(y), LAGS))[:, LAGS:].reshape(-1, LAGS * P)
    target, labels = y[:, LAGS:].reshape(-1, P), z[:, LAGS:].ravel()
    Ws, bs, Ss = [], [], []
    for k in range(K):
        X = np.column_stack([lags[labels == k], np.ones(np.sum(labels == k))])
        coef, *_ = np.linalg.lstsq(X, target[labels == k], rcond=None)
        res = target[labels == k] - X @ coef
        Ws.append(coef[:-1].T)
        bs.append(coef[-1])
        Ss.append(np.cov(res.T) + 1e-6 * np.eye(P))
    return np.stack(Ws), np.stack(bs), np.stack(Ss)


def sticky(stay=0.95):
    return stay * np.eye(K) + (1 - stay) / (K - 1) * (1 - np.eye(K))


def fit_arhmm(y_train, y_test):
    """EM on an AR(2) HMM; the first LAGS steps have no full history and are left out (they
    would otherwise claim a mode of their own), their label is the first labelled step's."""
    lags_train = ps.lagged_inputs(jnp.asarray(y_train), LAGS)[:, LAGS:]
    lags_test = ps.lagged_inputs(jnp.asarray(y_test), LAGS)[:, LAGS:]
    W0, b0, S0 = ar_regressions(y_train, turn_labels(y_train))
    model, _ = ps.learn.em(ps.models.ARHMM(np.ones(K) / K, sticky(), W0, b0, S0), jnp.asarray(y_train[:, LAGS:]),
                           NUM_ARHMM_ITERS, inputs=lags_train)
    z = np.asarray(ps.hmm.smoother(model, jnp.asarray(y_test[:, LAGS:]), inputs=lags_test).smoothed_probs.argmax(-1))
    return model, np.pad(z, ((0, 0), (LAGS, 0)), mode="edge")


t0 = time.time()
arhmm, z_arhmm = fit_arhmm(y_train, y_test)
z_arhmm = per_sequence(z_arhmm, NUM_TEST)
runtimes = {"ARHMM (AR(2))": time.time() - t0}


# %% [markdown]
# ## SLDS and recurrent SLDS
# An AR(2) is exactly a linear system on x_t = (p_t, p_{t-1}): A_k = [[W1, W2], [I, 0]],
# b_k = (b, 0), observed through C = [I 0]. The copied block gets a small noise so every
# dynamics covariance stays positive definite; the dynamics noise starts at half the AR residual
# covariance, the emission noise at a quarter.
#
# Measured on this data: the SLDS at this initialisation (no EM) segments about as well as the
# ARHMM (accuracy 0.90), and EM, while raising the ELBO, lowers the accuracy (about 0.80 after
# 10 iterations): the likelihood prefers letting the constant-velocity mode also explain the
# straight stretches of the Lotka-Volterra orbits. The table reports the fitted models, as a
# baseline would be run.

# %%
def state_space_from_arhmm(model):
    Ws, bs, Ss = (np.asarray(a) for a in (model.emissions.weights, model.emissions.biases, model.emissions.covs))
    d = LAGS * P
    A = np.zeros((K, d, d))
    A[:, :P] = Ws
    A[:, P:, :P] = np.eye(P)
    b = np.concatenate([bs, np.zeros((K, P))], axis=1)
    Q = np.zeros((K, d, d))
    Q[:, :P, :P] = Q_SCALE * Ss
    Q[:, P:, P:] = 1e-4 * np.eye(P)
    C = np.eye(P, d)
    R = R_SCALE * np.mean(Ss, axis=0)
    return dict(initial_means=np.concatenate([y_train[:, 0].mean(0)] * LAGS), initial_covs=4.0 * np.eye(d),
                dynamics_matrices=A, dynamics_offsets=b, dynamics_covs=Q, emission_matrices=C,
                emission_offsets=np.zeros(P), emission_covs=R)


common = state_space_from_arhmm(arhmm)
transition = np.asarray(arhmm.transition_matrix)
slds0 = ps.models.SLDS(initial_probs=np.ones(K) / K, transition_matrix=transition, **common)
# per previous mode: biases log A (the ARHMM's stickiness), position weights learnt by Laplace-EM
rslds0 = ps.models.RecurrentSLDS(initial_probs=np.ones(K) / K, recurrence_weights=np.zeros((K, K, LAGS * P)),
                                 recurrence_biases=np.log(transition), **common)

t0 = time.time()
slds, _ = ps.learn.em(slds0, jnp.asarray(y_train), NUM_SLDS_ITERS)
z_slds = per_sequence(ps.switching.structured_vi(slds, jnp.asarray(y_test), 10).mode_probs.argmax(-1), NUM_TEST)
runtimes["SLDS (d=4)"] = time.time() - t0
t0 = time.time()
rslds, _ = ps.learn.em(rslds0, jnp.asarray(y_train), NUM_RSLDS_ITERS)
z_rslds = per_sequence(ps.switching.laplace(rslds, jnp.asarray(y_test), 10).mode_probs.argmax(-1), NUM_TEST)
runtimes["rSLDS (d=4)"] = time.time() - t0


# %% [markdown]
# ## GRASS
# Fitted on all objects of a sequence jointly (observations and pairwise distances), it can use
# the interactions the baselines cannot see: the exact structured VI over the joint discrete
# state (3^3 mode configurations x 2^3 edge configurations = 216 states) and variational EM, the
# same number of iterations as the SLDS.

# %%
def fit_grass(train, test):
    """Fit `ps.models.GRASS` on ``train`` (observations (B, T, N, 2), pairwise distances of the
    observed positions (B, T, E) as the edge inputs) from the SLDS's initialisation, with the
    interaction weights at zero (so it starts as the independent SLDS) and an edge law that
    switches on at short distances; return the most likely modes of ``test`` (NUM_TEST, T, N)."""
    grass0 = ps.models.GRASS(N, np.ones(K) / K, transition, np.zeros((K, K)), common["initial_means"],
                             common["initial_covs"], common["dynamics_matrices"], common["dynamics_covs"],
                             common["emission_matrices"], common["emission_covs"],
                             dynamics_offsets=common["dynamics_offsets"], emission_offsets=common["emission_offsets"],
                             edge_biases=np.array([2.0, 2.0]), edge_weight=-4.0)
    fitted, _ = ps.learn.em(grass0, jnp.asarray(train.observations), NUM_SLDS_ITERS,
                            edge_inputs=jnp.asarray(train.distances))
    r = ps.switching.grass_structured_vi(fitted, jnp.asarray(test.observations), 10,
                                         edge_inputs=jnp.asarray(test.distances))
    print("GRASS interaction weights W[j, k] (neighbour's mode j -> next mode k):\n",
          np.asarray(fitted.interaction_weights).round(2))
    print(f"edge law: biases {np.asarray(fitted.edge_biases).round(2)}, distance weight "
          f"{float(fitted.edge_weight):.2f}")
    return np.asarray(r.mode_probs.argmax(-1))




t0 = time.time()
z_grass = fit_grass(train, test)
runtimes["GRASS"] = time.time() - t0

# %% [markdown]
# ## Results

# %%
predictions = {"ARHMM (AR(2))": z_arhmm, "SLDS (d=4)": z_slds, "rSLDS (d=4)": z_rslds, "GRASS": z_grass}
print("\n| model | accuracy | weighted F1 | NMI | ARI | fit + inference (s) |")
print("|---|---|---|---|---|---|")
for name, z_hat in predictions.items():
    if z_hat is None:
        continue
    s = scores(z_test, z_hat)
    print(f"| {name} | {s['accuracy']:.3f} | {s['weighted_f1']:.3f} | {s['nmi']:.3f} | {s['ari']:.3f} "
          f"| {runtimes[name]:.0f} |")
for name, z_hat in predictions.items():
    if z_hat is not None:  # rows: true mode, columns: matched inferred mode
        print(f"\n{name} confusion (rows true {MODE_NAMES}):\n{contingency(z_test, match_labels(z_test, z_hat)).astype(int)}")

# %% One test sequence: trajectories coloured by true mode, and the true vs inferred mode raster.
# the sequence visiting the most modes, then with the most mode changes (collisions or not)
visited = np.array([len(np.unique(z)) for z in z_test])
changes = (z_test[:, 1:] != z_test[:, :-1]).sum((1, 2))
seq = int(np.argmax(100 * visited + changes))
colors = plt.cm.tab10(np.arange(K))
fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=[1, 1.6]))
x = np.asarray(test.positions[seq])
for n, marker in zip(range(N), "os^v<>"):
    axes[0].plot(x[:, n, 0], x[:, n, 1], color="0.7", lw=0.6)
    axes[0].scatter(x[:, n, 0], x[:, n, 1], c=colors[z_test[seq, :, n]], s=10, marker=marker, label=f"object {n}")
    axes[0].annotate(str(n), x[0, n], fontsize=11, weight="bold")
for t, e in zip(*np.nonzero(np.asarray(test.collisions[seq]))):
    n, m = ps.datasets.particle_pairs(N)[e]
    axes[0].plot(*((x[t, n] + x[t, m]) / 2), "kx", ms=10)
for k in range(K):
    axes[0].scatter([], [], color=colors[k], label=MODE_NAMES[k])
axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
axes[0].set_aspect("equal")
axes[0].set_title(f"test sequence {seq}: true modes (x: collision, number: start)")
rows, labels = [], []
for n in range(N):
    rows.append(z_test[seq, :, n])
    labels.append(f"obj {n} true")
    for name, z_hat in predictions.items():
        if z_hat is not None:
            rows.append(match_labels(z_test, z_hat)[seq, :, n])
            labels.append(f"obj {n} {name.split()[0]}")
axes[1].imshow(np.array(rows), aspect="auto", interpolation="nearest", cmap=ListedColormap(colors[:K]),
               vmin=-0.5, vmax=K - 0.5)
axes[1].set_yticks(range(len(labels)), labels, fontsize=7)
axes[1].set_xlabel("time step")
axes[1].set_title("true vs inferred modes (labels matched on the whole test set)")
fig.tight_layout()
figdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
os.makedirs(figdir, exist_ok=True)
fig.savefig(os.path.join(figdir, "grass_particles.png"), dpi=110)
print(f"\nwall time {time.time() - start_time:.1f} s")
