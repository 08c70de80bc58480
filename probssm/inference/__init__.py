"""Inference engines; each consumes the model protocol or a declared exact structure."""
from probssm.inference import kalman
from probssm.inference import hmm
from probssm.inference import smc

__all__ = ["kalman", "hmm", "smc"]
from probssm.inference import gaussian

__all__ += ["gaussian"]
