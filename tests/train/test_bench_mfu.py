"""bench/mfu.py --quick: every case produces finite, sane figures (no timing assertions)."""

import json
import math
import os

from tests import run_module


def test_quick_mfu_bench_writes_sane_figures(tmp_path):
  proc = run_module("bench.mfu", "--quick", f"--out={tmp_path}", timeout=300)
  with open(tmp_path / "mfu.json") as f:
    result = json.load(f)
  assert os.path.getsize(tmp_path / "mfu.md") > 0 and "| llama |" in proc.stdout
  assert result["peak_flops"] > 0 and math.isfinite(result["peak_flops"])
  assert [r["case"] for r in result["rows"]] == ["llama", "dit", "vit", "mamba"]
  for row in result["rows"]:
    assert row["model_flops_per_step"] > 0 and row["step_s"] > 0
    assert 0 < row["mfu"] <= 1, row
  llama = result["rows"][0]
  assert 0 < llama["baseline_mfu"] <= 1 and llama["speed_vs_baseline"] > 0
  shares = llama["profile"]["kinds"]
  assert abs(sum(shares.values()) - 1) < 1e-6 and shares["matmul"] > 0
