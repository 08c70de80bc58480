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
from probssm.core import sharding

__all__ += ["sharding"]
from probssm.inference import gp  # noqa: E402
from probssm.inference import vi  # noqa: E402
from probssm.inference import gpvae  # noqa: E402

__all__ += ["gp", "vi", "gpvae"]

# Deprecated aliases of names that moved outwards (simulators to `datasets`, DKF learners to
# `learn`), bound here so that no inner module imports an outer one.
from probssm.datasets import hmmglm as _simulators  # noqa: E402
from probssm.learn import dkf as _dkf_learners  # noqa: E402

for _name in ("SimulatedHMMGLM", "simulate_hmmglm", "sample_hmmglm"):
    setattr(models.hmmglm, _name, vars(_simulators)[_name])
models.simulate_hmmglm, models.sample_hmmglm = _simulators.simulate_hmmglm, _simulators.sample_hmmglm
for _name in ("fit", "fit_dynamics", "fit_nadaraya_watson", "fit_mlp", "fit_gp", "fit_covariance"):
    setattr(inference.dkf, _name, vars(_dkf_learners)[_name])
del _name

from probssm.inference import switching, ctmc, prognostics  # noqa: E402

__all__ += ["switching", "ctmc", "prognostics"]
