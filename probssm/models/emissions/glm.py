"""Generalised linear emissions: the interface, the Poisson and Bernoulli families, their
links and custom-derivative kernels, and the spike-history covariates they read.

* `AbstractGLMEmissions`: y_{t,d} | z_t = k ~ F(g(biases[k, d] + weights[k, d] @ x_t)), the
  interface every GLM family implements (weights (K, D, U), biases (K, D), covariate rows x_t
  passed as ``inputs`` (T, U)).
* `PoissonGLM`, `BernoulliGLM`: the families of the HMM-GLM (`probssm.models.hmmglm`), with the
  inverse links ``"exp"``, ``"softplus"`` and ``"sigmoid"`` (`link_mean`, `link_log_mean`).
* `glm_kernel(family, link)`: the elementwise log-density f(y, eta) (without log y!) as a
  function of the linear predictor, with a custom JVP that shares the transcendental functions
  between value and slope (`glm_value_and_slope`): the inner loop of the HMM-GLM's M-step.
* Spike-history covariates: `history_covariates` filters the past counts through a fixed basis
  (`exponential_basis`, the paper's L = 5 filter, or `raised_cosine_basis`).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln

from probssm.core import checks
from probssm.core import params as core_params
from probssm.core.lags import lagged_inputs
from probssm.core.optim import descend
from probssm.models.emissions.base import REAL, AbstractEmissions, check_support

__all__ = [
    "AbstractGLMEmissions", "PoissonGLM", "BernoulliGLM", "LINKS", "FAMILIES", "check_link", "link_mean",
    "link_log_mean", "glm_value_and_slope", "glm_kernel", "EXPONENTIAL_BASIS", "exponential_basis",
    "raised_cosine_basis", "history_covariates",
]

LINKS = ("exp", "softplus", "sigmoid")
FAMILIES = ("poisson", "bernoulli")
EXPONENTIAL_BASIS = (0.636, 0.234, 0.086, 0.032, 0.012)


class AbstractGLMEmissions(AbstractEmissions):
    """Generalised linear emissions: y_{t,d} | z_t = k ~ F(g(biases[k, d] + weights[k, d] @ x_t)).

    Subclasses hold ``weights`` (K, D, U) and ``biases`` (K, D) and define
    `mean_function` (the inverse link g) and `log_prob` (elementwise log density of
    y given the mean). The per-state log-likelihoods follow; missing entries are
    dropped. There is no closed-form M-step: `m_step` takes ``num_m_steps`` Adam
    steps on the weighted expected log-likelihood plus `log_prior` (a generalised
    EM step), which subclasses may override with something better.
    """

    weights: eqx.AbstractVar[jax.Array]
    biases: eqx.AbstractVar[jax.Array]
    learnable: ClassVar[tuple] = ("weights", "biases")
    num_m_steps: ClassVar[int] = 50
    learning_rate: ClassVar[float] = 1e-2

    @abc.abstractmethod
    def mean_function(self, eta):
        """Inverse link g: linear predictor -> mean of y."""

    @abc.abstractmethod
    def log_prob(self, y, mean):
        """Elementwise log p(y | mean)."""

    @property
    def num_states(self):
        return self.weights.shape[0]

    @property
    def emission_dim(self):
        return self.weights.shape[1]

    def predictor(self, inputs):
        """(T, U) inputs -> (T, K, D) linear predictor."""
        return jnp.einsum("kdu,tu->tkd", self.weights, inputs) + self.biases[None]

    def log_likelihoods(self, emissions, inputs=None):
        """(T, D) emissions, (T, U) covariates -> (T, K); NaN entries are dropped."""
        if inputs is None:
            raise ValueError("inputs: GLM emissions need inputs (T, U)")
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        lp = self.log_prob(y[:, None, :], self.mean_function(self.predictor(jnp.nan_to_num(inputs))))
        return jnp.sum(jnp.where(m[:, None, :], lp, 0.0), -1)

    def m_step(self, emissions, weights, inputs=None, prior=None, fixed=frozenset()):
        import optax

        names = tuple(n for n in self.learnable if n not in fixed)
        if not names:
            return self
        params = {n: core_params.get(self, n) for n in names}
        num_obs = jnp.maximum(weights.sum(), 1.0)

        def loss(p):
            e = core_params.replace(self, names, tuple(p[n] for n in names))
            return -(jnp.sum(weights * e.log_likelihoods(emissions, inputs)) + e.log_prior(prior)) / num_obs

        params = descend(loss, params, optax.adam(self.learning_rate), self.num_m_steps)
        return core_params.replace(self, names, tuple(params[n] for n in names))


# ----------------------------------------------------------------------------------------------
# Links and the elementwise kernels
# ----------------------------------------------------------------------------------------------
def check_link(family: str, link: str) -> None:
    """ValueError unless ``family`` is in `FAMILIES` and ``link`` in `LINKS`."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if link not in LINKS:
        raise ValueError(f"link: expected one of {LINKS}, got {link!r}")


