"""Nonlinear Gaussian state-space model: user functions with additive Gaussian noise.

    z_0 = N(m_1, P_1)
    z_t = f(z_{t-1}, t, u_t) + N(0, Q)          t = 1..T-1
    y_t = h(z_t, t, u_t) + N(0, R)              t = 0..T-1

``f`` and ``h`` are plain functions or equinox modules (whose arrays are then
learnable parameters); ``u_t`` is None when no inputs are given. The model is an
`ps.core.AbstractAdditiveGaussianSSM` (Jacobians by forward-mode autodiff), which is
what `ps.gaussian` and `ps.imap` read.
"""
from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from probssm.core import checks
from probssm.core.protocol import AbstractAdditiveGaussianSSM
from probssm.models.lgssm import PSD, REAL


class NonlinearGaussianSSM(AbstractAdditiveGaussianSSM):
    """Nonlinear dynamics and emissions with additive Gaussian noise.

    Args:
        initial_mean: (d,).
        initial_cov: (d, d).
        transition_fn: ``f(z_prev, t, inputs) -> (d,)``.
        transition_cov: (d, d).
        emission_fn: ``h(z, t, inputs) -> (p,)``.
        emission_cov: (p, p).

    Example:
        >>> model = ps.models.NonlinearGaussianSSM(
        ...     jnp.zeros(1), jnp.eye(1), lambda z, t, u: jnp.sin(z), 0.1 * jnp.eye(1),
        ...     lambda z, t, u: z ** 2 / 20, jnp.eye(1))
    """

    initial_mean: jax.Array = eqx.field(metadata=REAL)
    initial_cov: jax.Array = eqx.field(metadata=PSD)
    transition_fn: Callable
    transition_cov: jax.Array = eqx.field(metadata=PSD)
    emission_fn: Callable
    emission_cov: jax.Array = eqx.field(metadata=PSD)

    def __init__(self, initial_mean, initial_cov, transition_fn, transition_cov, emission_fn, emission_cov):
        m1 = checks.array(initial_mean, "initial_mean", (1,), "(d,)")
        d = m1.shape[0]
        P1 = checks.shape(jnp.asarray(initial_cov, m1.dtype if jnp.issubdtype(m1.dtype, jnp.floating) else float),
                          "initial_cov", (d, d))
        Q = checks.shape(jnp.asarray(transition_cov, P1.dtype), "transition_cov", (d, d))
        R = checks.array(emission_cov, "emission_cov", (2,), "(p, p)")
        checks.shape(R, "emission_cov", (R.shape[0], R.shape[0]), "(p, p)")
        if not callable(transition_fn):
            raise ValueError("transition_fn: expected a callable f(z_prev, t, inputs)")
        if not callable(emission_fn):
            raise ValueError("emission_fn: expected a callable h(z, t, inputs)")
        checks.finite(m1, "initial_mean")
        checks.psd(P1, "initial_cov")
        checks.psd(Q, "transition_cov", strict=False)
        checks.psd(R, "emission_cov", strict=False)
        # The functions must map shapes as declared: check once by abstract evaluation.
        z = jax.ShapeDtypeStruct((d,), P1.dtype)
        out_f = jax.eval_shape(lambda z: transition_fn(z, 1, None), z)
        if out_f.shape != (d,):
            raise ValueError(f"transition_fn: expected an output of shape ({d},), got {out_f.shape}")
        out_h = jax.eval_shape(lambda z: emission_fn(z, 0, None), z)
        if out_h.shape != (R.shape[0],):
            raise ValueError(
                f"emission_fn: expected an output of shape ({R.shape[0]},) to match emission_cov, got {out_h.shape}"
            )
        self.initial_mean = jnp.asarray(m1, P1.dtype)
        self.initial_cov = P1
        self.transition_fn = transition_fn
        self.transition_cov = Q
        self.emission_fn = emission_fn
        self.emission_cov = jnp.asarray(R, P1.dtype)

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.emission_cov.shape[0]

    # --- additive-Gaussian structure --------------------------------------------------
    def initial_moments(self, inputs=None):
        """(initial_mean (d,), initial_cov (d, d))."""
        return self.initial_mean, self.initial_cov

    def transition_mean(self, z_prev, t, inputs=None):
        """f(z_{t-1}, t, u_t), shape (d,)."""
        return self.transition_fn(z_prev, t, inputs)

    def transition_noise_cov(self, t, inputs=None):
        """Q, shape (d, d)."""
        return self.transition_cov

    def emission_mean(self, z, t, inputs=None):
        """h(z_t, t, u_t), shape (p,)."""
        return self.emission_fn(z, t, inputs)

    def emission_noise_cov(self, t, inputs=None):
        """R, shape (p, p)."""
        return self.emission_cov
