"""Gaussian-process kernels as linear SDEs: the state-space form of a GP prior.

A stationary kernel k(tau) is the covariance of f(t) = H s(t), where s solves the linear SDE
ds = F s dt + L dB. Between two times dt apart the state moves by

    s(t + dt) = A(dt) s(t) + N(0, Q(dt)),   A(dt) = expm(F dt),   Q(dt) = Pinf - A Pinf A^T,

with Pinf the stationary covariance (Pinf F^T + F Pinf + L Qc L^T = 0). So GP regression over T
sorted, irregular times is a Kalman filter over T steps: O(T) instead of the dense O(T^3).

Every kernel is an `equinox.Module` whose hyperparameters carry a numpyro `positive`
constraint (so `ps.learn.mle` optimises them on the log scale) and answers:

* ``state_dim``: d, the size of s;
* ``feedback_matrix()``: F (d, d);
* ``stationary_cov()``: Pinf (d, d);
* ``diffusion_matrix()``: L Qc L^T (d, d), zero for the kernels without noise (periodic, cosine,
  constant, linear);
* ``measurement_vector()``: H (d,), f = H s;
* ``initial_cov(t0)``: covariance of s at the first time (Pinf for stationary kernels);
* ``transition(dt)``: (A, Q) for a scalar dt >= 0, in closed form where one exists;
* ``__call__(t1, t2)``: the kernel's exact covariance k(t1, t2), broadcasting;
* ``ssm_covariance(t1, t2)``: the covariance the state-space form represents (scalars): equal to
  ``__call__`` except for the approximate kernels (`SquaredExponential`, `Periodic`);
* ``check(name)``: ValueError naming a non-positive hyperparameter (concrete values only).

Kernels combine: ``k1 + k2`` is ``Sum(k1, k2)`` (block-diagonal state) and ``k1 * k2`` is
``Product(k1, k2)`` (Kronecker state; stationary factors only). A quasi-periodic kernel is
``Periodic(...) * Matern32(...)``.

Each kernel keeps the floating dtype of its hyperparameters: built from float32 arrays it returns
float32 matrices even under ``jax_enable_x64``; python numbers become the default float.
"""
from __future__ import annotations

import abc
import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from numpyro.distributions import constraints

from probssm.core import checks

__all__ = ["Kernel", "Matern12", "Matern32", "Matern52", "SquaredExponential", "Periodic", "Cosine",
           "Constant", "Linear", "Sum", "Product"]

POSITIVE = {"constraint": constraints.positive}
REAL = {"constraint": constraints.real}


def _positive_field(kernel, field: str, name: str) -> None:
    value = getattr(kernel, field)
    if checks.is_concrete(value):
        a = np.asarray(value)
        if a.ndim != 0:
            raise ValueError(f"{name}.{field}: expected a scalar, got shape {a.shape}")
        if not (np.isfinite(a) and a > 0):
            raise ValueError(f"{name}.{field}: expected a positive finite value, got {a}")


def _finite_field(kernel, field: str, name: str) -> None:
    value = getattr(kernel, field)
    if checks.is_concrete(value):
        a = np.asarray(value)
        if a.ndim != 0:
            raise ValueError(f"{name}.{field}: expected a scalar, got shape {a.shape}")
        if not np.isfinite(a):
            raise ValueError(f"{name}.{field}: expected a finite value, got {a}")


def _scalar(x):
    # A floating array keeps its dtype, so a float32 kernel stays float32 under x64 (a kernel
    # for a float32 model must not upcast every transition); anything else takes the default float.
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x)
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _block_diag(*blocks):
    return jax.scipy.linalg.block_diag(*blocks)


