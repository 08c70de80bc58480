"""The one-call particle smoother: a particle filter and a backward pass, chosen by name.

    sm = ps.smc.smoother(key, model, y, 500, method="ffbsi", num_samples=200)
    sm.smoothed_means, sm.smoothed_covs, sm.trajectories      # (T, d), (T, d, d), (M, T, d)

Methods (N particles, M trajectories, T steps):

* ``"ffbsi"``: forward-filter backward-simulation (Godsill, Doucet & West 2004): M independent
  draws of whole paths from the particle approximation of p(z_{0:T-1} | y), O(T M N) exact
  (O(T M) expected by accept-reject when the model declares a transition bound);
* ``"ffbsm"`` (alias ``"marginal"``): forward-filter backward-smoothing of the marginal
  weights, w_{t|T}^i = W_t^i sum_j w_{t+1|T}^j f(z_{t+1}^j | z_t^i) / sum_k W_t^k f(z_{t+1}^j | z_t^k),
  O(T N^2), no Monte Carlo noise beyond the filter's; no trajectories;
* ``"paris"``: PaRIS (Olsson & Westerborn 2017) on the additive functionals
  sum_t e_t z_t, sum_t e_t z_t z_t^T (e_t the t-th unit vector): the same marginals in one
  forward pass, O(T N Ñ) (memory O(N T d^2)); no trajectories;
* ``"genealogy"``: the filter's own ancestral lines (Kitagawa 1996), weighted by the final
  weights; free, but degenerate far from T-1 (few distinct ancestors): N trajectories.

Every method returns a `ParticleSmootherResult`; for a discrete-state model (an
`AbstractDiscreteSSM`, integer particles) ``smoothed_probs`` (T, K) holds the smoothed
marginal probabilities of the states.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from probssm.core import checks
from probssm.core.protocol import AbstractDiscreteSSM
from probssm.inference.smc import common as C
from probssm.inference.smc import filter as F
from probssm.inference.smc.backward import backward_sample_sequence, resolve_method
from probssm.inference.smc.paris import AdditiveFunctional, paris_sequence, resolve_backward

__all__ = ["ParticleSmootherResult", "smoother", "smoother_sequence", "METHODS"]

METHODS = ("ffbsi", "ffbsm", "marginal", "paris", "genealogy")


class ParticleSmootherResult(NamedTuple):
    """Output of `smoother` (a leading axis B is added for a batch of sequences).

    For a scalar state (an HMM's integer state) the trailing d axes are absent:
    smoothed_means (T,), smoothed_covs (T,) (the variance).
    """

    log_likelihood: jax.Array  # ()            the filter's log p(y) estimate
    smoothed_means: jax.Array  # (T, d)        E[z_t | y_{0:T-1}]
    smoothed_covs: jax.Array  # (T, d, d)      Cov[z_t | y_{0:T-1}]
    smoothed_probs: Optional[jax.Array] = None  # (T, K)  P(z_t = k | y): discrete-state models only
    trajectories: Optional[jax.Array] = None  # (M, T, d)  "ffbsi" (M = num_samples), "genealogy" (M = N)
    trajectory_log_weights: Optional[jax.Array] = None  # (M,)  normalised; uniform for "ffbsi"
    smoothed_log_weights: Optional[jax.Array] = None  # (T, N)  "ffbsm": marginal smoothing weights of
    #                                                    the filter's particles (given in ``particles``)
    particles: Optional[jax.Array] = None  # (T, N, d)  "ffbsm": the filter's particles


def _flat(z):
    """(M, ...) states as (M, k) floats."""
    dt = z.dtype if jnp.issubdtype(z.dtype, jnp.inexact) else jnp.result_type(float)
    return z.reshape(z.shape[0], -1).astype(dt)


def _moments(log_weights, z, num_states):
    """Weighted mean, covariance (variance for a scalar state) and, for a discrete state, the
    probabilities of each state, of the M states ``z`` (M, ...) with normalised log-weights (M,)."""
    w = jnp.exp(log_weights)
    v = _flat(z)
    w = w.astype(v.dtype)
    mean = w @ v
    centred = v - mean
    cov = (w[:, None] * centred).T @ centred
    shape = z.shape[1:]
    if shape == ():
        mean, cov = mean[0], cov[0, 0]
    else:
        mean = mean.reshape(shape)
        if len(shape) != 1:
            cov = cov.reshape(shape + shape)
    probs = None
    if num_states is not None:
        probs = w @ jax.nn.one_hot(z.reshape(z.shape[0]), num_states, dtype=v.dtype)
    return mean, cov, probs


def _moments_over_time(log_weights, z, num_states):
    """`_moments` at every step: log_weights (T, M), z (T, M, ...)."""
    return jax.vmap(lambda lw, zz: _moments(lw, zz, num_states))(log_weights, z)


def _genealogy(particles, ancestors):
    """The N ancestral lines ending at the final particles: (N, T, ...)."""
    num = ancestors.shape[1]

    def body(idx, xs):
        z_t, a_t = xs
        return a_t[idx], z_t[idx]

    _, paths = lax.scan(body, jnp.arange(num, dtype=jnp.int32), (particles, ancestors), reverse=True)
    return jnp.swapaxes(paths, 0, 1)


def _ffbsm(model, particles, log_weights, inputs):
    """Marginal smoothing log-weights (T, N) by the O(N^2) backward recursion."""

    def body(lw_next, xs):
        t_next, z_t, lw_t, z_next = xs
        u = C.row(inputs, t_next)
        # logf[j, i] = log f(z_{t+1}^j | z_t^i)
        logf = jax.vmap(lambda zn: jax.vmap(lambda zp: model.transition(zp, t_next, u).log_prob(zn))(z_t))(z_next)
        logf = jnp.where(jnp.isnan(logf), -jnp.inf, logf)
        denom = logsumexp(lw_t[None, :] + logf, axis=1)  # (N_j,)
        denom = jnp.where(jnp.isfinite(denom), denom, 0.0)
        lw, _ = C.normalise(lw_t + logsumexp(lw_next[:, None] - denom[:, None] + logf, axis=0))
        return lw, lw

    num_timesteps = log_weights.shape[0]
    xs = (jnp.arange(1, num_timesteps), particles[:-1], log_weights[:-1], particles[1:])
    _, lws = lax.scan(body, log_weights[-1], xs, reverse=True)
    return jnp.concatenate([lws, log_weights[-1:]])


def _marginal_functional(model, state, num_timesteps, num_states):
    """Per-time first and second moments (and one-hot states) as an additive functional for PaRIS."""

    def term(z, t):
        v = _flat(z[None])[0]
        out = {"m": jnp.zeros((num_timesteps,) + v.shape, v.dtype).at[t].set(v),
               "s": jnp.zeros((num_timesteps,) + v.shape * 2, v.dtype).at[t].set(jnp.outer(v, v))}
        if num_states is not None:
            out["p"] = jnp.zeros((num_timesteps, num_states), v.dtype).at[t].set(
                jax.nn.one_hot(z.reshape(()), num_states, dtype=v.dtype))
        return out

    return AdditiveFunctional(initial=lambda z, y, u: term(z, 0), step=lambda zp, z, t, y, u: term(z, t))


def _num_states(model):
    return model.num_states if isinstance(model, AbstractDiscreteSSM) else None


def smoother_sequence(key, model, emissions, inputs=None, *, num_particles: int, method: str = "ffbsi",
                      num_samples: Optional[int] = None, num_backward: int = 2, backward: str = "auto",
                      resampling: str = "systematic", ess_threshold=0.5, proposal: Optional[Callable] = None,
                      auxiliary: Optional[Callable] = None, length=None) -> ParticleSmootherResult:
    """Particle smoother on one sequence: the public traceable core of `smoother`.

    Args are those of `smoother` for one sequence (emissions (T, D), inputs None or (T, ...)
    rows, ``length`` the true length of a padded sequence, possibly traced); ``num_samples``
    None means ``num_particles``. All but key, model, emissions, inputs, ess_threshold and
    length are static.

    Only the model is checked (see `probssm.inference.smc.common`): usable inside the caller's
    jit / vmap.
    """
    C.check_model(model)
    method = "ffbsm" if method == "marginal" else method
    num_states = _num_states(model)
    ys, us = C.prepare_sequence(model, emissions, inputs, None)
    ys = C.mask_padding(ys, length)  # padding is missing data: smoothed values there are predictions
    proposal = C.pad_proposal(proposal, length)
    auxiliary = C.pad_proposal(auxiliary, length)
    num_timesteps = ys.shape[0]
    k_f, k_b = jax.random.split(key)
    if method == "paris":
        struct = C.state_struct(model, C.first_input_row(model, us))
        functional = _marginal_functional(model, struct, num_timesteps, num_states)
        res = paris_sequence(key, model, ys, us, additive_functional=functional, num_particles=num_particles,
                             num_backward=num_backward, resampling=resampling, ess_threshold=ess_threshold,
                             proposal=proposal, auxiliary=auxiliary, backward=backward)
        m, s = res.estimate["m"], res.estimate["s"]
        cov = s - jnp.einsum("ti,tj->tij", m, m)
        if struct.shape == ():
            m, cov = m[:, 0], cov[:, 0, 0]
        else:
            m = m.reshape((num_timesteps,) + struct.shape)
            if len(struct.shape) != 1:
                cov = cov.reshape((num_timesteps,) + struct.shape * 2)
        return ParticleSmootherResult(res.log_likelihood, m, cov, res.estimate.get("p"))

    pf = F.particle_filter_sequence(k_f, model, ys, us, num_particles=num_particles, resampling=resampling,
                                    ess_threshold=ess_threshold, proposal=proposal, auxiliary=auxiliary)
    if method == "ffbsi":
        m = num_particles if num_samples is None else num_samples
        paths = backward_sample_sequence(k_b, model, pf, us, num_samples=m, method=backward)
        lw = jnp.full((m,), -math.log(m), pf.log_weights.dtype)
        mean, cov, probs = _moments_over_time(jnp.broadcast_to(lw, (num_timesteps, m)), jnp.swapaxes(paths, 0, 1),
                                              num_states)
        return ParticleSmootherResult(pf.log_likelihood, mean, cov, probs, paths, lw)
    if method == "genealogy":
        paths = _genealogy(pf.particles, pf.ancestors)
        lw = pf.log_weights[-1]
        mean, cov, probs = _moments_over_time(jnp.broadcast_to(lw, (num_timesteps,) + lw.shape),
                                              jnp.swapaxes(paths, 0, 1), num_states)
        return ParticleSmootherResult(pf.log_likelihood, mean, cov, probs, paths, lw)
    if method == "ffbsm":
        lws = _ffbsm(model, pf.particles, pf.log_weights, us)
        mean, cov, probs = _moments_over_time(lws, pf.particles, num_states)
        return ParticleSmootherResult(pf.log_likelihood, mean, cov, probs, None, None, lws, pf.particles)
    raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")


@eqx.filter_jit
def _run(key, model, batch, ess_threshold, *, num_particles, method, num_samples, num_backward, backward,
         resampling, proposal, auxiliary):
    def one(y, u, n, k):
        return smoother_sequence(k, model, y, u, num_particles=num_particles, method=method,
                                 num_samples=num_samples, num_backward=num_backward, backward=backward,
                                 resampling=resampling, ess_threshold=ess_threshold, proposal=proposal,
                                 auxiliary=auxiliary, length=n)

    return batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))


def smoother(key, model, emissions, num_particles: int, method: str = "ffbsi", *, num_samples: Optional[int] = None,
             num_backward: int = 2, backward: str = "auto", resampling: str = "systematic",
             ess_threshold: float = 0.5, proposal: Optional[Callable] = None, auxiliary: Optional[Callable] = None,
             inputs=None, lengths=None) -> ParticleSmootherResult:
    """Particle smoother in one call: a particle filter, then the backward pass ``method``.

    Args:
        key: a `jax.random` key.
        model: any `ps.SSM` (continuous or discrete state).
        emissions: (T, D), a batch (B, T, D) or a list of (T_b, D) arrays; NaN marks a missing
            step; +-inf is refused (on concrete arrays).
        num_particles: N >= 2 particles of the filter.
        method: "ffbsi" (backward simulation of ``num_samples`` paths), "ffbsm" / "marginal"
            (O(N^2) marginal backward weights), "paris" (one forward pass, O(N Ñ) per step) or
            "genealogy" (the filter's ancestral lines); see the module docstring.
        num_samples: "ffbsi" only: M trajectories (None: N).
        num_backward: "paris" only: Ñ >= 1 backward draws per particle.
        backward: how backward-kernel draws are made ("ffbsi" and "paris"): "auto" (accept-reject
            when the model declares a transition bound), "exact" or "rejection"; "paris" also
            takes "mcmc" (see `paris`).
        resampling, ess_threshold, proposal, auxiliary, inputs: as for `particle_filter`.
        lengths: (B,) true lengths of a padded batch; steps beyond are missing data, so the
            smoothed values there are the model's predictions.

    Returns:
        `ParticleSmootherResult`: log_likelihood, smoothed_means (T, d), smoothed_covs (T, d, d),
        smoothed_probs (T, K) for a discrete-state model, trajectories (M, T, d) and their
        log-weights for "ffbsi" / "genealogy", the marginal smoothing log-weights and the
        particles for "ffbsm" (a leading axis B for a batch).

    Example:
        >>> sm = ps.smc.smoother(jax.random.key(0), model, y, 500, method="paris")
        >>> sm.smoothed_means.shape        # (T, d)

    Compiled once per model structure and static arguments (key, model parameters and data are
    traced: it runs under your own jax.jit / vmap too). The traceable single-sequence core is
    `smoother_sequence`.
    """
    C.check_model(model)
    num_particles = C.check_num_particles(num_particles)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if num_samples is not None:
        num_samples = checks.positive_int(num_samples, "num_samples")
        if method != "ffbsi":
            raise ValueError(f"num_samples: only method='ffbsi' draws trajectories, got method={method!r}")
    num_backward = checks.positive_int(num_backward, "num_backward")
    if method == "paris":
        resolve_backward(model, backward)
    else:
        resolve_method(model, backward, "backward")
    resampling = C.check_resampling(resampling)
    thr = C.check_ess_threshold(ess_threshold)
    batch = C.prepare(model, emissions, inputs, lengths)
    F.check_proposal(key, model, batch, proposal)
    F.check_auxiliary(key, model, batch, auxiliary)
    method = "ffbsm" if method == "marginal" else method
    return _run(key, model, batch, jnp.asarray(thr, batch.emissions.dtype), num_particles=num_particles,
                method=method, num_samples=num_samples, num_backward=num_backward, backward=backward,
                resampling=resampling, proposal=proposal, auxiliary=auxiliary)
