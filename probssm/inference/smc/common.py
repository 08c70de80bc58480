"""Shared pieces of the particle engines (internal but public: stable names, no underscore).

Per-particle evaluation of the model protocol, fast reparameterised draws, weight
arithmetic, the preparation of one sequence (default inputs, padding) and the argument
checks the public engines run before compiling. Other modules of probssm import these
names; users rarely need them.

Conventions every engine shares:

* A time step whose observation y_t holds a NaN anywhere (a partly missing row included)
  is missing: every particle gets weight one.
* For a model that reads its lagged observations as inputs (``model.emission_lags > 0``)
  a step whose input row holds a NaN (the first P steps, whose lags precede the data) is
  missing too, as in the exact engines.
* Steps at and beyond a sequence's ``length`` (the padding of a ragged batch) are missing;
  the log-likelihood estimate is then that of the first ``length`` steps (statistically
  exact), and filtered quantities there are predictions.
* The single-sequence cores (``*_sequence``) check only the model: its parameter values when
  they are concrete (a model made by ``eqx.tree_at`` with a bad value raises a ValueError
  naming the field). Under the caller's jit / vmap, where they are traced, that check is
  skipped. The data are not checked there.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.custom_batching import custom_vmap
from jax.extend.random import threefry2x32_p

from probssm.core import checks
from probssm.core.batching import Batch, as_batch
from probssm.core.bounded import AbstractBoundedTransitionSSM
from probssm.core.protocol import SSM
from probssm.core.scan import cumulative_weights

__all__ = [
    "row", "observation", "log_prob_of", "emission_log_prob", "transition_log_prob", "gaussian_params", "sample_dist",
    "sample_per_particle", "BitKey", "bit_keys", "jax_key", "random_bits", "standard_normal", "uniform",
    "normalise", "normalise_weights", "normalise_with_ess", "ess", "weighted_mean", "weighted_sum", "weights_of",
    "cumulative", "state_struct", "first_input_row", "prepare_sequence", "mask_padding", "rest",
    "check_model", "check_num_particles", "check_ess_threshold", "check_resampling", "prepare",
    "transition_log_bound", "is_bounded", "sequence_keys", "first_sequence", "pad_proposal",
]

LOG_EPS = -jnp.inf


def row(inputs, t):
    """Row ``t`` of an input pytree (None stays None)."""
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[t], inputs)


def rest(inputs):
    """Rows 1.. of an input pytree (None stays None)."""
    return None if inputs is None else jax.tree_util.tree_map(lambda a: a[1:], inputs)


def observation(y):
    """(y with NaN set to 0, whether y_t is observed). A partly missing y_t counts as missing."""
    missing = jnp.any(jnp.isnan(y))
    return jnp.where(jnp.isnan(y), 0.0, y), ~missing


def log_prob_of(d, value):
    """``d.log_prob(value)`` with a float observation cast to integers when ``d`` is discrete
    (categorical labels index arrays; emissions are floats so that NaN can mark missing).

    A Normal or Independent(Normal) of one state (no batch shape) is evaluated here as
    -((v - loc) / scale)^2 / 2 - log(scale) - log(2 pi) / 2 summed over its event, which lets XLA
    cancel log(exp(.)) when the scale is an exponential (numpyro's form, log(sqrt(2 pi) scale),
    costs an extra exp and log per particle)."""
    if d.is_discrete and jnp.issubdtype(jnp.result_type(value), jnp.floating):
        value = jnp.round(value).astype(jnp.int32)
    params = gaussian_params(d)
    if params is not None and params[2] == "diag" and d.batch_shape == ():
        loc, scale, _ = params
        shape = tuple(d.event_shape)
        v = jnp.asarray(value)
        if tuple(v.shape) == shape:
            r = (v - loc) / scale
            lp = -0.5 * (r * r) - jnp.log(scale) - 0.5 * math.log(2.0 * math.pi)
            return jnp.sum(jnp.broadcast_to(lp, shape))
    return d.log_prob(value)


def emission_log_prob(model, z, t, y, u):
    """log g(y_t | z_t^i) for every particle; 0 (weight one) when y_t is missing."""
    y_safe, observed = observation(y)
    lg = jax.vmap(lambda zi: log_prob_of(model.emission(zi, t, u), y_safe))(z)
    return jnp.where(observed, lg, 0.0)


def transition_log_prob(model, z_prev, z, t, u):
    """log p(z[i] | z_prev[i]) elementwise over a leading axis."""
    return jax.vmap(lambda zp, zi: log_prob_of(model.transition(zp, t, u), zi))(z_prev, z)


def gaussian_params(d):
    """(loc, scale, kind) of a Gaussian numpyro distribution, or None for other families."""
    if isinstance(d, dist.Independent) and isinstance(d.base_dist, dist.Normal):
        return d.base_dist.loc, d.base_dist.scale, "diag"
    if isinstance(d, dist.Normal):
        return d.loc, d.scale, "diag"
    if isinstance(d, dist.MultivariateNormal):
        return d.loc, d.scale_tril, "tril"
    return None


def _reparam(d, eps):
    loc, scale, kind = gaussian_params(d)
    if kind == "diag":
        return jnp.broadcast_to(loc + scale * eps, eps.shape)
    return loc + scale @ eps


def _float_dtype(x):
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


class BitKey(NamedTuple):
    """A generator state for `random_bits` (``state`` u32[..., 4]), drawn ahead from a `jax.random`
    key by `bit_keys` so that a scan over time steps does not derive one per step."""

    state: jax.Array


def bit_keys(keys) -> BitKey:
    """`BitKey` states for a stack of `jax.random` keys (leading axis), drawn in one call."""
    return BitKey(jax.vmap(_key_state)(keys))


def jax_key(key):
    """A `jax.random` key for the paths that sample through numpyro: ``key`` itself, or one made
    from a `BitKey`'s state (its words mixed, so it is not the bit stream's own key)."""
    if isinstance(key, BitKey):
        s = key.state
        return jnp.stack([s[0] ^ s[2], s[1] ^ s[3]])
    return key


def _key_state(key):
    """A 128-bit generator state (u32[4]) drawn from a `jax.random` key (raw or typed)."""
    return jax.random.bits(key, (4,), jnp.uint32)


def _threefry_words(state, size: int):
    """The words of XLA's RNG_THREE_FRY bit generator at ``state`` computed with jax's own
    Threefry-2x32 primitive (vectorises under vmap): key (state[0], state[1]), 64-bit counter
    (state[3] state[2]) + i, the two output words of counter i at positions 2i and 2i + 1."""
    half = (size + 1) // 2
    lo = state[2] + lax.iota(jnp.uint32, half)
    hi = state[3] + (lo < state[2]).astype(jnp.uint32)  # carry into the counter's high word
    x0, x1 = threefry2x32_p.bind(state[0], state[1], lo, hi)
    return jnp.stack([x0, x1], axis=1).reshape(-1)[:size]


def _bits_from_state(state, size: int):
    """``size`` uint32 words of XLA's Threefry-2x32 bit generator started at ``state`` (u32[4]).

    Alone, XLA's generator (`lax.rng_bit_generator`, about twice as fast as `jax.random.bits` on
    CPU); under vmap the same words from `_threefry_words`, vectorised over the batch (XLA's own
    batching rule would draw the whole batch from the first state)."""

    @custom_vmap
    def gen(st):
        _, bits = lax.rng_bit_generator(st, (size,), jnp.uint32, algorithm=lax.RandomAlgorithm.RNG_THREE_FRY)
        return bits

    @gen.def_vmap
    def _batched(axis_size, in_batched, st):
        if not in_batched[0]:
            return gen(st), False
        return jax.vmap(lambda one: _threefry_words(one, size))(st), True

    return gen(state)


def random_bits(key, shape):
    """uint32 random words of the given shape from a `jax.random` key.

    The words come from XLA's Threefry-2x32 bit generator (`lax.rng_bit_generator`, the same
    20-round counter-based hash as `jax.random`'s default), started at a 128-bit state drawn from
    ``key`` (or given, as a `BitKey`); on CPU it runs about twice as fast as `jax.random.bits`. One
    key gives the same words batched (vmap) or alone; different keys give independent streams."""
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    if size == 0:
        return jnp.zeros(shape, jnp.uint32)
    state = key.state if isinstance(key, BitKey) else _key_state(key)
    return _bits_from_state(state, size).reshape(shape)


def _unit_interval(bits):
    """float32 in [0, 1) from the top 23 bits of uint32 words (mantissa fill)."""
    return lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - jnp.float32(1.0)


_SYM_LOW = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))


def standard_normal(key, shape, dtype):
    """Standard normal draws made in float32 (one 32-bit word each, inverse-erf transform) and
    cast to ``dtype``; 24-bit resolution is far below any Monte Carlo error of the particle
    engines."""
    u = jnp.maximum(_unit_interval(random_bits(key, shape)) * jnp.float32(2.0) - jnp.float32(1.0),
                    jnp.float32(_SYM_LOW))  # in (-1, 1)
    return (jnp.float32(math.sqrt(2.0)) * lax.erf_inv(u)).astype(dtype)


def uniform(key, shape, dtype=jnp.float32):
    """Uniform [0, 1) draws from 32 random bits (23-bit resolution), cast to ``dtype``."""
    return _unit_interval(random_bits(key, shape)).astype(dtype)


def sample_dist(key, d, num):
    """``num`` draws from one distribution (Gaussian families reparameterised, in the dtype of
    their parameters; others through ``d.sample``)."""
    params = gaussian_params(d)
    if params is not None and d.batch_shape == ():
        loc = params[0]
        eps = standard_normal(key, (num,) + tuple(d.event_shape), _float_dtype(loc))
        return jax.vmap(lambda e: _reparam(d, e))(eps)
    return d.sample(jax_key(key), (num,))


def sample_per_particle(key, dist_fn, z_prev):
    """z^i ~ dist_fn(z_prev^i) for every particle.

    Gaussian families (Normal, Independent(Normal), MultivariateNormal) are drawn as
    loc + scale * eps with one batched standard-normal draw (in the dtype of the particles);
    other families (e.g. the categorical state of an HMM) get one key per particle.
    """
    num = jax.tree_util.tree_leaves(z_prev)[0].shape[0]
    d0 = dist_fn(jax.tree_util.tree_map(lambda a: a[0], z_prev))
    if gaussian_params(d0) is not None and d0.batch_shape == ():
        dtype = _float_dtype(jax.tree_util.tree_leaves(z_prev)[0])
        eps = standard_normal(key, (num,) + tuple(d0.event_shape), dtype)
        return jax.vmap(lambda zp, e: _reparam(dist_fn(zp), e).astype(dtype))(z_prev, eps)
    keys = jax.random.split(jax_key(key), num)
    return jax.vmap(lambda k, zp: dist_fn(zp).sample(k))(keys, z_prev)


def normalise(log_weights):
    """(normalised log-weights, log of their sum); NaN counts as -inf; all -inf stays finite."""
    normed, log_sum, _ = normalise_weights(log_weights)
    return normed, log_sum


def normalise_weights(log_weights):
    """(normalised log-weights, log of their sum, normalised weights W) with one exp pass, in the
    log-weights' dtype (float32 exponentials were tried: they leave the normalised log-weights off
    by 1e-8 in float64). NaN counts as -inf; all -inf gives uniform weights and a log-sum of -inf
    (never NaN)."""
    normed, log_sum, w, _ = normalise_with_ess(log_weights)
    return normed, log_sum, w


def normalise_with_ess(log_weights):
    """`normalise_weights` and the ESS 1 / sum W^2 = (sum e)^2 / sum e^2.

    The two sums are two plain reductions: XLA's CPU backend vectorises those but not a variadic
    reduction, which cost twice as much for this whole function (83 against 45 ms per 1000 calls
    at N = 1e4, 9.0 against 6.1 ms at N = 1e3)."""
    lw = jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights)
    m = jnp.max(lw)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(lw - m_safe)
    s = jnp.sum(e)
    q = jnp.sum(e * e)
    ok = s > 0
    log_s = jnp.log(jnp.where(ok, s, 1.0))
    log_sum = jnp.where(ok, log_s + m_safe, -jnp.inf)
    num = lw.shape[0]
    normed = jnp.where(ok, lw - (log_s + m_safe), -math.log(num))
    w = jnp.where(ok, e * (1.0 / jnp.where(ok, s, 1.0)), 1.0 / num)
    ess = jnp.where(ok, s * s / jnp.where(ok, q, 1.0), float(num))
    return normed, log_sum, w, ess


def ess(normed_log_weights):
    """Effective sample size 1 / sum_i W_i^2 of normalised log-weights (N,)."""
    return 1.0 / jnp.sum(jnp.exp(2.0 * normed_log_weights))


def weighted_mean(normed_log_weights, values):
    """sum_i W_i values_i over the leading axis; integer values (a discrete state) are averaged
    in the weights' floating dtype."""
    return weighted_sum(jnp.exp(normed_log_weights), values)


