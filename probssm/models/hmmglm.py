"""HMM-GLM: switching generalised linear models for multi-neuron spike counts.

Li, Kim, Rodgers, Choi, Wu, "One-hot generalized linear model for switching brain
state discovery" (ICLR 2024, arXiv 2310.15263). A hidden state z_t in {0..K-1}
follows a (sticky) Markov chain; given z_t = k the N neurons fire independently,

    x_{t,n} ~ F(g(b_n + sum_{n'} sum_j w^{(k)}_{n<-n',j} h_{t,n',j} + v^{(k)}_n . u_t)),
    h_{t,n',j} = sum_{l=1..L} phi_{j,l} x_{t-l,n'}                (spike history through a fixed basis)

with F = Poisson (counts) or Bernoulli (binary bins), g an inverse link (exp,
softplus or sigmoid), b_n a per-neuron bias, phi a fixed basis (`exponential_basis`,
the L = 5 filter .636 .234 .086 .032 .012 of the paper, or `raised_cosine_basis`),
u_t optional external covariates. Spikes before the start of a trial count as zero.

Weight priors (``prior=``):

* ``"none"``: the plain HMM-GLM; ``weights`` (K, N, N, J) are free.
* ``"gaussian"``: w^{(k)} ~ N(W_bar, s^2) elementwise, with the state-constant part
  W_bar = ``weight_mean`` (N, N, J) and s = ``min_weight_scale`` + softplus(``weight_scale_param``)
  learnable (the floor, 0.1 by default, keeps the MAP from collapsing all states onto W_bar).
* ``"onehot"``: w^{(k)}_{n<-n',j} = (a^{(k)}_{exc} - a^{(k)}_{inh}) * s^{(k)}_{n<-n',j}, with strengths
  s = ``min_strength`` + softplus(``strength_params``) and a^{(k)}_{n<-n'} a one-hot indicator over
  {inhibitory, none, excitatory}.
  While learning, a^{(k)} is a Gumbel-softmax (Concrete) sample of temperature
  ``temperature`` (0.2) from the per-state class probabilities
  q^{(k)} = softmax(``adjacency_logits``[k]); its prior has class probabilities
  p = softmax(``connectome_logits``) (N, N, 3) shared across states: the connectome.
  The log prior used by the learner is -sum_k KL(q^{(k)} || p) (the expected log
  prior plus the entropy of the indicators), which pulls every state's signs
  towards one shared connectome. At evaluation the indicators are hard:
  a^{(k)} = one_hot(argmax q^{(k)}).

The model is an `AbstractDiscreteSSM`: ``discrete_params(spikes, inputs)`` builds
the history covariates from the spikes of one trial (``inputs`` are the external
covariates (T, U), or None) and evaluates the emission log-likelihoods with the
hard weights, so `ps.hmm.filter / smoother / viterbi` run on it directly.
`PoissonGLM` / `BernoulliGLM` are the same emissions as `ps.emissions.AbstractGLMEmissions`
families (``model.glm()``). Learning: `probssm.learn.hmmglm_em.fit_hmmglm`.
Transitions are sticky by default. Optionally they are input-driven (``transition_input_weights``
R (K, U), as in the input-driven HMMs of the `ssm` package):

    p(z_t = j | z_{t-1} = i, u_t) = A_ij exp(r_j . u_t) / sum_j' A_ij' exp(r_j' . u_t),

so that A is the transition matrix at u_t = 0 and the external covariates u_t tilt every
row towards the states they favour. The transitions read the same inputs as the emissions;
to let them drive only the transitions, hold ``input_weights`` at zero
(``fit_hmmglm(..., fixed=("input_weights",))``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.lags import lagged_inputs
from probssm.core.protocol import AbstractDiscreteSSM, DiscreteParams
from probssm.models.emissions import AbstractGLMEmissions

__all__ = [
    "EXPONENTIAL_BASIS",
    "exponential_basis",
    "raised_cosine_basis",
    "history_covariates",
    "PoissonGLM",
    "BernoulliGLM",
    "HMMGLM",
    "SimulatedHMMGLM",
    "simulate_hmmglm",
    "check_spikes",
]

EXPONENTIAL_BASIS = (0.636, 0.234, 0.086, 0.032, 0.012)
LINKS = ("exp", "softplus", "sigmoid")
FAMILIES = ("poisson", "bernoulli")
PRIORS = ("none", "gaussian", "onehot")
REAL = {"constraint": constraints.real}
SIMPLEX = {"constraint": constraints.simplex}


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


def history_covariates(spikes, basis):
    """h_{t,n',j} = sum_{l=1..L} basis[j, l-1] * spikes[t-l, n'] (zero before the trial).

    Args:
        spikes: (T, N) or (M, T, N).
        basis: (J, L).

    Returns:
        (T, N * J) or (M, T, N * J); column n' * J + j holds h_{t,n',j}.
    """
    y = jnp.asarray(spikes)
    J, L = basis.shape
    N = y.shape[-1]
    lagged = lagged_inputs(y, L)  # (..., T, L * N), block l holds y_{t-l-1}
    lagged = lagged.reshape(y.shape[:-1] + (L, N))
    h = jnp.einsum("...ln,jl->...nj", lagged, jnp.asarray(basis, lagged.dtype))
    return h.reshape(y.shape[:-1] + (N * J,))


# ----------------------------------------------------------------------------------------------
# Links and GLM emission families
# ----------------------------------------------------------------------------------------------
def _softplus(x):
    return jax.nn.softplus(x)


def _log_softplus(x):
    """log(softplus(x)), exact to rounding for very negative x (where it is x)."""
    safe = jnp.maximum(x, -30.0)
    return jnp.where(x < -30.0, x, jnp.log(jax.nn.softplus(safe)))


def link_mean(link: str, eta):
    if link == "exp":
        return jnp.exp(eta)
    if link == "softplus":
        return _softplus(eta)
    if link == "sigmoid":
        return jax.nn.sigmoid(eta)
    raise AssertionError(link)


def link_log_mean(link: str, eta):
    if link == "exp":
        return eta
    if link == "softplus":
        return _log_softplus(eta)
    if link == "sigmoid":
        return jax.nn.log_sigmoid(eta)
    raise AssertionError(link)


def _poisson_log_prob(link, y, eta):
    """y log(lambda) - lambda - log y!, with 0 * log(0) = 0."""
    return _kernel("poisson", link)(y, eta) - gammaln(y + 1.0)


def _bernoulli_log_prob(link, y, eta):
    """sigmoid link: p = sigmoid(eta); exp / softplus links: p = 1 - exp(-g(eta)), the
    probability that a Poisson(g(eta)) count is positive (a binarised Poisson GLM)."""
    return _kernel("bernoulli", link)(y, eta)


def _value_and_slope(family, link, y, eta):
    """Elementwise f(eta) = log p(y | eta) without the log y! term, and df/deta, sharing
    the transcendental functions between the two (this is the inner loop of the M-step)."""
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


_KERNELS = {}


def _kernel(family, link):
    """f(y, eta) with a custom derivative in eta (y is data)."""
    if (family, link) in _KERNELS:
        return _KERNELS[family, link]

    @jax.custom_jvp
    def f(y, eta):
        return _value_and_slope(family, link, y, eta)[0]

    @f.defjvp
    def f_jvp(primals, tangents):
        y, eta = primals
        _, deta = tangents
        value, slope = _value_and_slope(family, link, y, eta)
        return value, slope * deta

    _KERNELS[family, link] = f
    return f


def _check_link(family, link):
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if link not in LINKS:
        raise ValueError(f"link: expected one of {LINKS}, got {link!r}")


class _GLMBase(AbstractGLMEmissions):
    weights: jax.Array = eqx.field(metadata=REAL)
    biases: jax.Array = eqx.field(metadata=REAL)
    link: str = eqx.field(static=True, default="softplus")
    family: ClassVar[str] = ""

    def __init__(self, weights, biases, link: str = "softplus"):
        _check_link(self.family, link)
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

    def _log_prob_eta(self, y, eta):
        raise NotImplementedError

    def log_likelihoods(self, emissions, inputs=None):
        """Evaluated from the linear predictor (stable for every link); NaN entries are dropped."""
        if inputs is None:
            raise ValueError("inputs: GLM emissions need the covariates (T, U)")
        m = ~jnp.isnan(emissions)
        y = jnp.where(m, emissions, 0.0)
        lp = self._log_prob_eta(y[:, None, :], self.predictor(jnp.nan_to_num(inputs)))
        return jnp.sum(jnp.where(m[:, None, :], lp, 0.0), -1)


class PoissonGLM(_GLMBase):
    """y_{t,d} | z_t = k ~ Poisson(g(biases[k, d] + weights[k, d] @ x_t)).

    Args:
        weights: (K, D, U); biases: (K, D) or (D,) (shared by the states);
        link: "exp" (canonical), "softplus" or "sigmoid".
    """

    family: ClassVar[str] = "poisson"

    def log_prob(self, y, mean):
        return jnp.where(y > 0, y * jnp.log(mean), 0.0) - mean - gammaln(y + 1.0)

    def _log_prob_eta(self, y, eta):
        return _poisson_log_prob(self.link, y, eta)

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: PoissonGLM.distribution needs the covariate row x_t")
        return dist.Poisson(self.mean_function(self.weights[state] @ inputs + self.biases[state])).to_event(1)


class BernoulliGLM(_GLMBase):
    """y_{t,d} | z_t = k ~ Bernoulli(p), p = sigmoid(eta) for the sigmoid link and
    p = 1 - exp(-g(eta)) for exp / softplus (a binarised Poisson); eta = biases[k, d] + weights[k, d] @ x_t."""

    family: ClassVar[str] = "bernoulli"

    def __init__(self, weights, biases, link: str = "sigmoid"):
        super().__init__(weights, biases, link)

    def mean_function(self, eta):
        if self.link == "sigmoid":
            return jax.nn.sigmoid(eta)
        return -jnp.expm1(-link_mean(self.link, eta))

    def log_prob(self, y, mean):
        return jnp.where(y > 0, jnp.log(mean), jnp.log1p(-mean))

    def _log_prob_eta(self, y, eta):
        return _bernoulli_log_prob(self.link, y, eta)

    def distribution(self, state, inputs=None):
        if inputs is None:
            raise ValueError("inputs: BernoulliGLM.distribution needs the covariate row x_t")
        return dist.Bernoulli(probs=self.mean_function(self.weights[state] @ inputs + self.biases[state])).to_event(1)


# ----------------------------------------------------------------------------------------------
# Input checks shared by the model, the learner and the simulator
# ----------------------------------------------------------------------------------------------
def check_spikes(spikes, family: str, num_neurons: int, history_length: int, name: str = "spikes"):
    """Validate spike data of shape (T, N) or (M, T, N); returns (float array, batched flag).

    Poisson counts must be non-negative integers, Bernoulli bins 0 or 1; N must match
    the model; the trial must be longer than the history basis.
    """
    y = jnp.asarray(spikes)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape (T, N) or (M, T, N), got shape {tuple(y.shape)}")
    if y.shape[-1] != num_neurons:
        raise ValueError(f"{name}: expected {num_neurons} neurons (the model's N) in the last axis, "
                         f"got shape {tuple(y.shape)}")
    T = y.shape[-2]
    if history_length >= T:
        raise ValueError(f"basis: the history basis has length {history_length}, not shorter than the trial "
                         f"({T} time bins); use a shorter basis or longer trials")
    if checks.is_concrete(y):
        a = np.asarray(y)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: expected finite spike counts, found NaN or inf")
        if family == "poisson":
            if np.any(a < 0):
                raise ValueError(f"{name}: Poisson counts must be non-negative, found {a.min():g}")
            if np.any(a != np.round(a)):
                bad = a[a != np.round(a)].ravel()[0]
                raise ValueError(f"{name}: Poisson counts must be integers, found {bad:g}")
        elif np.any((a != 0) & (a != 1)):
            bad = a[(a != 0) & (a != 1)].ravel()[0]
            raise ValueError(f"{name}: Bernoulli bins must be 0 or 1, found {bad:g}")
    return y, y.ndim == 3


def _sticky(K, stickiness, dtype):
    if K == 1:
        return np.ones((1, 1), dtype)
    off = (1.0 - stickiness) / (K - 1)
    return np.full((K, K), off, dtype) + (stickiness - off) * np.eye(K, dtype=dtype)


def _numpy_rng(key):
    """A numpy generator seeded by a jax key: host-side draws for starting values compile nothing."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())