class Kernel(eqx.Module):
    """A GP kernel with a state-space (linear SDE) representation.

    Subclasses implement `state_dim`, `feedback_matrix`, `stationary_cov`,
    `measurement_vector` and `__call__`; `transition` defaults to the matrix exponential and
    ``Q = Pinf - A Pinf A^T`` and is overridden where a closed form exists.
    """

    #: False for kernels whose state has no stationary law (linear trend): `initial_cov` then
    #: depends on the first time and `transition` is exact without the Pinf identity.
    stationary = True

    @property
    @abc.abstractmethod
    def state_dim(self) -> int: ...

    @abc.abstractmethod
    def feedback_matrix(self) -> jax.Array: ...

    @abc.abstractmethod
    def stationary_cov(self) -> jax.Array: ...

    @abc.abstractmethod
    def measurement_vector(self) -> jax.Array: ...

    @abc.abstractmethod
    def __call__(self, t1, t2) -> jax.Array:
        """Exact covariance k(t1, t2) (broadcasting)."""

    def diffusion_matrix(self) -> jax.Array:
        """L Qc L^T (d, d), the white-noise covariance rate of the SDE.

        This default reads it off the Lyapunov equation, ``-(F Pinf + Pinf F^T)``; the kernels of
        this module override it with their closed forms.
        """
        F, P = self.feedback_matrix(), self.stationary_cov()
        S = -(F @ P + P @ F.T)
        return 0.5 * (S + S.T)

    def initial_cov(self, t0) -> jax.Array:
        """Covariance (d, d) of the state at the first observation time ``t0``."""
        return self.stationary_cov()

    def transition(self, dt):
        """(A, Q), each (d, d), for a step of length ``dt`` >= 0 (a traced scalar)."""
        A = jax.scipy.linalg.expm(self.feedback_matrix() * dt)
        Pinf = self.stationary_cov()
        Q = Pinf - A @ Pinf @ A.T
        return A, 0.5 * (Q + Q.T)

    def check(self, name: str = "kernel") -> None:
        """Raise ValueError naming any non-positive hyperparameter (skipped under tracing)."""
        for field in ("lengthscale", "variance", "period"):
            if hasattr(self, field):
                _positive_field(self, field, name)

    def ssm_covariance(self, t1, t2) -> jax.Array:
        """Covariance of f(t1), f(t2) as the state-space form represents it (scalars t1, t2):
        equals ``self(t1, t2)`` for the exact kernels; the truncated / approximate kernels
        (squared-exponential, periodic) differ by their stated approximation error."""
        lo, hi = jnp.minimum(t1, t2), jnp.maximum(t1, t2)
        A, _ = self.transition(hi - lo)
        H = self.measurement_vector()
        return H @ A @ self.initial_cov(lo) @ H

    def __add__(self, other):
        """``k1 + k2`` is `Sum` (flattened: ``k1 + k2 + k3`` is ``Sum(k1, k2, k3)``)."""
        if not isinstance(other, Kernel):
            return NotImplemented
        left = self.kernels if isinstance(self, Sum) else (self,)
        right = other.kernels if isinstance(other, Sum) else (other,)
        return Sum(*left, *right)

    def __mul__(self, other):
        """``k1 * k2`` is `Product` (flattened like `__add__`)."""
        if not isinstance(other, Kernel):
            return NotImplemented
        left = self.kernels if isinstance(self, Product) else (self,)
        right = other.kernels if isinstance(other, Product) else (other,)
        return Product(*left, *right)


def _nilpotent_expm(lam, N, dt, order: int):
    """expm((N - lam I) dt) where N is nilpotent of index ``order``: e^{-lam dt} sum_k (N dt)^k / k!."""
    d = N.shape[0]
    term = jnp.eye(d, dtype=N.dtype)
    total = term
    for k in range(1, order):
        term = term @ N * (dt / k)
        total = total + term
    return jnp.exp(-lam * dt) * total


def _unit(d: int, i: int, dtype):
    return jnp.zeros(d, dtype).at[i].set(1.0)


def _corner(d: int, value):
    """(d, d) zeros with ``value`` in the last diagonal entry: L q L^T for L = e_d."""
    return jnp.zeros((d, d), jnp.result_type(value)).at[-1, -1].set(value)


class _Matern(Kernel):
    lengthscale: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)

    def __init__(self, lengthscale=1.0, variance=1.0):
        self.lengthscale = lengthscale
        self.variance = variance

    def measurement_vector(self):
        return jnp.zeros(self.state_dim, self.variance.dtype).at[0].set(1.0)

    def _nilpotent(self, lam):
        # F + lam I: the companion matrix of (s + lam)^d, shifted; nilpotent of index d
        return self.feedback_matrix() + lam * jnp.eye(self.state_dim, dtype=self.variance.dtype)

    def transition(self, dt):
        lam = self._rate()
        A = _nilpotent_expm(lam, self._nilpotent(lam), dt, self.state_dim)
        Pinf = self.stationary_cov()
        Q = Pinf - A @ Pinf @ A.T
        return A, 0.5 * (Q + Q.T)


class Matern12(_Matern):
    """Matérn-1/2 (exponential, Ornstein-Uhlenbeck): k(tau) = s^2 exp(-tau / l). State dim 1.

    Diffusion Qc = 2 s^2 / l.

    Args:
        lengthscale: l > 0.
        variance: s^2 > 0.
    """

    @property
    def state_dim(self) -> int:
        return 1

    def _rate(self):
        return 1.0 / self.lengthscale

    def feedback_matrix(self):
        return jnp.reshape(-self._rate(), (1, 1))

    def stationary_cov(self):
        return jnp.reshape(self.variance, (1, 1))

    def diffusion_matrix(self):
        return jnp.reshape(2.0 * self.variance * self._rate(), (1, 1))

    def transition(self, dt):
        a = jnp.exp(-dt / self.lengthscale)
        return jnp.reshape(a, (1, 1)), jnp.reshape(self.variance * -jnp.expm1(-2.0 * dt / self.lengthscale), (1, 1))

    def __call__(self, t1, t2):
        return self.variance * jnp.exp(-jnp.abs(jnp.asarray(t1) - jnp.asarray(t2)) / self.lengthscale)


