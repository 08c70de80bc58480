"""Every public engine under `jax.jit`, `jax.vmap` over model parameters and `jax.grad` (issue 15, item 1).

Each case is a function ``f(theta, key) -> output`` that builds a small model from the scalar
parameter ``theta`` (traced under the transforms) and calls one public function on fixed data
(T = 20, d = p = 2). For every case:

* ``test_jit_vmap``: ``jax.jit(jax.vmap(f, (0, None)))`` on two parameter values (inside jit and
  batched at once: one compilation per case) gives finite outputs, and the reversed batch gives
  the reversed outputs (no cross-talk between batch members);
* ``test_grad``: where the case declares a differentiable scalar (a log-likelihood, a sum of
  means), ``jax.jit(jax.vmap(jax.value_and_grad(...)))`` is finite and, for deterministic engines,
  matches a central finite difference of the same compiled function. One log-likelihood per
  engine family runs in CI; the other gradient cases are marked slow (``make test-all``).

The two failures named in the issue are plain-jit regression tests at the end.

`test_every_public_engine_is_covered` compares the cases with the modules' public names, so a
new public engine function without a case here fails the suite (add a case, or add the name to
`NOT_ENGINES` with the reason).
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import probssm as ps

T, D, N = 20, 2, 16  # steps, state / emission dimension, particles
THETA = 0.6  # the parameter value of the jit / grad checks
THETAS = jnp.array([0.5, 0.7])  # the batch of the vmap checks
KEY = jax.random.key(0)

_rng = np.random.default_rng(0)
Y = jnp.asarray(np.cumsum(_rng.normal(size=(T, D)), axis=0) * 0.3)  # continuous data (T, 2)
Y_HMM = jnp.asarray(np.where(np.arange(T)[:, None] % 5 < 2, -1.0, 1.0) + 0.4 * _rng.normal(size=(T, 1)))
STATES = jnp.asarray(0.5 * _rng.normal(size=(T, D)))  # a state path for complete-data likelihoods
SGD = optax.sgd(0.1)  # one object: the imap engines hash the optimiser by identity


# ----------------------------------------------------------------------------------------------
# Models built from a (possibly traced) scalar parameter
# ----------------------------------------------------------------------------------------------
def lgssm(th):
    """2-d linear-Gaussian model; theta is the AR coefficient and scales the transition noise."""
    eye = jnp.eye(D)
    A = th * jnp.array([[1.0, 0.1], [-0.1, 1.0]])
    return ps.models.LinearGaussianSSM(jnp.zeros(D), eye, A, 0.2 * th * eye, eye, 0.5 * eye)


def hmm(th):
    """2-state Gaussian HMM; theta sets the stay probability and separates the emission means."""
    stay = 0.5 + 0.4 * th
    A = jnp.array([[1.0, 0.0], [0.0, 1.0]]) * stay + jnp.array([[0.0, 1.0], [1.0, 0.0]]) * (1 - stay)
    means = jnp.stack([-th, th])[:, None]
    return ps.models.HMM(jnp.array([0.5, 0.5]), A, ps.emissions.Gaussian(means, jnp.ones((2, 1, 1))))


def _f(z, t, u):
    return jnp.sin(z) + 0.5 * z


def _h(z, t, u):
    return z + 0.1 * z ** 2


def nonlinear(th):
    eye = jnp.eye(D)
    return ps.models.NonlinearGaussianSSM(th * jnp.ones(D), eye, _f, th * 0.3 * eye, _h, 0.5 * eye)


def dkf_model(th):
    eye = jnp.eye(D)
    return ps.dkf.exact_linear_gaussian(th * eye, 0.3 * eye, eye, 0.5 * eye)


GP_TIMES = jnp.asarray(np.cumsum(_rng.uniform(0.2, 1.0, T)))  # irregular, sorted


COUNTS = jnp.asarray(_rng.poisson(2.0, size=(T, D)).astype(float))  # Poisson data for the variational engine
SITES = ps.vi.initial_sites(T, D)


def hsmm(th):
    """3-state left-to-right HSMM (absorbing failure state); theta sets Poisson duration rates and emission means."""
    means = jnp.stack([th, 0.0 * th, -th])[:, None]
    durations = ps.models.PoissonDuration(jnp.stack([4.0 * th, 3.0 * th, 1.0 + 0.0 * th]), 12, truncation_tol=None)
    return ps.models.HSMM(jnp.array([1.0, 0.0, 0.0]), ps.models.left_to_right(3), durations,
                          ps.emissions.Gaussian(means, jnp.ones((3, 1, 1))))


RUL_PMF = jnp.asarray(_rng.dirichlet(np.ones(11), size=4))
RUL_TRUTH = jnp.array([2, 5, 0, 12])


def _rul(th):
    return ps.prognostics.rul(hsmm(th), Y_HMM, max_horizon=30, failure_state=2)


def _rul_predictions(th):
    return 10.0 * th * jnp.arange(4.0) + 0.5


def _prognostics_cases():
    fail = jnp.repeat(jnp.array([0.0, 0.0, 1.0]), 12)
    return [
        Case("prognostics", "rul", lambda th, k: _rul(th), lambda o: o.mean),
        Case("prognostics", "rul_from_probs", lambda th, k: ps.prognostics.rul_from_probs(
            hsmm(th).expanded_initial_probs(), hsmm(th).expanded_transition_matrix(), fail, 30), lambda o: o.mean),
        Case("prognostics", "intervals", lambda th, k: ps.prognostics.intervals(_rul(th), (0.5, 0.9))),
        Case("prognostics", "phm08_score", lambda th, k: ps.prognostics.phm08_score(_rul_predictions(th), RUL_TRUTH),
             lambda o: o),
        Case("prognostics", "rmse", lambda th, k: ps.prognostics.rmse(_rul_predictions(th), RUL_TRUTH), lambda o: o),
        Case("prognostics", "coverage", lambda th, k: ps.prognostics.coverage(
            jnp.stack([RUL_TRUTH - 10 * th, RUL_TRUTH + _rul_predictions(th) - 3], -1), RUL_TRUTH)),
        Case("prognostics", "pit", lambda th, k: ps.prognostics.pit(
            RUL_PMF ** th / jnp.sum(RUL_PMF ** th, -1, keepdims=True), RUL_TRUTH, k), jnp.sum, exact=False),
        Case("hmm", "smoother[hsmm]", lambda th, k: ps.hmm.smoother(hsmm(th), Y_HMM),
             lambda o: o.log_likelihood + jnp.sum(o.smoothed_probs[:, 0])),
    ]


_CT_RNG = np.random.default_rng(19)
CT_LABELS = jnp.asarray((np.arange(T) % 3).astype(float)[:, None])  # noisy labels of a continuous-time HMM
PANEL_TIMES = jnp.asarray(np.sort(_CT_RNG.uniform(0.0, 3.0, (4, 5)), axis=1))  # 4 subjects x 5 records
PANEL_STATES = jnp.asarray(np.array([[0, 1, 1, 2, 0], [2, 2, 1, 0, 1], [1, 0, 0, 2, 2], [0, 0, 2, 1, 1]]))
PATH_STATES = jnp.asarray(np.array([[0, 1, 2, 0, 1], [2, 1, 0, 1, 0], [1, 0, 2, 1, 2], [0, 2, 1, 0, 2]]))  # no i -> i
DWELL_TIMES = jnp.array([0.3, 1.2, 0.4, 0.7, 0.2])  # alternating sojourns in class 0 (states 0, 1), class 1 (state 2)
DWELL_CLASSES = jnp.array([0, 1, 0, 1, 0])
OPEN_CLASSES = jnp.array([0, 0, 1])
MISCLASS = jnp.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])


def mjp(th):
    """3-state Markov jump process whose rates scale with theta."""
    F = th * jnp.array([[0.0, 1.0, 0.5], [0.4, 0.0, 0.8], [0.6, 0.3, 0.0]])
    return ps.models.MarkovJumpProcess(F - jnp.diag(F.sum(1)), jnp.array([0.5, 0.3, 0.2]))


def ct_hmm(th):
    """The same process seen through a misclassification matrix."""
    return ps.models.ContinuousTimeHMM(mjp(th), MISCLASS)


def _ctmc_cases():
    return [
        Case("ctmc", "transition_matrix", lambda th, k: ps.ctmc.transition_matrix(mjp(th), GP_TIMES[:4]), jnp.sum),
        Case("ctmc", "uniformization", lambda th, k: ps.ctmc.uniformization(mjp(th), GP_TIMES[:4], num_terms=60),
             lambda o: o[2, 0, 1]),
        Case("ctmc", "gillespie", lambda th, k: ps.ctmc.gillespie(k, mjp(th), 5.0, 16)),
        Case("ctmc", "sample_at", lambda th, k: ps.ctmc.sample_at(k, mjp(th), GP_TIMES)),
        Case("ctmc", "sample_bridge", lambda th, k: ps.ctmc.sample_bridge(k, mjp(th), 0, 2, 1.5, 24)),
        Case("ctmc", "panel_log_likelihood",
             lambda th, k: ps.ctmc.panel_log_likelihood(mjp(th), PANEL_TIMES, PANEL_STATES), lambda o: o),
        Case("ctmc", "path_log_likelihood",
             lambda th, k: ps.ctmc.path_log_likelihood(mjp(th), PANEL_TIMES, PATH_STATES, t_end=3.5), lambda o: o),
        Case("ctmc", "path_statistics",
             lambda th, k: ps.ctmc.path_statistics(mjp(th), PANEL_TIMES * th, PATH_STATES, t_end=3.5 * th),
             lambda o: jnp.sum(o.dwell)),
        Case("ctmc", "dwell_log_likelihood",
             lambda th, k: ps.ctmc.dwell_log_likelihood(mjp(th), DWELL_TIMES, DWELL_CLASSES, OPEN_CLASSES), lambda o: o),
        Case("ctmc", "dwell_time_density",
             lambda th, k: ps.ctmc.dwell_time_density(mjp(th), GP_TIMES[:4] + 0.1, OPEN_CLASSES, 1), jnp.sum),
        Case("ctmc", "filter", lambda th, k: ps.ctmc.filter(ct_hmm(th), GP_TIMES, CT_LABELS), lambda o: o.log_likelihood),
        Case("ctmc", "smoother", lambda th, k: ps.ctmc.smoother(ct_hmm(th), GP_TIMES, CT_LABELS),
             lambda o: jnp.sum(o.smoothed_probs[:, 0])),
        Case("ctmc", "viterbi", lambda th, k: ps.ctmc.viterbi(ct_hmm(th), GP_TIMES, CT_LABELS)),
        Case("ctmc", "state_probs_at",
             lambda th, k: ps.ctmc.state_probs_at(ct_hmm(th), GP_TIMES, CT_LABELS, GP_TIMES[:3] + 0.1), lambda o: o[0, 0]),
        # the pretrained network on one path of 3 labels, its grid scaled by theta (no grad check: the
        # interval lengths enter through bins, piecewise constant in theta)
        Case("ctmc", "AmortizedRateEstimator",
             lambda th, k: ps.ctmc.AmortizedRateEstimator.pretrained()(GP_TIMES * th, CT_LABELS[:, 0].astype(int)[None],
                                                                       num_states=3)),
        Case("core", "transition_matrices_at",
             lambda th, k: ps.core.transition_matrices_at(mjp(th).generator(), GP_TIMES), jnp.sum),
    ]


def slds(th):
    """2-mode SLDS (d = p = 2): theta scales both modes' dynamics and sets the stay probability."""
    eye = jnp.eye(D)
    stay = 0.5 + 0.4 * th
    A = jnp.array([[1.0, 0.0], [0.0, 1.0]]) * stay + jnp.array([[0.0, 1.0], [1.0, 0.0]]) * (1 - stay)
    return ps.models.SLDS(jnp.array([0.5, 0.5]), A, jnp.zeros((2, D)), jnp.stack([eye, eye]),
                          jnp.stack([th * eye, -0.5 * th * eye]), jnp.stack([0.2 * eye, 0.4 * eye]), eye, 0.5 * eye)


