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
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()
