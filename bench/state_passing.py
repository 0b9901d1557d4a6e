"""State-passing sequence parallelism of the linear-recurrent LMs: communication and the longest
sequence against P.

  .venv/bin/python -m bench.state_passing [--quick] [--out=bench/results] [--budget_mib=M]

On P = 1, 2, 4, 8 simulated CPU devices with mesh seq=P (parallel/state_passing.py), for the Gated
DeltaNet and Mamba-2 train steps of a small, sequence-dominated model: (1) the bytes each device
communicates, read from the compiled HLO (parallel/hlo.py) at two sequence lengths and sorted by
the JAX op that emitted each collective (the boundary-state all-gather and its transpose, the
short convolutions' halo exchange, the gradient all-reduce); (2) the longest sequence whose train step fits a
per-device memory budget (compiled memory_analysis, by bench/seq_parallel.py's search). Compile
only, nothing is timed. Writes state_passing.{json,md,png}; docs/performance.md explains the
figures.
"""

import functools
import time

import jax
import ml_collections
import numpy as np

from bench import harness, seq_parallel
from bench.harness import MiB
from configs import lm
from parallel.hlo import collectives
from train import models
from train import program as program_lib

# Small widths, so that activations (which grow with the sequence) dominate the step's memory.
MODELS = {
    "gated_deltanet": dict(mixer="gated_deltanet", num_layers=2, d_model=128, linear_heads=4,
                           linear_k_heads=4, linear_k_dim=32, linear_v_dim=32, mlp_dim=256,
                           chunk=64),
    "mamba2": dict(mixer="mamba2", num_layers=2, d_model=128, linear_heads=8, linear_k_heads=1,
                   linear_k_dim=32, linear_v_dim=32, mlp_dim=0, chunk=64, norm_eps=1e-5,
                   residual_in_fp32=True)}
QUICK_MODELS = {"gated_deltanet": dict(MODELS["gated_deltanet"], num_layers=1, d_model=32,
                                       linear_heads=2, linear_k_heads=2, linear_k_dim=16,
                                       linear_v_dim=16, mlp_dim=0, chunk=16)}

SETTINGS = {
    # Device counts; the two sequence lengths of item 1; for item 2 the budget, the search's first
    # N, its bisection steps, the N where doubling stops, and the grid: N a multiple of
    # grid_per_device x P (whole chunks on every device).
    "full": dict(device_counts=(1, 2, 4, 8), lengths=(4096, 16384), budget_mib=1024,
                 search_start=4096, refine=3, cap=1 << 21, grid_per_device=512),
    "quick": dict(device_counts=(1, 2), lengths=(64, 128), budget_mib=2, search_start=128,
                  refine=0, cap=128, grid_per_device=16),
}

# Where a collective comes from, by the JAX op name XLA keeps in its metadata: (label, pattern).
# All-reduces are left to the rest: the gradients' reduction over seq is one combined all-reduce
# whose metadata lists every parameter's op, the convolutions' among them.
# The convolutions' halo exchange runs in a shard_map of its own, so "/conv_" is tested first.
SOURCES = (("short convolutions", "/conv_"), ("state passing", "shard_map/"))
OTHER = "gradients, loss and the rest"


def models_for(mode: str) -> dict:
  return QUICK_MODELS if mode == "quick" else MODELS


def config_for(model: dict, p: int, n: int):
  """The LM config of ``model`` on mesh seq=P at sequence length N, batch 1."""
  c = lm.get_config("size=test")
  c.model = ml_collections.ConfigDict(dict(
      name="linear_rnn", vocab_size=384, conv_size=4, max_len=n, tie_embeddings=False,
      dtype="float32", param_dtype="float32", **model))
  c.mesh.update(data=1, fsdp=1, tensor=1, seq=p, expert=1)
  c.train.update(seq_len=n, batch_size=1, steps=10)
  c.eval.batch_size = 1  # the validation split must hold one batch of these long sequences
  return c


def source_of(op: str, op_name: str) -> str:
  if op == "all-reduce":
    return OTHER
  return next((label for label, pattern in SOURCES if pattern in op_name), OTHER)


