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
# # Hidden Markov models: forward-backward and Baum-Welch
#
# A hidden Markov model (HMM) has a *discrete* latent state $z_t \in \{0, \dots, K-1\}$ that
# follows a Markov chain, and observations whose distribution depends on the current state:
#
# $$
# p(z_0 = k) = \pi_k, \qquad p(z_t = j \mid z_{t-1} = i) = A_{ij}, \qquad
# y_t \mid z_t = k \sim \mathcal N(\mu_k, \sigma_k^2).
# $$
#
# With finitely many states, every posterior quantity is a finite sum, computed exactly by
# dynamic programming. We will
#
# 1. write the **forward algorithm** in numpy (in log space) and check it against `ps.hmm.filter`;
# 2. compute smoothed state probabilities (**forward-backward**, `ps.hmm.smoother`) and the most
#    probable path (**Viterbi**, `ps.hmm.viterbi`);
# 3. learn the parameters from a random start with **Baum-Welch** (`ps.learn.em`), and meet
#    label switching.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
import itertools  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

import probssm as ps  # noqa: E402

# %% [markdown]
# ## A three-state Gaussian HMM
#
# Three regimes ("low", "medium", "high") with sticky transitions. `ps.models.HMM` takes the
# initial probabilities, the transition matrix and an emission family from `ps.emissions`;
# `ps.emissions.Gaussian(means (K, D), covs (K, D, D))` is the Gaussian one. We simulate with
# numpy so every step is visible (`ps.sample(key, hmm, T)` does the same for any model).

# %%
K, T = 3, 400
pi_true = np.array([0.6, 0.3, 0.1])
A_true = np.array([[0.95, 0.04, 0.01],
                   [0.03, 0.94, 0.03],
                   [0.02, 0.05, 0.93]])
mu_true = np.array([-2.0, 0.0, 2.5])
sigma_true = np.array([0.7, 0.5, 1.0])

true_hmm = ps.models.HMM(jnp.asarray(pi_true), jnp.asarray(A_true),
                         ps.emissions.Gaussian(jnp.asarray(mu_true)[:, None],
                                               jnp.asarray(sigma_true**2)[:, None, None]))

rng = np.random.default_rng(1)
z = np.zeros(T, int)
z[0] = rng.choice(K, p=pi_true)
for t in range(1, T):
    z[t] = rng.choice(K, p=A_true[z[t - 1]])
y_np = rng.normal(mu_true[z], sigma_true[z])[:, None]        # (T, 1): emissions are (T, D)
y = jnp.asarray(y_np)

fig, ax = plt.subplots(figsize=(10, 2.8))
ax.plot(y_np[:, 0], color="0.5", lw=0.8, label="y")
ax.plot(mu_true[z], color="C3", label=r"$\mu_{z_t}$ (true regime)")
ax.set_xlabel("t")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The forward algorithm by hand
#
# The filtered probabilities $\alpha_t(k) = p(z_t = k \mid y_{0:t})$ obey
#
# $$
# \tilde\alpha_t(j) = \Big(\sum_i \alpha_{t-1}(i) A_{ij}\Big)\, p(y_t \mid z_t = j), \qquad
# c_t = \sum_j \tilde\alpha_t(j), \qquad \alpha_t = \tilde\alpha_t / c_t ,
# $$
#
# (with $\pi$ in place of the sum at $t=0$), and the normalisers are the one-step predictive
# likelihoods, $c_t = p(y_t \mid y_{0:t-1})$, so $\log p(y_{0:T-1}) = \sum_t \log c_t$.
# Emission densities under- and overflow easily, so we work with logarithms and `logsumexp`.

# %%
def gaussian_log_pdf(y, mu, sigma):
    return -0.5 * np.log(2 * np.pi * sigma**2) - 0.5 * ((y - mu) / sigma) ** 2


