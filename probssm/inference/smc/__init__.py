"""Particle engines: filters, resampling, backward simulation, PaRIS, conditional SMC and PPG.

    import probssm as ps
    pf = ps.smc.particle_filter(key, model, y, 1000)
    est = ps.smc.paris(key, model, y, functional, 1000)
    sm = ps.smc.smoother(key, model, y, 1000, method="ffbsi")     # one-call particle smoother

Every engine takes one sequence (T, D), a batch (B, T, D) or a list of (T_b, D) arrays
(with ``lengths=`` for a padded batch), and has a public traceable single-sequence core
(``*_sequence``) for use inside your own jit / vmap / grad.
"""
from probssm.inference.smc import common, resampling
from probssm.inference.smc.filter import ParticleFilterResult, particle_filter, particle_filter_sequence

__all__ = ["common", "resampling", "ParticleFilterResult", "particle_filter", "particle_filter_sequence"]
from probssm.inference.smc.backward import backward_sample, backward_sample_sequence
from probssm.inference.smc.paris import AdditiveFunctional, PaRISResult, paris, paris_sequence

__all__ += ["backward_sample", "backward_sample_sequence", "AdditiveFunctional", "PaRISResult", "paris",
            "paris_sequence"]
from probssm.inference.smc.csmc import CSMCResult, conditional_smc, conditional_smc_sequence
from probssm.inference.smc.ppg import PPGResult, ppg, ppg_sequence

__all__ += ["CSMCResult", "conditional_smc", "conditional_smc_sequence", "PPGResult", "ppg", "ppg_sequence"]
from probssm.inference.smc.hmc_smc import HMCSMCResult, hmc_smc, hmc_smc_sequence

__all__ += ["HMCSMCResult", "hmc_smc", "hmc_smc_sequence"]
from probssm.inference.smc.smoother import ParticleSmootherResult, smoother, smoother_sequence

__all__ += ["ParticleSmootherResult", "smoother", "smoother_sequence"]