def weighted_sum(weights, values):
    """sum_i w_i values_i over the leading axis of every leaf of ``values`` (weights (N,), e.g. the
    normalised weights of `normalise_weights`); integer values are summed in the weights' dtype.

    A state of a few entries is summed one entry at a time as full reductions (on CPU a reduction
    over the leading axis of an (N, 1) array, or a (N,) x (N, d) dot, costs several times more)."""
    def one(v):
        dt = v.dtype if jnp.issubdtype(v.dtype, jnp.inexact) else weights.dtype
        w = weights.astype(dt)
        flat = v.astype(dt).reshape((v.shape[0], -1))
        m = flat.shape[1]
        if m <= 8:
            out = jnp.stack([jnp.sum(w * flat[:, j]) for j in range(m)]) if m else jnp.zeros((0,), dt)
        else:
            out = jnp.dot(w, flat)
        return out.reshape(v.shape[1:])

    return jax.tree_util.tree_map(one, values)


def weights_of(normed_log_weights):
    return jnp.exp(normed_log_weights)


cumulative = cumulative_weights


# ----------------------------------------------------------------------------------------------
# One sequence: inputs, padding (traceable)
# ----------------------------------------------------------------------------------------------
def first_input_row(model, inputs):
    """The input row at t = 0 for shape probing: row 0 of ``inputs``, zeros of the declared
    width for an autoregressive model given none, else None."""
    if inputs is not None:
        return row(inputs, 0)
    if model.emission_lags and isinstance(model.input_dim, int):
        return jnp.zeros((model.input_dim,), jnp.result_type(float))
    return None


