"""Stochastic volatility model (a ready example for the particle engines).

    x_0 ~ N(mu, sigma^2 / (1 - rho^2))                 (the stationary law)
    x_t = mu + rho (x_{t-1} - mu) + sigma eps_t         t = 1..T-1
    y_t ~ N(0, exp(x_t))                                 t = 0..T-1

The state and the observation are vectors of length one. The same
parametrisation as ``particles.state_space_models.StochVol`` (defaults
mu = -1, rho = 0.95, sigma = 0.2), so log-likelihood estimates compare directly.

The transition density is bounded by 1 / (sqrt(2 pi) sigma), which the model
declares (`AbstractBoundedTransitionSSM`): PaRIS and backward simulation then
use accept-reject backward draws.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.bounded import AbstractBoundedTransitionSSM

_HALF_LOG_2PI = 0.9189385332046727


class StochasticVolatility(AbstractBoundedTransitionSSM):
    """Univariate stochastic volatility with an AR(1) log-variance.

    Args:
        mu: long-run mean of the log-variance (scalar).
        rho: autocorrelation, in (-1, 1).
        sigma: innovation standard deviation, > 0.

    Example:
        >>> model = ps.models.StochasticVolatility(mu=-1.0, rho=0.95, sigma=0.2)
        >>> x, y = ps.sample(jax.random.key(0), model, 1000)
        >>> ps.smc.particle_filter(jax.random.key(1), model, y, 1000).log_likelihood
    """

    mu: jax.Array = eqx.field(metadata={"constraint": constraints.real})
    rho: jax.Array = eqx.field(metadata={"constraint": constraints.interval(-1.0, 1.0)})
    sigma: jax.Array = eqx.field(metadata={"constraint": constraints.positive})

    def __init__(self, mu=-1.0, rho=0.95, sigma=0.2):
        dtype = jnp.result_type(float)
        vals = []
        for name, v in (("mu", mu), ("rho", rho), ("sigma", sigma)):
            a = jnp.asarray(v)
            a = a.astype(jnp.result_type(a.dtype, dtype)) if not jnp.issubdtype(a.dtype, jnp.floating) else a
            if a.ndim != 0:
                raise ValueError(f"{name}: expected a scalar, got shape {tuple(a.shape)}")
            checks.finite(a, name)
            vals.append(a)
        m, r, s = vals
        if checks.is_concrete(r) and not (-1.0 < float(r) < 1.0):
            raise ValueError(f"rho: expected a value in (-1, 1), got {float(r)}")
        if checks.is_concrete(s) and not float(s) > 0.0:
            raise ValueError(f"sigma: expected a positive value, got {float(s)}")
        dt = jnp.result_type(m.dtype, r.dtype, s.dtype)
        self.mu, self.rho, self.sigma = m.astype(dt), r.astype(dt), s.astype(dt)

    @property
    def state_dim(self) -> int:
        return 1

    @property
    def emission_dim(self) -> int:
        return 1

    def initial(self, inputs=None):
        scale = self.sigma / jnp.sqrt(1.0 - self.rho ** 2)
        return dist.Normal(jnp.reshape(self.mu, (1,)), jnp.reshape(scale, (1,))).to_event(1)

    def transition(self, z_prev, t, inputs=None):
        return dist.Normal(self.mu + self.rho * (z_prev - self.mu), self.sigma).to_event(1)

    def emission(self, z, t, inputs=None):
        return dist.Normal(jnp.zeros_like(z), jnp.exp(0.5 * z)).to_event(1)

    def transition_log_bound(self, t, inputs=None):
        """log sup_{z_prev, z} p(z | z_prev) = -log(sqrt(2 pi) sigma)."""
        return -_HALF_LOG_2PI - jnp.log(self.sigma)
