"""Simulated HMM-GLM spike trains (`probssm.models.hmmglm.HMMGLM`): draws from a model and the
synthetic benchmark (a sparse signed connectome switched by sticky brain states).

    sim = ps.datasets.simulate_hmmglm(key, num_states=5, num_neurons=20, num_timesteps=2000, num_trials=50)
    sim.spikes      # (M, T, N)   sim.states (M, T)   sim.connectome (N, N)   sim.model (the truth)
    states, spikes = ps.datasets.sample_hmmglm(key, model, num_timesteps, num_trials, inputs=None)

Poisson counts are drawn by inverting the CDF (a few vectorised operations per step, cheap to
compile inside the `lax.scan` over time), so simulating compiles in about a second.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import gammaln

from probssm.core import checks
from probssm.models.emissions.glm import exponential_basis, link_mean
from probssm.models.hmmglm import HMMGLM, sticky_transition_matrix
from probssm.models.hmmglm_priors import NoPrior

__all__ = ["SimulatedHMMGLM", "simulate_hmmglm", "sample_hmmglm"]


class SimulatedHMMGLM(NamedTuple):
    model: HMMGLM  # the generating model (NoPrior, the true per-state weights)
    states: jax.Array  # (M, T) int
    spikes: jax.Array  # (M, T, N)
    connectome: jax.Array  # (N, N) true signs in {-1, 0, +1}


_MAX_INVERSION = 30.0
_INVERSION_TERMS = 96


def _poisson_inverse(u, rate):
    """Poisson quantile at u (inversion of the CDF over 0..95) for rates <= 30, where the
    tail beyond 95 is below 1e-20; a rounded normal quantile above 30. Cheap to compile
    inside a scan, unlike `jax.random.poisson`."""
    dtype = rate.dtype
    lam = jnp.minimum(rate, _MAX_INVERSION)
    k = jnp.arange(_INVERSION_TERMS, dtype=dtype)
    logpmf = k * jnp.log(jnp.maximum(lam, 1e-30))[..., None] - lam[..., None] - gammaln(k + 1.0)
    upper = jnp.triu(jnp.ones((_INVERSION_TERMS, _INVERSION_TERMS), dtype))
    cdf = jnp.exp(logpmf) @ upper  # cumulative sum as one small matmul (cumsum compiles slowly)
    small = jnp.sum(cdf < u[..., None] * cdf[..., -1:], -1).astype(dtype)  # normalised: no rounding overflow
    z = jax.scipy.special.ndtri(jnp.clip(u, 1e-12, 1 - 1e-12))
    large = jnp.maximum(jnp.round(rate + jnp.sqrt(rate) * z), 0.0)
    return jnp.where(rate <= _MAX_INVERSION, small, large)


def _simulate_trial(key, model: HMMGLM, num_timesteps, inputs):
    """One trial; all randomness is drawn up front, the scan only inverts CDFs."""
    K, N, L = model.num_states, model.num_neurons, model.history_length
    W = model.coupling_weights("hard").reshape(K, N, -1)
    V = model.input_weights
    dtype = model.weights.dtype
    kz, ky = jax.random.split(key)
    uz = jax.random.uniform(kz, (num_timesteps,), dtype)
    uy = jax.random.uniform(ky, (num_timesteps, N), dtype)
    cum_pi = jnp.cumsum(model.initial_probs)
    cum_A = jnp.cumsum(model.transition_matrix, -1)
    R = model.transition_input_weights
    basis = model.basis

    def step(carry, xs):
        z_prev, past, t = carry  # past: (L, N), row 0 = y_{t-1}
        u_z, u_y, u = xs
        if model.input_driven:
            row = jax.nn.softmax(model.log_transition_matrix[z_prev] + R @ u)
            cum = jnp.where(t == 0, cum_pi, jnp.cumsum(row))
        else:
            cum = jnp.where(t == 0, cum_pi, cum_A[z_prev])
        z = jnp.minimum(jnp.sum(cum < u_z * cum[-1]), K - 1).astype(jnp.int32)
        h = jnp.einsum("ln,jl->nj", past, basis).reshape(-1)
        eta = W[z] @ h + model.biases
        if u is not None:
            eta = eta + V[z] @ u
        if model.family == "poisson":
            y = _poisson_inverse(u_y, link_mean(model.link, eta))
        else:
            p = jax.nn.sigmoid(eta) if model.link == "sigmoid" else -jnp.expm1(-link_mean(model.link, eta))
            y = (u_y < p).astype(dtype)
        past = jnp.concatenate([y[None], past[:-1]])
        return (z, past, t + 1), (z, y)

    init = (jnp.zeros((), jnp.int32), jnp.zeros((L, N), dtype), jnp.zeros((), jnp.int32))
    _, (zs, ys) = lax.scan(step, init, (uz, uy, inputs))
    return zs, ys


def sample_hmmglm(key, model: HMMGLM, num_timesteps: int, num_trials: int = 1, inputs=None):
    """Draw (states (M, T), spikes (M, T, N)) from a model, hard weights; spike history is
    fed back as it is generated. ``inputs``: (T, U) shared or (M, T, U)."""
    T = checks.positive_int(num_timesteps, "num_timesteps")
    M = checks.positive_int(num_trials, "num_trials")
    if model.num_inputs and inputs is None:
        raise ValueError(f"inputs: the model has {model.num_inputs} external covariates; pass inputs (T, U)")
    u = None
    if inputs is not None:
        u = jnp.asarray(inputs, model.weights.dtype)
        u = jnp.broadcast_to(u, (M, T, u.shape[-1])) if u.ndim == 2 else u
        checks.shape(u, "inputs", (M, T, model.num_inputs), f"({T}, {model.num_inputs}) or ({M}, {T}, {model.num_inputs})")
    return _sample_jit(key, model, T, M, u)


@partial(jax.jit, static_argnums=(2, 3))
def _sample_jit(key, model, T, M, u):
    keys = jax.random.split(key, M)
    return jax.vmap(lambda k, ui: _simulate_trial(k, model, T, ui), in_axes=(0, None if u is None else 0))(keys, u)


@partial(jax.jit, static_argnums=tuple(range(2, 13)))
def _draw_benchmark(key, basis, K, N, connection_prob, state_keep_prob, strength_range, self_weight, bias_range,
                    stickiness, family, link, max_excitation):
    dtype = basis.dtype
    J = basis.shape[0]
    kc, km, ks, kb = jax.random.split(key, 4)
    u = jax.random.uniform(kc, (N, N), dtype)
    C = jnp.where(u < connection_prob / 2, -1, jnp.where(u < connection_prob, 1, 0))
    C = jnp.where(jnp.eye(N, dtype=bool), int(np.sign(self_weight)), C)
    keep = jax.random.uniform(km, (K, N, N), dtype) < state_keep_prob
    lo, hi = strength_range
    s = jax.random.uniform(ks, (K, N, N), dtype, lo, hi)
    w = C[None] * keep * s
    # stability: cap each state's total excitatory input per neuron (the max row sum bounds the
    # spectral radius of the excitatory part, which must stay below 1 for a softplus/exp network)
    exc_rows = jnp.max(jnp.sum(jnp.maximum(w, 0.0), -1), -1)  # (K,)
    factor = jnp.minimum(1.0, max_excitation / jnp.maximum(exc_rows, 1e-12)) if max_excitation > 0 else jnp.ones_like(exc_rows)
    w = jnp.where(w > 0, w * factor[:, None, None], w)
    w = jnp.where(jnp.eye(N, dtype=bool)[None], self_weight, w)
    W = jnp.broadcast_to(w[..., None], (K, N, N, J)) / J
    b = jax.random.uniform(kb, (N,), dtype, *bias_range)
    model = HMMGLM(jnp.full((K,), 1.0 / K, dtype), sticky_transition_matrix(K, stickiness, dtype), b, W.astype(dtype),
                   None, basis, prior=NoPrior(), family=family, link=link)
    return model, C


def simulate_hmmglm(key, num_states: int = 5, num_neurons: int = 20, num_timesteps: int = 2000,
                    num_trials: int = 50, *, connection_prob: float = 0.3, state_keep_prob: float = 0.7,
                    strength_range=(0.6, 1.2), self_weight: float = -1.0, bias_range=(-1.5, -0.5),
                    stickiness: float = 0.98, family: str = "poisson", link: str = "softplus",
                    basis=None, max_excitation: Optional[float] = None) -> SimulatedHMMGLM:
    """Synthetic benchmark after Li et al. (ICLR 2024): K states, N neurons, a sparse signed connectome.

    The connectome C (N, N) has off-diagonal entries +1 / -1 each with probability
    ``connection_prob / 2`` (0 otherwise) and C_nn = sign(self_weight). State k keeps each
    off-diagonal connection with probability ``state_keep_prob`` and draws its own strength
    uniformly in ``strength_range``: w^{(k)}_{n<-n'} = C_{nn'} m^{(k)}_{nn'} s^{(k)}_{nn'};
    self-history weights are ``self_weight`` in every state. With ``max_excitation`` set, a state
    whose total excitatory input to some neuron exceeds it has its excitatory weights scaled down
    to meet it (< 1 guarantees the network cannot run away; the defaults are stable without it). Biases ~ U(bias_range);
    transitions sticky (``stickiness`` on the diagonal); trials start in a uniform state.

    Returns:
        `SimulatedHMMGLM` (model, states (M, T), spikes (M, T, N), connectome (N, N)).
    """
    K = checks.positive_int(num_states, "num_states")
    N = checks.positive_int(num_neurons, "num_neurons")
    T = checks.positive_int(num_timesteps, "num_timesteps")
    M = checks.positive_int(num_trials, "num_trials")
    if not 0 <= connection_prob <= 1:
        raise ValueError(f"connection_prob: expected a probability, got {connection_prob!r}")
    if not 0 <= state_keep_prob <= 1:
        raise ValueError(f"state_keep_prob: expected a probability, got {state_keep_prob!r}")
    dtype = jnp.result_type(float)
    basis = exponential_basis() if basis is None else jnp.asarray(basis)
    basis = (basis[None] if basis.ndim == 1 else basis).astype(dtype)
    if basis.shape[1] >= T:
        raise ValueError(f"basis: the history basis has length {basis.shape[1]}, not shorter than the trial ({T})")
    model, C = _draw_benchmark(key, basis, K, N, float(connection_prob), float(state_keep_prob),
                               tuple(float(v) for v in strength_range), float(self_weight),
                               tuple(float(v) for v in bias_range), float(stickiness), family, link,
                               0.0 if max_excitation is None else float(max_excitation))
    states, spikes = sample_hmmglm(jax.random.fold_in(key, 1), model, T, M)
    return SimulatedHMMGLM(model, states, spikes, C)
