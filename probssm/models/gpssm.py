"""State-space models with a learned transition function: a sparse GP (`GPSSM`) or a network (`NeuralSSM`).

GPSSM (Frigola et al. 2014; Fan, Bonilla, O'Kane, Sisson, ICML 2023)::

    x_0 ~ N(m_1, P_1)
    x_t = mu(x_{t-1}) + g(x_{t-1}, u_t) + N(0, diag(q))        t = 1..T-1
    y_t = C x_t + d + N(0, diag(r))                             t = 0..T-1

with one independent GP g_j ~ GP(0, k) per state dimension j (one kernel and one set of inducing
inputs shared by all outputs), mean function ``mu`` the identity by default (so f(x) = x + g(x),
as the system-identification papers write the residual dynamics), zero, or linear,
mu(x, u) = A [x; u] + b with A and b learnable (the model is then linear-Gaussian when g = 0).
The GP is represented by M inducing inputs Z (M, d_x + d_u) and inducing outputs U = g(Z) (M, d_x) with a variational
Gaussian ``q(U) = prod_j N(U[:, j]; m_j, L_j L_j^T)`` (``inducing_mean`` (M, d_x), ``inducing_scale_tril``
(d_x, M, M)). Given U the transition is the sparse-GP predictive conditional p(g(x) | U)::

    K = k(Z, Z) + jitter I,  a(x) = K^{-1} k(Z, x)
    E[x_t | x_{t-1}, U]   = mu(x_{t-1}) + U^T a(x)                     x = (x_{t-1}, u_t)
    Var[x_t | x_{t-1}, U] = diag(q) + (k(x, x) - k(x, Z) a(x)) * 1      (the same GP variance per output)

The protocol's `GPSSM.transition` conditions on U = m_U (the posterior mean of q(U)); a model made
by `GPSSM.with_inducing_sample` (a draw U ~ q(U)) or `GPSSM.with_inducing_outputs` (a given U)
conditions on that U instead, for sample-based inference (particle MCMC, SGHMC over U).
`GPSSM.marginal_moments` gives the moments of g(x) with U integrated out under q(U), and
`GPSSM.prior_kl` the KL(q(U) || p(U)) of the ELBO.

Inputs: the transition into x_t reads the input row passed at step t (`ps.smc.particle_filter`'s
row t), as in `LinearGaussianSSM` (z_t = F z_{t-1} + B u_t). The papers' control c_{t-1} that
drives x_{t-1} -> x_t is therefore passed as row t (shift a recorded control series by one).
The emission reads no inputs.

NeuralSSM::

    x_t = x_{t-1} + MLP(x_{t-1}, u_t) + N(0, diag(q)),   y_t = C x_t + d + N(0, diag(r))

with an equinox MLP (or any module mapping the (d_x + d_u,) vector to (d_x,)); it is an
`AbstractAdditiveGaussianSSM`, so the Gaussian filters run on it too.

Kernels on vector inputs: `ARDSquaredExponential` and `ARDLinear` (defined here: the `ps.gp`
kernels are covariance functions of scalar time), and `Isotropic`, which lifts a stationary
`ps.gp` kernel (Matern12, Matern32, Matern52, SquaredExponential, with their own lengthscale and
variance) to vector inputs through the Euclidean distance: k(x, x') = k_gp(||x - x'||, 0).
A `GPSSM` given one of those four `ps.gp` kernels wraps it in `Isotropic`.

C: by default fixed (not a learnable parameter) and selecting the first state coordinate,
C = e_1^T (1, d_x); pass ``emission_matrix`` to choose another, and ``learn_emission_matrix=True``
to make it learnable (it then lives in the field ``learned_emission_matrix``, a fixed one in
``fixed_emission_matrix``, which the learners' parameter walk skips).
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve, solve_triangular
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.params import check_support
from probssm.core.protocol import SSM, AbstractAdditiveGaussianSSM
from probssm.models.kernels import Matern12, Matern32, Matern52, SquaredExponential
from probssm.models.lgssm import PSD, REAL

__all__ = ["GPSSM", "AbstractSparseGPSSM", "NeuralSSM", "AbstractInputKernel", "ARDSquaredExponential", "ARDLinear", "Isotropic"]

POSITIVE = {"constraint": constraints.positive}
LOWER_CHOLESKY = {"constraint": constraints.lower_cholesky}


# ---------------------------------------------------------------------------------------------
# Kernels on vector inputs


class AbstractInputKernel(eqx.Module):
    """A covariance function k(x, x') on vectors x of width D (`input_width`)."""

    @abc.abstractmethod
    def gram(self, X1, X2) -> jax.Array:
        """(n, D), (m, D) -> (n, m) matrix k(X1[i], X2[j])."""

    @abc.abstractmethod
    def diag(self, X) -> jax.Array:
        """(n, D) -> (n,) k(X[i], X[i])."""

    @property
    @abc.abstractmethod
    def input_width(self) -> Optional[int]:
        """D, or None when the kernel reads inputs of any width (isotropic kernels)."""


def _float(x, name, dtype=None):
    a = jnp.asarray(x)
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {a.dtype}")
    if dtype is not None:
        return a.astype(dtype)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


def _positive(a, name):
    if checks.is_concrete(a):
        v = np.asarray(a)
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"{name}: expected positive finite values, got {np.ravel(v[~(np.isfinite(v) & (v > 0))])[0]}")
    return a


