"""Bayesian inference over parameters: numpyro integration and NUTS with exact likelihoods.

Two ways in:

* `MarginalLikelihood(model, num_timesteps)` is a numpyro distribution over whole
  sequences (``num_timesteps`` = T is required: a numpyro distribution declares its event
  shape (T, D) before it sees data) whose ``log_prob`` is the exact marginal likelihood (Kalman or
  forward-backward). Put priors in an ordinary numpyro model and run numpyro's
  NUTS or SVI::

      def bayes(y):
          q = numpyro.sample("q", dist.HalfNormal(1e4))
          r = numpyro.sample("r", dist.HalfNormal(1e5))
          ssm = ps.models.LinearGaussianSSM(..., transition_cov=q * jnp.eye(1), emission_cov=r * jnp.eye(1))
          numpyro.sample("y", ps.mcmc.MarginalLikelihood(ssm, y.shape[0]), obs=y)

* `nuts(key, build, priors, emissions, ...)` does that for you from a model builder
  ``build(params: dict) -> SSM`` and a dict of numpyro priors, then draws the latent
  states given each parameter draw, and returns an `MCMCResult` that `to_arviz`
  turns into `arviz.InferenceData`. `log_density(build, priors, emissions)` gives the
  same target on the unconstrained space for blackjax.

The particle samplers over parameters (`pmmh`, `particle_gibbs`) live here too: they share
the builder / prior handling, the unconstrained parameterisation and the ArviZ conversion,
which is why this module runs past ~500 lines.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from probssm.core import checks, progress as prog
from probssm.core.batching import Batch, as_batch
from probssm.core.continuous_time import AbstractContinuousTimeSSM
from probssm.core.protocol import SSM, AbstractDiscreteSSM, AbstractLinearGaussianSSM, sample_sequence
from probssm.inference import ctmc
from probssm.inference.smc import common as C
from probssm.inference.smc.csmc import conditional_smc_sequence
from probssm.inference.smc.filter import particle_filter_sequence


class MarginalLikelihood(dist.Distribution):
    """p(y_{0:T-1}) of a model with an exact structure, as a numpyro distribution.

    ``log_prob(y)`` marginalises the latent states exactly (NaN entries of y are
    missing); ``sample`` draws emissions from the model.

    Args:
        ssm: an `AbstractLinearGaussianSSM` or `AbstractDiscreteSSM`.
        num_timesteps: T, the length of the observed sequence (required). A numpyro
            distribution must declare its event shape, (T, D), before it sees any data:
            numpyro checks ``obs`` against it, and ``sample`` (prior and posterior predictive
            draws) needs T, which the model itself does not know. Pass ``y.shape[0]``.
        inputs: optional (T, U) inputs of the sequence.

    Example:
        >>> def bayes(y):
        ...     q = numpyro.sample("q", dist.HalfNormal(1.0))
        ...     ssm = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.eye(1), q * jnp.eye(1),
        ...                                       jnp.eye(1), jnp.eye(1))
        ...     numpyro.sample("y", ps.mcmc.MarginalLikelihood(ssm, num_timesteps=y.shape[0]), obs=y)

    Raises:
        ValueError: ``num_timesteps`` missing or not an integer >= 1; ``ssm`` without an exact
            structure.
    """

    support = constraints.real_matrix  # NaN entries mark missing values
    pytree_data_fields = ("ssm", "inputs")
    pytree_aux_fields = ("num_timesteps",)

    def __init__(self, ssm, num_timesteps: Optional[int] = None, inputs=None, *, validate_args=None):
        if not isinstance(ssm, (AbstractLinearGaussianSSM, AbstractDiscreteSSM)):
            raise ValueError(
                f"ssm: expected a model with an exact structure (linear-Gaussian or discrete), got {type(ssm).__name__}"
            )
        if num_timesteps is None:
            raise ValueError("num_timesteps: required: MarginalLikelihood(ssm, num_timesteps=y.shape[0]) (a numpyro "
                             "distribution declares its event shape (T, D) before it sees the data)")
        if isinstance(num_timesteps, (bool, np.bool_)) or not isinstance(num_timesteps, (int, np.integer)) \
                or num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected an integer >= 1 (the sequence length T), got {num_timesteps!r}")
        self.ssm = ssm
        self.num_timesteps = int(num_timesteps)
        self.inputs = inputs
        emission_shape = _emission_shape(ssm, inputs)
        super().__init__(batch_shape=(), event_shape=(self.num_timesteps,) + emission_shape,
                         validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        n = int(np.prod(sample_shape)) if sample_shape else 1
        keys = jax.random.split(key, n)
        ys = _sample_emissions(keys, self.ssm, self.num_timesteps, self.inputs)
        return ys.reshape(tuple(sample_shape) + ys.shape[1:])

    def log_prob(self, value):
        from probssm.learn.mle import exact_log_likelihood

        return exact_log_likelihood(self.ssm, value, self.inputs)


@eqx.filter_jit
def _sample_emissions(keys, ssm, num_timesteps, inputs):
    """Emission sequences, one per key (the model traced, so numpyro validates nothing here)."""
    return jax.vmap(lambda k: sample_sequence(k, ssm, num_timesteps, inputs)[1])(keys)


def _emission_shape(ssm, inputs=None) -> tuple:
    """Event shape of one emission row: the declared ``emission_dim`` of a linear-Gaussian model,
    else the event shape of the emission distribution at a state drawn like ``ssm.initial``'s."""
    if isinstance(ssm, AbstractLinearGaussianSSM):
        return (ssm.emission_dim,)
    u0 = C.first_input_row(ssm, inputs)
    z = C.state_struct(ssm, u0)
    return tuple(ssm.emission(jnp.zeros(z.shape, z.dtype), 0, u0).event_shape)


