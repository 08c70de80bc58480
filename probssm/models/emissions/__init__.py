"""Emission families for finite-state models (HMMs and autoregressive HMMs).

Each family is a small `equinox.Module` holding the parameters of all K states
(leading axis K). It gives:

* ``log_likelihoods(emissions, inputs=None) -> (T, K)``: log p(y_t | z_t = k).
  A missing value (NaN) contributes likelihood 1: families whose dimensions are
  conditionally independent (`DiagonalGaussian`, `Poisson`, `Bernoulli`,
  `Categorical`) drop each missing entry exactly; full-covariance families
  (`Gaussian`, `StudentT`, `AutoregressiveGaussian`) treat a row with any NaN as
  missing altogether.
* ``distribution(state, inputs=None)``: the numpyro distribution of one y_t, for the
  protocol (`ps.sample`, particle engines).
* ``m_step(emissions, weights, inputs=None, prior=None, fixed=())``: the closed-form
  weighted maximisation (MAP when a conjugate ``prior`` is given), used by Baum-Welch.
  ``weights`` is (N, K) (posterior state probabilities, zero on padding). A state
  whose total weight is zero, or whose new covariance would not be positive
  definite, keeps its previous parameters, so a fit never produces NaN.
* ``log_prior(prior)``: the log density (up to a constant) of the conjugate prior,
  so Baum-Welch can report the penalised log-likelihood.

Autoregressive dependence enters through inputs: `AutoregressiveGaussian` reads
the lagged observations y_{t-1..t-P} (built by `probssm.core.lagged_inputs`) as
its input row; given no inputs it builds them itself, with the first P rows
missing (the fit conditions on the first P observations).
"""
from probssm.models.emissions.base import (
    AbstractEmissions, BetaPrior, DirichletPrior, GammaPrior, InverseGammaPrior, InverseWishartPrior,
)
from probssm.models.emissions.gaussian import DiagonalGaussian, Gaussian
from probssm.models.emissions.student_t import StudentT
from probssm.models.emissions.autoregressive import AutoregressiveGaussian
from probssm.models.emissions.poisson import Poisson
from probssm.models.emissions.bernoulli import Bernoulli
from probssm.models.emissions.categorical import Categorical
from probssm.models.emissions.glm import AbstractGLMEmissions, BernoulliGLM, PoissonGLM

__all__ = [
    "AbstractEmissions",
    "AbstractGLMEmissions",
    "PoissonGLM",
    "BernoulliGLM",
    "Categorical",
    "Gaussian",
    "DiagonalGaussian",
    "Poisson",
    "Bernoulli",
    "StudentT",
    "AutoregressiveGaussian",
    "InverseWishartPrior",
    "InverseGammaPrior",
    "GammaPrior",
    "BetaPrior",
    "DirichletPrior",
]