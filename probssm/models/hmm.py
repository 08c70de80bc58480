"""Hidden Markov models: a finite-state Markov chain with per-state emissions.

    z_0 ~ Categorical(initial_probs)
    z_t | z_{t-1} = i ~ Categorical(A_t[i])          t = 1..T-1
    y_t | z_t = k ~ emissions.distribution(k, u_t)   t = 0..T-1

``A_t`` is one (K, K) matrix or a stack (T, K, K) (entry 0 unused). The one
per-step declaration of the chain is `HMM.transition_matrix_at(t, inputs_row)`:
the protocol's `transition` (``ps.sample``, particle engines) and `discrete_params`
(``ps.hmm``, Baum-Welch) both read it, so transitions that depend on inputs come
from a subclass overriding that one method. Autoregressive HMMs use
`probssm.models.emissions.AutoregressiveGaussian`, whose inputs are the lagged
observations (the HMM declares ``emission_lags``, ``input_dim`` and
``default_inputs`` from its emission family).
"""
from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import AbstractDiscreteSSM, DiscreteParams
from probssm.models.emissions import AbstractEmissions, AutoregressiveGaussian

__all__ = ["HMM", "ARHMM"]

SIMPLEX = {"constraint": constraints.simplex}


class HMM(AbstractDiscreteSSM):
    """Hidden Markov model with K states.

    Args:
        initial_probs: (K,), sums to one.
        transition_matrix: (K, K) or time-varying (T, K, K); rows sum to one,
            ``A[i, j] = p(z_t = j | z_{t-1} = i)``.
        emissions: an emission family from `ps.emissions` with K states.

    Example:
        >>> hmm = ps.models.HMM(jnp.ones(2) / 2, jnp.array([[.9, .1], [.2, .8]]),
        ...                     ps.emissions.Gaussian(jnp.array([[-1.], [1.]]), jnp.ones((2, 1, 1))))
        >>> states, y = ps.sample(key, hmm, 100)
        >>> ps.hmm.smoother(hmm, y).smoothed_probs.shape
        (100, 2)
    """

    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)
    emissions: AbstractEmissions

    def __init__(self, initial_probs, transition_matrix, emissions):
        if not isinstance(emissions, AbstractEmissions):
            raise ValueError(f"emissions: expected a ps.emissions family, got {type(emissions).__name__}")
        K = emissions.num_states
        pi = jnp.asarray(initial_probs)
        if not jnp.issubdtype(pi.dtype, jnp.floating):
            pi = pi.astype(jnp.result_type(float))
        checks.shape(pi, "initial_probs", (K,), f"({K},)")
        checks.probabilities(pi, "initial_probs")
        A = jnp.asarray(transition_matrix, pi.dtype)
        if A.ndim == 3:
            checks.shape(A, "transition_matrix", (None, K, K), f"({K}, {K}) or (T, {K}, {K})")
        else:
            checks.shape(A, "transition_matrix", (K, K), f"({K}, {K}) or (T, {K}, {K})")
        checks.probabilities(A, "transition_matrix")
        self.initial_probs, self.transition_matrix, self.emissions = pi, A, emissions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "transition_matrices" in cls.__dict__ and "transition_matrix_at" not in cls.__dict__:
            warnings.warn(f"{cls.__name__} overrides HMM.transition_matrices, which `transition` (ps.sample, "
                          "particle engines) does not read; override transition_matrix_at(t, inputs) instead "
                          "(transition_matrices is derived from it)", DeprecationWarning, stacklevel=2)

    @property
    def num_states(self) -> int:
        return self.initial_probs.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.emissions.emission_dim

    @property
    def num_timesteps(self):
        """Length T of a time-varying transition matrix, or None."""
        return self.transition_matrix.shape[0] if self.transition_matrix.ndim == 3 else None

    @property
    def input_dim(self):
        """The emission family's input width (None: undeclared). A subclass whose transitions
        read inputs of its own may override it."""
        return self.emissions.input_dim

    @property
    def emission_lags(self) -> int:
        """P > 0 for autoregressive emissions (their inputs are y_{t-1..t-P})."""
        return self.emissions.num_lags

    def default_inputs(self, emissions):
        """The emission family's default inputs (lagged observations for autoregressive
        emissions, else None)."""
        return self.emissions.default_inputs(emissions)

    @property
    def emission_family(self):
        return self.emissions

    def check_emissions(self, emissions) -> None:
        self.emissions.check_emissions(emissions)

    # --- the chain: one per-step declaration ----------------------------------------
    def transition_matrix_at(self, t, inputs=None):
        """(K, K) matrix A_t of step t (rows: z_{t-1}; columns: z_t) given the input row u_t.

        The one declaration of the chain; override it for transitions that depend on
        inputs (``t`` may be traced). Default: ``transition_matrix`` (or its entry t).
        """
        A = self.transition_matrix
        return A[t] if A.ndim == 3 else A

    def transition_matrices(self, num_timesteps: int, inputs=None):
        """(K, K) or (T, K, K): `transition_matrix_at` at every step (vmapped over t and the rows
        of ``inputs``); the stored matrix itself when `transition_matrix_at` is not overridden."""
        if type(self).transition_matrix_at is HMM.transition_matrix_at:
            return self.transition_matrix
        ts = jnp.arange(num_timesteps)
        return jax.vmap(self.transition_matrix_at, in_axes=(0, None if inputs is None else 0))(ts, inputs)

    # --- exact structure -----------------------------------------------------------
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        """(T, D) emissions, (T, U) inputs (None: `default_inputs`) -> `DiscreteParams`."""
        y = jnp.asarray(emissions)
        if inputs is None:
            inputs = self.default_inputs(y)
        return DiscreteParams(self.initial_probs, self.transition_matrices(y.shape[0], inputs),
                              self.emissions.log_likelihoods(y, inputs))

    # --- the protocol --------------------------------------------------------------
    def initial(self, inputs=None):
        return dist.Categorical(probs=self.initial_probs)

    def transition(self, z_prev, t, inputs=None):
        return dist.Categorical(probs=self.transition_matrix_at(t, inputs)[z_prev])

    def emission(self, z, t, inputs=None):
        return self.emissions.distribution(z, inputs)


def ARHMM(initial_probs, transition_matrix, weights, biases, covs) -> HMM:
    """Autoregressive HMM: an `HMM` with `AutoregressiveGaussian` emissions.

    y_t | z_t = k ~ N(weights[k] @ (y_{t-1}, ..., y_{t-P}) + biases[k], covs[k]).
    Used with ``plausibility=`` in `ps.hmm` and Baum-Welch, it is the ARPHMM.
    """
    return HMM(initial_probs, transition_matrix, AutoregressiveGaussian(weights, biases, covs))