@functools.lru_cache(maxsize=None)
def compiled_step(mode: str, name: str, p: int, n: int) -> dict:
  """Memory and collectives of the jitted train step (state donated); compile only."""
  config = config_for(models_for(mode)[name], p, n)
  program = program_lib.build(config, devices=jax.devices()[:p])
  plan = models.recurrence_plan(config, dict(program.mesh.shape), models.model_config(config))
  t0 = time.perf_counter()
  compiled = program.train_step.lower(program.abstract_state, program.abstract_batch()).compile()
  m = compiled.memory_analysis()
  comm = collectives(compiled.as_text(), p)
  by_source = {label: dict(buffer_bytes=0, wire_bytes=0, ops={})
               for label in [s for s, _ in SOURCES] + [OTHER]}
  for o in comm["ops"]:
    s = by_source[source_of(o["op"], o["source"])]
    s["buffer_bytes"] += o["buffer_bytes"]
    s["wire_bytes"] += o["wire_bytes"]
    s["ops"][o["op"]] = s["ops"].get(o["op"], 0) + o["times"]
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  result = dict(model=name, P=p, N=n, plan=plan.describe(), peak_bytes=peak, temp_bytes=m.temp_size_in_bytes,
                argument_bytes=m.argument_size_in_bytes, buffer_bytes=comm["buffer_bytes"],
                wire_bytes=comm["wire_bytes"], by_op=comm["by_op"], by_source=by_source,
                loops_of_unknown_length=comm["loops_of_unknown_length"],
                compile_s=time.perf_counter() - t0)
  harness.log(f"  {name} P={p} N={n}: peak {peak / MiB:.1f} MiB, {comm['buffer_bytes'] / MiB:.3f} "
              f"MiB communicated ({result['compile_s']:.1f} s)")
  return result


def state_formula_bytes(model: dict, p: int) -> int:
  """Per layer and device: the all-gather of every shard's [S_local | T] ([P, B, H, K, K+V]
  float32) and its transpose, a reduce-scatter of the same buffer."""
  K, V, H = model["linear_k_dim"], model["linear_v_dim"], model["linear_heads"]
  return 2 * p * 1 * H * K * (K + V) * 4 if p > 1 else 0


def communication_row(mode: str, name: str, p: int, n: int) -> dict:
  r = compiled_step(mode, name, p, n)
  layers = models_for(mode)[name]["num_layers"]
  per_layer = {label: r["by_source"][label]["buffer_bytes"] / layers for label, _ in SOURCES}
  return dict(model=name, P=p, N=n, plan=r["plan"], peak_bytes=r["peak_bytes"],
              per_layer_bytes=per_layer,
              state_formula_bytes=state_formula_bytes(models_for(mode)[name], p),
              step_buffer_bytes=r["buffer_bytes"], step_wire_bytes=r["wire_bytes"],
              other_step_bytes=r["by_source"][OTHER]["buffer_bytes"],
              ops_by_source={k: v["ops"] for k, v in r["by_source"].items()},
              loops_of_unknown_length=r["loops_of_unknown_length"])


def longest(mode: str, name: str, settings: dict) -> list[dict]:
  """bench/seq_parallel.py's search for every P, each starting from the previous P's answer."""
  rows, start = [], settings["search_start"]
  grid = settings["grid_per_device"]
  for p in settings["device_counts"]:
    measure = lambda p_, n, name=name: compiled_step(mode, name, p_, n)
    r = seq_parallel.longest_sequence(p, settings["budget_mib"] * MiB, start, settings["refine"],
                                      cap=settings["cap"], measure=measure, grid=grid * p)
    rows.append(dict(r, model=name))
    start = max(r["max_n"], settings["search_start"])  # memory per device falls with P
  return rows


# ----------------------------------------------------------------------------- report


