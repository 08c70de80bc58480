"""HMC-SMC: a particle filter whose particles are moved by Hamiltonian Monte Carlo.

When observations are informative relative to the transition noise, the
bootstrap filter's weights g(y_t | z_t^i) collapse onto a few particles. Here
each time step bridges from the predictive to the filtering distribution through
likelihood tempering, and after every reweighting the particles are resampled
and moved by HMC steps (blackjax kernel) that target the current tempered
posterior, so the cloud follows the posterior instead of being reweighted into
degeneracy (Xu et al.; tempering as in Herbst & Schorfheide's tempered particle
filter)::

    z_t^i ~ f(. | z_{t-1}^i);  beta = 0;  w^i = 1/N
    while beta < 1:
        delta: largest step with ESS(w * g^delta) >= target_ess * N (bisection), or 1 - beta
        w^i *= g(y_t | z_t^i)^delta;  log Z += log sum_i w^i;  beta += delta
        resample (z_{t-1}, z_t) pairs;  w^i = 1/N
        move z_t^i by HMC on  log f(z_t | z_{t-1}^i) + beta log g(y_t | z_t)   (z_{t-1}^i fixed)

Moving z_t with z_{t-1}^i held fixed leaves the joint p(z_{t-1}, z_t | y_{0:t}) (at
the current temperature) invariant, so the filter stays consistent. The HMC mass
matrix adapts to the particle cloud (its diagonal variance at each stage) and the
step size follows the acceptance rate across stages and time. The temperatures are
chosen from the particles, so log Z is consistent rather than exactly unbiased.

An additive functional sum_t h_t(z_{t-1}, z_t) (e.g. Fisher's score, `ps.learn.mle(...,
estimator="hmc_smc")`) is estimated along the particle paths: every particle carries the sum of
its path's terms, resampled with the (z_{t-1}, z_t) pairs and extended by h_t after the moves.
A move of z_t given z_{t-1} leaves p(z_{0:t} | y_{0:t}) invariant (z_t depends on the earlier
path only through z_{t-1}), so the average of the sums over the final, equally weighted particles
is a consistent estimate of E[sum_t h_t | y_{0:T-1}] (the path-space estimator: unbiased only as
N grows, and noisy for early terms, whose paths have coalesced).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from probssm.core import checks
from probssm.inference.smc import common as C
from probssm.inference.smc.paris import as_functional, check_functional, mask_functional
from probssm.inference.smc.resampling import resample

__all__ = ["HMCSMCResult", "hmc_smc", "hmc_smc_sequence"]


class HMCSMCResult(NamedTuple):
    """A leading batch axis B is added for batched emissions."""

    log_likelihood: jax.Array  # ()
    filtered_means: jax.Array  # (T, d)
    filtered_covs: jax.Array  # (T, d, d) particle covariance after the last move
    ess: jax.Array  # (T,) ESS at the final reweighting of each step (before resampling)
    min_ess: jax.Array  # (T,) smallest ESS over the step's tempering stages
    num_stages: jax.Array  # (T,) tempering stages used
    acceptance_rate: jax.Array  # (T,) mean HMC acceptance over the step's moves
    particles: jax.Array  # (N, d) equally weighted particles at T-1
    estimate: object = None  # E[sum_t h_t | y] along the particle paths (a pytree like h's), when a functional is given


class _Config(NamedTuple):
    num_particles: int
    num_mcmc_steps: int
    num_integration_steps: int
    target_ess: float
    max_stages: int
    target_accept: float
    resampling: str


def _next_delta(lw, lg, remaining, target, force):
    """Largest tempering increment in (0, remaining] keeping ESS >= target (bisection on a log scale)."""

    def ess_of(delta):
        return C.ess(C.normalise(lw + jnp.where(delta > 0, delta * lg, 0.0))[0])

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = ess_of(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, 40, bisect, (jnp.zeros_like(remaining), remaining))
    take_all = force | (ess_of(remaining) >= target)
    # lo == 0 only when even a tiny increment collapses the weights: take a small step anyway
    return jnp.where(take_all, remaining, jnp.maximum(lo, 1e-6 * remaining))


def _hmc_move(key, z_prev, z, prior_logp, lg_fn, beta, step_size, cfg: _Config):
    """num_mcmc_steps HMC steps per particle on prior_logp(z_prev_i, .) + beta * lg_fn(.)."""
    import blackjax

    kernel = blackjax.hmc.build_kernel()
    inv_mass = jnp.var(z, axis=0) + 1e-12 * (1.0 + jnp.mean(z ** 2, axis=0))

    def one(k, zp, zi):
        logdensity = lambda x: prior_logp(zp, x) + beta * lg_fn(x)
        state = blackjax.hmc.init(zi, logdensity)

        def body(state, kk):
            state, info = kernel(kk, state, logdensity, step_size, inv_mass, cfg.num_integration_steps)
            return state, info.acceptance_rate

        state, acc = lax.scan(body, state, jax.random.split(k, cfg.num_mcmc_steps))
        return state.position, jnp.mean(acc)

    keys = jax.random.split(key, z.shape[0])
    z_new, acc = jax.vmap(one)(keys, z_prev, z)
    return z_new, jnp.mean(jnp.where(jnp.isnan(acc), 0.0, acc))


def _temper(key, z_prev, z, sums, prior_logp, lg_fn, log_step, cfg: _Config):
    """Bridge one step from the predictive to the filtering particles; returns the new cloud, with
    the (z_prev, sums) of each particle's path resampled alongside (``sums`` None: no functional)."""
    num = cfg.num_particles
    lg = jax.vmap(lg_fn)(z)
    uniform = jnp.full((num,), -math.log(num), z.dtype)

    def cond(carry):
        beta, stage = carry[0], carry[5]
        return (beta < 1.0) & (stage < cfg.max_stages)

    def body(carry):
        beta, z_prev, z, sums, lg, log_z, stage, log_step, ess_last, ess_min, acc_sum, key = carry
        key, k_res, k_move = jax.random.split(key, 3)
        remaining = 1.0 - beta
        delta = _next_delta(uniform, lg, remaining, cfg.target_ess * num, stage == cfg.max_stages - 1)
        lw, log_sum = C.normalise(uniform + jnp.where(delta > 0, delta * lg, 0.0))
        ess = C.ess(lw)
        beta = jnp.where(delta >= remaining, 1.0, beta + delta)
        idx = resample(k_res, lw, cfg.resampling)
        z_prev, z, sums = jax.tree_util.tree_map(lambda a: a[idx], (z_prev, z, sums))
        z, acc = _hmc_move(k_move, z_prev, z, prior_logp, lg_fn, beta, jnp.exp(log_step), cfg)
        log_step = log_step + (acc - cfg.target_accept)
        lg = jax.vmap(lg_fn)(z)
        return (beta, z_prev, z, sums, lg, log_z + log_sum, stage + 1, log_step, ess, jnp.minimum(ess_min, ess),
                acc_sum + acc, key)

    zero = jnp.zeros((), z.dtype)
    init = (zero, z_prev, z, sums, lg, zero, jnp.zeros((), jnp.int32), log_step, zero, jnp.asarray(num, z.dtype),
            zero, key)
    _, z_prev, z, sums, _, log_z, stages, log_step, ess, ess_min, acc_sum, _ = lax.while_loop(cond, body, init)
    return z_prev, z, sums, log_z, log_step, ess, ess_min, stages, acc_sum / jnp.maximum(stages, 1)


