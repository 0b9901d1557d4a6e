"""What may continue a workdir, and one run at a time in it (docs/workdir.md).

A workdir's checkpoints, metrics lines and configs are the record of work done. A run that cannot
continue them says why in one sentence before it writes anything: ``check_resumable`` compares
the config with the workdir's ``config.json``, ``locked`` holds ``workdir/lock`` for the length of
a run, so a second run of the same workdir is refused while the first is alive.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time

import jax
import numpy as np

LOCK = "lock"

# Model fields a resumed run may change: how the same function is computed and stored
# (activation checkpointing, compute and parameter dtypes: Orbax casts on restore) and MoE
# training-loss knobs. Every other model field changes parameter shapes or the function.
RESUMABLE_MODEL_FIELDS = ("remat", "dtype", "param_dtype", "moe.groups", "moe.capacity_factor",
                          "moe.balance", "moe.aux_loss_coef", "moe.z_loss_coef")
# Outside config.model, the fields that fix what the checkpointed state is: the task (its loss and
# data) and the optimizer (its state's structure).
STRUCTURAL_FIELDS = ("task", "model.name", "opt.name")


class WorkdirError(SystemExit):
  """Ends a run with one sentence, having changed nothing it should not have.

  A ``SystemExit``, so ``python -m train`` prints ``odyssey: <sentence>`` and exits with status 1
  instead of a traceback; in-process callers catch it by this type. ``sentence`` holds the text.
  """

  def __init__(self, sentence: str):
    super().__init__(f"odyssey: {sentence}")
    self.sentence = sentence


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps on disk (Orbax renames a finished save to its step number)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def check_resumable(config, workdir: str) -> None:
  """Refuses a config that cannot continue ``workdir``'s checkpoints, before anything is written.

  The sentence names the fields that differ from the workdir's ``config.json`` and the ways out.
  Without checkpoints there is nothing to continue (a run that crashed before its first save may
  be rerun with another model); without a readable ``config.json`` the restore's own shape check
  (train/checkpoint.py) still refuses a state of another structure.
  """
  from train import checkpoint  # imports the model families; keep this module light
  steps = checkpoint_steps(workdir)
  if not steps:
    return
  check_same_tokenizer(config, workdir, steps[-1])
  try:
    saved = checkpoint.load_config(workdir)
  except (ValueError, OSError):
    return
  changed = incompatible_fields(saved, config)
  if changed:
    raise WorkdirError(
        f"{workdir} holds checkpoints (newest step {steps[-1]}) of a run whose config differs in "
        f"{', '.join(changed)}, which a resumed run cannot change; nothing in it was touched; "
        f"rerun with its config, or use a new --workdir (with --config.init.from={workdir} to "
        "fine-tune from its parameters).")


def check_same_tokenizer(config, workdir: str, step: int) -> None:
  """Refuses to continue checkpoints made with another vocabulary than ``config.data.tokenizer``:
  the workdir's tokenizer file (train/tokenizer.py ``record``), else the byte tokenizer."""
  from train import tokenizer
  if config.get("task") != "lm":
    return
  try:
    theirs = tokenizer.from_workdir(workdir)
  except ValueError:  # an unreadable copy: the run's own record below replaces it
    return
  ours = tokenizer.from_config(config)
  if theirs.name != ours.name:
    held = tokenizer.workdir_file(workdir) or "the byte tokenizer"
    raise WorkdirError(
        f"{workdir} holds checkpoints (newest step {step}) of a run tokenized with {held} "
        f"({theirs.name}), but data.tokenizer={tokenizer.spec_of(config.data)!r} is {ours.name}; "
        "nothing in it was touched; rerun with that tokenizer, or use a new --workdir.")


def record_tokenizer(workdir: str, config) -> None:
  """Keeps a copy of an LM run's tokenizer file in ``workdir`` (process 0), for generation,
  export and the resume check."""
  from train import tokenizer
  if config.get("task") == "lm" and jax.process_index() == 0:
    tokenizer.record(workdir, tokenizer.from_config(config))


def incompatible_fields(saved, config) -> list[str]:
  """"group.field (theirs -> ours)" for each field that makes ``config`` unable to resume a run of
  ``saved``: the task, the model family or hyperparameters, the optimizer's kind."""
  from train import checkpoint
  changed = [f"{name} ({_get(saved, name)!r} -> {_get(config, name)!r})"
             for name in STRUCTURAL_FIELDS if _get(saved, name) != _get(config, name)]
  if _get(saved, "model.name") != _get(config, "model.name"):
    return changed  # another family: its hyperparameters do not compare
  try:
    differences = checkpoint.model_field_changes(saved, config)
  except ValueError:  # a config.json from an older odyssey the family no longer reads
    differences = _raw_model_changes(saved, config)
  return changed + [f"model.{field} ({change})" for field, change in differences
                    if field not in RESUMABLE_MODEL_FIELDS]


def _get(config, dotted: str):
  value = config
  for key in dotted.split("."):
    if key not in value:
      return None
    value = value[key]
  return value


def _raw_model_changes(saved, config) -> list[tuple[str, str]]:
  from train import checkpoint
  theirs = checkpoint.flat_dict(saved.model.to_dict())
  ours = checkpoint.flat_dict(config.model.to_dict())
  return [(k, f"{theirs.get(k)!r} -> {ours.get(k)!r}") for k in sorted(set(theirs) | set(ours))
          if k != "name" and theirs.get(k) != ours.get(k)]