def _random_init(key, K, N, U, J, dtype, weight_scale):
    """Random starting weights."""
    rng = _numpy_rng(key)
    w = weight_scale * rng.standard_normal((K, N, N, J))
    v = weight_scale * rng.standard_normal((K, N, U))
    # one-hot strengths start near 3 * weight_scale; indicators favour "none", with noise
    sp = np.log(np.expm1(3 * weight_scale)) + 0.1 * rng.standard_normal((K, N, N, J))
    adj = np.array([0.0, 0.5, 0.0]) + 0.3 * rng.standard_normal((K, N, N, 3))
    w, v, sp, adj = (np.asarray(a, dtype) for a in (w, v, sp, adj))
    return w, v, sp, adj


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class HMMGLM(AbstractDiscreteSSM):
    """Switching GLM for N neurons with K hidden states and a weight prior.

    Args:
        initial_probs: (K,).
        transition_matrix: (K, K), rows sum to one (`HMMGLM.create` makes it sticky, 0.98).
        biases: (N,) per-neuron bias b_n, shared by the states.
        weights: (K, N, N, J) coupling weights w^{(k)}_{n<-n',j} (priors "none" and "gaussian").
        input_weights: (K, N, U) weights of the external covariates (U may be 0).
        transition_input_weights: (K, U) R of input-driven transitions, or None / shape (K, 0)
            for a fixed transition matrix. When given, ``input_weights`` defaults to zeros (K, N, U).
        basis: (J, L) fixed spike-history basis (not learned).
        prior: "none", "gaussian" or "onehot".
        family: "poisson" or "bernoulli"; link: "exp", "softplus" or "sigmoid".
        weight_mean: (N, N, J) W_bar (Gaussian prior).
        weight_scale_param: () s = min_weight_scale + softplus(.) (Gaussian prior).
        strength_params: (K, N, N, J) strengths softplus(.) (one-hot prior).
        adjacency_logits: (K, N, N, 3) per-state class logits over {inh, none, exc} (one-hot prior).
        connectome_logits: (N, N, 3) shared prior class logits p (one-hot prior).
        temperature: Gumbel-softmax temperature (0.2).
        min_strength: floor of the one-hot strengths (0.1), so that an absent connection is
            expressed by the "none" class rather than by a vanishing strength.
        sparsity: one-hot prior only: a Dirichlet(1, 1 + sparsity, 1) hyperprior on each pair's
            connectome probabilities p, i.e. ``sparsity`` pseudo-states voting "no connection"
            (0 = flat).
        link_cost: one-hot prior only: nats charged per connection switched on in a state
            (0 = none). It tilts each state's indicator prior from p towards "none" by
            exp(-link_cost), the Occam factor of the strength a connection brings: a link whose
            likelihood gain is smaller than this is read as absent. ~0.5 log(bins per state)
            is the BIC charge of one more parameter (``link_cost="bic"`` in `init_hmmglm` and
            `ps.learn.prune_links`, which charges it after a fit).
        min_weight_scale: floor of the Gaussian-prior scale s (0.1). The MAP of a learnable
            scale is degenerate: s -> 0 with all states equal to W_bar gains -log s per weight,
            which can outweigh the likelihood and collapse the states into one.

    Use `HMMGLM.create` to build one with defaults; fields a prior does not use are ignored.

    Example:
        >>> model = HMMGLM.create(key, num_states=3, num_neurons=10, prior="onehot")
        >>> ps.hmm.smoother(model, spikes).smoothed_probs.shape    # spikes (T, 10)
    """

    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)
    biases: jax.Array
    weights: jax.Array
    input_weights: jax.Array
    transition_input_weights: jax.Array
    basis: jax.Array
    weight_mean: jax.Array
    weight_scale_param: jax.Array
    strength_params: jax.Array
    adjacency_logits: jax.Array
    connectome_logits: jax.Array
    prior: str = eqx.field(static=True)
    family: str = eqx.field(static=True)
    link: str = eqx.field(static=True)
    temperature: float = eqx.field(static=True)
    min_strength: float = eqx.field(static=True)
    min_weight_scale: float = eqx.field(static=True)
    sparsity: float = eqx.field(static=True)
    link_cost: float = eqx.field(static=True, default=0.0)

    LEARNABLE: ClassVar[dict] = {
        "none": ("biases", "weights", "input_weights"),
        "gaussian": ("biases", "weights", "input_weights", "weight_mean", "weight_scale_param"),
        "onehot": ("biases", "input_weights", "strength_params", "adjacency_logits", "connectome_logits"),
    }

    def __init__(self, initial_probs, transition_matrix, biases, weights, input_weights=None, basis=None, *,
                 transition_input_weights=None, prior: str = "none", family: str = "poisson", link: str = "softplus", weight_mean=None,
                 weight_scale_param=None, strength_params=None, adjacency_logits=None, connectome_logits=None,
                 temperature: float = 0.2, min_strength: float = 0.1, min_weight_scale: float = 0.1,
                 sparsity: float = 0.0, link_cost: float = 0.0):
        if prior not in PRIORS:
            raise ValueError(f"prior: expected one of {PRIORS}, got {prior!r}")
        _check_link(family, link)
        if not (float(temperature) > 0):
            raise ValueError(f"temperature: expected a positive float, got {temperature!r}")
        w = jnp.asarray(weights)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            w = w.astype(jnp.result_type(float))
        dtype = w.dtype
        if w.ndim != 4 or w.shape[1] != w.shape[2]:
            raise ValueError(f"weights: expected shape (K, N, N, J), got shape {tuple(w.shape)}")
        K, N, _, J = w.shape
        checks.finite(w, "weights")
        pi = jnp.asarray(initial_probs, dtype)
        checks.shape(pi, "initial_probs", (K,), f"({K},)")
        checks.probabilities(pi, "initial_probs")
        A = jnp.asarray(transition_matrix, dtype)
        checks.shape(A, "transition_matrix", (K, K), f"({K}, {K})")
        checks.probabilities(A, "transition_matrix")
        b = jnp.asarray(biases, dtype)
        checks.shape(b, "biases", (N,), f"({N},)")
        checks.finite(b, "biases")
        basis = exponential_basis() if basis is None else basis
        basis = jnp.asarray(basis, dtype)
        if basis.ndim == 1:
            basis = basis[None]
        if basis.ndim != 2 or basis.shape[0] != J:
            raise ValueError(f"basis: expected shape ({J}, L) (J = weights.shape[-1]), got shape {tuple(basis.shape)}")
        checks.finite(basis, "basis")
        r = jnp.zeros((K, 0), dtype) if transition_input_weights is None else jnp.asarray(transition_input_weights, dtype)
        checks.shape(r, "transition_input_weights", (K, None), f"({K}, U)")
        checks.finite(r, "transition_input_weights")
        if input_weights is None:
            v = jnp.zeros((K, N, r.shape[1]), dtype)
        else:
            v = jnp.asarray(input_weights, dtype)
            checks.shape(v, "input_weights", (K, N, None), f"({K}, {N}, U)")
            checks.finite(v, "input_weights")
        if r.shape[1] and r.shape[1] != v.shape[2]:
            raise ValueError(f"transition_input_weights: expected shape ({K}, {v.shape[2]}) (U = input_weights.shape[-1]), "
                             f"got shape {tuple(r.shape)}")

        def opt(x, shape, name, fill=0.0):
            if x is None:
                return jnp.full(shape, fill, dtype)
            a = jnp.asarray(x, dtype)
            checks.shape(a, name, shape)
            checks.finite(a, name)
            return a

        self.initial_probs, self.transition_matrix, self.biases, self.weights = pi, A, b, w
        self.input_weights, self.transition_input_weights, self.basis = v, r, basis
        self.weight_mean = opt(weight_mean, (N, N, J), "weight_mean")
        self.weight_scale_param = opt(weight_scale_param, (), "weight_scale_param", 0.5)
        self.strength_params = opt(strength_params, (K, N, N, J), "strength_params")
        self.adjacency_logits = opt(adjacency_logits, (K, N, N, 3), "adjacency_logits")
        self.connectome_logits = opt(connectome_logits, (N, N, 3), "connectome_logits")
        self.prior, self.family, self.link, self.temperature = prior, family, link, float(temperature)
        if not float(min_strength) >= 0:
            raise ValueError(f"min_strength: expected a float >= 0, got {min_strength!r}")
        self.min_strength = float(min_strength)
        if not float(min_weight_scale) > 0:
            raise ValueError(f"min_weight_scale: expected a positive float, got {min_weight_scale!r}")
        self.min_weight_scale = float(min_weight_scale)
        if not float(sparsity) >= 0:
            raise ValueError(f"sparsity: expected a float >= 0, got {sparsity!r}")
        self.sparsity = float(sparsity)
        if not float(link_cost) >= 0:
            raise ValueError(f"link_cost: expected a float >= 0, got {link_cost!r}")
        self.link_cost = float(link_cost)

    @classmethod
    def create(cls, key, num_states: int, num_neurons: int, *, basis=None, num_inputs: int = 0,
               prior: str = "none", family: str = "poisson", link: str = "softplus", stickiness: float = 0.98,
               biases=None, weight_scale: float = 0.1, temperature: float = 0.2, min_strength: float = 0.1,
               min_weight_scale: float = 0.1, sparsity: float = 0.0, link_cost: float = 0.0,
               input_driven_transitions: bool = False, dtype=None):
        """A random starting point: sticky transitions (``stickiness`` on the diagonal),
        small random weights (std ``weight_scale``), biases 0 unless given; for the one-hot
        prior, indicator logits that slightly favour "none" plus noise. With
        ``input_driven_transitions`` (needs ``num_inputs`` >= 1) the transition input weights
        start at zero."""
        K = checks.positive_int(num_states, "num_states")
        N = checks.positive_int(num_neurons, "num_neurons")
        U = checks.positive_int(num_inputs, "num_inputs", minimum=0)
        if input_driven_transitions and U == 0:
            raise ValueError("num_inputs: input-driven transitions need num_inputs >= 1")
        if not 0.0 < stickiness <= 1.0:
            raise ValueError(f"stickiness: expected a value in (0, 1), got {stickiness!r}")
        dtype = jnp.result_type(float) if dtype is None else dtype
        basis = np.asarray(exponential_basis() if basis is None else basis, dtype)
        basis = basis[None] if basis.ndim == 1 else basis
        J = basis.shape[0]
        w, v, sp, adj = _random_init(key, K, N, U, J, np.dtype(dtype), float(weight_scale))
        b = np.zeros((N,), dtype) if biases is None else np.asarray(biases, dtype)
        r = np.zeros((K, U if input_driven_transitions else 0), dtype)
        return cls(np.full((K,), 1.0 / K, dtype), np.asarray(_sticky(K, stickiness, np.float64), dtype), b, w, v,
                   basis, transition_input_weights=r, prior=prior, family=family, link=link, weight_mean=np.zeros((N, N, J), dtype),
                   weight_scale_param=np.asarray(0.5, dtype), strength_params=sp, adjacency_logits=adj,
                   connectome_logits=np.zeros((N, N, 3), dtype), temperature=temperature,
                   min_strength=min_strength, min_weight_scale=min_weight_scale, sparsity=sparsity,
                   link_cost=link_cost)

    # --- sizes ---------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        return self.weights.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.weights.shape[1]

    @property
    def emission_dim(self) -> int:
        return self.num_neurons

    @property
    def num_bases(self) -> int:
        return self.basis.shape[0]

    @property
    def history_length(self) -> int:
        return self.basis.shape[1]

    @property
    def num_inputs(self) -> int:
        return self.input_weights.shape[-1]

    @property
    def input_driven(self) -> bool:
        """Whether the transitions depend on the external covariates (static)."""
        return self.transition_input_weights.shape[-1] > 0

    @property
    def log_transition_matrix(self):
        """(K, K) log A (the transitions at u_t = 0), zeros floored at the smallest float."""
        return jnp.log(jnp.maximum(self.transition_matrix, jnp.finfo(self.transition_matrix.dtype).tiny))

    def log_transition_matrices(self, inputs=None):
        """log p(z_t = j | z_{t-1} = i, u_t): (K, K) for fixed transitions, else (..., T, K, K)
        from ``inputs`` (..., T, U); entry t maps z_{t-1} -> z_t."""
        log_A = self.log_transition_matrix
        if not self.input_driven:
            return log_A
        if inputs is None:
            raise ValueError(f"inputs: the transitions are input-driven; pass inputs (T, {self.num_inputs})")
        drive = jnp.asarray(inputs, log_A.dtype) @ self.transition_input_weights.T  # (..., T, K): r_j . u_t
        return jax.nn.log_softmax(log_A + drive[..., None, :], -1)

    # --- weights under each prior ---------------------------------------------------
    @property
    def weight_scale(self):
        """Gaussian-prior scale s = min_weight_scale + softplus(weight_scale_param)."""
        return jax.nn.softplus(self.weight_scale_param) + self.min_weight_scale

    @property
    def strengths(self):
        """(K, N, N, J) one-hot strengths min_strength + softplus(strength_params)."""
        return self.min_strength + jax.nn.softplus(self.strength_params)

    @property
    def adjacency_probs(self):
        """(K, N, N, 3) per-state class probabilities q^{(k)} over {inh, none, exc}."""
        return jax.nn.softmax(self.adjacency_logits, -1)

    @property
    def connectome_probs(self):
        """(N, N, 3) shared class probabilities p over {inh, none, exc}."""
        return jax.nn.softmax(self.connectome_logits, -1)

    def indicators(self, mode: str = "hard", key=None, noise=None):
        """(K, N, N, 3) one-hot indicators: "hard" argmax, "expected" q, "relaxed" Gumbel-softmax sample
        (from ``key``, or from given standard Gumbel ``noise`` of shape (K, N, N, 3))."""
        if mode == "hard":
            return jax.nn.one_hot(jnp.argmax(self.adjacency_logits, -1), 3, dtype=self.adjacency_logits.dtype)
        if mode == "expected":
            return self.adjacency_probs
        if mode == "relaxed":
            if noise is not None:
                g = noise
            elif key is None:
                raise ValueError("key: the relaxed (Gumbel-softmax) indicators need a jax.random key")
            else:
                g = jax.random.gumbel(key, self.adjacency_logits.shape, self.adjacency_logits.dtype)
            return jax.nn.softmax((jax.nn.log_softmax(self.adjacency_logits, -1) + g) / self.temperature, -1)
        raise ValueError(f"mode: expected 'hard', 'expected' or 'relaxed', got {mode!r}")

    def coupling_weights(self, mode: str = "hard", key=None, noise=None):
        """(K, N, N, J) effective coupling weights w^{(k)}_{n<-n',j}.

        For the one-hot prior, ``mode`` picks the indicators (see `indicators`); other
        priors ignore it.
        """
        if self.prior != "onehot":
            return self.weights
        a = self.indicators(mode, key, noise)
        sign = a[..., 2] - a[..., 0]
        return sign[..., None] * self.strengths

    def connectome(self, rule: str = "consensus"):
        """(N, N) signs in {-1, 0, +1} of the learned connectome.

        One-hot prior, ``rule="consensus"``: argmax over {inh, none, exc} of the states' mean
        class probabilities (1/K) sum_k q^{(k)} (with a flat hyperprior this is where the shared p
        converges; the ``sparsity`` pseudo-votes only regularise the states, they are not
        counted here). A link used by fewer than about half the states is read as "none".
        ``rule="support"``: a pair is connected when any state's hard indicator connects it,
        with the sign most states give it (ties broken by the summed class probabilities) --
        the union of the per-state graphs, for connectomes whose links are switched off in
        some states. Other priors: the sign of the state average of the summed coupling weights
        (no thresholding; ``rule`` is ignored).
        """
        if rule not in ("consensus", "support"):
            raise ValueError(f"rule: expected 'consensus' or 'support', got {rule!r}")
        if self.prior != "onehot":
            return jnp.sign(jnp.mean(jnp.sum(self.weights, -1), 0))
        q = self.adjacency_probs
        if rule == "consensus":
            return jnp.argmax(jnp.mean(q, 0), -1) - 1
        a = self.indicators("hard")
        votes = jnp.sum(a[..., 2] - a[..., 0], 0)
        used = jnp.any(a[..., 1] < 0.5, 0)
        tie_break = jnp.sum(q[..., 2] - q[..., 0], 0)
        return jnp.where(used, jnp.sign(jnp.where(votes != 0, votes, tie_break)), 0).astype(votes.dtype)

    def glm(self, mode: str = "hard", key=None):
        """The emission family (`PoissonGLM` / `BernoulliGLM`) over covariates [history, inputs]."""
        K, N = self.num_states, self.num_neurons
        w = self.coupling_weights(mode, key).reshape(K, N, -1)
        W = jnp.concatenate([w, self.input_weights], -1)
        b = jnp.broadcast_to(self.biases, (K, N))
        cls = PoissonGLM if self.family == "poisson" else BernoulliGLM
        return cls(W, b, self.link)

    def covariates(self, spikes, inputs=None):
        """(T, N * J + U) or (M, T, N * J + U): history covariates, then the external inputs."""
        h = history_covariates(spikes, self.basis)
        if inputs is None:
            if self.num_inputs:
                raise ValueError(f"inputs: the model has {self.num_inputs} external covariates; pass inputs (T, U)")
            return h
        u = jnp.asarray(inputs, h.dtype)
        u = jnp.broadcast_to(u, h.shape[:-1] + u.shape[-1:])
        return jnp.concatenate([h, u], -1)

    def emission_log_likelihoods(self, spikes, covariates, mode: str = "hard", key=None, normalized: bool = True,
                                 noise=None):
        """(T, K) log p(x_t | z_t = k, history) from precomputed covariates (T, N * J + U).

        ``normalized=False`` leaves out the log x! terms of the Poisson (constant in the parameters)."""
        K, N = self.num_states, self.num_neurons
        w = self.coupling_weights(mode, key, noise).reshape(K, N, -1)
        W = jnp.concatenate([w, self.input_weights], -1)
        eta = jnp.einsum("tu,kdu->tkd", covariates, W) + self.biases
        ll = jnp.sum(_kernel(self.family, self.link)(spikes[:, None, :], eta), -1)
        if normalized and self.family == "poisson":
            ll = ll - jnp.sum(gammaln(spikes + 1.0), -1, keepdims=True)
        return ll

    def log_prior(self):
        """log prior of the weights (0 for "none"); the one-hot prior is -sum_k KL(q^{(k)} || p)
        - link_cost * (expected number of connections switched on, over the states)."""
        if self.prior == "none":
            return jnp.zeros((), self.weights.dtype)
        if self.prior == "gaussian":
            s = self.weight_scale
            d = self.weights - self.weight_mean[None]
            return jnp.sum(-0.5 * (d / s) ** 2 - jnp.log(s) - 0.5 * math.log(2 * math.pi))
        logq = jax.nn.log_softmax(self.adjacency_logits, -1)
        logp = jax.nn.log_softmax(self.connectome_logits, -1)
        lp = -jnp.sum(jnp.exp(logq) * (logq - logp[None]))
        if self.sparsity:  # Dirichlet(1, 1 + sparsity, 1) hyperprior on p: pseudo-votes for "none"
            lp = lp + self.sparsity * jnp.sum(logp[..., 1])
        if self.link_cost:
            lp = lp - self.link_cost * jnp.sum(1.0 - jnp.exp(logq[..., 1]))
        return lp

    # --- exact structure -----------------------------------------------------------
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        y = jnp.asarray(emissions)
        x = self.covariates(y, inputs)
        A = jnp.exp(self.log_transition_matrices(inputs)) if self.input_driven else self.transition_matrix
        return DiscreteParams(self.initial_probs, A, self.emission_log_likelihoods(y, x))

    # --- the protocol (covariate rows x_t from `covariates` as inputs) --------------
    def initial(self, inputs=None):
        return dist.Categorical(probs=self.initial_probs)

    def transition(self, z_prev, t, inputs=None):
        if not self.input_driven:
            return dist.Categorical(probs=self.transition_matrix[z_prev])
        u = inputs[..., inputs.shape[-1] - self.num_inputs:]  # the external part of the covariate row
        return dist.Categorical(logits=self.log_transition_matrices(u[None])[0, z_prev])

    def emission(self, z, t, inputs=None):
        return self.glm().distribution(z, inputs)


