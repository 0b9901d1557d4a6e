"""End to end through the entry function: train, stop half way, resume, compare step for step."""

import glob
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import lm
from train import loop

N = 6


def small_config():
  c = lm.get_config("size=test")
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(steps=N, batch_size=8, seq_len=32)
  c.opt.update(warmup_steps=2)
  c.ckpt.update(every=2, keep=10)
  c.log.update(every=1, progress=False)
  c.eval.update(every=3, steps=2, batch_size=8)
  c.sample.update(max_new_tokens=0)
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"}


def data_position(workdir, step):
  (path,) = glob.glob(os.path.join(workdir, "checkpoints", str(step), "data", "*.json"))
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  straight = str(tmp_path_factory.mktemp("straight"))
  resumed = str(tmp_path_factory.mktemp("resumed"))
  # The straight run also scores a multiple-choice task at each evaluation (eval.tasks).
  tasks = tmp_path_factory.mktemp("tasks") / "hand.jsonl"
  tasks.write_text('{"context": "def f(x):\\n    return", "choices": [" x", " 1 +"], "gold": 0}\n'
                   '{"context": "import", "choices": [" os", "\\n\\n", " sys"], "gold": 2}\n')
  config = small_config()
  config.eval.tasks = str(tasks)
  full = loop.run(config, straight)
  first = loop.run(small_config(), resumed, should_stop=lambda step: step == N // 2)
  second = loop.run(small_config(), resumed)
  return dict(straight=straight, resumed=resumed, full=full, first=first, second=second)


def test_resume_reproduces_the_uninterrupted_run_step_for_step(runs):
  a, b = train_losses(runs["straight"]), train_losses(runs["resumed"])
  assert sorted(a) == sorted(b) == list(range(1, N + 1))
  for step in range(1, N + 1):
    assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
  assert runs["first"]["final_step"] == N // 2
  assert runs["second"]["start_step"] == N // 2 and runs["second"]["final_step"] == N


def test_data_iterator_neither_repeats_nor_skips(runs):
  # The grain position saved with the state counts batches: exactly one per completed step, in
  # the stopped-and-resumed run as in the straight one.
  for step in (2, N // 2, 4, N):
    run = "resumed" if step == N // 2 else "straight"
    assert data_position(runs[run], step)["next_index"] == step
  for step in (2, 4, N):
    assert data_position(runs["straight"], step) == data_position(runs["resumed"], step)


def test_loss_falls_and_metrics_lines_follow_the_contract(runs):
  lines = read_metrics(runs["straight"])
  train = [m for m in lines if m["split"] == "train"]
  for m in train:
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "model_flops_per_s",
            "bad_steps", "skipped_steps"} <= set(m)
    assert np.isfinite(m["loss"]) and m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1
    assert m["bad_steps"] == m["skipped_steps"] == 0
  val = [m for m in lines if m["split"] == "val"]
  assert [m["step"] for m in val] == [0, 3, 6]
  assert val[-1]["loss"] < val[0]["loss"]
  for m in val:  # per byte of text: the byte tokenizer's EOS targets count no bytes
    np.testing.assert_allclose(m["bits_per_token"], m["loss"] / np.log(2))
    np.testing.assert_allclose(m["bits_per_byte"], m["loss"] * m["tokens"] / m["bytes"] / np.log(2))
    assert m["tokens"] - 10 <= m["bytes"] <= m["tokens"] == 2 * 8 * 32
    assert m["mc/hand/acc"] in (0.0, 0.5, 1.0) and m["mc/hand/acc_norm"] in (0.0, 0.5, 1.0)
    assert m["weights"] == "raw"  # eval.weights="auto": an LM evaluates its raw parameters
  assert train[0]["lr"] == 0.0 and train[2]["lr"] > 0.0  # warmup from zero


def test_workdir_has_config_checkpoints_and_tensorboard(runs):
  workdir = runs["straight"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["mesh"]["tensor"] == 2
  assert runs["full"]["checkpoints"] == [2, 4, 6]
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  acc.Reload()
  assert len(acc.Scalars("train/loss")) == N
  assert [e.step for e in acc.Scalars("val/bits_per_byte")] == [0, 3, 6]


def test_rerun_after_completion_trains_nothing_more(runs, tmp_path):
  again = loop.run(small_config(), runs["straight"])
  assert again["start_step"] == again["final_step"] == N
  assert train_losses(runs["straight"]) == train_losses(runs["resumed"])