class Matern32(_Matern):
    """Matérn-3/2: k(tau) = s^2 (1 + r) exp(-r), r = sqrt(3) tau / l. State (f, f'), dim 2.

    Diffusion Qc = 4 s^2 lam^3, lam = sqrt(3) / l.

    Args:
        lengthscale: l > 0.
        variance: s^2 > 0.
    """

    @property
    def state_dim(self) -> int:
        return 2

    def _rate(self):
        return jnp.sqrt(3.0) / self.lengthscale

    def feedback_matrix(self):
        lam = self._rate()
        zero, one = jnp.zeros_like(lam), jnp.ones_like(lam)
        return jnp.array([[zero, one], [-lam**2, -2.0 * lam]])

    def stationary_cov(self):
        lam = self._rate()
        return jnp.diag(jnp.stack([self.variance, lam**2 * self.variance]))

    def diffusion_matrix(self):
        return _corner(2, 4.0 * self.variance * self._rate() ** 3)

    def __call__(self, t1, t2):
        r = self._rate() * jnp.abs(jnp.asarray(t1) - jnp.asarray(t2))
        return self.variance * (1.0 + r) * jnp.exp(-r)


class Matern52(_Matern):
    """Matérn-5/2: k(tau) = s^2 (1 + r + r^2 / 3) exp(-r), r = sqrt(5) tau / l. State (f, f', f''), dim 3.

    Diffusion Qc = 16/3 s^2 lam^5, lam = sqrt(5) / l.

    Args:
        lengthscale: l > 0.
        variance: s^2 > 0.
    """

    @property
    def state_dim(self) -> int:
        return 3

    def _rate(self):
        return jnp.sqrt(5.0) / self.lengthscale

    def feedback_matrix(self):
        lam = self._rate()
        zero, one = jnp.zeros_like(lam), jnp.ones_like(lam)
        return jnp.array([[zero, one, zero], [zero, zero, one], [-lam**3, -3.0 * lam**2, -3.0 * lam]])

    def stationary_cov(self):
        lam, s2 = self._rate(), self.variance
        kappa = lam**2 * s2 / 3.0
        zero = jnp.zeros_like(s2)
        return jnp.array([[s2, zero, -kappa], [zero, kappa, zero], [-kappa, zero, lam**4 * s2]])

    def diffusion_matrix(self):
        return _corner(3, 16.0 / 3.0 * self.variance * self._rate() ** 5)

    def __call__(self, t1, t2):
        r = self._rate() * jnp.abs(jnp.asarray(t1) - jnp.asarray(t2))
        return self.variance * (1.0 + r + r**2 / 3.0) * jnp.exp(-r)


# ---------------------------------------------------------------------------------------------
# Squared exponential


#: Largest supported `SquaredExponential.order`: beyond it the companion-form coefficients span
#: too many decades for the float32 transition, and the float64 gain per order is already small.
SE_MAX_ORDER = 12


class _SEScaled(NamedTuple):
    coeffs: np.ndarray
    pinf: np.ndarray
    qc: float
    feedback_bal: np.ndarray
    balance: np.ndarray
    pinf_bal: np.ndarray


@functools.lru_cache(maxsize=None)
def _se_scaled(order: int):
    """The lengthscale-free (l = 1, unit variance) SE state-space model of ``order``, in numpy.

    1 / S(w) of the SE kernel is proportional to exp(w^2 / 2) ~ sum_{k<=N} (w^2 / 2)^k / k!
    (Hartikainen & Särkkä 2010). With y = (i w)^2 = -w^2 that is the truncated exponential
    series p(y) = sum_k (-y / 2)^k / k!, whose N roots y_i are complex (never negative real, where
    p > 0); the stable spectral factor has the N poles r_i = -sqrt(y_i) (principal root, Re > 0),
    so 1 / S(w) = |G(i w)|^2 / (2^N N!) with G(s) = prod_i (s - r_i).

    Returns:
        coeffs: (N,) c_0..c_{N-1} of the monic G(s) = s^N + sum_k c_k s^k.
        pinf: (N, N) the stationary covariance of the companion-form SDE normalised to
            pinf[0, 0] = 1.
        qc: the white-noise rate giving that normalised pinf (1 / P[0, 0] of the qc = 1 solution).
        feedback_bal, balance, pinf_bal: the balanced F_bal = T^-1 F T, diag(T), T^-1 pinf T^-T.
    """
    cl = np.array([(-0.5) ** k / math.factorial(k) for k in range(order + 1)], dtype=np.longdouble)
    y = np.polynomial.polynomial.polyroots(cl.astype(np.float64)).astype(np.clongdouble)
    # a few Newton steps in extended precision: the roots feed every lengthscale, so polish once
    for _ in range(4):
        p = np.zeros_like(y)
        dp = np.zeros_like(y)
        for c in cl[::-1]:
            dp = dp * y + p
            p = p * y + c
        y = y - p / dp
    poles = -np.sqrt(y.astype(np.complex128))
    coeffs = np.real(np.poly(poles))[::-1][:order].copy()
    F = np.zeros((order, order))
    F[np.arange(order - 1), np.arange(1, order)] = 1.0
    F[-1, :] = -coeffs
    LLt = np.zeros((order, order))
    LLt[-1, -1] = 1.0
    P = scipy.linalg.solve_continuous_lyapunov(F, -LLt)
    P = 0.5 * (P + P.T)
    qc = 1.0 / P[0, 0]
    P = P * qc
    # The companion matrix's entries span decades (c_0 ~ 6e4 at N = 10) and the scaling-and-
    # squaring expm loses up to 1e-5 on it (NaN past order 9); a diagonal similarity
    # F_bal = T^-1 F T (powers of 2, so exact) brings them to O(10) and restores ~1e-14.
    F_bal, T = scipy.linalg.matrix_balance(F, permute=False)
    t = np.diag(T).copy()
    P_bal = P / np.outer(t, t)
    for a in (coeffs, P, F_bal, t, P_bal):
        a.setflags(write=False)
    return _SEScaled(coeffs, P, float(qc), F_bal, t, P_bal)