def _log_softplus(x):
    """log(softplus(x)), exact to rounding for very negative x (where it is x)."""
    safe = jnp.maximum(x, -30.0)
    return jnp.where(x < -30.0, x, jnp.log(jax.nn.softplus(safe)))


def link_mean(link: str, eta):
    """The inverse link g(eta), elementwise: exp, softplus or sigmoid."""
    if link == "exp":
        return jnp.exp(eta)
    if link == "softplus":
        return jax.nn.softplus(eta)
    if link == "sigmoid":
        return jax.nn.sigmoid(eta)
    raise ValueError(f"link: expected one of {LINKS}, got {link!r}")


def link_log_mean(link: str, eta):
    """log g(eta), elementwise and stable for very negative eta."""
    if link == "exp":
        return eta
    if link == "softplus":
        return _log_softplus(eta)
    if link == "sigmoid":
        return jax.nn.log_sigmoid(eta)
    raise ValueError(f"link: expected one of {LINKS}, got {link!r}")


def glm_value_and_slope(family: str, link: str, y, eta):
    """Elementwise f(eta) = log p(y | eta) without the log y! term, and df/deta, sharing
    the transcendental functions between the two (this is the inner loop of the M-step).

    Poisson: f = y log g(eta) - g(eta). Bernoulli with the sigmoid link: f = y eta - softplus(eta);
    with exp / softplus: P(y = 1) = 1 - exp(-g(eta)), the probability that a Poisson(g(eta))
    count is positive (a binarised Poisson GLM).
    """
    if link == "exp":
        lam = jnp.exp(eta)
        log_lam, dlam = eta, lam  # d lambda / d eta
    elif link == "softplus":
        e = jnp.exp(-jnp.abs(eta))
        lam = jnp.maximum(eta, 0.0) + jnp.log1p(e)
        sig = jnp.where(eta >= 0, 1.0, e) / (1.0 + e)
        log_lam = jnp.log(jnp.maximum(lam, jnp.finfo(lam.dtype).tiny))
        dlam = sig
    else:  # sigmoid
        e = jnp.exp(-jnp.abs(eta))
        sig = jnp.where(eta >= 0, 1.0, e) / (1.0 + e)
        lam = sig
        log_lam = jnp.minimum(eta, 0.0) - jnp.log1p(e)
        dlam = sig * (1.0 - sig)
    if family == "poisson":
        f = y * log_lam - lam
        slope = (y / jnp.maximum(lam, jnp.finfo(lam.dtype).tiny) - 1.0) * dlam
        if link == "exp":
            slope = y - lam
        return f, slope
    if link == "sigmoid":  # Bernoulli-logit: y eta - softplus(eta)
        e = jnp.exp(-jnp.abs(eta))
        sig = jnp.where(eta >= 0, 1.0, e) / (1.0 + e)
        return y * eta - (jnp.maximum(eta, 0.0) + jnp.log1p(e)), y - sig
    # Bernoulli with P(count > 0) = 1 - exp(-lambda): y log(1 - e^-lam) - (1 - y) lam
    lam_safe = jnp.maximum(lam, 1e-30)
    em1 = -jnp.expm1(-lam_safe)  # 1 - e^-lam
    f = jnp.where(y > 0, jnp.log(em1), -lam)
    slope = jnp.where(y > 0, jnp.exp(-lam_safe) / em1, -1.0) * dlam
    return f, slope


