# %% [markdown]
# # NASCAR: a recurrent SLDS on an oval track
#
# The synthetic of Linderman et al. (AISTATS 2017): a 2-D latent state drives around an oval
# track made of two straight segments and two half circles. Four modes, each a linear
# dynamical system; which one runs next depends only on where the state is
# (recurrence-only transitions, weights shared by every previous mode):
#
#     p(z_t = k | x_{t-1}) = softmax_k(W x_{t-1} + r),   W (4, 2)
#     x_t = A_k x_{t-1} + b_k + N(0, 1e-4 I),   y_t = C x_t + d + N(0, 1e-2 I)  (10-D)
#
# Mode 0 turns clockwise around (+2, 0) when x > 2, mode 1 around (-2, 0) when x < -2;
# in between, mode 2 drives right along the top (y > 0) and mode 3 left along the bottom.
#
# We simulate T = 10000 steps and fit, from one initialisation (`ps.learn.init_slds`: PCA of y
# to 2-D, k-means on the projection, an ARHMM on it), (a) a plain SLDS by variational EM and by
# particle-Gibbs EM and (b) the recurrent SLDS by Laplace-EM, then score each segmentation
# against the true modes after Hungarian matching.

# %%
import os
import time

import jax

jax.config.update("jax_enable_x64", True)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

import probssm as ps  # noqa: E402

start_time = time.time()
K, D, P, T = 4, 2, 10, 10_000
NUM_SLDS_ITERS, NUM_RSLDS_ITERS = 50, 50