def state_struct(model, inputs_row=None) -> jax.ShapeDtypeStruct:
    """Shape and dtype of one state z_t, read from a draw of the model's own ``initial``
    distribution (abstractly: nothing is computed). An HMM's state is an integer scalar."""
    return jax.eval_shape(lambda k: model.initial(inputs_row).sample(k), jax.random.key(0))


def mask_padding(emissions, length):
    """Emissions (T, ...) with the rows at and beyond ``length`` set to NaN (missing)."""
    if length is None:
        return emissions
    keep = jnp.arange(emissions.shape[0]) < length
    return jnp.where(keep.reshape((-1,) + (1,) * (emissions.ndim - 1)), emissions, jnp.nan)


def prepare_sequence(model, emissions, inputs=None, length=None):
    """(emissions, inputs) of one sequence as the particle cores use them (traceable).

    * inputs None: the model's `default_inputs` (lagged observations for an autoregressive
      model, else None);
    * autoregressive model (``emission_lags > 0``): a step whose input row holds a NaN is
      marked missing (its y_t set to NaN) and the NaN inputs are set to zero;
    * rows at and beyond ``length`` are missing.
    """
    y = jnp.asarray(emissions)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if inputs is None:
        inputs = model.default_inputs(y)
    if model.emission_lags and inputs is not None:
        leaves = jax.tree_util.tree_leaves(inputs)
        bad = jnp.zeros((y.shape[0],), bool)
        for a in leaves:
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
                bad = bad | jnp.any(jnp.isnan(jnp.reshape(a, (a.shape[0], -1))), axis=1)
        y = jnp.where(bad.reshape((-1,) + (1,) * (y.ndim - 1)), jnp.nan, y)
        inputs = jax.tree_util.tree_map(
            lambda a: jnp.where(jnp.isnan(a), 0.0, a) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a,
            inputs)
    return mask_padding(y, length), inputs


