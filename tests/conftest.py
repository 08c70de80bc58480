"""Tests run in float64 (exact engines are compared to oracles at 1e-8); float32 runs pass
float32 arrays explicitly."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

# Most of the suite's time is XLA compilation, and on the CPU most of that is LLVM optimising the
# generated code (perf: 63% of a particle filter's compile). Two flags cut it: XLA's classic CPU
# emitters instead of its fusion emitters (a bootstrap particle filter compiles in 2.4-2.9 s
# instead of 3.4-4.5 s), and LLVM optimisation level 1 instead of 3, which speeds up the particle
# engines' compilation by about a third and leaves the others as they were (test_switching_pg,
# test_hmc_smc and test_conformance_particles on one core: 236-240 s at level 3, 163 s at level 1;
# test_composability and test_gp: no change). Level 0 compiles faster still, but its code runs
# about 6 times slower and a vmapped program no longer agrees with the plain one to 1e-10, which
# the suite checks. Results agree to the suite's tolerances (jaxlib 0.10.2). XLA aborts on a flag
# it does not know, so the flags are set only on the jaxlib minor version they were measured on.
# PROBSSM_TEST_FAST_COMPILE=0 turns them off.
def _jaxlib_minor_version():
    from importlib.metadata import version

    return tuple(int(p) for p in version("jaxlib").split(".")[:2])


if os.environ.get("PROBSSM_TEST_FAST_COMPILE", "1") != "0" and _jaxlib_minor_version() == (0, 10):
    if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
    if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"

# A persistent compilation cache (keyed by the compiled program, the compile options and the
# backend, so a hit is the same executable) lets repeated runs, the xdist workers, the sharding
# subprocesses and the tutorial kernels reuse what was compiled before. Set through the
# environment so those child processes inherit it (the XLA flags above too);
# PROBSSM_TEST_XLA_CACHE=0 turns it off, PROBSSM_TEST_XLA_CACHE=<dir> moves it.
_xla_cache = os.environ.get("PROBSSM_TEST_XLA_CACHE",
                            os.path.join(os.path.expanduser("~"), ".cache", "probssm-tests-xla"))
if _xla_cache != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _xla_cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))

# Hypothesis profiles (tests/test_properties.py): "ci" (default) is small and derandomised so CI
# is reproducible; "all" (make test-all: HYPOTHESIS_PROFILE=all) tries many more inputs.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the other test files run without it
    pass
else:
    settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("all", max_examples=200, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Every compiled XLA executable holds a few memory mappings, and jit caches keep them alive for the
# life of the worker. Over the whole suite one worker compiles thousands of functions and reaches the
# kernel's vm.max_map_count (65530), and XLA then aborts or segfaults in the middle of a compile. The
# tests share compiled functions within a file, never across files, so the caches are emptied at
# each file boundary.
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or nextitem.module is not item.module:
        import gc

        if os.environ.get("PROBSSM_MAPS_LOG"):
            with open("/proc/self/maps") as f, open(os.environ["PROBSSM_MAPS_LOG"], "a") as log:
                log.write(f"{item.module.__name__} {len(f.readlines())}\n")
        jax.clear_caches()
        gc.collect()
