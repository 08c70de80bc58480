"""Coupling-weight priors of the HMM-GLM (`probssm.models.hmmglm.HMMGLM`), one small Module each.

A prior says three things about the coupling weights w^{(k)}_{n<-n',j} (K, N, N, J):

* how they are parameterised (`coupling_weights`: the model's free ``weights``, or built from
  the prior's own arrays), and whether the learner trains on a stochastic relaxation of them
  (``relaxed``, with standard Gumbel noise of shape `noise_shape`);
* their log prior density (`log_prior`), which the generalised EM adds to its objective;
* which of its arrays are learned (``learnable``; dotted paths ``"prior.<name>"`` on the model,
  read and written with `probssm.core.params`).

Priors:

* `NoPrior`: the plain HMM-GLM; the model's ``weights`` are free.
* `GaussianPrior`: w^{(k)} ~ N(W_bar, s^2) elementwise, W_bar = ``weight_mean`` (N, N, J), and
  s = ``min_weight_scale`` + softplus(``weight_scale_param``) learnable (the floor keeps the MAP
  from collapsing all states onto W_bar).
* `OneHotPrior` (Li et al., ICLR 2024): w^{(k)}_{n<-n',j} = (a^{(k)}_exc - a^{(k)}_inh) s^{(k)}_{n<-n',j},
  strengths s = ``min_strength`` + softplus(``strength_params``), a^{(k)} one-hot over
  {inhibitory, none, excitatory}; relaxed (Gumbel-softmax, ``temperature``) while learning, hard
  (argmax) at evaluation. Log prior -sum_k KL(q^{(k)} || p) with q^{(k)} = softmax(``adjacency_logits``)
  and the shared connectome p = softmax(``connectome_logits``), plus ``sparsity`` pseudo-votes for
  "none" and minus ``link_cost`` nats per connection switched on.

`prior_from_name` maps the deprecated ``prior="none" | "gaussian" | "onehot"`` strings to these.
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from numpyro.distributions import constraints

from probssm.core import checks

__all__ = ["AbstractCouplingPrior", "NoPrior", "GaussianPrior", "OneHotPrior", "PRIORS", "prior_from_name",
           "coerce_prior"]

REAL = {"constraint": constraints.real}
PRIORS = ("none", "gaussian", "onehot")


def _float(x, name, dtype=None):
    a = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    checks.finite(a, name)
    return a


def _nonneg(value, name, strict=False):
    v = float(value)
    if not (v > 0 if strict else v >= 0):
        raise ValueError(f"{name}: expected a {'positive float' if strict else 'float >= 0'}, got {value!r}")
    return v


class AbstractCouplingPrior(eqx.Module):
    """Prior over (and parameterisation of) the HMM-GLM's coupling weights; see the module doc."""

    name: ClassVar[str] = ""  # the deprecated prior= string
    relaxed: ClassVar[bool] = False  # the learner trains on a Gumbel-softmax relaxation
    uses_weights: ClassVar[bool] = True  # the model's ``weights`` are the free coupling weights
    learnable: ClassVar[tuple] = ()  # fields of the prior learned by the M-step

    def checked(self, num_states: int, num_neurons: int, num_bases: int, dtype) -> "AbstractCouplingPrior":
        """This prior with its arrays cast to ``dtype``; ValueError if their shapes do not fit the model."""
        return self

    def coupling_weights(self, weights, mode: str = "hard", key=None, noise=None):
        """(K, N, N, J) effective coupling weights from the model's ``weights`` (K, N, N, J)."""
        return weights

    @abc.abstractmethod
    def log_prior(self, weights) -> jax.Array:
        """() log prior of the coupling parameters, given the model's ``weights``."""

    @property
    def noise_shape(self) -> tuple:
        """Shape of the standard Gumbel noise a relaxed prior reads ((): none)."""
        return ()

    def connectome(self, weights, rule: str = "consensus"):
        """(N, N) signs: of the state average of the summed coupling weights (``rule`` ignored)."""
        return jnp.sign(jnp.mean(jnp.sum(weights, -1), 0))

    def drop_couplings(self, weights, drop):
        """(weights, prior) with the couplings where ``drop`` (K, N, N) is true switched off."""
        return jnp.where(drop[..., None], 0.0, weights), self

    def with_link_cost(self, link_cost: float) -> "AbstractCouplingPrior":
        """This prior charging ``link_cost`` nats per connection switched on (one-hot prior only)."""
        raise ValueError(f"model: a link cost (prune_links) needs the one-hot prior, got prior {self.name!r}")


