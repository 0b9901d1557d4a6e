"""Tests mirror the package folders; tests/conftest.py sets up 8 simulated CPU devices."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compile-time flags for the test suite only: XLA:CPU without LLVM optimisation and with the
# older fusion emitters compiles these tiny programs about 2x faster (the suite is compile-bound);
# every comparison in the suite is between programs built with the same flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def run_module(module: str, *args: str, timeout: int = 400,
               ok: bool = True) -> subprocess.CompletedProcess:
  """Runs ``python -m module *args`` from the repository root, as a user would.

  The environment drops the test's device-count flag (the CLI sets devices with --cpu_devices)
  and keeps the fast-compile flags. ``ok`` asserts exit status 0, showing stderr's tail if not.
  """
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout,
                        env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS})
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