def rotation(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


# %% The true model: two clockwise half circles, two straight segments.
A_true = np.stack([rotation(-np.pi / 24), rotation(-np.pi / 48), np.eye(D), np.eye(D)])
centers = np.array([[2.0, 0.0], [-2.0, 0.0]])
b_true = np.stack([(np.eye(D) - A_true[0]) @ centers[0], (np.eye(D) - A_true[1]) @ centers[1],
                   [0.1, 0.0], [-0.25, 0.0]])
# mode 0 when x > 2, mode 1 when x < -2 (steep), else the sign of the second coordinate
W_true = np.array([[100.0, 0.0], [-100.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
r_true = np.array([-200.0, -200.0, 0.0, 0.0])
rng = np.random.default_rng(0)
C_true = rng.normal(size=(P, D))
d_true = rng.normal(size=P)
true_model = ps.models.RecurrentSLDS(
    initial_probs=np.array([0.0, 0.0, 1.0, 0.0]), recurrence_weights=W_true, recurrence_biases=r_true,
    initial_means=np.array([0.0, 1.0]), initial_covs=1e-4 * np.eye(D), dynamics_matrices=A_true,
    dynamics_offsets=b_true, dynamics_covs=np.stack([1e-4 * np.eye(D)] * K), emission_matrices=C_true,
    emission_offsets=d_true, emission_covs=1e-2 * np.eye(P))

states, y = ps.sample(jax.random.key(0), true_model, T)
z_true = np.asarray(states[:, 0]).astype(int)
x_true = np.asarray(states[:, 1:])
print("time in each mode:", np.bincount(z_true, minlength=K))


def accuracy(z_hat, z=z_true):
    """Segmentation accuracy after the best one-to-one relabelling (Hungarian matching)."""
    overlap = np.zeros((K, K))
    np.add.at(overlap, (z, z_hat), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return overlap[rows, cols].sum() / len(z)


# %% Initialisation (`ps.learn.init_slds`): PCA to 2-D, k-means on the projection, an ARHMM
# fitted to it; its segmentation gives the per-mode dynamics, the transition counts and, for the
# recurrent model, a logistic regression of the next mode on x_{t-1}.
slds0 = ps.learn.init_slds(y, K, D)
rslds0 = ps.learn.init_slds(y, K, D, recurrent=True)
z_init = np.asarray(ps.switching.structured_vi(slds0, y, 10).mode_probs.argmax(-1))
print(f"initial SLDS (the ARHMM's segmentation) accuracy {accuracy(z_init):.3f}")

# %% (a) plain SLDS by variational EM; (b) recurrent SLDS by Laplace-EM.
t0 = time.time()
slds, slds_elbos = ps.learn.em(slds0, y, NUM_SLDS_ITERS)
z_slds = np.asarray(ps.switching.structured_vi(slds, y, 10).mode_probs.argmax(-1))
print(f"SLDS: {time.time() - t0:.1f} s, ELBO {float(slds_elbos[-1]):.1f}, accuracy {accuracy(z_slds):.3f}")
# the same SLDS by particle-Gibbs EM (conditional RBPF with ancestor sampling, 10 particles):
# no mean-field assumption, segmented by structured VI at the fitted parameters
t0 = time.time()
slds_pg, _ = ps.learn.em(slds0, y, NUM_SLDS_ITERS, method="particle_gibbs", key=jax.random.key(1), num_particles=10)
z_slds_pg = np.asarray(ps.switching.structured_vi(slds_pg, y, 10).mode_probs.argmax(-1))
print(f"SLDS (particle Gibbs): {time.time() - t0:.1f} s, accuracy {accuracy(z_slds_pg):.3f}")
t0 = time.time()
rslds, rslds_elbos = ps.learn.em(rslds0, y, NUM_RSLDS_ITERS)
post = ps.switching.laplace(rslds, y, 10)
z_rslds = np.asarray(post.mode_probs.argmax(-1))
print(f"rSLDS: {time.time() - t0:.1f} s, ELBO {float(rslds_elbos[-1]):.1f}, accuracy {accuracy(z_rslds):.3f}")

results = {"initial SLDS": accuracy(z_init), "SLDS": accuracy(z_slds),
           "SLDS (particle Gibbs)": accuracy(z_slds_pg), "rSLDS": accuracy(z_rslds)}
for name, acc in results.items():
    print(f"{name:22s} segmentation accuracy {acc:.3f}")

# %% The learned flow field: at each point x the mode the recurrence picks and A_k x + b_k - x.
xs = np.asarray(post.means)
lo, hi = xs[:2000].min(0), xs[:2000].max(0)  # the stretch drawn below
lo, hi = lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo)
g1, g2 = np.meshgrid(np.linspace(lo[0], hi[0], 30), np.linspace(lo[1], hi[1], 30))
grid = np.column_stack([g1.ravel(), g2.ravel()])
W = np.asarray(rslds.recurrence_weights)
r = np.asarray(rslds.recurrence_biases)
k_grid = np.argmax(grid @ W.T + r, axis=1)
A, b = np.asarray(rslds.dynamics_matrices), np.asarray(rslds.dynamics_offsets)
flow = np.einsum("nij,nj->ni", A[k_grid], grid) + b[k_grid] - grid
colors = plt.cm.tab10(np.arange(K))
# colour the learned modes by the true mode each was matched to
overlap = np.zeros((K, K))
np.add.at(overlap, (z_true, z_rslds), 1)
true_of = np.empty(K, int)
true_of[linear_sum_assignment(-overlap)[1]] = np.arange(K)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
axes[0].plot(x_true[:2000, 0], x_true[:2000, 1], color="0.6", lw=0.5)
axes[0].scatter(x_true[:2000, 0], x_true[:2000, 1], c=colors[z_true[:2000]], s=3)
axes[0].set_title("true latent path (first 2000 steps)")
axes[1].quiver(grid[:, 0], grid[:, 1], flow[:, 0], flow[:, 1], color=colors[true_of[k_grid]], angles="xy",
               width=0.003)
axes[1].plot(xs[:2000, 0], xs[:2000, 1], color="k", lw=0.4, alpha=0.6)
axes[1].set_title(f"learned rSLDS flow field (accuracy {results['rSLDS']:.3f})")
for ax in axes:
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
fig.tight_layout()
os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"), exist_ok=True)
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "slds_nascar.png"), dpi=120)
print(f"wall time {time.time() - start_time:.1f} s")
