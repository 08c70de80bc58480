"""Small linear-algebra helpers shared by the engines."""
from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular


def symmetrize(a):
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def psd_solve(a, b):
    """Solve a x = b for a symmetric positive definite ``a`` via Cholesky."""
    chol = jnp.linalg.cholesky(a)
    return cho_solve((chol, True), b)


def mvn_logpdf_chol(residual, chol):
    """log N(residual; 0, L L^T) given the lower Cholesky factor L."""
    w = solve_triangular(chol, residual, lower=True)
    dim = residual.shape[-1]
    half_logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
    return -0.5 * jnp.sum(w * w, axis=-1) - half_logdet - 0.5 * dim * jnp.log(2 * jnp.pi)


# Below this size, Cholesky factorisations and triangular solves are written out
# element by element: XLA fuses them into the surrounding step, where a LAPACK
# custom call would cost more than the arithmetic (a Kalman step at small d is
# latency-bound). Above it, LAPACK.
UNROLL_MAX = 6


def cholesky(a, unroll: bool = True):
    """Lower Cholesky factor of symmetric positive definite ``a`` (batched over leading axes).

    ``unroll=False`` always calls LAPACK: for one-off factorisations outside a loop, where the
    written-out form would only add compile time."""
    n = a.shape[-1]
    if n > UNROLL_MAX or not unroll:
        return jnp.linalg.cholesky(a)
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        s = a[..., j, j]
        for k in range(j):
            s = s - L[j][k] * L[j][k]
        L[j][j] = jnp.sqrt(s)
        inv = 1.0 / L[j][j]
        for i in range(j + 1, n):
            s = a[..., i, j]
            for k in range(j):
                s = s - L[i][k] * L[j][k]
            L[i][j] = s * inv
    zero = jnp.zeros_like(a[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(n)], axis=-1) for i in range(n)]
    return jnp.stack(rows, axis=-2)


def solve_lower(L, b, unroll: bool = True):
    """Solve L x = b for lower-triangular L; b is (..., n) or (..., n, m)."""
    n = L.shape[-1]
    vector = b.ndim == L.ndim - 1
    if n > UNROLL_MAX or not unroll:
        return solve_triangular(L, b, lower=True)
    bm = b[..., None] if vector else b
    xs = []
    for i in range(n):
        s = bm[..., i, :]
        for k in range(i):
            s = s - L[..., i, k, None] * xs[k]
        xs.append(s / L[..., i, i, None])
    x = jnp.stack(xs, axis=-2)
    return x[..., 0] if vector else x


def solve_upper_transposed(L, b, unroll: bool = True):
    """Solve L^T x = b for lower-triangular L; b is (..., n) or (..., n, m)."""
    n = L.shape[-1]
    vector = b.ndim == L.ndim - 1
    if n > UNROLL_MAX or not unroll:
        return solve_triangular(L, b, lower=True, trans=1)
    bm = b[..., None] if vector else b
    xs = [None] * n
    for i in reversed(range(n)):
        s = bm[..., i, :]
        for k in range(i + 1, n):
            s = s - L[..., k, i, None] * xs[k]
        xs[i] = s / L[..., i, i, None]
    x = jnp.stack(xs, axis=-2)
    return x[..., 0] if vector else x


def cho_solve_lower(L, b, unroll: bool = True):
    """Solve (L L^T) x = b given the lower Cholesky factor."""
    return solve_upper_transposed(L, solve_lower(L, b, unroll), unroll)


FUSE_MAX = 8


def mm(a, b):
    """``a @ b`` for one matrix ``a`` (m, k) and ``b`` (k, n) or (k,).

    For small operands the product is written as a broadcast multiply and a sum,
    which XLA fuses with its neighbours; at d = 4 this halves a Kalman step
    compared with a chain of tiny dot kernels. Larger operands use a GEMM.
    """
    if max(a.shape + b.shape) > FUSE_MAX:
        return a @ b
    if b.ndim == 1:
        return jnp.sum(a * b[None, :], axis=-1)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
