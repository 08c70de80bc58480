"""Switching systems: Markov-switching autoregressions (`msar`) and switching linear
dynamical systems (`slds`, `laplace`). Each submodule lists its public names in ``__all__``."""
from probssm.inference.switching import msar, slds, laplace, grass

# listed before the star imports: the function `laplace` then replaces the submodule's name here
__all__ = ["msar", "slds", "grass", *msar.__all__, *slds.__all__, *laplace.__all__, *grass.__all__]

from probssm.inference.switching.msar import *  # noqa: F401,F403,E402
from probssm.inference.switching.slds import *  # noqa: F401,F403,E402
from probssm.inference.switching.laplace import *  # noqa: F401,F403,E402
from probssm.inference.switching.grass import *  # noqa: F401,F403,E402
