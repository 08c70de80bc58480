"""Capability: a model whose transition density is bounded.

A model that subclasses `AbstractBoundedTransitionSSM` declares
``transition_log_bound(t, inputs)`` >= log p(z_t | z_{t-1}) for all states. The
particle engines (backward simulation, PaRIS, conditional SMC with PPG) then draw
backward indices by accept-reject in O(N) expected time per step instead of
O(N^2). Declared by subclassing, never detected with ``hasattr``.
"""
from __future__ import annotations

import abc

from probssm.core.protocol import SSM


class AbstractBoundedTransitionSSM(SSM):
    """An `SSM` that declares an upper bound on its transition density."""

    @abc.abstractmethod
    def transition_log_bound(self, t, inputs=None):
        """A scalar >= sup over (z_prev, z) of log p(z_t = z | z_{t-1} = z_prev)."""
