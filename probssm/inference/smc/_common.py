"""Shared pieces of the particle engines: per-particle evaluation of the model protocol,
fast reparameterised draws, weights, argument checks."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from probssm.core import checks
from probssm.core.bounded import AbstractBoundedTransitionSSM
from probssm.core.protocol import SSM

LOG_EPS = -jnp.inf


def row(inputs, t):
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[t], inputs)


def observation(y):
    """(y with NaN set to 0, whether y_t is observed). A partly missing y_t counts as missing."""
    missing = jnp.any(jnp.isnan(y))
    return jnp.where(jnp.isnan(y), 0.0, y), ~missing


def emission_log_prob(model, z, t, y, u):
    """log g(y_t | z_t^i) for every particle; 0 (weight one) when y_t is missing."""
    y_safe, observed = observation(y)
    lg = jax.vmap(lambda zi: model.emission(zi, t, u).log_prob(y_safe))(z)
    return jnp.where(observed, lg, 0.0)


def transition_log_prob(model, z_prev, z, t, u):
    """log p(z[i] | z_prev[i]) elementwise over a leading axis."""
    return jax.vmap(lambda zp, zi: model.transition(zp, t, u).log_prob(zi))(z_prev, z)


def _gaussian_params(d):
    """(loc, scale, kind) of a Gaussian numpyro distribution, or None for other families."""
    if isinstance(d, dist.Independent) and isinstance(d.base_dist, dist.Normal):
        return d.base_dist.loc, d.base_dist.scale, "diag"
    if isinstance(d, dist.Normal):
        return d.loc, d.scale, "diag"
    if isinstance(d, dist.MultivariateNormal):
        return d.loc, d.scale_tril, "tril"
    return None


def _reparam(d, eps):
    loc, scale, kind = _gaussian_params(d)
    if kind == "diag":
        return jnp.broadcast_to(loc + scale * eps, eps.shape)
    return loc + scale @ eps


def _float_dtype(x):
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def standard_normal(key, shape, dtype):
    """Standard normal draws made in float32 (half the random bits and a cheaper inverse
    transform than float64 draws) and cast to ``dtype``; 24-bit resolution is far below any
    Monte Carlo error of the particle engines."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def uniform(key, shape, dtype=jnp.float32):
    """Uniform(0, 1) draws from 32 random bits, cast to ``dtype``."""
    return jax.random.uniform(key, shape, jnp.float32).astype(dtype)


def sample_dist(key, d, num):
    """``num`` draws from one distribution (Gaussian families reparameterised, in the dtype of
    their parameters; others through ``d.sample``)."""
    params = _gaussian_params(d)
    if params is not None and d.batch_shape == ():
        loc = params[0]
        eps = standard_normal(key, (num,) + tuple(d.event_shape), _float_dtype(loc))
        return jax.vmap(lambda e: _reparam(d, e))(eps)
    return d.sample(key, (num,))


def sample_per_particle(key, dist_fn, z_prev):
    """z^i ~ dist_fn(z_prev^i) for every particle.

    Gaussian families (Normal, Independent(Normal), MultivariateNormal) are drawn as
    loc + scale * eps with one batched standard-normal draw (in the dtype of the particles);
    other families get one key per particle.
    """
    num = jax.tree_util.tree_leaves(z_prev)[0].shape[0]
    d0 = dist_fn(jax.tree_util.tree_map(lambda a: a[0], z_prev))
    if _gaussian_params(d0) is not None and d0.batch_shape == ():
        dtype = _float_dtype(jax.tree_util.tree_leaves(z_prev)[0])
        eps = standard_normal(key, (num,) + tuple(d0.event_shape), dtype)
        return jax.vmap(lambda zp, e: _reparam(dist_fn(zp), e).astype(dtype))(z_prev, eps)
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k, zp: dist_fn(zp).sample(k))(keys, z_prev)