# ----------------------------------------------------------------------------------------------
# Simulator
# ----------------------------------------------------------------------------------------------
class SimulatedHMMGLM(NamedTuple):
    model: HMMGLM  # the generating model (prior "none", the true per-state weights)
    states: jax.Array  # (M, T) int
    spikes: jax.Array  # (M, T, N)
    connectome: jax.Array  # (N, N) true signs in {-1, 0, +1}


_MAX_INVERSION = 30.0
_INVERSION_TERMS = 96


def _poisson_inverse(u, rate):
    """Poisson quantile at u (inversion of the CDF over 0..95) for rates <= 30, where the
    tail beyond 95 is below 1e-20; a rounded normal quantile above 30. Cheap to compile
    inside a scan, unlike `jax.random.poisson`."""
    dtype = rate.dtype
    lam = jnp.minimum(rate, _MAX_INVERSION)
    k = jnp.arange(_INVERSION_TERMS, dtype=dtype)
    logpmf = k * jnp.log(jnp.maximum(lam, 1e-30))[..., None] - lam[..., None] - gammaln(k + 1.0)
    upper = jnp.triu(jnp.ones((_INVERSION_TERMS, _INVERSION_TERMS), dtype))
    cdf = jnp.exp(logpmf) @ upper  # cumulative sum as one small matmul (cumsum compiles slowly)
    small = jnp.sum(cdf < u[..., None] * cdf[..., -1:], -1).astype(dtype)  # normalised: no rounding overflow
    z = jax.scipy.special.ndtri(jnp.clip(u, 1e-12, 1 - 1e-12))
    large = jnp.maximum(jnp.round(rate + jnp.sqrt(rate) * z), 0.0)
    return jnp.where(rate <= _MAX_INVERSION, small, large)