class ARDSquaredExponential(AbstractInputKernel):
    """k(x, x') = s^2 exp(-sum_i (x_i - x'_i)^2 / (2 l_i^2)), one lengthscale per input dimension.

    Args:
        lengthscales: (D,) positive.
        variance: s^2 > 0 (scalar).
    """

    lengthscales: jax.Array = eqx.field(metadata=POSITIVE)
    variance: jax.Array = eqx.field(metadata=POSITIVE)

    def __init__(self, lengthscales, variance=1.0):
        ls = _float(lengthscales, "lengthscales")
        ls = checks.array(ls, "lengthscales", (1,), "(D,)")
        var = _float(variance, "variance", ls.dtype)
        checks.array(var, "variance", (0,), "() (a scalar)")
        self.lengthscales = _positive(ls, "lengthscales")
        self.variance = _positive(var, "variance")

    @property
    def input_width(self) -> int:
        return self.lengthscales.shape[0]

    def gram(self, X1, X2):
        diff = (X1[:, None, :] - X2[None, :, :]) / self.lengthscales
        return self.variance * jnp.exp(-0.5 * jnp.sum(diff * diff, axis=-1))

    def diag(self, X):
        return jnp.broadcast_to(self.variance, X.shape[:1]).astype(X.dtype)


class ARDLinear(AbstractInputKernel):
    """k(x, x') = sum_i v_i x_i x'_i (Bayesian linear regression without intercept).

    With M >= D inducing inputs spanning R^D, the GP mean through U = Z A^T is exactly the linear
    map A x and the conditional variance is zero (up to the jitter): the GPSSM is then linear-Gaussian.

    Args:
        variances: (D,) positive.
    """

    variances: jax.Array = eqx.field(metadata=POSITIVE)

    def __init__(self, variances):
        v = checks.array(_float(variances, "variances"), "variances", (1,), "(D,)")
        self.variances = _positive(v, "variances")

    @property
    def input_width(self) -> int:
        return self.variances.shape[0]

    def gram(self, X1, X2):
        return (X1 * self.variances) @ X2.T

    def diag(self, X):
        return jnp.sum(X * X * self.variances, axis=-1)


_STATIONARY_GP_KERNELS = (Matern12, Matern32, Matern52, SquaredExponential)


class Isotropic(AbstractInputKernel):
    """A stationary `ps.gp` kernel on vectors: k(x, x') = kernel(||x - x'||, 0).

    Args:
        kernel: a `ps.gp.Matern12`, `Matern32`, `Matern52` or `SquaredExponential` (its exact
            covariance function is used, not the state-space approximation).
    """

    kernel: eqx.Module

    def __init__(self, kernel):
        if not isinstance(kernel, _STATIONARY_GP_KERNELS):
            raise ValueError("kernel: expected a ps.gp Matern12, Matern32, Matern52 or SquaredExponential, got "
                             f"{type(kernel).__name__}")
        kernel.check("kernel")
        self.kernel = kernel

    @property
    def input_width(self) -> None:
        return None

    def gram(self, X1, X2):
        sq = jnp.sum((X1[:, None, :] - X2[None, :, :]) ** 2, axis=-1)
        pos = sq > 0
        r = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)  # a gradient-safe norm at r = 0
        return self.kernel(r, jnp.zeros((), r.dtype)).astype(X1.dtype)

    def diag(self, X):
        return jnp.broadcast_to(self.kernel(jnp.zeros((), X.dtype), jnp.zeros((), X.dtype)), X.shape[:1]).astype(X.dtype)