def first_sequence(model, batch: Batch):
    """(emissions (T, D), inputs) of the first sequence of a batch, prepared as the cores see
    them (default inputs filled in); for the argument checks of the public functions."""
    y = batch.emissions[0] if batch.batched else batch.emissions
    u = row(batch.inputs, 0) if batch.inputs_batched else batch.inputs
    n = None if batch.lengths is None else (batch.lengths[0] if batch.batched else batch.lengths)
    return prepare_sequence(model, y, u, n)


def pad_proposal(proposal, length):
    """A proposal (or auxiliary function) that sees y_t = 0 instead of the NaN padding at steps
    t >= ``length``: a finite proposal there, corrected by the weights like any other. ``proposal``
    or ``length`` None returns it unchanged."""
    if proposal is None or length is None:
        return proposal

    def padded(z_prev, t, y, u):
        return proposal(z_prev, t, jnp.where(t < length, y, jnp.zeros_like(y)), u)

    return padded


def sequence_keys(key, batch: Batch):
    """The key of each sequence: ``key`` itself for one sequence, split(key, B) for a batch."""
    return jax.random.split(key, batch.batch_size) if batch.batched else key


# ----------------------------------------------------------------------------------------------
# Argument checks (outside jit, at the public functions)
# ----------------------------------------------------------------------------------------------
def check_model(model):
    if not isinstance(model, SSM):
        raise ValueError(f"model: expected a probssm SSM, got {type(model).__name__}")
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())


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


