"""Markov jump processes (continuous-time Markov chains) and continuous-time hidden Markov models.

    z(0) ~ Categorical(initial_probs)
    P(z(t + dt) = j | z(t) = i) = expm(Q dt)[i, j],   Q[i, j] = f_ij >= 0 (i != j), rows sum to 0

A `MarkovJumpProcess` is observed exactly (its observations are the states); a
`ContinuousTimeHMM` sees the process through an emission family at the observation times
(a misclassification matrix ``e[k, c] = p(label c | state k)`` or any `ps.emissions` family).

The learnable rates are the free off-diagonal entries only (the ``structure``), stored as a
vector with a non-negative constraint (learners work on log-rates): structural zeros stay zero
under every learner, and a state with no free rate out of it is absorbing.
"""
from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.continuous_time import AbstractContinuousTimeSSM
from probssm.models.emissions import AbstractEmissions, Categorical
from probssm.models.emissions.base import check_support

__all__ = ["MarkovJumpProcess", "ContinuousTimeHMM"]


def _float(a, name):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {a.dtype}")
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


def check_generator(Q, name: str = "generator") -> None:
    """ValueError naming ``name`` unless the concrete (K, K) ``Q`` has finite, non-negative
    off-diagonal rates and rows summing to zero."""
    if not checks.is_concrete(Q):
        return
    q = np.asarray(Q, np.float64)
    checks.finite(q, name)
    K = q.shape[0]
    off = q[~np.eye(K, dtype=bool)]
    if np.any(off < 0):
        i, j = np.argwhere((q < 0) & ~np.eye(K, dtype=bool))[0]
        raise ValueError(f"{name}: expected off-diagonal rates >= 0, found {name}[{i}, {j}] = {q[i, j]:.6g}")
    sums = q.sum(-1)
    scale = np.maximum(np.abs(q).max(-1), 1.0)
    if np.any(np.abs(sums) > 1e-8 * scale):
        i = int(np.argmax(np.abs(sums) / scale))
        raise ValueError(f"{name}: expected rows summing to zero (Q[i, i] = -sum of the rates out of i), "
                         f"row {i} sums to {sums[i]:.6g}")