def _as_input_kernel(kernel):
    if isinstance(kernel, AbstractInputKernel):
        return kernel
    if isinstance(kernel, _STATIONARY_GP_KERNELS):
        return Isotropic(kernel)
    raise ValueError("kernel: expected a kernel on vector inputs (ARDSquaredExponential, ARDLinear, Isotropic) or a "
                     f"stationary ps.gp kernel (Matern12/32/52, SquaredExponential), got {type(kernel).__name__}")


# ---------------------------------------------------------------------------------------------
# The shared linear-Gaussian emission and initial state


def _noise_vector(x, name, n, dtype):
    """A positive (n,) variance vector from a scalar or an (n,) array."""
    a = _float(x, name, dtype)
    if a.ndim == 0:
        a = jnp.full((n,), a, dtype)
    checks.shape(a, name, (n,), f"() or ({n},)")
    return _positive(a, name)


def _emission_parts(state_dim, dtype, emission_matrix, emission_offset, emission_noise):
    if emission_matrix is None:
        C = jnp.zeros((1, state_dim), dtype).at[0, 0].set(1.0)
    else:
        C = checks.array(_float(emission_matrix, "emission_matrix", dtype), "emission_matrix", (2,), f"(p, {state_dim})")
        checks.shape(C, "emission_matrix", (None, state_dim), f"(p, {state_dim})")
        checks.finite(C, "emission_matrix")
    p = C.shape[0]
    d = jnp.zeros((p,), dtype) if emission_offset is None else _float(emission_offset, "emission_offset", dtype)
    checks.shape(d, "emission_offset", (p,), f"({p},)")
    checks.finite(d, "emission_offset")
    r = _noise_vector(emission_noise, "emission_noise", p, dtype)
    return C, d, r


def _initial_parts(state_dim, dtype, initial_mean, initial_cov):
    m1 = jnp.zeros((state_dim,), dtype) if initial_mean is None else _float(initial_mean, "initial_mean", dtype)
    checks.shape(m1, "initial_mean", (state_dim,), f"({state_dim},)")
    checks.finite(m1, "initial_mean")
    P1 = jnp.eye(state_dim, dtype=dtype) if initial_cov is None else _float(initial_cov, "initial_cov", dtype)
    checks.shape(P1, "initial_cov", (state_dim, state_dim), f"({state_dim}, {state_dim})")
    checks.psd(P1, "initial_cov")
    return m1, P1


def _check_input_dim(input_dim):
    return checks.positive_int(input_dim, "input_dim", minimum=0)


def _gp_input(z_prev, inputs, input_dim: int):
    """(x_{t-1}, u_t) as one (d_x + d_u,) vector (inputs ignored when the model reads none)."""
    if input_dim == 0:
        return z_prev
    if inputs is None:
        raise ValueError(f"inputs: this model reads input rows of width {input_dim}; got None")
    u = jnp.reshape(jnp.asarray(inputs), (-1,)).astype(z_prev.dtype)
    if u.shape[0] != input_dim:
        raise ValueError(f"inputs: expected rows of width {input_dim}, got {u.shape[0]}")
    return jnp.concatenate([z_prev, u])


def _diag_normal(mean, var):
    return dist.Normal(mean, jnp.sqrt(var)).to_event(1)


# ---------------------------------------------------------------------------------------------
# GPSSM


class AbstractSparseGPSSM(SSM):
    """A state-space model whose transition is a sparse GP with inducing points: it answers
    `conditional_moments` (f given U), `marginal_moments` (U integrated under q(U); `whitened_factors`
    computed once serve many states), `prior_kl`,
    `with_inducing_outputs`, and has ``inducing_inputs``, ``inducing_mean``, ``transition_noise``,
    ``emission_noise``. The free-form VI and PRSSM learners (`ps.learn.free_form_vi`) read only this."""