class NoPrior(AbstractCouplingPrior):
    """No prior: the coupling weights are the model's free ``weights``; log prior 0."""

    name: ClassVar[str] = "none"

    def log_prior(self, weights):
        return jnp.zeros((), weights.dtype)


class GaussianPrior(AbstractCouplingPrior):
    """w^{(k)} ~ N(weight_mean, s^2) elementwise, s = min_weight_scale + softplus(weight_scale_param).

    Args:
        weight_mean: (N, N, J) state-constant part W_bar.
        weight_scale_param: () unconstrained scale parameter (0.5).
        min_weight_scale: floor of s (0.1). The MAP of a learnable scale is degenerate: s -> 0 with
            all states equal to W_bar gains -log s per weight and can collapse the states into one.
    """

    weight_mean: jax.Array = eqx.field(metadata=REAL)
    weight_scale_param: jax.Array = eqx.field(metadata=REAL)
    min_weight_scale: float = eqx.field(static=True, default=0.1)
    name: ClassVar[str] = "gaussian"
    learnable: ClassVar[tuple] = ("weight_mean", "weight_scale_param")

    def __init__(self, weight_mean, weight_scale_param=0.5, *, min_weight_scale: float = 0.1):
        self.weight_mean = _float(weight_mean, "weight_mean")
        self.weight_scale_param = _float(weight_scale_param, "weight_scale_param", self.weight_mean.dtype)
        self.min_weight_scale = _nonneg(min_weight_scale, "min_weight_scale", strict=True)

    def checked(self, num_states, num_neurons, num_bases, dtype):
        N, J = num_neurons, num_bases
        m = jnp.asarray(self.weight_mean, dtype)
        checks.shape(m, "weight_mean", (N, N, J), f"({N}, {N}, {J})")
        s = jnp.asarray(self.weight_scale_param, dtype)
        checks.shape(s, "weight_scale_param", (), "()")
        return eqx.tree_at(lambda p: (p.weight_mean, p.weight_scale_param), self, (m, s))

    @property
    def scale(self):
        """s = min_weight_scale + softplus(weight_scale_param)."""
        return jax.nn.softplus(self.weight_scale_param) + self.min_weight_scale

    def log_prior(self, weights):
        s = self.scale
        d = weights - self.weight_mean[None]
        return jnp.sum(-0.5 * (d / s) ** 2 - jnp.log(s) - 0.5 * math.log(2 * math.pi))