_KERNELS: dict = {}


def glm_kernel(family: str, link: str):
    """f(y, eta) of `glm_value_and_slope` with a custom JVP in eta (y is data); cached per
    (family, link), so every caller traces the same function."""
    check_link(family, link)
    if (family, link) in _KERNELS:
        return _KERNELS[family, link]

    @jax.custom_jvp
    def f(y, eta):
        return glm_value_and_slope(family, link, y, eta)[0]

    @f.defjvp
    def f_jvp(primals, tangents):
        y, eta = primals
        _, deta = tangents
        value, slope = glm_value_and_slope(family, link, y, eta)
        return value, slope * deta

    _KERNELS[family, link] = f
    return f


# ----------------------------------------------------------------------------------------------
# The Poisson and Bernoulli GLM families
# ----------------------------------------------------------------------------------------------
class _GLMFamily(AbstractGLMEmissions):
    weights: jax.Array = eqx.field(metadata=REAL)
    biases: jax.Array = eqx.field(metadata=REAL)
    link: str = eqx.field(static=True, default="softplus")
    family: ClassVar[str] = ""

    def __init__(self, weights, biases, link: str = "softplus"):
        check_link(self.family, link)
        w = jnp.asarray(weights)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            w = w.astype(jnp.result_type(float))
        checks.finite(w, "weights")
        if w.ndim != 3:
            raise ValueError(f"weights: expected shape (K, D, U), got shape {tuple(w.shape)}")
        K, D, _ = w.shape
        b = jnp.asarray(biases, w.dtype)
        if b.shape == (D,):
            b = jnp.broadcast_to(b, (K, D))
        checks.shape(b, "biases", (K, D), f"({K}, {D}) or ({D},)")
        checks.finite(b, "biases")
        self.weights, self.biases, self.link = w, b, link

    def mean_function(self, eta):
        return link_mean(self.link, eta)

    def log_likelihoods(self, emissions, inputs=None):
        """Evaluated from the linear predictor (stable for every link); NaN entries are dropped."""
        if inputs is None:
            raise ValueError("inputs: GLM emissions need the covariates (T, U)")
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        lp = glm_kernel(self.family, self.link)(y[:, None, :], self.predictor(jnp.nan_to_num(inputs)))
        if self.family == "poisson":
            lp = lp - gammaln(y[:, None, :] + 1.0)
        return jnp.sum(jnp.where(m[:, None, :], lp, 0.0), -1)


class PoissonGLM(_GLMFamily):
    """y_{t,d} | z_t = k ~ Poisson(g(biases[k, d] + weights[k, d] @ x_t)).

    Args:
        weights: (K, D, U); biases: (K, D) or (D,) (shared by the states);
        link: "exp" (canonical), "softplus" or "sigmoid".
    """

    family: ClassVar[str] = "poisson"

    def check_emissions(self, emissions) -> None:
        """Counts must be non-negative integers (NaN = missing)."""
        check_support(emissions, "PoissonGLM", integer=True, low=0)

    def log_prob(self, y, mean):
        return jnp.where(y > 0, y * jnp.log(mean), 0.0) - mean - gammaln(y + 1.0)

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: PoissonGLM.distribution needs the covariate row x_t")
        return dist.Poisson(self.mean_function(self.weights[state] @ inputs + self.biases[state])).to_event(1)


