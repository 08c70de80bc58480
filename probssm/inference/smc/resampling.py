"""Resampling schemes: draw N ancestor indices so that particle i gets N * w_i offspring in expectation.

All four schemes run in O(N) without a sort or a binary search on the systematic,
stratified and residual paths. Each scheme computes, for every particle i, the
number of the N ordered sampling points that fall below its cumulative weight
C_i (the inclusive cumulative offspring count n_i); the ancestors are then read
off by one scatter-add and one cumulative sum::

    n_i = #{k : u_k < C_i}                     (non-decreasing, n_{N-1} = N)
    ancestors[k] = #{i : n_i <= k}             (= hist(n) cumsummed)

The cumulative sums are normalised by their last entry, so float32 weights whose
running sum falls short of one (or exceeds it) still give n_{N-1} = N exactly.
Zero weights give no offspring. Weights need not be normalised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from probssm.core.scan import cumsum, cumulative_weights as cumulative

__all__ = ["systematic", "stratified", "multinomial", "residual", "resample", "SCHEMES", "ancestors_from_counts"]


def ancestors_from_counts(n, num_particles: int, weights=None):
    """ancestors[k] = #{i : n_i <= k} for cumulative counts n (N,) with n[-1] = N; returns (N,) int32.

    Also the guide table of an inverse-CDF draw: with n_i = ceil(N C_i), entry k is the first
    index whose cumulative weight exceeds k / N.

    With ``weights``, particles of weight zero get no offspring even when a parallel (tree-ordered)
    float32 cumulative sum is not exactly flat across them: their count is pinned to that of the
    last positive-weight particle before them (a running max, which also makes n non-decreasing),
    and every particle from the last positive one on gets N. That repair (a running max costs
    more than the rest of the resampling on CPU) runs only when it changes the result: when a
    zero-weight particle drew an offspring or the counts are not non-decreasing.
    """
    n = jnp.clip(n, 0, num_particles).astype(jnp.int32).at[-1].set(num_particles)
    if weights is None:
        return _read_counts(n, num_particles)
    a = _read_counts(n, num_particles)
    bad = jnp.any(weights[a] <= 0) | jnp.any(n[1:] < n[:-1])
    return jax.lax.cond(bad, lambda: _read_counts(_pin_zero_weights(n, weights, num_particles), num_particles),
                        lambda: a)


def _pin_zero_weights(n, weights, num_particles):
    idx = jnp.arange(num_particles)
    pos = weights > 0
    last = jnp.max(jnp.where(pos, idx, 0))
    n = jnp.where(idx >= last, num_particles, n)
    return jax.lax.cummax(jnp.where(pos | (idx >= last), n, 0))


def _read_counts(n, num_particles):
    n = n.at[-1].set(num_particles)
    hist = jnp.zeros(num_particles + 1, jnp.int32).at[n].add(1)
    return jnp.minimum(cumsum(hist[:num_particles]), num_particles - 1)


def systematic(key, weights):
    """Systematic resampling: points u_k = (k + U) / N with one uniform U.

    n_i = #{k : (k + U) < N C_i} = ceil(N C_i - U).
    """
    num = weights.shape[0]
    c = cumulative(weights, fast=True)  # zero-weight offspring are repaired below
    u = jax.random.uniform(key, (), dtype=c.dtype)
    n = jnp.ceil(num * c - u)
    return ancestors_from_counts(n, num, weights)


def stratified(key, weights):
    """Stratified resampling: points u_k = (k + U_k) / N with N independent uniforms.

    With x = N C_i and m = floor(x): all points k < m lie below x, point m lies
    below it when U_m < x - m, later points never do, so n_i = m + [U_m < x - m].
    """
    num = weights.shape[0]
    c = cumulative(weights, fast=True)  # zero-weight offspring are repaired below
    u = jax.random.uniform(key, (num,), dtype=c.dtype)
    x = num * c
    m = jnp.floor(x)
    mi = jnp.clip(m.astype(jnp.int32), 0, num - 1)
    n = m + (u[mi] < x - m)
    return ancestors_from_counts(n, num, weights)


def multinomial(key, weights):
    """Multinomial resampling: N independent draws from the weights.

    The sorted uniforms come from normalised cumulative exponential spacings (O(N),
    no sort); they are merged into the cumulative weights with one search. A float
    cumulative sum need not be exactly flat across a zero weight (neither ``jnp.cumsum``'s
    tree order nor the blocked sum guarantees it), so a draw that lands on a zero-weight
    particle is moved to the nearest positive-weight particle before it (after it, when there
    is none before); that repair runs only when such a draw occurs.
    """
    num = weights.shape[0]
    c = cumulative(weights, fast=True)
    e = jax.random.exponential(key, (num + 1,), dtype=c.dtype)
    s = cumsum(e)
    u = s[:-1] / s[-1]
    a = jnp.minimum(jnp.searchsorted(c, u, side="right"), num - 1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(weights[a] <= 0), lambda: _nearest_positive(weights)[a], lambda: a)


def _nearest_positive(weights):
    """For every index, itself when its weight is positive, else the last positive-weight index
    before it, else the first one after it."""
    idx = jnp.arange(weights.shape[0], dtype=jnp.int32)
    pos = weights > 0
    before = jax.lax.cummax(jnp.where(pos, idx, -1))
    return jnp.where(before >= 0, before, jnp.argmax(pos).astype(jnp.int32))


def residual(key, weights):
    """Residual resampling: floor(N w_i) copies of each particle, the R remaining slots
    drawn by stratified sampling on the residual weights N w_i - floor(N w_i).

    Expected offspring: floor(N w_i) + R * r_i / R = N w_i.
    """
    num = weights.shape[0]
    c = cumulative(weights, fast=True)  # zero-weight offspring are repaired below
    w = jnp.diff(c, prepend=jnp.zeros((1,), c.dtype))
    nw = num * jnp.clip(w, 0.0, None)
    copies = jnp.floor(nw)
    resid = nw - copies
    r = num - jnp.sum(copies)  # number of slots left, in [0, N)
    rc = cumsum(resid)
    rc = rc / jnp.where(rc[-1] > 0, rc[-1], 1.0)
    u = jax.random.uniform(key, (num,), dtype=c.dtype)
    x = r * rc
    m = jnp.floor(x)
    mi = jnp.clip(m.astype(jnp.int32), 0, num - 1)
    extra_cum = jnp.where(m < r, m + (u[mi] < x - m), r)  # inclusive cumulative extra offspring
    n = cumsum(copies) + extra_cum
    return ancestors_from_counts(jnp.round(n), num, weights)


SCHEMES = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


def resample(key, log_weights, scheme: str = "systematic"):
    """Ancestor indices (N,) int32 from unnormalised log-weights (all -inf: uniform)."""
    w = _weights(log_weights)
    return SCHEMES[scheme](key, w)


def _weights(log_weights):
    """exp(log w - max) with NaN as -inf; all -inf gives uniform weights (never NaN)."""
    lw = jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights)
    m = jnp.max(lw)
    w = jnp.exp(lw - jnp.where(jnp.isfinite(m), m, 0.0))
    return jnp.where(jnp.isfinite(m), w, jnp.ones_like(w))