def _simulate_trial(key, model: HMMGLM, num_timesteps, inputs):
    """One trial; all randomness is drawn up front, the scan only inverts CDFs."""
    K, N, L = model.num_states, model.num_neurons, model.history_length
    W = model.coupling_weights("hard").reshape(K, N, -1)
    V = model.input_weights
    dtype = model.weights.dtype
    kz, ky = jax.random.split(key)
    uz = jax.random.uniform(kz, (num_timesteps,), dtype)
    uy = jax.random.uniform(ky, (num_timesteps, N), dtype)
    cum_pi = jnp.cumsum(model.initial_probs)
    cum_A = jnp.cumsum(model.transition_matrix, -1)
    R = model.transition_input_weights
    basis = model.basis

    def step(carry, xs):
        z_prev, past, t = carry  # past: (L, N), row 0 = y_{t-1}
        u_z, u_y, u = xs
        if model.input_driven:
            row = jax.nn.softmax(model.log_transition_matrix[z_prev] + R @ u)
            cum = jnp.where(t == 0, cum_pi, jnp.cumsum(row))
        else:
            cum = jnp.where(t == 0, cum_pi, cum_A[z_prev])
        z = jnp.minimum(jnp.sum(cum < u_z * cum[-1]), K - 1).astype(jnp.int32)
        h = jnp.einsum("ln,jl->nj", past, basis).reshape(-1)
        eta = W[z] @ h + model.biases
        if u is not None:
            eta = eta + V[z] @ u
        if model.family == "poisson":
            y = _poisson_inverse(u_y, link_mean(model.link, eta))
        else:
            p = jax.nn.sigmoid(eta) if model.link == "sigmoid" else -jnp.expm1(-link_mean(model.link, eta))
            y = (u_y < p).astype(dtype)
        past = jnp.concatenate([y[None], past[:-1]])
        return (z, past, t + 1), (z, y)

    init = (jnp.zeros((), jnp.int32), jnp.zeros((L, N), dtype), jnp.zeros((), jnp.int32))
    _, (zs, ys) = lax.scan(step, init, (uz, uy, inputs))
    return zs, ys


