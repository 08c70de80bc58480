"""Markovian Gaussian process: GP regression as a linear-Gaussian state-space model.

    f_l(t) ~ GP(0, k_l)                       l = 1..L latent functions (kernels in state-space form)
    y(t_i) = W f(t_i) + mean + N(0, diag(noise_variance))     i = 0..T-1, p outputs

Each kernel is a linear SDE (`probssm.models.kernels`); over sorted, irregular observation times
t_0 < ... < t_{T-1} the stacked SDE state follows the exact discretisation
s_i = A(t_i - t_{i-1}) s_{i-1} + N(0, Q(t_i - t_{i-1})), so the model is an
`AbstractLinearGaussianSSM` and every linear-Gaussian engine (`ps.kalman` sequential and
parallel, `ps.learn.mle`, `ps.learn.em`) runs on it in O(T).

Where the times come from, in this order:

* ``gp.times`` when the model holds them (``gp.at(t)``): every engine, the particle engines
  included, reads them from the model;
* otherwise the first column of the ``inputs`` rows, ``inputs = t[:, None]``, so a batch of
  sequences can have its own time grid per sequence (``inputs`` (B, T, 1));
* otherwise unit spacing 0, 1, ..., T-1.
"""
from __future__ import annotations

from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import block_diag
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import AbstractMarkovianGP, LinearGaussianParams
from probssm.models.kernels import Kernel

__all__ = ["MarkovianGP", "check_times", "as_kernels"]

POSITIVE = {"constraint": constraints.positive}
REAL = {"constraint": constraints.real}


def check_times(times, name: str = "t", strictly: bool = True) -> jax.Array:
    """Observation times as a float (T,) array: finite and increasing (strictly, by default).

    Value checks run on concrete arrays only, so this is safe inside a user's `jax.jit`.

    Raises:
        ValueError: naming ``name``, for a shape other than (T,) or (T, 1), non-finite times,
            or times that are not sorted (or repeat, when ``strictly``).
    """
    t = jnp.asarray(times)
    if t.ndim == 2 and t.shape[-1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected times of shape (T,) with T >= 1, got shape {tuple(t.shape)}")
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if checks.is_concrete(t):
        a = np.asarray(t)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: expected finite times, found NaN or inf")
        steps = np.diff(a)
        if np.any(steps < 0):
            i = int(np.argmax(steps < 0))
            raise ValueError(f"{name}: expected sorted times, got {name}[{i}] = {a[i]} > {name}[{i + 1}] = {a[i + 1]}")
        if strictly and np.any(steps == 0):
            i = int(np.argmax(steps == 0))
            raise ValueError(f"{name}: expected distinct times, got {name}[{i}] = {name}[{i + 1}] = {a[i]}")
    return t


def as_kernels(kernel) -> tuple:
    """A kernel or a sequence of kernels as a tuple of `ps.gp` kernels; ValueError naming ``kernel``."""
    kernels = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,)
    for i, k in enumerate(kernels):
        if not isinstance(k, Kernel):
            name = "kernel" if len(kernels) == 1 else f"kernel[{i}]"
            raise ValueError(f"{name}: expected a ps.gp kernel (e.g. ps.gp.Matern32()), got {type(k).__name__}")
    return kernels


