"""Switching linear dynamical systems: `SLDS` (Markov mode chain) and `RecurrentSLDS`
(mode transitions that read the continuous state; Linderman et al., AISTATS 2017).

    z_0 ~ Cat(pi);                       x_0 | z_0 = k ~ N(m_k, P_k)
    z_t | z_{t-1} = i ~ Cat(A[i])                                  (SLDS)
    z_t | z_{t-1} = i, x_{t-1} ~ Cat(softmax(W_i x_{t-1} + V_i u_t + r_i))   (RecurrentSLDS)
    x_t = A_k x_{t-1} + b_k + B_k u_t + N(0, Q_k),   k = z_t        t = 1..T-1
    y_t = C_k x_t + d_k + D_k u_t + N(0, R_k),       k = z_t        t = 0..T-1

Emissions (C, d, D, R) are per mode (a leading K axis) or shared by every mode (no K axis).
With ``emission_family="poisson"`` they are counts instead, y_{t,i} ~ Poisson(exp(C_k x_t + d_k)_i)
(Zoltowski et al. 2020's spike-count model), handled by the Laplace engine and Laplace-EM.
Both models declare the switching structure (`ps.core.AbstractSwitchingSSM`), which the
engines of `ps.switching` read.

Protocol representation (``initial`` / ``transition`` / ``emission``, for `ps.sample` and the
generic particle engines `ps.smc`): the joint state is one flat float vector
s_t = [z_t, x_t] of length 1 + d whose first entry is the mode (a float holding an integer
0..K-1) and whose rest is x_t. ``initial`` and ``transition`` return a `ModeGaussian`, the law of
such a vector (a categorical mode, then a Gaussian given it), ``emission`` a MultivariateNormal.
"""
from __future__ import annotations

import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import LinearGaussianParams
from probssm.core.switching import AbstractSwitchingSSM, SwitchingParams, check_switching_params

__all__ = ["SLDS", "RecurrentSLDS", "ModeGaussian"]

PSD = {"constraint": constraints.positive_definite}
REAL = {"constraint": constraints.real}
SIMPLEX = {"constraint": constraints.simplex}

_LOG_2PI = math.log(2 * math.pi)