class GPSSM(AbstractSparseGPSSM):
    """Sparse-GP state-space model (see the module docstring for the equations).

    Args:
        kernel: an `AbstractInputKernel` on inputs of width d_x + d_u (`ARDSquaredExponential`,
            `ARDLinear`, `Isotropic`), or a stationary `ps.gp` kernel (wrapped in `Isotropic`).
        inducing_inputs: Z (M, d_x + d_u).
        inducing_mean: m_U (M, d_x), the mean of q(U); it fixes d_x.
        transition_noise: q, () or (d_x,) positive variances.
        emission_noise: r, () or (p,) positive variances.
        inducing_scale_tril: (d_x, M, M) lower-triangular Cholesky factors of the covariances of
            q(U[:, j]) (positive diagonal). None: chol(k(Z, Z) + jitter I) for every output (q(U) = p(U)).
        input_dim: d_u, the width of the input rows the transition reads (0: none).
        initial_mean: (d_x,), default zeros.  initial_cov: (d_x, d_x), default identity.
        emission_matrix: C (p, d_x); None: e_1^T (1, d_x), the first state coordinate.
        emission_offset: d (p,), default zeros.
        learn_emission_matrix: False (default): C is fixed (not a learnable parameter).
        mean_function: "identity" (default, f(x) = x + g(x)), "zero" (f = g) or "linear"
            (f(x, u) = A [x; u] + b + g(x, u), with A = ``mean_weights`` and b = ``mean_offset``
            learnable: a linear-Gaussian model when g = 0, so a GP fit can start at a linear one).
        mean_weights: A (d_x, d_x + d_u) of the linear mean function; default [I 0].
        mean_offset: b (d_x,) of the linear mean function; default zeros.
        jitter: added to the diagonal of k(Z, Z) (absolute, static), default 1e-6.

    Raises:
        ValueError: naming the argument, for shapes that do not fit (inducing inputs of a width
            other than d_x + d_u, lengthscales of another width, ...), non-positive noise or
            hyperparameters, a scale_tril that is not lower-triangular with a positive diagonal.

    Example:
        >>> kernel = ps.models.ARDSquaredExponential(jnp.ones(1), 1.0)
        >>> Z = jnp.linspace(-2, 2, 10)[:, None]
        >>> model = ps.models.GPSSM(kernel, Z, jnp.zeros((10, 1)), 0.01, 0.1)
        >>> _, y = ps.sample(jax.random.key(0), model.with_inducing_sample(jax.random.key(1)), 100)
        >>> ps.smc.particle_filter(jax.random.key(2), model, y, 500).log_likelihood
    """

    kernel: AbstractInputKernel
    inducing_inputs: jax.Array = eqx.field(metadata=REAL)
    inducing_mean: jax.Array = eqx.field(metadata=REAL)
    inducing_scale_tril: jax.Array = eqx.field(metadata=LOWER_CHOLESKY)
    transition_noise: jax.Array = eqx.field(metadata=POSITIVE)
    initial_mean: jax.Array = eqx.field(metadata=REAL)
    initial_cov: jax.Array = eqx.field(metadata=PSD)
    learned_emission_matrix: Optional[jax.Array] = eqx.field(metadata=REAL)
    fixed_emission_matrix: Optional[jax.Array]
    emission_offset: jax.Array = eqx.field(metadata=REAL)
    emission_noise: jax.Array = eqx.field(metadata=POSITIVE)
    inducing_sample: Optional[jax.Array]  # the U the transition conditions on; None: m_U
    mean_weights: Optional[jax.Array] = eqx.field(metadata=REAL)  # "linear" mean function only
    mean_offset: Optional[jax.Array] = eqx.field(metadata=REAL)
    num_inputs: int = eqx.field(static=True)
    mean_function: str = eqx.field(static=True)
    jitter: float = eqx.field(static=True)

    def __init__(self, kernel, inducing_inputs, inducing_mean, transition_noise, emission_noise, *,
                 inducing_scale_tril=None, input_dim: int = 0, initial_mean=None, initial_cov=None,
                 emission_matrix=None, emission_offset=None, learn_emission_matrix: bool = False,
                 mean_function: str = "identity", jitter: float = 1e-6, mean_weights=None, mean_offset=None):
        kernel = _as_input_kernel(kernel)
        input_dim = _check_input_dim(input_dim)
        mU = checks.array(_float(inducing_mean, "inducing_mean"), "inducing_mean", (2,), "(M, d_x)")
        dtype = mU.dtype
        M, dx = mU.shape
        if M < 1 or dx < 1:
            raise ValueError(f"inducing_mean: expected shape (M, d_x) with M, d_x >= 1, got shape {tuple(mU.shape)}")
        Z = checks.array(_float(inducing_inputs, "inducing_inputs", dtype), "inducing_inputs", (2,), "(M, d_x + d_u)")
        checks.shape(Z, "inducing_inputs", (M, dx + input_dim),
                     f"(M, d_x + d_u) = ({M}, {dx + input_dim}) (M from inducing_mean, d_x = {dx}, d_u = input_dim = {input_dim})")
        if mean_function not in ("identity", "zero", "linear"):
            raise ValueError(f"mean_function: expected 'identity', 'zero' or 'linear', got {mean_function!r}")
        if mean_function != "linear" and (mean_weights is not None or mean_offset is not None):
            raise ValueError("mean_weights: only the 'linear' mean function has weights and an offset; "
                             f"got mean_function={mean_function!r}")
        if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not (jitter >= 0 and np.isfinite(jitter)):
            raise ValueError(f"jitter: expected a non-negative finite number, got {jitter!r}")
        if not isinstance(learn_emission_matrix, (bool, np.bool_)):
            raise ValueError(f"learn_emission_matrix: expected True or False, got {learn_emission_matrix!r}")
        kernel = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, kernel)
        _check_kernel(kernel, dx + input_dim)
        if inducing_scale_tril is None:
            K = kernel.gram(Z, Z) + jitter * jnp.eye(M, dtype=dtype)
            L = jnp.broadcast_to(jnp.linalg.cholesky(K), (dx, M, M))
        else:
            L = _float(inducing_scale_tril, "inducing_scale_tril", dtype)
        C, d, r = _emission_parts(dx, dtype, emission_matrix, emission_offset, emission_noise)
        m1, P1 = _initial_parts(dx, dtype, initial_mean, initial_cov)
        self.kernel = kernel
        self.inducing_inputs = Z
        self.inducing_mean = mU
        self.inducing_scale_tril = L
        self.transition_noise = _noise_vector(transition_noise, "transition_noise", dx, dtype)
        self.initial_mean = m1
        self.initial_cov = P1
        self.learned_emission_matrix = C if learn_emission_matrix else None
        self.fixed_emission_matrix = None if learn_emission_matrix else C
        self.emission_offset = d
        self.emission_noise = r
        self.inducing_sample = None
        if mean_function == "linear":
            default = jnp.concatenate([jnp.eye(dx, dtype=dtype), jnp.zeros((dx, input_dim), dtype)], axis=1)
            self.mean_weights = default if mean_weights is None else _float(mean_weights, "mean_weights", dtype)
            self.mean_offset = (jnp.zeros(dx, dtype) if mean_offset is None
                                else _float(mean_offset, "mean_offset", dtype))
        else:
            self.mean_weights = self.mean_offset = None
        self.num_inputs = input_dim
        self.mean_function = mean_function
        self.jitter = float(jitter)
        _check_gpssm_arrays(self, "GPSSM")

    # --- sizes ---------------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return self.inducing_mean.shape[1]

    @property
    def num_inducing(self) -> int:
        return self.inducing_mean.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.emission_matrix.shape[0]

    @property
    def input_dim(self) -> int:
        return self.num_inputs

    @property
    def emission_matrix(self) -> jax.Array:
        """C (p, d_x), learned or fixed."""
        return self.fixed_emission_matrix if self.learned_emission_matrix is None else self.learned_emission_matrix

    # --- checks --------------------------------------------------------------------------
    def check_parameters(self, name: str = "model") -> None:
        """The declared supports (positive noise and kernel hyperparameters) and the structure:
        shapes consistent with one another, inducing inputs of width d_x + d_u, finite values,
        lower-triangular ``inducing_scale_tril`` with a positive diagonal."""
        check_support(self, name)
        _check_gpssm_arrays(self, name)

    # --- the sparse GP -------------------------------------------------------------------
    def _gram_chol(self):
        Z = self.inducing_inputs
        K = self.kernel.gram(Z, Z) + self.jitter * jnp.eye(Z.shape[0], dtype=Z.dtype)
        return jnp.linalg.cholesky(K)

    def _mean_fn(self, z_prev, x):
        """mu at z_prev; ``x`` the GP input (z_prev, u) the linear mean reads."""
        if self.mean_function == "linear":
            return self.mean_weights @ x + self.mean_offset
        return z_prev if self.mean_function == "identity" else jnp.zeros_like(z_prev)

    def conditional_moments(self, z_prev, inputs=None, inducing_outputs=None):
        """Mean (d_x,) and variance (d_x,) of f(x_{t-1}, u_t) = mu(x_{t-1}) + g(x_{t-1}, u_t) given
        U (``inducing_outputs`` (M, d_x); None: the U the model's transition uses), without the
        transition noise. Traceable; one state (vmap for many)."""
        U = self.transition_inducing_outputs if inducing_outputs is None else inducing_outputs
        x = _gp_input(z_prev, inputs, self.num_inputs)[None]
        L = self._gram_chol()
        kzx = self.kernel.gram(self.inducing_inputs, x)[:, 0]
        v = solve_triangular(L, kzx, lower=True)
        a = cho_solve((L, True), kzx)
        var = jnp.maximum(self.kernel.diag(x)[0] - v @ v, 0.0)
        return self._mean_fn(z_prev, x[0]) + a @ U, jnp.full((self.state_dim,), var)

    def whitened_factors(self):
        """(L, b, A): L the Cholesky factor of k(Z, Z) + jitter I, b = L^{-1} m_U (M, d_x) and
        A_j = L^{-1} L_j (d_x, M, M), q(U) in the basis that whitens p(U). Computed once and passed
        to `marginal_moments` for many states (a PRSSM trajectory), they spare a factorisation of
        k(Z, Z) per state."""
        L = self._gram_chol()
        b = solve_triangular(L, self.inducing_mean, lower=True)
        A = solve_triangular(L[None], self.inducing_scale_tril, lower=True)
        return L, b, A

    def marginal_moments(self, z_prev, inputs=None, factors=None):
        """Mean (d_x,) and variance (d_x,) of f(x_{t-1}, u_t) with U integrated out under q(U)
        (the sparse variational GP predictive), without the transition noise. With
        v = L^{-1} k(Z, x): mean = mu(x) + v^T b, variance = k(x, x) - |v|^2 + |A_j^T v|^2 per
        output. ``factors``: `whitened_factors()` computed once for many states (None: here)."""
        L, b, A = self.whitened_factors() if factors is None else factors
        x = _gp_input(z_prev, inputs, self.num_inputs)[None]
        v = solve_triangular(L, self.kernel.gram(self.inducing_inputs, x)[:, 0], lower=True)
        s = jnp.einsum("jmn,m->jn", A, v)
        var = jnp.maximum(self.kernel.diag(x)[0] - v @ v, 0.0) + jnp.sum(s * s, axis=-1)
        return self._mean_fn(z_prev, x[0]) + v @ b, var

    def prior_kl(self) -> jax.Array:
        """KL(q(U) || p(U)) = sum_j KL(N(m_j, L_j L_j^T) || N(0, k(Z, Z) + jitter I)) (scalar)."""
        L, b, A = self.whitened_factors()
        M = self.num_inducing
        logdet_p = 2.0 * jnp.sum(jnp.log(jnp.diag(L)))
        logdet_q = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.inducing_scale_tril, axis1=-2, axis2=-1))), -1)
        per = 0.5 * (jnp.sum(A * A, axis=(-2, -1)) + jnp.sum(b * b, axis=0) - M + logdet_p - logdet_q)
        return jnp.sum(per)

    @property
    def transition_inducing_outputs(self) -> jax.Array:
        """The U (M, d_x) the transition conditions on: a drawn or given one, else m_U."""
        return self.inducing_mean if self.inducing_sample is None else self.inducing_sample

    def sample_inducing_outputs(self, key) -> jax.Array:
        """A draw U ~ q(U), (M, d_x): U[:, j] = m_j + L_j eps_j."""
        eps = jax.random.normal(key, (self.state_dim, self.num_inducing), self.inducing_mean.dtype)
        return self.inducing_mean + jnp.einsum("jmn,jn->mj", self.inducing_scale_tril, eps)

    def with_inducing_outputs(self, inducing_outputs) -> "GPSSM":
        """This model with its transition conditioned on the given U (M, d_x) (q(U) unchanged)."""
        U = _float(inducing_outputs, "inducing_outputs", self.inducing_mean.dtype)
        checks.shape(U, "inducing_outputs", self.inducing_mean.shape, f"(M, d_x) = {tuple(self.inducing_mean.shape)}")
        return eqx.tree_at(lambda m: m.inducing_sample, self, U, is_leaf=lambda x: x is None)

    def with_inducing_sample(self, key) -> "GPSSM":
        """This model with its transition conditioned on a draw U ~ q(U) (`sample_inducing_outputs`)."""
        return self.with_inducing_outputs(self.sample_inducing_outputs(key))

    # --- protocol ------------------------------------------------------------------------
    def initial(self, inputs=None):
        return dist.MultivariateNormal(self.initial_mean, covariance_matrix=self.initial_cov)

    def transition(self, z_prev, t, inputs=None):
        mean, var = self.conditional_moments(z_prev, inputs)
        return _diag_normal(mean, var + self.transition_noise)

    def emission(self, z, t, inputs=None):
        return _diag_normal(self.emission_matrix @ z + self.emission_offset, self.emission_noise)