def rslds(th):
    """2-mode recurrent SLDS (d = p = 2): theta scales the recurrence weights and both modes' dynamics."""
    eye = jnp.eye(D)
    W = th * jnp.array([[[1.0, -1.0], [-1.0, 1.0]], [[-1.0, 0.5], [1.0, -0.5]]])
    return ps.models.RecurrentSLDS(jnp.array([0.5, 0.5]), W, jnp.zeros((2, D)), jnp.stack([eye, eye]),
                                   jnp.stack([th * eye, -0.5 * th * eye]), jnp.stack([0.2 * eye, 0.4 * eye]), eye,
                                   0.5 * eye)


def grass(th):
    """2 objects, 2 modes (d = p = 2): theta scales the interaction weights and both modes' dynamics."""
    eye = jnp.eye(D)
    return ps.models.GRASS(2, jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
                           th * jnp.array([[1.0, -1.0], [-1.0, 1.0]]), jnp.zeros((2, D)), eye,
                           jnp.stack([th * eye, -0.5 * th * eye]), jnp.stack([0.2 * eye, 0.4 * eye]), eye, 0.5 * eye,
                           edge_weight=th)


Y_GRASS = Y[:8].reshape(4, 2, D)  # (T, N, p)
U_GRASS = Y[:4, :1]  # (T, E) edge inputs