def _check_priors(priors: dict, build: Optional[Callable] = None, num_probes: int = 16):
    """Priors must be numpyro distributions whose draws give a valid model.

    The model constructors validate their parameters (e.g. covariances must be PSD),
    so building the model from a few prior draws catches a prior whose support does
    not match the parameter's domain (a Normal prior on a variance).
    """
    if not isinstance(priors, dict) or not priors:
        raise ValueError("priors: expected a non-empty dict {name: numpyro distribution}")
    for name, prior in priors.items():
        if not isinstance(prior, dist.Distribution):
            raise ValueError(f"priors: {name!r} is a {type(prior).__name__}, expected a numpyro distribution")
    if build is None:
        return
    keys = jax.random.split(jax.random.PRNGKey(0), len(priors))
    draws = {name: prior.sample(k, (num_probes,)) for k, (name, prior) in zip(keys, priors.items())}
    for i in range(num_probes):
        params = {name: v[i] for name, v in draws.items()}
        try:
            build(params)
        except ValueError as err:
            shown = {k: np.asarray(v).round(4).tolist() for k, v in params.items()}
            raise ValueError(f"priors: the prior draw {shown} gives an invalid model ({err}); each prior's "
                             f"support must match its parameter's domain") from None


def numpyro_model(build: Callable[[dict], SSM], priors: dict, emissions, inputs=None):
    """A numpyro model: parameters from ``priors``, likelihood by `MarginalLikelihood`."""
    _check_priors(priors, build)
    batch = as_batch(emissions, inputs)
    ys = batch.emissions

    def model():
        params = {name: numpyro.sample(name, prior) for name, prior in priors.items()}
        ssm = build(params)
        if batch.batched:
            with numpyro.plate("sequences", ys.shape[0]):
                numpyro.sample("y", _Batched(ssm, ys.shape[1], batch.inputs, batch.inputs_batched), obs=ys)
        else:
            numpyro.sample("y", MarginalLikelihood(ssm, ys.shape[0], batch.inputs), obs=ys)

    return model


class _Batched(MarginalLikelihood):
    """One MarginalLikelihood per sequence of a batch (batch shape B); ``inputs_batched`` says
    whether the inputs carry the B axis (as `probssm.core.batching.as_batch` read them)."""

    pytree_aux_fields = ("num_timesteps", "inputs_batched")

    def __init__(self, ssm, num_timesteps, inputs=None, inputs_batched: bool = False):
        self.inputs_batched = bool(inputs_batched)
        u0 = C.row(inputs, 0) if inputs_batched else inputs
        super().__init__(ssm, num_timesteps, u0)
        self.inputs = inputs

    def log_prob(self, value):
        from probssm.learn.mle import exact_log_likelihood

        in_u = 0 if self.inputs_batched else None
        return jax.vmap(lambda y, uu: exact_log_likelihood(self.ssm, y, uu), in_axes=(0, in_u))(value, self.inputs)


def log_density(build: Callable[[dict], SSM], priors: dict, emissions, inputs=None):
    """Log joint density on the unconstrained space, for blackjax.

    Returns ``(logdensity_fn, to_constrained)``: ``logdensity_fn(u: dict)`` is
    log p(theta(u), y) + log |d theta / d u|; ``to_constrained(u)`` maps back.
    """
    _check_priors(priors, build)
    bijectors = {k: biject_to(p.support) for k, p in priors.items()}
    probe = _model_at_start(build, priors, _initial_unconstrained(jax.random.PRNGKey(0), priors, None, 1))
    if isinstance(probe, AbstractContinuousTimeSSM):
        arrays, flags, _ = _prepared_data(probe, emissions, inputs, None)
        likelihood = lambda model: _total_log_likelihood(model, arrays, flags)
    else:
        ys = jnp.asarray(emissions)
        from probssm.learn.mle import exact_log_likelihood

        likelihood = lambda model: exact_log_likelihood(model, ys, inputs)

    def to_constrained(u):
        return {k: bijectors[k](u[k]) for k in priors}

    def logdensity_fn(u):
        total = 0.0
        theta = {}
        for k, prior in priors.items():
            theta[k] = bijectors[k](u[k])
            total = total + jnp.sum(prior.log_prob(theta[k]))
            total = total + jnp.sum(bijectors[k].log_abs_det_jacobian(u[k], theta[k]))
        return total + likelihood(build(theta))

    return logdensity_fn, to_constrained


class MCMCResult(NamedTuple):
    samples: dict  # name -> (chains, draws, *shape)
    states: Optional[jax.Array]  # (chains, draws, T, d) latent-state draws, or None
    log_likelihood: jax.Array  # (chains, draws); a particle estimate for PMMH
    stats: dict  # per-draw sampler statistics, (chains, draws): "diverging" (NUTS), "accepted" (PMMH)
    # (chains, draws, T) or (chains, draws, B, T): log p(y_t | y_{0:t-1}, theta) of each draw (see
    # `pointwise_log_likelihood`); `to_arviz` puts it in the ``log_likelihood`` group (az.loo / az.waic)
    pointwise_log_likelihood: Optional[jax.Array] = None


def _check_hashable(build):
    if not callable(build):
        raise ValueError(f"build: expected a callable build(params) -> SSM, got {type(build).__name__}")
    try:
        hash(build)
    except TypeError:
        raise ValueError("build: expected a hashable callable (a function, or a functools.partial of hashable "
                         "arguments): the compiled sampler is cached per builder") from None


