"""Tests run in float64 (exact engines are compared to oracles at 1e-8); float32 runs pass
float32 arrays explicitly."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))
