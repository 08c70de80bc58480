"""Input-driven transitions of the HMM-GLM: the expected complete-data log-likelihood of
p(z_t = j | z_{t-1} = i, u_t) = A_ij exp(r_j . u_t) / sum_j' A_ij' exp(r_j' . u_t) and its
M-step by damped Newton steps (used by `probssm.learn.hmmglm_em`). Pure traceable functions
over arrays and the model's transition fields; no input checks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["transition_q", "transition_m_step"]


def transition_q(log_A, R, gamma, counts, us, lengths=None):
    """Q_trans of `probssm.learn.hmmglm_em.transition_objective` for gamma (M, T, K) (zero beyond each trial's length),
    summed counts (K, K), us (M, T, U)."""
    drive = us[:, 1:] @ R.T  # (M, T-1, K): r_j . u_t
    lse = jax.nn.logsumexp(log_A + drive[..., None, :], -1)  # (M, T-1, K): normaliser of row i at step t
    leaving = gamma[:, :-1]
    if lengths is not None:  # the last step of a trial has no successor
        leaving = leaving * (jnp.arange(1, gamma.shape[1]) < lengths[:, None])[..., None]
    return jnp.sum(counts * log_A) + jnp.sum(gamma[:, 1:] * drive) - jnp.sum(leaving * lse)


_NEWTON_STEPS = 8
_NEWTON_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.01)


def transition_m_step(model, trans_names, gamma, counts, us, lengths=None):
    """Maximise Q_trans over log A and R (those in ``trans_names``) by damped Newton steps.

    Q_trans is concave but flat along row shifts of log A and shifts of R shared by all
    states, so the Newton system gets a small ridge. Each step tries the step sizes in
    ``_NEWTON_STEP_SIZES`` at once and keeps the best one that does not lower Q_trans, so the
    result never scores below the start (the generalised-EM inequality holds for this block
    on its own: Q separates into emission and transition parameters)."""
    K, U = model.num_states, model.num_inputs
    log_A0, R0 = model.log_transition_matrix, model.transition_input_weights
    free_A, free_R = "transition_matrix" in trans_names, "transition_input_weights" in trans_names
    n_A = K * K if free_A else 0

    def unpack(theta):
        log_A = theta[:n_A].reshape(K, K) if free_A else log_A0
        R = theta[n_A:].reshape(K, U) if free_R else R0
        return log_A, R

    def q(theta):
        log_A, R = unpack(theta)
        return transition_q(log_A, R, gamma, counts, us, lengths)

    theta0 = jnp.concatenate(([log_A0.ravel()] if free_A else []) + ([R0.ravel()] if free_R else []))
    sizes = jnp.asarray(_NEWTON_STEP_SIZES, theta0.dtype)
    eye = jnp.eye(theta0.size, dtype=theta0.dtype)

    def newton(theta, _):
        g = jax.grad(q)(theta)
        H = jax.hessian(q)(theta)
        ridge = 1e-6 * jnp.trace(-H) / theta.size + jnp.finfo(theta.dtype).eps
        step = jnp.linalg.solve(-H + ridge * eye, g)
        candidates = theta + sizes[:, None] * step
        values = jax.vmap(q)(candidates)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        best = jnp.argmax(values)
        better = values[best] >= q(theta)
        return jnp.where(better, candidates[best], theta), None

    theta, _ = lax.scan(newton, theta0, None, length=_NEWTON_STEPS)
    log_A, R = unpack(theta)
    A = jax.nn.softmax(log_A, -1) if free_A else model.transition_matrix
    return A, R
