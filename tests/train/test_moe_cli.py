"""The MoE LM experiment through the CLI: expert-parallel and expert=1 runs follow the same loss
trajectory. (DiT-MoE through the CLI, its auxiliary metrics and samples: the user tier's
tests/user/test_image_experiments.py.)"""

import json
import os

import pytest

from tests import run_module

STEPS = 4


def cli(config, workdir, *flags, timeout=400):
  proc = run_module("train", f"--config={config}", f"--workdir={workdir}", "--cpu_devices=8",
                    "--config.log.progress=False", *flags, timeout=timeout)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return proc.stdout, [json.loads(line) for line in f if '"train"' in line]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
  small = [f"--config.train.steps={STEPS}", "--config.train.seq_len=64", "--config.log.every=1",
           "--config.eval.every=100", "--config.eval.steps=1", "--config.eval.batch_size=16",
           "--config.sample.max_new_tokens=0"]  # no end-of-run sample: the user tier samples
  runs = {}
  for name, mesh in (("expert4", ["--config.mesh.expert=4", "--config.mesh.data=2"]),
                     ("expert1", ["--config.mesh.expert=1", "--config.mesh.data=8"])):
    runs[name] = cli("experiments/moe_lm_stdlib.py", tmp_path_factory.mktemp(name), *small,
                     *mesh)
  return runs


def test_moe_lm_expert4_and_expert1_give_the_same_loss_trajectory(lm_runs):
  (out4, m4), (out1, m1) = lm_runs["expert4"], lm_runs["expert1"]
  assert "'expert': 4" in out4 and "'expert': 1" in out1
  assert [m["step"] for m in m4] == [m["step"] for m in m1] == list(range(1, STEPS + 1))
  for a, b in zip(m4, m1):
    for key in ("loss", "ce_loss", "moe_balance_loss", "moe_z_loss", "grad_norm"):
      assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)
  assert m4[-1]["loss"] < m4[0]["loss"]


def test_moe_lm_logs_aux_losses_and_expert_loads(lm_runs):
  _, metrics = lm_runs["expert4"]
  for m in metrics:
    loads = [m[f"moe_load/expert_{i}"] for i in range(8)]
    assert sum(loads) == pytest.approx(1.0, rel=1e-5)
    assert m["moe_load_max"] == pytest.approx(8 * max(loads), rel=1e-5)
    assert 0.0 <= m["moe_dropped_frac"] < 0.5  # capacity factor 1.25
    assert m["moe_balance_loss"] >= 0.99  # N_E·Σ f_i·p_i is about 1 at best
    assert m["loss"] > m["ce_loss"]  # the auxiliary terms are added