def _grass_objective(th):
    r = ps.switching.grass_structured_vi(grass(th), Y_GRASS, 2, edge_inputs=U_GRASS)
    return ps.switching.grass_transition_objective(grass(th), r, edge_inputs=U_GRASS)


def msar(th):
    """2-regime switching AR(1); theta sets the stay probability and separates the regime means."""
    stay = 0.5 + 0.4 * th
    A = jnp.array([[1.0, 0.0], [0.0, 1.0]]) * stay + jnp.array([[0.0, 1.0], [1.0, 0.0]]) * (1 - stay)
    return ps.models.MarkovSwitchingAR(A, jnp.stack([-th, th]), jnp.array([0.3]), jnp.array([0.5, 0.8]))


def gp_model(th):
    """Markovian GP whose lengthscale is theta."""
    return ps.models.MarkovianGP(ps.gp.Matern32(lengthscale=2.0 * th, variance=1.0), noise_variance=0.3)


_ENC = ps.models.gpvae.mlp_encoder(jax.random.key(1), D, 1, width=4, depth=1)
_DEC = ps.models.gpvae.mlp_decoder(jax.random.key(2), 1, D, width=4, depth=1)


def gpvae_model(th):
    """Markovian GP-VAE with one latent function whose lengthscale is theta (small networks)."""
    return ps.models.MarkovianGPVAE((ps.gp.Matern32(lengthscale=2.0 * th),), _ENC, _DEC, observation_variance=0.5)


def _imap_transition(x, t):
    return 0.9 * x


def _imap_loss(x, y, t):
    return 0.5 * jnp.sum((y - x) ** 2)


_FUNCTIONAL = ps.smc.AdditiveFunctional(initial=lambda z, y, u: z, step=lambda zp, z, t, y, u: z)


def _build(params):
    return lgssm(params["a"])


_PRIORS = {"a": dist.Uniform(0.1, 0.95)}


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------
class Case(NamedTuple):
    module: str  # attribute of ps holding the function ("" for ps itself)
    name: str  # the public name the case covers
    fn: Callable  # (theta, key) -> output pytree
    scalar: Optional[Callable] = None  # output -> differentiable scalar; None: no grad check
    exact: bool = True  # deterministic in theta: check grad against finite differences


def _pf(th, k):
    return ps.smc.particle_filter(k, lgssm(th), Y, N)


def _paris_seq(th, k):
    return ps.smc.paris_sequence(k, lgssm(th), Y, additive_functional=_FUNCTIONAL, num_particles=N)


