"""A byte-model experiment through the CLI: a few steps train, checkpoint, and a rerun with more
steps resumes from the checkpoint instead of starting over. The hybrid MBLM has both block kinds
(MEGABYTE's Transformer global model, Mamba's local one); every byte experiment's own launch
command, with its sample, runs in tests/user/test_lm_experiments.py."""

import json

import pytest

from tests import run_module


def cli(config, workdir, steps):
  proc = run_module(
      "train", f"--config={config}", f"--workdir={workdir}", "--cpu_devices=8",
      "--config.log.progress=False", f"--config.train.steps={steps}",
      "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.log.every=1",
      "--config.eval.steps=1", "--config.eval.batch_size=8", "--config.sample.max_new_tokens=6",
      "--config.sample.num_samples=1")
  return proc.stdout


@pytest.mark.parametrize("config", ["experiments/megabyte_stdlib.py:local=mamba"])
def test_runs_and_resumes(config, tmp_path):
  first = cli(config, tmp_path, steps=2)
  assert "fresh start" in first and "done: step 2." in first and "sample:" in first
  second = cli(config, tmp_path, steps=3)
  assert "resumed from step 2" in second and "done: step 3." in second
  with open(tmp_path / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  assert [m["step"] for m in train] == [1, 2, 3]
  assert all(0 < m["loss"] < 7 for m in train)
