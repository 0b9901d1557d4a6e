"""Tests mirror the package folders; tests/conftest.py sets up 8 simulated CPU devices."""

import os

# Compile-time flags for the test suite only: XLA:CPU without LLVM optimisation and with the
# older fusion emitters compiles these tiny programs about 2x faster (the suite is compile-bound);
# every comparison in the suite is between programs built with the same flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def cli_env() -> dict:
  """Environment for a `python -m train` subprocess: the test's environment without the device
  count flag (the CLI sets devices through --cpu_devices), keeping the fast-compile flags."""
  return {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS}