def _kalman_cases():
    cases = []
    for par in (False, True):
        sfx = "[parallel]" if par else ""
        cases += [
            Case("kalman", "filter" + sfx, lambda th, k, p=par: ps.kalman.filter(lgssm(th), Y, parallel=p),
                 lambda o: o.log_likelihood),
            Case("kalman", "smoother" + sfx, lambda th, k, p=par: ps.kalman.smoother(lgssm(th), Y, parallel=p),
                 lambda o: o.log_likelihood + jnp.sum(o.smoothed_means)),
            Case("kalman", "sample" + sfx, lambda th, k, p=par: ps.kalman.sample(k, lgssm(th), Y, 3, parallel=p),
                 jnp.sum),
            Case("kalman", "forecast" + sfx, lambda th, k, p=par: ps.kalman.forecast(lgssm(th), Y, 3, parallel=p),
                 lambda o: jnp.sum(o.emission_means) + jnp.sum(o.covs)),
        ]
    params = lambda th: lgssm(th).linear_gaussian_params(T)
    long_params = lambda th: lgssm(th).linear_gaussian_params(T + 3)
    # long enough (> 2 blocks of 32 steps) for the steady-state forms to switch to the constant gain
    y_long = jnp.concatenate([Y] * 4)
    cases += [
        Case("kalman", "filter[steady]", lambda th, k: ps.kalman.filter(lgssm(th), y_long),
             lambda o: o.log_likelihood + jnp.sum(o.filtered_means)),
        Case("kalman", "smoother[steady, parallel]", lambda th, k: ps.kalman.smoother(lgssm(th), y_long, parallel=True),
             lambda o: o.log_likelihood + jnp.sum(o.smoothed_means) + jnp.sum(o.smoothed_covs)),
        Case("kalman", "sample[steady]", lambda th, k: ps.kalman.sample(k, lgssm(th), y_long, 2), jnp.sum),
        Case("kalman", "affine_recurrence", lambda th, k: ps.kalman.affine_recurrence(
            th * jnp.array([[0.9, 0.1], [-0.1, 0.9]]), Y, 8), jnp.sum),
    ]
    cases += [
        Case("kalman", "log_likelihood", lambda th, k: ps.kalman.log_likelihood(lgssm(th), Y), lambda o: o),
        Case("kalman", "filter_params", lambda th, k: ps.kalman.filter_params(params(th), Y),
             lambda o: o.log_likelihood),
        Case("kalman", "smoother_params", lambda th, k: ps.kalman.smoother_params(params(th), Y, parallel=True),
             lambda o: jnp.sum(o.smoothed_covs)),
        Case("kalman", "sample_params", lambda th, k: ps.kalman.sample_params(k, params(th), Y, 2), jnp.sum),
        Case("kalman", "forecast_params", lambda th, k: ps.kalman.forecast_params(long_params(th), Y, 3),
             lambda o: jnp.sum(o.means)),
    ]
    return cases


def _hmm_cases():
    cases = []
    for par in (False, True):
        sfx = "[parallel]" if par else ""
        cases += [
            Case("hmm", "filter" + sfx, lambda th, k, p=par: ps.hmm.filter(hmm(th), Y_HMM, parallel=p),
                 lambda o: o.log_likelihood),
            Case("hmm", "smoother" + sfx, lambda th, k, p=par: ps.hmm.smoother(hmm(th), Y_HMM, parallel=p),
                 lambda o: o.log_likelihood + jnp.sum(o.transition_counts[0])),
            Case("hmm", "log_likelihood" + sfx,
                 lambda th, k, p=par: ps.hmm.log_likelihood(hmm(th), Y_HMM, parallel=p), lambda o: o),
        ]
    params = lambda th: hmm(th).discrete_params(Y_HMM)
    cases += [
        Case("hmm", "viterbi", lambda th, k: ps.hmm.viterbi(hmm(th), Y_HMM)),
        Case("hmm", "sample", lambda th, k: ps.hmm.sample(k, hmm(th), Y_HMM, 3)),
        Case("hmm", "posterior", lambda th, k: ps.hmm.posterior(hmm(th), Y_HMM),
             lambda o: o.log_likelihood + jnp.sum(o.smoothed_probs[:, 0])),
        Case("hmm", "filter_params", lambda th, k: ps.hmm.filter_params(params(th)), lambda o: o.log_likelihood),
        Case("hmm", "smoother_params", lambda th, k: ps.hmm.smoother_params(params(th)),
             lambda o: jnp.sum(o.smoothed_probs[:, 1])),
        Case("hmm", "viterbi_params", lambda th, k: ps.hmm.viterbi_params(params(th))),
        Case("hmm", "sample_params", lambda th, k: ps.hmm.sample_params(k, params(th), 2)),
    ]
    return cases


def _gaussian_cases():
    cases = []
    for method in ps.gaussian.METHODS:
        cases += [
            Case("gaussian", f"filter[{method}]",
                 lambda th, k, m=method: ps.gaussian.filter(nonlinear(th), Y, method=m), lambda o: o.log_likelihood),
            Case("gaussian", f"smoother[{method}]",
                 lambda th, k, m=method: ps.gaussian.smoother(nonlinear(th), Y, method=m),
                 lambda o: jnp.sum(o.smoothed_means)),
        ]
    cases.append(Case("gaussian", "sigma_points",
                      lambda th, k: ps.gaussian.sigma_points(th * jnp.ones(D), (1 + th) * jnp.eye(D)),
                      lambda o: jnp.sum(o[0])))
    return cases