def _model_at_start(build, priors, u0):
    """The model built at the first chain's starting point (concrete, so the data are checked against it)."""
    return build({name: biject_to(prior.support)(u0[name][0]) for name, prior in priors.items()})


def _checked_batch(build, priors, u0, emissions, inputs, lengths):
    """Emissions read as a batch (`probssm.inference.smc.common.prepare`: (T, D), (B, T, D), a list,
    a 1-D series for a one-dimensional emission; no +-inf) and checked against the model built at
    the first chain's starting point."""
    return C.prepare(_model_at_start(build, priors, u0), emissions, inputs, lengths)


_CONTINUOUS_TIME = "continuous_time"


def _prepared_data(model, emissions, inputs, lengths, exact_states=(), censored=None):
    """``(arrays, flags, batch)``: the data checked once against ``model`` and split into traced arrays and
    static flags. A continuous-time model (its declared `AbstractContinuousTimeSSM` structure) takes the
    data of ``ps.learn.mle``: the pair (times, states) of panel records, (times, emissions) for hidden
    states, or `ps.ctmc.PathStatistics` of exactly observed paths (``ps.ctmc.prepare_data``); flags are
    then ``("continuous_time", how)`` and batch is None. Otherwise the sequences of a `Batch`."""
    if isinstance(model, AbstractContinuousTimeSSM):
        if inputs is not None:
            raise ValueError("inputs: continuous-time models take their observation times in the data; expected None")
        arrays, how = ctmc.prepare_data(model, emissions, lengths, exact_states, censored)
        return arrays, (_CONTINUOUS_TIME, how), None
    if tuple(np.atleast_1d(exact_states)) or censored is not None:
        raise ValueError("exact_states: exact entry times and censored codes are for continuous-time models; "
                         f"expected the defaults for a {type(model).__name__}")
    batch = C.prepare(model, emissions, inputs, lengths)
    arrays, flags = _split(batch)
    return arrays, flags, batch


def _total_log_likelihood(model, arrays, flags):
    """log p(data | model) summed over sequences (or subjects) of data from `_prepared_data` (traceable)."""
    if flags[0] == _CONTINUOUS_TIME:
        return jnp.sum(ctmc.prepared_log_likelihood(model, arrays, flags[1]))
    return jnp.sum(_exact_ll(model, Batch(*arrays, *flags)))


def _log_prior(priors, u):
    """(log p(theta(u)) + log |d theta / d u|, theta) on the unconstrained space."""
    total, theta = 0.0, {}
    for name, prior in priors.items():
        bij = biject_to(prior.support)
        theta[name] = bij(u[name])
        total = total + jnp.sum(prior.log_prob(theta[name])) + jnp.sum(bij.log_abs_det_jacobian(u[name], theta[name]))
    return total, theta


def _exact_ll(model, batch):
    """Per-sequence exact log-likelihoods (B,) (or () for one sequence); padding is missing."""
    from probssm.learn.mle import exact_log_likelihood

    return batch.map(lambda y, u, n: exact_log_likelihood(model, C.mask_padding(y, n), u))


def pointwise_log_likelihood_sequence(model, emissions, inputs=None, length=None):
    """(T,) log p(y_t | y_{0:t-1}) of one sequence under a model with an exact structure (traceable).

    The one-step-ahead predictive terms of the exact filter, obtained as differences of the exact
    log-likelihoods of the prefixes y_{0:t} (so they sum to the exact log p(y) whatever the
    filter's conventions, e.g. a diffuse start): O(T^2) work, vectorised. A missing step (NaN)
    and the padding beyond ``length`` contribute 0.
    """
    from probssm.learn.mle import exact_log_likelihood

    y = C.mask_padding(jnp.asarray(emissions), length)
    num_timesteps = y.shape[0]
    steps = jnp.arange(num_timesteps)
    if inputs is None:
        inputs = model.default_inputs(y)  # lagged observations are read from the full sequence

    def prefix(t):
        keep = (steps <= t).reshape((-1,) + (1,) * (y.ndim - 1))
        return exact_log_likelihood(model, jnp.where(keep, y, jnp.nan), inputs)

    cumulative = lax.map(prefix, steps)
    return jnp.diff(cumulative, prepend=jnp.zeros((1,), cumulative.dtype))


def _split(batch: Batch):
    """(arrays, static flags) of a batch: jitted functions take the flags as static arguments."""
    return (batch.emissions, batch.inputs, batch.lengths), (batch.batched, batch.inputs_batched)


@partial(jax.jit, static_argnames=("build", "flags", "chunk"))
def _pointwise_core(build, samples, arrays, flags, chunk=16):
    batch = Batch(*arrays, *flags)

    def one_draw(theta):
        model = build(theta)
        return batch.map(lambda y, u, n: pointwise_log_likelihood_sequence(model, y, u, n))

    return lax.map(one_draw, samples, batch_size=chunk)


def pointwise_log_likelihood(build: Callable[[dict], SSM], samples: dict, emissions, *, inputs=None, lengths=None):
    """log p(y_t | y_{0:t-1}, theta) for every draw of ``samples`` and every time step.

    Why per time step: the one-step-ahead predictive terms are the natural pointwise unit of a
    time series (they sum to log p(y | theta) and are what leave-future-out and prequential
    criteria score); ArviZ's PSIS-LOO on them is the usual approximate LOO for state-space
    models (each y_t is left out of its own predictive term only, not of the filter's past).
    Missing steps (NaN) and padding contribute 0.

    Args:
        build: ``build(params) -> SSM`` with an exact structure.
        samples: ``{name: (chains, draws, *shape)}`` (e.g. ``MCMCResult.samples``).
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays; inputs, lengths as for `nuts`.

    Returns:
        (chains, draws, T) or (chains, draws, B, T).
    """
    _check_hashable(build)
    batch = as_batch(emissions, inputs, lengths)
    leaves = {k: jnp.asarray(v) for k, v in samples.items()}
    lead = jnp.shape(next(iter(leaves.values())))[:2]
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in leaves.items()}
    out = _pointwise_core(build, flat, *_split(batch))
    return out.reshape(tuple(lead) + out.shape[1:])