def sample_hmmglm(key, model: HMMGLM, num_timesteps: int, num_trials: int = 1, inputs=None):
    """Draw (states (M, T), spikes (M, T, N)) from a model, hard weights; spike history is
    fed back as it is generated. ``inputs``: (T, U) shared or (M, T, U)."""
    T = checks.positive_int(num_timesteps, "num_timesteps")
    M = checks.positive_int(num_trials, "num_trials")
    if model.num_inputs and inputs is None:
        raise ValueError(f"inputs: the model has {model.num_inputs} external covariates; pass inputs (T, U)")
    u = None
    if inputs is not None:
        u = jnp.asarray(inputs, model.weights.dtype)
        u = jnp.broadcast_to(u, (M, T, u.shape[-1])) if u.ndim == 2 else u
        checks.shape(u, "inputs", (M, T, model.num_inputs), f"({T}, {model.num_inputs}) or ({M}, {T}, {model.num_inputs})")
    return _sample_jit(key, model, T, M, u)


@partial(jax.jit, static_argnums=(2, 3))
def _sample_jit(key, model, T, M, u):
    keys = jax.random.split(key, M)
    return jax.vmap(lambda k, ui: _simulate_trial(k, model, T, ui), in_axes=(0, None if u is None else 0))(keys, u)


