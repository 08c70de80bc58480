"""Amortised (zero-shot) rate estimation for Markov jump processes, after the foundation inference
model of Berghaus et al. (NeurIPS 2024, arXiv 2406.06419): a network trained once on synthetic
processes maps a set of noisy, irregularly observed paths to the generator and the initial
distribution in one forward pass, with no per-dataset optimisation.

    est = ps.ctmc.AmortizedRateEstimator.pretrained()
    fit = est(times, labels, lengths=lengths, num_states=6)   # fit.generator (6, 6), fit.initial_probs (6,)

Architecture (equivariant under relabelling the states, invariant to the order of the paths, for
any number of states K):

* Summary statistics of the data, pooled over paths and intervals (a DeepSets-style sum, so the
  number of paths is free): for every ordered pair (i, j) and every bin b of interval lengths dt,
  the count ``C[i, j, b]`` of observation intervals going from label i to label j, and per state
  the summed interval length ``D[i, b]`` of the intervals starting in i. Since
  ``P(dt) = I + Q dt + O(dt^2)``, ``C[i, j, b] / D[i, b]`` is a crude rate estimate; the network
  learns the corrections for long intervals (several jumps) and for label noise (spurious
  transitions over the shortest intervals).
* Edge features (frequencies, crude rates, counts, and the slope and intercept of a weighted
  least-squares line of the frequency against dt: rate and mislabelling) for (i, j) and (j, i), node features (stay
  frequencies, occupancy, first labels) of i and j, and their means over rows and columns, go
  through a shared MLP per edge, then one round of message passing (means over the row, column
  and all edges), and a linear head gives ``log f_ij`` as a correction to the log crude rate.
* The initial distribution is a softmax over the states of a per-node head.

The weights are plain arrays (a tuple of ``(W, b)`` pairs per MLP), so `ps.save` / `ps.load` store
them as .npz + JSON; `AmortizedRateEstimator.pretrained` loads the ones shipped with probssm,
trained by ``examples/mjp_amortized.py``.
"""
from __future__ import annotations

import os
from functools import partial
from typing import NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probssm.core import checks
from probssm.io import load

__all__ = ["AmortizedEstimate", "AmortizedRateEstimator", "interval_statistics"]

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ctmc_weights", "mjp_amortized")
# Interval-length bins (upper edges; the last bin is open): log-spaced over the grids of training.
DT_EDGES = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
# Offset of the crude rate in the log-rate baseline, so that an unseen transition has a finite log.
_RATE_FLOOR = 0.05


class AmortizedEstimate(NamedTuple):
    """Output of `AmortizedRateEstimator`.

    Attributes:
        generator: (K, K) rate matrix (off-diagonal rates > 0, rows summing to zero).
        initial_probs: (K,) law of the state at the first observation time.
    """

    generator: jax.Array
    initial_probs: jax.Array


class IntervalStatistics(NamedTuple):
    counts: jax.Array  # (K, K, B) transitions i -> j over intervals in dt bin b
    durations: jax.Array  # (K, B) summed lengths of the intervals starting in i, per bin
    first: jax.Array  # (K,) counts of the first label
    occupancy: jax.Array  # (K,) counts of all labels


