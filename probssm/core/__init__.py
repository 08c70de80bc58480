"""Core: the model protocol, exact-structure declarations, results, checks, helpers.

Nothing here imports the rest of probssm.
"""
from probssm.core.protocol import (
    SSM,
    AbstractLinearGaussianSSM,
    AbstractDiscreteSSM,
    AbstractAdditiveGaussianSSM,
    AbstractMarkovianGP,
    AbstractRegimeSwitchingAR,
    AbstractSemiMarkovSSM,
    DiscreteParams,
    LinearGaussianParams,
    sample,
    sample_sequence,
)
from probssm.core.lags import lagged_inputs
from probssm.core import checks, linalg

__all__ = [
    "SSM",
    "AbstractLinearGaussianSSM",
    "AbstractDiscreteSSM",
    "AbstractAdditiveGaussianSSM",
    "AbstractMarkovianGP",
    "AbstractRegimeSwitchingAR",
    "AbstractSemiMarkovSSM",
    "DiscreteParams",
    "LinearGaussianParams",
    "sample",
    "sample_sequence",
    "lagged_inputs",
    "checks",
    "linalg",
]
# Exact structures of switching and continuous-time models: each module lists its names.
from probssm.core import switching, continuous_time  # noqa: E402
from probssm.core.switching import *  # noqa: E402,F401,F403
from probssm.core.continuous_time import *  # noqa: E402,F401,F403

__all__ += ["switching", "continuous_time", *switching.__all__, *continuous_time.__all__]