def _nuts_settings(num_warmup, num_samples, num_chains, target_accept, max_tree_depth, dense_mass, progress):
    return (int(num_warmup), int(num_samples), int(num_chains), float(target_accept), int(max_tree_depth),
            bool(dense_mass), bool(progress))


@partial(jax.jit, static_argnames=("build", "flags", "settings"))
def _nuts_core(key, build, priors, arrays, flags, u0, settings):
    """Every chain of NUTS on log p(theta) + log p(y | theta), in one compiled function.

    Module-level and keyed on the static structure only (the builder, the settings, the pytree
    structure of the priors and the shapes of the data): a second `nuts` call with new data of
    the same shape, or new prior hyperparameters, reuses the compiled code.
    """
    from numpyro.infer.hmc import hmc

    num_warmup, num_samples, num_chains, target_accept, max_tree_depth, dense_mass, progress = settings

    def potential(u):
        lp, theta = _log_prior(priors, u)
        return -(lp + _total_log_likelihood(build(theta), arrays, flags))

    init_kernel, sample_kernel = hmc(potential_fn=potential, algo="NUTS")
    total = num_warmup + num_samples

    def chain(args):
        k, u_init, c = args
        state = init_kernel(u_init, num_warmup, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                            dense_mass=dense_mass, rng_key=k)

        def body(state, i):
            state = sample_kernel(state)
            if progress:
                prog.report(c * total + i, -state.potential_energy, every=prog.report_every(total * num_chains))
            return state, (state.z, state.diverging)

        _, (zs, div) = lax.scan(body, state, jnp.arange(total))
        return jax.tree_util.tree_map(lambda a: a[num_warmup:], (zs, div))

    keys = jax.random.split(key, num_chains)
    us, diverging = lax.map(chain, (keys, u0, jnp.arange(num_chains)))
    samples = {name: biject_to(prior.support)(us[name]) for name, prior in priors.items()}
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
    lls = lax.map(lambda p: _total_log_likelihood(build(p), arrays, flags), flat, batch_size=16)
    return samples, diverging, lls.reshape(num_chains, num_samples)


def nuts(key, build: Callable[[dict], SSM], priors: dict, emissions, *, num_warmup: int = 500,
         num_samples: int = 500, num_chains: int = 2, inputs=None, lengths=None, draw_states: bool = True,
         init_params=None, pointwise: bool = True, target_accept: float = 0.8, max_tree_depth: int = 10,
         dense_mass: bool = False, progress: bool = False, exact_states=(), censored=None) -> MCMCResult:
    """NUTS over parameters with the exact marginal likelihood, then p(states | y, theta) draws.

    Args:
        key: `jax.random` key.
        build: ``build(params) -> SSM`` with an exact structure; ``params`` holds one
            value per prior. Hashable (a module-level function is): the compiled sampler is
            cached per builder.
        priors: ``{name: numpyro distribution}``.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (the sequences share the
            parameters); inputs, lengths as for `ps.kalman.filter`. For a continuous-time model
            (``build`` returns a `probssm.core.AbstractContinuousTimeSSM`), the data ``ps.learn.mle``
            takes: the pair ``(times, states)`` of panel records (`ps.ctmc.panel_log_likelihood`, with
            ``lengths``, ``exact_states``, ``censored``) or ``(times, emissions)`` of a hidden-state model
            (`ps.ctmc.filter`), or ``ps.ctmc.path_statistics(...)`` of exactly observed paths
            (`ps.ctmc.path_log_likelihood`). For these, no latent states are drawn and no pointwise
            log-likelihood is computed (``states`` and ``pointwise_log_likelihood`` are None).
        num_chains: run one after another (``lax.map``) inside the compiled sampler.
        draw_states: also draw one latent path per parameter draw (Kalman FFBS or
            forward-filter backward-sample for discrete models), for one sequence (T, D).
        init_params: optional ``{name: value}`` starting point (constrained space); default:
            the median of prior draws.
        pointwise: also compute the pointwise log-likelihood log p(y_t | y_{0:t-1}, theta) of
            every draw (`pointwise_log_likelihood`, O(T^2) per draw), which `to_arviz` puts in
            the ``log_likelihood`` group for ``az.loo`` / ``az.waic``.
        target_accept, max_tree_depth, dense_mass: NUTS settings (numpyro's `hmc` kernel with
            step-size and mass-matrix adaptation during warm-up).
        progress: a progress bar over all chains' iterations.
        exact_states, censored: panel records of a continuous-time model only, as in
            `ps.ctmc.panel_log_likelihood`.

    Returns:
        `MCMCResult`; `to_arviz(result)` gives `arviz.InferenceData`.

    Example:
        >>> def build(p):   # a 3-state jump process, one Gamma prior per free rate
        ...     Q = jnp.zeros((3, 3)).at[rows, cols].set(p["rates"])
        ...     return ps.models.MarkovJumpProcess(Q - jnp.diag(Q.sum(1)), pi, structure=mask)
        >>> stats = ps.ctmc.path_statistics(proc, times, states, lengths=n, t_end=10.0)
        >>> r = ps.mcmc.nuts(key, build, {"rates": dist.Gamma(2.0 * jnp.ones(6), 1.0)}, stats)

    Compiled once per model structure: the sampler is one module-level jitted function whose
    static arguments are the builder and the settings; the data, the prior hyperparameters, the
    key and the starting point are traced. A second call with new data of the same shape does
    not recompile.
    """
    _check_hashable(build)
    _check_priors(priors, build)
    num_warmup = checks.positive_int(num_warmup, "num_warmup", minimum=0)
    num_samples = checks.positive_int(num_samples, "num_samples")
    num_chains = checks.positive_int(num_chains, "num_chains")
    max_tree_depth = checks.positive_int(max_tree_depth, "max_tree_depth")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept: expected a value in (0, 1), got {target_accept}")
    if init_params is not None:
        for name, value in init_params.items():
            if name not in priors:
                raise ValueError(f"init_params: {name!r} has no prior")
            if not np.all(np.isfinite(np.asarray(value))):
                raise ValueError(f"init_params: {name!r} is not finite")
            if not bool(jnp.all(priors[name].support(jnp.asarray(value)))):
                raise ValueError(f"init_params: {name!r} = {value} is outside the support of its prior")
    for name, prior in priors.items():
        # A prior must give finite density somewhere: check at its median-like initial point.
        probe = prior.sample(jax.random.PRNGKey(0))
        if not bool(jnp.all(jnp.isfinite(prior.log_prob(probe)))):
            raise ValueError(f"priors: {name!r} gives a non-finite log density at its own draws")
    key_init, key_mcmc, key_states = jax.random.split(key, 3)
    u0 = _initial_unconstrained(key_init, priors, init_params, num_chains)
    arrays, flags, batch = _prepared_data(_model_at_start(build, priors, u0), emissions, inputs, lengths,
                                          exact_states, censored)
    settings = _nuts_settings(num_warmup, num_samples, num_chains, target_accept, max_tree_depth, dense_mass,
                              progress)
    with prog.progress_bar((num_warmup + num_samples) * num_chains, "NUTS", bool(progress)):
        samples, diverging, lls = _nuts_core(key_mcmc, build, priors, arrays, flags, u0, settings)
    if batch is None:  # a continuous-time model: its data are the observed records
        return MCMCResult(samples, None, lls, {"diverging": diverging}, None)
    states = None
    if draw_states and not batch.batched:
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
        probe = build(jax.tree_util.tree_map(lambda a: a[0], flat))
        states = _draw_states(key_states, build, flat, batch.emissions, batch.inputs,
                              linear=isinstance(probe, AbstractLinearGaussianSSM))
        states = states.reshape((num_chains, num_samples) + states.shape[1:])
    pointwise_ll = pointwise_log_likelihood(build, samples, batch.emissions, inputs=batch.inputs,
                                            lengths=batch.lengths) if pointwise else None
    return MCMCResult(samples, states, lls, {"diverging": diverging}, pointwise_ll)


