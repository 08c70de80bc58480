"""Switching systems: Markov-switching autoregressions (`msar`) and switching linear
dynamical systems (`slds`). Each submodule lists its public names in ``__all__``."""
from probssm.inference.switching import msar, slds, laplace
from probssm.inference.switching.msar import *  # noqa: F401,F403
from probssm.inference.switching.slds import *  # noqa: F401,F403
from probssm.inference.switching.laplace import *  # noqa: F401,F403

__all__ = ["msar", "slds", "laplace", *msar.__all__, *slds.__all__, *laplace.__all__]