class MarkovJumpProcess(AbstractContinuousTimeSSM):
    """A Markov jump process on K states, observed exactly (the observation is the state).

    Args:
        generator: (K, K) rate matrix: ``generator[i, j] >= 0`` for i != j, rows summing to zero.
        initial_probs: (K,) law of the state at time 0 (sums to one).
        structure: optional (K, K) boolean mask of the rates that may be non-zero (the diagonal is
            ignored); default: the positive off-diagonal entries of a concrete ``generator`` (all of
            them for a traced one). Rates outside it are structural zeros and stay zero under learning.
        covariate_effects: optional (P, K, K) log-rate effects of P covariates (proportional
            intensities, as msm's ``covariates``): with covariate values x (P,), the rate i -> j is
            ``generator[i, j] * exp(sum_p x_p covariate_effects[p, i, j])``. Only the entries of free
            rates are kept (stored (P, number of free rates) in the free rates' order); None: no
            covariates. The data supply x per subject or per interval (`ps.ctmc.panel_log_likelihood`).

    Raises:
        ValueError: naming ``generator`` (negative off-diagonal rate, rows not summing to zero, a rate
            outside ``structure``), ``initial_probs``, ``structure`` or ``covariate_effects`` (shape,
            non-finite values).

    Example:
        >>> Q = jnp.array([[-1., 1., 0.], [.5, -1., .5], [0., 0., 0.]])   # state 2 absorbing
        >>> proc = ps.models.MarkovJumpProcess(Q, jnp.array([1., 0., 0.]))
        >>> ps.ctmc.transition_matrix(proc, 0.5).shape
        (3, 3)
    """

    rates: jax.Array = eqx.field(metadata={"constraint": constraints.nonnegative})
    initial_probs: jax.Array = eqx.field(metadata={"constraint": constraints.simplex})
    covariate_effects: Optional[jax.Array] = eqx.field(metadata={"constraint": constraints.real})
    rows: tuple = eqx.field(static=True)
    cols: tuple = eqx.field(static=True)
    size: int = eqx.field(static=True)

    def __init__(self, generator, initial_probs, structure=None, covariate_effects=None):
        Q = _float(generator, "generator")
        if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or Q.shape[0] < 1:
            raise ValueError(f"generator: expected a square (K, K) matrix, got shape {tuple(Q.shape)}")
        K = Q.shape[0]
        check_generator(Q, "generator")
        off = ~np.eye(K, dtype=bool)
        if structure is None:
            mask = (np.asarray(Q) > 0) & off if checks.is_concrete(Q) else off
        else:
            if not checks.is_concrete(structure):
                raise ValueError("structure: expected a concrete (K, K) boolean mask, got a traced array")
            mask = np.asarray(structure)
            if mask.shape != (K, K):
                raise ValueError(f"structure: expected shape ({K}, {K}), got shape {mask.shape}")
            mask = mask.astype(bool) & off
            if checks.is_concrete(Q) and np.any((np.asarray(Q) != 0) & off & ~mask):
                i, j = np.argwhere((np.asarray(Q) != 0) & off & ~mask)[0]
                raise ValueError(f"generator: rate generator[{i}, {j}] is non-zero but outside structure")
        pi = _float(initial_probs, "initial_probs").astype(Q.dtype)
        checks.shape(pi, "initial_probs", (K,), f"({K},)")
        checks.probabilities(pi, "initial_probs")
        rows, cols = np.nonzero(mask)
        self.rows, self.cols, self.size = tuple(int(i) for i in rows), tuple(int(j) for j in cols), int(K)
        self.rates = Q[rows, cols] if rows.size else jnp.zeros((0,), Q.dtype)
        self.initial_probs = pi
        self.covariate_effects = None
        if covariate_effects is not None:
            beta = _float(covariate_effects, "covariate_effects").astype(Q.dtype)
            if beta.ndim != 3 or beta.shape[1:] != (K, K):
                raise ValueError(f"covariate_effects: expected shape (P, {K}, {K}), got shape {tuple(beta.shape)}")
            self.covariate_effects = beta[:, rows, cols]
            self._check_covariate_effects("covariate_effects")

    # --- structure --------------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        return self.size

    @property
    def emission_dim(self) -> int:
        return 1

    @property
    def structure(self) -> np.ndarray:
        """(K, K) boolean mask of the free rates."""
        m = np.zeros((self.size, self.size), bool)
        m[list(self.rows), list(self.cols)] = True
        return m

    @property
    def absorbing_states(self) -> tuple:
        """States with no rate out of them (fixed by the structure)."""
        return tuple(k for k in range(self.size) if k not in set(self.rows))

    @property
    def observes_states(self) -> bool:
        """The data of a jump process are its states (panel records)."""
        return True

    @property
    def num_covariates(self) -> int:
        """P, the number of covariates on the log-rates (0 without ``covariate_effects``)."""
        return 0 if self.covariate_effects is None else int(self.covariate_effects.shape[0])

    def covariate_effect_matrices(self) -> jax.Array:
        """(P, K, K) log-rate effects (zero outside the free rates)."""
        K, P = self.size, self.num_covariates
        B = jnp.zeros((P, K, K), self.rates.dtype)
        if self.rows and P:
            B = B.at[:, np.asarray(self.rows), np.asarray(self.cols)].set(self.covariate_effects)
        return B

    def _check_covariate_effects(self, name: str) -> None:
        beta = self.covariate_effects
        n = len(self.rows)
        if beta.ndim != 2 or beta.shape[1] != n:
            raise ValueError(f"{name}: expected shape (P, {n}) (one effect per free rate), got shape {tuple(beta.shape)}")
        checks.finite(beta, name)

    def generator(self, covariates=None) -> jax.Array:
        """(K, K) generator; with ``covariates`` x (..., P) the generators (..., K, K) at those values
        (rates scaled by ``exp(x @ covariate_effects)``). Traceable."""
        K = self.size
        rates = self.rates
        if covariates is not None and self.covariate_effects is not None:
            x = jnp.asarray(covariates, rates.dtype)
            rates = rates * jnp.exp(x @ self.covariate_effects)
        Q = jnp.zeros(rates.shape[:-1] + (K, K), rates.dtype)
        if self.rows:
            Q = Q.at[..., np.asarray(self.rows), np.asarray(self.cols)].set(rates)
        return Q - jnp.eye(K, dtype=Q.dtype) * jnp.sum(Q, axis=-1)[..., None]

    def with_generator(self, generator) -> "MarkovJumpProcess":
        """A copy with the free rates read from ``generator`` (K, K) (entries outside the structure are
        ignored). Traceable."""
        G = jnp.asarray(generator, self.rates.dtype)
        return eqx.tree_at(lambda m: m.rates, self, G[np.asarray(self.rows, int), np.asarray(self.cols, int)])

    def initial_distribution(self) -> jax.Array:
        return self.initial_probs

    # --- observations: the state itself ------------------------------------------------------
    def emission_log_likelihoods(self, emissions) -> jax.Array:
        y = jnp.asarray(emissions)
        y = y[:, None] if y.ndim == 1 else y
        seen = ~jnp.isnan(y[:, 0])
        labels = jnp.where(seen, y[:, 0], 0.0).astype(jnp.int32)
        hit = labels[:, None] == jnp.arange(self.size)[None, :]
        return jnp.where(seen[:, None], jnp.where(hit, 0.0, -jnp.inf), 0.0).astype(self.rates.dtype)

    def check_emissions(self, emissions) -> None:
        check_support(emissions, "MarkovJumpProcess", integer=True, low=0, high=self.size - 1)

    def emission(self, z, t, inputs=None):
        return dist.Categorical(probs=jax.nn.one_hot(z, self.size, dtype=self.rates.dtype)[None]).to_event(1)

    def check_parameters(self, name: str = "model") -> None:
        super().check_parameters(name)
        checks.probabilities(self.initial_probs, f"{name}.initial_probs")
        if self.covariate_effects is not None:
            self._check_covariate_effects(f"{name}.covariate_effects")