@partial(jax.jit, static_argnames=("build", "linear"))
def _draw_states(key, build, flat_params, ys, inputs, *, linear):
    num = jax.tree_util.tree_leaves(flat_params)[0].shape[0]
    keys = jax.random.split(key, num)
    if linear:
        from probssm.inference import kalman

        def one(k, p):
            ssm = build(p)
            params = ssm.linear_gaussian_params(ys.shape[0], inputs)
            return kalman.sample_params(k, params, ys, 1)[0]
    else:
        from probssm.inference import hmm

        def one(k, p):
            return hmm.sample_params(k, build(p).discrete_params(ys, inputs), 1)[0]

    return jax.vmap(one)(keys, flat_params)


def to_arviz(result: MCMCResult, *, time_coords=None, state_names=None):
    """`arviz.InferenceData` with chains, draws and named dimensions.

    Parameters get dims ``<name>_dim_i``; latent states ``("time", "state")``; the total
    log-likelihood of each draw goes to ``sample_stats.model_log_likelihood``; the pointwise
    log-likelihood log p(y_t | y_{0:t-1}, theta) (when the result carries it, as `nuts`'s does)
    to the ``log_likelihood`` group as variable ``"y"`` with dims ``("time",)`` (or
    ``("sequence", "time")`` for a batch), so ``az.loo(idata)`` and ``az.waic(idata)`` run.
    The pointwise unit is one time step of each observed sequence (see
    `pointwise_log_likelihood` for why).
    """
    import arviz as az

    posterior = {k: np.asarray(v) for k, v in result.samples.items()}
    dims, coords = {}, {}
    if result.states is not None:
        states = np.asarray(result.states)
        posterior["states"] = states
        T, d = states.shape[2], states.shape[3]
        coords["time"] = np.arange(T) if time_coords is None else np.asarray(time_coords)
        coords["state"] = np.arange(d) if state_names is None else list(state_names)
        dims["states"] = ["time", "state"]
    sample_stats = {"model_log_likelihood": np.asarray(result.log_likelihood)}
    sample_stats.update({k: np.asarray(v) for k, v in result.stats.items()})
    log_likelihood = None
    pointwise = result.pointwise_log_likelihood
    if pointwise is not None:
        pointwise = np.asarray(pointwise)
        log_likelihood = {"y": pointwise}
        T = pointwise.shape[-1]
        if "time" not in coords:
            coords["time"] = np.arange(T) if time_coords is None else np.asarray(time_coords)
        dims["y"] = ["time"] if pointwise.ndim == 3 else ["sequence", "time"]
    return az.from_dict(posterior=posterior, sample_stats=sample_stats, log_likelihood=log_likelihood,
                        coords=coords, dims=dims)