def _check_kernel(kernel, width: int, name: str = "kernel") -> None:
    if kernel.input_width is not None and kernel.input_width != width:
        raise ValueError(f"{name}: expected a kernel on inputs of width d_x + d_u = {width} (one lengthscale or "
                         f"variance per input dimension), got width {kernel.input_width}")
    check_support(kernel, name)


def _check_gpssm_arrays(model: GPSSM, name: str) -> None:
    """Shapes and values of a GPSSM's arrays (concrete values only)."""
    M, dx = model.inducing_mean.shape
    D = dx + model.num_inputs
    checks.shape(model.inducing_inputs, f"{name}.inducing_inputs", (M, D), f"(M, d_x + d_u) = ({M}, {D})")
    _check_kernel(model.kernel, D, f"{name}.kernel")
    L = model.inducing_scale_tril
    checks.shape(L, f"{name}.inducing_scale_tril", (dx, M, M), f"(d_x, M, M) = ({dx}, {M}, {M})")
    p = model.emission_matrix.shape[0]
    checks.shape(model.emission_matrix, f"{name}.emission_matrix", (p, dx), f"(p, {dx})")
    checks.shape(model.emission_offset, f"{name}.emission_offset", (p,), f"({p},)")
    checks.shape(model.emission_noise, f"{name}.emission_noise", (p,), f"({p},)")
    checks.shape(model.transition_noise, f"{name}.transition_noise", (dx,), f"({dx},)")
    checks.finite(model.inducing_inputs, f"{name}.inducing_inputs")
    checks.finite(model.inducing_mean, f"{name}.inducing_mean")
    checks.finite(L, f"{name}.inducing_scale_tril")
    if model.mean_function == "linear":
        checks.shape(model.mean_weights, f"{name}.mean_weights", (dx, D), f"(d_x, d_x + d_u) = ({dx}, {D})")
        checks.shape(model.mean_offset, f"{name}.mean_offset", (dx,), f"({dx},)")
        checks.finite(model.mean_weights, f"{name}.mean_weights")
        checks.finite(model.mean_offset, f"{name}.mean_offset")
    if model.inducing_sample is not None:
        checks.shape(model.inducing_sample, f"{name}.inducing_sample", (M, dx), f"(M, d_x) = ({M}, {dx})")
        checks.finite(model.inducing_sample, f"{name}.inducing_sample")
    if checks.is_concrete(L):
        a = np.asarray(L)
        if np.any(np.triu(a, 1) != 0):
            raise ValueError(f"{name}.inducing_scale_tril: expected lower-triangular (d_x, M, M) Cholesky factors, "
                             "found non-zero entries above the diagonal")
        diag = np.diagonal(a, axis1=-2, axis2=-1)
        if np.any(diag <= 0):
            raise ValueError(f"{name}.inducing_scale_tril: expected a positive diagonal, got {diag.min():.3g}")


