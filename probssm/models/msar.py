"""Hamilton-type Markov-switching autoregressions, as an expanded-state HMM.

A regime s_t in {0..K-1} follows a Markov chain with transition matrix A (rows: from-state);
the observation deviates from the regime's mean m_t(s) = mu_s + x_t . beta_s by an AR(P)
process on the deviations (Hamilton 1989; the form of statsmodels' ``MarkovAutoregression``):

    y_t - m_t(s_t) = sum_{i=1..P} phi_{s_t, i} (y_{t-i} - m_{t-i}(s_{t-i})) + e_t,
    e_t ~ N(0, sigma^2_{s_t}).

phi, sigma^2 and beta are shared or switching (one row per regime); x_t are optional
exogenous regressors. Given y_{t-1..t-P}, the law of y_t depends on (s_t, s_{t-1}, ..., s_{t-P}),
so the model is an HMM on the expanded state

    z_t = (s_t, s_{t-1}, ..., s_{t-P}),   z = s_t K^P + s_{t-1} K^(P-1) + ... + s_{t-P},

with K^(P+1) states (s_t the most significant digit) and the sparse transition
p(z_t | z_{t-1}) = A[s_{t-1}, s_t] when the digits shared by z_{t-1} and z_t agree, else 0.
It is an `AbstractDiscreteSSM`: `ps.hmm` (filter, smoother, Viterbi, posterior sampling),
`ps.learn.mle` and `ps.switching` (marginal regime probabilities, statsmodels' conventions)
run on it unchanged.

Conventions of `discrete_params` (what `ps.hmm` sees): the likelihood is conditional on the
first P observations (their emission log-likelihoods are 0) and the initial distribution of
z_0 is the stationary distribution of the expanded chain (the ergodic regime probabilities
propagated through A), so p(z_P) is stationary too, as in statsmodels. Exogenous regressors
are the inputs: (T, X) rows x_t (the last X columns of any wider input row are read).

Missing values: a step whose y_t or one of its lags y_{t-1..t-P} (or x_t) is NaN contributes
likelihood 1. That is exact for missing values at the end of a sequence (padding, a truncated
record); a gap inside a sequence would also need y_t integrated out of the next P steps' lags,
which this model does not do, so the public functions refuse it (`check_emissions`).

The protocol (`initial`, `transition`, `emission`, for `ps.sample` and the particle engines)
has the integer expanded state z_t and reads the input rows of `protocol_inputs`:
[y_{t-1}, ..., y_{t-P}] without exogenous regressors (the model then declares
``emission_lags = P``, so `ps.sample(key, ms, T)` feeds its own draws back, zeros before the
start), [y_{t-1..t-P}, x_{t-1..t-P}, x_t] with them: pass ``inputs=ms.protocol_inputs(y, x)`` to a
particle engine, with y[:P] set to NaN to condition on the first P observations as the exact
engines do (`ps.sample` cannot feed draws back and take regressors at once).
"""
from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.lags import lagged_inputs
from probssm.core.protocol import AbstractRegimeSwitchingAR, DiscreteParams

__all__ = ["MarkovSwitchingAR"]

SIMPLEX = {"constraint": constraints.simplex}
REAL = {"constraint": constraints.real}
POSITIVE = {"constraint": constraints.positive}
_LOG_2PI = float(np.log(2 * np.pi))


def ergodic_probs(transition_matrix) -> jax.Array:
    """Stationary distribution pi = pi A of an irreducible (K, K) chain (traceable, differentiable).

    pi solves (I - A^T + 1 1^T) pi = 1: the added rank-one term replaces the redundant
    equation by sum(pi) = 1, and the matrix is non-singular exactly when the stationary
    distribution is unique.
    """
    A = jnp.asarray(transition_matrix)
    K = A.shape[-1]
    M = jnp.eye(K, dtype=A.dtype) - A.T + jnp.ones((K, K), A.dtype)
    return jnp.linalg.solve(M, jnp.ones((K,), A.dtype))