@partial(jax.jit, static_argnums=tuple(range(2, 13)))
def _draw_benchmark(key, basis, K, N, connection_prob, state_keep_prob, strength_range, self_weight, bias_range,
                    stickiness, family, link, max_excitation):
    dtype = basis.dtype
    J = basis.shape[0]
    kc, km, ks, kb = jax.random.split(key, 4)
    u = jax.random.uniform(kc, (N, N), dtype)
    C = jnp.where(u < connection_prob / 2, -1, jnp.where(u < connection_prob, 1, 0))
    C = jnp.where(jnp.eye(N, dtype=bool), int(np.sign(self_weight)), C)
    keep = jax.random.uniform(km, (K, N, N), dtype) < state_keep_prob
    lo, hi = strength_range
    s = jax.random.uniform(ks, (K, N, N), dtype, lo, hi)
    w = C[None] * keep * s
    # stability: cap each state's total excitatory input per neuron (the max row sum bounds the
    # spectral radius of the excitatory part, which must stay below 1 for a softplus/exp network)
    exc_rows = jnp.max(jnp.sum(jnp.maximum(w, 0.0), -1), -1)  # (K,)
    factor = jnp.minimum(1.0, max_excitation / jnp.maximum(exc_rows, 1e-12)) if max_excitation > 0 else jnp.ones_like(exc_rows)
    w = jnp.where(w > 0, w * factor[:, None, None], w)
    w = jnp.where(jnp.eye(N, dtype=bool)[None], self_weight, w)
    W = jnp.broadcast_to(w[..., None], (K, N, N, J)) / J
    b = jax.random.uniform(kb, (N,), dtype, *bias_range)
    model = HMMGLM(jnp.full((K,), 1.0 / K, dtype), _sticky(K, stickiness, dtype), b, W.astype(dtype),
                   None, basis, prior="none", family=family, link=link)
    return model, C