# ------------------------------------------------------------------------------------------------
# Particle marginal Metropolis-Hastings
# ------------------------------------------------------------------------------------------------
def _initial_unconstrained(key, priors, init_params, num_chains):
    """Per-chain unconstrained starting points: ``init_params`` or the median of prior draws."""
    out = {}
    for name, prior in priors.items():
        bij = biject_to(prior.support)
        if init_params is not None and name in init_params:
            value = jnp.asarray(init_params[name], dtype=jnp.result_type(float))
        else:
            key, sub = jax.random.split(key)
            value = jnp.median(prior.sample(sub, (101,)), axis=0)
        u = bij.inv(value)
        out[name] = jnp.broadcast_to(u, (num_chains,) + jnp.shape(u))
    return out


class _Adaptation(NamedTuple):
    """Random-walk proposal N(x, exp(2 log_scale) cov), tuned during warm-up."""

    mean: jax.Array
    cov: jax.Array
    log_scale: jax.Array
    count: jax.Array


def _adaptation_init(x0):
    dim = x0.shape[0]
    return _Adaptation(x0, 0.1 * jnp.eye(dim, dtype=x0.dtype), jnp.log(2.38 / jnp.sqrt(dim)).astype(x0.dtype),
                       jnp.zeros((), x0.dtype))


def _propose(key, x, adapt: _Adaptation):
    chol = jnp.linalg.cholesky(adapt.cov + 1e-8 * jnp.eye(x.shape[0], dtype=x.dtype))
    return x + jnp.exp(adapt.log_scale) * chol @ jax.random.normal(key, x.shape, x.dtype)


def _adapt(adapt: _Adaptation, x, accept_prob, target_accept):
    """Haario et al.'s running covariance of the chain, Robbins-Monro on the scale."""
    n = adapt.count + 2.0
    delta = x - adapt.mean
    mean = adapt.mean + delta / n
    cov = adapt.cov + (jnp.outer(delta, x - mean) - adapt.cov) / n
    log_scale = adapt.log_scale + (accept_prob - target_accept) / (adapt.count + 1.0) ** 0.6
    return _Adaptation(mean, cov, log_scale, adapt.count + 1.0)


def _mh_step(key, x, lp, extra, log_target, adapt):
    """One random-walk MH step; ``log_target(key, x) -> (log density, extra)``."""
    k_prop, k_target, k_acc = jax.random.split(key, 3)
    proposal = _propose(k_prop, x, adapt)
    lp_new, extra_new = log_target(k_target, proposal)
    log_ratio = jnp.where(jnp.isfinite(lp_new), lp_new - lp, -jnp.inf)
    accept = jnp.log(jax.random.uniform(k_acc, dtype=x.dtype)) < log_ratio
    choose = lambda a, b: jnp.where(accept, a, b)
    prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
    return choose(proposal, x), choose(lp_new, lp), jax.tree_util.tree_map(choose, extra_new, extra), accept, prob


def _check_init(priors, init_params):
    if init_params is None:
        return
    for name, value in init_params.items():
        if name not in priors:
            raise ValueError(f"init_params: {name!r} has no prior")
        if not np.all(np.isfinite(np.asarray(value))) or not bool(jnp.all(priors[name].support(jnp.asarray(value)))):
            raise ValueError(f"init_params: {name!r} = {value} is not a finite value inside its prior's support")


def _pmmh_chain(key, u0, log_target, *, num_warmup, num_samples, target_accept):
    """Adaptive random-walk Metropolis on a noisy (pseudo-marginal) log target.

    During warm-up the proposal adapts (`_adapt`); afterwards it is frozen so the
    chain is a valid pseudo-marginal MH chain. The current state's likelihood
    estimate is kept, never refreshed.
    """
    from jax.flatten_util import ravel_pytree

    x0, unravel = ravel_pytree(u0)
    key, k0 = jax.random.split(key)
    target = lambda k, x: log_target(k, unravel(x))
    lp0, ll0 = target(k0, x0)

    def iteration(carry, xs):
        x, lp, ll, adapt = carry
        k, warm = xs
        x, lp, ll, accept, prob = _mh_step(k, x, lp, ll, target, adapt)
        adapt = jax.tree_util.tree_map(lambda a, b: jnp.where(warm, a, b), _adapt(adapt, x, prob, target_accept),
                                       adapt)
        return (x, lp, ll, adapt), (unravel(x), ll, accept)

    warm = jnp.arange(num_warmup + num_samples) < num_warmup
    keys = jax.random.split(key, num_warmup + num_samples)
    _, (us, lls, accepted) = lax.scan(iteration, (x0, lp0, ll0, _adaptation_init(x0)), (keys, warm))
    drop = lambda a: a[num_warmup:]
    return jax.tree_util.tree_map(drop, us), drop(lls), drop(accepted)


@partial(jax.jit, static_argnames=("build", "flags", "settings"))
def _pmmh_core(keys, build, priors, arrays, flags, u0, settings):
    """Every PMMH chain in one module-level compiled function (static: builder, settings, shapes)."""
    num_particles, resampling, num_warmup, num_samples, target_accept = settings
    batch = Batch(*arrays, *flags)

    def log_target(k, u):
        total, theta = _log_prior(priors, u)
        model = build(theta)

        def one(y, uu, n, kk):
            return particle_filter_sequence(kk, model, y, uu, num_particles=num_particles, resampling=resampling,
                                            ess_threshold=1.0, history=False, length=n).log_likelihood

        ll = jnp.sum(batch.map(one, C.sequence_keys(k, batch), extra_axes=(0,)))
        return total + ll, ll

    us, lls, accepted = jax.vmap(lambda k, u: _pmmh_chain(k, u, log_target, num_warmup=num_warmup,
                                                          num_samples=num_samples, target_accept=target_accept))(
        keys, u0)
    samples = {k: biject_to(p.support)(us[k]) for k, p in priors.items()}
    return samples, lls, accepted


