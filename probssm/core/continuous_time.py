"""The continuous-time exact structure: a finite-state Markov jump process seen at given times.

A continuous-time model over K states declares

* a generator Q (K, K): rates ``Q[i, j] >= 0`` for i != j, rows summing to zero
  (``Q[i, i] = -sum_{j != i} Q[i, j]``); a row of zeros is an absorbing state;
* initial probabilities pi (K,) of the state at time 0;
* per-observation emission log-likelihoods ``log p(y_t | z(t_t) = k)`` (T, K).

Between two observation times the state moves by ``P(dt) = expm(Q dt)``, so on a given
time grid t_0 < t_1 < ... < t_{T-1} the model is a finite-state model with time-varying
transition matrices ``A_t = P(t_t - t_{t-1})``: `AbstractContinuousTimeSSM.on_grid` returns
that `AbstractDiscreteSSM` (`DiscretisedSSM`), which every discrete engine (``ps.hmm``)
consumes. The protocol's own ``transition(z_prev, t, inputs)`` reads the time step from the
input row (``inputs[0] = t_t - t_{t-1}``), so ``ps.sample(key, model, T, inputs=dts[:, None])``
draws the chain at irregular times.
"""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax

from probssm.core.protocol import AbstractDiscreteSSM, DiscreteParams, SSM

__all__ = ["AbstractContinuousTimeSSM", "DiscretisedSSM", "transition_matrices_at"]


# Pade(13) coefficients and the 1-norm bound up to which Pade(13) is accurate to double precision
# (Higham, "The scaling and squaring method for the matrix exponential revisited", SIAM J. Matrix
# Anal. Appl. 26, 2005)
_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0, 129060195264000.0,
           10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0, 40840800.0, 960960.0, 16380.0, 182.0, 1.0)
_THETA13 = 5.371920351148152
_MAX_SQUARINGS = 48


def expm(A) -> jax.Array:
    """Matrix exponential of one (K, K) matrix: Pade(13) with scaling and squaring. Traceable.

    One fixed program (no branch on the norm; the squarings are a fixed-length scan that skips the
    unneeded ones), so it compiles about twice as fast as ``jax.scipy.linalg.expm`` under ``vmap`` and
    ``grad`` and differentiates in reverse mode. Accurate to double precision for 1-norms up to
    ``5.37 * 2**48``.
    """
    A = jnp.asarray(A)
    K = A.shape[-1]
    norm = jnp.max(jnp.sum(jnp.abs(A), axis=-2))
    s = jnp.ceil(jnp.log2(jnp.maximum(norm, jnp.finfo(A.dtype).tiny) / _THETA13))
    s = lax.stop_gradient(jnp.clip(s, 0, _MAX_SQUARINGS)).astype(jnp.int32)
    A = A / (2.0 ** s).astype(A.dtype)
    b = _PADE13
    eye = jnp.eye(K, dtype=A.dtype)
    A2 = A @ A
    A4 = A2 @ A2
    A6 = A4 @ A2
    U = A @ (A6 @ (b[13] * A6 + b[11] * A4 + b[9] * A2) + b[7] * A6 + b[5] * A4 + b[3] * A2 + b[1] * eye)
    V = A6 @ (b[12] * A6 + b[10] * A4 + b[8] * A2) + b[6] * A6 + b[4] * A4 + b[2] * A2 + b[0] * eye
    X = jnp.linalg.solve(V - U, V + U)

    def square(X, i):
        return jnp.where(i < s, X @ X, X), None

    return lax.scan(square, X, jnp.arange(_MAX_SQUARINGS))[0]


def transition_matrices_at(generator, times) -> jax.Array:
    """(T, K, K) transition matrices ``expm(Q (t_t - t_{t-1}))`` on sorted times (T,); entry 0 is the
    identity (unused by the engines). Traceable."""
    times = jnp.asarray(times)
    dts = jnp.diff(times, prepend=times[:1])
    return jax.vmap(lambda d: expm(generator * d))(dts)


