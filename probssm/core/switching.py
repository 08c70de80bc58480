"""The switching exact structure: a discrete mode chain plus a linear-Gaussian system per mode.

A switching linear dynamical system over modes z_t in {0..K-1} and continuous states x_t::

    z_0 ~ Cat(pi);                 x_0 | z_0 = k ~ N(m_k, P_k)
    z_t | z_{t-1} = i ~ Cat(A_t[i])                                 t = 1..T-1
    x_t | x_{t-1}, z_t = k ~ N(F_k x_{t-1} + b_k(t), Q_k)           t = 1..T-1
    y_t | x_t, z_t = k ~ N(H_k x_t + d_k(t), R_k)                   t = 0..T-1

The mode z_t selects the dynamics that produce x_t (from x_{t-1}) and the emission of y_t.
A model declares it by subclassing `AbstractSwitchingSSM` and returning a `SwitchingParams`:
engines (`ps.switching`: path enumeration, IMM, GPB2, the Rao-Blackwellised particle filter,
and later structured VI / Laplace-EM) read only this, never the concrete class.

In a recurrent model (Linderman et al. 2017) the mode transition also depends on x_{t-1}:
p(z_t = j | z_{t-1} = i, x_{t-1}, u_t) = softmax_j(logits_i(x_{t-1}, u_t)); it declares
``is_recurrent = True`` and answers `log_mode_transitions`. Engines that need a Markov chain
on z (exact enumeration, the RBPF) refuse it; the Gaussian-mixture filters evaluate it at
each component's mean.
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from probssm.core import checks
from probssm.core.protocol import SSM, LinearGaussianParams

__all__ = ["SwitchingParams", "AbstractSwitchingSSM", "mode_system", "step_systems", "check_switching_params"]

# Dimensions of one mode's, one step's value of each LinearGaussianParams field; with the
# leading mode axis K a time-invariant field has one more, a time-varying one (K, T, ...) two more.
_BASE_NDIM = LinearGaussianParams(1, 2, 2, 1, 2, 2, 1, 2)


class SwitchingParams(NamedTuple):
    """Arrays of a switching linear-Gaussian system over T steps (K modes, d states, p outputs).

    initial_probs: (K,) p(z_0 = k).
    transition_matrices: (K, K) or (T, K, K); entry t maps z_{t-1} -> z_t (entry 0 unused);
        rows sum to one.
    systems: a `LinearGaussianParams` whose every field carries a leading mode axis K:
        initial_mean (K, d), initial_cov (K, d, d), transition_matrix (K, d, d) or (K, T, d, d),
        transition_offset (K, d) or (K, T, d), transition_cov (K, d, d) or (K, T, d, d),
        emission_matrix (K, p, d) or (K, T, p, d), emission_offset (K, p) or (K, T, p),
        emission_cov (K, p, p) or (K, T, p, p). Mode k's slice (`mode_system`) is an ordinary
        `LinearGaussianParams` that `ps.kalman`'s cores accept.
    """

    initial_probs: jax.Array
    transition_matrices: jax.Array
    systems: LinearGaussianParams


def _time_varying(a, i) -> bool:
    return jnp.ndim(a) > _BASE_NDIM[i] + 1


def mode_system(systems: LinearGaussianParams, k) -> LinearGaussianParams:
    """The linear-Gaussian system of mode ``k`` (an int, possibly traced): every field's mode axis
    indexed away, time axes kept. Traceable."""
    return LinearGaussianParams(*(a[k] for a in systems))


def step_systems(systems: LinearGaussianParams, t) -> LinearGaussianParams:
    """Every mode's system at step ``t`` (traced or not): time-varying fields (K, T, ...) are read
    at t, so each field is (K, ...) with no time axis. Traceable."""
    return LinearGaussianParams(*(a[:, t] if _time_varying(a, i) else a for i, a in enumerate(systems)))


def path_system(systems: LinearGaussianParams, path) -> LinearGaussianParams:
    """The time-varying linear-Gaussian system of one mode path (T,) ints: step t uses mode
    path[t], the initial moments mode path[0]. Traceable (not exported: an engine helper)."""
    T = path.shape[0]
    ts = jnp.arange(T)
    fields = []
    for i, a in enumerate(systems):
        if i < 2:
            fields.append(a[path[0]])
        elif _time_varying(a, i):
            fields.append(a[path, ts])
        else:
            fields.append(a[path])
    return LinearGaussianParams(*fields)


class AbstractSwitchingSSM(SSM):
    """A model with the switching structure: unlocks `ps.switching` (exact enumeration, IMM,
    GPB2, Rao-Blackwellised particle filter, most likely mode path).

    A subclass implements `num_modes`, `state_dim`, `emission_dim`, `switching_params` and
    `log_mode_transitions`, and declares ``is_recurrent`` when its mode transitions read
    x_{t-1}. It still implements the protocol (``initial`` / ``transition`` / ``emission``) on
    some joint state for `ps.sample` and the generic particle engines.
    """

    @property
    @abc.abstractmethod
    def num_modes(self) -> int: ...

    @property
    @abc.abstractmethod
    def state_dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...

    @abc.abstractmethod
    def switching_params(self, num_timesteps: int, inputs=None) -> SwitchingParams:
        """The `SwitchingParams` of a sequence of ``num_timesteps`` steps; ``inputs`` None or the
        (T, U) input rows (folded into the per-mode offsets). Traceable. For a recurrent model
        ``transition_matrices`` is its mode chain at x_{t-1} = 0, u_t = 0 (engines that honour
        the recurrence call `log_mode_transitions` instead)."""

    @abc.abstractmethod
    def log_mode_transitions(self, x_prev, t, inputs=None) -> jax.Array:
        """(K, K) log p(z_t = j | z_{t-1} = i, x_{t-1} = x_prev, u_t) (row i, column j) for one
        step; ``inputs`` is the input row u_t or None. Traceable. A Markov (non-recurrent) model
        returns the log of its transition matrix at step t, ignoring ``x_prev``."""

    @property
    def is_recurrent(self) -> bool:
        """Whether the mode transitions depend on x_{t-1} (then `log_mode_transitions` must be used)."""
        return False

    @property
    def emission_family(self) -> str:
        """``"gaussian"`` (y_t ~ N(H_k x_t + d_k, R_k)) or ``"poisson"`` (independent counts
        y_{t,i} ~ Poisson(exp(H_k x_t + d_k)_i); ``emission_cov`` is then unused). Engines built on
        Kalman updates (enumeration, IMM, GPB2, RBPF, structured VI) need Gaussian emissions; the
        Laplace engine (`ps.switching.laplace`) takes both."""
        return "gaussian"

    def switching_param_names(self) -> dict:
        """Names that errors use for the `SwitchingParams` fields (the model's own argument names):
        ``{"initial_probs": ..., "transition_matrices": ..., "initial_mean": ..., ...}``."""
        return {}


def check_switching_params(params: SwitchingParams, num_modes: int, state_dim: int, emission_dim: int,
                           names: Optional[dict] = None) -> SwitchingParams:
    """Shapes, finiteness, simplex rows and positive (semi-)definiteness of a `SwitchingParams`,
    on concrete arrays only (traced fields are checked for shape only). Each error names the
    model argument (``names`` maps field names to argument names; default: the field names).

    Raises:
        ValueError: naming the argument, with the expected shape or property.
    """
    names = dict(names or {})
    K, d, p = num_modes, state_dim, emission_dim
    nm = lambda f: names.get(f, f)
    pi = params.initial_probs
    checks.shape(pi, nm("initial_probs"), (K,), f"({K},)")
    checks.probabilities(pi, nm("initial_probs"))
    A = params.transition_matrices
    if not ((jnp.ndim(A) == 2 and jnp.shape(A) == (K, K)) or (jnp.ndim(A) == 3 and jnp.shape(A)[1:] == (K, K))):
        raise ValueError(f"{nm('transition_matrices')}: expected shape ({K}, {K}) or (T, {K}, {K}), "
                         f"got shape {tuple(jnp.shape(A))}")
    checks.probabilities(A, nm("transition_matrices"))
    want = {"initial_mean": (d,), "initial_cov": (d, d), "transition_matrix": (d, d), "transition_offset": (d,),
            "transition_cov": (d, d), "emission_matrix": (p, d), "emission_offset": (p,), "emission_cov": (p, p)}
    for i, (field, a) in enumerate(zip(LinearGaussianParams._fields, params.systems)):
        shape = tuple(jnp.shape(a))
        base = want[field]
        ok = shape == (K,) + base or (i >= 2 and len(shape) == len(base) + 2 and shape[0] == K and shape[2:] == base)
        if not ok:
            doc = f"({K}, {', '.join(map(str, base))})" + (f" or ({K}, T, {', '.join(map(str, base))})" if i >= 2 else "")
            raise ValueError(f"{nm(field)}: expected shape {doc} (a leading mode axis), got shape {shape}")
        if not checks.is_concrete(a):
            continue
        if field == "initial_cov":
            checks.psd(a, nm(field), strict=True)
        elif field.endswith("_cov"):
            checks.psd(a, nm(field), strict=False)
        else:
            checks.finite(a, nm(field))
    return params