def _smc_cases():
    def bs(th, k):
        return ps.smc.backward_sample(k, lgssm(th), _pf(th, k), 3)

    def bs_seq(th, k):
        pf = ps.smc.particle_filter_sequence(k, lgssm(th), Y, num_particles=N)
        return ps.smc.backward_sample_sequence(k, lgssm(th), pf, num_samples=3)

    ref = jnp.zeros((T, D))
    cases = [
        Case("smc", "particle_filter", _pf, lambda o: o.log_likelihood, exact=False),
        Case("smc", "particle_filter_sequence",
             lambda th, k: ps.smc.particle_filter_sequence(k, lgssm(th), Y, num_particles=N),
             lambda o: o.log_likelihood, exact=False),
        Case("smc", "backward_sample", bs),
        Case("smc", "backward_sample_sequence", bs_seq),
        Case("smc", "paris", lambda th, k: ps.smc.paris(k, lgssm(th), Y, _FUNCTIONAL, N),
             lambda o: o.log_likelihood, exact=False),
        Case("smc", "paris_sequence", _paris_seq, lambda o: o.log_likelihood, exact=False),
        Case("smc", "conditional_smc", lambda th, k: ps.smc.conditional_smc(k, lgssm(th), Y, ref, N)),
        Case("smc", "conditional_smc_sequence",
             lambda th, k: ps.smc.conditional_smc_sequence(k, lgssm(th), Y, reference=ref, num_particles=N)),
        Case("smc", "ppg", lambda th, k: ps.smc.ppg(k, lgssm(th), Y, _FUNCTIONAL, N, 2)),
        Case("smc", "ppg_sequence",
             lambda th, k: ps.smc.ppg_sequence(k, lgssm(th), Y, additive_functional=_FUNCTIONAL, num_particles=N,
                                               num_iters=2)),
        Case("smc", "hmc_smc",
             lambda th, k: ps.smc.hmc_smc(k, lgssm(th), Y[:5], 8, num_mcmc_steps=1, num_integration_steps=2,
                                          max_stages=2)),
        Case("smc", "hmc_smc_sequence",
             lambda th, k: ps.smc.hmc_smc_sequence(k, lgssm(th), Y[:5], num_particles=8, num_mcmc_steps=1,
                                                   num_integration_steps=2, max_stages=2,
                                                   additive_functional=_FUNCTIONAL)),
    ]
    if hasattr(ps.smc, "smoother"):  # the one-call particle smoother of issue 15, item 4
        cases += [
            Case("smc", "smoother", lambda th, k: ps.smc.smoother(k, lgssm(th), Y, N)),
            Case("smc", "smoother_sequence", lambda th, k: ps.smc.smoother_sequence(k, lgssm(th), Y, num_particles=N)),
        ]
    return cases


def _mcmc_cases():
    def log_density(th, k):
        fn, _ = ps.mcmc.log_density(_build, _PRIORS, Y)
        return fn({"a": th})  # theta as the unconstrained value

    def numpyro_model(th, k):
        from numpyro.infer.util import log_density as nlog_density

        return nlog_density(ps.mcmc.numpyro_model(_build, _PRIORS, Y), (), {}, {"a": th})[0]

    cases = []
    if hasattr(ps.mcmc, "pointwise_log_likelihood"):  # the az.loo support of issue 15, item 4
        cases += [
            Case("mcmc", "pointwise_log_likelihood",
                 lambda th, k: ps.mcmc.pointwise_log_likelihood(_build, {"a": th[None, None]}, Y), jnp.sum),
            Case("mcmc", "pointwise_log_likelihood_sequence",
                 lambda th, k: ps.mcmc.pointwise_log_likelihood_sequence(lgssm(th), Y), jnp.sum),
        ]
    return cases + [
        Case("mcmc", "MarginalLikelihood", lambda th, k: ps.mcmc.MarginalLikelihood(lgssm(th), T).log_prob(Y),
             lambda o: o),
        Case("mcmc", "log_density", log_density, lambda o: o),
        Case("mcmc", "numpyro_model", numpyro_model, lambda o: o),
        Case("mcmc", "complete_log_likelihood",
             lambda th, k: ps.mcmc.complete_log_likelihood(lgssm(th), STATES, Y), lambda o: o),
    ]


