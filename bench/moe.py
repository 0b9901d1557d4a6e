"""Mixture of Experts: tokens/s and per-device parameter memory, dense vs MoE and vs expert degree.

  .venv/bin/python -m bench.moe [--quick] [--out=bench/results] [--rounds=R] [--repeats=N]

Runs on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 unless the
environment already sets a count). Every figure comes from the byte-level Llama LM's whole train
step (forward, backward, AdamW update; state donated, as train/loop.py runs it), jitted and
compiled once per configuration, on one fixed random batch. Step 1 (at the initial parameters) is
a warm-up; the step time is the median of ``rounds x repeats`` timed steps, each from dispatch to
block_until_ready: rounds go over all configurations (a busy spell on the shared host then hits
all alike), and in each round a configuration runs one untimed step, then ``repeats`` timed ones.

  1. dense vs MoE at equal active parameters: the tiny Llama (configs/lm.py size=tiny: 4 layers,
     d_model 128, MLP width 384) dense, and with every MLP replaced by 8 SwiGLU experts of width
     192, top-2 (2 x 192 = 384 active hidden units per token, the dense width; the only extra
     active parameters are the routers), in capacity mode (capacity_factor 1.25) and dropless mode
     (0); all on mesh data=8 (expert=1). Batch 16 x 128 tokens, as experiments/moe_lm_stdlib.py.
  2. expert-parallel scaling: the same MoE on meshes expert=1/2/4/8 (data = 8/expert), both modes.
     The expert weights are split over the expert axis, so the per-device parameter (and AdamW
     state) bytes fall as the expert degree grows; the rest of the model stays replicated.

Per-device bytes are the sum over arrays of one device's shard (``addressable_shards[0]``; checked
against the shardings' shard_shape). All-to-all bytes per device per step are read from the
compiled HLO with bench/seq_parallel.py's collective parser (whole buffers, loops multiplied out).
Every mesh uses the same 8 dispatch groups (model.moe.groups defaults to data*expert = 8), so the
MoE computes the same function on every mesh and its first-step loss must agree across them.

Prints a JSON document and markdown tables, and writes moe.{json,md} (and moe.png when matplotlib
is installed) to --out. Expectations that do not hold are printed as not holding.

What to expect (2 cores shared with other jobs, load average 12-20): --quick (size=test, batch
8 x 32, 2 timed steps, train steps compiled with FAST_COMPILE) 20-30 s; the full run about
5 minutes, half of it compiles. Active parameters equal up to the routers (+0.46%), 3.0x the
total; per-device parameter bytes 10.1 -> 5.6 -> 3.4 -> 2.3 MiB for expert=1/2/4/8 (the experts'
9 MiB split, 1.1 MiB replicated). Times over six runs: at expert=1 MoE tokens/s below dense
(capacity 0.4-0.7x, dropless 0.25-0.35x); from expert=1 to 8 capacity mode gets faster (1.5-2.6x)
and dropless slower (0.4-0.5x), for the CPU-specific reasons the notes give; neighbouring expert
degrees can swap order from run to run. Under that load single steps vary by up to 2x; the JSON
keeps every timed step. On CPU the simulated devices share the host's cores, so the absolute times
are relative figures only.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):  # a count the user chose is respected
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_COUNT_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import report  # noqa: E402
from bench.seq_parallel import MiB, _table, collectives  # noqa: E402
from configs import lm  # noqa: E402
from nets import llama  # noqa: E402
from train import program as program_lib  # noqa: E402

MODES = {"capacity": 1.25, "dropless": 0.0}  # mode -> model.moe.capacity_factor
MOE = dict(num_experts=8, top_k=2, balance="global", aux_loss_coef=0.01, z_loss_coef=0.001)

SETTINGS = {
    # Model size, global batch x sequence, warm-up steps right after compiling (the first gives
    # the step-1 figures), timing rounds, timed steps per configuration and round, and which
    # expert degrees each mode runs in item 2 (expert=1 is item 1's row, reused).
    # quick also compiles the train steps with FAST_COMPILE (a quarter of the compile time,
    # slower steps): its times only show that every configuration runs.
    "full": dict(size="tiny", batch=16, seq=128, warmup=1, rounds=3, repeats=2,
                 fast_compile=False,
                 experts={"capacity": (1, 2, 4, 8), "dropless": (1, 2, 4, 8)}),
    "quick": dict(size="test", batch=8, seq=32, warmup=1, rounds=1, repeats=2,
                  fast_compile=True,
                  experts={"capacity": (1, 2, 8), "dropless": (1,)}),
}


# ----------------------------------------------------------------------------- one configuration


def make_config(settings: dict, mode: str | None, expert: int, devices: int):
  """The LM config: dense (mode None) or the MoE at equal active parameters, on data x expert."""
  config = lm.get_config(f"size={settings['size']}")
  if mode is not None:
    config.model.moe.update(**MOE, expert_dim=config.model.mlp_dim // MOE["top_k"],
                            capacity_factor=MODES[mode])
  config.mesh.update(data=devices // expert, fsdp=1, tensor=1, seq=1, expert=expert)
  config.train.update(batch_size=settings["batch"], seq_len=settings["seq"],
                      steps=1000)  # steps: the learning-rate schedule's length
  config.eval.batch_size = settings["batch"]
  return config


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of global arrays (its first addressable shard)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _spec_bytes(tree) -> int:
  """The same from the abstract arrays' shardings (shard_shape), without touching data."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def _is_expert(path) -> bool:
  return "experts_" in jax.tree_util.keystr(path)


