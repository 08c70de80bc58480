"""Inference engines; each consumes the model protocol or a declared exact structure."""
from probssm.inference import kalman
from probssm.inference import hmm
from probssm.inference import smc

__all__ = ["kalman", "hmm", "smc"]
from probssm.inference import gaussian

__all__ += ["gaussian"]
from probssm.inference import dkf

__all__ += ["dkf"]
from probssm.inference import imap

__all__ += ["imap"]
from probssm.inference import gp  # noqa: E402
from probssm.inference import vi  # noqa: E402
from probssm.inference import gpvae  # noqa: E402

__all__ += ["gp", "vi", "gpvae"]