CASES = (
    _kalman_cases() + _hmm_cases() + _gaussian_cases() + _smc_cases() + _mcmc_cases() + _prognostics_cases() + _ctmc_cases() + [
        Case("dkf", "filter", lambda th, k: ps.dkf.filter(dkf_model(th), Y), lambda o: jnp.sum(o.filtered_means)),
        Case("dkf", "filter_sequence", lambda th, k: ps.dkf.filter_sequence(dkf_model(th), Y),
             lambda o: jnp.sum(o.filtered_covs)),
        Case("imap", "filter",
             lambda th, k: ps.imap.filter(_imap_transition, _imap_loss, th * jnp.ones(D), Y, optimizer=SGD,
                                          num_iters=3),
             lambda o: jnp.sum(o.filtered_means)),
        Case("imap", "filter_ssm", lambda th, k: ps.imap.filter_ssm(lgssm(th), Y, optimizer=SGD, num_iters=3),
             lambda o: jnp.sum(o.filtered_means)),
        Case("imap", "filter_ssm_sequence",
             lambda th, k: ps.imap.filter_ssm_sequence(lgssm(th), Y, optimizer=SGD, num_iters=3),
             lambda o: jnp.sum(o.filtered_means)),
        Case("imap", "matched_step_size", lambda th, k: ps.imap.matched_step_size(1.0, 0.5, th, 3), lambda o: o),
        Case("gp", "log_marginal_likelihood",
             lambda th, k: ps.gp.log_marginal_likelihood(gp_model(th), GP_TIMES, Y[:, 0]), lambda o: o),
        Case("gp", "predict", lambda th, k: ps.gp.predict(gp_model(th), GP_TIMES, Y[:, 0], GP_TIMES[:4] + 0.25),
             lambda o: jnp.sum(o.mean) + jnp.sum(o.var)),
        Case("vi", "fit", lambda th, k: ps.vi.fit(lgssm(th), ps.vi.Poisson(), COUNTS, 3),
             lambda o: o.elbo + jnp.sum(o.means)),
        Case("vi", "elbo", lambda th, k: ps.vi.elbo(lgssm(th), ps.vi.Poisson(), COUNTS, SITES), lambda o: o),
        Case("vi", "update_sites", lambda th, k: ps.vi.update_sites(lgssm(th), ps.vi.Poisson(), COUNTS, SITES),
             lambda o: jnp.sum(o.nat1) + jnp.sum(o.precision)),
        Case("gpvae", "elbo", lambda th, k: ps.gpvae.elbo(k, gpvae_model(th), GP_TIMES, Y), lambda o: o,
             exact=False),
        Case("gpvae", "elbo_terms", lambda th, k: ps.gpvae.elbo_terms(k, gpvae_model(th), GP_TIMES, Y, 2),
             lambda o: o.log_normaliser, exact=False),
        Case("gpvae", "posterior", lambda th, k: ps.gpvae.posterior(gpvae_model(th), GP_TIMES, Y),
             lambda o: jnp.sum(o.means) + o.log_normaliser),
        Case("gpvae", "impute", lambda th, k: ps.gpvae.impute(gpvae_model(th), GP_TIMES, Y), jnp.sum),
        Case("gpvae", "predict", lambda th, k: ps.gpvae.predict(gpvae_model(th), GP_TIMES, Y, GP_TIMES[:3] + 0.1),
             lambda o: jnp.sum(o.means) + jnp.sum(o.variances)),
        Case("switching", "log_likelihood", lambda th, k: ps.switching.log_likelihood(msar(th), Y_HMM), lambda o: o),
        Case("switching", "filter", lambda th, k: ps.switching.filter(msar(th), Y_HMM),
             lambda o: o.log_likelihood + jnp.sum(o.filtered_probs[:, 0])),
        Case("switching", "smoother", lambda th, k: ps.switching.smoother(msar(th), Y_HMM),
             lambda o: o.log_likelihood + jnp.sum(o.smoothed_probs[:, 0])),
        Case("switching", "most_likely_regimes", lambda th, k: ps.switching.most_likely_regimes(msar(th), Y_HMM)),
        # exact enumeration needs a short sequence (2^6 mode paths)
        Case("switching", "exact", lambda th, k: ps.switching.exact(slds(th), Y[:6]),
             lambda o: o.log_likelihood + jnp.sum(o.smoothed_means)),
        Case("switching", "exact_log_likelihood", lambda th, k: ps.switching.exact_log_likelihood(slds(th), Y[:6]),
             lambda o: o),
        Case("switching", "imm", lambda th, k: ps.switching.imm(slds(th), Y),
             lambda o: o.log_likelihood + jnp.sum(o.filtered_means)),
        Case("switching", "gpb2", lambda th, k: ps.switching.gpb2(slds(th), Y),
             lambda o: o.log_likelihood + jnp.sum(o.filtered_means)),
        Case("switching", "rbpf", lambda th, k: ps.switching.rbpf(k, slds(th), Y, N), lambda o: o.log_likelihood,
             exact=False),
        Case("switching", "most_likely_modes", lambda th, k: ps.switching.most_likely_modes(slds(th), Y)),
        Case("switching", "conditional_rbpf",
             lambda th, k: ps.switching.conditional_rbpf(k, slds(th), Y, jnp.zeros(T, jnp.int32), N),
             lambda o: o.log_likelihood, exact=False),
        Case("switching", "structured_vi", lambda th, k: ps.switching.structured_vi(slds(th), Y, 3),
             lambda o: o.elbo[-1] + jnp.sum(o.means)),
        Case("switching", "laplace", lambda th, k: ps.switching.laplace(slds(th), Y, 3),
             lambda o: o.elbo[-1] + jnp.sum(o.means)),
        Case("switching", "laplace[recurrent]", lambda th, k: ps.switching.laplace(rslds(th), Y, 3),
             lambda o: o.elbo[-1] + jnp.sum(o.means)),
        Case("switching", "grass_structured_vi",
             lambda th, k: ps.switching.grass_structured_vi(grass(th), Y_GRASS, 2, edge_inputs=U_GRASS),
             lambda o: o.elbo[-1] + jnp.sum(o.means)),
        Case("switching", "grass_structured_vi[factorised]",
             lambda th, k: ps.switching.grass_structured_vi(grass(th), Y_GRASS, 2, edge_inputs=U_GRASS,
                                                            method="factorised"),
             lambda o: o.elbo[-1] + jnp.sum(o.means)),
        Case("switching", "grass_transition_objective", lambda th, k: _grass_objective(th), lambda o: o),
        Case("", "sample", lambda th, k: ps.sample(k, lgssm(th), T), lambda o: jnp.sum(o[1])),
        Case("core", "sample_sequence", lambda th, k: ps.core.sample_sequence(k, hmm(th), T),
             lambda o: jnp.sum(o[1])),
    ]
)