class SquaredExponential(Kernel):
    """Squared-exponential (RBF) kernel k(tau) = s^2 exp(-tau^2 / (2 l^2)), approximated in state
    space by an SDE of dimension ``order`` (Hartikainen & Särkkä 2010).

    The spectral density S(w) = s^2 sqrt(2 pi) l exp(-w^2 l^2 / 2) is replaced by the inverse of
    the order-N Taylor polynomial of exp(w^2 l^2 / 2) and factored into a stable all-pole filter.
    The roots of the lengthscale-free polynomial are found once per order (numpy, cached); the
    poles then scale as 1 / l, so F, Pinf, A and Q are differentiable in l and s^2. The state is
    (f, f', ..., f^{(N-1)}) with F in companion form; Pinf is the Lyapunov solution normalised so
    that the represented variance H Pinf H^T equals ``variance`` exactly (the Taylor truncation
    alone would miss it by a few percent). `__call__` is the exact SE kernel; `ssm_covariance` is
    the approximation. `transition` uses the matrix exponential (there is no closed form; the
    eigen-decomposition of the companion matrix is too ill-conditioned past order 5), computed on
    the lengthscale-free F, balanced, and rescaled.

    Measured max_{0 <= tau <= 5 l} |ssm_covariance(0, tau) - k(tau)| / s^2 (float64; the
    error is the same for every l and s^2, it depends on tau / l only):

        order:  1      2      3      4      5      6      7      8      9      10     11     12
        error:  4.1e-1 1.3e-1 5.2e-2 2.2e-2 9.5e-3 4.3e-3 2.0e-3 9.1e-4 4.3e-4 2.0e-4 9.7e-5 4.7e-5

    i.e. roughly 0.46^N; `SE_ERROR_BOUND` holds these values rounded up (the tests assert them).

    Args:
        lengthscale: l > 0.
        variance: s^2 > 0.
        order: N, the state dimension, a python int in 1..12 (static).
    """

    lengthscale: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    order: int = eqx.field(static=True)

    def __init__(self, lengthscale=1.0, variance=1.0, order: int = 6):
        order = checks.positive_int(order, "SquaredExponential.order")
        if order > SE_MAX_ORDER:
            raise ValueError(f"SquaredExponential.order: expected an integer in 1..{SE_MAX_ORDER}, got {order}")
        self.lengthscale = lengthscale
        self.variance = variance
        self.order = order

    @property
    def state_dim(self) -> int:
        return self.order

    def _dtype(self):
        return jnp.result_type(self.lengthscale, self.variance)

    def _scales(self):
        # D = diag(l^-k): the k-th derivative in time t is l^-k times the one in scaled time t / l
        return self.lengthscale ** -jnp.arange(self.order, dtype=self._dtype())

    def _scaled_feedback(self):
        coeffs = _se_scaled(self.order).coeffs
        N, dtype = self.order, self._dtype()
        F = jnp.eye(N, k=1, dtype=dtype)
        return F.at[-1, :].set(-jnp.asarray(coeffs, dtype))

    def feedback_matrix(self):
        # F = D F~ D^-1 / l: companion form with coefficients c_k l^(k - N)
        D = self._scales()
        return self._scaled_feedback() * (D[:, None] / D[None, :]) / self.lengthscale

    def stationary_cov(self):
        P = _se_scaled(self.order).pinf
        D = self._scales()
        return self.variance * jnp.asarray(P, self._dtype()) * (D[:, None] * D[None, :])

    def diffusion_matrix(self):
        qc = _se_scaled(self.order).qc
        return _corner(self.order, self.variance * qc * self.lengthscale ** (1 - 2 * self.order))

    def measurement_vector(self):
        return _unit(self.order, 0, self._dtype())

    def transition(self, dt):
        m = _se_scaled(self.order)
        dtype = self._dtype()
        # expm of the lengthscale-free, balanced F_bal (entries O(10)) at scaled time dt / l,
        # then the diagonal similarity back: A = V expm(F_bal dt / l) V^-1 with V = D T
        A_b = jax.scipy.linalg.expm(jnp.asarray(m.feedback_bal, dtype) * (dt / self.lengthscale))
        P_b = jnp.asarray(m.pinf_bal, dtype)
        Q_b = P_b - A_b @ P_b @ A_b.T
        Q_b = 0.5 * (Q_b + Q_b.T)
        v = self._scales() * jnp.asarray(m.balance, dtype)
        return A_b * (v[:, None] / v[None, :]), self.variance * Q_b * (v[:, None] * v[None, :])

    def __call__(self, t1, t2):
        r = (jnp.asarray(t1) - jnp.asarray(t2)) / self.lengthscale
        return self.variance * jnp.exp(-0.5 * r**2)


