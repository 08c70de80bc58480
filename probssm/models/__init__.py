"""Model families: one module each, all implementing `probssm.core.SSM`."""
from probssm.models.lgssm import LinearGaussianSSM
from probssm.models.nonlinear import NonlinearGaussianSSM

__all__ = ["LinearGaussianSSM", "NonlinearGaussianSSM"]