# ----------------------------------------------------------------------------------------------
# Coverage: the cases against the public names
# ----------------------------------------------------------------------------------------------
# Public names that are not engine functions (or that take no model to differentiate through).
NOT_ENGINES = {
    "kalman": {
        "FilterResult", "SmootherResult", "ForecastResult", "SmootherElement",  # result types
        "check_arguments",  # argument check, run outside jit by the engines
        "initial_form",  # reads concrete initial_cov to choose the filter form, before jit (None if traced)
        "mask_padding", "expand_time", "params_at",  # array helpers
        "predict", "update", "smoother_element",  # one-step kernels of the engines (traced inside every case)
        "steady_state_rtol",  # a tolerance for a dtype (a constant)
    },
    "hmm": {
        "FilterResult", "SmootherResult", "Posterior",  # result types
        "prepare", "check_arguments", "check_lengths", "check_plausibility",  # argument checks
    },
    "gaussian": {"METHODS", "FilterResult", "SmootherResult"},  # constant, result types
    "dkf": {
        "DKFResult",  # result type
        # model classes and their fitted parts (equinox modules, built by the cases, not engines)
        "DKFModel", "AbstractDiscriminativeSSM", "NadarayaWatson", "MLPRegressor", "GPRegressor",
        "KernelCovariance", "ConstantCovariance", "LinearMap", "exact_linear_gaussian",
    },
    "imap": {"IMAPResult", "NAMED"},  # result type, table of named optimisers
    "vi": {  # likelihood classes, result and site containers, argument checks, quadrature, a constant
        "AbstractLikelihood", "AbstractElementwiseLikelihood", "AbstractRowLikelihood", "Poisson", "Bernoulli",
        "StudentT", "Gamma", "Gaussian", "HeteroscedasticGaussian", "Likelihood", "Sites", "VIResult", "METHODS",
        "initial_sites", "gauss_hermite", "check_arguments", "CheckedArguments",
    },
    "gpvae": {"ELBOTerms", "Posterior", "Prediction", "check_arguments"},  # result types, argument check
    "gp": {  # kernel classes (equinox modules, built by the cases), the result type, a time check
        "Kernel", "Matern12", "Matern32", "Matern52", "SquaredExponential", "Periodic", "Cosine", "Constant",
        "Linear", "Sum", "Product", "Prediction", "check_times",
    },
    "switching": {"msar", "slds",  # submodules (their functions are walked by name)
                  "RegimeFilterResult", "RegimeSmootherResult", "ExactResult", "MixtureFilterResult", "RBPFResult",
                  "StructuredVIResult", "LaplaceResult", "ConditionalRBPFResult",  # result types
                  "check_arguments", "MAX_PATHS",  # argument check (outside jit), the enumeration limit
                  # traceable single-sequence cores on SwitchingParams, traced inside their wrappers' cases
                  "exact_params", "imm_params", "gpb2_params", "rbpf_params", "structured_vi_params",
                  "conditional_rbpf_params",
                  "laplace_params",
                  "block_tridiagonal_solve",  # array helper (traced inside the laplace cases)
                  # graph switching: submodule, result type, constants, the traceable single-sequence
                  # core (traced inside grass_structured_vi's cases)
                  "grass", "GRASSResult", "MAX_JOINT_STATES", "GRASS_METHODS", "grass_structured_vi_params"},
    "ctmc": {"Path", "FilterResult", "SmootherResult", "PathStatistics", "AmortizedEstimate"},  # result types
    "prognostics": {"RULResult"},  # result type
    "smc": {
        "common", "resampling",  # submodules of helpers
        "ParticleFilterResult", "PaRISResult", "CSMCResult", "PPGResult", "HMCSMCResult",  # result types
        "AdditiveFunctional",  # the functional's container type
        "ParticleSmootherResult",  # result type
    },
    "mcmc": {
        "MCMCResult",  # result type
        # samplers over parameters: they take a builder and priors (no model to map over) and run
        # their own compiled chains; their targets are the log-likelihood functions covered above
        "nuts", "pmmh", "particle_gibbs", "to_arviz",
    },
    "core": {
        "SSM", "AbstractLinearGaussianSSM", "AbstractDiscreteSSM", "AbstractAdditiveGaussianSSM",  # protocols
        "AbstractMarkovianGP", "AbstractRegimeSwitchingAR", "AbstractSemiMarkovSSM",
        "switching", "continuous_time",  # exact-structure submodules (their protocols are listed below)
        "SwitchingParams", "AbstractSwitchingSSM",  # structure container and protocol
        "AbstractContinuousTimeSSM", "DiscretisedSSM",  # protocol and its discretised form
        "mode_system", "step_systems", "check_switching_params",  # array helpers, argument check
        "DiscreteParams", "LinearGaussianParams",  # parameter containers
        "checks", "linalg",  # helper submodules
        "lagged_inputs",  # array helper
        "sample",  # the same function as ps.sample (covered there)
    },
    "": {  # ps itself: submodules and I/O
        "core", "models", "inference", "kalman", "learn", "save", "load", "SSM", "lagged_inputs", "hmm",
        "emissions", "datasets", "smc", "gaussian", "mcmc", "dkf", "imap", "gp", "vi", "gpvae",
        "switching", "ctmc", "prognostics",  # engine modules, walked under their own entries
        "sharding",  # device placement of batches (not an engine; checked by tests/test_sharding.py)
    },
}