def prepare(model, emissions, inputs=None, lengths=None, *, single: bool = False) -> Batch:
    """Read emissions (T, D), (B, T, D) or a list of (T_b, D) arrays (with inputs and lengths)
    through `probssm.core.batching.as_batch`, and check them against the model: no +-inf
    (on concrete arrays: NaN, not inf, marks a missing value, as in the exact engines); the emission
    distribution of a state (shaped and typed as a draw of ``model.initial``) must have the
    event shape of one row of y. ``single``: refuse a batch."""
    batch = as_batch(emissions, inputs, lengths)
    if checks.is_concrete(batch.emissions) and bool(np.isinf(np.asarray(batch.emissions)).any()):
        raise ValueError("emissions: found inf; use NaN to mark missing values")
    if single and batch.batched:
        raise ValueError(f"emissions: expected one sequence (T, D), got shape {tuple(batch.emissions.shape)}")
    u = batch.inputs
    if batch.inputs_batched:
        u = row(u, 0)
    u0 = first_input_row(model, u)
    z = state_struct(model, u0)
    emis = model.emission(jnp.zeros(z.shape, z.dtype), 0, u0).event_shape
    if tuple(emis) != tuple(batch.emissions.shape[-1:]):
        raise ValueError(f"emissions: expected shape (T, {', '.join(map(str, emis))}) for this model's emission "
                         f"(or a batch of them), got shape {tuple(batch.emissions.shape)}")
    return batch


def is_bounded(model) -> bool:
    """Whether the model declares a transition bound (`AbstractBoundedTransitionSSM`)."""
    return isinstance(model, AbstractBoundedTransitionSSM)


def transition_log_bound(model, t, u):
    """The declared log bound of the transition density, or None when the model declares none."""
    if is_bounded(model):
        return model.transition_log_bound(t, u)
    return None