class OneHotPrior(AbstractCouplingPrior):
    """One-hot couplings w^{(k)}_{n<-n',j} = (a^{(k)}_exc - a^{(k)}_inh) * s^{(k)}_{n<-n',j}.

    Args:
        strength_params: (K, N, N, J); strengths s = min_strength + softplus(strength_params).
        adjacency_logits: (K, N, N, 3) per-state class logits over {inh, none, exc}.
        connectome_logits: (N, N, 3) shared prior class logits (default zeros: uniform).
        temperature: Gumbel-softmax temperature while learning (0.2).
        min_strength: floor of the strengths (0.1), so that an absent connection is expressed
            by the "none" class rather than by a vanishing strength.
        sparsity: a Dirichlet(1, 1 + sparsity, 1) hyperprior on each pair's connectome
            probabilities p, i.e. ``sparsity`` pseudo-states voting "no connection" (0 = flat).
        link_cost: nats charged per connection switched on in a state (0 = none). It tilts each
            state's indicator prior from p towards "none" by exp(-link_cost), the Occam factor of
            the strength a connection brings; ~0.5 log(bins per state) is the BIC charge
            (``link_cost="bic"`` in `init_hmmglm` and `ps.learn.prune_links`).

    The model's ``weights`` are not used (they only fix the shapes).
    """

    strength_params: jax.Array = eqx.field(metadata=REAL)
    adjacency_logits: jax.Array = eqx.field(metadata=REAL)
    connectome_logits: jax.Array = eqx.field(metadata=REAL)
    temperature: float = eqx.field(static=True, default=0.2)
    min_strength: float = eqx.field(static=True, default=0.1)
    sparsity: float = eqx.field(static=True, default=0.0)
    link_cost: float = eqx.field(static=True, default=0.0)
    name: ClassVar[str] = "onehot"
    relaxed: ClassVar[bool] = True
    uses_weights: ClassVar[bool] = False
    learnable: ClassVar[tuple] = ("strength_params", "adjacency_logits", "connectome_logits")

    def __init__(self, strength_params, adjacency_logits, connectome_logits=None, *, temperature: float = 0.2,
                 min_strength: float = 0.1, sparsity: float = 0.0, link_cost: float = 0.0):
        self.strength_params = _float(strength_params, "strength_params")
        dtype = self.strength_params.dtype
        self.adjacency_logits = _float(adjacency_logits, "adjacency_logits", dtype)
        if connectome_logits is None:
            connectome_logits = jnp.zeros(self.adjacency_logits.shape[1:], dtype)
        self.connectome_logits = _float(connectome_logits, "connectome_logits", dtype)
        self.temperature = _nonneg(temperature, "temperature", strict=True)
        self.min_strength = _nonneg(min_strength, "min_strength")
        self.sparsity = _nonneg(sparsity, "sparsity")
        self.link_cost = _nonneg(link_cost, "link_cost")

    def checked(self, num_states, num_neurons, num_bases, dtype):
        K, N, J = num_states, num_neurons, num_bases
        arrays = (jnp.asarray(self.strength_params, dtype), jnp.asarray(self.adjacency_logits, dtype),
                  jnp.asarray(self.connectome_logits, dtype))
        for a, name, shape in zip(arrays, ("strength_params", "adjacency_logits", "connectome_logits"),
                                  ((K, N, N, J), (K, N, N, 3), (N, N, 3))):
            checks.shape(a, name, shape)
        return eqx.tree_at(lambda p: (p.strength_params, p.adjacency_logits, p.connectome_logits), self, arrays)

    @property
    def strengths(self):
        """(K, N, N, J) min_strength + softplus(strength_params)."""
        return self.min_strength + jax.nn.softplus(self.strength_params)

    @property
    def adjacency_probs(self):
        """(K, N, N, 3) per-state class probabilities q^{(k)} over {inh, none, exc}."""
        return jax.nn.softmax(self.adjacency_logits, -1)

    @property
    def connectome_probs(self):
        """(N, N, 3) shared class probabilities p over {inh, none, exc}."""
        return jax.nn.softmax(self.connectome_logits, -1)

    @property
    def noise_shape(self):
        return self.adjacency_logits.shape

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

    def coupling_weights(self, weights, mode: str = "hard", key=None, noise=None):
        a = self.indicators(mode, key, noise)
        return (a[..., 2] - a[..., 0])[..., None] * self.strengths

    def log_prior(self, weights):
        logq = jax.nn.log_softmax(self.adjacency_logits, -1)
        logp = jax.nn.log_softmax(self.connectome_logits, -1)
        lp = -jnp.sum(jnp.exp(logq) * (logq - logp[None]))
        if self.sparsity:  # Dirichlet(1, 1 + sparsity, 1) hyperprior on p: pseudo-votes for "none"
            lp = lp + self.sparsity * jnp.sum(logp[..., 1])
        if self.link_cost:
            lp = lp - self.link_cost * jnp.sum(1.0 - jnp.exp(logq[..., 1]))
        return lp

    def connectome(self, weights, rule: str = "consensus"):
        """``"consensus"``: argmax of the states' mean class probabilities; ``"support"``: the union of
        the per-state graphs, signed by majority (see `HMMGLM.connectome`)."""
        q = self.adjacency_probs
        if rule == "consensus":
            return jnp.argmax(jnp.mean(q, 0), -1) - 1
        a = self.indicators("hard")
        votes = jnp.sum(a[..., 2] - a[..., 0], 0)
        used = jnp.any(a[..., 1] < 0.5, 0)
        tie_break = jnp.sum(q[..., 2] - q[..., 0], 0)
        return jnp.where(used, jnp.sign(jnp.where(votes != 0, votes, tie_break)), 0).astype(votes.dtype)

    def drop_couplings(self, weights, drop):
        """Indicators to "none" where ``drop``: logits (-30, 0, -30)."""
        none = jnp.asarray([-30.0, 0.0, -30.0], self.adjacency_logits.dtype)
        logits = jnp.where(drop[..., None], none, self.adjacency_logits)
        return weights, eqx.tree_at(lambda p: p.adjacency_logits, self, logits)

    def with_link_cost(self, link_cost):
        return OneHotPrior(self.strength_params, self.adjacency_logits, self.connectome_logits,
                           temperature=self.temperature, min_strength=self.min_strength, sparsity=self.sparsity,
                           link_cost=link_cost)


