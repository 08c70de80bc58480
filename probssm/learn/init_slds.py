"""The usual starting point of SLDS learning (Linderman et al. 2017; Zoltowski et al. 2020): an
autoregressive HMM fitted to a low-dimensional projection of the data.

    slds = ps.learn.init_slds(y, num_modes=4, state_dim=2)          # then ps.learn.em(slds, y, n)
    rslds = ps.learn.init_slds(y, 4, 2, recurrent=True)

1. PCA of the pooled observations to ``state_dim`` components: x_t = V^T (y_t - mean); the
   emission matrix is V, its offset the mean, its covariance the residual covariance.
2. k-means (k-means++ seeding, fixed seed) on the projection gives first labels; per label a
   least-squares AR(1) x_t ~ A_k x_{t-1} + b_k gives a `ps.models.ARHMM`, fitted by Baum-Welch
   on the projected sequences.
3. The ARHMM's most probable mode per step (smoothed marginals) labels the steps again; per mode
   the same AR(1) regression gives A_k, b_k, Q_k, and the label transitions (one pseudo-count per
   pair) the transition matrix. For a recurrent model, a ridge-penalised multinomial logistic
   regression of z_t on x_{t-1} gives shared ("recurrence-only") weights and biases.

Runs once, outside jit, on concrete arrays (NumPy for the projection and the regressions,
`ps.learn.em` for the ARHMM).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.optimize import minimize
from scipy.special import logsumexp

from probssm.core import batching, checks
from probssm.core.lags import lagged_inputs
from probssm.inference import hmm
from probssm.learn.em import em
from probssm.models.hmm import ARHMM
from probssm.models.slds import SLDS, RecurrentSLDS

__all__ = ["init_slds"]


def _pairs(x, valid):
    """(x_{t-1}, x_t) pairs inside each sequence: (n, d), (n, d), and their (b, t) index of x_t."""
    both = valid[:, 1:] & valid[:, :-1]
    b, t = np.nonzero(both)
    return x[b, t], x[b, t + 1], (b, t + 1)


def _ar1(x_prev, x_next, fallback):
    """Least squares x_next ~ A x_prev + b with residual covariance; ``fallback`` (A, b, Q) when
    there are too few pairs to fit."""
    n, d = x_prev.shape
    if n < 2 * (d + 1):
        return fallback
    X = np.column_stack([x_prev, np.ones(n)])
    coef, *_ = np.linalg.lstsq(X, x_next, rcond=None)
    res = x_next - X @ coef
    Q = res.T @ res / n + 1e-6 * np.eye(d)
    return coef[:d].T, coef[d], Q


def _multinomial_logistic(x, z, K, penalty):
    """Weights (K, d) and biases (K,) of softmax(W x + r) fitted to labels z by ridge-penalised
    maximum likelihood (L-BFGS)."""
    n, d = x.shape
    onehot = np.eye(K)[z]

    def objective(theta):
        W, r = theta[:K * d].reshape(K, d), theta[K * d:]
        logits = x @ W.T + r
        lse = logsumexp(logits, axis=1)
        p = np.exp(logits - lse[:, None])
        value = -np.sum(onehot * logits) + np.sum(lse) + 0.5 * penalty * np.sum(theta * theta)
        g_logits = p - onehot
        grad = np.concatenate([(g_logits.T @ x).ravel(), g_logits.sum(0)]) + penalty * theta
        return value, grad

    out = minimize(objective, np.zeros(K * d + K), jac=True, method="L-BFGS-B")
    return out.x[:K * d].reshape(K, d), out.x[K * d:]


def init_slds(emissions, num_modes: int, state_dim: int, *, lengths=None, recurrent: bool = False,
              num_arhmm_iters: int = 50, seed: int = 0, recurrence_penalty: float = 1e-2):
    """A starting `ps.models.SLDS` (or `RecurrentSLDS`) from an ARHMM fitted to a PCA projection
    of the data: the usual initialisation of SLDS learning (see the module doc for the recipe).

    Args:
        emissions: (T, p), (B, T, p) or a list of (T_b, p) arrays; no missing values inside a
            sequence (NaN only as padding beyond ``lengths``).
        num_modes: K >= 1.
        state_dim: d, 1 <= d <= p (the PCA keeps d components).
        lengths: (B,) true lengths of a padded batch.
        recurrent: return a `RecurrentSLDS` with shared recurrence weights (K, d) and biases (K,)
            from a logistic regression of the ARHMM labels on x_{t-1}.
        num_arhmm_iters: Baum-Welch iterations of the ARHMM.
        seed: seed of the k-means++ seeding (the only randomness).
        recurrence_penalty: ridge on the logistic regression (> 0).

    Returns:
        A Gaussian-emission `SLDS` (shared emissions) or `RecurrentSLDS`, in the data's float dtype.

    Raises:
        ValueError: naming the argument: emissions not (T, p) / (B, T, p) / a list, NaN inside a
            sequence, inf, fewer than 2 steps, traced emissions (inside jit); ``num_modes`` < 1; ``state_dim`` outside [1, p];
            a non-positive ``num_arhmm_iters`` or ``recurrence_penalty``.
    """
    K = checks.positive_int(num_modes, "num_modes")
    d = checks.positive_int(state_dim, "state_dim")
    num_arhmm_iters = checks.positive_int(num_arhmm_iters, "num_arhmm_iters")
    penalty = checks.positive_float(recurrence_penalty, "recurrence_penalty")
    if not isinstance(recurrent, bool):
        raise ValueError(f"recurrent: expected True or False, got {recurrent!r}")
    batch = batching.as_batch(emissions, None, lengths)
    if not checks.is_concrete(batch.emissions) or (batch.lengths is not None and not checks.is_concrete(batch.lengths)):
        raise ValueError("emissions: init_slds runs once on concrete arrays (PCA, k-means and least squares in "
                         "NumPy); call it outside jax.jit / vmap and pass the model it returns in")
    ys = np.asarray(batch.emissions if batch.batched else batch.emissions[None], dtype=float)
    B, T, p = ys.shape
    if T < 2:
        raise ValueError(f"emissions: expected sequences of at least 2 time steps, got shape {tuple(ys.shape)}")
    if d > p:
        raise ValueError(f"state_dim: the PCA initialisation keeps at most p = {p} components, got {d}")
    lens = np.full(B, T) if batch.lengths is None else np.atleast_1d(np.asarray(batch.lengths))
    valid = np.arange(T)[None] < lens[:, None]
    if np.isnan(ys[valid]).any():
        raise ValueError("emissions: init_slds needs fully observed sequences (NaN only as padding beyond lengths)")
    if np.isinf(ys[valid]).any():
        raise ValueError("emissions: found inf")
    dtype = batch.emissions.dtype

    # 1. PCA of the pooled observations
    Y = ys[valid]
    mean = Y.mean(0)
    _, _, Vt = np.linalg.svd(Y - mean, full_matrices=False)
    C = Vt[:d].T  # (p, d)
    x = np.where(valid[..., None], (ys - mean) @ C, 0.0)  # (B, T, d)
    res = (Y - mean) - (Y - mean) @ C @ C.T
    R = res.T @ res / len(Y) + 1e-4 * np.var(Y, axis=0).mean() * np.eye(p)

    # 2. k-means labels -> AR(1) per label -> ARHMM by Baum-Welch on the projection
    xv = x[valid]
    _, labels = kmeans2(xv, K, seed=seed, minit="++")
    z = np.zeros((B, T), int)
    z[valid] = labels
    x_prev, x_next, idx = _pairs(x, valid)
    pooled = _ar1(x_prev, x_next, (np.eye(d), np.zeros(d), np.eye(d)))
    per_label = [_ar1(x_prev[z[idx] == k], x_next[z[idx] == k], pooled) for k in range(K)]
    A0, b0, Q0 = (np.stack(a) for a in zip(*per_label))
    counts = np.ones((K, K))
    both = valid[:, 1:] & valid[:, :-1]
    np.add.at(counts, (z[:, :-1][both], z[:, 1:][both]), 1.0)
    arhmm0 = ARHMM(np.full(K, 1.0 / K), counts / counts.sum(1, keepdims=True), A0, b0, Q0)
    xj = jnp.asarray(x, dtype)
    lags = lagged_inputs(xj, 1)
    lengths_j = None if batch.lengths is None else jnp.asarray(lens)
    arhmm, _ = em(arhmm0, xj, num_arhmm_iters, inputs=lags, lengths=lengths_j, progress=False)
    post = hmm.smoother(arhmm, xj, inputs=lags, lengths=lengths_j)
    z = np.asarray(post.smoothed_probs).argmax(-1)

    # 3. the SLDS from the ARHMM's labels
    per_mode = [_ar1(x_prev[z[idx] == k], x_next[z[idx] == k], pooled) for k in range(K)]
    A, b, Q = (np.stack(a) for a in zip(*per_mode))
    counts = np.ones((K, K))
    np.add.at(counts, (z[:, :-1][both], z[:, 1:][both]), 1.0)
    pi = np.bincount(z[:, 0], minlength=K) + 1.0
    cov0 = np.cov(x[:, 0].T).reshape(d, d) if B > 1 else np.zeros((d, d))
    cov0 = cov0 + np.cov(xv.T).reshape(d, d) * 0.1 + 1e-4 * np.eye(d)
    common = dict(initial_means=x[:, 0].mean(0), initial_covs=cov0, dynamics_matrices=A, dynamics_offsets=b,
                  dynamics_covs=Q, emission_matrices=C, emission_offsets=mean, emission_covs=R)
    common = {k: np.asarray(v, dtype) for k, v in common.items()}
    if not recurrent:
        return SLDS(initial_probs=np.asarray(pi / pi.sum(), dtype),
                    transition_matrix=np.asarray(counts / counts.sum(1, keepdims=True), dtype), **common)
    W, r = _multinomial_logistic(x_prev, z[idx], K, penalty)
    return RecurrentSLDS(initial_probs=np.asarray(pi / pi.sum(), dtype), recurrence_weights=np.asarray(W, dtype),
                         recurrence_biases=np.asarray(r, dtype), **common)
