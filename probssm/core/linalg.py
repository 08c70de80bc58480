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
