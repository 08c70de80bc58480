"""Learning: every learner returns ``(fitted_model, history)`` and leaves its input untouched."""
from probssm.learn.em import em, register_em
from probssm.learn.mle import mle
from probssm.learn.baum_welch import HMMPrior, baum_welch
from probssm.learn.hmmglm_em import (fit_hmmglm, hmmglm_log_likelihood, init_hmmglm, prune_links,
                                     threshold_couplings)

__all__ = ["em", "register_em", "mle", "baum_welch", "HMMPrior", "fit_hmmglm", "hmmglm_log_likelihood", "init_hmmglm", "prune_links",
           "threshold_couplings"]
from probssm.learn.score import markov_score_climbing

__all__ += ["markov_score_climbing"]
from probssm.learn import dkf  # noqa: E402
from probssm.learn.dkf import fit_dkf  # noqa: E402

__all__ += ["dkf", "fit_dkf"]
from probssm.learn.vi import vi  # noqa: E402

__all__ += ["vi"]
from probssm.learn import gpvae  # noqa: E402

__all__ += ["gpvae"]
# Learners that register themselves with `em` (switching, continuous-time, semi-Markov).
from probssm.learn import em_slds, em_ctmc, em_hsmm, em_grass  # noqa: E402,F401
from probssm.learn.em_slds import *  # noqa: E402,F401,F403
from probssm.learn.em_ctmc import *  # noqa: E402,F401,F403
from probssm.learn.em_hsmm import *  # noqa: E402,F401,F403
from probssm.learn.em_grass import *  # noqa: E402,F401,F403
from probssm.learn.init_slds import init_slds  # noqa: E402

__all__ += [*em_slds.__all__, *em_ctmc.__all__, *em_hsmm.__all__, *em_grass.__all__, "init_slds"]
# Stochastic-gradient HMC (the sampler of free-form variational inference for GPSSMs).
from probssm.learn import sghmc  # noqa: E402
from probssm.learn.sghmc import *  # noqa: E402,F401,F403

__all__ += ["sghmc", *sghmc.__all__]
# Free-form variational inference (SGHMC over U and x) and the PRSSM baseline for sparse-GP SSMs.
from probssm.learn import gpssm_vi  # noqa: E402
from probssm.learn.gpssm_vi import *  # noqa: E402,F401,F403

__all__ += ["gpssm_vi", *gpssm_vi.__all__]
