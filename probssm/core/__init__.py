"""Core: the model protocol, exact-structure declarations, results, checks, helpers.

Nothing here imports the rest of probssm.
"""
from probssm.core.protocol import (
    SSM,
    AbstractLinearGaussianSSM,
    AbstractDiscreteSSM,
    AbstractAdditiveGaussianSSM,
    AbstractMarkovianGP,
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
    "DiscreteParams",
    "LinearGaussianParams",
    "sample",
    "sample_sequence",
    "lagged_inputs",
    "checks",
    "linalg",
]