def _moments(z):
    mean = jnp.mean(z, axis=0)
    dz = z - mean
    return mean, dz.T @ dz / z.shape[0]


def _hmc_smc_one(key, model, ys, inputs, log_step0, cfg: _Config, functional=None, length=None):
    functional = None if functional is None else mask_functional(functional, length)
    ys, inputs = C.prepare_sequence(model, ys, inputs, length)
    num_timesteps = ys.shape[0]
    keys = jax.random.split(key, num_timesteps)

    def lg_of(t, y, u):
        y_safe, observed = C.observation(y)
        return lambda z: jnp.where(observed, C.log_prob_of(model.emission(z, t, u), y_safe), 0.0)

    def extend(sums, z_prev, z, t, y, u):
        if functional is None:
            return None
        h = jax.vmap(lambda zp, zi: functional.step(zp, zi, t, y, u))(z_prev, z)
        return jax.tree_util.tree_map(jnp.add, sums, h)

    def step(carry, xs):
        z, sums, log_step, log_lik = carry
        t, y, u, k = xs
        k_prop, k_temper = jax.random.split(k)
        z_pred = C.sample_per_particle(k_prop, lambda zp: model.transition(zp, t, u), z)
        prior = lambda zp, x: model.transition(zp, t, u).log_prob(x)
        z_prev, z_new, sums, log_z, log_step, ess, ess_min, stages, acc = _temper(
            k_temper, z, z_pred, sums, prior, lg_of(t, y, u), log_step, cfg)
        mean, cov = _moments(z_new)
        return (z_new, extend(sums, z_prev, z_new, t, y, u), log_step, log_lik + log_z), \
            (mean, cov, ess, ess_min, stages, acc)

    # t = 0: the prior is the initial distribution; the "previous state" it ignores is a copy of
    # the initial draws (same shape and dtype as the model's own states).
    u0 = C.row(inputs, 0)
    k0, k_temper0 = jax.random.split(keys[0])
    d0 = model.initial(u0)
    z0 = d0.sample(k0, (cfg.num_particles,))
    _, z0, _, log_z0, log_step, ess0, ess_min0, stages0, acc0 = _temper(
        k_temper0, z0, z0, None, lambda _, x: model.initial(u0).log_prob(x), lg_of(0, ys[0], u0), log_step0, cfg)
    sums0 = None
    if functional is not None:
        if functional.initial is None:   # no t = 0 term: zeros shaped like h_t's output
            shape = jax.eval_shape(lambda zp, z: functional.step(zp, z, 1, ys[0], u0), z0[0], z0[0])
            sums0 = jax.tree_util.tree_map(lambda a: jnp.zeros((cfg.num_particles,) + a.shape, a.dtype), shape)
        else:
            sums0 = jax.vmap(lambda z: functional.initial(z, ys[0], u0))(z0)
    mean0, cov0 = _moments(z0)
    (z, sums, _, log_lik), out = lax.scan(step, (z0, sums0, log_step, log_z0),
                                          (jnp.arange(1, num_timesteps), ys[1:], C.rest(inputs), keys[1:]))
    first = (mean0, cov0, ess0, ess_min0, stages0, acc0)
    means, covs, ess, ess_min, stages, acc = (jnp.concatenate([a[None], b]) for a, b in zip(first, out))
    # after the last stage the particles are equally weighted: the estimate is the plain average
    estimate = None if sums is None else jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), sums)
    return HMCSMCResult(log_lik, means, covs, ess, ess_min, stages, acc, z, estimate)