def interval_statistics(times, labels, mask, num_states: int, dt_edges=DT_EDGES) -> IntervalStatistics:
    """Pooled transition statistics of observed paths (traceable; no checks).

    Args:
        times: (N, T) observation times, non-decreasing along each row.
        labels: (N, T) integer labels in 0..K-1 where ``mask`` is true (anything elsewhere).
        mask: (N, T) boolean, true at the real (not padded) observations.
        num_states: K.
        dt_edges: upper edges of the interval-length bins (the last bin is open).

    Returns:
        IntervalStatistics: transition counts (K, K, B) per dt bin, summed interval lengths (K, B),
        first-label counts (K,) and label counts (K,).
    """
    K, B = int(num_states), len(dt_edges) + 1
    times = jnp.asarray(times)
    labels = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, K - 1)
    dt = jnp.diff(times, axis=-1)
    valid = (mask[:, 1:] & mask[:, :-1]).astype(times.dtype)
    b = jnp.searchsorted(jnp.asarray(dt_edges, times.dtype), dt, side="right")
    a, c = labels[:, :-1], labels[:, 1:]
    counts = jnp.zeros(K * K * B, times.dtype).at[((a * K + c) * B + b).ravel()].add(valid.ravel())
    durations = jnp.zeros(K * B, times.dtype).at[(a * B + b).ravel()].add((valid * dt).ravel())
    m = mask.astype(times.dtype)
    first = jnp.zeros(K, times.dtype).at[labels[:, 0]].add(m[:, 0])
    occupancy = jnp.zeros(K, times.dtype).at[labels.ravel()].add(m.ravel())
    return IntervalStatistics(counts.reshape(K, K, B), durations.reshape(K, B), first, occupancy)


def _mlp(layers, x):
    for W, b in layers[:-1]:
        x = jax.nn.silu(x @ W + b)
    W, b = layers[-1]
    return x @ W + b


def _init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple((jax.random.normal(k, (m, n)) * np.sqrt(1.0 / m), jnp.zeros(n))
                 for k, m, n in zip(keys, sizes[:-1], sizes[1:]))


def _offdiag_mean(h, axis):
    """Mean over the off-diagonal entries of a (K, K, H) array along ``axis`` (0: column, 1: row)."""
    K = h.shape[0]
    off = (1.0 - jnp.eye(K, dtype=h.dtype))[:, :, None]
    return jnp.sum(h * off, axis=axis) / max(K - 1, 1)


def _features(stats: IntervalStatistics):
    """Edge (K, K, F) and node (K, G) features of the pooled statistics."""
    C, D = stats.counts, stats.durations
    K, _, B = C.shape
    R = jnp.sum(C, axis=1)  # (K, B) intervals starting in i per bin
    freq = C / jnp.maximum(R, 1.0)[:, None, :]
    crude = C / jnp.maximum(D, 1e-3)[:, None, :]  # per-bin crude rates (zero where no data)
    pooled = jnp.sum(C, -1) / jnp.maximum(jnp.sum(D, -1), 1e-3)[:, None]  # (K, K)
    # small-dt pooled rate: the first half of the bins, where P(dt) ~ I + Q dt holds best
    h = B // 2
    pooled_small = jnp.sum(C[..., :h], -1) / jnp.maximum(jnp.sum(D[:, :h], -1), 1e-3)[:, None]
    conf = jnp.log1p(R)  # (K, B)
    # Weighted least squares of the transition frequency on the interval length over the bins: the
    # slope estimates the rate, the intercept at dt = 0 the mislabelling probability.
    mdt = D / jnp.maximum(R, 1.0)  # (K, B) mean interval length per bin
    sw = jnp.maximum(jnp.sum(R, -1), 1.0)[:, None]
    mx = (jnp.sum(D, -1)[:, None] / sw)
    my = jnp.sum(C, -1) / sw
    var = jnp.sum(D * mdt, -1)[:, None] / sw - mx ** 2
    cov = jnp.sum(C * mdt[:, None, :], -1) / sw - mx * my
    slope = cov / (var + 1e-4)
    intercept = my - slope * mx
    edge = jnp.concatenate([freq, jnp.log1p(crude), jnp.log1p(pooled)[..., None], jnp.log1p(pooled_small)[..., None],
                            jnp.log(jnp.sum(C, -1) + 1.0)[..., None], jnp.arcsinh(slope)[..., None],
                            jnp.clip(intercept, -1.0, 1.0)[..., None]], axis=-1)
    eye = jnp.eye(K, dtype=C.dtype)
    stay = jnp.einsum("iib->ib", freq)
    total = jnp.maximum(jnp.sum(stats.occupancy), 1.0)
    node = jnp.concatenate([stay, conf, jnp.log1p(jnp.sum(pooled * (1 - eye), -1))[:, None],
                            (K * stats.occupancy / total)[:, None],
                            (K * stats.first / jnp.maximum(jnp.sum(stats.first), 1.0))[:, None]], axis=-1)
    return edge, node, pooled