#: Documented bound on max_{0 <= tau <= 5 l} |ssm_covariance - k| / s^2 per SE order (measured
#: errors rounded up).
SE_ERROR_BOUND = {1: 4.2e-1, 2: 1.4e-1, 3: 5.2e-2, 4: 2.2e-2, 5: 9.5e-3, 6: 4.3e-3, 7: 2.0e-3,
                  8: 9.2e-4, 9: 4.3e-4, 10: 2.1e-4, 11: 9.8e-5, 12: 4.7e-5}


# ---------------------------------------------------------------------------------------------
# Periodic kernels


def _rotations(angles):
    """Block-diagonal (2n, 2n) matrix of the 2x2 rotations by ``angles`` (n,)."""
    c, s = jnp.cos(angles), jnp.sin(angles)
    blocks = jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)  # (n, 2, 2)
    n = angles.shape[0]
    eye = jnp.eye(n, dtype=blocks.dtype)
    return jnp.einsum("jk,jab->jakb", eye, blocks).reshape(2 * n, 2 * n)


def _periodic_quadrature_points(num_harmonics: int) -> int:
    # Trapezoidal points on one period. The rule gives the Fourier coefficients q_j exactly up to
    # aliasing by q_{N - j}, and for x = l^-2 the q_j decay like exp(-j^2 / (2 x)): 2048 points
    # keep the aliasing below 1e-16 for j <= 255 up to x = 1e4 (lengthscale >= 0.01).
    return max(2048, 8 * (num_harmonics + 1))


def _periodic_coefficients(lengthscale, num_harmonics: int):
    """Harmonic weights q_j^2 = (2 - [j = 0]) I_j(x) e^{-x}, x = l^-2, for j = 0..J, and the tail
    sum_{j > J} q_j^2 (unit variance; all J+1 weights plus the tail sum to 1).

    The modified Bessel functions come from their integral representation,
    I_j(x) e^{-x} = (1/pi) int_0^pi exp(-2 x sin^2(theta/2)) cos(j theta) d theta, evaluated by the
    trapezoidal rule (an FFT), which is spectrally accurate for this smooth periodic integrand and
    never overflows (the integrand lies in [e^{-2x}, 1]) for tiny or huge x. For j >= 1 the
    integrand's constant part is dropped (expm1), which keeps the small weights accurate to
    relative ~1e-12 when x is tiny (long lengthscales).
    """
    n = _periodic_quadrature_points(num_harmonics)
    dtype = jnp.result_type(lengthscale)
    theta = jnp.arange(n, dtype=dtype) * (2.0 * np.pi / n)
    u = -2.0 * jnp.sin(0.5 * theta) ** 2 / lengthscale**2
    q0 = jnp.mean(jnp.exp(u))
    # weights 2 Re(G_j) / n for 0 < j < n/2, Re(G_{n/2}) / n at the Nyquist frequency
    G = jnp.real(jnp.fft.rfft(jnp.expm1(u))) / n
    w = 2.0 * G.at[-1].multiply(0.5)
    J = num_harmonics
    q = jnp.concatenate([q0[None], w[1:J + 1]])
    return q, jnp.sum(w[J + 1:])