class ModeGaussian(dist.Distribution):
    """Law of the joint state s = [z, x] (length 1 + d): z ~ Cat(softmax(logits)), then
    x | z ~ N(means[z], scale_trils[z] scale_trils[z]^T).

    Args:
        logits: (K,) unnormalised log mode probabilities (-inf: impossible).
        means: (K, d).
        scale_trils: (K, d, d) lower Cholesky factors of the per-mode covariances.

    ``log_prob`` is the density with respect to counting measure on z times Lebesgue measure
    on x; ``sample`` returns float vectors whose first entry is the mode.
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, logits, means, scale_trils, *, validate_args=None):
        self.logits = logits - jax.scipy.special.logsumexp(logits)
        self.means = means
        self.scale_trils = scale_trils
        super().__init__(batch_shape=(), event_shape=(1 + means.shape[-1],), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        k_z, k_x = jax.random.split(key)
        z = jax.random.categorical(k_z, self.logits, shape=sample_shape)
        eps = jax.random.normal(k_x, tuple(sample_shape) + self.means.shape[-1:], self.means.dtype)
        x = self.means[z] + jnp.einsum("...ij,...j->...i", self.scale_trils[z], eps)
        return jnp.concatenate([z[..., None].astype(x.dtype), x], axis=-1)

    def log_prob(self, value):
        K = self.logits.shape[0]
        z = jnp.clip(jnp.round(value[..., 0]).astype(jnp.int32), 0, K - 1)
        x = value[..., 1:]
        L = self.scale_trils[z]
        r = solve_triangular(L, (x - self.means[z])[..., None], lower=True)[..., 0]
        logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
        d = x.shape[-1]
        return self.logits[z] - 0.5 * jnp.sum(r * r, -1) - logdet - 0.5 * d * _LOG_2PI

    @property
    def mean(self):
        w = jnp.exp(self.logits)
        return jnp.concatenate([jnp.sum(w * jnp.arange(w.shape[0]))[None], w @ self.means])


def _float(a, dtype=None):
    a = jnp.asarray(a)
    if dtype is not None:
        return a.astype(jnp.result_type(a.dtype, dtype))
    return a.astype(jnp.result_type(a.dtype, float)) if not jnp.issubdtype(a.dtype, jnp.floating) else a


def _per_mode(a, name, K, base, doc, shared_ok):
    """Check (K,) + base (or base when shared_ok); return the array."""
    shape = tuple(a.shape)
    if shape == (K,) + base or (shared_ok and shape == base):
        return a
    want = f"({', '.join(map(str, (K,) + base))})" + (f" or {doc} shared by every mode" if shared_ok else "")
    raise ValueError(f"{name}: expected shape {want}, got shape {shape}")


def _broadcast_modes(a, K, base_ndim):
    return a if a.ndim > base_ndim else jnp.broadcast_to(a, (K,) + a.shape)


class _SLDSBase(AbstractSwitchingSSM):
    """Fields and methods shared by `SLDS` and `RecurrentSLDS` (the mode chain differs)."""

    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    initial_means: jax.Array = eqx.field(metadata=REAL)
    initial_covs: jax.Array = eqx.field(metadata=PSD)
    dynamics_matrices: jax.Array = eqx.field(metadata=REAL)
    dynamics_covs: jax.Array = eqx.field(metadata=PSD)
    dynamics_offsets: jax.Array = eqx.field(metadata=REAL)
    dynamics_input_matrices: Optional[jax.Array] = eqx.field(metadata=REAL)
    emission_matrices: jax.Array = eqx.field(metadata=REAL)
    emission_covs: jax.Array = eqx.field(metadata=PSD)
    emission_offsets: jax.Array = eqx.field(metadata=REAL)
    emission_input_matrices: Optional[jax.Array] = eqx.field(metadata=REAL)
    poisson_emissions: bool = eqx.field(static=True)

    def _init_common(self, initial_probs, initial_means, initial_covs, dynamics_matrices, dynamics_covs,
                     emission_matrices, emission_covs, dynamics_offsets, emission_offsets, dynamics_input_matrices,
                     emission_input_matrices, emission_family="gaussian"):
        if emission_family not in ("gaussian", "poisson"):
            raise ValueError(f"emission_family: expected 'gaussian' or 'poisson', got {emission_family!r}")
        self.poisson_emissions = emission_family == "poisson"
        pi = _float(checks.array(initial_probs, "initial_probs", (1,), "(K,)"))
        K = pi.shape[0]
        F = _float(checks.array(dynamics_matrices, "dynamics_matrices", (3,), "(K, d, d)"), pi.dtype)
        d = F.shape[-1]
        dtype = F.dtype
        _per_mode(F, "dynamics_matrices", K, (d, d), "", False)
        Q = _per_mode(_float(jnp.asarray(dynamics_covs), dtype), "dynamics_covs", K, (d, d), "", False)
        m1 = _per_mode(_float(jnp.asarray(initial_means), dtype), "initial_means", K, (d,), f"({d},)", True)
        P1 = _per_mode(_float(jnp.asarray(initial_covs), dtype), "initial_covs", K, (d, d), f"({d}, {d})", True)
        H = _float(jnp.asarray(emission_matrices), dtype)
        if H.ndim not in (2, 3) or H.shape[-1] != d:
            raise ValueError(f"emission_matrices: expected shape ({K}, p, {d}) or (p, {d}) shared by every mode, "
                             f"got shape {tuple(H.shape)}")
        p = H.shape[-2]
        _per_mode(H, "emission_matrices", K, (p, d), f"(p, {d})", True)
        if emission_covs is None and self.poisson_emissions:
            emission_covs = jnp.eye(p, dtype=dtype)  # unused by Poisson emissions; kept for the structure
        R = _per_mode(_float(jnp.asarray(emission_covs), dtype), "emission_covs", K, (p, p), f"({p}, {p})", True)
        b = jnp.zeros((K, d), dtype) if dynamics_offsets is None else _float(jnp.asarray(dynamics_offsets), dtype)
        _per_mode(b, "dynamics_offsets", K, (d,), "", False)
        dd = jnp.zeros((p,), dtype) if emission_offsets is None else _float(jnp.asarray(emission_offsets), dtype)
        _per_mode(dd, "emission_offsets", K, (p,), f"({p},)", True)
        B = None if dynamics_input_matrices is None else _float(jnp.asarray(dynamics_input_matrices), dtype)
        if B is not None and (B.ndim != 3 or B.shape[:2] != (K, d)):
            raise ValueError(f"dynamics_input_matrices: expected shape ({K}, {d}, U), got shape {tuple(B.shape)}")
        D = None if emission_input_matrices is None else _float(jnp.asarray(emission_input_matrices), dtype)
        if D is not None and not ((D.ndim == 3 and D.shape[:2] == (K, p)) or (D.ndim == 2 and D.shape[0] == p)):
            raise ValueError(f"emission_input_matrices: expected shape ({K}, {p}, U) or ({p}, U) shared, "
                             f"got shape {tuple(D.shape)}")
        if B is not None and D is not None and B.shape[-1] != D.shape[-1]:
            raise ValueError(f"emission_input_matrices: expected U = {B.shape[-1]} columns like "
                             f"dynamics_input_matrices, got shape {tuple(D.shape)}")
        self.initial_probs = pi.astype(dtype)
        self.initial_means, self.initial_covs = _broadcast_modes(m1, K, 1), _broadcast_modes(P1, K, 2)
        self.dynamics_matrices, self.dynamics_covs, self.dynamics_offsets = F, Q, b
        self.dynamics_input_matrices = B
        self.emission_matrices, self.emission_covs, self.emission_offsets = H, R, dd
        self.emission_input_matrices = D

    # --- sizes ------------------------------------------------------------------------
    @property
    def num_modes(self) -> int:
        return self.initial_probs.shape[0]

    @property
    def state_dim(self) -> int:
        return self.dynamics_matrices.shape[-1]

    @property
    def emission_dim(self) -> int:
        return self.emission_matrices.shape[-2]

    @property
    def input_dim(self) -> int:
        for m in (self.dynamics_input_matrices, self.emission_input_matrices):
            if m is not None:
                return m.shape[-1]
        return 0

    @property
    def emission_family(self) -> str:
        return "poisson" if self.poisson_emissions else "gaussian"

    @property
    def shared_emissions(self) -> bool:
        """Whether the emission matrix is shared by every mode (no leading K axis)."""
        return self.emission_matrices.ndim == 2

    # --- checks -------------------------------------------------------------------------
    def switching_param_names(self) -> dict:
        return {"initial_probs": "initial_probs", "transition_matrices": "transition_matrix",
                "initial_mean": "initial_means", "initial_cov": "initial_covs",
                "transition_matrix": "dynamics_matrices", "transition_offset": "dynamics_offsets",
                "transition_cov": "dynamics_covs", "emission_matrix": "emission_matrices",
                "emission_offset": "emission_offsets", "emission_cov": "emission_covs"}

    def _check_values(self):
        """Value checks of the concrete parameters (shapes were checked at construction; a model
        changed by ``eqx.tree_at`` is re-checked here too)."""
        T = 1
        U = self.input_dim
        u = jnp.zeros((T, U), self.dynamics_matrices.dtype) if U else None
        check_switching_params(self.switching_params(T, u), self.num_modes, self.state_dim, self.emission_dim,
                               self.switching_param_names())

    def check_parameters(self, name: str = "model") -> None:
        super().check_parameters(name)
        self._check_values()

    # --- the switching structure --------------------------------------------------------
    def _emission_stack(self):
        K = self.num_modes
        return (_broadcast_modes(self.emission_matrices, K, 2), _broadcast_modes(self.emission_offsets, K, 1),
                _broadcast_modes(self.emission_covs, K, 2))

    def _systems(self, num_timesteps: int, inputs=None) -> LinearGaussianParams:
        K = self.num_modes
        H, dd, R = self._emission_stack()
        b = self.dynamics_offsets
        if inputs is not None:
            u = jnp.asarray(inputs).astype(b.dtype)
            if self.dynamics_input_matrices is not None:
                b = b[:, None, :] + jnp.einsum("kdu,tu->ktd", self.dynamics_input_matrices, u)
            if self.emission_input_matrices is not None:
                D = _broadcast_modes(self.emission_input_matrices, K, 2)
                dd = dd[:, None, :] + jnp.einsum("kpu,tu->ktp", D, u)
        return LinearGaussianParams(self.initial_means, self.initial_covs, self.dynamics_matrices, b,
                                    self.dynamics_covs, H, dd, R)

    # --- the protocol (joint state s = [z, x]) ------------------------------------------------
    def _offsets_at(self, inputs):
        """Per-mode (K, d) dynamics and (K, p) emission offsets of one step's input row."""
        K = self.num_modes
        b = self.dynamics_offsets
        dd = _broadcast_modes(self.emission_offsets, K, 1)
        if inputs is not None:
            u = jnp.asarray(inputs).astype(b.dtype)
            if self.dynamics_input_matrices is not None:
                b = b + self.dynamics_input_matrices @ u
            if self.emission_input_matrices is not None:
                dd = dd + _broadcast_modes(self.emission_input_matrices, K, 2) @ u
        return b, dd

    def initial(self, inputs=None):
        return ModeGaussian(jnp.log(self.initial_probs), self.initial_means, jnp.linalg.cholesky(self.initial_covs))

    def transition(self, z_prev, t, inputs=None):
        K = self.num_modes
        i = jnp.clip(jnp.round(z_prev[0]).astype(jnp.int32), 0, K - 1)
        x_prev = z_prev[1:]
        logits = self.log_mode_transitions(x_prev, t, inputs)[i]
        b, _ = self._offsets_at(inputs)
        means = jnp.einsum("kij,j->ki", self.dynamics_matrices, x_prev) + b
        return ModeGaussian(logits, means, jnp.linalg.cholesky(self.dynamics_covs))

    def emission(self, z, t, inputs=None):
        K = self.num_modes
        k = jnp.clip(jnp.round(z[0]).astype(jnp.int32), 0, K - 1)
        H, _, R = self._emission_stack()
        _, dd = self._offsets_at(inputs)
        if self.poisson_emissions:
            return dist.Poisson(jnp.exp(H[k] @ z[1:] + dd[k])).to_event(1)
        return dist.MultivariateNormal(H[k] @ z[1:] + dd[k], covariance_matrix=R[k])