class AbstractContinuousTimeSSM(SSM):
    """A finite-state model in continuous time: unlocks `ps.ctmc` (matrix-exponential
    forward-backward, panel likelihoods, uniformisation, Gillespie) and EM for rates.

    A subclass implements `generator`, `initial_distribution`, `num_states`, `emission_dim` and
    `emission_log_likelihoods`; the protocol's three distributions follow (the time step of
    `transition` is read from the input row, ``inputs[0]``).
    """

    @property
    @abc.abstractmethod
    def num_states(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...

    @abc.abstractmethod
    def generator(self) -> jax.Array:
        """Q (K, K): off-diagonal rates >= 0, rows summing to zero. Traceable."""

    @abc.abstractmethod
    def initial_distribution(self) -> jax.Array:
        """pi (K,): law of the state at time 0 (or at the first observation time)."""

    @abc.abstractmethod
    def emission_log_likelihoods(self, emissions) -> jax.Array:
        """(T, D) emissions, NaN = missing -> (T, K) log p(y_t | z = k), 0 where missing. Traceable."""

    def check_emissions(self, emissions) -> None:
        """Raise ValueError (naming ``emissions``) for concrete data outside the emission support."""
        return None

    @property
    def observes_states(self) -> bool:
        """True when the data are the states themselves (panel records): learners then use the panel
        likelihood (`ps.ctmc.panel_log_likelihood`) instead of the hidden-state filter. Default False."""
        return False

    def transition_matrix(self, dt) -> jax.Array:
        """P(dt) = expm(Q dt), (K, K), for a scalar time step ``dt >= 0``. Traceable."""
        return expm(self.generator() * dt)

    def discrete_params(self, times, emissions) -> DiscreteParams:
        """`DiscreteParams` of the model seen at sorted ``times`` (T,) with ``emissions`` (T, D)."""
        return DiscreteParams(self.initial_distribution(), transition_matrices_at(self.generator(), times),
                              self.emission_log_likelihoods(jnp.asarray(emissions)))

    def on_grid(self, times) -> "DiscretisedSSM":
        """The discrete-time model on the sorted time grid ``times`` (T,): an `AbstractDiscreteSSM`
        with transition matrices ``expm(Q (t_t - t_{t-1}))``, for ``ps.hmm`` and the particle engines."""
        times = jnp.asarray(times)
        if times.ndim != 1:
            raise ValueError(f"times: expected shape (T,), got shape {tuple(times.shape)}")
        return DiscretisedSSM(self, transition_matrices_at(self.generator(), times))

    # --- the protocol (time step in the input row) ------------------------------------------
    def initial(self, inputs=None):
        return dist.Categorical(probs=self.initial_distribution())

    def transition(self, z_prev, t, inputs=None):
        if inputs is None:
            raise ValueError("inputs: a continuous-time model reads the time step dt from inputs[0]; expected "
                             "a (T, 1) array of time steps (or use model.on_grid(times))")
        dt = jnp.reshape(jnp.asarray(inputs), (-1,))[0]
        return dist.Categorical(probs=self.transition_matrix(dt)[z_prev])

    @property
    def input_dim(self):
        return None


class DiscretisedSSM(AbstractDiscreteSSM):
    """A continuous-time model on a fixed time grid: the discrete protocol with A_t = expm(Q dt_t).

    Built by `AbstractContinuousTimeSSM.on_grid`; ``transition_matrices`` (T, K, K) holds entry 0 as
    the identity (unused).
    """

    model: AbstractContinuousTimeSSM
    transition_matrices: jax.Array

    @property
    def num_states(self) -> int:
        return self.model.num_states

    @property
    def emission_dim(self) -> int:
        return self.model.emission_dim

    @property
    def num_timesteps(self):
        return self.transition_matrices.shape[0]

    @property
    def input_dim(self):
        return 0

    def check_emissions(self, emissions) -> None:
        self.model.check_emissions(emissions)

    def check_parameters(self, name: str = "model") -> None:
        self.model.check_parameters(name)

    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        return DiscreteParams(self.model.initial_distribution(), self.transition_matrices,
                              self.model.emission_log_likelihoods(jnp.asarray(emissions)))

    def initial(self, inputs=None):
        return dist.Categorical(probs=self.model.initial_distribution())

    def transition(self, z_prev, t, inputs=None):
        return dist.Categorical(probs=self.transition_matrices[t][z_prev])

    def emission(self, z, t, inputs=None):
        return self.model.emission(z, t, None)

