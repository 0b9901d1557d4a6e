"""Mixture of Experts: tokens/s and per-device parameter memory, dense vs MoE and vs expert degree.

  .venv/bin/python -m bench.moe [--quick] [--out=bench/results] [--rounds=R] [--repeats=N]

The byte-level Llama's whole train step (configs/lm.py tiny, batch 16 x 128, AdamW, state donated)
on 8 simulated CPU devices: (1) dense vs 8 experts top-2 at equal active parameters, capacity and
dropless modes, on data=8; (2) the MoE on meshes expert=1/2/4/8 x data=8/expert. Step time: the
median of rounds x repeats timed steps, round-robin over all configurations. Per-device bytes are
one device's shards; all-to-all bytes come from the compiled HLO (parallel/hlo.py). Writes
moe.{json,md,png}; docs/performance.md explains the figures.
"""

import math
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from bench import harness
from bench.harness import MiB
from configs import lm
from nets import llama
from parallel.hlo import collectives
from train import program as program_lib

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


def finish(run: dict, call, times: list[float]) -> dict:
  """The row with its timing figures from ``times`` and ``call``'s last metrics."""
  row = run["row"]
  last = {k: float(v) for k, v in jax.device_get(call.metrics).items()}
  median = statistics.median(times)
  row.update(step_ms=median * 1e3, min_step_ms=min(times) * 1e3,
             runs_ms=[t * 1e3 for t in times], tokens_per_s=run["tokens"] / median,
             loss_last=last["loss"],
             dropped_frac_last=last.get("moe_dropped_frac"))
  harness.log(f"  {row['name']:<24} {row['mesh']:<16} {row['tokens_per_s']:9.0f} tok/s  "
              f"{row['step_ms']:7.1f} ms")
  return row


# ----------------------------------------------------------------------------- report


def markdown(doc: dict) -> str:
  s, model = doc["settings"], doc["model"]
  mib = lambda x: harness.mib(x, 3)
  pct = lambda x: harness.pct(x, 2)
  step_ms = lambda r: f"{r['step_ms']:.0f} / {r['min_step_ms']:.0f}"
  dense_moe = [[r["model"], r["mode"], r["mesh"], f"{r['total_params']:,}",
                f"{r['active_params']:,}", f"{r['tokens_per_s']:,.0f}", step_ms(r),
                mib(r["param_bytes_per_device"]), mib(r["param_opt_bytes_per_device"]),
                pct(r["dropped_frac"]), f"{r['loss_first']:.4f}"] for r in doc["dense_vs_moe"]]
  scaling = [[r["mode"], r["expert"], r["data"], f"{r['tokens_per_s']:,.0f}", step_ms(r),
              mib(r["param_bytes_per_device"]), mib(r["param_opt_bytes_per_device"]),
              mib(r["expert_param_bytes_per_device"]),
              f"{mib(r['all_to_all_bytes_per_device'])} / "
              f"{mib(r['all_to_all_wire_bytes_per_device'])}",
              mib(r["all_reduce_bytes_per_device"]), pct(r["dropped_frac"]),
              f"{r['loss_first']:.4f}"] for r in doc["expert_scaling"]]
  return "\n".join([
      harness.heading("MoE benchmark", doc),
      f"configs/lm.py size={s['size']} ({model['num_layers']} layers, d_model "
      f"{model['d_model']}, MLP {model['mlp_dim']}), batch {s['batch']} x {s['seq']}, float32, "
      f"AdamW; MoE: {MOE['num_experts']} experts of width {model['expert_dim']}, "
      f"top-{MOE['top_k']}. Median of {s['rounds'] * s['repeats']} timed steps ({s['rounds']} "
      f"round(s), each 1 untimed + {s['repeats']} timed per configuration). MiB = 2^20 bytes "
      "per device." + (f" Steps compiled with {FAST_COMPILE}." if s["fast_compile"] else ""), "",
      "## 1. Dense vs MoE at equal active parameters", "",
      harness.table(["model", "mode", "mesh", "total params", "active params/token", "tokens/s",
                     "step ms median / min", "params MiB/device", "params+opt MiB/device",
                     "dropped % step 1", "loss step 1"], dense_moe), "",
      "## 2. Expert parallelism: mesh expert=E x data=8/E", "",
      "Collectives per train step from the compiled HLO (all-to-all: buffer / leaving the "
      "device).", "",
      harness.table(["mode", "expert", "data", "tokens/s", "step ms median / min",
                     "params MiB/device", "params+opt MiB/device", "expert params MiB/device",
                     "all-to-all MiB/device (buffer / leaving)", "all-reduce MiB/device",
                     "dropped % step 1", "loss step 1"], scaling), "",
      harness.expectations(doc["checks"])])


