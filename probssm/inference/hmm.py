"""Exact inference for finite-state models (``ps.hmm``): forward-backward, Viterbi, posterior sampling.

Consumes any `AbstractDiscreteSSM` through its `discrete_params` (initial
probabilities pi, transition matrices A or A_t, per-step emission log-likelihoods).
The numerical work is in `probssm.inference.forward_backward`, whose traceable
single-sequence cores are re-exported here:

    filter_params(params, *, length=None, plausibility=None, parallel=False, chunk_size=None)
    smoother_params(params, *, length=None, plausibility=None, parallel=False, chunk_size=None)
    viterbi_params(params, *, length=None, plausibility=None)            # (T,) int
    sample_params(key, params, num_samples=1, *, length=None, plausibility=None)  # (S, T) int

The model-level functions below (`filter`, `smoother`, `viterbi`, `sample`) check
their arguments once, outside jit, read a batch with `probssm.core.batching.as_batch`
(one (T, D) sequence, a padded (B, T, D) batch with ``lengths``, or a list of
(T_b, D) arrays) and map the cores over it. `log_likelihood` and `posterior` do no
checks, for use inside the caller's jit (learners, samplers).

Missing data: NaN marks a missing value; how a partly missing row counts is the
emission family's (see `probssm.models.emissions`). Steps beyond a sequence's length
are skipped and their outputs are zero (-1 for Viterbi paths and samples).

Plausibilities (ARPHMM; Juesas et al.): ``plausibility`` pl (T, K) in [0, 1]
multiplies the emission likelihood of state k at step t; pl = 1 is the ordinary HMM.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probssm.core import checks
from probssm.core.batching import Batch, as_batch, check_input_dim, is_concatenated, split_concatenated
from probssm.core.protocol import AbstractDiscreteSSM
from probssm.inference.forward_backward import (
    TWO_LEVEL, FilterResult, SmootherResult, filter_params, sample_params, smoother_params, viterbi_params,
)

__all__ = ["FilterResult", "SmootherResult", "Posterior", "filter", "smoother", "viterbi", "sample",
           "log_likelihood", "posterior", "filter_params", "smoother_params", "viterbi_params", "sample_params",
           "prepare", "check_arguments", "check_lengths", "check_plausibility"]


class Posterior(NamedTuple):
    """Everything Baum-Welch needs from one sequence."""

    log_likelihood: jax.Array  # ()
    smoothed_probs: jax.Array  # (T, K), zero on padding
    transition_counts: jax.Array  # (K, K)


# ----------------------------------------------------------------------------------------------
# Traceable, no checks
# ----------------------------------------------------------------------------------------------
def posterior(model, emissions, inputs=None, length=None, plausibility=None, parallel=False,
              chunk_size=None) -> Posterior:
    """Traceable smoother for one (T, D) sequence (no checks): `Posterior` for EM.

    Equivalent to ``smoother_params(model.discrete_params(emissions, inputs), length=length, ...)``.
    """
    params = model.discrete_params(jnp.asarray(emissions), inputs)
    r = smoother_params(params, length=length, plausibility=plausibility, parallel=parallel,
                        chunk_size=chunk_size)
    return Posterior(r.log_likelihood, r.smoothed_probs, r.transition_counts)


def log_likelihood(model, emissions, *, inputs=None, lengths=None, plausibility=None, parallel: bool = False,
                   chunk_size: Optional[int] = None) -> jax.Array:
    """log p(y) for one sequence, summed over a batch; traceable (gradients, samplers, learners).

    Args as `filter`; no value checks (shapes are read as `as_batch` reads them): call it
    inside your own jit. Returns a scalar.
    """
    batch = as_batch(emissions, inputs, lengths)

    def one(y, u, n, pl):
        return filter_params(model.discrete_params(y, u), length=n, plausibility=pl, parallel=parallel,
                             chunk_size=chunk_size).log_likelihood

    return jnp.sum(batch.map(one, plausibility, extra_axes=(None if plausibility is None else 0,)))


# ----------------------------------------------------------------------------------------------
# Checks (once, outside jit)
# ----------------------------------------------------------------------------------------------
def check_lengths(lengths, num_timesteps: int, batch_size: Optional[int]):
    """Validate ``lengths`` against padded data; returns an int array or None."""
    if lengths is None:
        return None
    n = jnp.asarray(lengths)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        if checks.is_concrete(n) and bool(np.all(np.asarray(n) == np.round(np.asarray(n)))):
            n = n.astype(jnp.int32)
        else:
            raise ValueError(f"lengths: expected integers, got dtype {n.dtype}")
    expected = "()" if batch_size is None else f"({batch_size},)"
    if (batch_size is None and n.ndim != 0) or (batch_size is not None and n.shape != (batch_size,)):
        raise ValueError(f"lengths: expected shape {expected}, got shape {tuple(n.shape)}")
    if checks.is_concrete(n):
        a = np.asarray(n)
        if np.any(a > num_timesteps):
            raise ValueError(f"lengths: found a length of {int(a.max())}, longer than the data "
                             f"({num_timesteps} time steps)")
        if np.any(a < 1):
            raise ValueError(f"lengths: expected lengths >= 1, found {int(a.min())}")
    return n


def check_plausibility(plausibility, shape: tuple, dtype):
    """Validate a plausibility array of the given shape: finite, >= 0, no all-zero row."""
    if plausibility is None:
        return None
    pl = jnp.asarray(plausibility, dtype)
    doc = "(" + ", ".join(str(s) for s in shape) + ")"
    if pl.shape != tuple(shape):
        raise ValueError(f"plausibility: expected shape {doc}, got shape {tuple(pl.shape)}")
    if checks.is_concrete(pl):
        a = np.asarray(pl)
        if not np.all(np.isfinite(a)):
            raise ValueError("plausibility: expected finite values, found NaN or inf")
        if np.any(a < 0):
            raise ValueError(f"plausibility: expected values in [0, 1], found a negative value {a.min():.3g}")
        if np.any(np.all(a == 0, axis=-1)):
            raise ValueError("plausibility: every time step needs at least one state with positive plausibility")
    return pl


def _float_inputs(inputs, dtype):
    if inputs is None or isinstance(inputs, list):
        return inputs

    def conv(a):
        a = jnp.asarray(a)
        a = a[:, None] if a.ndim == 1 else a
        convert = jnp.issubdtype(a.dtype, jnp.integer) or jnp.issubdtype(a.dtype, jnp.bool_)
        return a.astype(dtype) if convert else a  # complex inputs are refused by as_batch

    return jax.tree_util.tree_map(conv, inputs)


def prepare(model, emissions, inputs=None, lengths=None, plausibility=None) -> tuple[Batch, Optional[jax.Array]]:
    """Validate arguments once, outside jit: returns ``(batch, plausibility)``.

    ``batch`` is a `probssm.core.batching.Batch` (emissions (T, D) or (B, T, D), inputs,
    lengths); plausibility is None, (T, K) or (B, T, K). Reads only declared members of
    the model: `num_states`, `emission_dim`, `num_timesteps`, `input_dim`, `check_emissions`.
    """
    if not isinstance(model, AbstractDiscreteSSM):
        raise ValueError(f"model: expected a discrete-state model (AbstractDiscreteSSM), got {type(model).__name__}")
    D = model.emission_dim
    if is_concatenated(emissions, lengths):
        # hmmlearn-style (sum(lengths), D) data: a (T_total, K) plausibility is split like the emissions
        if plausibility is not None and np.ndim(plausibility) == 2 and np.shape(plausibility)[0] == np.shape(
                emissions)[0]:
            plausibility = split_concatenated(plausibility, lengths, fill_value=1.0, name="plausibility")[0]
    elif lengths is not None and not isinstance(emissions, (list, tuple)):
        y = jnp.asarray(emissions)
        if y.ndim in (2, 3):
            lengths = check_lengths(lengths, y.shape[-2], y.shape[0] if y.ndim == 3 else None)
    batch = as_batch(emissions, _float_inputs(inputs, jnp.result_type(float)), lengths)
    ys = batch.emissions
    if ys.shape[-1] != D:
        raise ValueError(f"emissions: expected shape (T, {D}) or (B, T, {D}), got shape {tuple(ys.shape)}")
    T = batch.num_timesteps
    if checks.is_concrete(ys):
        a = np.array(ys)
        if np.any(np.isinf(a)):
            raise ValueError("emissions: found inf; use NaN to mark missing values")
        if batch.lengths is not None and checks.is_concrete(batch.lengths):
            pad = np.arange(T) >= np.asarray(batch.lengths)[..., None]  # (T,) or (B, T)
            a[pad] = np.nan
        model.check_emissions(a)
    if model.num_timesteps is not None and model.num_timesteps != T:
        raise ValueError(f"model: its time-varying transition matrix has length {model.num_timesteps}, expected {T} "
                         "(the number of time steps)")
    check_input_dim(batch, model.input_dim)
    lead = (batch.batch_size,) if batch.batched else ()
    pl = check_plausibility(plausibility, lead + (T, model.num_states), ys.dtype)
    # the model's own checks first: they name its parameters, not those of the chain it expands to
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())
    checks.once_per_model(model, ("discrete", T), lambda: check_params(model, batch))
    return batch, pl


@eqx.filter_jit
def _chain_params(model, emissions, inputs):
    # compiled once per model structure; the emission log-likelihoods are dead code here
    params = model.discrete_params(emissions, inputs)
    return params.initial_probs, params.transition_matrices


def check_params(model, batch: Batch) -> None:
    """Initial and transition probabilities of the first sequence, on concrete arrays only.

    Runs where inference starts, so models made by ``eqx.tree_at``, ``tree_map`` or
    ``ps.load`` are checked too (their constructors never ran)."""
    leaves = jax.tree_util.tree_leaves(model) + [batch.emissions]
    if not all(checks.is_concrete(a) for a in leaves if isinstance(a, jax.Array)):
        return
    first = (lambda a: a[0]) if batch.batched else (lambda a: a)
    inputs = batch.inputs
    if inputs is not None and batch.inputs_batched:
        inputs = jax.tree_util.tree_map(lambda a: a[0], inputs)
    initial_probs, A = _chain_params(model, first(batch.emissions), inputs)
    # K from the emission log-likelihoods (shapes only): a wrong-shaped initial_probs set by
    # eqx.tree_at must be blamed on itself, not on the transition matrix it disagrees with
    K = jax.eval_shape(model.discrete_params, first(batch.emissions), inputs).log_likelihoods.shape[-1]
    checks.shape(initial_probs, "initial_probs", (K,), f"({K},)")
    checks.probabilities(initial_probs, "initial_probs")
    checks.shape(A, "transition_matrix", A.shape[:-2] + (K, K), f"({K}, {K}) or (T, {K}, {K})")
    checks.probabilities(A, "transition_matrix")


def check_arguments(model, emissions, inputs=None, lengths=None) -> Batch:
    """`prepare` without plausibilities: the checked `Batch` (for learners such as `ps.learn.mle`)."""
    return prepare(model, emissions, inputs, lengths)[0]


def _chunk(chunk_size, parallel):
    if not parallel:
        return None
    if chunk_size is None:
        return TWO_LEVEL if jax.default_backend() == "cpu" else None
    return checks.positive_int(chunk_size, "chunk_size")


# ----------------------------------------------------------------------------------------------
# Jitted runners and the public functions
# ----------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("batched", "inputs_batched"))
def _discrete(model, ys, inputs, lengths, *, batched, inputs_batched):
    """Stage 1: the `DiscreteParams` of every sequence (a leading B axis for a batch)."""
    batch = Batch(ys, inputs, lengths, batched, inputs_batched)
    return batch.map(lambda y, u, n: model.discrete_params(y, u))


@partial(jax.jit, static_argnames=("mode", "parallel", "chunk_size", "batched"))
def _run(params, lengths, plausibility, *, mode, parallel, chunk_size, batched):
    """Stage 2: filter, smoother or Viterbi on the arrays of stage 1.

    Two compiled programs rather than one: measured on 2 CPU cores (K=10, D=5, T=1e5), XLA
    runs the emission log-likelihoods and the forward-backward about 25% faster as separate
    executables than fused into one (same results; the (T, K) log-likelihoods are
    materialised once either way)."""
    def one(p, n, pl):
        if mode == "filter":
            return filter_params(p, length=n, plausibility=pl, parallel=parallel, chunk_size=chunk_size)
        if mode == "smoother":
            return smoother_params(p, length=n, plausibility=pl, parallel=parallel, chunk_size=chunk_size)
        return viterbi_params(p, length=n, plausibility=pl)

    if not batched:
        return one(params, lengths, plausibility)
    return jax.vmap(one, in_axes=(0, None if lengths is None else 0, None if plausibility is None else 0))(
        params, lengths, plausibility)


@partial(jax.jit, static_argnames=("num_samples", "batched", "inputs_batched"))
def _run_sample(key, model, ys, inputs, lengths, plausibility, *, num_samples, batched, inputs_batched):
    def one(y, u, n, k, pl):
        return sample_params(k, model.discrete_params(y, u), num_samples, length=n, plausibility=pl)

    batch = Batch(ys, inputs, lengths, batched, inputs_batched)
    keys = jax.random.split(key, ys.shape[0]) if batched else key
    return batch.map(one, keys, plausibility, extra_axes=(0, None if plausibility is None else 0))


def _call(runner, model, batch: Batch, pl, **static):
    params = _discrete(model, batch.emissions, batch.inputs, batch.lengths, batched=batch.batched,
                       inputs_batched=batch.inputs_batched)
    return runner(params, batch.lengths, pl, batched=batch.batched, **static)


def filter(model, emissions, *, inputs=None, lengths=None, plausibility=None, parallel: bool = False,
           chunk_size: Optional[int] = None) -> FilterResult:
    """Forward pass: log p(y) and the filtered state probabilities p(z_t | y_{0:t}).

    Args:
        model: a discrete-state model (e.g. `ps.models.HMM`).
        emissions: (T, D), a padded batch (B, T, D) or a list of (T_b, D) arrays; NaN
            marks missing values.
        inputs: (T, U) shared, (B, T, U) per sequence, or a list; None: the model's
            `default_inputs` (lagged observations for autoregressive emissions).
        lengths: () or (B,) true lengths of padded sequences; steps beyond a sequence's
            length are ignored and their outputs are zero.
        plausibility: (T, K) or (B, T, K) non-negative weights on the emission likelihood
            (ARPHMM); None means 1.
        parallel: associative scan instead of the sequential scan.
        chunk_size: parallel only; length of the chunks scanned associatively (default: on CPU
            the two-level form, chunks of about sqrt(T) run in parallel; one associative chunk
            on accelerators).

    Returns:
        `FilterResult`: log_likelihood () and filtered_probs (T, K), with a leading B axis
        for a batch.

    Example:
        >>> f = ps.hmm.filter(hmm, y)
        >>> f.log_likelihood, f.filtered_probs.shape
    """
    batch, pl = prepare(model, emissions, inputs, lengths, plausibility)
    return _call(_run, model, batch, pl, mode="filter", parallel=bool(parallel),
                 chunk_size=_chunk(chunk_size, parallel))


def smoother(model, emissions, *, inputs=None, lengths=None, plausibility=None, parallel: bool = False,
             chunk_size: Optional[int] = None) -> SmootherResult:
    """Forward-backward: smoothed probabilities p(z_t | y) and expected transition counts.

    Same arguments as `filter`. Returns a `SmootherResult`: log_likelihood (),
    filtered_probs (T, K), smoothed_probs (T, K), transition_counts (K, K) with
    ``transition_counts[i, j]`` = sum_t p(z_{t-1} = i, z_t = j | y) (leading B axis for a batch).

    Example:
        >>> r = ps.hmm.smoother(hmm, y, parallel=True)
        >>> r.smoothed_probs.shape   # (T, K)
    """
    batch, pl = prepare(model, emissions, inputs, lengths, plausibility)
    return _call(_run, model, batch, pl, mode="smoother", parallel=bool(parallel),
                 chunk_size=_chunk(chunk_size, parallel))


def viterbi(model, emissions, *, inputs=None, lengths=None, plausibility=None) -> jax.Array:
    """Most likely state path argmax_z p(z | y) (max-product in log space).

    Returns:
        (T,) int states, or (B, T) for a batch (-1 beyond each sequence's length).
    """
    batch, pl = prepare(model, emissions, inputs, lengths, plausibility)
    return _call(_run, model, batch, pl, mode="viterbi", parallel=False, chunk_size=None)


def sample(key, model, emissions, num_samples: int = 1, *, inputs=None, lengths=None,
           plausibility=None) -> jax.Array:
    """Posterior state paths z ~ p(z | y) by forward-filter backward-sample.

    Returns:
        (num_samples, T) int states, or (B, num_samples, T) for a batch (-1 on padding).
    """
    num_samples = checks.positive_int(num_samples, "num_samples")
    batch, pl = prepare(model, emissions, inputs, lengths, plausibility)
    return _run_sample(key, model, batch.emissions, batch.inputs, batch.lengths, pl, num_samples=num_samples,
                       batched=batch.batched, inputs_batched=batch.inputs_batched)