def _forward(net, stats: IntervalStatistics):
    edge, node, pooled = _features(stats)
    K = edge.shape[0]
    ni, nj = jnp.broadcast_arrays(node[:, None, :], node[None, :, :])
    x = jnp.concatenate([edge, jnp.swapaxes(edge, 0, 1), ni, nj,
                         jnp.broadcast_to(_offdiag_mean(edge, 1)[:, None, :], edge.shape),
                         jnp.broadcast_to(_offdiag_mean(edge, 0)[None, :, :], edge.shape)], axis=-1)
    h = jax.nn.silu(_mlp(net.edge_mlp, x))
    off = 1.0 - jnp.eye(K, dtype=h.dtype)
    glob = jnp.sum(h * off[..., None], axis=(0, 1)) / max(K * (K - 1), 1)
    row, col = _offdiag_mean(h, 1), _offdiag_mean(h, 0)  # (K, H): over j of h_ij, over i of h_ij
    y = jnp.concatenate([h, jnp.swapaxes(h, 0, 1), jnp.broadcast_to(row[:, None], h.shape),
                         jnp.broadcast_to(col[None, :], h.shape), jnp.broadcast_to(col[:, None], h.shape),
                         jnp.broadcast_to(row[None, :], h.shape), jnp.broadcast_to(glob, h.shape)], axis=-1)
    h2 = jax.nn.silu(_mlp(net.message_mlp, y)) + h
    log_rates = jnp.log(pooled + _RATE_FLOOR) + _mlp(net.rate_head, h2)[..., 0]
    rates = jnp.exp(jnp.clip(log_rates, -12.0, 8.0)) * off
    Q = rates - jnp.diag(jnp.sum(rates, -1))
    row2, col2 = _offdiag_mean(h2, 1), _offdiag_mean(h2, 0)
    glob2 = jnp.broadcast_to(jnp.sum(h2 * off[..., None], axis=(0, 1)) / max(K * (K - 1), 1), row2.shape)
    logits = _mlp(net.initial_head, jnp.concatenate([node, row2, col2, glob2], -1))[:, 0]
    logits = logits + jnp.log(stats.first + 0.5)  # the empirical first-label law as baseline
    return AmortizedEstimate(Q, jax.nn.softmax(logits))


def _num_features(num_bins):
    edge = 2 * num_bins + 5
    node = 2 * num_bins + 3
    return edge, node