class Periodic(Kernel):
    """Periodic (exp-sine-squared) kernel k(tau) = s^2 exp(-2 sin^2(pi tau / p) / l^2), by its
    truncated Fourier series (Solin & Särkkä 2014).

    With x = l^-2 and w0 = 2 pi / p, k(tau) = s^2 sum_{j>=0} q_j^2 cos(j w0 tau) where
    q_0^2 = I_0(x) e^{-x}, q_j^2 = 2 I_j(x) e^{-x}. The state space keeps j = 0..J: dimension
    2 (J + 1), one oscillator per harmonic, A(dt) = block-diag of the rotations by j w0 dt, Q = 0
    exactly (no diffusion), Pinf = s^2 block-diag(q_j^2 I_2), H = (1, 0, 1, 0, ...).

    The weights are NOT renormalised: `ssm_covariance` is exactly the truncated series, so the
    represented variance is s^2 (1 - tail) and the error k - k_J = s^2 sum_{j>J} q_j^2 cos(j w0 tau)
    is largest at tau = 0, where it equals `truncation_error()` = s^2 sum_{j>J} q_j^2. For
    J + 1 >> x^2 / 4, tail ~ 2 e^{-x} (x/2)^{J+1} / (J+1)! (the leading term of I_{J+1}; the next
    terms multiply it by about exp(x^2 / (4 (J + 2)))); for small l (large x) the weights decay only like
    exp(-j^2 / (2 x)), so J must grow like several / l. Measured tail / s^2 (= the max error):

        J \\ l   0.25     0.5      1        2
        2       5.3e-1   2.0e-1   1.9e-2   5.3e-4
        4       2.6e-1   2.6e-2   2.2e-4   4.1e-7
        6       1.0e-1   2.0e-3   1.3e-6   1.5e-10
        8       3.4e-2   9.4e-5   4.3e-9   3.2e-14
        10      9.2e-3   3.1e-6   9.6e-12  5e-18
        15      1.6e-4   1.6e-10  6e-19    3e-28
        20      9.4e-7   2.0e-15  7e-27    3e-39

    (`truncation_error()` reproduces these to ~3e-16 absolute, the rounding of the weights.)
    The Bessel weights are computed to rounding for l >= 0.01 (see `_periodic_coefficients`).

    Args:
        lengthscale: l > 0 (dimensionless: relative to the period's angle).
        variance: s^2 > 0.
        period: p > 0.
        num_harmonics: J >= 0, a python int (static).
    """

    lengthscale: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    period: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    num_harmonics: int = eqx.field(static=True)

    def __init__(self, lengthscale=1.0, variance=1.0, period=1.0, num_harmonics: int = 6):
        self.num_harmonics = checks.positive_int(num_harmonics, "Periodic.num_harmonics", minimum=0)
        self.lengthscale = lengthscale
        self.variance = variance
        self.period = period

    @property
    def state_dim(self) -> int:
        return 2 * (self.num_harmonics + 1)

    def _dtype(self):
        return jnp.result_type(self.lengthscale, self.variance, self.period)

    def _frequencies(self):
        return jnp.arange(self.num_harmonics + 1, dtype=self._dtype()) * (2.0 * np.pi / self.period)

    def harmonic_variances(self) -> jax.Array:
        """(J+1,) s^2 q_j^2: the variance carried by each harmonic j = 0..J."""
        q, _ = _periodic_coefficients(self.lengthscale.astype(self._dtype()), self.num_harmonics)
        return self.variance * q

    def truncation_error(self) -> jax.Array:
        """s^2 sum_{j>J} q_j^2 = max_tau |k(tau) - ssm_covariance(0, tau)| (attained at tau = 0)."""
        _, tail = _periodic_coefficients(self.lengthscale.astype(self._dtype()), self.num_harmonics)
        return self.variance * tail

    def feedback_matrix(self):
        w = self._frequencies()
        zero = jnp.zeros_like(w)
        blocks = jnp.stack([jnp.stack([zero, -w], -1), jnp.stack([w, zero], -1)], -2)
        eye = jnp.eye(w.shape[0], dtype=blocks.dtype)
        return jnp.einsum("jk,jab->jakb", eye, blocks).reshape(self.state_dim, self.state_dim)

    def stationary_cov(self):
        return jnp.diag(jnp.repeat(self.harmonic_variances(), 2))

    def diffusion_matrix(self):
        return jnp.zeros((self.state_dim, self.state_dim), self._dtype())

    def measurement_vector(self):
        return jnp.tile(jnp.array([1.0, 0.0], self._dtype()), self.num_harmonics + 1)

    def transition(self, dt):
        A = _rotations(self._frequencies() * dt)
        return A, jnp.zeros_like(A)

    def __call__(self, t1, t2):
        tau = jnp.asarray(t1) - jnp.asarray(t2)
        return self.variance * jnp.exp(-2.0 * jnp.sin(np.pi * tau / self.period) ** 2 / self.lengthscale**2)