def _digits(K: int, P: int) -> np.ndarray:
    """(K^(P+1), P+1) ints: column j holds s_{t-j} of each expanded state (static)."""
    z = np.arange(K ** (P + 1))
    return np.stack([(z // K ** (P - j)) % K for j in range(P + 1)], axis=1)


def _float(x, name: str, dtype=None):
    if x is None:
        raise ValueError(f"{name}: expected an array, got None")
    try:
        a = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a real array, got {type(x).__name__} ({e})") from None
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {a.dtype}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    return a


def _validate(A, means, ar, var, exog, prefix: str = "") -> None:
    """Shapes always; values (finite, stochastic rows, unique stationary law, positive variances)
    on concrete arrays only. Raises ValueError naming the argument."""
    n = lambda s: prefix + s  # noqa: E731
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"{n('transition_matrix')}: expected a square shape (K, K), got shape {tuple(A.shape)}")
    K = A.shape[0]
    checks.shape(means, n("means"), (K,), f"({K},) (one mean per regime)")
    if ar.ndim == 1:
        pass
    elif ar.ndim == 2 and ar.shape[0] == K:
        pass
    else:
        raise ValueError(f"{n('ar_coefs')}: expected shape (P,) shared or ({K}, P) switching, "
                         f"got shape {tuple(ar.shape)}")
    if var.shape not in ((), (K,)):
        raise ValueError(f"{n('variances')}: expected shape () shared or ({K},) switching, got shape {tuple(var.shape)}")
    if exog is not None and not ((exog.ndim == 1 and exog.shape[0] >= 1) or
                                 (exog.ndim == 2 and exog.shape[0] == K and exog.shape[1] >= 1)):
        raise ValueError(f"{n('exog_coefs')}: expected shape (X,) shared or ({K}, X) switching with X >= 1, "
                         f"got shape {tuple(exog.shape)}")
    for a, name in ((means, "means"), (ar, "ar_coefs"), (var, "variances"), (exog, "exog_coefs")):
        if a is not None:
            checks.finite(a, n(name))
    if checks.is_concrete(var) and np.any(np.asarray(var) <= 0):
        raise ValueError(f"{n('variances')}: expected positive values, got {np.ravel(np.asarray(var)).min():.6g}")
    checks.probabilities(A, n("transition_matrix"))
    if checks.is_concrete(A):
        a = np.asarray(A, np.float64)
        M = np.eye(K) - a.T + np.ones((K, K))
        if np.linalg.svd(M, compute_uv=False).min() < 1e-10:
            raise ValueError(f"{n('transition_matrix')}: the chain has no unique stationary distribution (it is "
                             "reducible); the ergodic initial regime probabilities need an irreducible chain")


class MarkovSwitchingAR(AbstractRegimeSwitchingAR):
    """Markov-switching autoregression of order P with K regimes (Hamilton 1989).

        y_t - m_t(s_t) = sum_{i=1..P} phi_{s_t, i} (y_{t-i} - m_{t-i}(s_{t-i})) + N(0, sigma^2_{s_t}),
        m_t(s) = mu_s + x_t . beta_s,   p(s_t = j | s_{t-1} = i) = A[i, j].

    Args:
        transition_matrix: (K, K) A, rows sum to one, irreducible (the likelihood starts from
            its stationary distribution).
        means: (K,) switching means mu.
        ar_coefs: (P,) shared or (K, P) switching AR coefficients phi (P = 0: a switching
            regression, shape (0,)).
        variances: () shared or (K,) switching innovation variances sigma^2 (> 0).
        exog_coefs: None, (X,) shared or (K, X) switching coefficients beta of the exogenous
            regressors x_t, passed as ``inputs`` (T, X) to the engines.

    The engines see an HMM on the expanded state (s_t, ..., s_{t-P}) (K^(P+1) states, see the
    module docstring); `regime_probs` maps its probabilities to the K regimes and
    `current_regime` its states. Learnable arrays (`ps.learn.mle`): every field, with the
    transition rows on the simplex and the variances positive.

    Example:
        >>> ms = ps.models.MarkovSwitchingAR(jnp.array([[.9, .1], [.2, .8]]), jnp.array([0., 2.]),
        ...                                  jnp.array([0.5]), jnp.array(1.0))
        >>> z, y = ps.sample(key, ms, 200)
        >>> r = ps.switching.smoother(ms, y)        # r.smoothed_probs: (199, 2)
        >>> fitted, history = ps.learn.mle(ms, y, 100)
    """

    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)
    means: jax.Array = eqx.field(metadata=REAL)
    ar_coefs: jax.Array = eqx.field(metadata=REAL)
    variances: jax.Array = eqx.field(metadata=POSITIVE)
    exog_coefs: Optional[jax.Array] = eqx.field(metadata=REAL)

    def __init__(self, transition_matrix, means, ar_coefs, variances, exog_coefs=None):
        raw = [_float(transition_matrix, "transition_matrix"), _float(means, "means"), _float(ar_coefs, "ar_coefs"),
               _float(variances, "variances")]
        if exog_coefs is not None:
            raw.append(_float(exog_coefs, "exog_coefs"))
        dtype = jnp.result_type(*[a.dtype for a in raw])
        A, mu, ar, var, *ex = [a.astype(dtype) for a in raw]
        ex = ex[0] if ex else None
        _validate(A, mu, ar, var, ex)
        self.transition_matrix, self.means, self.ar_coefs, self.variances, self.exog_coefs = A, mu, ar, var, ex

    # --- sizes -------------------------------------------------------------------------
    @property
    def num_regimes(self) -> int:
        """K."""
        return self.transition_matrix.shape[-1]

    @property
    def order(self) -> int:
        """P, the autoregressive order."""
        return self.ar_coefs.shape[-1]

    @property
    def num_exog(self) -> int:
        """X, the number of exogenous regressors (0 without)."""
        return 0 if self.exog_coefs is None else self.exog_coefs.shape[-1]

    @property
    def num_states(self) -> int:
        """K^(P+1), the size of the expanded state."""
        return self.num_regimes ** (self.order + 1)

    @property
    def emission_dim(self) -> int:
        return 1

    @property
    def emission_lags(self) -> int:
        """P without exogenous regressors (the protocol's inputs are the lagged observations,
        built by the engines and fed back by `ps.sample`); 0 with them."""
        return 0 if self.num_exog else self.order

    @property
    def input_dim(self):
        """P without exogenous regressors; None (undeclared: (T, X) for `ps.hmm`, the wider
        `protocol_inputs` rows for the particle engines) with them."""
        return None if self.num_exog else self.order

    # --- parameters, per regime --------------------------------------------------------
    def _per_regime(self):
        K, P = self.num_regimes, self.order
        ar = self.ar_coefs if self.ar_coefs.ndim == 2 else jnp.broadcast_to(self.ar_coefs, (K, P))
        var = jnp.broadcast_to(self.variances, (K,))
        beta = None
        if self.exog_coefs is not None:
            X = self.num_exog
            beta = self.exog_coefs if self.exog_coefs.ndim == 2 else jnp.broadcast_to(self.exog_coefs, (K, X))
        return ar, var, beta

    def check_parameters(self, name: str = "model") -> None:
        """Shapes and values of every field (a model made by ``eqx.tree_at`` or ``ps.load``
        never ran the constructor); ValueError naming ``{name}.{field}``."""
        _validate(jnp.asarray(self.transition_matrix), jnp.asarray(self.means), jnp.asarray(self.ar_coefs),
                  jnp.asarray(self.variances), None if self.exog_coefs is None else jnp.asarray(self.exog_coefs),
                  prefix=f"{name}.")
        super().check_parameters(name)

    def check_emissions(self, emissions) -> None:
        """Refuse interior gaps: a NaN followed later in the same sequence by an observed value
        (a missing lag would have to be integrated out of the next P steps). Missing values at
        the end of a sequence (padding) are exact and allowed. Also checks the parameters, which
        the engines read before their own parameter checks."""
        self.check_parameters("model")
        a = np.asarray(emissions)
        observed = ~np.isnan(a).any(-1)  # (..., T)
        after_gap = np.logical_or.accumulate(~observed, axis=-1) & observed
        if np.any(after_gap):
            t = int(np.argwhere(after_gap)[0][-1])
            raise ValueError(f"emissions: found an observed value at step {t} after a missing one; "
                             "MarkovSwitchingAR handles missing values only at the end of a sequence (an interior "
                             "gap would need the missing value integrated out of the next P lags); expected NaN "
                             "only as trailing padding")

    # --- the expanded chain ------------------------------------------------------------
    def expanded_transition_matrix(self) -> jax.Array:
        """(M, M), M = K^(P+1): p(z_t | z_{t-1}) = A[s_{t-1}, s_t] where the shared digits agree."""
        K, P = self.num_regimes, self.order
        d = _digits(K, P)
        z = np.arange(K ** (P + 1))
        consistent = (z[None, :] % K ** P) == (z[:, None] // K)  # lower P digits of z_t = upper P of z_{t-1}
        A = self.transition_matrix
        return A[d[:, 0][:, None], d[:, 0][None, :]] * jnp.asarray(consistent, A.dtype)

    def stationary_probs(self) -> jax.Array:
        """(M,) stationary distribution of the expanded state:
        pi(s_{t-P}) A[s_{t-P}, s_{t-P+1}] ... A[s_{t-1}, s_t] with pi the ergodic regime law."""
        K, P = self.num_regimes, self.order
        d = _digits(K, P)
        A = self.transition_matrix
        p = ergodic_probs(A)[d[:, P]]
        for j in range(P):  # P is static and small: one factor per lag
            p = p * A[d[:, j + 1], d[:, j]]
        return p

    def regime_probs(self, probs) -> jax.Array:
        """(..., M) expanded-state probabilities -> (..., K) marginal probabilities of s_t."""
        probs = jnp.asarray(probs)
        return probs.reshape(probs.shape[:-1] + (self.num_regimes, -1)).sum(-1)

    def current_regime(self, states) -> jax.Array:
        """Expanded states z (ints, any shape) -> the current regimes s_t (negative stays negative)."""
        states = jnp.asarray(states)
        return jnp.where(states >= 0, states // self.num_regimes ** self.order, states)

    def regime_means(self, inputs=None, num_timesteps: Optional[int] = None) -> jax.Array:
        """m_t(s) = mu_s + x_t . beta_s: (T, K) with exogenous regressors (inputs (T, X)), else (K,)."""
        if self.exog_coefs is None:
            return self.means
        if inputs is None:
            raise ValueError(f"inputs: the model has {self.num_exog} exogenous regressors; expected (T, "
                             f"{self.num_exog}) rows x_t, got None")
        x = jnp.asarray(inputs)
        x = x[..., x.shape[-1] - self.num_exog:]
        _, _, beta = self._per_regime()
        return self.means + x @ beta.T

    # --- exact structure ---------------------------------------------------------------
    def discrete_params(self, emissions, inputs=None) -> DiscreteParams:
        """(T, 1) emissions and (T, X) exogenous rows (None without) -> `DiscreteParams` of the
        expanded HMM. The first P steps and steps with a NaN in y_t, its lags or x_t have
        log-likelihood 0. Traceable and differentiable."""
        y = jnp.asarray(emissions)
        y = y.reshape(y.shape[0], -1)[:, 0]
        T = y.shape[0]
        K, P = self.num_regimes, self.order
        dtype = jnp.result_type(self.transition_matrix.dtype, y.dtype)
        ar, var, _ = self._per_regime()
        observed = ~jnp.isnan(y)
        y0 = jnp.where(observed, y, 0.0).astype(dtype)  # a finite stand-in keeps gradients NaN-free
        m = self.regime_means(inputs)
        if m.ndim == 2:  # (T, K): exogenous rows may be missing too
            bad = jnp.isnan(m).any(-1)
            observed = observed & ~bad
            m = jnp.where(bad[:, None], 0.0, m)
        dev = y0[:, None] - m  # (T, K): y_t - m_t(s)
        d = _digits(K, P)
        resid = dev[:, d[:, 0]]  # (T, M)
        valid = observed & (jnp.arange(T) >= P)
        for i in range(1, P + 1):  # the residual reads the deviations of the P previous steps
            lag = jnp.concatenate([jnp.zeros((i, K), dev.dtype), dev[:T - i]], axis=0)
            resid = resid - ar[d[:, 0], i - 1] * lag[:, d[:, i]]
            valid = valid & jnp.concatenate([jnp.zeros((i,), bool), observed[:T - i]])
        v = var[d[:, 0]]
        ll = -0.5 * resid ** 2 / v - 0.5 * (_LOG_2PI + jnp.log(v))
        ll = jnp.where(valid[:, None], ll, 0.0)
        return DiscreteParams(self.stationary_probs(), self.expanded_transition_matrix(), ll)

    # --- the protocol ------------------------------------------------------------------
    def protocol_inputs(self, emissions, inputs=None) -> jax.Array:
        """(..., T, W) rows that `emission` reads: [y_{t-1}, ..., y_{t-P}] (W = P), or with X
        exogenous regressors [y_{t-1..t-P}, x_{t-1..t-P}, x_t] (W = P + (P + 1) X); lags
        before the start are NaN (the particle engines then treat those steps as missing)."""
        y = jnp.asarray(emissions)
        if y.ndim == 1:
            y = y[:, None]
        parts = [lagged_inputs(y, self.order, fill_value=jnp.nan)] if self.order else []
        if self.num_exog:
            if inputs is None:
                raise ValueError(f"inputs: the model has {self.num_exog} exogenous regressors; pass inputs (T, "
                                 f"{self.num_exog})")
            x = jnp.asarray(inputs, y.dtype)
            x = jnp.broadcast_to(x, y.shape[:-1] + x.shape[-1:])
            if self.order:
                parts.append(lagged_inputs(x, self.order, fill_value=jnp.nan))
            parts.append(x)
        if not parts:
            return jnp.zeros(y.shape[:-1] + (0,), y.dtype)
        return jnp.concatenate(parts, axis=-1)

    def initial(self, inputs=None):
        return dist.Categorical(probs=self.stationary_probs())

    def transition(self, z_prev, t, inputs=None):
        return dist.Categorical(probs=self.expanded_transition_matrix()[z_prev])

    def emission(self, z, t, inputs=None):
        K, P, X = self.num_regimes, self.order, self.num_exog
        ar, var, beta = self._per_regime()
        if X and inputs is None:
            raise ValueError(f"inputs: the model has {X} exogenous regressors; pass inputs=model.protocol_inputs(y, x)")
        s = [(z // K ** (P - j)) % K for j in range(P + 1)]  # s_t, s_{t-1}, ..., s_{t-P}
        # lags before the start are NaN in `protocol_inputs`; read them as 0 so the distribution stays
        # valid (the particle engines drop such steps themselves when the model declares emission_lags)
        row = None if inputs is None else jnp.nan_to_num(jnp.asarray(inputs))
        if X:
            x_lags = row[P:P + P * X].reshape(P, X)
            x_t = row[P + P * X:]
            m = lambda k, x: self.means[k] + x @ beta[k]  # noqa: E731
            mean = m(s[0], x_t)
        else:
            mean = self.means[s[0]]
        for i in range(1, P + 1):
            level = m(s[i], x_lags[i - 1]) if X else self.means[s[i]]
            mean = mean + ar[s[0], i - 1] * (row[i - 1] - level)
        return dist.Normal(mean[None], jnp.sqrt(var[s[0]])[None]).to_event(1)