def _check_inputs(times, labels, lengths, num_states):
    """Shapes, dtypes and (on concrete arrays) values of the public call; returns arrays and K."""
    y = jnp.asarray(labels)
    if y.ndim == 1:
        y = y[None]
    if y.ndim != 2 or y.shape[1] < 2:
        raise ValueError(f"labels: expected shape (N, T) with T >= 2 observations per path, got shape "
                         f"{tuple(jnp.shape(labels))}")
    if not (jnp.issubdtype(y.dtype, jnp.integer) or jnp.issubdtype(y.dtype, jnp.floating)):
        raise ValueError(f"labels: expected integer state labels, got dtype {y.dtype}")
    N, T = y.shape
    t = jnp.asarray(times)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if t.ndim == 1:
        if t.shape[0] != T:
            raise ValueError(f"times: expected shape ({T},) (a grid shared by the paths) or ({N}, {T}) like "
                             f"labels, got shape {tuple(t.shape)}")
        t = jnp.broadcast_to(t, (N, T))
    elif t.shape != (N, T):
        raise ValueError(f"times: expected shape ({N}, {T}) like labels (or ({T},)), got shape {tuple(t.shape)}")
    if lengths is None:
        n = jnp.full((N,), T, jnp.int32)
    else:
        n = jnp.asarray(lengths)
        if n.shape != (N,) or not jnp.issubdtype(n.dtype, jnp.integer):
            raise ValueError(f"lengths: expected an integer array of shape ({N},), got shape {tuple(n.shape)} "
                             f"and dtype {n.dtype}")
        if checks.is_concrete(n):
            a = np.asarray(n)
            if np.any(a < 1) or np.any(a > T):
                raise ValueError(f"lengths: expected values in 1..{T}, got min {a.min()} and max {a.max()}")
    mask = jnp.arange(T)[None, :] < n[:, None]
    if num_states is None:
        if not (checks.is_concrete(y) and checks.is_concrete(n)):
            raise ValueError("num_states: required when labels are traced (inside jit or vmap)")
        num_states = int(np.max(np.where(np.asarray(mask), np.asarray(y), 0))) + 1
        num_states = max(num_states, 2)
    K = checks.positive_int(num_states, "num_states", minimum=2)
    if checks.is_concrete(y) and checks.is_concrete(n):
        a, m = np.asarray(y), np.asarray(mask)
        if np.any(a[m] != np.round(a[m])) or np.any(a[m] < 0) or np.any(a[m] > K - 1):
            raise ValueError(f"labels: expected integer labels in 0..{K - 1} at the observed entries, got values "
                             f"in [{a[m].min()}, {a[m].max()}]")
    if checks.is_concrete(t) and checks.is_concrete(n):
        a, m = np.asarray(t), np.asarray(mask)
        if not np.all(np.isfinite(a[m])):
            raise ValueError("times: expected finite observation times, found NaN or inf")
        steps = np.diff(a, axis=-1)[m[:, 1:]]
        if np.any(steps < 0):
            raise ValueError("times: expected non-decreasing times along each path")
    return t, y, mask, K


