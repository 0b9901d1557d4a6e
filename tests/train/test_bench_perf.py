"""bench/compile.py and bench/host.py --quick end to end, and the loop compiling its steps once.

Timings are never asserted (a benchmark is a script, not a timed test); the compilation counts
are exact and are.
"""

import importlib.util
import json
import math
import subprocess

import jax
import jax.numpy as jnp
import pytest

from bench.compile import CompileCounter, loop_program
from tests import module_command
from tests.train.test_faults import lm_config
from train import loop


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """Runs both scripts with --quick, side by side to halve the wall time on 2 cores (their
  timings get noisier, which nothing asserts); subprocesses, so each sets its own devices."""
  out = tmp_path_factory.mktemp("bench_perf")
  procs = {name: subprocess.Popen(**module_command(f"bench.{name}", "--quick", f"--out={out}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name in ("compile", "host")}
  outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
  for name, proc in procs.items():
    assert proc.returncode == 0, outputs[name][1][-3000:]
  stdout = {name: out_err[0] for name, out_err in outputs.items()}
  docs = {}
  for name in procs:
    with open(out / f"{name}.json") as f:
      docs[name] = json.load(f)
  return dict(docs=docs, out=out, stdout=stdout)


@pytest.mark.parametrize("name", ["compile", "host"])
def test_writes_json_markdown_and_plot(quick, name):
  doc, out = quick["docs"][name], quick["out"]
  assert doc["benchmark"] == name and doc["mode"] == "quick"
  assert doc["environment"]["devices"] == 8
  md = (out / f"{name}.md").read_text()
  assert md.startswith("# ") and "(quick)" in md.splitlines()[0]
  assert "## Expectations" in md and "CPU cores" in md
  assert md.splitlines()[0] in quick["stdout"][name]  # the tables are printed too
  if importlib.util.find_spec("matplotlib"):  # the bench extra; without it the plot is skipped
    assert (out / f"{name}.png").stat().st_size > 0


def test_train_step_compiles_once_over_the_quick_run(quick):
  run = quick["docs"]["compile"]["loop_run"]
  assert run["steps"] == quick["docs"]["compile"]["settings"]["run_steps"] > 1
  assert run["train_step_traces"] == 1 and run["train_step_compiles"] == 1, run["functions"]
  assert run["evaluations"] > 1 and run["eval_step_compiles"] == 1, run["functions"]


def test_compile_times_are_positive_and_finite(quick):
  doc = quick["docs"]["compile"]
  assert [t["layers"] for t in doc["compile_times"]] == list(doc["settings"]["layers"])
  for t in doc["compile_times"]:
    for key in ("lower_s", "compile_s"):
      assert math.isfinite(t[key]) and t[key] > 0, (t["layers"], key)
    assert t["xla_compiles"] == [1] * doc["settings"]["repeats"]  # nothing served from a cache
  assert math.isfinite(doc["ratio"]) and doc["ratio"] > 0
  params = [t["params"] for t in doc["compile_times"]]
  assert params == sorted(params) and params[0] < params[-1]


def test_host_fractions_are_sane(quick):
  doc = quick["docs"]["host"]
  assert len(doc["runs"]) == 3 and len(doc["pure_measurements_ms"]) == 4
  assert all(math.isfinite(p) and p > 0 for p in doc["pure_measurements_ms"])
  for r in doc["runs"]:
    for key in ("host_fraction", "host_fraction_from_step2"):
      assert math.isfinite(r[key]) and 0 <= r[key] <= 1, (r["name"], key)
    for key in ("window_s", "wall_ms_per_step", "device_ms", "first_save_s", "later_save_ms"):
      assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
    assert r["window_steps"] == r["window"][1] - r["window"][0] > 0
    assert [s["step"] for s in r["saves"]] == list(
        range(doc["settings"]["ckpt_every"], doc["settings"]["steps"] + 1,
              doc["settings"]["ckpt_every"]))


def test_loop_compiles_train_and_eval_steps_once(tmp_path):
  config = lm_config(steps=5)  # data=2 x fsdp=2 x tensor=2; checkpoints every 2 steps
  config.eval.update(every=2)  # evaluations before step 1 and after steps 2, 4 and 5
  names = loop_program(config)
  with CompileCounter() as counter:
    summary = loop.run(config, str(tmp_path))
  assert summary["final_step"] == 5 and summary["checkpoints"] == [2, 4, 5]
  train, evals = names["train_name"], names["eval_name"]
  assert (train, evals) == ("train_step", "eval_fn")
  assert counter.count(train, "traces") == 1, counter.functions
  assert counter.count(train) == 1, counter.functions
  assert counter.count(evals) == 1, counter.functions


def test_counter_sees_a_retrace():
  def scaled(x, n):
    return x * n

  step = jax.jit(scaled, static_argnums=1)
  with CompileCounter() as counter:
    step(jnp.ones(3), 2)
    step(jnp.ones(3), 2)  # cached: no trace, no compilation
    step(jnp.ones(3), 3)  # a new static Python scalar: traced and compiled again
  assert counter.count("scaled", "traces") == 2 and counter.count("scaled") == 2