def prior_from_name(name: str, num_states: int, num_neurons: int, num_bases: int, dtype, *,
                    weight_mean=None, weight_scale_param=None, strength_params=None, adjacency_logits=None,
                    connectome_logits=None, temperature: float = 0.2, min_strength: float = 0.1,
                    min_weight_scale: float = 0.1, sparsity: float = 0.0,
                    link_cost: float = 0.0) -> AbstractCouplingPrior:
    """The prior class a deprecated ``prior=`` string names, built from the old keyword arguments.

    Arrays not given start at zero (``weight_scale_param`` at 0.5); arguments of the other
    priors are ignored, but every hyperparameter is validated.
    """
    if name not in PRIORS:
        raise ValueError(f"prior: expected one of {PRIORS} or an AbstractCouplingPrior, got {name!r}")
    _nonneg(temperature, "temperature", strict=True)
    _nonneg(min_strength, "min_strength")
    _nonneg(min_weight_scale, "min_weight_scale", strict=True)
    _nonneg(sparsity, "sparsity")
    _nonneg(link_cost, "link_cost")
    K, N, J = num_states, num_neurons, num_bases

    def arr(x, shape, fill=0.0):
        return jnp.full(shape, fill, dtype) if x is None else jnp.asarray(x, dtype)

    if name == "none":
        prior: AbstractCouplingPrior = NoPrior()
    elif name == "gaussian":
        prior = GaussianPrior(arr(weight_mean, (N, N, J)), arr(weight_scale_param, (), 0.5),
                              min_weight_scale=min_weight_scale)
    else:
        prior = OneHotPrior(arr(strength_params, (K, N, N, J)), arr(adjacency_logits, (K, N, N, 3)),
                            arr(connectome_logits, (N, N, 3)), temperature=temperature, min_strength=min_strength,
                            sparsity=sparsity, link_cost=link_cost)
    return prior.checked(K, N, J, dtype)


def coerce_prior(prior, num_states: int, num_neurons: int, num_bases: int, dtype,
                 options: Optional[dict] = None) -> AbstractCouplingPrior:
    """``prior`` as a checked `AbstractCouplingPrior`: a prior object (``options`` must then be
    empty) or a deprecated name built with `prior_from_name` from ``options``."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if isinstance(prior, AbstractCouplingPrior):
        if options:
            raise ValueError(f"{sorted(options)[0]}: give the prior's parameters in the prior object "
                             f"({type(prior).__name__}), not as keyword arguments of the model")
        return prior.checked(num_states, num_neurons, num_bases, dtype)
    if isinstance(prior, str):
        return prior_from_name(prior, num_states, num_neurons, num_bases, dtype, **options)
    raise ValueError(f"prior: expected one of {PRIORS} or an AbstractCouplingPrior, got {prior!r}")