def checks(doc: dict) -> list[dict]:
  """What must hold of the figures (tests/parallel/test_state_passing.py checks the bytes'
  independence of N on one recurrence)."""
  out, mib = [], harness.mib
  n1, n2 = doc["settings"]["lengths"]
  comm = {(r["model"], r["P"], r["N"]): r for r in doc["communication"]}
  for name in doc["models"]:
    for p in [p for p in doc["settings"]["device_counts"] if p > 1]:
      a, b = comm[name, p, n1], comm[name, p, n2]
      state = a["per_layer_bytes"]["state passing"]
      out.append(dict(name=f"{name}, P={p}: state-passing bytes per layer = 2·P·B·H·K·(K+V)·4 B",
                      holds=state == a["state_formula_bytes"],
                      detail=f"{mib(state, 3)} MiB measured, {mib(a['state_formula_bytes'], 3)} "
                             "MiB formula"))
      same = b["per_layer_bytes"]["state passing"] == state
      out.append(dict(name=f"{name}, P={p}: state-passing bytes the same at N={n1} and N={n2}",
                      holds=same, detail=f"{mib(state, 3)} vs "
                      f"{mib(b['per_layer_bytes']['state passing'], 3)} MiB per layer"))
      conv_a, conv_b = (r["per_layer_bytes"]["short convolutions"] for r in (a, b))
      out.append(dict(name=f"{name}, P={p}: short-convolution (halo) bytes the same at N={n1} "
                           f"and N={n2}", holds=conv_a == conv_b,
                      detail=f"{mib(conv_a, 3)} vs {mib(conv_b, 3)} MiB per layer"))
      ratio = b["step_buffer_bytes"] / max(a["step_buffer_bytes"], 1)
      out.append(dict(name=f"{name}, P={p}: whole-step bytes the same at N={n1} and N={n2} "
                           "(within 1%)", holds=abs(ratio - 1) <= 0.01,
                      detail=f"{mib(a['step_buffer_bytes'], 3)} vs "
                             f"{mib(b['step_buffer_bytes'], 3)} MiB, ratio {ratio:.2f}"))
    rows = [r for r in doc["max_sequence"]["rows"] if r["model"] == name]
    if len(rows) > 1:
      first, last = rows[0], rows[-1]
      growth = last["max_n"] / max(first["max_n"], 1)
      out.append(dict(name=f"{name}: longest N grows about linearly with P (max N(P={last['P']}) "
                           f"/ max N(P={first['P']}) ≥ 0.75·{last['P'] // first['P']})",
                      holds=growth >= 0.75 * last["P"] / first["P"],
                      detail=f"{', '.join(str(r['max_n']) for r in rows)} for P="
                             f"{[r['P'] for r in rows]}; growth {growth:.2f}x"))
  return out


def markdown(doc: dict) -> str:
  s, mib, table = doc["settings"], harness.mib, harness.table
  rows = [[r["model"], r["P"], r["N"], mib(r["peak_bytes"], 1),
           mib(r["per_layer_bytes"]["state passing"], 3),
           mib(r["state_formula_bytes"], 3), mib(r["per_layer_bytes"]["short convolutions"], 3),
           mib(r["other_step_bytes"], 3), mib(r["step_buffer_bytes"], 3),
           "; ".join(f"{src}: " + ", ".join(f"{n}x {op}" for op, n in sorted(ops.items()))
                     for src, ops in r["ops_by_source"].items() if ops) or "none"]
          for r in doc["communication"]]
  out = [harness.heading("State-passing sequence parallelism benchmark", doc),
         "## 1. Bytes communicated per device (from the compiled train step's HLO)", "",
         "Models: " + "; ".join(f"{name} {cfg}" for name, cfg in doc["model_configs"].items())
         + ". Batch 1, float32, mesh seq=P > 1 (at P = 1 the step runs the local chunked form "
         "and communicates nothing); MiB = 2^20 bytes, buffer bytes as parallel/hlo.py counts "
         "them. Each collective is attributed by the JAX op that emitted it: state passing (the "
         "all-gather of the boundary states in parallel/state_passing.py and its transpose), the "
         "short causal convolutions (the halo exchange: each shard's last conv_size − 1 inputs to "
         "the next, and their gradients back), and the rest of the step (the gradient all-reduce over seq, "
         "the loss); formula = 2·P·B·H·K·(K+V)·4 B per layer.", "",
         table(["model", "P", "N", "step peak MiB", "state passing MiB / layer",
                "formula MiB / layer", "short convs MiB / layer", "rest of step MiB",
                "whole step MiB", "collectives (executions per step)"], rows), ""]
  ms = doc["max_sequence"]
  rows = []
  for name in doc["models"]:
    group = [r for r in ms["rows"] if r["model"] == name]
    rows += [[name, r["P"], r["max_n"], r["first_fail"] or "-",
              f"{r['max_n'] / max(group[0]['max_n'], 1):.2f}", len(r["tried"]),
              ", ".join(f"{t['N']}: {mib(t['peak_bytes'], 0)}" for t in r["tried"])]
             for r in group]
  out += ["## 2. Longest sequence whose train step fits the per-device budget", "",
          f"Budget {ms['budget_mib']:g} MiB per device; peak = argument + output - alias + temp "
          f"bytes of the train step (AdamW, state donated); N a multiple of "
          f"{s['grid_per_device']}·P, doubling from {s['search_start']} then {s['refine']} "
          "bisection steps; log-log slope of max N against P: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ms["loglog_slope"].items() if v is not None)
          + " (linear = 1).", "",
          table(["model", "P", "max N", "first N that does not fit", "max N / max N(P=1)",
                 "compiles", "N tried: peak MiB"], rows), ""]
  return "\n".join(out + [harness.expectations(doc["checks"])])