def pmmh(key, build: Callable[[dict], SSM], priors: dict, emissions, *, num_particles: int = 500,
         num_warmup: int = 1000, num_samples: int = 2000, num_chains: int = 2, inputs=None, lengths=None,
         init_params=None, resampling: str = "systematic", target_accept: float = 0.15) -> MCMCResult:
    """Particle marginal Metropolis-Hastings: random-walk MH with a bootstrap-filter likelihood.

    Works for any model (only the protocol is needed). The estimate exp(log Zhat) is
    unbiased, so the chain targets the exact posterior of the parameters.

    Args:
        build, priors, init_params: as in `nuts`.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (the sequences share the
            parameters; their log-likelihood estimates add).
        inputs, lengths: as for `ps.smc.particle_filter` (padding beyond a length is missing data).
        num_particles: particles of the bootstrap filter at each proposal.
        target_accept: warm-up tunes the proposal scale towards this acceptance rate
            (about 0.07-0.15 is efficient for pseudo-marginal chains).

    Returns:
        `MCMCResult` with ``stats["accepted"]``; ``log_likelihood`` holds the particle estimates.
    """
    _check_priors(priors, build)
    num_particles = checks.positive_int(num_particles, "num_particles", minimum=2)
    num_warmup = checks.positive_int(num_warmup, "num_warmup", minimum=0)
    num_samples = checks.positive_int(num_samples, "num_samples")
    num_chains = checks.positive_int(num_chains, "num_chains")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept: expected a value in (0, 1), got {target_accept}")
    resampling = C.check_resampling(resampling)
    _check_hashable(build)
    _check_init(priors, init_params)
    key_init, key_run = jax.random.split(key)
    u0 = _initial_unconstrained(key_init, priors, init_params, num_chains)
    batch = _checked_batch(build, priors, u0, emissions, inputs, lengths)
    settings = (num_particles, resampling, num_warmup, num_samples, float(target_accept))
    samples, lls, accepted = _pmmh_core(jax.random.split(key_run, num_chains), build, priors, *_split(batch), u0,
                                        settings)
    return MCMCResult(samples, None, lls, {"accepted": accepted})


# ------------------------------------------------------------------------------------------------
# Particle Gibbs
# ------------------------------------------------------------------------------------------------
def complete_log_likelihood(model: SSM, states, emissions, inputs=None, *, length=None):
    """log p(z_{0:T-1}, y_{0:T-1}) for one path (traceable).

    states (T, d); emissions (T, D); a row of y with a NaN counts as missing, and so do the rows
    at and beyond ``length`` (their transitions still count: the path covers all T steps).
    Inputs None: the model's `default_inputs`.
    """
    emissions, inputs = C.prepare_sequence(model, emissions, inputs, length)
    T = states.shape[0]
    ts = jnp.arange(T)
    missing = jnp.any(jnp.isnan(emissions), axis=tuple(range(1, emissions.ndim)))
    y_safe = jnp.where(jnp.isnan(emissions), 0.0, emissions)

    def emission_lp(z, t, y, u):
        return C.log_prob_of(model.emission(z, t, u), y)

    def transition_lp(z_prev, z, t, u):
        return model.transition(z_prev, t, u).log_prob(z)

    in_u = None if inputs is None else 0
    lg = jax.vmap(emission_lp, in_axes=(0, 0, 0, in_u))(states, ts, y_safe, inputs)
    lf = jax.vmap(transition_lp, in_axes=(0, 0, 0, in_u))(states[:-1], states[1:], ts[1:], C.rest(inputs))
    return model.initial(C.row(inputs, 0)).log_prob(states[0]) + jnp.sum(lf) + jnp.sum(jnp.where(missing, 0.0, lg))


def _pg_chain(key, u0, log_conditional, sweep, draw_reference, update, *, num_warmup, num_samples,
              num_param_steps, target_accept):
    """Alternate a conditional-SMC sweep (states | parameters) with a parameter update (parameters | states)."""
    from jax.flatten_util import ravel_pytree

    x0, unravel = ravel_pytree(u0)
    key, k_ref = jax.random.split(key)
    z0 = draw_reference(k_ref, unravel(x0))

    def iteration(carry, xs):
        x, z, adapt = carry
        k, warm = xs
        k_sweep, k_par = jax.random.split(k)
        z = sweep(k_sweep, unravel(x), z)
        if update is not None:
            x = ravel_pytree(update(k_par, unravel(x), z))[0]
            return (x, z, adapt), (unravel(x), z, log_conditional(unravel(x), z)[1], jnp.ones((), bool))
        target = lambda _, xx: log_conditional(unravel(xx), z)
        lp, ll = target(None, x)

        def mh(c, kk):
            x, lp, ll, adapt = c
            x, lp, ll, accept, prob = _mh_step(kk, x, lp, ll, target, adapt)
            adapted = _adapt(adapt, x, prob, target_accept)
            adapt = jax.tree_util.tree_map(lambda a, b: jnp.where(warm, a, b), adapted, adapt)
            return (x, lp, ll, adapt), accept

        (x, lp, ll, adapt), accepts = lax.scan(mh, (x, lp, ll, adapt), jax.random.split(k_par, num_param_steps))
        return (x, z, adapt), (unravel(x), z, ll, jnp.mean(accepts))

    warm = jnp.arange(num_warmup + num_samples) < num_warmup
    keys = jax.random.split(key, num_warmup + num_samples)
    _, out = lax.scan(iteration, (x0, z0, _adaptation_init(x0)), (keys, warm))
    return jax.tree_util.tree_map(lambda a: a[num_warmup:], out)


