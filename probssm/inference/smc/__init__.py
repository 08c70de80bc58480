"""Particle engines: filters, resampling, backward simulation, PaRIS, conditional SMC and PPG.

    import probssm as ps
    pf = ps.smc.particle_filter(key, model, y, 1000)
    est = ps.smc.paris(key, model, y, functional, 1000)
"""
from probssm.inference.smc import resampling
from probssm.inference.smc.filter import ParticleFilterResult, particle_filter

__all__ = ["resampling", "ParticleFilterResult", "particle_filter"]
from probssm.inference.smc.backward import backward_sample
from probssm.inference.smc.paris import AdditiveFunctional, PaRISResult, paris

__all__ += ["backward_sample", "AdditiveFunctional", "PaRISResult", "paris"]
from probssm.inference.smc.csmc import CSMCResult, conditional_smc
from probssm.inference.smc.ppg import PPGResult, ppg

__all__ += ["CSMCResult", "conditional_smc", "PPGResult", "ppg"]
from probssm.inference.smc.hmc_smc import HMCSMCResult, hmc_smc

__all__ += ["HMCSMCResult", "hmc_smc"]
