"""Hidden Markov models: a finite-state Markov chain with per-state emissions.

    z_0 ~ Categorical(initial_probs)
    z_t | z_{t-1} = i ~ Categorical(A_t[i])          t = 1..T-1
    y_t | z_t = k ~ emissions.distribution(k, u_t)   t = 0..T-1

``A_t`` is one (K, K) matrix or a stack (T, K, K) (entry 0 unused). Transition
matrices that depend on inputs come from a subclass overriding
`HMM.transition_matrices`. Autoregressive HMMs use
`probssm.models.emissions.AutoregressiveGaussian`, whose inputs are the lagged
observations.
"""
from __future__ import annotations

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

    # --- exact structure -----------------------------------------------------------
    def transition_matrices(self, num_timesteps: int, inputs=None):
        """(K, K) or (T, K, K). Override for transitions that depend on inputs."""
        return self.transition_matrix

    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        y = jnp.asarray(emissions)
        return DiscreteParams(self.initial_probs, self.transition_matrices(y.shape[0], inputs),
                              self.emissions.log_likelihoods(y, inputs))

    # --- the protocol --------------------------------------------------------------
    def initial(self, inputs=None):
        return dist.Categorical(probs=self.initial_probs)

    def transition(self, z_prev, t, inputs=None):
        A = self.transition_matrix
        A = A[t] if A.ndim == 3 else A
        return dist.Categorical(probs=A[z_prev])

    def emission(self, z, t, inputs=None):
        return self.emissions.distribution(z, inputs)


def ARHMM(initial_probs, transition_matrix, weights, biases, covs) -> HMM:
    """Autoregressive HMM: an `HMM` with `AutoregressiveGaussian` emissions.

    y_t | z_t = k ~ N(weights[k] @ (y_{t-1}, ..., y_{t-P}) + biases[k], covs[k]).
    Used with ``plausibility=`` in `ps.hmm` and Baum-Welch, it is the ARPHMM.
    """
    return HMM(initial_probs, transition_matrix, AutoregressiveGaussian(weights, biases, covs))