class MarkovianGP(AbstractMarkovianGP):
    """Gaussian-process regression in state-space form (Gaussian likelihood).

    Args:
        kernel: a `ps.gp` kernel, or a tuple of L kernels for L independent latent functions.
        noise_variance: observation noise variance, a scalar or (p,) per output.
        mixing: W, (p, L): outputs are W f (linear model of coregionalisation); held fixed by the
            learners (the kernels' variances set the scales). Default: the identity when L == p,
            a column of ones when L == 1 (p outputs of one function).
        mean: constant mean of the outputs, a scalar or (p,); default 0.
        times: optional sorted, distinct observation times (T,) the model holds (see `at`).

    Example:
        >>> gp = ps.models.MarkovianGP(ps.gp.Matern32(lengthscale=2.0), noise_variance=0.1)
        >>> ps.kalman.smoother(gp, y, inputs=t[:, None])  # or ps.gp.predict(gp, t, y, t_new)
    """

    kernels: tuple
    noise_variance: jax.Array = eqx.field(metadata=POSITIVE)
    # not learnable: with the kernels' variances it would be unidentifiable (W s^2 W^T)
    mixing: jax.Array
    mean: jax.Array = eqx.field(metadata=REAL)
    times: Optional[jax.Array]

    def __init__(self, kernel: Union[Kernel, tuple], noise_variance=1.0, mixing=None, mean=0.0,
                 times=None):
        self.kernels = as_kernels(kernel)
        L = len(self.kernels)
        dtype = jnp.result_type(float)
        noise = jnp.asarray(noise_variance, dtype)
        if noise.ndim > 1:
            raise ValueError(f"noise_variance: expected a scalar or shape (p,), got shape {noise.shape}")
        if mixing is None:
            p = noise.shape[0] if noise.ndim == 1 else L
            if L == p:
                mixing = jnp.eye(p, dtype=dtype)
            elif L == 1:
                mixing = jnp.ones((p, 1), dtype)
            else:
                raise ValueError(f"mixing: required, shape (p, {L}), when the {L} kernels do not match the "
                                 f"{p} outputs")
        W = jnp.asarray(mixing, dtype)
        if W.ndim != 2 or W.shape[1] != L:
            raise ValueError(f"mixing: expected shape (p, {L}), got shape {W.shape}")
        p = W.shape[0]
        self.mixing = W
        self.noise_variance = jnp.broadcast_to(noise, (p,)) if noise.ndim == 0 or noise.shape == (1,) else noise
        if self.noise_variance.shape != (p,):
            raise ValueError(f"noise_variance: expected a scalar or shape ({p},), got shape {noise.shape}")
        m = jnp.asarray(mean, dtype)
        self.mean = jnp.broadcast_to(m, (p,)) if m.ndim == 0 or m.shape == (1,) else m
        if self.mean.shape != (p,):
            raise ValueError(f"mean: expected a scalar or shape ({p},), got shape {m.shape}")
        self.times = None if times is None else check_times(times, "times")

    # -- the questions engines ask -------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return sum(k.state_dim for k in self.kernels)

    @property
    def emission_dim(self) -> int:
        return self.mixing.shape[0]

    @property
    def num_timesteps(self) -> Optional[int]:
        return None if self.times is None else int(self.times.shape[0])

    @property
    def input_dim(self) -> Optional[int]:
        # reads its times from the model when it holds them, else (optionally) from inputs (T, 1)
        return 0 if self.times is not None else None

    def at(self, times) -> "MarkovianGP":
        """The same model holding observation times (T,): sorted and distinct."""
        return eqx.tree_at(lambda m: m.times, self, check_times(times, "times"), is_leaf=lambda x: x is None)

    def check_parameters(self, name: str = "model") -> None:
        """ValueError naming a non-positive hyperparameter or noise variance (concrete values only)."""
        for i, k in enumerate(self.kernels):
            k.check(f"{name}.kernels.{i}")
        if checks.is_concrete(self.noise_variance):
            v = np.asarray(self.noise_variance)
            if not np.all(np.isfinite(v) & (v > 0)):
                raise ValueError(f"{name}.noise_variance: expected positive finite values, got {v}")

    # -- state-space form ----------------------------------------------------------------------
    def latent_matrix(self) -> jax.Array:
        """(L, d): the L latent functions f = G s (each kernel's measurement vector on its block)."""
        return block_diag(*[k.measurement_vector()[None, :] for k in self.kernels]).astype(self.mixing.dtype)

    def output_noise(self) -> jax.Array:
        return self.noise_variance

    def measurement_matrix(self) -> jax.Array:
        """H (p, d): the outputs' latent part W f = H s."""
        return self.mixing @ self.latent_matrix()

    def initial_state_cov(self, t0) -> jax.Array:
        return block_diag(*[k.initial_cov(t0) for k in self.kernels])

    def state_transition(self, dt):
        """(A, Q), each (d, d), over a step of length dt >= 0 (traced scalar)."""
        parts = [k.transition(dt) for k in self.kernels]
        return block_diag(*[a for a, _ in parts]), block_diag(*[q for _, q in parts])

    def _times(self, num_timesteps: int, inputs):
        if self.times is not None:
            return self.times
        if inputs is not None:
            return jnp.asarray(inputs)[..., 0].astype(self.mixing.dtype)
        return jnp.arange(num_timesteps, dtype=self.mixing.dtype)

    def linear_gaussian_params(self, num_timesteps: int, inputs=None) -> LinearGaussianParams:
        return self.params_at(self._times(num_timesteps, inputs))

    def params_at(self, t) -> LinearGaussianParams:
        """The state-space form over the times ``t`` (T,) (sorted; not checked here: traceable),
        whatever times the model holds."""
        t = jnp.asarray(t, self.mixing.dtype)
        dt = jnp.diff(t, prepend=t[:1])
        # padding rows (NaN times beyond a sequence's length) become empty steps: A = I, Q = 0
        dt = jnp.where(jnp.isfinite(dt), jnp.maximum(dt, 0.0), 0.0)
        A, Q = jax.vmap(self.state_transition)(dt)
        d = self.state_dim
        dtype = self.mixing.dtype
        return LinearGaussianParams(
            initial_mean=jnp.zeros(d, dtype),
            initial_cov=self.initial_state_cov(t[0]).astype(dtype),
            transition_matrix=A.astype(dtype),
            transition_offset=jnp.zeros(d, dtype),
            transition_cov=Q.astype(dtype),
            emission_matrix=self.measurement_matrix(),
            emission_offset=self.mean.astype(dtype),
            emission_cov=jnp.diag(self.noise_variance),
        )

    # -- the protocol (particle engines, ps.sample) --------------------------------------------
    def _step_dt(self, t, inputs):
        if self.times is None:
            if inputs is not None:
                raise ValueError("inputs: a MarkovianGP without times reads unit spacing in the particle "
                                 "protocol; give it its irregular times with gp.at(t) instead of inputs")
            return jnp.ones((), self.mixing.dtype)
        return self.times[t] - self.times[t - 1]

    def initial(self, inputs=None):
        t0 = self.times[0] if self.times is not None else jnp.zeros((), self.mixing.dtype)
        cov = self.initial_state_cov(t0)
        return dist.MultivariateNormal(jnp.zeros(self.state_dim, cov.dtype), covariance_matrix=cov)

    def transition(self, z_prev, t, inputs=None):
        A, Q = self.state_transition(self._step_dt(t, inputs))
        # deterministic kernels (periodic, cosine, constant) have Q = 0: keep a tiny floor so that
        # the Gaussian has a density for the particle engines
        Q = Q + 1e-12 * jnp.eye(self.state_dim, dtype=Q.dtype)
        return dist.MultivariateNormal(A @ z_prev, covariance_matrix=Q)

    def emission(self, z, t, inputs=None):
        return dist.Normal(self.measurement_matrix() @ z + self.mean, jnp.sqrt(self.noise_variance)).to_event(1)
