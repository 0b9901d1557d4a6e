"""bench/state_passing.py --quick, in process (compile only): the figures exist and agree with each
other; the state-passing bytes match their formula, and no collective of the step grows with the
sequence length."""

from bench import state_passing


def test_quick_state_passing_bench_writes_consistent_figures(tmp_path, capsys):
  doc = state_passing.main(["--quick", f"--out={tmp_path}"])
  assert doc["benchmark"] == "state_passing" and doc["mode"] == "quick"
  md = (tmp_path / "state_passing.md").read_text()
  assert md.startswith("# State-passing sequence parallelism benchmark (quick)")
  assert "## Expectations" in md and md.splitlines()[0] in capsys.readouterr().out
  settings, (name,) = doc["settings"], doc["models"]
  counts, lengths = settings["device_counts"], settings["lengths"]
  comm = {(r["P"], r["N"]): r for r in doc["communication"]}
  assert sorted(comm) == sorted((p, n) for p in counts[1:] for n in lengths)  # P = 1: none
  for (p, n), r in comm.items():
    assert "state passing" in r["plan"]
    # One layer: the boundary states' all-gather forward and its reduce-scatter backward.
    assert r["ops_by_source"]["state passing"] == {"all-gather": 1, "reduce-scatter": 1}
    assert r["per_layer_bytes"]["state passing"] == r["state_formula_bytes"] > 0
    assert r["step_buffer_bytes"] >= sum(r["per_layer_bytes"].values())
    # The short convolutions exchange halos (the inputs forward, their gradients backward):
    # collective-permutes only, no re-layout of the whole activation.
    assert set(r["ops_by_source"]["short convolutions"]) == {"collective-permute"}, r
  for p in counts[1:]:
    assert comm[p, lengths[0]]["step_buffer_bytes"] == comm[p, lengths[1]]["step_buffer_bytes"]
    assert comm[p, lengths[0]]["peak_bytes"] < comm[p, lengths[1]]["peak_bytes"]  # grows with N
  # The search reads item 1's compiles again: one more step compiled, P = 1 at its start.
  assert doc["compiles"] == (len(counts) - 1) * len(lengths) + 1
  budget = settings["budget_mib"] * state_passing.MiB
  rows = doc["max_sequence"]["rows"]
  assert [r["P"] for r in rows] == counts
  peaks = {(r["P"], t["N"]): t["peak_bytes"] for r in rows for t in r["tried"]}
  for r in rows:
    assert peaks[r["P"], r["max_n"]] <= budget
    assert r["first_fail"] is None or peaks[r["P"], r["first_fail"]] > budget
    assert r["max_n"] % (settings["grid_per_device"] * r["P"]) == 0
  n = settings["search_start"]
  assert peaks[counts[-1], n] < peaks[1, n]  # the activations split over the seq devices
  names = [c["name"] for c in doc["checks"]]
  assert f"{name}, P={counts[-1]}: state-passing bytes per layer = 2·P·B·H·K·(K+V)·4 B" in names
  assert all(c["holds"] for c in doc["checks"] if "bytes" in c["name"]), doc["checks"]
