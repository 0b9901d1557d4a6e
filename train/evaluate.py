"""``python -m train.evaluate --workdir=DIR --tasks=FILE.jsonl [--tasks=...] [--limit=N]
[--mesh=...] [--step=N] [--batch_size=32] [--max_len=N]``.

Scores the language model of a trained (``python -m train``) or converted
(``python -m train.convert``) workdir on multiple-choice tasks (train/multiple_choice.py): each
``--tasks`` is a jsonl file of ``{"context", "choices", "gold"}`` lines or the built-in
``stdlib_next_line``. Prints one line per task, ``TASK: N questions, acc A, acc_norm B``, and
appends one JSON line per task (step, task, metrics) to ``DIR/evals.jsonl``, which keeps every
earlier result. The model is loaded and sharded as ``train.generate`` loads it: the workdir's
tokenizer and mesh (``--mesh=data=2,fsdp=4`` chooses another), simulated CPU devices as that mesh
needs on a CPU-only machine.

Example (the workdir of ``make run``)::

  python -m train.evaluate --workdir=workdirs/lm_stdlib --tasks=stdlib_next_line
"""

import datetime
import json
import os
import sys

from absl import app, flags, logging

RESULTS = "evals.jsonl"


def prepare(workdir: str, specs: list[str], *, limit: int | None, batch_size: int):
  """(config, tokenizer, {task: questions}) after every check that needs no compile, each failing
  with one sentence: the flags, the workdir (config, task, checkpoint), the task files."""
  from train import generate
  from train import multiple_choice as mc
  from train import tokenizer
  if not specs:
    raise ValueError("give at least one --tasks=FILE.jsonl (or a built-in task: "
                     f"{', '.join(mc.BUILTIN)}).")
  if limit is not None and limit < 1:
    raise ValueError(f"--limit={limit} must be at least 1.")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be at least 1.")
  config = generate.lm_workdir_config(workdir, purpose="evaluation", verb="evaluate")
  tasks = {spec: mc.load_task(spec, config.data, limit) for spec in dict.fromkeys(specs)}
  return config, tokenizer.from_workdir(workdir), tasks


def trained_length(workdir: str, config, model, max_len: int | None) -> int:
  """The longest row (context + choice) to score: ``max_len`` when given (at most the model's
  own), else the length the model was trained at: ``train.seq_len`` of a run of python -m train,
  the model's max_len for a workdir imported by train.convert (trained elsewhere)."""
  from train import checkpoint
  from train import multiple_choice as mc
  limit = mc.input_limit(model)
  if max_len is not None:
    if not 1 <= max_len <= limit:
      raise ValueError(f"--max_len={max_len} must be in [1, {limit}] (the model's max_len).")
    return max_len
  if os.path.exists(os.path.join(workdir, checkpoint.CONVERTED_MARKER)):
    return limit
  return min(int(config.train.seq_len), limit)


def run(workdir: str, specs: list[str], *, limit: int | None = None, batch_size: int = 32,
        mesh: str | None = None, step: int | None = None,
        max_len: int | None = None) -> list[dict]:
  """One result per task: {"step", "task", "questions", "acc", "acc_norm"}, also appended to
  ``workdir/evals.jsonl`` (by process 0). Rows are cut to ``trained_length``."""
  import jax
  from parallel import mesh as parallel_mesh
  from train import generate, watchdog
  from train import multiple_choice as mc
  config, tok, tasks = prepare(workdir, specs, limit=limit, batch_size=batch_size)
  loaded = generate.load(workdir, config, mesh=mesh, step=step)
  length = trained_length(workdir, config, loaded.model, max_len)
  rows = -(-batch_size // loaded.data_parallel) * loaded.data_parallel  # split over batch axes
  print(f"odyssey: evaluating step {loaded.step} on mesh {parallel_mesh._fmt(loaded.sizes)} of "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, {rows} rows a batch of at "
        f"most {length} tokens.", file=sys.stderr, flush=True)
  results = []
  watchdog.start(config.train.get("hang_timeout_s", 600.0))
  with loaded.context(), watchdog.phase("eval"):
    for spec, questions in tasks.items():
      metrics = mc.evaluate(loaded.model, loaded.params, tok, questions, batch_size=rows,
                            max_len=length, sharding=loaded.rows_sharding(), where=f"{spec}: ")
      results.append({"step": loaded.step, "task": spec, **metrics})
  watchdog.stop()
  if jax.process_index() == 0:
    record(workdir, results)
  return results


def record(workdir: str, results: list[dict]) -> str:
  """Appends ``results`` to ``workdir/evals.jsonl`` (one line each, with the time); returns it."""
  path = os.path.join(workdir, RESULTS)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  with open(path, "a") as f:
    for result in results:
      f.write(json.dumps({**result, "time": now}) + "\n")
  return path


def line(result: dict) -> str:
  """``TASK: N questions, acc A, acc_norm B``."""
  return (f"{result['task']}: {result['questions']} questions, acc {result['acc']:.4f}, "
          f"acc_norm {result['acc_norm']:.4f}")


def define_flags():
  """The CLI's flags, defined only when run as a program."""
  global _WORKDIR, _TASKS, _LIMIT, _BATCH, _MAX_LEN, _MESH, _STEP, _CPU_DEVICES, _PROCESSES
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained or converted LM workdir.")
  _TASKS = flags.DEFINE_multi_string(
      "tasks", [], "A jsonl file of {\"context\", \"choices\", \"gold\"} lines, or the built-in "
      "stdlib_next_line; repeat for several.")
  _LIMIT = flags.DEFINE_integer("limit", None, "Score only the first N questions of each task.")
  _BATCH = flags.DEFINE_integer("batch_size", 32, "Rows (question, choice) per forward pass; "
                                "rounded up to a multiple of the mesh's batch-parallel size.")
  _MAX_LEN = flags.DEFINE_integer(
      "max_len", None, "Longest row (context + choice) in tokens; a longer context loses its "
      "oldest tokens. Default: the length the model was trained at (train.seq_len; an imported "
      "model's max_len).")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
  _CPU_DEVICES = flags.DEFINE_integer(
      "cpu_devices", None, "Simulate this many CPU devices (default on a CPU-only machine: as "
      "many as the mesh needs).")
  from parallel import distributed
  _PROCESSES = distributed.define_flags(flags)
  _MESH = flags.DEFINE_string(
      "mesh", None, "Mesh to shard the model over, e.g. data=2,fsdp=4 (unnamed axes 1; one may "
      "be -1); default: the workdir's training mesh.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # Orbax warns about the items it does not read
  from train import generate
  try:
    generate.start_devices(_WORKDIR.value, _MESH.value, _CPU_DEVICES.value,
                           tuple(p.value for p in _PROCESSES))
    results = run(_WORKDIR.value, _TASKS.value, limit=_LIMIT.value, batch_size=_BATCH.value,
                  mesh=_MESH.value, step=_STEP.value, max_len=_MAX_LEN.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  import jax
  if jax.process_index() == 0:
    for result in results:
      print(line(result), flush=True)
    print(f"odyssey: appended to {os.path.join(_WORKDIR.value, RESULTS)} (step "
          f"{results[0]['step']}).", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