@partial(jax.jit, static_argnames=("build", "update", "flags", "settings"))
def _pg_core(keys, build, update, priors, arrays, flags, u0, settings):
    """Every particle-Gibbs chain in one module-level compiled function (static: builder, update,
    settings, shapes)."""
    num_particles, num_warmup, num_samples, num_param_steps, target_accept = settings
    batch = Batch(*arrays, *flags)
    bijectors = {k: biject_to(p.support) for k, p in priors.items()}
    T = batch.num_timesteps

    def theta_of(u):
        return {k: bijectors[k](u[k]) for k in priors}

    def log_conditional(u, z):
        total = 0.0
        for name, prior in priors.items():
            theta = bijectors[name](u[name])
            total = total + jnp.sum(prior.log_prob(theta))
            total = total + jnp.sum(bijectors[name].log_abs_det_jacobian(u[name], theta))
        model = build(theta_of(u))
        ll = jnp.sum(batch.map(lambda y, uu, n, zz: complete_log_likelihood(model, zz, y, uu, length=n), z,
                               extra_axes=(0,)))
        return total + ll, ll

    def sweep(k, u, z):
        model = build(theta_of(u))

        def one(y, uu, n, kk, ref):
            return conditional_smc_sequence(kk, model, y, uu, reference=ref, num_particles=num_particles,
                                            ancestor_sampling=True, length=n).reference

        return batch.map(one, C.sequence_keys(k, batch), z, extra_axes=(0, 0))

    def draw_reference(k, u):
        # A path from the model's prior (in the state's own dtype); warm-up sweeps move it to the posterior.
        model = build(theta_of(u))

        def one(y, uu, n, kk):  # an autoregressive model reads its own draws as inputs
            return sample_sequence(kk, model, T, None if model.emission_lags else uu)[0]

        return batch.map(one, C.sequence_keys(k, batch), extra_axes=(0,))

    update_u = None
    if update is not None:
        def update_u(k, u, z):
            new = update(k, theta_of(u), z)
            return {name: bijectors[name].inv(jnp.asarray(new[name], batch.emissions.dtype)) for name in priors}

    chain = lambda k, u: _pg_chain(k, u, log_conditional, sweep, draw_reference, update_u, num_warmup=num_warmup,
                                   num_samples=num_samples, num_param_steps=num_param_steps,
                                   target_accept=float(target_accept))
    us, states, lls, rates = jax.vmap(chain)(keys, u0)
    return {k: bijectors[k](us[k]) for k in priors}, states, lls, rates


def particle_gibbs(key, build: Callable[[dict], SSM], priors: dict, emissions, *, num_particles: int = 100,
                   num_warmup: int = 500, num_samples: int = 1000, num_chains: int = 2, inputs=None,
                   lengths=None, init_params=None, update: Optional[Callable] = None, num_param_steps: int = 5,
                   target_accept: float = 0.3) -> MCMCResult:
    """Particle Gibbs with ancestor sampling over parameters and latent states, for any model.

    Each iteration: a conditional-SMC sweep with ancestor sampling
    (`probssm.inference.smc.conditional_smc`) draws the states given the parameters;
    then the parameters are drawn given the states, by ``update`` when you have an
    exact conditional (e.g. conjugate), else by ``num_param_steps`` adaptive
    random-walk MH steps on log p(theta) + log p(z, y | theta) (unconstrained space;
    the proposal adapts during warm-up only).

    Args:
        build, priors, init_params: as in `nuts`.
        emissions: (T, D), (B, T, D) or a list of (T_b, D) arrays (one conditional sweep per
            sequence; the sequences share the parameters).
        inputs, lengths: as for `ps.smc.conditional_smc`. A padded sequence's path still covers
            all T steps (beyond its length the states follow the model's prediction).
        num_particles: N >= 2 particles of each conditional sweep (the reference included).
        update: optional ``update(key, params, states) -> params`` drawing from
            p(params | states, y) (constrained values, same keys as ``priors``; states (T, d), or
            (B, T, d) for a batch).
        num_param_steps: MH steps per sweep when ``update`` is None.

    Returns:
        `MCMCResult` with ``states`` (chains, draws, T, d) ((chains, draws, B, T, d) for a batch);
        ``log_likelihood`` holds the complete-data log p(z, y | theta) of each draw;
        ``stats["accept_rate"]`` the parameter steps' acceptance rate.
    """
    _check_priors(priors, build)
    num_particles = checks.positive_int(num_particles, "num_particles", minimum=2)
    num_warmup = checks.positive_int(num_warmup, "num_warmup", minimum=0)
    num_samples = checks.positive_int(num_samples, "num_samples")
    num_chains = checks.positive_int(num_chains, "num_chains")
    num_param_steps = checks.positive_int(num_param_steps, "num_param_steps")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept: expected a value in (0, 1), got {target_accept}")
    if update is not None and not callable(update):
        raise ValueError("update: expected a callable update(key, params, states) -> params")
    _check_hashable(build)
    if update is not None:
        _check_hashable(update)
    _check_init(priors, init_params)
    key_init, key_run = jax.random.split(key)
    u0 = _initial_unconstrained(key_init, priors, init_params, num_chains)
    batch = _checked_batch(build, priors, u0, emissions, inputs, lengths)
    settings = (num_particles, num_warmup, num_samples, num_param_steps, float(target_accept))
    samples, states, lls, rates = _pg_core(jax.random.split(key_run, num_chains), build, update, priors,
                                           *_split(batch), u0, settings)
    return MCMCResult(samples, states, lls, {"accept_rate": rates})