def plot(doc: dict, plt):
  """Tokens/s and per-device parameter bytes vs the expert degree."""
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
  return fig


# ----------------------------------------------------------------------------- checks


def checks(doc: dict) -> list[dict]:
  """What must hold of the figures (tests/train/test_bench_moe.py asserts that they all do)."""
  out = []
  _mib, _pct = (lambda x: harness.mib(x, 3)), (lambda x: harness.pct(x, 2))
  rows = {r["name"]: r for r in doc["dense_vs_moe"] + doc["expert_scaling"]}.values()
  dense = next(r for r in doc["dense_vs_moe"] if r["model"] == "dense")
  moe_rows = [r for r in rows if r["model"] == "moe"]
  m1 = next(r for r in doc["dense_vs_moe"] if r["mode"] == "capacity")

  diff = m1["active_params"] - dense["active_params"]
  out.append(dict(name="MoE active params = dense active params + routers",
                     holds=diff == m1["router_params"],
                     detail=f"{m1['active_params']:,} vs {dense['active_params']:,}: +{diff:,} "
                            f"(routers {m1['router_params']:,}, "
                            f"{100 * diff / dense['active_params']:.2f}%)"))
  out.append(dict(name="MoE total params > dense total params",
                     holds=m1["total_params"] > dense["total_params"],
                     detail=f"{m1['total_params']:,} vs {dense['total_params']:,} "
                            f"({m1['total_params'] / dense['total_params']:.2f}x)"))
  bad = [r["name"] for r in rows if r["counted_params"] != r["total_params"]]
  out.append(dict(name="llama.num_params equals the initialised parameter count",
                     holds=not bad, detail="all rows" if not bad else f"differs: {bad}"))
  bad = [r["name"] for r in rows
         if r["param_bytes_per_device"] != r["param_bytes_per_device_from_specs"]]
  out.append(dict(name="per-device bytes from addressable shards = from the shardings",
                     holds=not bad, detail="all rows" if not bad else f"differs: {bad}"))
  for mode in MODES:
    scaling = [r for r in doc["expert_scaling"] if r["mode"] == mode]
    if len(scaling) < 2:
      continue
    b = [r["param_bytes_per_device"] for r in scaling]
    out.append(dict(name=f"{mode}: params bytes/device fall as expert grows",
                       holds=all(x > y for x, y in zip(b, b[1:])),
                       detail=", ".join(f"{_mib(x)}" for x in b) + " MiB for expert="
                              + "/".join(str(r["expert"]) for r in scaling)))
    exact = all(r["param_bytes_per_device"] == r["expected_param_bytes_per_device"]
                for r in scaling)
    out.append(dict(name=f"{mode}: params bytes/device = rest + expert weights / expert",
                       holds=exact,
                       detail=f"expert weights {_mib(scaling[0]['expert_param_bytes_total'])} "
                              f"MiB of {_mib(scaling[0]['param_bytes_total'])} MiB"))
    losses = [r["loss_first"] for r in scaling]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    dropped = {r["dropped_frac"] for r in scaling}
    out.append(dict(name=f"{mode}: same first-step loss (rel 1e-4) and dropped fraction on "
                            "every expert degree",
                       holds=spread <= 1e-4 and len(dropped) == 1,
                       detail=f"loss {min(losses):.6f} .. {max(losses):.6f} (rel spread "
                              f"{spread:.1e}); dropped {sorted(_pct(d) for d in dropped)} %"))
    a2a = [(r["expert"], r["all_to_all_count"]) for r in scaling]
    out.append(dict(name=f"{mode}: all-to-all in the step iff expert > 1",
                       holds=all((n > 0) == (e > 1) for e, n in a2a),
                       detail=", ".join(f"expert={e}: {n}" for e, n in a2a) + " executions"))
  dropless = [r for r in moe_rows if r["mode"] == "dropless"]
  if dropless:
    out.append(dict(name="dropless mode drops nothing",
                       holds=all(r["dropped_frac"] == 0 for r in dropless),
                       detail=", ".join(f"{r['name']}: {_pct(r['dropped_frac'])}%"
                                        for r in dropless)))
  bad = [r["name"] for r in rows if not (math.isfinite(r["tokens_per_s"])
                                          and r["tokens_per_s"] > 0)]
  out.append(dict(name="tokens/s positive and finite", holds=not bad,
                     detail="all rows" if not bad else f"not: {bad}"))

  return out


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  for name in ("rounds", "repeats"):
    if getattr(args, name):
      settings[name] = getattr(args, name)
  devices = jax.device_count()
  if settings["batch"] % devices:
    raise ValueError(f"batch {settings['batch']} is not divisible by the {devices} devices.")
  experts = {m: tuple(e for e in es if devices % e == 0 and MOE["num_experts"] % e == 0)
             for m, es in settings["experts"].items()}
  settings["experts"] = experts

  # Every configuration is compiled and run once first (step 1: the figures at the initial
  # parameters). Timing then goes round-robin; each configuration gets an untimed step first in
  # every round, since a step right after a different program ran was measured slower here
  # (about 1.3-1.5x for the dense step after the dropless expert=8 one) than in a training loop.
  wanted = [(None, 1)] + [(m, 1) for m in MODES]
  wanted += [(m, e) for m in MODES for e in experts[m] if (m, e) not in wanted]
  harness.log(f"compiling {len(wanted)} train steps")
  runs = {key: prepare(settings, *key) for key in wanted}
  calls = {key: harness.stepper(r["step"], r["state"], r["batch"]) for key, r in runs.items()}
  harness.log(f"timing: {settings['rounds']} round(s) of 1 untimed + {settings['repeats']} "
              "timed steps per configuration")
  times = harness.round_robin(calls, settings["rounds"], settle=1, repeats=settings["repeats"])
  results = {key: finish(runs[key], calls[key], times[key]) for key in wanted}
  dense_vs_moe = [results[(None, 1)]] + [results[(m, 1)] for m in MODES]
  scaling = [results[(m, e)] for m in MODES for e in experts[m]]

  config = make_config(settings, "capacity", 1, devices)
  doc = dict(
      benchmark="moe", mode=mode, settings=settings, devices=devices,
      model=dict(size=settings["size"], num_layers=config.model.num_layers,
                 d_model=config.model.d_model, mlp_dim=config.model.mlp_dim,
                 expert_dim=config.model.moe.expert_dim, moe=MOE, modes=MODES),
      dense_vs_moe=dense_vs_moe, expert_scaling=scaling)
  doc["checks"] = checks(doc)
  return doc


def main(argv=None) -> dict:
  return harness.main("moe", __doc__, run, markdown, plot, argv=argv, flags=[
      ("--rounds", dict(type=int, default=None,
                        help="rounds over all configurations (default: 3, quick: 1)")),
      ("--repeats", dict(type=int, default=None,
                         help="timed steps per configuration and round (default: 2)"))])


if __name__ == "__main__":
  main()