def forward_numpy(pi, A, mu, sigma, y):
    log_b = gaussian_log_pdf(y[:, None], mu[None, :], sigma[None, :])      # (T, K) log p(y_t | z_t = k)
    log_alpha = np.zeros_like(log_b)
    log_lik = 0.0
    log_pred = np.log(pi)
    for t in range(len(y)):
        if t > 0:
            log_pred = logsumexp(log_alpha[t - 1][:, None] + np.log(A), axis=0)   # log sum_i alpha(i) A_ij
        joint = log_pred + log_b[t]
        log_c = logsumexp(joint)
        log_alpha[t] = joint - log_c
        log_lik += log_c
    return np.exp(log_alpha), log_lik


alpha_np, ll_np = forward_numpy(pi_true, A_true, mu_true, sigma_true, y_np[:, 0])
filt = ps.hmm.filter(true_hmm, y)
print(f"log p(y): numpy {ll_np:.6f}, ps.hmm.filter {float(filt.log_likelihood):.6f}")
np.testing.assert_allclose(filt.filtered_probs, alpha_np, atol=1e-10)
np.testing.assert_allclose(filt.log_likelihood, ll_np, rtol=1e-10)
print("forward algorithm agrees with ps.hmm.filter")

# %% [markdown]
# ## Smoothing and Viterbi
#
# The backward pass adds the information in the future: the smoothed probabilities
# $\gamma_t(k) = p(z_t = k \mid y_{0:T-1})$ (the *forward-backward* algorithm,
# `ps.hmm.smoother`, which also returns the expected transition counts
# $\sum_t p(z_{t-1} = i, z_t = j \mid y)$ that Baum-Welch needs).
#
# The most probable *path* $\arg\max_{z_{0:T-1}} p(z_{0:T-1} \mid y)$ is not the sequence of
# per-step most probable states: the Viterbi algorithm replaces the sums by maxima and
# backtracks (`ps.hmm.viterbi`).

# %%
smooth = ps.hmm.smoother(true_hmm, y)
path = np.asarray(ps.hmm.viterbi(true_hmm, y))
print("expected transition counts:\n", np.round(np.asarray(smooth.transition_counts), 1))
print(f"accuracy: filtered argmax {np.mean(np.argmax(filt.filtered_probs, 1) == z):.3f}, "
      f"smoothed argmax {np.mean(np.argmax(smooth.smoothed_probs, 1) == z):.3f}, "
      f"Viterbi path {np.mean(path == z):.3f}")