def simulate_hmmglm(key, num_states: int = 5, num_neurons: int = 20, num_timesteps: int = 2000,
                    num_trials: int = 50, *, connection_prob: float = 0.3, state_keep_prob: float = 0.7,
                    strength_range=(0.6, 1.2), self_weight: float = -1.0, bias_range=(-1.5, -0.5),
                    stickiness: float = 0.98, family: str = "poisson", link: str = "softplus",
                    basis=None, max_excitation: Optional[float] = None) -> SimulatedHMMGLM:
    """Synthetic benchmark of MODELS.md: K states, N neurons, a sparse signed connectome.

    The connectome C (N, N) has off-diagonal entries +1 / -1 each with probability
    ``connection_prob / 2`` (0 otherwise) and C_nn = sign(self_weight). State k keeps each
    off-diagonal connection with probability ``state_keep_prob`` and draws its own strength
    uniformly in ``strength_range``: w^{(k)}_{n<-n'} = C_{nn'} m^{(k)}_{nn'} s^{(k)}_{nn'};
    self-history weights are ``self_weight`` in every state. With ``max_excitation`` set, a state
    whose total excitatory input to some neuron exceeds it has its excitatory weights scaled down
    to meet it (< 1 guarantees the network cannot run away; the defaults are stable without it). Biases ~ U(bias_range);
    transitions sticky (``stickiness`` on the diagonal); trials start in a uniform state.

    Returns:
        `SimulatedHMMGLM` (model, states (M, T), spikes (M, T, N), connectome (N, N)).
    """
    K = checks.positive_int(num_states, "num_states")
    N = checks.positive_int(num_neurons, "num_neurons")
    T = checks.positive_int(num_timesteps, "num_timesteps")
    M = checks.positive_int(num_trials, "num_trials")
    if not 0 <= connection_prob <= 1:
        raise ValueError(f"connection_prob: expected a probability, got {connection_prob!r}")
    if not 0 <= state_keep_prob <= 1:
        raise ValueError(f"state_keep_prob: expected a probability, got {state_keep_prob!r}")
    dtype = jnp.result_type(float)
    basis = exponential_basis() if basis is None else jnp.asarray(basis)
    basis = (basis[None] if basis.ndim == 1 else basis).astype(dtype)
    if basis.shape[1] >= T:
        raise ValueError(f"basis: the history basis has length {basis.shape[1]}, not shorter than the trial ({T})")
    model, C = _draw_benchmark(key, basis, K, N, float(connection_prob), float(state_keep_prob),
                               tuple(float(v) for v in strength_range), float(self_weight),
                               tuple(float(v) for v in bias_range), float(stickiness), family, link,
                               0.0 if max_excitation is None else float(max_excitation))
    states, spikes = sample_hmmglm(jax.random.fold_in(key, 1), model, T, M)
    return SimulatedHMMGLM(model, states, spikes, C)