def normalise(log_weights):
    """(normalised log-weights, log of their sum); NaN counts as -inf; all -inf stays finite."""
    lw = jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights)
    m = jnp.max(lw)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(lw - m_safe))
    log_sum = jnp.where(s > 0, jnp.log(s) + m_safe, -jnp.inf)
    num = lw.shape[0]
    normed = jnp.where(s > 0, lw - jnp.where(s > 0, jnp.log(s) + m_safe, 0.0), -math.log(num))
    return normed, log_sum


def ess(normed_log_weights):
    return 1.0 / jnp.sum(jnp.exp(2.0 * normed_log_weights))


def weighted_mean(normed_log_weights, values):
    w = jnp.exp(normed_log_weights)
    return jax.tree_util.tree_map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), values)


def weights_of(normed_log_weights):
    return jnp.exp(normed_log_weights)


def cumulative(weights):
    c = jnp.cumsum(weights)
    total = c[-1]
    c = c / jnp.where(total > 0, total, 1.0)
    return c.at[-1].set(1.0)


# ----------------------------------------------------------------------------------------------
# Argument checks (outside jit)
# ----------------------------------------------------------------------------------------------
def check_model(model):
    if not isinstance(model, SSM):
        raise ValueError(f"model: expected a probssm SSM, got {type(model).__name__}")


def state_shape(model, inputs_row):
    z = model.initial(inputs_row)
    return tuple(z.event_shape), z


def check_num_particles(num_particles, name="num_particles"):
    return checks.positive_int(num_particles, name, minimum=2)


def check_ess_threshold(ess_threshold):
    try:
        v = float(ess_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"ess_threshold: expected a number in (0, 1], got {ess_threshold!r}") from None
    if not (0.0 < v <= 1.0):
        raise ValueError(f"ess_threshold: expected a number in (0, 1], got {v}")
    return v


def check_resampling(resampling):
    from probssm.inference.smc.resampling import SCHEMES

    if resampling not in SCHEMES:
        raise ValueError(f"resampling: expected one of {sorted(SCHEMES)}, got {resampling!r}")
    return resampling


def prepare_emissions(model, emissions, inputs):
    """Emissions (T, D) or (B, T, D) and inputs (T, ...) or (B, T, ...); returns arrays and flags."""
    y = jnp.asarray(emissions)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim == 1:
        raise ValueError(f"emissions: expected shape (T, D) or (B, T, D), got shape {tuple(y.shape)}")
    if y.ndim not in (2, 3) or y.shape[-2] < 1:
        raise ValueError(f"emissions: expected shape (T, D) or (B, T, D), got shape {tuple(y.shape)}")
    batched = y.ndim == 3
    num_timesteps = y.shape[-2]
    batched_u = False
    if inputs is not None:
        leaves = jax.tree_util.tree_leaves(inputs)
        for leaf in leaves:
            shp = jnp.shape(leaf)
            if len(shp) >= 1 and shp[0] == num_timesteps:
                continue
            if batched and len(shp) >= 2 and shp[:2] == (y.shape[0], num_timesteps):
                batched_u = True
                continue
            raise ValueError(
                f"inputs: expected a leading time axis of length {num_timesteps} (or (B, T, ...) for a batch), "
                f"got shape {shp}"
            )
    # the emission distribution must accept one row of y
    u0 = row(inputs, 0) if not batched_u else row(row(inputs, 0), 0)
    shape, d0 = state_shape(model, u0)
    emis = model.emission(jnp.zeros(shape, y.dtype), 0, u0).event_shape
    if tuple(emis) != tuple(y.shape[-1:]):
        raise ValueError(f"emissions: expected shape (T, {tuple(emis)}) for this model's emission, "
                         f"got shape {tuple(y.shape)}")
    return y, inputs, batched, batched_u


def transition_log_bound(model, t, u):
    """The declared log bound of the transition density, or None when the model declares none."""
    if isinstance(model, AbstractBoundedTransitionSSM):
        return model.transition_log_bound(t, u)
    return None


def split_keys(key, num, batched):
    return jax.random.split(key, num) if batched else key