class Cosine(Kernel):
    """Cosine kernel k(tau) = s^2 cos(2 pi tau / p): one undamped oscillator, state dim 2,
    A(dt) the rotation by 2 pi dt / p, Q = 0, Pinf = s^2 I_2.

    Args:
        variance: s^2 > 0.
        period: p > 0.
    """

    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    period: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)

    def __init__(self, variance=1.0, period=1.0):
        self.variance = variance
        self.period = period

    @property
    def state_dim(self) -> int:
        return 2

    def _dtype(self):
        return jnp.result_type(self.variance, self.period)

    def _frequency(self):
        return (2.0 * np.pi / self.period).astype(self._dtype())

    def feedback_matrix(self):
        w = self._frequency()
        zero = jnp.zeros_like(w)
        return jnp.array([[zero, -w], [w, zero]])

    def stationary_cov(self):
        return self.variance * jnp.eye(2, dtype=self._dtype())

    def diffusion_matrix(self):
        return jnp.zeros((2, 2), self._dtype())

    def measurement_vector(self):
        return _unit(2, 0, self._dtype())

    def transition(self, dt):
        A = _rotations(jnp.reshape(self._frequency() * dt, (1,)))
        return A, jnp.zeros_like(A)

    def __call__(self, t1, t2):
        tau = jnp.asarray(t1) - jnp.asarray(t2)
        return self.variance * jnp.cos(2.0 * np.pi * tau / self.period)


class Constant(Kernel):
    """Constant kernel k(tau) = s^2 (a random offset): state dim 1, A = 1, Q = 0, Pinf = s^2.

    Args:
        variance: s^2 > 0.
    """

    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)

    def __init__(self, variance=1.0):
        self.variance = variance

    @property
    def state_dim(self) -> int:
        return 1

    def feedback_matrix(self):
        return jnp.zeros((1, 1), self.variance.dtype)

    def stationary_cov(self):
        return jnp.reshape(self.variance, (1, 1))

    def diffusion_matrix(self):
        return jnp.zeros((1, 1), self.variance.dtype)

    def measurement_vector(self):
        return jnp.ones(1, self.variance.dtype)

    def transition(self, dt):
        A = jnp.ones((1, 1), self.variance.dtype)
        return A, jnp.zeros_like(A)

    def __call__(self, t1, t2):
        shape = jnp.broadcast_shapes(jnp.shape(t1), jnp.shape(t2))
        return jnp.broadcast_to(self.variance, shape)


class Linear(Kernel):
    """Linear-trend kernel k(t, t') = s_b^2 + s^2 (t - c)(t' - c): f(t) = a + b (t - c) with intercept
    a ~ N(0, s_b^2) and slope b ~ N(0, s^2). Not stationary.

    State (f, f'), F = [[0, 1], [0, 0]], A(dt) = [[1, dt], [0, 1]], Q = 0 (no diffusion); the
    state covariance at the first time is ``initial_cov(t0) = [[s_b^2 + s^2 u^2, s^2 u], [s^2 u, s^2]]``
    with u = t0 - c, positive definite (the smoother inverts the predicted covariance; a trend
    without intercept, s_b = 0, would make it singular). `stationary_cov` raises ValueError: the
    state has no stationary law (its variance grows as (t - c)^2), so every consumer must start
    from `initial_cov`.

    Args:
        variance: s^2 > 0, the slope variance.
        offset: c, the reference time of the intercept (real).
        bias_variance: s_b^2 > 0, the intercept variance.
    """

    variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)
    offset: jax.Array = eqx.field(converter=_scalar, metadata=REAL)
    bias_variance: jax.Array = eqx.field(converter=_scalar, metadata=POSITIVE)

    stationary = False

    def __init__(self, variance=1.0, offset=0.0, bias_variance=1.0):
        self.variance = variance
        self.offset = offset
        self.bias_variance = bias_variance

    @property
    def state_dim(self) -> int:
        return 2

    def _dtype(self):
        return jnp.result_type(self.variance, self.offset, self.bias_variance)

    def feedback_matrix(self):
        return jnp.eye(2, k=1, dtype=self._dtype())

    def stationary_cov(self):
        raise ValueError("Linear kernel: the state (f, f') has no stationary covariance (its variance "
                         "grows as (t - offset)^2); use initial_cov(t0)")

    def diffusion_matrix(self):
        return jnp.zeros((2, 2), self._dtype())

    def initial_cov(self, t0):
        u = jnp.asarray(t0, self._dtype()) - self.offset
        v = jnp.stack([u, jnp.ones_like(u)])
        return (self.variance * jnp.outer(v, v)).at[0, 0].add(self.bias_variance)

    def measurement_vector(self):
        return _unit(2, 0, self._dtype())

    def transition(self, dt):
        dt = jnp.asarray(dt, self._dtype())
        A = jnp.eye(2, dtype=self._dtype()).at[0, 1].set(dt)
        return A, jnp.zeros_like(A)

    def check(self, name: str = "kernel") -> None:
        _positive_field(self, "variance", name)
        _positive_field(self, "bias_variance", name)
        _finite_field(self, "offset", name)

    def __call__(self, t1, t2):
        return self.bias_variance + self.variance * (jnp.asarray(t1) - self.offset) * (jnp.asarray(t2) - self.offset)


# ---------------------------------------------------------------------------------------------
# Combinations