class ContinuousTimeHMM(AbstractContinuousTimeSSM):
    """A Markov jump process seen through an emission family at the observation times.

    Args:
        process: a `MarkovJumpProcess` with K states.
        emissions: a (K, C) misclassification matrix (``emissions[k, c]`` = p(label c | state k),
            rows summing to one, structural zeros allowed; wrapped as `ps.emissions.Categorical`), or
            any emission family of `ps.models.HMM` with K states.

    Example:
        >>> E = jnp.array([[.9, .1, 0.], [.1, .8, .1], [0., 0., 1.]])
        >>> hmm = ps.models.ContinuousTimeHMM(proc, E)
        >>> ps.ctmc.smoother(hmm, times, labels).smoothed_probs.shape   # (T, 3)
    """

    process: MarkovJumpProcess
    emissions: AbstractEmissions

    def __init__(self, process, emissions):
        if not isinstance(process, MarkovJumpProcess):
            raise ValueError(f"process: expected a ps.models.MarkovJumpProcess, got {type(process).__name__}")
        if not isinstance(emissions, AbstractEmissions):
            E = _float(emissions, "emissions")
            if E.ndim != 2 or E.shape[0] != process.num_states:
                raise ValueError(f"emissions: expected a ({process.num_states}, C) misclassification matrix or a "
                                 f"ps.emissions family, got shape {tuple(E.shape)}")
            checks.probabilities(E, "emissions")
            emissions = Categorical(E)
        if emissions.num_states != process.num_states:
            raise ValueError(f"emissions: expected {process.num_states} states (those of process), got "
                             f"{emissions.num_states}")
        self.process, self.emissions = process, emissions

    @property
    def num_states(self) -> int:
        return self.process.num_states

    @property
    def emission_dim(self) -> int:
        return self.emissions.emission_dim

    def generator(self) -> jax.Array:
        return self.process.generator()

    def initial_distribution(self) -> jax.Array:
        return self.process.initial_probs

    def emission_log_likelihoods(self, emissions) -> jax.Array:
        y = jnp.asarray(emissions)
        y = y[:, None] if y.ndim == 1 else y
        return self.emissions.log_likelihoods(y)

    def check_emissions(self, emissions) -> None:
        self.emissions.check_emissions(emissions)

    def emission(self, z, t, inputs=None):
        return self.emissions.distribution(z, None)

    def check_parameters(self, name: str = "model") -> None:
        super().check_parameters(name)
        self.process.check_parameters(f"{name}.process")
