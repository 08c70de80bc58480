"""Hidden semi-Markov models (explicit durations) as an expanded-state discrete model.

A segment in state k lasts d ~ p_k(d) steps, d = 1..D (D = ``max_duration``), then the
chain jumps to j != k with probability A[k, j] (zero diagonal; an *absorbing* state, a row
equal to e_k, re-enters itself for ever, e.g. the failure state of a left-to-right
degradation model). Emissions are any `ps.emissions` family, read per segment state.

Exact inference runs on `ps.hmm` unchanged through the expanded state s = (k, r), with r
the *remaining* duration of the current segment (the current step included), index
``s = k * D + (r - 1)``; K * D states::

    p(s_0 = (k, r))                = pi_k p_k(r)
    (k, r) -> (k, r - 1)           with probability 1                  r >= 2
    (k, 1) -> (j, r')              with probability A[k, j] p_j(r')
    y_t | s_t = (k, r)             ~ emissions.distribution(k, u_t)

A geometric duration (`GeometricDuration`) keeps the tail exact with a self-loop on the last
cell: (k, D) stays with probability a_k, otherwise moves on as above, so the duration is
(1 - a) a^(d - 1) for every d >= 1 (D = 1 gives back the HMM with stay probability a_k).
The last segment of a sequence is right-censored: summing the expanded posterior over r is
the exact marginal over all completions.

`HSMM.state_marginals` maps expanded-state probabilities (..., K * D) back to (..., K);
`HSMM.expand_plausibility` repeats ARPHMM plausibilities (..., K) over the durations, for
``ps.hmm.*(..., plausibility=...)``; `HSMM.segment_states` maps sampled expanded states to k.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammainc, gammaln
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import AbstractSemiMarkovSSM, DiscreteParams
from probssm.models.emissions import AbstractEmissions

__all__ = ["HSMM", "AbstractDuration", "NonParametricDuration", "GeometricDuration", "PoissonDuration",
           "NegativeBinomialDuration", "GammaDuration", "WeibullDuration", "left_to_right"]

SIMPLEX = {"constraint": constraints.simplex}
POSITIVE = {"constraint": constraints.positive}
UNIT = {"constraint": constraints.unit_interval}
_TINY = 1e-300


def _float(a, name):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    checks.finite(a, name)
    return a


def _positive(a, name):
    a = _float(a, name)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected shape (K,), got shape {tuple(a.shape)}")
    if checks.is_concrete(a) and np.any(np.asarray(a) <= 0):
        raise ValueError(f"{name}: expected positive values, found {float(np.min(np.asarray(a))):.3g}")
    return a


def left_to_right(num_states: int, dtype=None) -> jax.Array:
    """(K, K) left-to-right transition matrix of an HSMM: state k jumps to k + 1, the last state
    (the failure state) is absorbing.

    Example:
        >>> ps.models.left_to_right(3)   # [[0, 1, 0], [0, 0, 1], [0, 0, 1]]
    """
    K = checks.positive_int(num_states, "num_states")
    A = jnp.eye(K, k=1, dtype=dtype or jnp.result_type(float))
    return A.at[K - 1, K - 1].set(1.0)


# ----------------------------------------------------------------------------------------------
# Duration families
# ----------------------------------------------------------------------------------------------
class AbstractDuration(eqx.Module):
    """Per-state duration distributions p_k(d), d = 1..max_duration.

    A family gives `pmf` (K, D): the probability that a segment of state k starts with
    remaining duration d (for `GeometricDuration` the last column is P(d >= D)), `tail_probs`
    (K,): the self-loop probability of the last cell (0: durations end at D), and a weighted
    `m_step` on the expected segment counts.
    """

    max_duration: int = eqx.field(static=True)

    @property
    @abc.abstractmethod
    def num_states(self) -> int: ...

    @abc.abstractmethod
    def pmf(self) -> jax.Array:
        """(K, D) probabilities of the first remaining duration of a segment, rows sum to one."""

    def tail_probs(self) -> jax.Array:
        """(K,) probability that the last duration cell loops on itself (0 by default)."""
        p = self.pmf()
        return jnp.zeros(p.shape[:1], p.dtype)

    @abc.abstractmethod
    def m_step(self, entries, loops, exits):
        """New family maximising sum_{k,d} entries[k, d] log pmf[k, d] + loops log q + exits log(1 - q).

        Args:
            entries: (K, D) expected numbers of segments starting with remaining duration d.
            loops: (K,) expected self-loops of the last cell; exits: (K,) expected departures from it.
        """

    def mean(self) -> jax.Array:
        """(K,) mean durations."""
        p = self.pmf()
        d = jnp.arange(1, p.shape[-1] + 1, dtype=p.dtype)
        q = self.tail_probs()
        # the tail cell adds a geometric number of extra steps, mean q / (1 - q)
        return jnp.sum(p * d, -1) + p[:, -1] * q / jnp.where(q < 1, 1.0 - q, 1.0)


def _keep(total, new, old):
    return jnp.where((total > 0).reshape(total.shape + (1,) * (new.ndim - total.ndim)), new, old)


class NonParametricDuration(AbstractDuration):
    """Free pmf over d = 1..D per state, optionally with a geometric tail on the last cell.

    Without ``tail_probs`` durations are truncated at D (none above it). With ``tail_probs`` q_k
    the last cell loops on itself with probability q_k, so a segment entering cell D lasts
    D - 1 + G steps, G ~ Geometric(1 - q_k) on {1, 2, ...}: p_k(d) = pmf[k, d - 1] for d < D and
    pmf[k, D - 1] (1 - q_k) q_k^(d - D) for d >= D (the last column is then P(d >= D)). One
    state can so have long, memoryless durations (a healthy phase) while the others keep exact
    short ones, without enlarging D. EM updates q_k from the expected loops and exits of the
    last cell; a q_k that starts at 0 stays 0.

    Args:
        pmf: (K, D') rows summing to one, column d - 1 holding p_k(d).
        max_duration: D; None: D' (columns beyond D must carry no probability, else ValueError).
        tail_probs: None (no tail: q = 0) or (K,) in [0, 1).
    """

    probs: jax.Array = eqx.field(metadata=SIMPLEX)
    tail: jax.Array = eqx.field(metadata=UNIT)

    def __init__(self, pmf, max_duration=None, tail_probs=None):
        p = _float(pmf, "pmf")
        if p.ndim != 2:
            raise ValueError(f"pmf: expected shape (K, max_duration), got shape {tuple(p.shape)}")
        D = p.shape[1] if max_duration is None else checks.positive_int(max_duration, "max_duration")
        if p.shape[1] > D:
            if checks.is_concrete(p) and np.any(np.asarray(p)[:, D:] != 0):
                above = float(np.max(np.asarray(p)[:, D:].sum(1)))
                raise ValueError(f"pmf: puts probability {above:.3g} on durations above max_duration={D}; "
                                 f"expected shape (K, {D}) or zeros beyond column {D}")
            p = p[:, :D]
        elif p.shape[1] < D:
            p = jnp.pad(p, ((0, 0), (0, D - p.shape[1])))
        checks.probabilities(p, "pmf")
        if tail_probs is None:
            q = jnp.zeros(p.shape[:1], p.dtype)
        else:
            q = _float(tail_probs, "tail_probs")
            checks.shape(q, "tail_probs", p.shape[:1], f"({p.shape[0]},)")
            if checks.is_concrete(q) and (np.any(np.asarray(q) < 0) or np.any(np.asarray(q) >= 1)):
                raise ValueError(f"tail_probs: expected values in [0, 1), got {np.asarray(q)}")
        self.probs, self.tail, self.max_duration = p, q, D

    @property
    def num_states(self) -> int:
        return self.probs.shape[0]

    def pmf(self):
        return self.probs

    def tail_probs(self):
        return self.tail

    def m_step(self, entries, loops, exits):
        total = entries.sum(-1, keepdims=True)
        new = entries / jnp.where(total > 0, total, 1.0)
        visits = loops + exits
        q = jnp.where(visits > 0, loops / jnp.where(visits > 0, visits, 1.0), self.tail)
        return eqx.tree_at(lambda m: (m.probs, m.tail), self, (_keep(total[:, 0], new, self.probs), q))


class GeometricDuration(AbstractDuration):
    """p_k(d) = (1 - a_k) a_k^(d - 1), d >= 1, exact (untruncated): the last of ``max_duration``
    cells loops on itself with probability a_k. ``max_duration=1`` is the HMM with stay
    probability a_k.

    Args:
        stay_probs: (K,) in [0, 1).
        max_duration: D >= 1 cells (any D gives the same law).
    """

    stay_probs: jax.Array = eqx.field(metadata=UNIT)

    def __init__(self, stay_probs, max_duration: int = 1):
        a = _float(stay_probs, "stay_probs")
        if a.ndim != 1:
            raise ValueError(f"stay_probs: expected shape (K,), got shape {tuple(a.shape)}")
        if checks.is_concrete(a) and (np.any(np.asarray(a) < 0) or np.any(np.asarray(a) >= 1)):
            raise ValueError(f"stay_probs: expected values in [0, 1), got {np.asarray(a)}")
        self.stay_probs, self.max_duration = a, checks.positive_int(max_duration, "max_duration")

    @property
    def num_states(self) -> int:
        return self.stay_probs.shape[0]

    def pmf(self):
        a = self.stay_probs[:, None]
        d = jnp.arange(1, self.max_duration + 1, dtype=a.dtype)[None]
        body = (1.0 - a) * a ** (d - 1)
        return jnp.where(d == self.max_duration, a ** (d - 1), body)

    def tail_probs(self):
        return self.stay_probs

    def m_step(self, entries, loops, exits):
        D = self.max_duration
        d = jnp.arange(1, D + 1, dtype=entries.dtype)
        # every step spent in a segment past its first is a "stay"; every segment end a "leave"
        stays = jnp.sum(entries * (d - 1), -1) + loops
        leaves = jnp.sum(entries[:, : D - 1], -1) + exits
        total = stays + leaves
        new = stays / jnp.where(total > 0, total, 1.0)
        return eqx.tree_at(lambda m: m.stay_probs, self, jnp.where(total > 0, new, self.stay_probs))


class _Parametric(AbstractDuration):
    """A discretised parametric law on d = 1, 2, ..., truncated to 1..D and renormalised.

    Subclasses give ``_log_mass(params, d)`` (the untruncated log probability of d, params a
    tuple of (K,) arrays) and the names of their parameter fields; the M-step maximises the
    weighted log-likelihood by guarded Newton steps in the unconstrained parameters (a step is
    kept only when it raises the objective, so EM stays monotone).
    """

    param_names: ClassVar[tuple] = ()
    # unconstrained <-> constrained maps of the parameters, in param_names order
    transforms: ClassVar[tuple] = ()

    def _params(self):
        return tuple(getattr(self, n) for n in self.param_names)

    @staticmethod
    @abc.abstractmethod
    def _log_mass(params, d):
        """Untruncated log p(d) for durations d (broadcast against (K,) params)."""

    @property
    def num_states(self) -> int:
        return getattr(self, self.param_names[0]).shape[0]

    def _grid(self, dtype):
        return jnp.arange(1, self.max_duration + 1, dtype=dtype)

    def pmf(self):
        params = self._params()
        d = self._grid(params[0].dtype)
        lw = self._log_mass(tuple(p[:, None] for p in params), d[None])
        return jax.nn.softmax(lw, -1)

    def truncated_mass(self) -> jax.Array:
        """(K,) untruncated probability of durations above max_duration (what truncation drops)."""
        params = self._params()
        d = self._grid(params[0].dtype)
        lw = self._log_mass(tuple(p[:, None] for p in params), d[None])
        return jnp.clip(1.0 - jnp.sum(jnp.exp(lw), -1), 0.0, 1.0)

    def _check(self, tol):
        if tol is None or not all(checks.is_concrete(p) for p in self._params()):
            return
        above = np.asarray(self.truncated_mass())
        if np.any(above > tol):
            k = int(np.argmax(above))
            raise ValueError(f"max_duration: state {k} puts probability {above[k]:.3g} on durations above "
                             f"max_duration={self.max_duration} (more than truncation_tol={tol:g}); expected "
                             "a larger max_duration, or truncation_tol=None to truncate and renormalise")

    def m_step(self, entries, loops, exits, num_steps: int = 30):
        fw = tuple(f for f, _ in self.transforms)
        inv = tuple(i for _, i in self.transforms)
        d = self._grid(entries.dtype)

        def objective(theta, w):
            params = tuple(f(x) for f, x in zip(fw, theta))
            lw = self._log_mass(params, d)
            return jnp.sum(w * jax.nn.log_softmax(lw))

        def fit_one(theta0, w):
            steps = 2.0 ** -jnp.arange(12, dtype=w.dtype)

            def body(theta, _):
                x = jnp.stack(theta)
                f0 = objective(theta, w)
                grad = jax.grad(lambda v: objective(tuple(v), w))
                g = grad(x)
                # Hessian by central differences of the gradient (the gamma cdf has no second
                # derivative in its shape in JAX); the guarded step below keeps any error harmless
                h = jnp.finfo(x.dtype).eps ** (1 / 3)
                eye = jnp.eye(x.shape[0], dtype=x.dtype)
                H = jax.vmap(lambda e: (grad(x + h * e) - grad(x - h * e)) / (2 * h))(eye)
                H = 0.5 * (H + H.T)
                newton = -jnp.linalg.solve(H - 1e-9 * jnp.eye(x.shape[0], dtype=x.dtype), g)
                ascent = jnp.all(jnp.isfinite(newton)) & (newton @ g > 0)
                direction = jnp.where(ascent, newton, g / jnp.maximum(jnp.linalg.norm(g), 1.0))
                cand = x[None] + steps[:, None] * direction[None]
                vals = jax.vmap(lambda v: objective(tuple(v), w))(cand)
                vals = jnp.where(jnp.isfinite(vals), vals, -jnp.inf)
                best = jnp.argmax(vals)
                better = vals[best] > f0
                x = jnp.where(better, cand[best], x)
                return tuple(x), None

            theta, _ = jax.lax.scan(body, theta0, None, length=num_steps)
            return theta

        theta0 = tuple(i(p) for i, p in zip(inv, self._params()))
        total = entries.sum(-1)
        theta = jax.vmap(fit_one)(theta0, entries)
        new = tuple(_keep(total, f(x), p) for f, x, p in zip(fw, theta, self._params()))
        return eqx.tree_at(lambda m: m._params(), self, new)


_LOG = (jnp.exp, jnp.log)
_LOGIT = (jax.nn.sigmoid, lambda p: jnp.log(p) - jnp.log1p(-p))


def _log_diff_cdf(log_sf_lo, log_sf_hi):
    """log(S(d - 1) - S(d)) from the log survival functions (stable when both are tiny)."""
    return log_sf_lo + jnp.log(jnp.maximum(-jnp.expm1(log_sf_hi - log_sf_lo), _TINY))


def _safe_pow(x, c):
    """x^c for x >= 0 with a finite gradient in c at x = 0 (where it is 0)."""
    pos = x > 0
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** c, 0.0)


class PoissonDuration(_Parametric):
    """d - 1 ~ Poisson(rate_k), truncated to d = 1..max_duration.

    Args:
        rates: (K,) positive; max_duration: D.
        truncation_tol: ValueError naming ``max_duration`` when a state puts more untruncated
            probability than this above D (None: truncate silently).
    """

    rates: jax.Array = eqx.field(metadata=POSITIVE)
    param_names: ClassVar[tuple] = ("rates",)
    transforms: ClassVar[tuple] = (_LOG,)

    def __init__(self, rates, max_duration: int, truncation_tol=1e-3):
        self.rates = _positive(rates, "rates")
        self.max_duration = checks.positive_int(max_duration, "max_duration")
        self._check(truncation_tol)

    @staticmethod
    def _log_mass(params, d):
        (lam,) = params
        return (d - 1) * jnp.log(lam) - lam - gammaln(d)


class NegativeBinomialDuration(_Parametric):
    """d - 1 ~ NegativeBinomial(total_count r_k, probs p_k), truncated to 1..max_duration:
    P(d - 1 = n) = Gamma(n + r) / (Gamma(r) n!) p^n (1 - p)^r, mean r p / (1 - p) (numpyro's
    ``NegativeBinomialProbs``; scipy's ``nbinom(r, 1 - p)``).
    """

    total_count: jax.Array = eqx.field(metadata=POSITIVE)
    probs: jax.Array = eqx.field(metadata=UNIT)
    param_names: ClassVar[tuple] = ("total_count", "probs")
    transforms: ClassVar[tuple] = (_LOG, _LOGIT)

    def __init__(self, total_count, probs, max_duration: int, truncation_tol=1e-3):
        self.total_count = _positive(total_count, "total_count")
        p = _positive(jnp.asarray(probs, self.total_count.dtype), "probs")
        if checks.is_concrete(p) and np.any(np.asarray(p) >= 1):
            raise ValueError(f"probs: expected values in (0, 1), got {np.asarray(p)}")
        checks.shape(p, "probs", self.total_count.shape)
        self.probs = p
        self.max_duration = checks.positive_int(max_duration, "max_duration")
        self._check(truncation_tol)

    @staticmethod
    def _log_mass(params, d):
        r, p = params
        n = d - 1
        return gammaln(n + r) - gammaln(r) - gammaln(n + 1) + n * jnp.log(p) + r * jnp.log1p(-p)


class GammaDuration(_Parametric):
    """Discretised gamma: p(d) = F(d) - F(d - 1), F the Gamma(concentration, rate) cdf on (0, inf),
    truncated to d = 1..max_duration."""

    concentration: jax.Array = eqx.field(metadata=POSITIVE)
    rate: jax.Array = eqx.field(metadata=POSITIVE)
    param_names: ClassVar[tuple] = ("concentration", "rate")
    transforms: ClassVar[tuple] = (_LOG, _LOG)

    def __init__(self, concentration, rate, max_duration: int, truncation_tol=1e-3):
        self.concentration = _positive(concentration, "concentration")
        self.rate = checks.shape(_positive(jnp.asarray(rate, self.concentration.dtype), "rate"), "rate",
                                 self.concentration.shape)
        self.max_duration = checks.positive_int(max_duration, "max_duration")
        self._check(truncation_tol)

    @staticmethod
    def _log_mass(params, d):
        a, b = params
        hi, lo = gammainc(a, b * d), gammainc(a, b * (d - 1))
        return jnp.log(jnp.maximum(hi - lo, _TINY))


class WeibullDuration(_Parametric):
    """Discretised Weibull: p(d) = exp(-((d - 1)/scale)^c) - exp(-(d/scale)^c), truncated to
    d = 1..max_duration (c = ``concentration``)."""

    concentration: jax.Array = eqx.field(metadata=POSITIVE)
    scale: jax.Array = eqx.field(metadata=POSITIVE)
    param_names: ClassVar[tuple] = ("concentration", "scale")
    transforms: ClassVar[tuple] = (_LOG, _LOG)

    def __init__(self, concentration, scale, max_duration: int, truncation_tol=1e-3):
        self.concentration = _positive(concentration, "concentration")
        self.scale = checks.shape(_positive(jnp.asarray(scale, self.concentration.dtype), "scale"), "scale",
                                  self.concentration.shape)
        self.max_duration = checks.positive_int(max_duration, "max_duration")
        self._check(truncation_tol)

    @staticmethod
    def _log_mass(params, d):
        c, s = params
        return _log_diff_cdf(-_safe_pow((d - 1) / s, c), -_safe_pow(d / s, c))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def _check_transition(A, K):
    checks.shape(A, "transition_matrix", (K, K), f"({K}, {K})")
    checks.probabilities(A, "transition_matrix")
    if not checks.is_concrete(A):
        return
    a = np.asarray(A)
    diag = np.diag(a)
    bad = (diag != 0) & (diag != 1)
    if np.any(bad):
        k = int(np.argmax(bad))
        raise ValueError(f"transition_matrix: expected a zero diagonal (durations are explicit; the stay "
                         f"probability belongs to the duration law), found transition_matrix[{k}, {k}] = "
                         f"{diag[k]:.6g}; only an absorbing state may have transition_matrix[k, k] = 1")


class HSMM(AbstractSemiMarkovSSM):
    """Hidden semi-Markov model with K segment states, run as a K * D expanded-state HMM.

    Args:
        initial_probs: (K,) probabilities of the first segment's state.
        transition_matrix: (K, K) segment-to-segment jumps, rows summing to one, zero diagonal
            (a row equal to e_k marks an absorbing state, e.g. `left_to_right`'s failure state).
        durations: a duration family (`NonParametricDuration`, `GeometricDuration`,
            `PoissonDuration`, `NegativeBinomialDuration`, `GammaDuration`, `WeibullDuration`)
            with K states; its ``max_duration`` D sets the expansion.
        emissions: a `ps.emissions` family with K states (autoregressive ones included: the
            lagged observations are the inputs, as in `ps.models.HMM`).

    ``num_states`` is K * D (what `ps.hmm` sees); ``num_segment_states`` is K. Plausibilities
    (ARPHMM) per segment state go through `expand_plausibility`. ``ps.hmm.viterbi`` returns the
    most likely expanded path (`segment_states` maps it to k): every segment's duration is part of
    the path, and the censored last segment takes its most likely completion. Gradient learners
    (``ps.learn.mle``) fit ``initial_probs``, the duration and emission parameters; the
    zero-diagonal ``transition_matrix`` is learned by EM (``ps.learn.em``) only.

    Example:
        >>> dur = ps.models.PoissonDuration(jnp.array([4., 8.]), max_duration=25)
        >>> em = ps.emissions.Gaussian(jnp.array([[-1.], [1.]]), jnp.ones((2, 1, 1)))
        >>> hsmm = ps.models.HSMM(jnp.array([.5, .5]), jnp.array([[0., 1.], [1., 0.]]), dur, em)
        >>> z, y = ps.sample(key, hsmm, 100)
        >>> probs = hsmm.state_marginals(ps.hmm.smoother(hsmm, y).smoothed_probs)   # (100, 2)
    """

    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    transition_matrix: jax.Array  # zero diagonal: held fixed by gradient learners, EM updates it
    durations: AbstractDuration
    emissions: AbstractEmissions

    def __init__(self, initial_probs, transition_matrix, durations, emissions):
        if not isinstance(emissions, AbstractEmissions):
            raise ValueError(f"emissions: expected a ps.emissions family, got {type(emissions).__name__}")
        if not isinstance(durations, AbstractDuration):
            raise ValueError(f"durations: expected a duration family (e.g. ps.models.PoissonDuration), "
                             f"got {type(durations).__name__}")
        K = emissions.num_states
        if durations.num_states != K:
            raise ValueError(f"durations: expected {K} states (as the emissions), got {durations.num_states}")
        pi = _float(initial_probs, "initial_probs")
        checks.shape(pi, "initial_probs", (K,), f"({K},)")
        checks.probabilities(pi, "initial_probs")
        A = jnp.asarray(transition_matrix, pi.dtype)
        _check_transition(A, K)
        self.initial_probs, self.transition_matrix = pi, A
        self.durations, self.emissions = durations, emissions

    # --- sizes and declared members -----------------------------------------------------
    @property
    def num_segment_states(self) -> int:
        """K, the number of segment states."""
        return self.initial_probs.shape[0]

    @property
    def max_duration(self) -> int:
        """D, the number of duration cells per state."""
        return self.durations.max_duration

    @property
    def num_states(self) -> int:
        """K * D, the size of the expanded state (what `ps.hmm` runs on)."""
        return self.num_segment_states * self.max_duration

    @property
    def emission_dim(self) -> int:
        return self.emissions.emission_dim

    @property
    def input_dim(self):
        return self.emissions.input_dim

    @property
    def emission_lags(self) -> int:
        return self.emissions.num_lags

    def default_inputs(self, emissions):
        return self.emissions.default_inputs(emissions)

    def check_emissions(self, emissions) -> None:
        self.emissions.check_emissions(emissions)

    def check_parameters(self, name: str = "model") -> None:
        """The constructor's checks again, where inference starts: a model made by ``eqx.tree_at``,
        ``tree_map`` or ``ps.load`` bypasses ``__init__`` (the expanded chain would otherwise
        report its errors under expanded-state names). Concrete values only."""
        super().check_parameters(name)
        K = self.emissions.num_states
        if self.durations.num_states != K:
            raise ValueError(f"durations: expected {K} states (as the emissions), got {self.durations.num_states}")
        checks.shape(self.initial_probs, "initial_probs", (K,), f"({K},)")
        checks.probabilities(self.initial_probs, "initial_probs")
        _check_transition(self.transition_matrix, K)
        checks.probabilities(self.durations.pmf(), "durations.pmf")
        q = self.durations.tail_probs()
        if checks.is_concrete(q) and (np.any(np.asarray(q) < 0) or np.any(np.asarray(q) >= 1)):
            raise ValueError(f"durations.tail_probs: expected values in [0, 1), got {np.asarray(q)}")

    def absorbing_states(self) -> np.ndarray:
        """Indices k (concrete model) with transition_matrix[k, k] = 1."""
        return np.flatnonzero(np.diag(np.asarray(self.transition_matrix)) == 1.0)

    # --- the expanded chain ----------------------------------------------------------------
    def _dtype(self):
        return jnp.result_type(self.initial_probs, self.transition_matrix, self.durations.pmf())

    def expanded_initial_probs(self) -> jax.Array:
        """(K * D,) p(s_0 = (k, r)) = pi_k p_k(r)."""
        p = self.durations.pmf()
        dtype = self._dtype()
        return (self.initial_probs[:, None] * p).reshape(-1).astype(dtype)

    def _expanded_row(self, s, pmf, tail):
        K, D = self.num_segment_states, self.max_duration
        A = self.transition_matrix.astype(pmf.dtype)
        k, r = s // D, s % D
        jump = (A[k][:, None] * pmf).reshape(-1)
        down = jax.nn.one_hot(s - 1, K * D, dtype=pmf.dtype)
        normal = jnp.where(r == 0, jump, down)
        q = jnp.where(r == D - 1, tail[k], 0.0)
        return q * jax.nn.one_hot(s, K * D, dtype=pmf.dtype) + (1.0 - q) * normal

    def expanded_transition_matrix(self) -> jax.Array:
        """(K * D, K * D) transition matrix of the expanded state (rows: s_{t-1})."""
        pmf = self.durations.pmf().astype(self._dtype())
        tail = self.durations.tail_probs().astype(pmf.dtype)
        return jax.vmap(lambda s: self._expanded_row(s, pmf, tail))(jnp.arange(self.num_states))

    @property
    def segment_transition_matrix(self) -> jax.Array:
        """(K, K) jumps between segment states (the field ``transition_matrix``)."""
        return self.transition_matrix

    def state_marginals(self, probs) -> jax.Array:
        """(..., K * D) expanded-state probabilities -> (..., K) segment-state probabilities."""
        probs = jnp.asarray(probs)
        return probs.reshape(probs.shape[:-1] + (self.num_segment_states, self.max_duration)).sum(-1)

    def duration_marginals(self, probs) -> jax.Array:
        """(..., K * D) expanded-state probabilities -> (..., K, D): p(state k, remaining duration d)."""
        probs = jnp.asarray(probs)
        return probs.reshape(probs.shape[:-1] + (self.num_segment_states, self.max_duration))

    def segment_states(self, states) -> jax.Array:
        """Expanded states (any shape, -1 = padding kept) -> segment states k."""
        states = jnp.asarray(states)
        return jnp.where(states < 0, states, states // self.max_duration)

    def remaining_durations(self, states) -> jax.Array:
        """Expanded states -> remaining durations r (1..D; the tail cell of a geometric law reads D)."""
        states = jnp.asarray(states)
        return jnp.where(states < 0, states, states % self.max_duration + 1)

    def expand_plausibility(self, plausibility) -> jax.Array:
        """(..., K) plausibilities per segment state -> (..., K * D) for `ps.hmm` (each state's
        weight repeated over its duration cells)."""
        pl = jnp.asarray(plausibility)
        K = self.num_segment_states
        if pl.ndim < 1 or pl.shape[-1] != K:
            raise ValueError(f"plausibility: expected shape (..., {K}), got shape {tuple(pl.shape)}")
        return jnp.repeat(pl, self.max_duration, axis=-1)

    # --- exact structure ---------------------------------------------------------------------
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        y = jnp.asarray(emissions)
        if inputs is None:
            inputs = self.default_inputs(y)
        ll = self.emissions.log_likelihoods(y, inputs)
        return DiscreteParams(self.expanded_initial_probs(), self.expanded_transition_matrix(),
                              jnp.repeat(ll, self.max_duration, axis=-1))

    # --- the protocol ------------------------------------------------------------------------
    def initial(self, inputs=None):
        return dist.Categorical(probs=self.expanded_initial_probs())

    def transition(self, z_prev, t, inputs=None):
        pmf = self.durations.pmf().astype(self._dtype())
        return dist.Categorical(probs=self._expanded_row(z_prev, pmf, self.durations.tail_probs().astype(pmf.dtype)))

    def emission(self, z, t, inputs=None):
        return self.emissions.distribution(z // self.max_duration, inputs)
