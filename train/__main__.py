"""``python -m train --config=FILE[:ARG] --workdir=DIR [--config.a.b=v ...] [--cpu_devices=N]``.

Multi-process: run the same command in every process; on TPU pods, SLURM and Open MPI the
processes find each other from the environment, elsewhere add ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (``python -m train.launch`` does this for local runs).
"""

import difflib
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from parallel import distributed


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
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = distributed.define_flags(flags)
_XLA_FLAGS = flags.DEFINE_bool(
    "recommended_xla_flags", True, "On GPU/TPU, add parallel/xla_flags.py's flags to XLA_FLAGS / "
    "LIBTPU_INIT_ARGS where the environment does not set them already.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake on the command line as one sentence rather than
  ml_collections' traceback or absl's usage dump."""
  try:
    rest = flags.FLAGS(argv)
    # A config file that cannot be read parses as a placeholder that raises when first used.
    if _CONFIG.value is not None and not isinstance(_CONFIG.value, config_dict.ConfigDict):
      _load_config(flags.FLAGS["config"].serialize().split("=", 1)[1])
    return rest
  except Exception as e:  # noqa: BLE001  whatever the libraries raise, the cause is the argv
    sys.exit(f"odyssey: {command_line_error(argv, e)}")


OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$")
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              tuple: "a tuple", list: "a list"}


def command_line_error(argv: list[str], error: Exception) -> str:
  """The sentence for a command line that did not parse: a config file that does not load, an
  override naming no config field (with the closest name), a value of the wrong type, or
  absl's own message."""
  spec = _config_spec(argv)
  if spec is None:
    return _first_line(error)
  try:
    config = _load_config(spec)
  except Exception as e:  # noqa: BLE001
    return f"--config={spec} could not be loaded: {_first_line(e, last=True)}"
  for path, value in (m.groups() for a in argv if (m := OVERRIDE.match(a))):
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, config_dict.ConfigDict):
        return (f"--config.{path} names no config field: config.{'.'.join(parts[:i])} is a "
                "value, not a group.")
      if part not in node:
        where = f"config.{'.'.join(parts[:i])}" if i else "the config"
        names = [_shown(k) for k in node.keys()]
        close = difflib.get_close_matches(part, names, n=1)
        guess = (f"; did you mean --config.{'.'.join(parts[:i] + close + parts[i + 1:])}?"
                 if close else f"; it has {sorted(names)}.")
        return f"--config.{path} names no config field: {where} has no {part!r}{guess}"
      node = node[part]
    if f"--config.{path}=" in str(error):  # absl's "flag --config.a.b=v: <why>"
      kind = TYPE_NAMES.get(type(node), type(node).__name__)
      return (f"--config.{path}={value} is not valid: config.{path} takes {kind} (the config "
              f"has {node!r}).")
  return _first_line(error)


def _config_spec(argv: list[str]) -> str | None:
  """FILE[:ARG] of ``--config=FILE[:ARG]`` or ``--config FILE[:ARG]``; None when absent."""
  for i, arg in enumerate(argv):
    if re.match(r"^--?config=", arg):
      return arg.split("=", 1)[1]
    if re.match(r"^--?config$", arg) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _shown(key: str) -> str:
  """A config key as the command line spells it (``init.from_`` is ``--config.init.from``)."""
  return "from" if key == "from_" else key