def _config(num_particles, num_mcmc_steps, num_integration_steps, target_ess, max_stages, target_accept,
            resampling) -> _Config:
    """The static settings, checked (each a Python value, so the checks never touch a tracer)."""
    num_particles = C.check_num_particles(num_particles)
    resampling = C.check_resampling(resampling)
    num_mcmc_steps = checks.positive_int(num_mcmc_steps, "num_mcmc_steps")
    num_integration_steps = checks.positive_int(num_integration_steps, "num_integration_steps")
    max_stages = checks.positive_int(max_stages, "max_stages")
    if not 0.0 < float(target_ess) <= 1.0:
        raise ValueError(f"target_ess: expected a value in (0, 1], got {target_ess}")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept: expected a value in (0, 1), got {target_accept}")
    return _Config(num_particles, num_mcmc_steps, num_integration_steps, float(target_ess), max_stages,
                   float(target_accept), resampling)


def _log_step(step_size, dtype):
    if checks.is_concrete(step_size) and not (math.isfinite(float(step_size)) and float(step_size) > 0):
        raise ValueError(f"step_size: expected a positive number, got {step_size}")
    return jnp.log(jnp.asarray(step_size, dtype))


def check_vector_state(model, batch):
    """ValueError naming ``model`` unless its state is a real vector (what the HMC moves need)."""
    _, u = C.first_sequence(model, batch)
    z = C.state_struct(model, C.row(u, 0))
    if len(z.shape) != 1 or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"model: hmc_smc needs a real vector state (d,), the model's state has shape {z.shape} "
                         f"and dtype {z.dtype}")


