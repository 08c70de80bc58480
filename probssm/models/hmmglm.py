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

The coupling weights w^{(k)} carry a prior, a small Module of `probssm.models.hmmglm_priors`
(``prior=``): `NoPrior` (the plain HMM-GLM; ``weights`` (K, N, N, J) are free), `GaussianPrior`
(w^{(k)} ~ N(W_bar, s^2) around a learnable state-constant part) or `OneHotPrior` (signed one-hot
indicators times strengths, with a shared connectome; relaxed by Gumbel-softmax while learning,
hard at evaluation). The strings ``"none"``, ``"gaussian"``, ``"onehot"`` are deprecated aliases
for those classes.

The model is an `AbstractDiscreteSSM`: ``discrete_params(emissions, inputs)`` builds the history
covariates from the spikes of one trial (``inputs`` are the external covariates (T, U), or None)
and evaluates the emission log-likelihoods with the hard weights, so `ps.hmm.filter / smoother /
viterbi` run on it directly. The emission families `PoissonGLM` / `BernoulliGLM` live in
`probssm.models.emissions.glm` (``model.glm()``). Learning: `probssm.learn.hmmglm_em.fit_hmmglm`
(also `ps.learn.em`); simulators: `probssm.datasets.hmmglm`.

Transitions are sticky by default. Optionally they are input-driven (``transition_input_weights``
R (K, U), as in the input-driven HMMs of the `ssm` package):

    p(z_t = j | z_{t-1} = i, u_t) = A_ij exp(r_j . u_t) / sum_j' A_ij' exp(r_j' . u_t),

so that A is the transition matrix at u_t = 0 and the external covariates u_t tilt every
row towards the states they favour. The transitions read the same inputs as the emissions;
to let them drive only the transitions, hold ``input_weights`` at zero
(``fit_hmmglm(..., fixed=("input_weights",))``).

The protocol methods (`initial`, `transition`, `emission`, for `ps.sample` and the particle
engines) read as inputs the rows [y_{t-1}, ..., y_{t-L}, u_t] of `protocol_inputs`. Without
external covariates the model declares ``emission_lags = L`` and the engines build those rows
themselves (`default_inputs`, zeros before the trial), so `ps.sample(key, model, T)` and
`ps.smc.particle_filter(key, model, y, N)` agree with `ps.hmm`; with covariates pass
``inputs=model.protocol_inputs(y, u)`` to the particle engines (`ps.sample` cannot feed spikes
back and take external inputs at once: use `ps.datasets.sample_hmmglm`).
"""
from __future__ import annotations

import abc

import operator
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.lags import lagged_inputs
from probssm.core.protocol import AbstractDiscreteSSM, DiscreteParams
from probssm.models.emissions.base import check_support
from probssm.models.emissions.glm import (EXPONENTIAL_BASIS, BernoulliGLM, PoissonGLM, check_link,
                                          exponential_basis, glm_kernel, history_covariates,
                                          raised_cosine_basis)
from probssm.models.hmmglm_priors import (PRIORS, AbstractCouplingPrior, GaussianPrior, NoPrior, OneHotPrior,
                                          coerce_prior, prior_from_name)

__all__ = ["HMMGLM", "AbstractCouplingPrior", "NoPrior", "GaussianPrior", "OneHotPrior", "PRIORS", "prior_from_name",
           "PoissonGLM", "BernoulliGLM", "EXPONENTIAL_BASIS", "exponential_basis", "raised_cosine_basis",
           "history_covariates", "check_spikes", "sticky_transition_matrix"]

REAL = {"constraint": constraints.real}
SIMPLEX = {"constraint": constraints.simplex}


# ----------------------------------------------------------------------------------------------
# Input checks shared by the model, the learner and the simulators
# ----------------------------------------------------------------------------------------------
def check_spikes(spikes, family: str, num_neurons: int, history_length: int, name: str = "spikes"):
    """Validate spike data of shape (T, N) or (M, T, N); returns (float array, batched flag).

    Poisson counts must be non-negative integers, Bernoulli bins 0 or 1; N must match
    the model; the trial must be longer than the history basis. ``name`` is the argument
    named in the errors.
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


def sticky_transition_matrix(num_states: int, stickiness: float, dtype=np.float64) -> np.ndarray:
    """(K, K) numpy matrix with ``stickiness`` on the diagonal and the rest spread evenly."""
    K = num_states
    if K == 1:
        return np.ones((1, 1), dtype)
    off = (1.0 - stickiness) / (K - 1)
    return np.full((K, K), off, dtype) + (stickiness - off) * np.eye(K, dtype=dtype)


def _numpy_rng(key):
    """A numpy generator seeded by a jax key: host-side draws for starting values compile nothing."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())


def _random_init(key, K, N, U, J, dtype, weight_scale):
    """Random starting weights (the same draws whatever the prior)."""
    rng = _numpy_rng(key)
    w = weight_scale * rng.standard_normal((K, N, N, J))
    v = weight_scale * rng.standard_normal((K, N, U))
    # one-hot strengths start near 3 * weight_scale; indicators favour "none", with noise
    sp = np.log(np.expm1(3 * weight_scale)) + 0.1 * rng.standard_normal((K, N, N, J))
    adj = np.array([0.0, 0.5, 0.0]) + 0.3 * rng.standard_normal((K, N, N, 3))
    w, v, sp, adj = (np.asarray(a, dtype) for a in (w, v, sp, adj))
    return w, v, sp, adj


def _prior_alias(field: str):
    """Read-only ``model.prior.<field>`` (AttributeError when the prior has no such field)."""
    return property(operator.attrgetter(f"prior.{field}"), doc=f"Deprecated alias of ``model.prior.{field}``.")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class AbstractHMMGLM(AbstractDiscreteSSM):
    """The structure the HMM-GLM learners (`ps.learn.fit_hmmglm`, `prune_links`,
    `threshold_couplings`) read: a finite-state model whose emissions are a GLM with a coupling
    prior, exposing the GLM of given couplings (`glm`), the paths of its emission and transition
    parameters, and a copy without given couplings. `HMMGLM` is the implementation."""

    @abc.abstractmethod
    def glm(self, mode: str = "hard", key=None): ...

    @property
    @abc.abstractmethod
    def emission_paths(self) -> tuple: ...

    @property
    @abc.abstractmethod
    def transition_paths(self) -> tuple: ...

    @abc.abstractmethod
    def without_couplings(self, drop): ...


class HMMGLM(AbstractHMMGLM):
    """Switching GLM for N neurons with K hidden states and a coupling-weight prior.

    Args:
        initial_probs: (K,).
        transition_matrix: (K, K), rows sum to one (`HMMGLM.create` makes it sticky, 0.98).
        biases: (N,) per-neuron bias b_n, shared by the states.
        weights: (K, N, N, J) coupling weights w^{(k)}_{n<-n',j} (free under `NoPrior` and
            `GaussianPrior`; `OneHotPrior` builds its own and uses these only for the shapes).
        input_weights: (K, N, U) weights of the external covariates (U may be 0).
        basis: (J, L) fixed spike-history basis (not learned).
        transition_input_weights: (K, U) R of input-driven transitions, or None / shape (K, 0)
            for a fixed transition matrix. When given, ``input_weights`` defaults to zeros (K, N, U).
        prior: an `AbstractCouplingPrior` (`NoPrior()`, `GaussianPrior(...)`, `OneHotPrior(...)`),
            or, deprecated, one of the strings "none", "gaussian", "onehot", whose arrays and
            hyperparameters are then taken from the keyword arguments ``weight_mean``,
            ``weight_scale_param``, ``strength_params``, ``adjacency_logits``, ``connectome_logits``,
            ``temperature``, ``min_strength``, ``min_weight_scale``, ``sparsity``, ``link_cost``
            (see `probssm.models.hmmglm_priors`; arrays not given start at zero).
        family: "poisson" or "bernoulli"; link: "exp", "softplus" or "sigmoid".

    Example:
        >>> model = HMMGLM.create(key, num_states=3, num_neurons=10, prior=OneHotPrior)
        >>> ps.hmm.smoother(model, spikes).smoothed_probs.shape    # spikes (T, 10)
    """

    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)
    biases: jax.Array = eqx.field(metadata=REAL)
    weights: jax.Array = eqx.field(metadata=REAL)
    input_weights: jax.Array = eqx.field(metadata=REAL)
    transition_input_weights: jax.Array = eqx.field(metadata=REAL)
    basis: jax.Array  # fixed: declares no constraint, so no learner touches it
    prior: AbstractCouplingPrior
    family: str = eqx.field(static=True)
    link: str = eqx.field(static=True)

    # deprecated: the bare learnable names of each prior string (paths: `emission_paths`)
    LEARNABLE: ClassVar[dict] = {
        "none": ("biases", "weights", "input_weights"),
        "gaussian": ("biases", "weights", "input_weights", "weight_mean", "weight_scale_param"),
        "onehot": ("biases", "input_weights", "strength_params", "adjacency_logits", "connectome_logits"),
    }

    def __init__(self, initial_probs, transition_matrix, biases, weights, input_weights=None, basis=None, *,
                 transition_input_weights=None, prior="none", family: str = "poisson", link: str = "softplus",
                 weight_mean=None, weight_scale_param=None, strength_params=None, adjacency_logits=None,
                 connectome_logits=None, temperature=None, min_strength=None, min_weight_scale=None,
                 sparsity=None, link_cost=None):
        check_link(family, link)
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
        options = dict(weight_mean=weight_mean, weight_scale_param=weight_scale_param,
                       strength_params=strength_params, adjacency_logits=adjacency_logits,
                       connectome_logits=connectome_logits, temperature=temperature, min_strength=min_strength,
                       min_weight_scale=min_weight_scale, sparsity=sparsity, link_cost=link_cost)
        self.prior = coerce_prior(prior, K, N, J, dtype, options)
        self.initial_probs, self.transition_matrix, self.biases, self.weights = pi, A, b, w
        self.input_weights, self.transition_input_weights, self.basis = v, r, basis
        self.family, self.link = family, link

    @classmethod
    def create(cls, key, num_states: int, num_neurons: int, *, basis=None, num_inputs: int = 0,
               prior="none", family: str = "poisson", link: str = "softplus", stickiness: float = 0.98,
               biases=None, weight_scale: float = 0.1, temperature: float = 0.2, min_strength: float = 0.1,
               min_weight_scale: float = 0.1, sparsity: float = 0.0, link_cost: float = 0.0,
               input_driven_transitions: bool = False, dtype=None) -> "HMMGLM":
        """A random starting point: sticky transitions (``stickiness`` on the diagonal),
        small random weights (std ``weight_scale``), biases 0 unless given.

        ``prior``: a prior class (`NoPrior`, `GaussianPrior`, `OneHotPrior`), whose prior starts
        at random values with the hyperparameters ``temperature``, ``min_strength``,
        ``min_weight_scale``, ``sparsity``, ``link_cost`` (the one-hot prior: strengths near
        3 * ``weight_scale``, indicator logits that slightly favour "none" plus noise); a prior
        object, used as given; or, deprecated, the class's name ("none", "gaussian", "onehot"). With
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
        if isinstance(prior, type) and issubclass(prior, AbstractCouplingPrior):
            prior = prior.name
        if not isinstance(prior, AbstractCouplingPrior):
            prior = prior_from_name(prior, K, N, J, dtype, strength_params=sp, adjacency_logits=adj,
                                    temperature=temperature, min_strength=min_strength,
                                    min_weight_scale=min_weight_scale, sparsity=sparsity, link_cost=link_cost)
        b = np.zeros((N,), dtype) if biases is None else np.asarray(biases, dtype)
        r = np.zeros((K, U if input_driven_transitions else 0), dtype)
        return cls(np.full((K,), 1.0 / K, dtype), np.asarray(sticky_transition_matrix(K, stickiness), dtype), b,
                   w, v, basis, transition_input_weights=r, prior=prior, family=family, link=link)

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
    def emission_paths(self) -> tuple:
        """Dotted paths (`probssm.core.params`) of the emission parameters the generalised M-step
        learns: the biases, the input weights and the coupling parameters of the prior."""
        own = ("biases", "weights", "input_weights") if self.prior.uses_weights else ("biases", "input_weights")
        return own + tuple(f"prior.{n}" for n in self.prior.learnable)

    @property
    def transition_paths(self) -> tuple:
        """Dotted paths of the transition parameters (R only for input-driven transitions)."""
        return ("transition_matrix", "transition_input_weights") if self.input_driven else ("transition_matrix",)

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

    # --- deprecated aliases of the prior's fields (model.prior.<name>) ---------------
    weight_mean = _prior_alias("weight_mean")
    weight_scale_param = _prior_alias("weight_scale_param")
    min_weight_scale = _prior_alias("min_weight_scale")
    weight_scale = _prior_alias("scale")
    strength_params = _prior_alias("strength_params")
    adjacency_logits = _prior_alias("adjacency_logits")
    connectome_logits = _prior_alias("connectome_logits")
    temperature = _prior_alias("temperature")
    min_strength = _prior_alias("min_strength")
    sparsity = _prior_alias("sparsity")
    strengths = _prior_alias("strengths")
    adjacency_probs = _prior_alias("adjacency_probs")
    connectome_probs = _prior_alias("connectome_probs")

    @property
    def link_cost(self) -> float:
        """Nats charged per connection switched on (one-hot prior; 0 for the others)."""
        return self.prior.link_cost if isinstance(self.prior, OneHotPrior) else 0.0

    # --- weights under the prior -----------------------------------------------------
    def indicators(self, mode: str = "hard", key=None, noise=None):
        """(K, N, N, 3) one-hot indicators of `OneHotPrior` (see `OneHotPrior.indicators`)."""
        return self.prior.indicators(mode, key, noise)

    def coupling_weights(self, mode: str = "hard", key=None, noise=None):
        """(K, N, N, J) effective coupling weights w^{(k)}_{n<-n',j}.

        For the one-hot prior, ``mode`` picks the indicators ("hard", "expected" or "relaxed",
        the last with ``key`` or standard Gumbel ``noise``); other priors ignore it.
        """
        return self.prior.coupling_weights(self.weights, mode, key, noise)

    def without_couplings(self, drop) -> "HMMGLM":
        """The model with the couplings where ``drop`` (K, N, N) is true switched off (weights
        zero; one-hot indicators "none")."""
        w, prior = self.prior.drop_couplings(self.weights, drop)
        return eqx.tree_at(lambda m: (m.weights, m.prior), self, (w, prior))

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
        return self.prior.connectome(self.weights, rule)

    def log_prior(self):
        """() log prior of the coupling parameters (see the prior class)."""
        return self.prior.log_prior(self.weights)

    def glm(self, mode: str = "hard", key=None):
        """The emission family (`PoissonGLM` / `BernoulliGLM`) over covariates [history, inputs]."""
        K, N = self.num_states, self.num_neurons
        w = self.coupling_weights(mode, key).reshape(K, N, -1)
        W = jnp.concatenate([w, self.input_weights], -1)
        b = jnp.broadcast_to(self.biases, (K, N))
        cls = PoissonGLM if self.family == "poisson" else BernoulliGLM
        return cls(W, b, self.link)

    def covariates(self, emissions, inputs=None):
        """(T, N * J + U) or (M, T, N * J + U): history covariates of the spikes ``emissions``
        (T, N) or (M, T, N), then the external inputs."""
        h = history_covariates(emissions, self.basis)
        if inputs is None:
            if self.num_inputs:
                raise ValueError(f"inputs: the model has {self.num_inputs} external covariates; pass inputs (T, U)")
            return h
        u = jnp.asarray(inputs, h.dtype)
        u = jnp.broadcast_to(u, h.shape[:-1] + u.shape[-1:])
        return jnp.concatenate([h, u], -1)

    def emission_log_likelihoods(self, emissions, covariates, mode: str = "hard", key=None, normalized: bool = True,
                                 noise=None, observed=None):
        """(T, K) log p(x_t | z_t = k, history) of spikes (T, N) from precomputed covariates (T, N * J + U).

        ``normalized=False`` leaves out the log x! terms of the Poisson (constant in the parameters).
        ``observed`` (T, N) bool, optional: entries where it is False (missing spikes) are dropped."""
        K, N = self.num_states, self.num_neurons
        w = self.coupling_weights(mode, key, noise).reshape(K, N, -1)
        W = jnp.concatenate([w, self.input_weights], -1)
        eta = jnp.einsum("tu,kdu->tkd", covariates, W) + self.biases
        terms = glm_kernel(self.family, self.link)(emissions[:, None, :], eta)
        if normalized and self.family == "poisson":
            terms = terms - gammaln(emissions + 1.0)[:, None, :]
        if observed is not None:
            terms = jnp.where(observed[:, None, :], terms, 0.0)
        return jnp.sum(terms, -1)

    def check_emissions(self, emissions) -> None:
        """Spike data in the family's support (NaN = missing): Poisson counts non-negative
        integers, Bernoulli bins 0 or 1; concrete arrays only."""
        if self.family == "poisson":
            check_support(emissions, "HMMGLM (Poisson)", integer=True, low=0)
        else:
            check_support(emissions, "HMMGLM (Bernoulli)", integer=True, low=0, high=1)

    # --- exact structure -----------------------------------------------------------
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        """One trial: emissions (T, N), inputs (T, U) or None -> `DiscreteParams` (hard weights)."""
        y = jnp.asarray(emissions)
        observed = ~jnp.isnan(y)  # NaN = missing: dropped from the likelihood, read as 0 in the history
        y = jnp.where(observed, y, 0.0)
        x = self.covariates(y, inputs)
        A = jnp.exp(self.log_transition_matrices(inputs)) if self.input_driven else self.transition_matrix
        return DiscreteParams(self.initial_probs, A, self.emission_log_likelihoods(y, x, observed=observed))

    # --- the protocol: input rows [y_{t-1}, ..., y_{t-L}, u_t] of `protocol_inputs` ---------
    @property
    def emission_lags(self) -> int:
        """L without external covariates: y_t reads the lagged spikes y_{t-1..t-L} as its inputs,
        which the engines build (`default_inputs`) and `ps.sample` feeds back; 0 with covariates."""
        return 0 if self.num_inputs else self.history_length

    @property
    def input_dim(self):
        """L * N without external covariates; None (undeclared) with them."""
        return None if self.num_inputs else self.history_length * self.num_neurons

    def default_inputs(self, emissions):
        """The lagged spikes (T, L * N) or (B, T, L * N), zeros before the trial (the model conditions
        on no spikes there, as `discrete_params` does); None with external covariates."""
        if self.num_inputs:
            return None
        return self.protocol_inputs(emissions)

    def protocol_inputs(self, emissions, inputs=None):
        """(..., T, L * N + U) rows [y_{t-1}, ..., y_{t-L}, u_t] (zeros before the trial) that
        `initial`, `transition` and `emission` read, from spikes (..., T, N) and covariates (..., T, U)."""
        y = jnp.asarray(emissions)
        lagged = lagged_inputs(y if jnp.issubdtype(y.dtype, jnp.floating) else y.astype(self.weights.dtype),
                               self.history_length)
        if inputs is None:
            if self.num_inputs:
                raise ValueError(f"inputs: the model has {self.num_inputs} external covariates; pass inputs (T, U)")
            return lagged
        u = jnp.asarray(inputs, lagged.dtype)
        return jnp.concatenate([lagged, jnp.broadcast_to(u, lagged.shape[:-1] + u.shape[-1:])], -1)

    def initial(self, inputs=None):
        return dist.Categorical(probs=self.initial_probs)

    def transition(self, z_prev, t, inputs=None):
        if not self.input_driven:
            return dist.Categorical(probs=self.transition_matrix[z_prev])
        u = inputs[..., inputs.shape[-1] - self.num_inputs:]  # the external part of the input row
        return dist.Categorical(logits=self.log_transition_matrices(u[None])[0, z_prev])

    def emission(self, z, t, inputs=None):
        """p(y_t | z_t) from the input row [y_{t-1}, ..., y_{t-L}, u_t] (NaN lags read as zero)."""
        if inputs is None:
            raise ValueError("inputs: the HMM-GLM's emission reads the lagged spikes (`protocol_inputs`)")
        L, N = self.history_length, self.num_neurons
        past = jnp.nan_to_num(inputs[: L * N]).reshape(L, N)  # row l holds y_{t-l-1}
        h = jnp.einsum("ln,jl->nj", past, self.basis).reshape(-1)
        return self.glm().distribution(z, jnp.concatenate([h, inputs[L * N:]]))
