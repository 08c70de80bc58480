"""Learning: every learner returns ``(fitted_model, history)`` and leaves its input untouched."""
from probssm.learn.em import em
from probssm.learn.mle import mle

__all__ = ["em", "mle"]