class AmortizedRateEstimator(eqx.Module):
    """Zero-shot estimator of the generator and initial distribution of a Markov jump process from
    a set of noisily labelled paths observed on irregular grids (after Berghaus et al., NeurIPS 2024).

    One forward pass of a network trained on synthetic processes (2-6 states, sparse random rates,
    label noise, irregular grids; ``examples/mjp_amortized.py``). Equivariant under relabelling the
    states, invariant to the order of the paths, any number of states and paths. Use
    `AmortizedRateEstimator.pretrained` for the shipped weights; the constructor builds an untrained
    network.

    Args:
        key: a `jax.random` key for the initial weights.
        hidden: width of the hidden layers.

    Example:
        >>> est = ps.ctmc.AmortizedRateEstimator.pretrained()
        >>> fit = est(times, labels, num_states=3)     # times (N, T) or (T,), labels (N, T)
        >>> fit.generator.shape, fit.initial_probs.shape
        ((3, 3), (3,))
    """

    edge_mlp: tuple
    message_mlp: tuple
    rate_head: tuple
    initial_head: tuple
    dt_edges: tuple = eqx.field(static=True)

    def __init__(self, key, hidden: int = 64):
        hidden = checks.positive_int(hidden, "hidden")
        fe, fn = _num_features(len(DT_EDGES) + 1)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.edge_mlp = _init_mlp(k1, (4 * fe + 2 * fn, hidden, hidden))
        self.message_mlp = _init_mlp(k2, (7 * hidden, hidden, hidden))
        # a zero-initialised head: the untrained network returns the crude rates
        self.rate_head = ((jnp.zeros((hidden, 1)), jnp.zeros(1)),)
        self.initial_head = _init_mlp(k4, (fn + 3 * hidden, hidden, 1))
        self.dt_edges = tuple(float(e) for e in DT_EDGES)

    @classmethod
    def pretrained(cls, path: Optional[str] = None) -> "AmortizedRateEstimator":
        """The weights shipped with probssm (or those saved by `ps.save` at ``path``).

        Raises:
            ValueError: when the file does not hold an `AmortizedRateEstimator`.
        """
        net = load(WEIGHTS if path is None else path)
        if type(net) is not cls:
            raise ValueError(f"path: expected a saved AmortizedRateEstimator, got {type(net).__name__}")
        return net

    def check_parameters(self, name: str = "estimator") -> None:
        """Raise a ValueError naming the layer whose weights have the wrong shape or are not finite
        (a network edited with ``eqx.tree_at`` or loaded from another file). Shapes only when traced."""
        fe, fn = _num_features(len(self.dt_edges) + 1)
        hidden = None
        for layer, layers, first, last in (("edge_mlp", self.edge_mlp, 4 * fe + 2 * fn, None),
                                           ("message_mlp", self.message_mlp, None, None),
                                           ("rate_head", self.rate_head, None, 1),
                                           ("initial_head", self.initial_head, fn, 1)):
            width = first
            for i, wb in enumerate(layers):
                W, b = (jnp.asarray(a) for a in wb)
                if layer == "message_mlp" and i == 0:
                    width = 7 * hidden
                elif layer == "rate_head" and i == 0:
                    width = hidden
                elif layer == "initial_head" and i == 0:
                    width = fn + 3 * hidden
                if W.ndim != 2 or b.shape != W.shape[1:] or W.shape[0] != width:
                    raise ValueError(f"{name}.{layer}[{i}]: expected weights of shape ({width}, n) and a bias of "
                                     f"shape (n,), got {tuple(W.shape)} and {tuple(b.shape)}")
                checks.finite(W, f"{name}.{layer}[{i}]")
                checks.finite(b, f"{name}.{layer}[{i}]")
                width = W.shape[1]
            if layer == "edge_mlp":
                hidden = width
            if last is not None and width != last:
                raise ValueError(f"{name}.{layer}: expected {last} output, got {width}")

    def statistics(self, times, labels, mask, num_states: int) -> IntervalStatistics:
        """The pooled interval statistics the network reads (traceable; see `interval_statistics`)."""
        return interval_statistics(times, labels, mask, num_states, self.dt_edges)

    def from_statistics(self, stats: IntervalStatistics) -> AmortizedEstimate:
        """The estimate from pooled statistics (traceable; statistics of several data sets add up)."""
        self.check_parameters()
        dtype = jnp.result_type(jnp.asarray(stats.counts).dtype, self.edge_mlp[0][0].dtype)
        net = jax.tree_util.tree_map(lambda a: a.astype(dtype), self)
        return _forward(net, IntervalStatistics(*(jnp.asarray(s, dtype) for s in stats)))

    def __call__(self, times, labels, lengths=None, num_states: Optional[int] = None) -> AmortizedEstimate:
        """Estimate the generator and initial distribution from observed paths.

        Args:
            times: (N, T) observation times of N paths (non-decreasing along each path), or (T,) a
                grid shared by all paths. The initial distribution refers to the first time of a path.
            labels: (N, T) observed integer labels in 0..K-1 (possibly mislabelled states); entries
                past a path's length are ignored.
            lengths: optional (N,) numbers of real observations per path (1..T); default T for all.
            num_states: K (static); default one more than the largest observed label, which needs
                concrete labels (pass it inside `jax.jit` or `jax.vmap`).

        Returns:
            AmortizedEstimate: ``generator`` (K, K) and ``initial_probs`` (K,).

        Raises:
            ValueError: naming ``times`` (wrong shape, not finite, decreasing), ``labels`` (wrong
                shape or dtype, outside 0..K-1), ``lengths``, ``num_states`` or a layer of the
                network (wrong shape, not finite).
        """
        self.check_parameters()
        t, y, mask, K = _check_inputs(times, labels, lengths, num_states)
        return _estimate(self, t, y, mask, num_states=K)


@partial(jax.jit, static_argnames=("num_states",))
def _estimate(net, times, labels, mask, *, num_states):
    # compute in the precision of the times (float64 under x64, whatever the stored weights hold)
    dtype = jnp.result_type(times.dtype, net.edge_mlp[0][0].dtype)
    net = jax.tree_util.tree_map(lambda a: a.astype(dtype), net)
    return _forward(net, interval_statistics(times.astype(dtype), labels, mask, num_states, net.dt_edges))