def write_config(workdir: str, config) -> str | None:
  """Writes ``config.json`` for this run (process 0); an earlier, different one is kept as
  ``config.<its write time>.json``. Returns the name it was kept under, or None."""
  if jax.process_index() != 0:
    return None
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  kept = None
  if os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    if previous == text:
      return None
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y%m%d-%H%M%S")
    kept = f"config.{stamp}.json"
    n = 1
    while os.path.exists(os.path.join(workdir, kept)):
      n += 1
      kept = f"config.{stamp}.{n}.json"
    _write_atomic(os.path.join(workdir, kept), previous)
  _write_atomic(path, text)
  return kept


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ------------------------------------------------------------------ the lock


@contextlib.contextmanager
def locked(workdir: str, report=None):
  """Holds ``workdir/lock`` while the body runs; a live holder's run is refused with a sentence.

  The lock is created atomically (O_CREAT | O_EXCL) and holds the holder's host, pid, start time
  and argv. A lock whose holder is dead (same host, pid gone or reused) is taken over with a note.
  One multi-process job holds one lock: process 0 takes it and every process learns the outcome.
  Under the lock, incomplete checkpoint saves an interrupted run left are removed (with a note).
  The lock is removed when the body ends, also by an exception or a SIGTERM stop (the loop turns
  SIGTERM into a normal return); after a kill -9 the next run finds it stale.
  """
  report = report or (lambda m: print(f"odyssey: {m}", flush=True))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  mine, refusal = None, None
  if jax.process_index() == 0:
    try:
      mine = _acquire(path, report)
      from train import checkpoint
      removed = checkpoint.remove_interrupted_saves(workdir)
      if removed:
        report(f"removed {len(removed)} incomplete checkpoint save(s) an interrupted run left in "
               f"{os.path.join(workdir, 'checkpoints')} (never finished, so never restorable): "
               f"{', '.join(removed)}.")
    except WorkdirError as e:
      refusal = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))  # process 0's outcome
    if not int(ok) and refusal is None:
      refusal = WorkdirError(f"process 0 could not take {path}: {describe_holder(path)}")
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if mine is not None:
      _release(path, mine)


def _acquire(path: str, report) -> dict:
  mine = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "argv": list(sys.argv)}
  for _ in range(5):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_holder(path)
      if holder is None:  # removed meanwhile: try again
        continue
      if not _is_stale(holder):
        workdir = os.path.dirname(path)
        raise WorkdirError(
            f"{workdir} is in use by another run ({_describe(holder)}); nothing in it was "
            "touched; wait for that run to end or use another --workdir, and if that run is "
            f"gone (e.g. its machine died), delete {path} and rerun.")
      if _remove_if_same(path, holder):
        report(f"took over the stale lock {path} of a run that is no longer alive "
               f"({_describe(holder)}).")
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(mine, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    return mine
  raise WorkdirError(f"could not take the lock {path}: other runs keep creating and removing it; "
                     "make sure only one run uses this workdir.")


def _release(path: str, mine: dict) -> None:
  """Removes the lock if it is still ours (a run that judged us dead may have taken it over)."""
  _remove_if_same(path, mine)


def _remove_if_same(path: str, holder: dict) -> bool:
  """Removes ``path`` if it still names ``holder``; a takeover guard file serialises takeovers."""
  guard = path + ".takeover"
  try:
    fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    with contextlib.suppress(OSError):
      if time.time() - os.path.getmtime(guard) > 60:  # left by a run killed mid-takeover
        os.remove(guard)
    time.sleep(0.1)
    return False
  try:
    current = _read_holder(path)
    if current is not None and _same(current, holder):
      os.remove(path)
      return True
    return False
  finally:
    os.close(fd)
    os.remove(guard)


def _same(a: dict, b: dict) -> bool:
  return all(a.get(k) == b.get(k) for k in ("host", "pid", "process_start", "started"))


def _read_holder(path: str) -> dict | None:
  """The lock's JSON, or None if the file is gone; an unreadable lock counts as held by nobody
  known (described as such), after a moment for a holder that is still writing it."""
  for _ in range(10):
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      if isinstance(holder, dict):
        return holder
    except ValueError:
      pass
    time.sleep(0.1)
  return {"unreadable": text[:200]}


def _is_stale(holder: dict) -> bool:
  """True when the holder ran on this host and its process is gone (or its pid was reused)."""
  if "unreadable" in holder or holder.get("host") != socket.gethostname():
    return False  # another machine's process cannot be checked from here
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  started = holder.get("process_start")
  return started is not None and _process_start(pid) not in (None, started)


def _process_start(pid: int | None = None) -> int | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _describe(holder: dict) -> str:
  if "unreadable" in holder:
    return f"its lock file is unreadable: {holder['unreadable']!r}"
  argv = " ".join(holder.get("argv") or [])
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}"
          + (f": {argv}" if argv else ""))


def describe_holder(path: str) -> str:
  """Who holds the lock at ``path``, in words (for messages of processes other than 0)."""
  holder = _read_holder(path)
  return "nobody holds it now" if holder is None else _describe(holder)