class SLDS(_SLDSBase):
    """Switching linear dynamical system with a Markov mode chain (K modes, d states, p outputs).

    Args:
        initial_probs: (K,) p(z_0), sums to one.
        transition_matrix: (K, K) rows sum to one, ``A[i, j] = p(z_t = j | z_{t-1} = i)``.
        initial_means: (K, d) per mode, or (d,) shared.
        initial_covs: (K, d, d) or (d, d), positive definite.
        dynamics_matrices: (K, d, d) A_k.
        dynamics_covs: (K, d, d) Q_k, positive semi-definite.
        emission_matrices: (K, p, d) C_k per mode, or (p, d) shared by every mode.
        emission_covs: (K, p, p) or (p, p) R_k, positive semi-definite; None with Poisson emissions.
        dynamics_offsets: (K, d) b_k; zeros when None.
        emission_offsets: (K, p) or (p,) d_k; zeros when None.
        dynamics_input_matrices: (K, d, U) B_k; inputs u_t enter as B_k u_t.
        emission_input_matrices: (K, p, U) or (p, U) D_k.
        emission_family: ``"gaussian"`` or ``"poisson"``: independent counts
            y_{t,i} ~ Poisson(exp(C_k x_t + d_k)_i) (log link; ``emission_covs`` unused), for
            spike counts. Poisson models run on `ps.switching.laplace` and learn by Laplace-EM.

    Raises:
        ValueError: naming the argument, for wrong shapes, rows of ``transition_matrix`` or
            ``initial_probs`` that are not probability vectors, non-PSD covariances, non-finite values.

    Example:
        >>> slds = ps.models.SLDS(jnp.ones(2) / 2, jnp.array([[.95, .05], [.1, .9]]),
        ...                       jnp.zeros((2, 1)), jnp.ones((2, 1, 1)), jnp.array([[[.99]], [[.5]]]),
        ...                       0.1 * jnp.ones((2, 1, 1)), jnp.ones((1, 1)), 0.2 * jnp.ones((1, 1)))
        >>> s, y = ps.sample(key, slds, 50)          # s[:, 0] modes, s[:, 1:] states
        >>> ps.switching.imm(slds, y).filtered_mode_probs.shape
        (50, 2)
    """

    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)

    def __init__(self, initial_probs, transition_matrix, initial_means, initial_covs, dynamics_matrices,
                 dynamics_covs, emission_matrices, emission_covs, dynamics_offsets=None, emission_offsets=None,
                 dynamics_input_matrices=None, emission_input_matrices=None, *, emission_family="gaussian"):
        self._init_common(initial_probs, initial_means, initial_covs, dynamics_matrices, dynamics_covs,
                          emission_matrices, emission_covs, dynamics_offsets, emission_offsets,
                          dynamics_input_matrices, emission_input_matrices, emission_family)
        K = self.num_modes
        A = _float(jnp.asarray(transition_matrix), self.dynamics_matrices.dtype)
        checks.shape(A, "transition_matrix", (K, K), f"({K}, {K})")
        self.transition_matrix = A
        self._check_values()

    def switching_params(self, num_timesteps: int, inputs=None) -> SwitchingParams:
        return SwitchingParams(self.initial_probs, self.transition_matrix, self._systems(num_timesteps, inputs))

    def log_mode_transitions(self, x_prev, t, inputs=None):
        return jnp.log(self.transition_matrix)


