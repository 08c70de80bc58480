"""Model families: one module each, all implementing `probssm.core.SSM`."""
from probssm.models.lgssm import LinearGaussianSSM

__all__ = ["LinearGaussianSSM"]
