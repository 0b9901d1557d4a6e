"""Through the entry function: seq=4 (ulysses, ring) reproduces the seq=1 loss trajectory."""

import json
import os

import numpy as np
import pytest

from configs import lm
from train import loop

STEPS = 10


def trajectory(tmp_path, name, **mesh_and_strategy):
  c = lm.get_config("size=test")
  strategy = mesh_and_strategy.pop("seq_strategy", "auto")
  c.mesh.update(data=-1, fsdp=1, tensor=1, expert=1, **mesh_and_strategy)
  c.parallel.seq_strategy = strategy
  c.train.update(steps=STEPS, batch_size=8, seq_len=32)
  c.opt.update(warmup_steps=2)
  c.ckpt.update(every=STEPS, keep=1)
  c.log.update(every=1, progress=False)
  c.eval.update(every=STEPS, steps=1, batch_size=8)
  c.sample.update(max_new_tokens=0)
  workdir = str(tmp_path / name)
  loop.run(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return np.array([m["loss"] for m in lines if m["split"] == "train"])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  return trajectory(tmp_path_factory.mktemp("seq1"), "seq1", seq=1)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_seq4_matches_seq1_for_ten_steps(baseline, tmp_path, strategy):
  got = trajectory(tmp_path, strategy, seq=4, seq_strategy=strategy)
  assert len(got) == len(baseline) == STEPS
  assert baseline[-1] < baseline[0]  # it is training, not just agreeing on a constant
  np.testing.assert_allclose(got, baseline, rtol=2e-5)