class RecurrentSLDS(_SLDSBase):
    """Recurrent SLDS (Linderman et al., AISTATS 2017): the next mode's logits read x_{t-1}.

        p(z_t = j | z_{t-1} = i, x_{t-1}, u_t) = softmax_j(W[i] x_{t-1} + V[i] u_t + r[i])

    Args:
        initial_probs, initial_means, ..., emission_input_matrices, emission_family: as `SLDS`.
        recurrence_weights: W, (K, K, d) per previous mode (``W[i, j]`` the weights of next mode
            j after mode i), or (K, d) shared by every previous mode ("recurrence-only").
        recurrence_biases: r, (K, K) per previous mode or (K,) shared; zeros when None.
        recurrence_input_weights: V, (K, K, U) or (K, U); None: the inputs do not enter.

    Raises:
        ValueError: naming the argument, for recurrence weights or biases of the wrong shape and
            the checks of `SLDS`.

    ``switching_params`` reports the chain at x_{t-1} = 0, u_t = 0 (softmax of r); engines that
    need a Markov mode chain (path enumeration, the RBPF) refuse this model, IMM and GPB2
    evaluate the recurrence at each mixture component's mean.
    """

    recurrence_weights: jax.Array = eqx.field(metadata=REAL)
    recurrence_biases: jax.Array = eqx.field(metadata=REAL)
    recurrence_input_weights: Optional[jax.Array] = eqx.field(metadata=REAL)

    def __init__(self, initial_probs, recurrence_weights, initial_means, initial_covs, dynamics_matrices,
                 dynamics_covs, emission_matrices, emission_covs, recurrence_biases=None, dynamics_offsets=None,
                 emission_offsets=None, dynamics_input_matrices=None, emission_input_matrices=None,
                 recurrence_input_weights=None, *, emission_family="gaussian"):
        self._init_common(initial_probs, initial_means, initial_covs, dynamics_matrices, dynamics_covs,
                          emission_matrices, emission_covs, dynamics_offsets, emission_offsets,
                          dynamics_input_matrices, emission_input_matrices, emission_family)
        dtype = self.dynamics_matrices.dtype
        K = self.num_modes
        W = _float(jnp.asarray(recurrence_weights), dtype)
        r = jnp.zeros((K,), dtype) if recurrence_biases is None else _float(jnp.asarray(recurrence_biases), dtype)
        V = None if recurrence_input_weights is None else _float(jnp.asarray(recurrence_input_weights), dtype)
        self.recurrence_weights, self.recurrence_biases, self.recurrence_input_weights = W, r, V
        self._check_recurrence()
        self._check_values()

    def _check_recurrence(self):
        K, d = self.num_modes, self.state_dim
        W, r, V = self.recurrence_weights, self.recurrence_biases, self.recurrence_input_weights
        if tuple(W.shape) not in ((K, K, d), (K, d)):
            raise ValueError(f"recurrence_weights: expected shape ({K}, {K}, {d}) (per previous mode) or ({K}, {d}) "
                             f"(shared), got shape {tuple(W.shape)}")
        if tuple(r.shape) not in ((K, K), (K,)):
            raise ValueError(f"recurrence_biases: expected shape ({K}, {K}) or ({K},), got shape {tuple(r.shape)}")
        if V is not None:
            U = self.input_dim
            ok = V.ndim in (2, 3) and V.shape[:-1] in ((K, K), (K,)) and (U == 0 or V.shape[-1] == U)
            if not ok:
                want = "U" if U == 0 else str(U)
                raise ValueError(f"recurrence_input_weights: expected shape ({K}, {K}, {want}) or ({K}, {want}), "
                                 f"got shape {tuple(V.shape)}")
        for name, a in (("recurrence_weights", W), ("recurrence_biases", r), ("recurrence_input_weights", V)):
            if a is not None:
                checks.finite(a, name)

    def check_parameters(self, name: str = "model") -> None:
        self._check_recurrence()
        super().check_parameters(name)

    @property
    def input_dim(self) -> int:
        U = super().input_dim
        if U == 0 and self.recurrence_input_weights is not None:
            return self.recurrence_input_weights.shape[-1]
        return U

    @property
    def is_recurrent(self) -> bool:
        return True

    def _logits(self, x_prev, inputs):
        K = self.num_modes
        W = self.recurrence_weights
        W = W if W.ndim == 3 else jnp.broadcast_to(W, (K,) + W.shape)
        r = self.recurrence_biases
        r = r if r.ndim == 2 else jnp.broadcast_to(r, (K, K))
        logits = jnp.einsum("ijd,d->ij", W, x_prev) + r
        V = self.recurrence_input_weights
        if V is not None and inputs is not None:
            V = V if V.ndim == 3 else jnp.broadcast_to(V, (K,) + V.shape)
            logits = logits + jnp.einsum("iju,u->ij", V, jnp.asarray(inputs).astype(logits.dtype))
        return logits

    def log_mode_transitions(self, x_prev, t, inputs=None):
        return jax.nn.log_softmax(self._logits(x_prev, inputs), axis=-1)

    def switching_params(self, num_timesteps: int, inputs=None) -> SwitchingParams:
        A = jnp.exp(self.log_mode_transitions(jnp.zeros((self.state_dim,), self.recurrence_weights.dtype), 0, None))
        return SwitchingParams(self.initial_probs, A, self._systems(num_timesteps, inputs))

    def switching_param_names(self) -> dict:
        names = super().switching_param_names()
        names["transition_matrices"] = "recurrence_biases"
        return names
