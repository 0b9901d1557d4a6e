"""bench/moe.py --quick end to end: the JSON figures exist and are sane (no timing assertions)."""

import json
import math

import pytest

from tests import run_module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """Runs ``python -m bench.moe --quick`` once; a subprocess, so the script sets its own devices."""
  out = tmp_path_factory.mktemp("bench_moe")
  proc = run_module("bench.moe", "--quick", f"--out={out}", timeout=300)
  with open(out / "moe.json") as f:
    return dict(doc=json.load(f), out=out, stdout=proc.stdout)


def test_writes_json_and_markdown_with_the_machine(quick):
  doc, out = quick["doc"], quick["out"]
  assert doc["benchmark"] == "moe" and doc["mode"] == "quick" and doc["devices"] == 8
  md = (out / "moe.md").read_text()
  assert md.startswith("# MoE benchmark (quick)")
  assert "CPU cores" in md and f"jax {doc['environment']['jax']}" in md
  assert "only relative figures" in md
  assert "## 1. Dense vs MoE" in md and "## 2. Expert parallelism" in md
  assert "| model | mode |" in quick["stdout"]  # the table is printed too


def test_throughput_is_positive_and_finite(quick):
  doc = quick["doc"]
  for r in doc["dense_vs_moe"] + doc["expert_scaling"]:
    assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r["name"]
    assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0, r["name"]
    assert math.isfinite(r["loss_first"]), r["name"]
    assert r["tokens_per_s"] == pytest.approx(
        doc["settings"]["batch"] * doc["settings"]["seq"] / (r["step_ms"] / 1e3))


def test_dense_vs_moe_at_equal_active_parameters(quick):
  rows = quick["doc"]["dense_vs_moe"]
  assert [(r["model"], r["mode"], r["expert"]) for r in rows] == [
      ("dense", "-", 1), ("moe", "capacity", 1), ("moe", "dropless", 1)]
  dense, *moes = rows
  for m in moes:
    # Active parameters match the dense model's up to the routers (d_model x experts per layer).
    assert 0 <= m["active_params"] - dense["active_params"] <= m["router_params"]
    assert m["active_params"] - dense["active_params"] == m["router_params"]
    assert m["router_params"] < 0.02 * dense["active_params"]
    assert m["total_params"] > dense["total_params"]
    assert m["param_bytes_per_device"] > dense["param_bytes_per_device"]
  for r in rows:
    assert r["counted_params"] == r["total_params"]  # llama.num_params matches the model
    # On data=8 every parameter is replicated: one device holds them all; AdamW adds mu and nu.
    assert r["param_bytes_per_device"] == r["param_bytes_total"] == 4 * r["total_params"]
    assert r["param_opt_bytes_per_device"] > 2.9 * r["param_bytes_per_device"]
  assert moes[1]["dropped_frac"] == 0.0  # dropless
  assert 0.0 <= moes[0]["dropped_frac"] < 0.5  # capacity factor 1.25


def test_per_device_parameter_bytes_fall_with_the_expert_degree(quick):
  scaling = quick["doc"]["expert_scaling"]
  by_mode = {}
  for r in scaling:
    by_mode.setdefault(r["mode"], []).append(r)
  assert len(by_mode["capacity"]) >= 3
  for mode, rows in by_mode.items():
    degrees = [r["expert"] for r in rows]
    assert degrees == sorted(degrees) and degrees[0] == 1, mode
    for key in ("param_bytes_per_device", "param_opt_bytes_per_device",
                "expert_param_bytes_per_device"):
      values = [r[key] for r in rows]
      assert all(a > b for a, b in zip(values, values[1:])), (mode, key, values)
    for r in rows:
      assert r["data"] * r["expert"] == 8
      # The expert weights are split over the expert axis; the rest stays replicated.
      assert r["param_bytes_per_device"] == r["expected_param_bytes_per_device"]
      assert r["param_bytes_per_device"] == r["param_bytes_per_device_from_specs"]
      assert (r["all_to_all_count"] > 0) == (r["expert"] > 1)
    # Same dispatch groups on every mesh: the same function, so the same first-step loss.
    losses = [r["loss_first"] for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), (mode, losses)


def test_every_expectation_holds(quick):
  failed = [c for c in quick["doc"]["checks"] if not c["holds"]]
  assert not failed, failed