def _module(name):
    return ps if name == "" else getattr(ps, name)


def public_names(mod) -> set:
    """``__all__``, or (a module without one) the functions and classes it defines itself."""
    if hasattr(mod, "__all__"):
        return set(mod.__all__)
    return {n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == mod.__name__}


@pytest.mark.parametrize("module", sorted(NOT_ENGINES))
def test_every_public_engine_is_covered(module):
    public = public_names(_module(module))
    covered = {c.name.split("[")[0] for c in CASES if c.module == module}
    missing = public - NOT_ENGINES[module] - covered
    assert not missing, f"ps.{module}: public functions with no jit/vmap/grad case: {sorted(missing)}"
    assert not covered - public, f"ps.{module}: cases for names that are not public: {sorted(covered - public)}"
    assert not (covered & NOT_ENGINES[module]), "a name is both covered and excluded"


# ----------------------------------------------------------------------------------------------
# The walk: one compiled function per case, jit(vmap over theta of (f, grad of its scalar))
# ----------------------------------------------------------------------------------------------
def _ids(c):
    return f"{c.module or 'ps'}.{c.name}"


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _check_batched(run, out):
    """Finite outputs with the parameter axis; the reversed batch gives the reversed outputs (the two
    batch members do not see each other). ``run`` is reused at the same shapes: no recompilation."""
    for a in _leaves(out):
        assert a.shape[:1] == THETAS.shape, "vmap lost the parameter axis"
        if np.issubdtype(a.dtype, np.inexact):
            assert np.all(np.isfinite(a)), "non-finite output"
    for a, b in zip(_leaves(out), _leaves(run(THETAS[::-1], KEY))):
        if np.issubdtype(a.dtype, np.inexact):
            np.testing.assert_allclose(a, b[::-1], rtol=1e-7, atol=1e-10)
        else:
            np.testing.assert_array_equal(a, b[::-1])


# Genuine bugs found by the walk are marked here (xfail, strict) until fixed; none open now.
KNOWN_FAILURES: dict = {}

# Gradient checks run in CI for one log-likelihood per engine family (they compile forward and
# backward passes); the others are marked slow (make test-all).
CI_GRAD = {("kalman", "filter"), ("hmm", "filter"), ("gaussian", "filter[ukf]"), ("smc", "particle_filter"),
           ("mcmc", "MarginalLikelihood"), ("dkf", "filter"), ("gp", "log_marginal_likelihood"),
           ("vi", "elbo"), ("ctmc", "panel_log_likelihood"), ("switching", "imm"), ("switching", "log_likelihood")}
# The heaviest compilations of the jit/vmap walk run under make test-all only.
SLOW_WALK = {("smc", "hmc_smc"), ("smc", "hmc_smc_sequence"), ("smc", "ppg_sequence")}


def _params(cases, grad=False):
    out = []
    for c in cases:
        reason = KNOWN_FAILURES.get((c.module, c.name.split("[")[0]))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        if (c.module, c.name) not in CI_GRAD if grad else (c.module, c.name) in SLOW_WALK:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(c, id=_ids(c), marks=marks))
    return out


@pytest.mark.parametrize("case", _params(CASES))
def test_jit_vmap(case):
    """jax.jit(jax.vmap(f over theta)): inside jit and batched over model parameters at once."""
    run = jax.jit(jax.vmap(case.fn, in_axes=(0, None)))
    _check_batched(run, run(THETAS, KEY))


@pytest.mark.parametrize("case", _params([c for c in CASES if c.scalar is not None], grad=True))
def test_grad(case):
    """jax.jit(jax.vmap(jax.value_and_grad(scalar o f))): finite, and for deterministic engines
    equal to a central finite difference of the same compiled function."""
    run = jax.jit(jax.vmap(jax.value_and_grad(lambda th, key: case.scalar(case.fn(th, key))), in_axes=(0, None)))
    value, grad = run(THETAS, KEY)
    _check_batched(run, (value, grad))
    if case.exact:
        eps = 1e-5
        fd = (np.asarray(run(THETAS + eps, KEY)[0]) - np.asarray(run(THETAS - eps, KEY)[0])) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Regression tests: the two failures named in issue 15 (both raised TracerBoolConversionError
# before the checks learned to skip value checks on traced arrays); they pass now.
# ----------------------------------------------------------------------------------------------
def test_regression_kalman_filter_under_jit():
    ll = jax.jit(lambda th: ps.kalman.filter(lgssm(th), Y).log_likelihood)(jnp.asarray(THETA))
    np.testing.assert_allclose(ll, ps.kalman.filter(lgssm(THETA), Y).log_likelihood, rtol=1e-10)


def test_regression_hmm_filter_under_jit():
    ll = jax.jit(lambda th: ps.hmm.filter(hmm(th), Y_HMM).log_likelihood)(jnp.asarray(THETA))
    np.testing.assert_allclose(ll, ps.hmm.filter(hmm(THETA), Y_HMM).log_likelihood, rtol=1e-10)
