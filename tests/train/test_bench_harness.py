"""bench/harness.py: round-robin order and counts, and re-rendering results without measuring."""

import json

import pytest

from bench import harness


def test_round_robin_warms_up_settles_and_rotates():
  order = []
  calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
  times = harness.round_robin(calls, rounds=3, warmup=2, settle=1, repeats=2, rotate=True)
  assert order[:6] == list("aabbcc")  # warm-up: each case on its own first
  rounds = order[6:]
  assert len(rounds) == 3 * 3 * (1 + 2)
  firsts = [rounds[i] for i in range(0, len(rounds), 9)]
  assert firsts == list("abc")  # every case takes the first slot in turn
  assert {name: len(t) for name, t in times.items()} == dict(a=6, b=6, c=6)
  assert all(s >= 0 for t in times.values() for s in t)


def test_paired_ratio_is_the_median_of_per_round_ratios():
  assert harness.paired_ratio([2, 4, 9], [1, 1, 3]) == 3


def test_render_only_rewrites_markdown_from_the_json(tmp_path, capsys):
  doc = dict(mode="quick", wall_time_s=3.0, checks=[dict(name="x", holds=False, detail="y")],
             environment=dict(host_cores=2, machine="m", devices=8, backend="cpu", jax="0",
                              python="3", load_average=[1.0, 2.0]))
  (tmp_path / "demo.json").write_text(json.dumps(doc))

  def run(args):
    raise AssertionError("--render_only must not measure")

  markdown = lambda d: harness.heading("Demo", d) + "\n" + harness.expectations(d["checks"])
  harness.main("demo", "Demo.", run, markdown, argv=["--render_only", f"--out={tmp_path}"])
  md = (tmp_path / "demo.md").read_text()
  assert md.startswith("# Demo (quick)") and "CPU cores" in md and "| x | **NO** | y |" in md
  assert "Wall time: 3 s" in md and md in capsys.readouterr().out
  assert json.loads((tmp_path / "demo.json").read_text()) == doc  # the JSON is left alone


def test_render_only_needs_the_json(tmp_path):
  with pytest.raises(FileNotFoundError):
    harness.main("demo", "Demo.", None, str, argv=["--render_only", f"--out={tmp_path}"])
