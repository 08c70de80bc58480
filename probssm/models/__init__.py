"""Model families: one module each, all implementing `probssm.core.SSM`."""
from probssm.models.lgssm import LinearGaussianSSM
from probssm.models.nonlinear import NonlinearGaussianSSM
from probssm.models import emissions
from probssm.models.hmm import HMM, ARHMM
from probssm.models.stochastic_volatility import StochasticVolatility
from probssm.models import hmmglm
from probssm.models.hmmglm import HMMGLM, BernoulliGLM, PoissonGLM, sample_hmmglm, simulate_hmmglm

__all__ = ["LinearGaussianSSM", "NonlinearGaussianSSM", "emissions", "HMM", "ARHMM", "StochasticVolatility", "hmmglm", "HMMGLM",
           "PoissonGLM", "BernoulliGLM", "simulate_hmmglm", "sample_hmmglm"]