fig, axes = plt.subplots(3, 1, figsize=(10, 5.5), sharex=True)
for ax, probs, title in ((axes[0], filt.filtered_probs, "filtered p(z_t | y_0:t)"),
                         (axes[1], smooth.smoothed_probs, "smoothed p(z_t | y_0:T-1)")):
    ax.stackplot(np.arange(T), np.asarray(probs).T, labels=[f"state {k}" for k in range(K)], alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
axes[0].legend(loc="upper right", fontsize=7, ncol=3)
axes[2].plot(z, color="k", lw=2, label="true")
axes[2].plot(path, color="C3", lw=1, ls="--", label="Viterbi")
axes[2].set_yticks(range(K))
axes[2].set_xlabel("t")
axes[2].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Baum-Welch from a random start
#
# Baum-Welch is EM for HMMs: the E-step is forward-backward (smoothed probabilities and
# expected transition counts), the M-step re-estimates $\pi$, $A$ and the emission parameters
# in closed form from those expected counts. Each iteration cannot decrease the
# log-likelihood. `ps.learn.em(model, emissions, num_iters)` picks Baum-Welch for an HMM
# (`ps.learn.baum_welch` is the same learner with more options: priors, restarts, tolerance)
# and returns `(fitted_model, history)`.

# %%
key = jax.random.PRNGKey(0)
k1, k2 = jax.random.split(key)
init_hmm = ps.models.HMM(
    jnp.ones(K) / K,
    jax.random.dirichlet(k1, 5.0 * jnp.ones(K), (K,)) * 0.5 + 0.5 * jnp.eye(K),   # random, rows sum to one
    ps.emissions.Gaussian(jax.random.normal(k2, (K, 1)) * float(np.std(y_np)) + float(np.mean(y_np)),
                          jnp.tile(jnp.var(y) * jnp.eye(1), (K, 1, 1))))
fitted, history = ps.learn.em(init_hmm, y, 60, progress=False)
history = np.asarray(history)
print(f"log-likelihood: start {history[0]:.2f} -> fitted {history[-1]:.2f} "
      f"(true parameters: {float(filt.log_likelihood):.2f})")
assert np.all(np.diff(history) > -1e-6), "EM never decreases the log-likelihood"

# %% [markdown]
# ## Label switching
#
# The likelihood is invariant to relabelling the states: any permutation of
# $(\pi, A, \mu, \sigma)$ describes the same distribution of $y$. EM therefore recovers the
# states only *up to a permutation*, and which one depends on the start. Before comparing
# with the truth we align the labels, here by choosing the permutation that best matches the
# decoded path (with more states, use the Hungarian algorithm,
# `scipy.optimize.linear_sum_assignment`).

# %%
fitted_path = np.asarray(ps.hmm.viterbi(fitted, y))
perm = max(itertools.permutations(range(K)), key=lambda p: np.mean(np.asarray(p)[fitted_path] == z))
perm = np.asarray(perm)                  # fitted state k is true state perm[k]
order = np.argsort(perm)                 # fitted index of each true state
mu_hat = np.asarray(fitted.emissions.means)[order, 0]
sigma_hat = np.sqrt(np.asarray(fitted.emissions.covs)[order, 0, 0])
A_hat = np.asarray(fitted.transition_matrix)[np.ix_(order, order)]
print("fitted -> true label map:", perm.tolist())
print("means  true", mu_true, " fitted", np.round(mu_hat, 2))
print("sds    true", sigma_true, " fitted", np.round(sigma_hat, 2))
print("transition matrix (fitted, aligned):\n", np.round(A_hat, 3))
print(f"Viterbi accuracy with the fitted model (aligned): {np.mean(perm[fitted_path] == z):.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(history)
axes[0].axhline(float(filt.log_likelihood), color="k", ls="--", label="true parameters")
axes[0].set_xlabel("EM iteration")
axes[0].set_ylabel("log-likelihood")
axes[0].legend(fontsize=8)
grid = np.linspace(y_np.min() - 1, y_np.max() + 1, 300)
axes[1].hist(y_np[:, 0], bins=40, density=True, color="0.8")
for k in range(K):
    w_true, w_hat = np.mean(z == k), np.mean(perm[fitted_path] == k)
    axes[1].plot(grid, w_true * np.exp(gaussian_log_pdf(grid, mu_true[k], sigma_true[k])), "k--", lw=1)
    axes[1].plot(grid, w_hat * np.exp(gaussian_log_pdf(grid, mu_hat[k], sigma_hat[k])), color=f"C{k}")
axes[1].set_title("emission densities: fitted (colour) vs true (dashed)", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. **Backward pass by hand.** Write the backward recursion
#    $\beta_t(i) = \sum_j A_{ij}\, p(y_{t+1} \mid j)\, \beta_{t+1}(j)$ in log space, form
#    $\gamma_t \propto \alpha_t \beta_t$ and check it against `ps.hmm.smoother(...).smoothed_probs`.
# 2. **Viterbi by hand.** Replace `logsumexp` by `max` in the forward pass, keep the argmax
#    pointers and backtrack. Check your path against `ps.hmm.viterbi`. Is the Viterbi path
#    always equal to the per-step argmax of the smoothed probabilities? Find a $t$ where they differ.
# 3. **Local optima.** Run Baum-Welch from ten random starts (different keys) and plot the
#    final log-likelihoods. How often does it get stuck? Compare with
#    `ps.learn.baum_welch(init_hmm, y, 60, num_restarts=10, key=key)`.
# 4. **Missing data.** Set 20% of `y` to NaN at random. How do the filtered and smoothed
#    probabilities behave at the missing steps? Does Baum-Welch still recover the parameters?
# 5. **How many states?** Fit K = 2, 3, 4 and 5 and compare BIC,
#    $-2 \log \hat L + n_{\text{params}} \log T$. (Hint: a Gaussian HMM with one-dimensional
#    emissions has $(K - 1) + K(K - 1) + 2K$ free parameters.)