# ---------------------------------------------------------------------------------------------
# NeuralSSM


class NeuralSSM(AbstractAdditiveGaussianSSM):
    """x_t = x_{t-1} + net(x_{t-1}, u_t) + N(0, diag(q)),  y_t = C x_t + d + N(0, diag(r)).

    Args:
        key: a `jax.random` key for the MLP's initial weights (None when ``network`` is given).
        state_dim: d_x.
        transition_noise: q, () or (d_x,) positive variances.
        emission_noise: r, () or (p,) positive variances.
        input_dim: d_u (0: reads no inputs).
        width_size, depth, activation: of the `equinox.nn.MLP` (d_x + d_u -> d_x); ``depth=0`` is
            a single linear layer (then f is affine and the model linear-Gaussian).
        network: instead of the MLP, any callable module mapping a (d_x + d_u,) vector to (d_x,)
            (its floating arrays are learnable parameters).
        residual: True (default): f(x, u) = x + net(x, u); False: f = net.
        initial_mean, initial_cov, emission_matrix, emission_offset, learn_emission_matrix: as for
            `GPSSM` (C defaults to the fixed e_1^T).

    Example:
        >>> model = ps.models.NeuralSSM(jax.random.key(0), 2, 0.01, 0.1, width_size=16, depth=1)
        >>> ps.smc.particle_filter(jax.random.key(1), model, y, 500).log_likelihood
    """

    network: Callable
    initial_mean: jax.Array = eqx.field(metadata=REAL)
    initial_cov: jax.Array = eqx.field(metadata=PSD)
    transition_noise: jax.Array = eqx.field(metadata=POSITIVE)
    learned_emission_matrix: Optional[jax.Array] = eqx.field(metadata=REAL)
    fixed_emission_matrix: Optional[jax.Array]
    emission_offset: jax.Array = eqx.field(metadata=REAL)
    emission_noise: jax.Array = eqx.field(metadata=POSITIVE)
    num_inputs: int = eqx.field(static=True)
    residual: bool = eqx.field(static=True)

    def __init__(self, key, state_dim: int, transition_noise, emission_noise, *, input_dim: int = 0,
                 width_size: int = 32, depth: int = 2, activation: Callable = jax.nn.tanh, network=None,
                 residual: bool = True, initial_mean=None, initial_cov=None, emission_matrix=None,
                 emission_offset=None, learn_emission_matrix: bool = False, dtype=None):
        dx = checks.positive_int(state_dim, "state_dim")
        input_dim = _check_input_dim(input_dim)
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        if not isinstance(learn_emission_matrix, (bool, np.bool_)):
            raise ValueError(f"learn_emission_matrix: expected True or False, got {learn_emission_matrix!r}")
        if network is None:
            if key is None:
                raise ValueError("key: expected a jax.random key to initialise the MLP (or pass network=)")
            width_size = checks.positive_int(width_size, "width_size")
            depth = checks.positive_int(depth, "depth", minimum=0)
            network = eqx.nn.MLP(dx + input_dim, dx, width_size, depth, activation=activation, key=key)
            network = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, network)
        elif not callable(network):
            raise ValueError("network: expected a callable module mapping a (d_x + d_u,) vector to (d_x,)")
        out = jax.eval_shape(network, jax.ShapeDtypeStruct((dx + input_dim,), dtype))
        if out.shape != (dx,):
            raise ValueError(f"network: expected an output of shape ({dx},) for an input of shape ({dx + input_dim},), "
                             f"got {out.shape}")
        C, d, r = _emission_parts(dx, dtype, emission_matrix, emission_offset, emission_noise)
        m1, P1 = _initial_parts(dx, dtype, initial_mean, initial_cov)
        self.network = network
        self.initial_mean = m1
        self.initial_cov = P1
        self.transition_noise = _noise_vector(transition_noise, "transition_noise", dx, dtype)
        self.learned_emission_matrix = C if learn_emission_matrix else None
        self.fixed_emission_matrix = None if learn_emission_matrix else C
        self.emission_offset = d
        self.emission_noise = r
        self.num_inputs = input_dim
        self.residual = bool(residual)

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.emission_matrix.shape[0]

    @property
    def input_dim(self) -> int:
        return self.num_inputs

    @property
    def emission_matrix(self) -> jax.Array:
        """C (p, d_x), learned or fixed."""
        return self.fixed_emission_matrix if self.learned_emission_matrix is None else self.learned_emission_matrix

    def initial_moments(self, inputs=None):
        return self.initial_mean, self.initial_cov

    def transition_mean(self, z_prev, t, inputs=None):
        out = self.network(_gp_input(z_prev, inputs, self.num_inputs))
        return z_prev + out if self.residual else out

    def transition_noise_cov(self, t, inputs=None):
        return jnp.diag(self.transition_noise)

    def emission_mean(self, z, t, inputs=None):
        return self.emission_matrix @ z + self.emission_offset

    def emission_noise_cov(self, t, inputs=None):
        return jnp.diag(self.emission_noise)

    def emission_jacobian(self, z, t, inputs=None):
        return self.emission_matrix

    # diagonal noise: cheaper independent Normals than the MultivariateNormal defaults
    def transition(self, z_prev, t, inputs=None):
        return _diag_normal(self.transition_mean(z_prev, t, inputs), self.transition_noise)

    def emission(self, z, t, inputs=None):
        return _diag_normal(self.emission_mean(z, t, inputs), self.emission_noise)
