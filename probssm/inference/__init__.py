"""Inference engines; each consumes the model protocol or a declared exact structure."""
from probssm.inference import kalman

__all__ = ["kalman"]
