"""probssm: probabilistic state-space models in JAX.

    import probssm as ps
    model = ps.models.LinearGaussianSSM(...)
    ps.kalman.smoother(model, y)
"""
from probssm import core, models, inference
from probssm.core import SSM, sample, lagged_inputs
from probssm.inference import kalman
from probssm.inference import hmm
from probssm.inference import smc
from probssm.models import emissions
from probssm import datasets
from probssm import learn
from probssm.io import load, save

__version__ = "0.1.0"

__all__ = ["core", "models", "inference", "kalman", "learn", "save", "load", "SSM", "sample", "lagged_inputs", "hmm", "emissions", "datasets", "smc"]
from probssm.inference import gaussian

__all__ += ["gaussian"]
from probssm.learn import mcmc

__all__ += ["mcmc"]
from probssm.inference import dkf

__all__ += ["dkf"]
from probssm.inference import imap

__all__ += ["imap"]
