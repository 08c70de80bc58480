"""Loaders for the real data the package ships or reads from disk (edge of the package:
nothing inside probssm imports this)."""
from probssm.datasets.cmapss import CMAPSS, OperatingRegimes, load_cmapss, operating_regimes, split_units
from probssm.datasets.hmmglm import SimulatedHMMGLM, sample_hmmglm, simulate_hmmglm
from probssm.datasets.particles import InteractingParticles, particle_pairs, simulate_interacting_particles
from probssm.datasets.sysid import SYSID_NAMES, SysID, load_sysid

__all__ = ["CMAPSS", "OperatingRegimes", "load_cmapss", "operating_regimes", "split_units", "SimulatedHMMGLM", "sample_hmmglm", "simulate_hmmglm",
           "InteractingParticles", "particle_pairs", "simulate_interacting_particles", "SysID", "load_sysid", "SYSID_NAMES"]