class BernoulliGLM(_GLMFamily):
    """y_{t,d} | z_t = k ~ Bernoulli(p), p = sigmoid(eta) for the sigmoid link and
    p = 1 - exp(-g(eta)) for exp / softplus (a binarised Poisson); eta = biases[k, d] + weights[k, d] @ x_t."""

    family: ClassVar[str] = "bernoulli"

    def __init__(self, weights, biases, link: str = "sigmoid"):
        super().__init__(weights, biases, link)

    def check_emissions(self, emissions) -> None:
        """Values must be 0 or 1 (NaN = missing)."""
        check_support(emissions, "BernoulliGLM", integer=True, low=0, high=1)

    def mean_function(self, eta):
        if self.link == "sigmoid":
            return jax.nn.sigmoid(eta)
        return -jnp.expm1(-link_mean(self.link, eta))

    def log_prob(self, y, mean):
        return jnp.where(y > 0, jnp.log(mean), jnp.log1p(-mean))

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: BernoulliGLM.distribution needs the covariate row x_t")
        return dist.Bernoulli(probs=self.mean_function(self.weights[state] @ inputs + self.biases[state])).to_event(1)


# ----------------------------------------------------------------------------------------------
# Spike-history bases and covariates
# ----------------------------------------------------------------------------------------------
def exponential_basis(weights=EXPONENTIAL_BASIS):
    """The paper's fixed filter: one basis function of length L = 5 (J = 1). Returns (1, L)."""
    return jnp.asarray(np.asarray(weights, dtype=float)[None, :])


def raised_cosine_basis(num_bases: int = 4, length: int = 20, *, offset: float = 1.0):
    """Raised-cosine bumps on a log-time axis (Pillow et al. 2008), each normalised to unit sum.

    phi_j(l) = (1 + cos(clip(log(l + offset) - c_j, -pi, pi))) / 2 for lags l = 1..length,
    with centres c_j equally spaced (spacing pi / 2) between log(1 + offset) and
    log(length + offset). Returns (num_bases, length).
    """
    num_bases = checks.positive_int(num_bases, "num_bases")
    length = checks.positive_int(length, "length")
    if not offset > 0:
        raise ValueError(f"offset: expected a positive float, got {offset!r}")
    lags = np.arange(1, length + 1, dtype=float)
    x = np.log(lags + offset)
    lo, hi = x[0], x[-1]
    centres = np.linspace(lo, hi, num_bases) if num_bases > 1 else np.array([lo])
    width = (centres[1] - centres[0]) if num_bases > 1 else (hi - lo + 1.0)
    arg = np.clip((x[None, :] - centres[:, None]) * np.pi / (2 * width), -np.pi, np.pi)
    phi = 0.5 * (1.0 + np.cos(arg))
    phi = phi / phi.sum(1, keepdims=True)
    return jnp.asarray(phi)


def history_covariates(emissions, basis):
    """h_{t,n',j} = sum_{l=1..L} basis[j, l-1] * emissions[t-l, n'] (zero before the trial).

    Args:
        emissions: (T, N) or (M, T, N) counts.
        basis: (J, L).

    Returns:
        (T, N * J) or (M, T, N * J); column n' * J + j holds h_{t,n',j}.
    """
    y = jnp.asarray(emissions)
    if not jnp.issubdtype(y.dtype, jnp.floating):  # integer counts: the basis must not be cast to int
        y = y.astype(jnp.result_type(float))
    J, L = basis.shape
    N = y.shape[-1]
    lagged = lagged_inputs(y, L)  # (..., T, L * N), block l holds y_{t-l-1}
    lagged = lagged.reshape(y.shape[:-1] + (L, N))
    h = jnp.einsum("...ln,jl->...nj", lagged, jnp.asarray(basis, lagged.dtype))
    return h.reshape(y.shape[:-1] + (N * J,))
