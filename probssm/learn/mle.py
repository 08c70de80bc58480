"""Maximum likelihood by gradient ascent (optax). Placeholder until the learner lands."""
from __future__ import annotations


def mle(model, emissions, num_iters: int = 200, **kwargs):
    raise NotImplementedError