def _load_config(spec: str):
  """``get_config(ARG)`` of the config file in ``FILE[:ARG]``, as config_flags loads it."""
  path, *arg = spec.split(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"there is no file {path}")
  module_spec = importlib.util.spec_from_file_location("odyssey_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def _first_line(error: Exception, last: bool = False) -> str:
  """One line of an exception's message (``last``: the final one, where a wrapped traceback
  ends), ending with a full stop."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
  line = lines[-1] if last else lines[0]
  return line if line.endswith((".", "?")) else line + "."


def out_of_memory(error: Exception) -> str | None:
  """The sentence for XLA running out of device memory (None for any other error): which part
  of the run needed how much, and the settings that lower it."""
  message = str(error)
  if not isinstance(error, RuntimeError) or not re.search(
      r"RESOURCE_EXHAUSTED|out of memory|failed to allocate", message, re.IGNORECASE):
    return None
  need = ""
  if m := re.search(r"allocat\w*\s+(\d+)\s*bytes", message):
    need = f" (one buffer of {int(m.group(1)) / 2**30:.1f} GiB did not fit on a device)"
  elif m := re.search(r"Used ([\d.]+\s*[KMGT]?i?B?) of ([\d.]+\s*[KMGT]?i?B?) (\w+)", message):
    need = f" (it needs {m.group(1)} per device; {m.group(3)} holds {m.group(2)})"
  phase, advice = _phase(error.__traceback__)
  return f"{phase} ran out of device memory{need}; {advice}."


# The innermost of these functions on the failing stack names the phase (train/loop.py fetches
# the train step's results one step late, so its failures surface in the loop body itself), and
# what lowers that phase's memory.
SHARD_STATE = "a larger mesh.fsdp (or mesh.tensor) to shard the parameters and optimizer state"
PHASES = {
    "init_sharded": ("initialising the state", f"use {SHARD_STATE}, or a smaller model"),
    "restore_newest_valid": ("restoring the state", f"use {SHARD_STATE}"),
    "samples": ("sampling", "lower sample.num_samples or sample.max_new_tokens"),
    "evaluate": ("the evaluation step", "lower eval.batch_size or train.seq_len, or use a larger "
                 "mesh.fsdp"),
    "run": ("the train step", "lower train.batch_size or train.seq_len, or use train.grad_accum, "
            "train.remat or a larger mesh.fsdp"),
}
PHASES["_run"] = PHASES["run"]  # train/loop.py's run() validates, then calls _run()


def _phase(tb) -> tuple[str, str]:
  """(phase, advice) of the innermost function of PHASES in this repository on ``tb``."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  phase = ("the run", "lower train.batch_size, eval.batch_size or train.seq_len, or use "
           "train.grad_accum, train.remat or a larger mesh.fsdp")
  while tb is not None:
    code = tb.tb_frame.f_code
    if code.co_name in PHASES and os.path.abspath(code.co_filename).startswith(repo + os.sep):
      phase = PHASES[code.co_name]
    tb = tb.tb_next
  return phase


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax and grain are chatty at INFO
  # Imported here: XLA flags and the device count must be set before JAX initialises its backends.
  from parallel import devices, xla_flags
  if _XLA_FLAGS.value and (added := xla_flags.apply()):
    print(f"odyssey: recommended XLA flags added: {' '.join(added)}", flush=True)
  from train import data, loop, validate, watchdog
  hang = _CONFIG.value.train.get("hang_timeout_s")
  if not xla_flags.platforms() and isinstance(hang, (int, float)) and hang > 0:
    # XLA:CPU aborts a stuck collective with a C++ dump; let the watchdog's sentence come first.
    os.environ["XLA_FLAGS"], _ = xla_flags.merge(os.environ.get("XLA_FLAGS", ""),
                                                 watchdog.xla_cpu_flags(hang))
  try:
    devices.set_cpu_devices(_CPU_DEVICES.value)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    plan = validate.validate(_CONFIG.value)
    validate.validate_workdir(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  try:
    loop.run(_CONFIG.value, _WORKDIR.value, plan=plan)
  except Exception as e:  # noqa: BLE001  a data file that broke mid-run, possibly wrapped by grain
    cause = e
    while cause is not None and not isinstance(cause, data.DataError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:
      sys.exit(f"odyssey: {cause}")
    if not isinstance(e, RuntimeError):
      raise
    if (sentence := out_of_memory(e)) is None:
      raise
    sys.exit(f"odyssey: {sentence}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
