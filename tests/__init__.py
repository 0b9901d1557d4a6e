"""Tests mirror the package folders; tests/conftest.py sets up 8 simulated CPU devices."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compile-time flags for the unit tiers only: XLA:CPU without LLVM optimisation compiles these
# tiny programs faster (the suite is compile-bound); every comparison in the suite is between
# programs built with the same flags. (jaxlib 0.12 removed --xla_cpu_use_fusion_emitters, and XLA
# aborts on an unknown flag.) The user tier (tests/user) runs with the user's flags instead.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def module_command(module: str, *args: str) -> dict:
  """Popen/run keyword arguments for ``python -m module *args`` from the repository root.

  The environment drops the test's device-count flag (the CLI sets devices with --cpu_devices)
  and keeps the fast-compile flags.
  """
  return dict(args=[sys.executable, "-m", module, *args], cwd=REPO, text=True,
              env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS})


def run_module(module: str, *args: str, timeout: int = 400,
               ok: bool = True) -> subprocess.CompletedProcess:
  """Runs ``python -m module *args`` as a user would; ``ok`` asserts exit status 0."""
  proc = subprocess.run(**module_command(module, *args), capture_output=True, timeout=timeout)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def restore_data_position(tmp_path, it, fresh, step: int = 1):
  """Saves data iterator ``it``'s position with Orbax, as a training checkpoint does, restores it
  into the new iterator ``fresh`` and returns ``fresh``."""
  import orbax.checkpoint as ocp

  from train import data
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(step, args=ocp.args.Composite(data=data.checkpoint_args_save(it)))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == step
    manager.restore(step, args=ocp.args.Composite(data=data.checkpoint_args_restore(fresh)))
  return fresh
