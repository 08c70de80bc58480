"""Forward-backward, Viterbi and posterior sampling on the arrays of one sequence.

These are the traceable cores of `probssm.inference.hmm` (``ps.hmm``), dynamax style:
pure functions of a `DiscreteParams` (initial probabilities pi (K,), transition
matrices A (K, K) or A_t (T, K, K), per-step emission log-likelihoods (T, K)), one
sequence, no input checks, usable under the caller's ``jit`` / ``vmap`` / ``grad``:

    filter_params(params, *, length=None, plausibility=None, parallel=False, chunk_size=None)
    smoother_params(params, *, length=None, plausibility=None, parallel=False, chunk_size=None)
    viterbi_params(params, *, length=None, plausibility=None)
    sample_params(key, params, num_samples=1, *, length=None, plausibility=None)

e.g. ``filter_params(model.discrete_params(y, u), length=n).log_likelihood``. The
model-level functions of `probssm.inference.hmm` check their inputs, batch with
`probssm.core.batching` and call these.

Sequential forward-backward (scaled; the loops `lax.scan` runs)::

    b_t = exp(ll_t - m_t),  m_t = max_k ll_t[k]                # done once, vectorised
    alpha_0 = pi * b_0 / c_0
    for t in 1..T-1:
        a = (alpha_{t-1} @ A_t) * b_t;  c_t = sum(a);  alpha_t = a / c_t
    log p(y) = sum_t (log c_t + m_t)
    beta_{T-1} = 1
    for t in T-2..0:
        beta_t = A_{t+1} @ (b_{t+1} * beta_{t+1} / c_{t+1})
    gamma_t = alpha_t * beta_t                                   # p(z_t | y)
    xi = sum_t A_t * outer(alpha_{t-1}, b_t * beta_t) / n_t      # expected transition counts

The scan bodies are one broadcast-multiply-reduce each (no per-step library calls).

Parallel form (``parallel=True``): the forward pass is the prefix product of the
matrices E_0 = 1 (pi * b_0)^T (all rows equal) and E_t = A_t diag(b_t), so every
row of E_0 E_1 ... E_t is proportional to alpha_t; the backward pass is the suffix
product E_{t+1} ... E_{T-1} 1 1^T, whose columns are proportional to beta_t. Each
element carries a matrix normalised to unit sum and its log scale, and

    (M_i, s_i) o (M_j, s_j) = (M_i M_j / n, s_i + s_j + log n),  n = sum(M_i M_j)

is associative. It runs in chunks (`probssm.core.scan.chunked_associative_scan`):
an associative scan inside each chunk, a sequential scan across them, so the
compiled graph has a fixed size whatever T is. On CPU the default
(``chunk_size=TWO_LEVEL``) is the two-level form instead: chunks of about sqrt(T)
steps multiply their matrices in parallel, a short scan carries the distribution
across chunk boundaries, and every chunk then runs the ordinary scaled pass from its
boundary in parallel (work O(T K^3), span O(sqrt T)); the doubling scan's
O(T K^3 log T) work costs 10-15x the sequential pass on 2 cores, this form about 2x.

Missing data: a row whose emission log-likelihood is 0 (NaN in y) contributes
likelihood 1. A padded sequence with true ``length`` skips steps t >= length
(identity transition, no emission); their outputs are zero (-1 for Viterbi and
samples).

Plausibilities (ARPHMM; Juesas et al.): ``plausibility`` pl (T, K) in [0, 1]
multiplies the emission likelihood of state k at step t, i.e. adds log pl_t(k) to
the log-likelihoods; pl = 1 everywhere is the ordinary HMM.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from probssm.core.protocol import DiscreteParams
from probssm.core.scan import TWO_LEVEL, chunked_associative_scan, two_level_size

__all__ = ["FilterResult", "SmootherResult", "promote", "filter_params", "smoother_params", "viterbi_params",
           "sample_params", "DEFAULT_CHUNK", "TWO_LEVEL"]

DEFAULT_CHUNK = 512  # parallel scans on CPU: chunk length of the associative scan


class FilterResult(NamedTuple):
    """Forward pass of one sequence (the model-level `ps.hmm.filter` adds a leading B axis for a batch)."""

    log_likelihood: jax.Array  # ()
    filtered_probs: jax.Array  # (T, K)  p(z_t | y_{0:t})


class SmootherResult(NamedTuple):
    """Forward-backward of one sequence (a leading B axis for a batch at the model level)."""

    log_likelihood: jax.Array  # ()
    filtered_probs: jax.Array  # (T, K)
    smoothed_probs: jax.Array  # (T, K)  p(z_t | y_{0:T-1})
    transition_counts: jax.Array  # (K, K)  sum_t p(z_{t-1} = i, z_t = j | y)


# ----------------------------------------------------------------------------------------------
# One sequence
# ----------------------------------------------------------------------------------------------
def promote(params: DiscreteParams, plausibility=None):
    """Unify the dtypes once: initial probabilities, transition matrices, log-likelihoods (and
    plausibilities) in their promoted floating dtype, so a model mixing float32 and float64 runs
    in float64 (scan carries need one dtype). Returns ``(params, plausibility)``."""
    arrays = [params.initial_probs, params.transition_matrices, params.log_likelihoods]
    if plausibility is not None:
        arrays.append(plausibility)
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(dtype, float)
    cast = [jnp.asarray(a, dtype) for a in arrays]
    return DiscreteParams(*cast[:3]), (cast[3] if plausibility is not None else None)


def _prepare_params(params: DiscreteParams, plausibility, valid):
    ll = params.log_likelihoods
    if plausibility is not None:
        ll = ll + jnp.log(plausibility)
    if valid is not None:
        ll = jnp.where(valid[:, None], ll, 0.0)
    m = jnp.max(ll, -1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    b = jnp.exp(ll - m[:, None])
    return b, m


def _next_transitions(A):
    """The matrix used after step t (A_{t+1}) for every t; the last one is never used."""
    return jnp.concatenate([A[1:], A[-1:]]) if A.ndim == 3 else None


def _forward_sequential(pi, A, b, valid):
    """Scaled forward pass over all T steps; the carry is the predicted distribution
    p_t = p(z_t | y_{0:t-1}) (p_0 = pi), so no slicing or concatenation is needed."""
    tv = A.ndim == 3
    v_next = None if valid is None else jnp.concatenate([valid[1:], jnp.zeros((1,), bool)])

    def step(p, xs):
        b_t, A_next, v, vn = xs
        a = p * b_t
        c = a.sum()
        alpha = a / c
        M = A_next if tv else A
        p_next = jnp.sum(alpha[:, None] * M, 0)
        if v is not None:
            c = jnp.where(v, c, 1.0)
            p_next = jnp.where(vn, p_next, alpha)
        return p_next, (alpha, c)

    xs = (b, _next_transitions(A), valid, v_next)
    _, (alphas, cs) = lax.scan(step, pi, xs)
    return alphas, cs


def _backward_sequential(A, b, cs, valid):
    """beta_{t-1} = A_t (b_t beta_t / c_t), run from t = T - 1 down; outputs beta_t for every t."""
    tv = A.ndim == 3
    K = b.shape[-1]
    bc = b / cs[:, None]
    # A v written as a reduction over the leading axis of A^T (vertical SIMD adds on CPU)
    AT = jnp.swapaxes(A, -1, -2)

    def step(beta, xs):
        bc_t, AT_t, v = xs
        M = AT_t if tv else AT
        prev = jnp.sum(M * (bc_t * beta)[:, None], 0)
        if v is not None:
            prev = jnp.where(v, prev, beta)
        return prev, beta

    xs = (bc, AT if tv else None, valid)
    _, betas = lax.scan(step, jnp.ones(K, b.dtype), xs, reverse=True)
    return betas, bc


class _Elem(NamedTuple):
    M: jax.Array
    s: jax.Array


def _combine(e1: _Elem, e2: _Elem) -> _Elem:
    M = e1.M @ e2.M
    n = jnp.sum(M)
    n = jnp.where(n > 0, n, 1.0)
    return _Elem(M / n, e1.s + e2.s + jnp.log(n))


def _step_matrices(A, b, valid):
    """E_t = A_t diag(b_t) for t = 1..T-1 (identity on padding)."""
    T, K = b.shape
    E = (A[1:] if A.ndim == 3 else A[None]) * b[1:, None, :]
    if valid is not None:
        E = jnp.where(valid[1:, None, None], E, jnp.eye(K, dtype=b.dtype))
    return E


def _forward_parallel(pi, A, b, valid, chunk_size):
    T, K = b.shape
    first = jnp.broadcast_to(pi * b[0], (K, K))[None]
    E = jnp.concatenate([first, _step_matrices(A, b, valid)])
    n = E.sum((-2, -1))
    elems = _Elem(E / n[:, None, None], jnp.log(n))
    identity = _Elem(jnp.eye(K, dtype=b.dtype), jnp.zeros((), b.dtype))
    out = chunked_associative_scan(_combine, elems, identity, chunk_size)
    rows = out.M[:, 0, :]
    tot = rows.sum(-1)
    alphas = rows / tot[:, None]
    log_z = out.s + jnp.log(tot)
    # normaliser of step t: p(y_t | y_{0:t-1}) / exp(m_t) = exp(log_z_t - log_z_{t-1})
    cs = jnp.exp(jnp.diff(log_z, prepend=0.0))
    return alphas, cs, log_z[-1]


def _backward_parallel(A, b, valid, chunk_size):
    T, K = b.shape
    E = jnp.concatenate([_step_matrices(A, b, valid), jnp.ones((1, K, K), b.dtype)])
    n = E.sum((-2, -1))
    elems = _Elem(E / n[:, None, None], jnp.log(n))
    identity = _Elem(jnp.eye(K, dtype=b.dtype), jnp.zeros((), b.dtype))
    out = chunked_associative_scan(lambda later, earlier: _combine(earlier, later), elems, identity, chunk_size,
                                   reverse=True)
    cols = out.M[:, :, 0]
    return cols / cols.sum(-1, keepdims=True)




def _chunks(a, num_chunks, size, fill):
    pad = num_chunks * size - a.shape[0]
    a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)])
    return a.reshape((num_chunks, size) + a.shape[1:])


def _time_major(a):
    """(C, S, ...) chunked arrays <-> (S, C, ...): the two-level passes scan over S."""
    return jnp.swapaxes(a, 0, 1)


def _chunk_cores(A, b, valid):
    """Per chunk j of the two-level form (steps s..e), the product shared by both passes,

        P_j = D_s A_{s+1} D_{s+1} ... A_e D_e   (D_t = diag(b_t); padded steps skipped),

    normalised to unit sum: the forward pass maps p -> p P_j A_{e+1} across the chunk and the
    backward pass beta -> A_s P_j beta, so one O(T K^3) product serves both (the smoother's
    costliest phase, done once instead of twice). Returns ``(forward, backward)`` maps, each
    (num_chunks, K, K) and defined up to scale."""
    T, K = b.shape
    size = two_level_size(T)
    num_chunks = -(-T // size)
    tv = A.ndim == 3
    v = jnp.ones(T, bool) if valid is None else valid
    bs = _chunks(b, num_chunks, size, 1.0)
    vs = _chunks(v, num_chunks, size, False)
    A_c = _chunks(A, num_chunks, size, 0.0) if tv else None
    eye = jnp.eye(K, dtype=b.dtype)

    def core(b_c, A_c, v_c):
        def step(P, xs):
            b_t, A_t, v_t = xs
            P_next = P @ ((A_t if tv else A) * b_t[None, :])
            return jnp.where(v_t, P_next / jnp.sum(P_next), P), None

        start = jnp.where(v_c[0], eye * b_c[0][None, :], eye)
        return lax.scan(step, start / jnp.sum(start), (b_c[1:], None if A_c is None else A_c[1:], v_c[1:]))[0]

    P = jax.vmap(core, in_axes=(0, 0 if tv else None, 0))(bs, A_c, vs)
    # the transition out of each chunk (into step (j + 1) size) and into it (from step j size - 1)
    after = jnp.minimum((jnp.arange(num_chunks) + 1) * size, T - 1)
    after_valid = ((jnp.arange(num_chunks) + 1) * size < T) & v[after]
    A_after = A[after] if tv else A
    forward = jnp.where(after_valid[:, None, None], P @ A_after, P)
    starts = jnp.arange(num_chunks) * size
    into_valid = v[starts] & (starts > 0)
    A_into = A[starts] if tv else A
    backward = jnp.where(into_valid[:, None, None], A_into @ P, P)
    return forward, backward


def _forward_two_level(pi, A, b, valid, G):
    """Forward pass in three phases over chunks of c ~ sqrt(T) steps (scan-then-propagate).

    The predicted distribution moves through step t by p -> normalise(p diag(b_t) A_{t+1})
    (diag(b_t) alone when step t + 1 is padding). 1) Every chunk's map ``G`` (C, K, K), the
    product of its steps' matrices, computed in parallel by `_chunk_cores`; 2) a short
    sequential scan over the chunks carries the predicted distribution to every chunk start;
    3) every chunk, in parallel, runs the ordinary scaled forward pass from its start, which
    gives exact filtered probabilities and normalisers. Work O(T K^3 + T K^2), span
    O(sqrt(T)); one compiled body per phase whatever T is."""
    T, K = b.shape
    size = two_level_size(T)
    num_chunks = -(-T // size)
    tv = A.ndim == 3
    v = jnp.ones(T, bool) if valid is None else valid
    vn = jnp.concatenate([v[1:], jnp.zeros(1, bool)])
    bs = _chunks(b, num_chunks, size, 1.0)
    vs = _chunks(v, num_chunks, size, False)
    vns = _chunks(vn, num_chunks, size, False)
    A_next = _chunks(_next_transitions(A), num_chunks, size, 0.0) if tv else None

    def chain(p, G_j):
        q = p @ G_j
        return q / jnp.sum(q), p

    _, starts = lax.scan(chain, pi, G)

    # every chunk's ordinary pass, all chunks at once in time-major layout: the carry is (C, K)
    # and a step is one (C, K) x (K, K) product (2-3x faster on CPU than vmapping a per-chunk scan)
    def step(p, xs):
        b_t, A_t, v_t, vn_t = xs
        a = p * b_t
        c = a.sum(-1, keepdims=True)
        alpha = a / c
        moved = jnp.einsum("ck,ckj->cj", alpha, A_t) if tv else alpha @ A
        p_next = jnp.where(vn_t[:, None], moved, alpha)
        return p_next, (alpha, jnp.where(v_t, c[:, 0], 1.0))

    xs = (_time_major(bs), None if A_next is None else _time_major(A_next), _time_major(vs), _time_major(vns))
    alphas, cs = lax.scan(step, starts, xs)[1]
    return _time_major(alphas).reshape(-1, K)[:T], _time_major(cs).reshape(-1)[:T]


def _backward_two_level(A, b, cs, valid, H):
    """Backward pass in the same three phases: beta_{t-1} = A_t (b_t beta_t / c_t) is linear in
    beta_t, so a chunk is a product of K x K matrices (``H``, from `_chunk_cores`);
    the boundary betas are carried from the end, and every chunk runs the scaled backward pass
    from its boundary. Betas are returned normalised per step (each chunk's scale is arbitrary)."""
    T, K = b.shape
    size = two_level_size(T)
    num_chunks = -(-T // size)
    tv = A.ndim == 3
    v = jnp.ones(T, bool) if valid is None else valid
    bc = b / cs[:, None]
    # the step at t maps beta_t to beta_{t-1}; t = 0 maps nowhere (its matrix is never used)
    step_valid = v & (jnp.arange(T) > 0)
    bcs = _chunks(bc, num_chunks, size, 1.0)
    vs = _chunks(step_valid, num_chunks, size, False)
    A_t = _chunks(A, num_chunks, size, 0.0) if tv else None

    def chain(beta, H_j):
        prev = H_j @ beta
        return prev / jnp.sum(prev), beta

    # boundary of chunk j: beta at its last step; chunk j + 1's product carries it back
    first, later = lax.scan(chain, jnp.ones(K, b.dtype) / K, H[1:], reverse=True)
    boundaries = jnp.concatenate([first[None], later])

    def step(beta, xs):  # all chunks at once, time-major as in `_forward_two_level`
        bc_t, A_s, v_t = xs
        u = bc_t * beta
        prev = jnp.einsum("cij,cj->ci", A_s, u) if tv else u @ A.T
        return jnp.where(v_t[:, None], prev, beta), beta

    xs = (_time_major(bcs), None if A_t is None else _time_major(A_t), _time_major(vs))
    betas = _time_major(lax.scan(step, boundaries, xs, reverse=True)[1]).reshape(-1, K)[:T]
    return betas / jnp.sum(betas, -1, keepdims=True)


def _transition_counts(A, b, alphas, betas, valid):
    """sum_t A_t * outer(alpha_{t-1}, b_t beta_t) / n_t, with n_t the normaliser of that outer product."""
    w = b[1:] * betas[1:]
    if A.ndim == 3:
        pred = jnp.einsum("ti,tij->tj", alphas[:-1], A[1:])
    else:
        pred = alphas[:-1] @ A
    n = jnp.sum(pred * w, -1)
    scale = 1.0 / jnp.where(n > 0, n, 1.0)
    if valid is not None:
        scale = jnp.where(valid[1:], scale, 0.0)
    w = w * scale[:, None]
    if A.ndim == 3:
        return jnp.einsum("ti,tij,tj->ij", alphas[:-1], A[1:], w)
    return A * (alphas[:-1].T @ w)


def _filter_one(params, plausibility, valid, parallel, chunk_size):
    """Forward pass: (log-likelihood, alphas, normalisers, scaled likelihoods b, and the chunks'
    backward maps of the two-level form (None otherwise; unused by a filter, so compiled away))."""
    b, m = _prepare_params(params, plausibility, valid)
    A = params.transition_matrices
    H = None
    if parallel and chunk_size == TWO_LEVEL:
        G, H = _chunk_cores(A, b, valid)
        alphas, cs = _forward_two_level(params.initial_probs, A, b, valid, G)
        ll = jnp.sum(jnp.log(cs)) + jnp.sum(m)
    elif parallel:
        alphas, cs, log_z = _forward_parallel(params.initial_probs, A, b, valid, chunk_size)
        ll = log_z + jnp.sum(m)
    else:
        alphas, cs = _forward_sequential(params.initial_probs, A, b, valid)
        ll = jnp.sum(jnp.log(cs)) + jnp.sum(m)
    return ll, alphas, cs, b, H


def _smooth_one(params, plausibility, valid, parallel, chunk_size):
    ll, alphas, cs, b, H = _filter_one(params, plausibility, valid, parallel, chunk_size)
    A = params.transition_matrices
    if parallel:
        if chunk_size == TWO_LEVEL:
            betas = _backward_two_level(A, b, cs, valid, H)
        else:
            betas = _backward_parallel(A, b, valid, chunk_size)
        counts = _transition_counts(A, b, alphas, betas, valid)
    else:
        betas, bc = _backward_sequential(A, b, cs, valid)
        # with these scalings the normaliser of step t's pair marginal is exactly 1
        w = bc * betas if valid is None else bc * betas * valid[:, None]
        if A.ndim == 3:
            counts = jnp.einsum("ti,tij,tj->ij", alphas[:-1], A[1:], w[1:])
        else:
            counts = A * (alphas[:-1].T @ w[1:])
    gamma = alphas * betas
    gamma = gamma / gamma.sum(-1, keepdims=True)
    if valid is not None:
        gamma = jnp.where(valid[:, None], gamma, 0.0)
        alphas = jnp.where(valid[:, None], alphas, 0.0)
    return SmootherResult(ll, alphas, gamma, counts)


def _viterbi_one(params, plausibility, valid):
    ll = params.log_likelihoods
    if plausibility is not None:
        ll = ll + jnp.log(plausibility)
    A = params.transition_matrices
    tv = A.ndim == 3
    logA = jnp.log(A)
    K = ll.shape[-1]
    ks = jnp.arange(K)
    delta0 = jnp.log(params.initial_probs) + ll[0]

    def step(delta, xs):
        ll_t, logA_t, v = xs
        s = delta[:, None] + (logA_t if tv else logA)
        psi = jnp.argmax(s, 0)
        new = jnp.max(s, 0) + ll_t
        new = new - jnp.max(new)
        if v is not None:
            new = jnp.where(v, new, delta)
            psi = jnp.where(v, psi, ks)
        return new, psi

    xs = (ll[1:], logA[1:] if tv else None, None if valid is None else valid[1:])
    delta, psis = lax.scan(step, delta0 - jnp.max(delta0), xs)
    last = jnp.argmax(delta)

    def back(z, psi):
        z = psi[z]
        return z, z

    _, zs = lax.scan(back, last, psis, reverse=True)
    path = jnp.concatenate([zs, last[None]])
    if valid is not None:
        path = jnp.where(valid, path, -1)
    return path


def _sample_one(key, params, plausibility, valid, num_samples):
    _, alphas, _, _, _ = _filter_one(params, plausibility, valid, False, None)
    A = params.transition_matrices
    tv = A.ndim == 3
    T, K = alphas.shape
    u = jax.random.uniform(key, (T, num_samples), alphas.dtype)

    def draw(p, u_t):
        cdf = jnp.cumsum(p, -1)
        return jnp.minimum(jnp.sum(cdf < u_t[:, None] * cdf[:, -1:], -1), K - 1)

    last = draw(jnp.broadcast_to(alphas[-1], (num_samples, K)), u[-1])

    def step(z_next, xs):
        alpha, A_next, u_t, v = xs
        M = A_next if tv else A
        p = alpha[None, :] * M[:, z_next].T
        z = draw(p, u_t)
        if v is not None:
            z = jnp.where(v, z, z_next)
        return z, z

    xs = (alphas[:-1], A[1:] if tv else None, u[:-1], None if valid is None else valid[1:])
    _, zs = lax.scan(step, last, xs, reverse=True)
    paths = jnp.concatenate([zs, last[None]]).T  # (S, T)
    if valid is not None:
        paths = jnp.where(valid[None], paths, -1)
    return paths


# ----------------------------------------------------------------------------------------------
# Public traceable cores: one sequence, arrays in, no checks
# ----------------------------------------------------------------------------------------------
def _valid(num_timesteps, length):
    return None if length is None else jnp.arange(num_timesteps) < length


def _core_chunk(chunk_size, parallel):
    if not parallel:
        return None
    if chunk_size is None:
        return TWO_LEVEL if jax.default_backend() == "cpu" else None
    return chunk_size if chunk_size == TWO_LEVEL else int(chunk_size)


def filter_params(params: DiscreteParams, *, length=None, plausibility=None, parallel: bool = False,
                  chunk_size: Optional[int] = None) -> FilterResult:
    """Forward pass on the arrays of one sequence: the traceable core of `filter`.

    No input checks; usable inside the caller's ``jax.jit`` / ``vmap`` / ``grad``.

    Args:
        params: `DiscreteParams` of one sequence: initial_probs (K,), transition_matrices
            (K, K) or (T, K, K), log_likelihoods (T, K) (0 where y_t is missing).
        length: None or a scalar int array: the true length of a padded sequence; steps
            t >= length are skipped and their outputs are zero.
        plausibility: None or (T, K) non-negative weights on the emission likelihoods.
        parallel: associative scan instead of the sequential scan (a Python bool).
        chunk_size: parallel only; chunk length of the associative scan, or ``TWO_LEVEL``
            (default on CPU: the two-level form; one associative chunk elsewhere).

    Returns:
        `FilterResult`: log_likelihood (), filtered_probs (T, K).

    Example:
        >>> f = ps.hmm.filter_params(model.discrete_params(y), length=n)
        >>> f.log_likelihood
    """
    params, plausibility = promote(params, plausibility)
    valid = _valid(params.log_likelihoods.shape[0], length)
    ll, alphas, _, _, _ = _filter_one(params, plausibility, valid, bool(parallel), _core_chunk(chunk_size, parallel))
    if valid is not None:
        alphas = jnp.where(valid[:, None], alphas, 0.0)
    return FilterResult(ll, alphas)


def smoother_params(params: DiscreteParams, *, length=None, plausibility=None, parallel: bool = False,
                    chunk_size: Optional[int] = None) -> SmootherResult:
    """Forward-backward on the arrays of one sequence: the traceable core of `smoother`.

    Same arguments as `filter_params`. Returns `SmootherResult`: log_likelihood (),
    filtered_probs (T, K), smoothed_probs (T, K) (zero on padding), transition_counts (K, K)
    = sum_t p(z_{t-1} = i, z_t = j | y).
    """
    params, plausibility = promote(params, plausibility)
    valid = _valid(params.log_likelihoods.shape[0], length)
    return _smooth_one(params, plausibility, valid, bool(parallel), _core_chunk(chunk_size, parallel))


def viterbi_params(params: DiscreteParams, *, length=None, plausibility=None) -> jax.Array:
    """Most likely path on the arrays of one sequence: the traceable core of `viterbi`.

    Returns:
        (T,) int states (-1 at steps t >= length).
    """
    params, plausibility = promote(params, plausibility)
    return _viterbi_one(params, plausibility, _valid(params.log_likelihoods.shape[0], length))


def sample_params(key, params: DiscreteParams, num_samples: int = 1, *, length=None,
                  plausibility=None) -> jax.Array:
    """Forward-filter backward-sample on the arrays of one sequence: the core of `sample`.

    ``num_samples`` is a Python int (static). Returns (num_samples, T) int states (-1 at
    steps t >= length).
    """
    params, plausibility = promote(params, plausibility)
    return _sample_one(key, params, plausibility, _valid(params.log_likelihoods.shape[0], length),
                       int(num_samples))
