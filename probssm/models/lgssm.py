"""Linear-Gaussian state-space model (the Kalman family).

    z_0 = N(m_1, P_1)
    z_t = F_t z_{t-1} + b_t + B_t u_t + N(0, Q_t)        t = 1..T-1
    y_t = H_t z_t + d_t + D_t u_t + N(0, R_t)            t = 0..T-1

Any of F, Q, H, R, b, d may carry a leading time axis of length T (then entry
t = 0 of F, b, Q is unused). B and D act on the optional input rows u_t.

The model declares two exact structures: linear-Gaussian (`ps.kalman`, closed-form
EM via `LinearGaussianSSM.m_step`) and additive-Gaussian with closed-form
Jacobians (`ps.gaussian`, `ps.imap`; EKF and UKF are then exact).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.linalg import psd_solve, symmetrize
from probssm.core.params import get as pget, replace as preplace
from probssm.core.protocol import AbstractAdditiveGaussianSSM, AbstractLinearGaussianSSM, LinearGaussianParams
from probssm.inference.kalman import check_initial_cov

__all__ = ["LinearGaussianSSM", "LinearGaussianMoments"]

PSD = {"constraint": constraints.positive_definite}
REAL = {"constraint": constraints.real}


def _at(a, t, base_ndim):
    return a[t] if a.ndim > base_ndim else a


class LinearGaussianMoments(NamedTuple):
    """Posterior moments of a batch of B sequences of length T: what an EM M-step reads.

    Steps with weight 0 (padding beyond a sequence's length) are left out of every sum.
    Missing entries of y_t are latent too: their moments are conditional expectations.
    """

    z: jax.Array  # (B, T, d)        E[z_t]
    zz: jax.Array  # (B, T, d, d)    E[z_t z_t^T]
    z1z0: jax.Array  # (B, T-1, d, d) E[z_{t+1} z_t^T]
    y: jax.Array  # (B, T, p)        E[y_t]
    yz: jax.Array  # (B, T, p, d)    E[y_t z_t^T]
    yy: jax.Array  # (B, T, p, p)    E[y_t y_t^T]
    inputs: Optional[jax.Array]  # None or (B, T, U)
    weights: jax.Array  # (B, T)     1 for a real step, 0 for padding


def _design(mu, Ezz, u):
    """E[x] and E[x x^T] for x = [z; 1; u] (u may be None); leading axes (B, T)."""
    one = jnp.ones(mu.shape[:-1] + (1,), mu.dtype)
    ex = jnp.concatenate([mu, one] + ([u.astype(mu.dtype)] if u is not None else []), axis=-1)
    exx = jnp.einsum("...i,...j->...ij", ex, ex)  # exact except the z block
    d = mu.shape[-1]
    return ex, exx.at[..., :d, :d].set(Ezz)


def _regression(Sxx, Syx, Syy, n, blocks, coefs, free):
    """Solve y ~ W x with some column blocks of W held fixed; return (W blocks, noise covariance)."""
    free_idx = [i for i, f in enumerate(free) if f]
    fixed_idx = [i for i, f in enumerate(free) if not f]
    cols = lambda idx: jnp.concatenate([jnp.arange(*blocks[i]) for i in idx]) if idx else jnp.zeros(0, int)
    W = jnp.concatenate(coefs, axis=1)
    if free_idx:
        f_cols, c_cols = cols(free_idx), cols(fixed_idx)
        target = Syx[:, f_cols]
        if fixed_idx:
            target = target - W[:, c_cols] @ Sxx[jnp.ix_(c_cols, f_cols)]
        W_free = psd_solve(Sxx[jnp.ix_(f_cols, f_cols)], target.T).T
        W = W.at[:, f_cols].set(W_free)
    cov = (Syy - W @ Syx.T - Syx @ W.T + W @ Sxx @ W.T) / jnp.maximum(n, 1.0)
    return [W[:, a:b] for a, b in blocks], symmetrize(cov)


_TRANSITION_FIELDS = ("transition_matrix", "transition_offset", "transition_input_matrix")
_EMISSION_FIELDS = ("emission_matrix", "emission_offset", "emission_input_matrix")


class LinearGaussianSSM(AbstractLinearGaussianSSM, AbstractAdditiveGaussianSSM):
    """Linear-Gaussian SSM with fixed or time-varying matrices and control inputs.

    Args:
        initial_mean: (d,).
        initial_cov: (d, d), positive definite; ``inf`` on the diagonal (zeros in the rest of
            that row and column) makes a component diffuse: a flat prior, handled exactly by
            `ps.kalman` (Durbin & Koopman ch. 5). Such a model cannot be sampled from.
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
        check_initial_cov(P1)
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
        P1 = self.initial_cov
        if checks.is_concrete(P1) and bool(np.isinf(np.asarray(P1)).any()):
            raise ValueError("initial_cov: holds inf (a diffuse, flat prior); there is no initial distribution "
                             "to sample or evaluate, expected a finite initial_cov")
        P1 = eqx.error_if(P1, jnp.isinf(P1).any(), "initial_cov: holds inf (a diffuse, flat prior); there is "
                          "no initial distribution to sample or evaluate, expected a finite initial_cov")
        return dist.MultivariateNormal(self.initial_mean, covariance_matrix=P1)

    def transition(self, z_prev, t, inputs=None):
        b, _ = self._offsets(t, inputs)
        mean = _at(self.transition_matrix, t, 2) @ z_prev + b
        return dist.MultivariateNormal(mean, covariance_matrix=_at(self.transition_cov, t, 2))

    def emission(self, z, t, inputs=None):
        _, d = self._offsets(t, inputs)
        mean = _at(self.emission_matrix, t, 2) @ z + d
        return dist.MultivariateNormal(mean, covariance_matrix=_at(self.emission_cov, t, 2))

    # --- additive-Gaussian structure (closed-form Jacobians) ---------------------------
    def initial_moments(self, inputs=None):
        """(m_1 (d,), P_1 (d, d))."""
        return self.initial_mean, self.initial_cov

    def transition_mean(self, z_prev, t, inputs=None):
        """F_t z_{t-1} + b_t + B u_t, shape (d,)."""
        b, _ = self._offsets(t, inputs)
        return _at(self.transition_matrix, t, 2) @ z_prev + b

    def transition_noise_cov(self, t, inputs=None):
        """Q_t, shape (d, d)."""
        return _at(self.transition_cov, t, 2)

    def emission_mean(self, z, t, inputs=None):
        """H_t z_t + d_t + D u_t, shape (p,)."""
        _, d = self._offsets(t, inputs)
        return _at(self.emission_matrix, t, 2) @ z + d

    def emission_noise_cov(self, t, inputs=None):
        """R_t, shape (p, p)."""
        return _at(self.emission_cov, t, 2)

    def transition_jacobian(self, z_prev, t, inputs=None):
        """F_t, shape (d, d)."""
        return _at(self.transition_matrix, t, 2)

    def emission_jacobian(self, z, t, inputs=None):
        """H_t, shape (p, d)."""
        return _at(self.emission_matrix, t, 2)

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

    # --- closed-form EM M-step ----------------------------------------------------------
    def m_step(self, stats: LinearGaussianMoments, fixed: tuple = ()) -> "LinearGaussianSSM":
        """Closed-form M-step: each conditional is a linear regression with Gaussian noise,
        `z_t ~ [F b B] [z_{t-1}; 1; u_t]` and `y_t ~ [H d D] [z_t; 1; u_t]`; coefficients held fixed
        move to the target, the free ones solve the normal equations, and the noise covariance
        is the expected residual outer product. With no transitions observed (T = 1) the
        transition parameters are kept.

        Args:
            stats: `LinearGaussianMoments` of a batch (B, T).
            fixed: paths (field names) held at their current values.

        Raises:
            ValueError: a time-varying parameter (or another in its regression) is free.
        """
        is_fixed = lambda nm: any(nm == f or nm.startswith(f + ".") for f in fixed)
        groups = ((_TRANSITION_FIELDS, "transition_cov"), (_EMISSION_FIELDS, "emission_cov"))
        for name in ("initial_mean", "initial_cov") + _TRANSITION_FIELDS + ("transition_cov",) + _EMISSION_FIELDS + (
                "emission_cov",):
            a = pget(self, name)
            base = 1 if name.endswith("offset") or name == "initial_mean" else 2
            if a is not None and a.ndim > base:
                group = next((g + (c,) for g, c in groups if name in g + (c,)), (name,))
                free = [g for g in group if not is_fixed(g) and pget(self, g) is not None]
                if free:
                    raise ValueError(
                        f"fixed: {name} is time-varying; EM learns time-invariant parameters only, so fix it "
                        f"and the rest of its group {list(group)} (free now: {free})")
        w = stats.weights.astype(stats.z.dtype)
        d = self.state_dim
        new = {}
        n0 = jnp.sum(w[:, 0])
        z0, z0z0 = jnp.einsum("b,bi->i", w[:, 0], stats.z[:, 0]) / n0, \
            jnp.einsum("b,bij->ij", w[:, 0], stats.zz[:, 0]) / n0
        if not is_fixed("initial_mean"):
            new["initial_mean"] = z0
        m1 = new.get("initial_mean", self.initial_mean)
        if not is_fixed("initial_cov"):
            # E[(z_0 - m1)(z_0 - m1)^T] averaged over sequences (m1 may be held fixed).
            new["initial_cov"] = symmetrize(z0z0 - jnp.outer(z0, m1) - jnp.outer(m1, z0) + jnp.outer(m1, m1))

        u = stats.inputs
        # Transitions: x_t = [z_{t-1}; 1; u_t], target z_t, steps t = 1..T-1.
        w_dyn = w[:, 1:]
        ex, exx = _design(stats.z[:, :-1], stats.zz[:, :-1],
                          None if (u is None or self.transition_input_matrix is None) else u[:, 1:])
        zx = jnp.einsum("bti,btj->btij", stats.z[:, 1:], ex).at[..., :d].set(stats.z1z0)
        dyn = (jnp.einsum("bt,btij->ij", w_dyn, exx), jnp.einsum("bt,btij->ij", w_dyn, zx),
               jnp.einsum("bt,btij->ij", w_dyn, stats.zz[:, 1:]), jnp.sum(w_dyn))
        # Emissions: x_t = [z_t; 1; u_t], target y_t.
        ex, exx = _design(stats.z, stats.zz, None if (u is None or self.emission_input_matrix is None) else u)
        yx = jnp.einsum("bti,btj->btij", stats.y, ex).at[..., :d].set(stats.yz)
        obs = (jnp.einsum("bt,btij->ij", w, exx), jnp.einsum("bt,btij->ij", w, yx),
               jnp.einsum("bt,btij->ij", w, stats.yy), jnp.sum(w))

        for (names, cov_name), (xx, yx, yy, n) in zip(groups, (dyn, obs)):
            present = [nm for nm in names if pget(self, nm) is not None]
            if all(is_fixed(nm) for nm in present + [cov_name]):
                continue
            coefs = [pget(self, nm) if pget(self, nm).ndim == 2 else pget(self, nm)[:, None]
                     for nm in present]
            widths = [c.shape[1] for c in coefs]
            starts = [sum(widths[:i]) for i in range(len(widths))]
            blocks = [(s, s + wd) for s, wd in zip(starts, widths)]
            free = tuple(not is_fixed(nm) for nm in present)
            # Solve on a safe system when nothing was observed (T = 1), then keep the old values.
            seen = n > 0
            eye = jnp.eye(xx.shape[0], dtype=xx.dtype)
            W_blocks, cov = _regression(jnp.where(seen, xx, eye), yx, yy, n, blocks, coefs, free)
            for nm, W_b, f in zip(present, W_blocks, free):
                if f:
                    old = pget(self, nm)
                    new[nm] = jnp.where(seen, W_b[:, 0] if old.ndim == 1 else W_b, old)
            if not is_fixed(cov_name):
                new[cov_name] = jnp.where(seen, cov, pget(self, cov_name))
        names = tuple(new)
        return preplace(self, names, tuple(new[k] for k in names))
