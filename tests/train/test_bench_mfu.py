"""bench/mfu.py --quick: every case run produces finite, sane figures (no timing assertions). One
timed step per case (--steps=1, of quick's 2): the figures are checked, not their precision.

--cases=llama,mamba,gated_deltanet,mamba2: the Llama (baseline, profile, matmul ceiling, block
variant) and the linear-recurrent cases with their targets' references. The DiT, ViT and Swin rows
are the same generic case (train/program.py's step, timed and profiled) on other configs: running
them here cost 27 s of the suite's time; their configs are built below, and their FLOPs formulas
are checked against XLA in tests/train/test_flops.py."""

import json
import math
import os

from bench import mfu
from train import flops
from tests import run_module

CASES = ("llama", "mamba", "gated_deltanet", "mamba2")


def test_the_cases_the_quick_run_leaves_out_have_their_model_flops():
  """The bench's cases; those the run below leaves out (DiT, ViT, Swin) give their quick configs'
  model FLOPs per step, as the bench's rows use them (no compile)."""
  assert list(mfu.CASES) == ["llama", "dit", "vit", "swin", "mamba", "gated_deltanet", "mamba2"]
  for name in set(mfu.CASES) - set(CASES):
    config = mfu.CASES[name](True)
    assert config.train.batch_size == 2, name
    assert flops.model_flops_per_step(config).model > 0, name


def test_quick_mfu_bench_writes_sane_figures(tmp_path):
  proc = run_module("bench.mfu", "--quick", "--steps=1", f"--cases={','.join(CASES)}",
                    f"--out={tmp_path}", timeout=400)
  with open(tmp_path / "mfu.json") as f:
    result = json.load(f)
  assert os.path.getsize(tmp_path / "mfu.md") > 0 and "| llama |" in proc.stdout
  assert result["peak_flops"] > 0 and math.isfinite(result["peak_flops"])
  assert [r["case"] for r in result["rows"]] == list(CASES)
  for row in result["rows"]:
    assert row["model_flops_per_step"] > 0 and row["step_s"] > 0
    assert 0 < row["mfu"] <= 1, row
  llama = result["rows"][0]
  assert 0 < llama["baseline_mfu"] <= 1 and llama["speed_vs_baseline"] > 0
  assert [v["block_size"] for v in llama["variants"]] == [32]
  assert all(v["step_s"] > 0 and v["speed_vs_default"] > 0 for v in llama["variants"])
  for which in ("profile", "baseline_profile"):
    shares = llama[which]["kinds"]
    assert abs(sum(shares.values()) - 1) < 1e-6 and shares["matmul"] > 0, which
    assert 0 < llama[which]["ops_running_s"] <= llama[which]["step_wall_s"] * 1.01, which
    assert llama[which]["matmul_flops_per_s"] > 0, which
  ceiling = llama["ceiling"]
  # q, k, v, o, gate, up, down and attention's two S² matmuls: forward and two gradients each,
  # the blockwise kernel's recomputed scores, and the head's three.
  assert len(ceiling["matmuls"]) == 9 * 3 + 1 + 3
  # The enumeration is train/flops.py's executed count (attention at full S²), plus the recompute.
  assert math.isclose(ceiling["baseline_matmul_flops"], llama["executed_flops_per_step"])
  assert ceiling["flops"] > llama["executed_flops_per_step"] > llama["model_flops_per_step"]
  assert ceiling["baseline_matmul_flops"] < ceiling["odyssey_matmul_flops"]
  for key in ("matmul_only_s", "plain_layout_s", "ceiling_mfu", "ceiling_mfu_causal_skip"):
    assert ceiling[key] > 0 and math.isfinite(ceiling[key]), key
  assert ceiling["ceiling_mfu_causal_skip"] > ceiling["ceiling_mfu"]
  # Gated DeltaNet and Mamba-2: round-robin with their variants, profiled, against the targets.
  gdn, mamba2 = result["rows"][2:]
  assert [v["chunk"] for v in gdn["variants"]] == [32] != [gdn["chunk"]]
  assert all(v["step_s"] > 0 and 0 < v["mfu"] <= 1 for v in gdn["variants"])
  # Another chunk length counts other FLOPs (the in-chunk work grows with the chunk).
  assert gdn["variants"][0]["model_flops_per_step"] != gdn["model_flops_per_step"]
  solves = "triangular solves (LAPACK custom calls)"
  for p in (gdn["profile"], mamba2["profile"]):
    assert abs(sum(p["kinds"].values()) - 1) < 1e-6 and p["kinds"]["matmul"] > 0
  # The delta rule's chunks solve their triangular systems by matmuls: no LAPACK call is left.
  assert gdn["profile"]["kinds"][solves] == 0 and mamba2["profile"]["kinds"][solves] == 0
  assert [c["name"] for c in result["checks"]] == [
      "gated_deltanet MFU ≥ llama MFU", "mamba2 MFU ≥ llama MFU", "mamba2 MFU ≥ 3 x mamba MFU"]
  assert "## Expectations" in proc.stdout
  for row, references in ((gdn, ["llama"]), (mamba2, ["llama", "mamba"])):
    assert [r["case"] for r in row["references"]] == references
    assert all(r["step_s"] > 0 and r["mfu_ratio"] > 0 for r in row["references"])