def _kernel_tuple(kernels, cls: str):
    if len(kernels) < 1:
        raise ValueError(f"{cls}: expected at least one kernel")
    for i, k in enumerate(kernels):
        if not isinstance(k, Kernel):
            raise TypeError(f"{cls}: kernels[{i}]: expected a Kernel, got {type(k).__name__}")
    return tuple(kernels)


class Sum(Kernel):
    """Sum of kernels k = k_1 + ... + k_m: independent processes added, f = sum_i f_i.

    The state stacks the parts' states: F, Pinf, A, Q, `initial_cov` and the diffusion are
    block-diagonal and H is the concatenation. Non-stationary parts (`Linear`) are allowed; the
    sum is then non-stationary (`stationary` is the AND of the parts) and `stationary_cov` raises.

    Args:
        *kernels: one or more kernels, stored as the tuple ``kernels``.
    """

    kernels: tuple

    def __init__(self, *kernels):
        self.kernels = _kernel_tuple(kernels, "Sum")

    @property
    def stationary(self) -> bool:
        return all(k.stationary for k in self.kernels)

    @property
    def state_dim(self) -> int:
        return sum(k.state_dim for k in self.kernels)

    def feedback_matrix(self):
        return _block_diag(*(k.feedback_matrix() for k in self.kernels))

    def stationary_cov(self):
        return _block_diag(*(k.stationary_cov() for k in self.kernels))

    def diffusion_matrix(self):
        return _block_diag(*(k.diffusion_matrix() for k in self.kernels))

    def initial_cov(self, t0):
        return _block_diag(*(k.initial_cov(t0) for k in self.kernels))

    def measurement_vector(self):
        return jnp.concatenate([k.measurement_vector() for k in self.kernels])

    def transition(self, dt):
        AQ = [k.transition(dt) for k in self.kernels]
        return _block_diag(*(a for a, _ in AQ)), _block_diag(*(q for _, q in AQ))

    def check(self, name: str = "kernel") -> None:
        for i, k in enumerate(self.kernels):
            k.check(f"{name}.kernels.{i}")

    def __call__(self, t1, t2):
        return functools.reduce(jnp.add, (k(t1, t2) for k in self.kernels))


class Product(Kernel):
    """Product of stationary kernels k = k_1 * ... * k_m (e.g. quasi-periodic
    ``Product(Periodic(...), Matern32(...))``), by the Kronecker construction (Solin 2016):

    F = F_1 ⊗ I + I ⊗ F_2, Pinf = P_1 ⊗ P_2, H = H_1 ⊗ H_2, A(dt) = A_1(dt) ⊗ A_2(dt),
    Q = Pinf - A Pinf A^T, diffusion L Qc L^T = S_1 ⊗ P_2 + P_1 ⊗ S_2; folded left to right for
    more factors. The state dimension is the product of the factors'.

    Args:
        *kernels: one or more stationary kernels, stored as the tuple ``kernels``.

    Raises:
        ValueError: naming the factor if one is not stationary (`Linear`, or a `Sum` holding one):
            the Kronecker identities need a stationary law.
    """

    kernels: tuple

    def __init__(self, *kernels):
        kernels = _kernel_tuple(kernels, "Product")
        for i, k in enumerate(kernels):
            if not k.stationary:
                raise ValueError(f"Product: kernels[{i}] ({type(k).__name__}) is not stationary; the "
                                 "Kronecker state-space product needs stationary factors")
        self.kernels = kernels

    @property
    def state_dim(self) -> int:
        return math.prod(k.state_dim for k in self.kernels)

    def feedback_matrix(self):
        def ksum(F1, F2):
            return (jnp.kron(F1, jnp.eye(F2.shape[0], dtype=F1.dtype))
                    + jnp.kron(jnp.eye(F1.shape[0], dtype=F2.dtype), F2))
        return functools.reduce(ksum, (k.feedback_matrix() for k in self.kernels))

    def stationary_cov(self):
        return functools.reduce(jnp.kron, (k.stationary_cov() for k in self.kernels))

    def diffusion_matrix(self):
        S, P = self.kernels[0].diffusion_matrix(), self.kernels[0].stationary_cov()
        for k in self.kernels[1:]:
            S2, P2 = k.diffusion_matrix(), k.stationary_cov()
            S, P = jnp.kron(S, P2) + jnp.kron(P, S2), jnp.kron(P, P2)
        return S

    def measurement_vector(self):
        return functools.reduce(jnp.kron, (k.measurement_vector() for k in self.kernels))

    def transition(self, dt):
        A = functools.reduce(jnp.kron, (k.transition(dt)[0] for k in self.kernels))
        Pinf = self.stationary_cov()
        Q = Pinf - A @ Pinf @ A.T
        return A, 0.5 * (Q + Q.T)

    def check(self, name: str = "kernel") -> None:
        for i, k in enumerate(self.kernels):
            k.check(f"{name}.kernels.{i}")

    def __call__(self, t1, t2):
        return functools.reduce(jnp.multiply, (k(t1, t2) for k in self.kernels))
