"""Expectation-maximisation, dispatched on the model's declared exact structure."""
from __future__ import annotations

from probssm.core.protocol import AbstractDiscreteSSM, AbstractLinearGaussianSSM


def em(model, emissions, num_iters: int = 100, **kwargs):
    """Fit by EM; returns ``(fitted_model, history)`` with the log-likelihood per iteration.

    Linear-Gaussian models use the closed-form M-step (`probssm.learn.em_lgssm`);
    HMM-GLMs use generalised EM (`probssm.learn.hmmglm_em.fit_hmmglm`); other
    discrete-state models use Baum-Welch (`probssm.learn.baum_welch`).
    """
    if isinstance(model, AbstractLinearGaussianSSM):
        from probssm.learn.em_lgssm import em_lgssm

        return em_lgssm(model, emissions, num_iters, **kwargs)
    from probssm.models.hmmglm import HMMGLM

    if isinstance(model, HMMGLM):
        from probssm.learn.hmmglm_em import fit_hmmglm

        return fit_hmmglm(model, emissions, num_iters, **kwargs)
    if isinstance(model, AbstractDiscreteSSM):
        from probssm.learn.baum_welch import baum_welch

        return baum_welch(model, emissions, num_iters, **kwargs)
    raise ValueError(
        f"model: EM needs a declared exact structure (linear-Gaussian or discrete), got {type(model).__name__}"
    )
