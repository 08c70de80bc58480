"""Model families: one module each, all implementing `probssm.core.SSM`."""
from probssm.models.lgssm import LinearGaussianSSM
from probssm.models.nonlinear import NonlinearGaussianSSM
from probssm.models import emissions
from probssm.models.hmm import HMM, ARHMM
from probssm.models.stochastic_volatility import StochasticVolatility
from probssm.models import hmmglm
from probssm.models.hmmglm import HMMGLM
from probssm.models.emissions.glm import BernoulliGLM, PoissonGLM
from probssm.models.hmmglm_priors import GaussianPrior, NoPrior, OneHotPrior

__all__ = ["LinearGaussianSSM", "NonlinearGaussianSSM", "emissions", "HMM", "ARHMM", "StochasticVolatility", "hmmglm", "HMMGLM",
           "PoissonGLM", "BernoulliGLM", "NoPrior", "GaussianPrior", "OneHotPrior", "simulate_hmmglm", "sample_hmmglm"]  # noqa: F405
from probssm.models import dkf  # noqa: E402
from probssm.models.dkf import AbstractDiscriminativeSSM, DKFModel  # noqa: E402

__all__ += ["dkf", "AbstractDiscriminativeSSM", "DKFModel"]
from probssm.models import kernels  # noqa: E402
from probssm.models.gp import MarkovianGP  # noqa: E402

__all__ += ["kernels", "MarkovianGP"]
from probssm.models import gpvae  # noqa: E402
from probssm.models.gpvae import MarkovianGPVAE  # noqa: E402

__all__ += ["gpvae", "MarkovianGPVAE"]
# Switching systems, Markov jump processes, semi-Markov models: each module lists its names.
from probssm.models import slds, msar, mjp, hsmm, grass  # noqa: E402
from probssm.models.slds import *  # noqa: E402,F401,F403
from probssm.models.msar import *  # noqa: E402,F401,F403
from probssm.models.mjp import *  # noqa: E402,F401,F403
from probssm.models.hsmm import *  # noqa: E402,F401,F403
from probssm.models.grass import *  # noqa: E402,F401,F403

__all__ += ["slds", "msar", "mjp", "hsmm", "grass", *slds.__all__, *msar.__all__, *mjp.__all__, *hsmm.__all__,
            *grass.__all__]
# Learned transition functions (GP state-space model, neural SSM).
from probssm.models import gpssm  # noqa: E402
from probssm.models.gpssm import *  # noqa: E402,F401,F403

__all__ += ["gpssm", *gpssm.__all__]
