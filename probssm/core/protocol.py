"""The one model protocol every engine consumes, and the exact structures a model may declare.

A state-space model over latent states z_1..z_T and observations y_1..y_T, with
optional inputs u_t, is an immutable pytree (`equinox.Module`) with three
methods that return numpyro distributions:

    initial(inputs)              p(z_1)
    transition(z_prev, t, inputs) p(z_t | z_{t-1})       (t is the index of z_t, 1..T-1)
    emission(z, t, inputs)       p(y_t | z_t)            (t is 0..T-1)

Time indices are zero-based: the state at index 0 is drawn from `initial`.
That is all a particle engine needs. A model that also subclasses one of the
`Abstract*SSM` classes below declares an exact structure, which unlocks the
exact engines (Kalman, forward-backward). Capabilities are declared by
subclassing, never detected with ``hasattr``.
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class SSM(eqx.Module):
    """Abstract state-space model: the protocol.

    Besides the three distributions, every model answers three questions engines ask
    (defaults suit a time-invariant model that reads no inputs and no lagged outputs):

    * `num_timesteps`: the length T its time-varying parameters fix, or None;
    * `input_dim`: columns U of the input rows it reads; 0 when it reads none, None
      when it does not declare a width (inputs are then passed through unchecked);
    * `emission_lags`: P when the emission of y_t reads y_{t-1..t-P} as its inputs
      (autoregressive families); `default_inputs(emissions)` then builds those inputs.
    """

    @abc.abstractmethod
    def initial(self, inputs=None):
        """Distribution of the first state z_0 given the first input row."""

    @abc.abstractmethod
    def transition(self, z_prev, t, inputs=None):
        """Distribution of z_t given z_{t-1}; ``t`` is the index of the new state."""

    @abc.abstractmethod
    def emission(self, z, t, inputs=None):
        """Distribution of y_t given z_t."""

    @property
    def num_timesteps(self) -> Optional[int]:
        """Length T fixed by time-varying parameters, or None for a time-invariant model."""
        return None

    @property
    def input_dim(self) -> Optional[int]:
        """Width U of an input row; 0: reads no inputs; None: undeclared (not checked)."""
        return None

    @property
    def emission_lags(self) -> int:
        """P > 0 when the inputs of y_t are the lagged observations y_{t-1}, ..., y_{t-P}."""
        return 0

    def check_parameters(self, name: str = "model") -> None:
        """Raise ValueError naming the first learnable scalar or elementwise parameter outside its
        declared support (``positive``, ``interval``, ...; `probssm.core.params`), e.g.
        ``model.sigma: expected values in positive, got -1.0``. Engines call it where inference
        starts, so models made by ``eqx.tree_at``, ``tree_map`` or ``ps.load`` are checked too.
        Real-valued fields and simplex rows are left to each structure's own checks; a
        ``positive_definite`` matrix must be symmetric with no negative eigenvalue. Runs on
        concrete values only (a traced model is not checked)."""
        from probssm.core import params as P

        P.check_support(self, name)

    def default_inputs(self, emissions):
        """Inputs an engine uses when the caller passes none: the stacked lagged
        observations (first P rows NaN) for an autoregressive model, else None."""
        if self.emission_lags == 0:
            return None
        from probssm.core.lags import lagged_inputs

        return lagged_inputs(emissions, self.emission_lags, fill_value=jnp.nan)


class LinearGaussianParams(NamedTuple):
    """Per-step arrays of a linear-Gaussian system.

    z_0 ~ N(initial_mean, initial_cov)
    z_t = F_t z_{t-1} + b_t + N(0, Q_t)          t = 1..T-1
    y_t = H_t z_t + d_t + N(0, R_t)              t = 0..T-1

    Each of F, Q, H, R is either one matrix (time-invariant) or a stack with a
    leading time axis of length T; the offsets b, d always carry the time axis
    (T, .) once control inputs are folded in, or no time axis when fixed.
    Entry t = 0 of a time-varying F, b or Q is never used.
    """

    initial_mean: jax.Array
    initial_cov: jax.Array
    transition_matrix: jax.Array
    transition_offset: jax.Array
    transition_cov: jax.Array
    emission_matrix: jax.Array
    emission_offset: jax.Array
    emission_cov: jax.Array


class AbstractLinearGaussianSSM(SSM):
    """A model whose joint law is linear-Gaussian: unlocks `ps.kalman` and `ps.learn.em`.

    A subclass implements `linear_gaussian_params`, `state_dim` and `emission_dim`, and
    declares `num_timesteps` / `input_dim` when it has time-varying parameters or reads
    inputs. EM works on any subclass: its E-step is the Kalman smoother, its M-step the
    closed form `m_step` where the model declares one, otherwise gradient steps on the
    expected complete-data log-likelihood over the model's learnable arrays
    (`probssm.core.params`).
    """

    @abc.abstractmethod
    def linear_gaussian_params(self, num_timesteps: int, inputs=None) -> LinearGaussianParams:
        """Return the system matrices for a sequence of ``num_timesteps`` steps.

        ``inputs``: None, or the (T, ...) input rows of the sequence (the model folds them
        into the offsets). Must be traceable (EM and `ps.learn.mle` call it inside jit).
        """

    def m_step(self, stats, fixed: tuple = ()) -> Optional["AbstractLinearGaussianSSM"]:
        """Closed-form EM M-step, or None (the default: the model declares no closed form).

        Args:
            stats: posterior moments of a batch of sequences under the current model
                (`probssm.models.lgssm.LinearGaussianMoments`: E[z_t], E[z_t z_t^T],
                E[z_{t+1} z_t^T], E[y_t], E[y_t z_t^T], E[y_t y_t^T], inputs, weights),
                each with leading axes (B, T).
            fixed: dotted parameter paths (or prefixes) to hold at their current values.

        Returns:
            The model maximising the expected complete-data log-likelihood over the free
            parameters (traceable: called inside EM's jit), or None, in which case
            `ps.learn.em` takes a generalised M-step by gradient ascent.
        """
        return None

    @property
    @abc.abstractmethod
    def state_dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...


class AbstractMarkovianGP(AbstractLinearGaussianSSM):
    """A Gaussian process in state-space form over observation times: unlocks `ps.gp`.

    Outputs y(t) = H s(t) + mean + N(0, diag(noise)), latent functions f(t) = G s(t), where the
    SDE state s follows the exact discretisation between any two sorted times.
    """

    @abc.abstractmethod
    def params_at(self, times) -> LinearGaussianParams:
        """The linear-Gaussian system over sorted times (T,) (traceable)."""

    @abc.abstractmethod
    def latent_matrix(self) -> jax.Array:
        """G (L, d): the latent functions of the state."""

    @abc.abstractmethod
    def output_noise(self) -> jax.Array:
        """(p,) observation noise variances (the diagonal of the emission covariance)."""


class AbstractAdditiveGaussianSSM(SSM):
    """A model with Gaussian initial state and additive Gaussian noise: unlocks `ps.gaussian`
    (EKF, IEKF, UKF, CKF, GHKF, statistical linear regression) and `ps.imap`.

        z_0 ~ N(m, P);  z_t = f(z_{t-1}, t, u_t) + N(0, Q_t);  y_t = h(z_t, t, u_t) + N(0, R_t)

    The protocol's three distributions follow from these pieces; the Jacobians default
    to forward-mode autodiff and may be overridden with closed forms.
    """

    @abc.abstractmethod
    def initial_moments(self, inputs=None) -> tuple[jax.Array, jax.Array]:
        """(m, P): mean (d,) and covariance (d, d) of z_0."""

    @abc.abstractmethod
    def transition_mean(self, z_prev, t, inputs=None) -> jax.Array:
        """f(z_{t-1}, t, u_t), shape (d,)."""

    @abc.abstractmethod
    def transition_noise_cov(self, t, inputs=None) -> jax.Array:
        """Q_t, shape (d, d)."""

    @abc.abstractmethod
    def emission_mean(self, z, t, inputs=None) -> jax.Array:
        """h(z_t, t, u_t), shape (p,)."""

    @abc.abstractmethod
    def emission_noise_cov(self, t, inputs=None) -> jax.Array:
        """R_t, shape (p, p)."""

    @property
    @abc.abstractmethod
    def state_dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...

    def transition_jacobian(self, z_prev, t, inputs=None) -> jax.Array:
        """d f / d z_{t-1}, shape (d, d)."""
        return jax.jacfwd(lambda z: self.transition_mean(z, t, inputs))(z_prev)

    def emission_jacobian(self, z, t, inputs=None) -> jax.Array:
        """d h / d z_t, shape (p, d)."""
        return jax.jacfwd(lambda x: self.emission_mean(x, t, inputs))(z)

    def initial(self, inputs=None):
        import numpyro.distributions as dist

        mean, cov = self.initial_moments(inputs)
        return dist.MultivariateNormal(mean, covariance_matrix=cov)

    def transition(self, z_prev, t, inputs=None):
        import numpyro.distributions as dist

        return dist.MultivariateNormal(self.transition_mean(z_prev, t, inputs),
                                       covariance_matrix=self.transition_noise_cov(t, inputs))

    def emission(self, z, t, inputs=None):
        import numpyro.distributions as dist

        return dist.MultivariateNormal(self.emission_mean(z, t, inputs),
                                       covariance_matrix=self.emission_noise_cov(t, inputs))


class DiscreteParams(NamedTuple):
    """Per-step quantities of a finite-state model (K states, T steps).

    initial_probs: (K,) p(z_0 = k).
    transition_matrices: (K, K) or (T, K, K); entry t maps z_{t-1} -> z_t (t = 0 unused).
    log_likelihoods: (T, K) log p(y_t | z_t = k); 0 where y_t is missing.
    """

    initial_probs: jax.Array
    transition_matrices: jax.Array
    log_likelihoods: jax.Array


class AbstractDiscreteSSM(SSM):
    """A model with a finite latent state: unlocks `ps.hmm` (forward-backward, Viterbi).

    Members the engines read (besides `SSM`'s): `num_states`, `emission_dim`,
    `discrete_params`, `check_emissions` (value checks on concrete data, no-op by default)
    and `emission_family` (None by default; a model that returns a `ps.emissions` family
    declares the structure Baum-Welch fits, see its docstring).
    """

    @property
    @abc.abstractmethod
    def num_states(self) -> int: ...

    @property
    @abc.abstractmethod
    def emission_dim(self) -> int: ...

    @abc.abstractmethod
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        """(T, D) emissions (and (T, U) inputs, or None for `default_inputs`) -> `DiscreteParams`:
        initial and transition probabilities and per-step emission log-likelihoods. Traceable."""

    def check_emissions(self, emissions) -> None:
        """Raise ValueError (naming ``emissions``) if concrete data (..., D) with NaN = missing
        lie outside the support of the emissions (e.g. a label >= the number of classes).
        Public functions call it once, outside jit, on observed rows only. Default: no check."""
        return None

    @property
    def emission_family(self):
        """The per-state emission family (a `ps.emissions.AbstractEmissions` with a weighted
        ``m_step``) of an HMM-structured model, or None (the default).

        Returning one declares the structure Baum-Welch fits: the fields ``initial_probs``
        (K,), ``transition_matrix`` (K, K) (a time-varying (T, K, K) one must be held fixed)
        and ``emissions`` (this family), which Baum-Welch replaces by their weighted
        maximisers; `discrete_params` must be built from exactly these.
        """
        return None


class AbstractRegimeSwitchingAR(AbstractDiscreteSSM):
    """A regime-switching autoregression run as an HMM over the current and the previous ``order``
    regimes (``num_regimes ** (order + 1)`` states): unlocks `ps.switching.log_likelihood`, ``filter``,
    ``smoother`` and ``most_likely_regimes``.

    Members those engines read (besides `AbstractDiscreteSSM`'s): ``order`` (P: the first P
    observations are conditioned on), ``num_regimes`` (K), ``num_exog`` (regressors read from
    ``inputs``, 0 for none), ``regime_probs`` ((..., num_states) expanded-state probabilities ->
    (..., K) probabilities of the current regime) and ``current_regime`` (expanded-state indices ->
    the current regime's index).
    """

    @property
    @abc.abstractmethod
    def order(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_regimes(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_exog(self) -> int: ...

    @abc.abstractmethod
    def regime_probs(self, probs) -> jax.Array: ...

    @abc.abstractmethod
    def current_regime(self, states) -> jax.Array: ...


class AbstractSemiMarkovSSM(AbstractDiscreteSSM):
    """An explicit-duration (semi-Markov) model run as an HMM over (segment state k, remaining
    duration r): ``num_states = num_segment_states * max_duration``, expanded index
    ``k * max_duration + (r - 1)``. Unlocks `ps.prognostics` over segment states.

    Members the engines read (besides `AbstractDiscreteSSM`'s): ``num_segment_states`` (K),
    ``max_duration`` (D), ``segment_transition_matrix`` ((K, K) jumps between segments: zero
    diagonal, except an absorbing state's row e_k), ``expand_plausibility`` ((..., K) -> (..., K D))
    and ``state_marginals`` ((..., K D) -> (..., K)).
    """

    @property
    @abc.abstractmethod
    def num_segment_states(self) -> int: ...

    @property
    @abc.abstractmethod
    def max_duration(self) -> int: ...

    @property
    @abc.abstractmethod
    def segment_transition_matrix(self) -> jax.Array: ...

    @abc.abstractmethod
    def expand_plausibility(self, plausibility) -> jax.Array: ...

    @abc.abstractmethod
    def state_marginals(self, probs) -> jax.Array: ...


def _row(inputs, t):
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[t], inputs)


def sample_sequence(key, model: SSM, num_timesteps: int, inputs=None):
    """`sample` without input checks: traceable, for use inside the caller's jit / vmap.

    An autoregressive model (``model.emission_lags = P > 0``) reads as the inputs of y_t
    its own past draws y_{t-1..t-P} (zeros before the start); ``inputs`` must then be None.
    """
    lags = model.emission_lags
    key_z0, key_y0, key_scan = jax.random.split(key, 3)
    if lags:
        width = model.input_dim
        dtype = jnp.result_type(float)
        history = jnp.zeros((width,), dtype)
        row_of = lambda hist, t: hist
    else:
        history = None
        row_of = lambda hist, t: _row(inputs, t)
    u0 = row_of(history, 0)
    z0 = model.initial(u0).sample(key_z0)
    y0 = model.emission(z0, 0, u0).sample(key_y0)

    def push(hist, y):
        if not lags:
            return hist
        return jnp.concatenate([jnp.ravel(y).astype(hist.dtype), hist[: hist.shape[0] - jnp.size(y)]])

    def step(carry, xs):
        z_prev, hist = carry
        t, k = xs
        kz, ky = jax.random.split(k)
        u = row_of(hist, t)
        z = model.transition(z_prev, t, u).sample(kz)
        y = model.emission(z, t, u).sample(ky)
        return (z, push(hist, y)), (z, y)

    ts = jnp.arange(1, num_timesteps)
    keys = jax.random.split(key_scan, num_timesteps - 1)
    _, (zs, ys) = lax.scan(step, (z0, push(history, y0)), (ts, keys))
    states = jnp.concatenate([z0[None], zs], axis=0)
    emissions = jnp.concatenate([y0[None], ys], axis=0)
    return states, emissions


_sample_jit = eqx.filter_jit(sample_sequence)


def sample(key, model: SSM, num_timesteps: int, inputs=None):
    """Draw one joint trajectory (states, emissions) from any model.

    Args:
        key: a `jax.random` key.
        model: any `SSM`.
        num_timesteps: T >= 1.
        inputs: optional array (or pytree of arrays) with leading axis T.

    Returns:
        ``(states, emissions)``, each with leading axis T.

    The loop this scan implements::

        z[0] ~ model.initial(u[0]);  y[0] ~ model.emission(z[0], 0, u[0])
        for t in 1..T-1:
            z[t] ~ model.transition(z[t-1], t, u[t]);  y[t] ~ model.emission(z[t], t, u[t])
    """
    from probssm.core import checks

    if not isinstance(model, SSM):
        raise ValueError(f"model: expected a probssm SSM, got {type(model).__name__}")
    num_timesteps = checks.positive_int(num_timesteps, "num_timesteps")
    if model.emission_lags and inputs is not None:
        raise ValueError("inputs: an autoregressive model reads its own past emissions as inputs; expected None")
    if model.emission_lags and not isinstance(model.input_dim, int):
        raise ValueError(f"model: an autoregressive model must declare input_dim (P * D), got {model.input_dim!r}")
    if inputs is not None:
        for leaf in jax.tree_util.tree_leaves(inputs):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_timesteps:
                raise ValueError(
                    f"inputs: expected a leading time axis of length {num_timesteps}, "
                    f"got shape {jnp.shape(leaf)}"
                )
    # a diffuse prior has no distribution to draw from (the model's own error_if covers tracing)
    initial_cov = (model.linear_gaussian_params(num_timesteps, inputs).initial_cov
                   if isinstance(model, AbstractLinearGaussianSSM) else None)
    if initial_cov is not None and checks.is_concrete(initial_cov) and np.isinf(np.asarray(initial_cov)).any():
        raise ValueError("model: its initial_cov holds inf (a diffuse, flat prior); sampling needs a proper "
                         "initial distribution, expected a finite initial_cov")
    return _sample_jit(key, model, num_timesteps, inputs)
