"""Metrics to metrics.jsonl, TensorBoard event files and a terminal progress bar (process 0)."""

import json
import os

import jax
import numpy as np
import tensorboardX
import tqdm


class Writer:
  """Writes one JSON object per logged step (with ``split``) and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress: bool):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_lines_after(path, start_step)
      self._jsonl = open(path, "a")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                          disable=not (progress and self.enabled), mininterval=1.0)

  def write(self, step: int, metrics: dict, split: str = "train"):
    """Appends a metrics line for ``step`` and logs every scalar as ``{split}/{name}``."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
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


def _drop_lines_after(path: str, step: int):
  """Keeps the complete lines of ``path`` up to ``step`` (where a resumed run continues).

  Lines past the restored checkpoint describe steps whose state was lost (a crash or kill -9
  after them), and a killed writer can leave half a line; the resumed run logs those steps again.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if line.endswith("\n") and json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        pass
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()
