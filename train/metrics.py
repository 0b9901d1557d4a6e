"""Metrics to metrics.jsonl, TensorBoard event files and a terminal progress bar (process 0)."""

import json
import os
import sys

import jax
import numpy as np
import tqdm


def _tensorboardx():
  """tensorboardX without torch. Where torch is installed (the parity extra), tensorboardX imports
  it to accept torch tensors, which odyssey never logs: ~1.5 s of every `python -m train`'s
  start-up. A torch that is already imported is left as it is."""
  if "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows for
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


tensorboardX = _tensorboardx()


class Writer:
  """Writes one JSON object per logged step (with ``split``) and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress: bool):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      self.marked, self.set_aside = mark_superseded(path, start_step)
      self._jsonl = open(path, "a")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                          disable=not (progress and self.enabled), mininterval=1.0)
    if self.enabled and (self.marked or self.set_aside):
      which = (f"past step {start_step}, whose state no checkpoint holds," if start_step
               else "of an earlier start that left no checkpoint")
      self.message(
          f"odyssey: metrics.jsonl: {self.marked} line(s) {which} marked \"superseded\" (kept; "
          "those steps are logged again)" + (f"; {self.set_aside} incomplete line(s) moved to "
                                             f"{PARTIAL}" if self.set_aside else "") + ".")

  def write(self, step: int, metrics: dict, split: str = "train"):
    """Appends a metrics line for ``step`` and logs every scalar as ``{split}/{name}``."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      if not isinstance(value, str):  # labels such as eval's "weights" go to metrics.jsonl only
        self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def progress(self, step: int, metrics: dict, unit: str = "tokens"):
    """Moves the bar to ``step`` and shows loss, lr and throughput (ETA comes from tqdm)."""
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                           f"{unit}/s": f"{metrics.get(f'{unit}_per_s', 0.0):,.0f}"},
                          refresh=False)

  def message(self, text: str):
    """Prints a line without breaking the progress bar."""
    if self.enabled:
      self._bar.write(text)

  def close(self):
    self._bar.close()
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


PARTIAL = "metrics.jsonl.partial"  # lines a killed writer left incomplete, kept verbatim


def mark_superseded(path: str, step: int) -> tuple[int, int]:
  """Marks the lines of ``path`` past ``step`` (where a run continues) ``"superseded": true``.

  Those lines describe steps whose state was lost (a crash or kill -9 after them, or every step
  on a fresh start, ``step`` 0); the run logs the steps again, so a reader that wants each step
  once skips marked lines. No line is deleted: values are kept as they were, and an incomplete
  or unparsable line (a writer killed mid-line) goes verbatim to ``metrics.jsonl.partial`` so
  appended lines stay valid JSON. The file is rewritten (atomically) only when something is
  marked or set aside. Returns (lines marked, lines set aside).
  """
  if not os.path.exists(path):
    return 0, 0
  with open(path) as f:
    lines = f.readlines()
  out, partial, marked = [], [], 0
  for line in lines:
    try:
      record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
      record = None
    if not isinstance(record, dict):
      if line.strip():
        partial.append(line if line.endswith("\n") else line + "\n")
      continue
    if (step == 0 or record.get("step", 0) > step) and not record.get("superseded"):
      out.append(json.dumps({**record, "superseded": True}) + "\n")
      marked += 1
    else:
      out.append(line)
  if not marked and not partial and len(out) == len(lines):
    return 0, 0
  if partial:
    with open(os.path.join(os.path.dirname(path), PARTIAL), "a") as f:
      f.writelines(partial)
      f.flush()
      os.fsync(f.fileno())
  with open(path + ".tmp", "w") as f:
    f.writelines(out)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)
  return marked, len(partial)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()