_INITIAL = {}
# XLA CPU options that cut a train step's compile time on this model (LLVM at -O0), at the price
# of slower steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _initial_state(moe: bool, program):
  """The initial train state as host arrays, one per model (dense / MoE), reused on every mesh.

  Capacity and dropless MoE have the same parameters, and the partitionable PRNG makes the
  sharded initialisation mesh-independent anyway; initialising once and resharding saves one
  compile per configuration. The program is sharding.init_sharded's, compiled with FAST_COMPILE
  since it runs once and is not timed.
  """
  if moe not in _INITIAL:
    with program.context():
      fn = jax.jit(lambda: nn.unbox(program.create_state()), out_shardings=program.state_shardings)
      _INITIAL[moe] = jax.device_get(fn.lower().compile(compiler_options=FAST_COMPILE)())
  return _INITIAL[moe]


def prepare(settings: dict, mode: str | None, expert: int) -> dict:
  """Builds, compiles and warms up one train step; its figures so far, and what timing needs."""
  devices = jax.device_count()
  config = make_config(settings, mode, expert, devices)
  program = program_lib.build(config)
  model_cfg, abstract = program.plan.model_cfg, program.abstract_state
  B, S = settings["batch"], settings["seq"]
  state = jax.device_put(_initial_state(mode is not None, program), program.state_shardings)
  tokens = np.random.default_rng(0).integers(0, 259, (B, S + 1)).astype(np.int32)
  batch = program.train_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})

  param_leaves = jax.tree_util.tree_leaves_with_path(state.params)
  row = dict(
      name="dense" if mode is None else f"moe-{mode}-expert{expert}",
      model="dense" if mode is None else "moe", mode=mode or "-", expert=expert,
      data=devices // expert, mesh=f"data={devices // expert} expert={expert}",
      capacity_factor=None if mode is None else MODES[mode],
      total_params=llama.num_params(model_cfg),
      active_params=llama.num_params(model_cfg, active=True),
      counted_params=sum(int(leaf.size) for _, leaf in param_leaves),
      router_params=(model_cfg.num_layers // model_cfg.moe.every * model_cfg.d_model
                     * model_cfg.moe.num_experts if model_cfg.moe.enabled else 0),
      expert_params=sum(int(leaf.size) for p, leaf in param_leaves if _is_expert(p)),
      expert_param_bytes_total=sum(leaf.nbytes for p, leaf in param_leaves if _is_expert(p)),
      param_bytes_total=sum(leaf.nbytes for _, leaf in param_leaves),
      param_bytes_per_device=_shard_bytes(state.params),
      param_bytes_per_device_from_specs=_spec_bytes(abstract.params),
      expert_param_bytes_per_device=sum(leaf.addressable_shards[0].data.nbytes
                                        for p, leaf in param_leaves if _is_expert(p)),
      opt_bytes_per_device=_shard_bytes(state.opt_state),
  )
  row["param_opt_bytes_per_device"] = row["param_bytes_per_device"] + row["opt_bytes_per_device"]
  row["expected_param_bytes_per_device"] = (row["param_bytes_total"]
                                             - row["expert_param_bytes_total"]
                                             + row["expert_param_bytes_total"] // expert)

  t0 = time.perf_counter()
  step = program.train_step.lower(state, batch).compile(
      compiler_options=FAST_COMPILE if settings["fast_compile"] else None)
  row["compile_s"] = time.perf_counter() - t0
  comm = collectives(step.as_text(), devices)
  a2a = comm["by_op"].get("all-to-all", {})
  row["all_to_all_count"] = a2a.get("executions", 0)
  row["all_to_all_bytes_per_device"] = a2a.get("buffer_bytes", 0)
  row["all_to_all_wire_bytes_per_device"] = a2a.get("wire_bytes", 0)
  row["all_reduce_bytes_per_device"] = comm["by_op"].get("all-reduce", {}).get("buffer_bytes", 0)
  row["collective_bytes_per_device"] = comm["buffer_bytes"]

  for i in range(settings["warmup"]):  # at least one: step 1 runs at the initial parameters
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i == 0:
      first = {k: float(v) for k, v in jax.device_get(metrics).items()}
  row.update(loss_first=first["loss"],
             dropped_frac=first.get("moe_dropped_frac"),  # at the initial parameters
             load_max=first.get("moe_load_max"),  # busiest expert's share x num_experts
             capacity_slots=(model_cfg.moe.capacity(B * S // devices) if model_cfg.moe.enabled
                             else None))
  print(f"  {row['name']:<24} {row['mesh']:<16} compiled in {row['compile_s']:.1f}s, "
        f"params/device {row['param_bytes_per_device'] / MiB:.3f} MiB", file=sys.stderr,
        flush=True)
  return dict(row=row, step=step, state=state, batch=batch, times=[], metrics=None,
              tokens=B * S)


def timed_step(run: dict, timed: bool = True) -> None:
  """One train step, timed from dispatch to block_until_ready."""
  t = time.perf_counter()
  run["state"], run["metrics"] = run["step"](run["state"], run["batch"])
  jax.block_until_ready((run["state"], run["metrics"]))
  if timed:
    run["times"].append(time.perf_counter() - t)


def finish(run: dict) -> dict:
  """The row with its timing figures; frees the state and the executable."""
  row, times = run["row"], run["times"]
  last = {k: float(v) for k, v in jax.device_get(run["metrics"]).items()}
  median = statistics.median(times)
  row.update(step_ms=median * 1e3, min_step_ms=min(times) * 1e3,
             runs_ms=[t * 1e3 for t in times], tokens_per_s=run["tokens"] / median,
             loss_last=last["loss"],
             dropped_frac_last=last.get("moe_dropped_frac"))
  run.clear()
  print(f"  {row['name']:<24} {row['mesh']:<16} {row['tokens_per_s']:9.0f} tok/s  "
        f"{row['step_ms']:7.1f} ms", file=sys.stderr, flush=True)
  return row


# ----------------------------------------------------------------------------- report


def _mib(x) -> str:
  return "-" if x is None else f"{x / MiB:.3f}"


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def machine(doc: dict) -> str:
  e = doc["environment"]
  load = " / ".join(f"{x:.1f}" for x in e["load_average"])
  return (f"Machine: {e['host_cores']} CPU cores ({e['machine']}), {doc['devices']} simulated "
          f"JAX devices on backend `{e['backend']}`, jax {e['jax']}, python {e['python']}; "
          f"1-minute load average {load} (start / end of the run). "
          "The simulated devices share the host's cores (and whatever else runs on the host), so "
          "absolute CPU times are only relative figures: compare rows with each other, not with "
          "an accelerator. Splitting the work over more simulated devices adds no compute.")


def markdown(doc: dict) -> str:
  s = doc["settings"]
  out = [f"# MoE benchmark ({doc['mode']})", "", machine(doc), "",
         f"Byte-level Llama LM (configs/lm.py size={s['size']}: {doc['model']['num_layers']} "
         f"layers, d_model {doc['model']['d_model']}, MLP width {doc['model']['mlp_dim']}), "
         f"batch {s['batch']} x {s['seq']} tokens, float32, AdamW. Whole train step (forward, "
         f"backward, update), compiled once; median of {s['rounds'] * s['repeats']} timed "
         f"steps: {s['rounds']} round(s) over all configurations, each giving every "
         f"configuration one untimed step and then {s['repeats']} timed ones (tokens/s from the "
         f"median). MoE: {MOE['num_experts']} SwiGLU experts of width "
         f"{doc['model']['expert_dim']}, top-{MOE['top_k']}, every layer, global-batch balance "
         "loss. MiB = 2^20 bytes, per device = one device's shards."
         + (" Train steps compiled with the fast-compile XLA options "
            f"{FAST_COMPILE} (slower steps): quick mode only checks that everything runs."
            if s["fast_compile"] else ""), ""]
  rows = [[r["model"], r["mode"], r["mesh"], f"{r['total_params']:,}", f"{r['active_params']:,}",
           f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.0f} / {r['min_step_ms']:.0f}",
           _mib(r["param_bytes_per_device"]),
           _mib(r["param_opt_bytes_per_device"]), _pct(r["dropped_frac"]),
           f"{r['loss_first']:.4f}"] for r in doc["dense_vs_moe"]]
  out += ["## 1. Dense vs MoE at equal active parameters", "",
          _table(["model", "mode", "mesh", "total params", "active params/token", "tokens/s",
                  "step ms median / min", "params MiB/device", "params+opt MiB/device",
                  "dropped % step 1", "loss step 1"], rows), ""]
  rows = [[r["mode"], r["expert"], r["data"], f"{r['tokens_per_s']:,.0f}",
           f"{r['step_ms']:.0f} / {r['min_step_ms']:.0f}",
           _mib(r["param_bytes_per_device"]), _mib(r["param_opt_bytes_per_device"]),
           _mib(r["expert_param_bytes_per_device"]),
           f"{_mib(r['all_to_all_bytes_per_device'])} / "
           f"{_mib(r['all_to_all_wire_bytes_per_device'])}",
           _mib(r["all_reduce_bytes_per_device"]), _pct(r["dropped_frac"]),
           f"{r['loss_first']:.4f}"] for r in doc["expert_scaling"]]
  out += ["## 2. Expert parallelism: mesh expert=E x data=8/E", "",
          "Collective MiB per device per train step (forward and backward, all layers), from the "
          "compiled HLO: all-to-all as whole buffers / the part that leaves the device; "
          "all-reduce (mostly the gradients of replicated parameters) as whole buffers.", "",
          _table(["mode", "expert", "data", "tokens/s", "step ms median / min",
                  "params MiB/device", "params+opt MiB/device", "expert params MiB/device",
                  "all-to-all MiB/device (buffer / leaving)", "all-reduce MiB/device",
                  "dropped % step 1", "loss step 1"], rows), ""]
  rows = [[c["name"], "yes" if c["holds"] else "**NO**", c["detail"]] for c in doc["checks"]]
  out += ["## Expectations", "", _table(["expectation", "holds", "measured"], rows), ""]
  out += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
  return "\n".join(out)


def plot(doc: dict, path: str) -> str | None:
  """moe.png; returns a message instead when matplotlib is missing."""
  try:
    import matplotlib
  except ImportError:
    return "matplotlib is not installed; skipped the plot."
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  dense = next(r for r in doc["dense_vs_moe"] if r["model"] == "dense")
  degrees = sorted({r["expert"] for r in doc["expert_scaling"]})
  for mode in MODES:
    rows = [r for r in doc["expert_scaling"] if r["mode"] == mode]
    axes[0].plot([r["expert"] for r in rows], [r["tokens_per_s"] for r in rows], "o-",
                 label=f"MoE {mode}")
  axes[0].axhline(dense["tokens_per_s"], color="k", ls="--", lw=1, label="dense (data=8)")
  top = max([dense["tokens_per_s"]] + [r["tokens_per_s"] for r in doc["expert_scaling"]])
  axes[0].set(xlabel="expert degree (data = 8 / expert)", ylabel="tokens/s (relative, CPU)",
              title="Train-step throughput (median step)", ylim=(0, 1.15 * top))
  rows = [r for r in doc["expert_scaling"] if r["mode"] == "capacity"]
  axes[1].plot([r["expert"] for r in rows], [r["param_bytes_per_device"] / MiB for r in rows],
               "o-", label="MoE params")
  axes[1].plot([r["expert"] for r in rows], [r["param_opt_bytes_per_device"] / MiB for r in rows],
               "s-", label="MoE params + AdamW state")
  axes[1].axhline(dense["param_bytes_per_device"] / MiB, color="k", ls="--", lw=1,
                  label="dense params")
  axes[1].set(xlabel="expert degree", ylabel="MiB per device", ylim=(0, None),
              title="Per-device parameter memory")
  for ax in axes:
    ax.set(xscale="log")
    ax.set_xticks(degrees, [str(d) for d in degrees])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return None


# ----------------------------------------------------------------------------- checks


def checks_and_notes(doc: dict) -> tuple[list, list]:
  checks, notes = [], []
  rows = {r["name"]: r for r in doc["dense_vs_moe"] + doc["expert_scaling"]}.values()
  dense = next(r for r in doc["dense_vs_moe"] if r["model"] == "dense")
  moe_rows = [r for r in rows if r["model"] == "moe"]
  m1 = next(r for r in doc["dense_vs_moe"] if r["mode"] == "capacity")

  diff = m1["active_params"] - dense["active_params"]
  checks.append(dict(name="MoE active params = dense active params + routers",
                     holds=diff == m1["router_params"],
                     detail=f"{m1['active_params']:,} vs {dense['active_params']:,}: +{diff:,} "
                            f"(routers {m1['router_params']:,}, "
                            f"{100 * diff / dense['active_params']:.2f}%)"))
  checks.append(dict(name="MoE total params > dense total params",
                     holds=m1["total_params"] > dense["total_params"],
                     detail=f"{m1['total_params']:,} vs {dense['total_params']:,} "
                            f"({m1['total_params'] / dense['total_params']:.2f}x)"))
  bad = [r["name"] for r in rows if r["counted_params"] != r["total_params"]]
  checks.append(dict(name="llama.num_params equals the initialised parameter count",
                     holds=not bad, detail="all rows" if not bad else f"differs: {bad}"))
  bad = [r["name"] for r in rows
         if r["param_bytes_per_device"] != r["param_bytes_per_device_from_specs"]]
  checks.append(dict(name="per-device bytes from addressable shards = from the shardings",
                     holds=not bad, detail="all rows" if not bad else f"differs: {bad}"))
  for mode in MODES:
    scaling = [r for r in doc["expert_scaling"] if r["mode"] == mode]
    if len(scaling) < 2:
      continue
    b = [r["param_bytes_per_device"] for r in scaling]
    checks.append(dict(name=f"{mode}: params bytes/device fall as expert grows",
                       holds=all(x > y for x, y in zip(b, b[1:])),
                       detail=", ".join(f"{_mib(x)}" for x in b) + " MiB for expert="
                              + "/".join(str(r["expert"]) for r in scaling)))
    exact = all(r["param_bytes_per_device"] == r["expected_param_bytes_per_device"]
                for r in scaling)
    checks.append(dict(name=f"{mode}: params bytes/device = rest + expert weights / expert",
                       holds=exact,
                       detail=f"expert weights {_mib(scaling[0]['expert_param_bytes_total'])} "
                              f"MiB of {_mib(scaling[0]['param_bytes_total'])} MiB"))
    losses = [r["loss_first"] for r in scaling]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    dropped = {r["dropped_frac"] for r in scaling}
    checks.append(dict(name=f"{mode}: same first-step loss (rel 1e-4) and dropped fraction on "
                            "every expert degree",
                       holds=spread <= 1e-4 and len(dropped) == 1,
                       detail=f"loss {min(losses):.6f} .. {max(losses):.6f} (rel spread "
                              f"{spread:.1e}); dropped {sorted(_pct(d) for d in dropped)} %"))
    a2a = [(r["expert"], r["all_to_all_count"]) for r in scaling]
    checks.append(dict(name=f"{mode}: all-to-all in the step iff expert > 1",
                       holds=all((n > 0) == (e > 1) for e, n in a2a),
                       detail=", ".join(f"expert={e}: {n}" for e, n in a2a) + " executions"))
  dropless = [r for r in moe_rows if r["mode"] == "dropless"]
  if dropless:
    checks.append(dict(name="dropless mode drops nothing",
                       holds=all(r["dropped_frac"] == 0 for r in dropless),
                       detail=", ".join(f"{r['name']}: {_pct(r['dropped_frac'])}%"
                                        for r in dropless)))
  bad = [r["name"] for r in rows if not (math.isfinite(r["tokens_per_s"])
                                          and r["tokens_per_s"] > 0)]
  checks.append(dict(name="tokens/s positive and finite", holds=not bad,
                     detail="all rows" if not bad else f"not: {bad}"))

  d1 = next((r for r in doc["dense_vs_moe"] if r["mode"] == "dropless"), None)
  speed = f"MoE capacity {m1['tokens_per_s'] / dense['tokens_per_s']:.2f}x"
  if d1:
    speed += f", dropless {d1['tokens_per_s'] / dense['tokens_per_s']:.2f}x"
  notes.append(
      f"Throughput relative to dense at expert=1: {speed}. Equal active parameters are not equal "
      "work: the MoE step also routes (router matmul, softmax, top-k, balance and z losses), "
      "scatters tokens to and gathers them from the experts, runs the expert matmuls per expert, "
      f"and updates and all-reduces {m1['total_params'] / dense['total_params']:.1f}x the "
      "parameters (replicated at expert=1, so every simulated device does the whole AdamW update "
      "on the same shared cores).")
  tokens = doc["settings"]["batch"] * doc["settings"]["seq"] // doc["devices"]
  assignments = tokens * MOE["top_k"]
  notes.append(
      f"Capacity mode runs every expert over a fixed buffer of C = ceil(1.25 * T * k / X) = "
      f"{m1['capacity_slots']} slots per dispatch group (T = {tokens} tokens, one group per "
      f"device): {MOE['num_experts'] * m1['capacity_slots']} expert rows for {assignments} "
      "assignments, 1.25x the dense MLP's multiply-adds whatever the routing. At the initial "
      f"parameters on random bytes it drops {_pct(m1['dropped_frac'])}% of the assignments "
      f"(averaged over the whole batch and all layers the busiest expert gets "
      f"{m1['load_max']:.2f}x its even share; within a group and layer the spread is wider): the "
      "untrained router is unbalanced; the balance loss is there to fix that during training "
      "(experiments/moe_lm_stdlib.py expects well under 1% dropped once it has worked).")
  if d1:
    notes.append(
        "Dropless is slower on CPU, as nets/moe.py grouped_mlp explains: jax.lax.ragged_dot "
        "lowers to a dense loop over all experts on CPU, so the CPU path sorts the assignments by "
        "expert, pads each expert's rows to whole blocks and runs block-batched matmuls (up to "
        "num_experts extra blocks), plus the argsort, scatter and gather around them. On GPU/TPU "
        "it uses ragged_dot's grouped-matmul kernels.")
  by = {(r["mode"], r["expert"]): r for r in doc["expert_scaling"]}
  degrees = sorted({e for _, e in by})
  top = degrees[-1] if degrees[-1] > 1 else None
  if top and ("dropless", top) in by and ("dropless", 1) in by:
    drl, d_1 = by[("dropless", top)], by[("dropless", 1)]
    cap = by.get(("capacity", top))
    versus = (f" vs {_mib(cap['all_to_all_bytes_per_device'])} MiB in capacity mode"
              if cap else "")
    notes.append(
        "Dropless under expert parallelism uses worst-case static buffers (nets/moe.py "
        "run_experts): every device sends each destination room for all of its A = "
        f"{assignments} assignments, so at expert={top} it moves "
        f"{_mib(drl['all_to_all_bytes_per_device'])} MiB of all-to-all per step{versus}, and "
        f"each device runs its expert MLPs over all {top} x A = {top * assignments} received "
        "rows, padding included (grouped_mlp sizes its blocks from the row count, and padding "
        "rows are multiplied like real ones), about A of them real. The expert work per device "
        "thus grows with the expert degree instead of staying constant: tokens/s "
        f"{d_1['tokens_per_s']:,.0f} at expert=1 -> {drl['tokens_per_s']:,.0f} at "
        f"expert={top}. Capacity mode's buffers stay X x C rows per group at every degree.")
  if top and ("capacity", top) in by and ("capacity", 1) in by:
    c1, ct = by[("capacity", 1)], by[("capacity", top)]
    notes.append(
        f"Capacity mode is faster with experts sharded (tokens/s {c1['tokens_per_s']:,.0f} at "
        f"expert=1 -> {ct['tokens_per_s']:,.0f} at expert={top}) although the expert rows per "
        "device are the same. What changes is the replicated work: at expert=1 every device "
        "all-reduces the gradients of all expert weights "
        f"({_mib(c1['all_reduce_bytes_per_device'])} MiB all-reduce per device vs "
        f"{_mib(ct['all_reduce_bytes_per_device'])} at expert={top}) and applies AdamW to all "
        "of them, and the 8 simulated devices do this on the same cores; probably also fewer, "
        "larger expert matmuls. On real devices the first part would be communication only.")
  if top:
    notes.append(
        "Per-device parameter bytes: the expert weights are split over the expert axis and "
        "everything else (embeddings, attention, norms, routers) is replicated, so the bytes "
        "approach the non-expert share, not 1/expert of the total. AdamW's mu and nu follow the "
        "parameters' sharding, so params+opt is about 3x params at every degree.")
  notes.append(
      f"Times: {doc['devices']} simulated devices share {doc['environment']['host_cores']} host "
      "cores (and other jobs: see the load average above; the JSON has every timed step), so "
      "no row is a parallel speed-up; expert parallelism only changes how the same work is cut "
      "up, which replicated work disappears, and the copies the all-to-alls add.")
  return checks, notes


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="size=test model, batch 8 x 32, 2 timed steps, fewer meshes")
  parser.add_argument("--out", default="bench/results", help="folder for json, md and png")
  parser.add_argument("--rounds", type=int, default=None,
                      help="rounds over all configurations (default: 3, quick: 1)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed steps per configuration and round (default: 2)")
  args = parser.parse_args(argv)
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  for name in ("rounds", "repeats"):
    if getattr(args, name):
      settings[name] = getattr(args, name)
  assert settings["warmup"] >= 1, "the first warm-up step gives the step-1 figures"
  devices = jax.device_count()
  if settings["batch"] % devices:
    raise ValueError(f"batch {settings['batch']} is not divisible by the {devices} devices.")
  experts = {m: tuple(e for e in es if devices % e == 0 and MOE["num_experts"] % e == 0)
             for m, es in settings["experts"].items()}
  settings["experts"] = experts
  start, load_start = time.perf_counter(), os.getloadavg()[0]

  # Every configuration is compiled and run once first (step 1: the figures at the initial
  # parameters). Timing then goes in rounds over all configurations, so that a busy spell on the
  # shared host slows every configuration alike rather than whichever happened to be running;
  # within a round each configuration gets an untimed step first, since a step right after a
  # different program ran was measured slower here (about 1.3-1.5x for the dense step after the
  # dropless expert=8 one) than inside a training loop, which repeats one program.
  wanted = [(None, 1)] + [(m, 1) for m in MODES]
  wanted += [(m, e) for m in MODES for e in experts[m] if (m, e) not in wanted]
  print(f"compiling {len(wanted)} train steps", file=sys.stderr, flush=True)
  runs = {key: prepare(settings, *key) for key in wanted}
  print(f"timing: {settings['rounds']} round(s) of 1 untimed + {settings['repeats']} timed "
        "steps per configuration", file=sys.stderr, flush=True)
  for _ in range(settings["rounds"]):
    for run in runs.values():
      timed_step(run, timed=False)
      for _ in range(settings["repeats"]):
        timed_step(run)
  results = {key: finish(run) for key, run in runs.items()}
  dense_vs_moe = [results[(None, 1)]] + [results[(m, 1)] for m in MODES]
  scaling = [results[(m, e)] for m in MODES for e in experts[m]]

  config = make_config(settings, "capacity", 1, devices)
  doc = dict(
      benchmark="moe", mode=mode, settings=settings, devices=devices,
      environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                       xla_flags=os.environ.get("XLA_FLAGS", ""), host_cores=os.cpu_count(),
                       load_average=[load_start, os.getloadavg()[0]],
                       machine=platform.machine(), python=platform.python_version(),
                       note="simulated devices share the host cores: absolute CPU times are "
                            "only relative figures"),
      model=dict(size=settings["size"], num_layers=config.model.num_layers,
                 d_model=config.model.d_model, mlp_dim=config.model.mlp_dim,
                 expert_dim=config.model.moe.expert_dim, moe=MOE, modes=MODES),
      dense_vs_moe=dense_vs_moe, expert_scaling=scaling)
  doc["checks"], doc["notes"] = checks_and_notes(doc)
  doc["wall_time_s"] = time.perf_counter() - start

  md = report.write(args.out, "moe", doc, markdown(doc), doc["wall_time_s"], plot)
  print(md)
  return doc


if __name__ == "__main__":
  main()
