"""``python -m train --config=FILE[:ARG] --workdir=DIR [--config.a.b=v ...] [--cpu_devices=N]``.

Multi-process: run the same command in every process; on TPU pods, SLURM and Open MPI the
processes find each other from the environment, elsewhere add ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (``python -m train.launch`` does this for local runs).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags


def config_aliases(argv: list[str]) -> list[str]:
  """``--config.init.from`` names the field ``init.from_`` (``from`` is a Python keyword, which
  ml_collections' override paths cannot hold)."""
  out = []
  for arg in argv:
    if arg == "--config.init.from" or arg.startswith("--config.init.from="):
      arg = "--config.init.from_" + arg[len("--config.init.from"):]
    out.append(arg)
  return out


# Before the config flag is defined: config_flags reads the overrides from sys.argv right then.
sys.argv = config_aliases(sys.argv)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally FILE:ARG (e.g. experiments/lm_stdlib.py:"
    "size=tiny); override fields with --config.group.field=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, metrics and samples; rerunning resumes from it.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Simulate this many CPU devices; an XLA_FLAGS device count from the "
    "environment is respected and must agree.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordination service, for a "
    "multi-process run the environment does not describe (parallel/distributed.py).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_XLA_FLAGS = flags.DEFINE_bool(
    "recommended_xla_flags", True, "On GPU/TPU, add parallel/xla_flags.py's flags to XLA_FLAGS / "
    "LIBTPU_INIT_ARGS where the environment does not set them already.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax and grain are chatty at INFO
  # Imported here: XLA flags and the device count must be set before JAX initialises its backends.
  from parallel import devices, distributed, xla_flags
  if _XLA_FLAGS.value and (added := xla_flags.apply()):
    print(f"odyssey: recommended XLA flags added: {' '.join(added)}", flush=True)
  from train import loop, validate
  try:
    devices.set_cpu_devices(_CPU_DEVICES.value)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    validate.validate(_CONFIG.value)
    validate.validate_workdir(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  loop.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
