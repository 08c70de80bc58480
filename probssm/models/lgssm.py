"""Linear-Gaussian state-space model (the Kalman family).

    z_0 = N(m_1, P_1)
    z_t = F_t z_{t-1} + b_t + B_t u_t + N(0, Q_t)        t = 1..T-1
    y_t = H_t z_t + d_t + D_t u_t + N(0, R_t)            t = 0..T-1

Any of F, Q, H, R, b, d may carry a leading time axis of length T (then entry
t = 0 of F, b, Q is unused). B and D act on the optional input rows u_t.
"""
from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import AbstractLinearGaussianSSM, LinearGaussianParams

PSD = {"constraint": constraints.positive_definite}
REAL = {"constraint": constraints.real}


def _at(a, t, base_ndim):
    return a[t] if a.ndim > base_ndim else a


class LinearGaussianSSM(AbstractLinearGaussianSSM):
    """Linear-Gaussian SSM with fixed or time-varying matrices and control inputs.

    Args:
        initial_mean: (d,).
        initial_cov: (d, d), positive definite.
        transition_matrix: (d, d) or (T, d, d).
        transition_cov: (d, d) or (T, d, d).
        emission_matrix: (p, d) or (T, p, d).
        emission_cov: (p, p) or (T, p, p).
        transition_offset: (d,) or (T, d); zeros when None.
        emission_offset: (p,) or (T, p); zeros when None.
        transition_input_matrix: B, (d, U); inputs enter as B u_t.
        emission_input_matrix: D, (p, U); inputs enter as D u_t.

    Example:
        >>> import jax.numpy as jnp, probssm as ps
        >>> m = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.eye(1),
        ...                                 0.1 * jnp.eye(1), jnp.eye(1), jnp.eye(1))
    """

    initial_mean: jax.Array = eqx.field(metadata=REAL)
    initial_cov: jax.Array = eqx.field(metadata=PSD)
    transition_matrix: jax.Array = eqx.field(metadata=REAL)
    transition_cov: jax.Array = eqx.field(metadata=PSD)
    emission_matrix: jax.Array = eqx.field(metadata=REAL)
    emission_cov: jax.Array = eqx.field(metadata=PSD)
    transition_offset: jax.Array = eqx.field(metadata=REAL)
    emission_offset: jax.Array = eqx.field(metadata=REAL)
    transition_input_matrix: Optional[jax.Array] = eqx.field(metadata=REAL)
    emission_input_matrix: Optional[jax.Array] = eqx.field(metadata=REAL)

    def __init__(
        self,
        initial_mean,
        initial_cov,
        transition_matrix,
        transition_cov,
        emission_matrix,
        emission_cov,
        transition_offset=None,
        emission_offset=None,
        transition_input_matrix=None,
        emission_input_matrix=None,
    ):
        m1 = checks.array(initial_mean, "initial_mean", (1,), "(d,)")
        d = m1.shape[0]
        dtype = jnp.result_type(m1.dtype, float)
        conv = lambda a: jnp.asarray(a, dtype=jnp.result_type(jnp.asarray(a).dtype, dtype))
        P1 = checks.shape(conv(initial_cov), "initial_cov", (d, d))
        F = conv(transition_matrix)
        checks.shape(F, "transition_matrix", (None, d, d) if F.ndim == 3 else (d, d), f"({d}, {d}) or (T, {d}, {d})")
        Q = conv(transition_cov)
        checks.shape(Q, "transition_cov", (None, d, d) if Q.ndim == 3 else (d, d), f"({d}, {d}) or (T, {d}, {d})")
        H = conv(emission_matrix)
        if H.ndim not in (2, 3) or H.shape[-1] != d:
            raise ValueError(f"emission_matrix: expected shape (p, {d}) or (T, p, {d}), got shape {tuple(H.shape)}")
        p = H.shape[-2]
        R = conv(emission_cov)
        checks.shape(R, "emission_cov", (None, p, p) if R.ndim == 3 else (p, p), f"({p}, {p}) or (T, {p}, {p})")
        b = jnp.zeros(d, dtype) if transition_offset is None else conv(transition_offset)
        if b.ndim not in (1, 2) or b.shape[-1] != d:
            raise ValueError(f"transition_offset: expected shape ({d},) or (T, {d}), got shape {tuple(b.shape)}")
        dd = jnp.zeros(p, dtype) if emission_offset is None else conv(emission_offset)
        if dd.ndim not in (1, 2) or dd.shape[-1] != p:
            raise ValueError(f"emission_offset: expected shape ({p},) or (T, {p}), got shape {tuple(dd.shape)}")
        B = None if transition_input_matrix is None else conv(transition_input_matrix)
        D = None if emission_input_matrix is None else conv(emission_input_matrix)
        if B is not None and (B.ndim != 2 or B.shape[0] != d):
            raise ValueError(f"transition_input_matrix: expected shape ({d}, U), got shape {tuple(B.shape)}")
        if D is not None and (D.ndim != 2 or D.shape[0] != p):
            raise ValueError(f"emission_input_matrix: expected shape ({p}, U), got shape {tuple(D.shape)}")
        if B is not None and D is not None and B.shape[1] != D.shape[1]:
            raise ValueError(
                f"emission_input_matrix: expected shape ({p}, {B.shape[1]}) to match transition_input_matrix, "
                f"got shape {tuple(D.shape)}"
            )
        lengths = {a.shape[0] for a, nd in ((F, 3), (Q, 3), (H, 3), (R, 3), (b, 2), (dd, 2)) if a.ndim == nd}
        if len(lengths) > 1:
            raise ValueError(f"time-varying parameters: expected one common leading length T, got {sorted(lengths)}")
        for name, a in (("initial_mean", m1), ("transition_matrix", F), ("emission_matrix", H),
                        ("transition_offset", b), ("emission_offset", dd)):
            checks.finite(a, name)
        checks.psd(P1, "initial_cov")
        checks.psd(Q, "transition_cov", strict=False)
        checks.psd(R, "emission_cov", strict=False)
        self.initial_mean, self.initial_cov = conv(m1), P1
        self.transition_matrix, self.transition_cov = F, Q
        self.emission_matrix, self.emission_cov = H, R
        self.transition_offset, self.emission_offset = b, dd
        self.transition_input_matrix, self.emission_input_matrix = B, D

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.emission_matrix.shape[-2]

    @property
    def input_dim(self) -> int:
        for m in (self.transition_input_matrix, self.emission_input_matrix):
            if m is not None:
                return m.shape[1]
        return 0

    @property
    def num_timesteps(self) -> Optional[int]:
        """Length T of the time-varying parameters, or None if all are fixed."""
        for a, nd in ((self.transition_matrix, 3), (self.transition_cov, 3), (self.emission_matrix, 3),
                      (self.emission_cov, 3), (self.transition_offset, 2), (self.emission_offset, 2)):
            if a.ndim == nd:
                return a.shape[0]
        return None

    # --- the protocol -------------------------------------------------------------
    def _offsets(self, t, inputs):
        b = _at(self.transition_offset, t, 1)
        d = _at(self.emission_offset, t, 1)
        if inputs is not None:
            if self.transition_input_matrix is not None:
                b = b + self.transition_input_matrix @ inputs
            if self.emission_input_matrix is not None:
                d = d + self.emission_input_matrix @ inputs
        return b, d

    def initial(self, inputs=None):
        return dist.MultivariateNormal(self.initial_mean, covariance_matrix=self.initial_cov)

    def transition(self, z_prev, t, inputs=None):
        b, _ = self._offsets(t, inputs)
        mean = _at(self.transition_matrix, t, 2) @ z_prev + b
        return dist.MultivariateNormal(mean, covariance_matrix=_at(self.transition_cov, t, 2))

    def emission(self, z, t, inputs=None):
        _, d = self._offsets(t, inputs)
        mean = _at(self.emission_matrix, t, 2) @ z + d
        return dist.MultivariateNormal(mean, covariance_matrix=_at(self.emission_cov, t, 2))

    # --- exact structure -------------------------------------------------------------
    def linear_gaussian_params(self, num_timesteps: int, inputs=None) -> LinearGaussianParams:
        b, d = self.transition_offset, self.emission_offset
        if inputs is not None:
            if self.transition_input_matrix is not None:
                b = b + inputs @ self.transition_input_matrix.T
            if self.emission_input_matrix is not None:
                d = d + inputs @ self.emission_input_matrix.T
        return LinearGaussianParams(
            self.initial_mean, self.initial_cov,
            self.transition_matrix, b, self.transition_cov,
            self.emission_matrix, d, self.emission_cov,
        )