def plot(doc: dict, plt):
  """Bytes per device per layer, and the longest N, against P."""
  import matplotlib.ticker

  counts = doc["settings"]["device_counts"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ax = axes[0]
  for (name, n), marker in zip([(m, n) for m in doc["models"] for n in doc["settings"]["lengths"]],
                               "osd^v<>"):
    rows = [r for r in doc["communication"] if r["model"] == name and r["N"] == n and r["P"] > 1]
    for label, style in (("state passing", "-"), ("short convolutions", ":")):
      ax.plot([r["P"] for r in rows], [r["per_layer_bytes"][label] / MiB for r in rows],
              marker=marker, linestyle=style, label=f"{name}, N={n}: {label}")
  ax.set(xscale="log", yscale="log", xticks=counts, xticklabels=counts, xlabel="P (seq devices)",
         ylabel="MiB per device per layer (buffer)", title="Communication per layer")
  ax.legend(fontsize=6)
  ax = axes[1]
  for name in doc["models"]:
    rows = [r for r in doc["max_sequence"]["rows"] if r["model"] == name]
    line, = ax.plot([r["P"] for r in rows], [r["max_n"] for r in rows], "o-", label=name)
    ax.plot([r["P"] for r in rows], [rows[0]["max_n"] * r["P"] for r in rows], "--", lw=1,
            color=line.get_color(), label=f"{name}: linear in P")
  ax.set(xscale="log", yscale="log", xticks=counts, xticklabels=counts, xlabel="P",
         ylabel="longest N", title=f"Longest N within {doc['max_sequence']['budget_mib']:g} "
         "MiB/device")
  ax.legend(fontsize=7)
  for ax in axes:
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  return fig


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  if args.budget_mib:
    settings["budget_mib"] = args.budget_mib
  settings["device_counts"] = [p for p in settings["device_counts"] if p <= jax.device_count()]
  names = list(models_for(mode))
  compiled_step.cache_clear()  # ``compiles`` below counts this run's
  harness.log("1/2 communication at two sequence lengths (compile only)")
  comm = [communication_row(mode, name, p, n) for name in names
          for p in settings["device_counts"] if p > 1 for n in settings["lengths"]]
  harness.log("2/2 longest sequence within the budget")
  search = [r for name in names for r in longest(mode, name, settings)]
  slopes = {}
  for name in names:
    rows = [r for r in search if r["model"] == name]
    fit = len(rows) > 1 and all(r["max_n"] for r in rows)
    slopes[name] = (float(np.polyfit(np.log([r["P"] for r in rows]),
                                     np.log([r["max_n"] for r in rows]), 1)[0]) if fit else None)
  doc = dict(benchmark="state_passing", mode=mode, settings=settings, devices=jax.device_count(),
             models=names, model_configs=models_for(mode), communication=comm,
             max_sequence=dict(budget_mib=settings["budget_mib"], rows=search,
                               loglog_slope=slopes),
             compiles=compiled_step.cache_info().currsize)
  doc["checks"] = checks(doc)
  return doc


def main(argv=None) -> dict:
  return harness.main("state_passing", __doc__, run, markdown, plot, argv=argv, flags=[
      ("--budget_mib", dict(type=float, default=None,
                            help="per-device memory budget for item 2 (default: 1024, quick: "
                                 "2)"))])


if __name__ == "__main__":
  main()