def hmc_smc_sequence(key, model, emissions, inputs=None, *, num_particles: int, num_mcmc_steps: int = 2,
                     num_integration_steps: int = 5, step_size=0.5, target_ess: float = 0.5, max_stages: int = 10,
                     target_accept: float = 0.65, resampling: str = "systematic", additive_functional=None,
                     length=None) -> HMCSMCResult:
    """HMC-SMC on one sequence: the public traceable core of `hmc_smc`.

    Args:
        key: a `jax.random` key.
        model: an `SSM` with a real vector state (see `hmc_smc`).
        emissions: (T, D); NaN marks a missing step.
        inputs: None (the model's `default_inputs`) or (T, ...) rows.
        num_particles: N >= 2 (a static Python int, checked).
        num_mcmc_steps, num_integration_steps, max_stages: as for `hmc_smc` (static, checked).
        target_ess, target_accept, resampling: as for `hmc_smc` (static, checked).
        step_size: as for `hmc_smc` (may be traced).
        additive_functional: None, an `AdditiveFunctional` or a callable ``h(z_prev, z, t, y,
            inputs)``; its path-space estimate is ``estimate``.
        length: true length of a padded sequence; steps at and beyond it are missing and their
            terms h_t are dropped.

    Returns:
        `HMCSMCResult` (no batch axis).

    The model's parameter values are checked when they are concrete (a model made by
    ``eqx.tree_at`` with a bad value raises a ValueError naming the field); under the caller's
    jit / vmap, where they are traced, that check is skipped. The data are not checked.
    """
    C.check_model(model)
    cfg = _config(num_particles, num_mcmc_steps, num_integration_steps, target_ess, max_stages, target_accept,
                  resampling)
    functional = None if additive_functional is None else as_functional(additive_functional)
    log_step = _log_step(step_size, jnp.result_type(emissions, float))
    return _hmc_smc_one(key, model, emissions, inputs, log_step, cfg, functional, length)


@eqx.filter_jit
def _run(key, model, batch, log_step0, cfg, functional):
    def one(y, u, n, k):
        return _hmc_smc_one(k, model, y, u, log_step0, cfg, functional, n)

    return batch.map(one, C.sequence_keys(key, batch), extra_axes=(0,))


def hmc_smc(key, model, emissions, num_particles: int, *, num_mcmc_steps: int = 2, num_integration_steps: int = 5,
            step_size: float = 0.5, target_ess: float = 0.5, max_stages: int = 10, target_accept: float = 0.65,
            resampling: str = "systematic", inputs=None, lengths=None, additive_functional=None) -> HMCSMCResult:
    """Tempered particle filter with HMC moves, for models with a continuous vector state.

    Args:
        key: a `jax.random` key.
        model: any `ps.SSM` whose state is a real vector and whose transition and
            emission log-densities are differentiable in the state.
        emissions: (T, D), a batch (B, T, D) or a list of (T_b, D) arrays; a NaN in y_t marks
            step t missing.
        num_particles: N >= 2.
        num_mcmc_steps: HMC steps after each tempering stage.
        num_integration_steps: leapfrog steps per HMC step.
        step_size: initial leapfrog step size in units of the particle cloud's spread
            (the mass matrix is the cloud's diagonal variance); it then adapts towards
            ``target_accept``.
        target_ess: each tempering stage keeps the ESS at or above target_ess * N; in (0, 1].
        max_stages: cap on the stages per time step (the last one jumps to temperature 1).
        resampling: scheme used after each stage.
        inputs: optional (T, U) inputs (or (B, T, U) / a list, one per sequence).
        lengths: (B,) true lengths of a padded batch; steps beyond are missing data (and carry
            no terms of the functional).
        additive_functional: None, or an `AdditiveFunctional` / callable ``h(z_prev, z, t, y,
            inputs)`` whose smoothed sum E[sum_t h_t | y] is estimated along the particle paths
            (``estimate``; see the module docstring).

    Returns:
        `HMCSMCResult`. The cost of a time step is about ``num_stages * num_mcmc_steps *
        num_integration_steps`` gradient evaluations per particle.
    """
    C.check_model(model)
    cfg = _config(num_particles, num_mcmc_steps, num_integration_steps, target_ess, max_stages, target_accept,
                  resampling)
    batch = C.prepare(model, emissions, inputs, lengths)
    check_vector_state(model, batch)
    functional = None if additive_functional is None else check_functional(model, batch, additive_functional)
    return _run(key, model, batch, _log_step(step_size, batch.emissions.dtype), cfg, functional)
