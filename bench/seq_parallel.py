"""Sequence-parallel attention: communication, memory, longest sequence and step time vs P.

  .venv/bin/python -m bench.seq_parallel [--quick] [--out=bench/results] [--budget_mib=M]

On P = 1, 2, 4, 8 simulated CPU devices (P above the device count is skipped), for ulysses / ring /
allgather: (1) bytes each device communicates per attention layer, from the compiled HLO
(parallel/hlo.py), N = 1024·P, h = 512; (2) the per-device peak memory of a whole Llama train step
at fixed N; (3) the longest N whose train step fits a per-device budget; (4) attention
forward+backward wall time; and a diagnostic of attention memory inside a scanned layer stack.
All but (4) are read from compiled programs. Writes seq_parallel.{json,md,png};
docs/performance.md explains the figures.
"""

import functools
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bench import harness
from bench.harness import MiB
from configs import lm
from parallel import attention
from parallel import mesh as parallel_mesh
from parallel.hlo import collectives, largest_buffer
from train import program as program_lib

STRATEGIES = ("ulysses", "ring", "allgather")
DEVICE_COUNTS = (1, 2, 4, 8)

# Attention benchmark shape (items 1 and 4): h = H * D = 512.
ATT = dict(batch=1, heads=8, head_dim=64, kernel="blockwise", block=512)
# Sequence-dominated Llama for the train-step memory (items 2 and 3).
MODEL = dict(num_layers=2, d_model=128, num_heads=8, num_kv_heads=8, mlp_dim=256)
MEM_BLOCK = 512  # blockwise block; the search grid over N is a multiple of it (and of P)

SETTINGS = {
    # Tokens per device (N = this * P) for item 1, and for item 4 fewer: the blockwise kernel
    # computes every block pair, O(N^2) flops, and all devices share the host's cores. Fixed N
    # for item 2; budget, search start and bisection steps for item 3; timed runs after a warm-up.
    "full": dict(tokens_per_device=1024, time_tokens_per_device=256, fixed_n=16384,
                 budget_mib=1024, search_start=2048, refine=3, repeats=3, extra_strategies=True),
    "quick": dict(tokens_per_device=256, time_tokens_per_device=128, fixed_n=4096,
                  budget_mib=128, search_start=1024, refine=1, repeats=2, extra_strategies=False),
}

# ----------------------------------------------------------------------------- attention


def _attention(p: int, n: int, strategy: str):
  """(plan, attention fn, mesh, q/k/v sharding) for P devices on the seq axis."""
  config = lm.get_config("size=test")
  config.mesh.update(data=1, fsdp=1, tensor=1, seq=p, expert=1)
  config.parallel.update(seq_strategy=strategy, attention=ATT["kernel"], block_size=ATT["block"])
  mesh = parallel_mesh.make_mesh(config.mesh, jax.devices()[:p])
  plan = attention.make_plan(config.parallel, dict(mesh.shape), num_heads=ATT["heads"],
                             num_kv_heads=ATT["heads"], seq_len=n)
  spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "seq", "tensor", None))
  return plan, attention.attention_fn(plan, mesh), mesh, spec


def attention_bench(p: int, n: int, strategy: str) -> dict:
  """Communication (forward, and forward+backward) and memory of one layer; compile only."""
  plan, fn, mesh, spec = _attention(p, n, strategy)
  abstract = jax.ShapeDtypeStruct((ATT["batch"], n, ATT["heads"], ATT["head_dim"]), jnp.float32,
                                  sharding=spec)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, causal=True)).lower(
        abstract, abstract, abstract).compile()
    both = _fwd_bwd(fn, spec).lower(*(abstract,) * 4).compile()
  compile_s = time.perf_counter() - t0
  f_comm, b_comm = collectives(fwd.as_text(), p), collectives(both.as_text(), p)
  permutes = [o["times"] for o in f_comm["ops"] if o["op"] == "collective-permute"]
  return dict(
      P=p, N=n, strategy=strategy, plan=plan.describe(), plan_strategy=plan.strategy,
      forward=dict(buffer_bytes=f_comm["buffer_bytes"], wire_bytes=f_comm["wire_bytes"],
                   by_op=f_comm["by_op"], loops_of_unknown_length=f_comm["loops_of_unknown_length"],
                   collective_permute_trips=sorted(set(permutes))),
      forward_backward=dict(buffer_bytes=b_comm["buffer_bytes"], wire_bytes=b_comm["wire_bytes"],
                            by_op=b_comm["by_op"]),
      fwd_bwd_temp_bytes=both.memory_analysis().temp_size_in_bytes, compile_s=compile_s,
      ring_expected_trips=plan.ring - 1 if plan.strategy == "ring" else None)


def _fwd_bwd(fn, spec):
  """jit of q, k, v, cotangent -> dq, dk, dv: one attention layer's forward and backward."""
  def loss(q, k, v, cotangent):
    return jnp.sum(fn(q, k, v, causal=True) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(spec,) * 4,
                 out_shardings=(spec,) * 3)


def attention_time(p: int, n: int, strategy: str, repeats: int) -> dict:
  """Median wall time of the attention forward+backward after one warm-up run."""
  plan, fn, mesh, spec = _attention(p, n, strategy)
  shape = (ATT["batch"], n, ATT["heads"], ATT["head_dim"])
  with jax.set_mesh(mesh):
    step = _fwd_bwd(fn, spec)
    make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32), out_shardings=spec)
    args = [make(k) for k in jax.random.split(jax.random.key(0), 4)]
    times = harness.round_robin({strategy: lambda: jax.block_until_ready(step(*args))},
                                rounds=repeats, warmup=1)[strategy]  # warm-up: compile
  return dict(P=p, N=n, strategy=strategy, plan_strategy=plan.strategy,
              median_s=statistics.median(times), runs_s=times)


def ulysses_formula_bytes(n: int, p: int) -> float:
  return 4 * n * ATT["heads"] * ATT["head_dim"] / p * 4


# ----------------------------------------------------------------------------- train step


@functools.lru_cache(maxsize=None)
def step_memory(p: int, n: int, strategy: str = "ulysses") -> dict:
  """memory_analysis of the jitted Llama train step (state donated), compile only."""
  config = lm.get_config("size=test")
  config.model.update(**MODEL, max_len=n)
  config.mesh.update(data=1, fsdp=1, tensor=1, seq=p, expert=1)
  config.parallel.update(seq_strategy=strategy, attention="blockwise", block_size=MEM_BLOCK)
  config.train.update(seq_len=n, batch_size=1, steps=10)
  program = program_lib.build(config, devices=jax.devices()[:p])
  plan = program.attention
  t0 = time.perf_counter()
  compiled = program.train_step.lower(program.abstract_state, program.abstract_batch()).compile()
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  result = dict(P=p, N=n, strategy=strategy, plan=plan.describe(), peak_bytes=peak,
                temp_bytes=m.temp_size_in_bytes, argument_bytes=m.argument_size_in_bytes,
                output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
                largest_buffer=largest_buffer(compiled.as_text()),
                compile_s=time.perf_counter() - t0)
  print(f"  step memory P={p} N={n} {strategy}: peak {peak / MiB:.1f} MiB "
        f"({result['compile_s']:.1f}s)", file=sys.stderr, flush=True)
  return result


def longest_sequence(p: int, budget: int, start: int, refine: int, cap: int = 1 << 21,
                     measure=None, grid: int | None = None) -> dict:
  """Largest N on the grid whose step peak fits ``budget``.

  Doubling from ``start`` (halving if it does not fit) until N reaches ``cap``, then ``refine``
  bisection steps between the last N that fits and the first that does not. ``measure(p, n)``
  returns a dict with peak_bytes (default: the Llama step's ``step_memory``); the grid defaults
  to the multiples of both MEM_BLOCK and P.
  """
  measure = measure or step_memory
  grid = grid or MEM_BLOCK * p // math.gcd(MEM_BLOCK, p)
  snap = lambda n: max(grid, grid * (n // grid))
  tried = []

  def fits(n):
    r = measure(p, n)
    tried.append(dict(N=n, peak_bytes=r["peak_bytes"], fits=r["peak_bytes"] <= budget))
    return r["peak_bytes"] <= budget

  n = snap(start)
  lo, hi = (n, None) if fits(n) else (0, n)
  while hi is None and lo < cap:
    hi = None if fits(2 * lo) else 2 * lo
    lo = 2 * lo if hi is None else lo
  while lo == 0 and hi > grid:
    m = snap(hi // 2)
    lo, hi = (m, hi) if fits(m) else (0, m)
  for _ in range(refine):
    if hi is None or hi - lo <= grid:
      break
    mid = snap((lo + hi) // 2)
    if mid <= lo:
      break
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return dict(P=p, max_n=lo, first_fail=hi, budget_bytes=budget, tried=tried)


DIAGNOSTIC_VARIANTS = {"positions_loop_invariant": "invariant",
                       "positions_per_layer": "per_layer",
                       "invariant_tied_by_barrier": "tied"}


def hoisting_diagnostic(strategy: str, p: int, n: int) -> dict:
  """Why step memory grows as N²: sequence-parallel attention inside a scanned layer stack.

  Two layers (MODEL's width and heads) of the real attention function (parallel/attention.py)
  under ``lax.scan`` and ``jax.grad``; positions either loop-invariant, as nets/llama.py passes
  them (nn.broadcast), or fed per layer as scanned inputs. Everything else is identical.
  """
  plan, fn, mesh, spec = _attention(p, n, strategy)
  heads, width = MODEL["num_heads"], MODEL["d_model"]

  def layer(x, w, positions):
    q = jax.lax.with_sharding_constraint((x @ w).reshape(1, n, heads, width // heads), spec)
    return x + fn(q, q, q, causal=True, positions_BxS=positions).reshape(1, n, width)

  def invariant(ws, x):
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, n))
    return jax.lax.scan(lambda x, w: (layer(x, w, positions), None), x, ws)[0].sum()

  def per_layer(ws, x):
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (ws.shape[0], 1, n))
    return jax.lax.scan(lambda x, a: (layer(x, *a), None), x, (ws, positions))[0].sum()

  def invariant_tied(ws, x):
    # The candidate fix: an optimization_barrier that ties the positions to the layer's input
    # makes them loop-variant as far as AD's partial evaluation can tell.
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, n))

    def body(x, w):
      x, tied = jax.lax.optimization_barrier((x, positions))
      return layer(x, w, tied), None
    return jax.lax.scan(body, x, ws)[0].sum()

  ws = jax.ShapeDtypeStruct((MODEL["num_layers"], width, width), jnp.float32)
  x = jax.ShapeDtypeStruct((1, n, width), jnp.float32,
                           sharding=NamedSharding(mesh, PartitionSpec(None, "seq", None)))
  out = dict(strategy=strategy, plan=plan.describe(), P=p, N=n,
             mask_bytes_all_pairs=n * n * heads // p)
  with jax.set_mesh(mesh):
    for name, f in DIAGNOSTIC_VARIANTS.items():
      f = {"invariant": invariant, "per_layer": per_layer, "tied": invariant_tied}[f]
      compiled = jax.jit(jax.grad(f)).lower(ws, x).compile()
      out[name] = dict(temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                       largest_buffer=largest_buffer(compiled.as_text()))
  return out


# ----------------------------------------------------------------------------- report


def _ops(by_op: dict) -> str:
  return ", ".join(f"{v['executions']}x {k}" for k, v in sorted(by_op.items())) or "none"


def markdown(doc: dict) -> str:
  s, mib, table = doc["settings"], harness.mib, harness.table
  rows = []
  for r in doc["communication"]:
    formula = (ulysses_formula_bytes(r["N"], r["P"])
               if r["strategy"] == "ulysses" and r["P"] > 1 else None)
    ratio = (f"{r['forward']['buffer_bytes'] / formula:.3f}"
             if formula and r["plan_strategy"] != "local" else "-")
    rows.append([r["P"], r["N"], r["strategy"], r["plan_strategy"],
                 mib(r["forward"]["buffer_bytes"]), mib(r["forward"]["wire_bytes"]),
                 mib(formula), ratio, _ops(r["forward"]["by_op"]),
                 mib(r["forward_backward"]["buffer_bytes"]), mib(r["fwd_bwd_temp_bytes"])])
  out = [harness.heading("Sequence-parallel benchmark", doc),
         "## 1. Bytes communicated per device per attention layer (from compiled HLO)", "",
         f"B={ATT['batch']}, H={ATT['heads']}, D={ATT['head_dim']}, causal, float32, N = "
         f"{s['tokens_per_device']}·P; MiB = 2^20 bytes; buffer and wire as parallel/hlo.py "
         "counts them; formula = 4·N·h/P × 4 B.", "",
         table(["P", "N", "strategy", "plan", "fwd buffer MiB", "fwd wire MiB", "formula MiB",
                "buffer/formula", "fwd collectives (executions)", "fwd+bwd buffer MiB",
                "fwd+bwd temp MiB"], rows), ""]

  rows = [[r["P"], r["N"], r["strategy"], mib(r["peak_bytes"]), mib(r["temp_bytes"]),
           mib(r["argument_bytes"]), f"{r['peak_bytes'] / doc['memory']['p1_peak_bytes']:.3f}",
           f"{r['largest_buffer']['shape']} ({mib(r['largest_buffer']['bytes'])})"]
          for r in doc["memory"]["rows"]]
  out += ["## 2. Per-device peak memory of a whole Llama train step at fixed N", "",
          f"Model {MODEL}, batch 1, blockwise kernel (block {MEM_BLOCK}), AdamW; peak = argument "
          "+ output - alias + temp (state donated).", "",
          table(["P", "N", "strategy", "peak MiB", "temp MiB", "argument MiB", "peak / P=1 peak",
                 "largest buffer (MiB)"], rows), ""]

  ms = doc["max_sequence"]
  rows = [[r["P"], r["max_n"], r["first_fail"] if r["first_fail"] else "-",
           f"{r['max_n'] / max(ms['rows'][0]['max_n'], 1):.2f}", r["P"], len(r["tried"])]
          for r in ms["rows"]]
  out += ["## 3. Longest sequence whose train step fits the per-device budget", "",
          f"Budget {ms['budget_mib']} MiB per device, Ulysses; N on multiples of {MEM_BLOCK}, "
          f"doubling then {s['refine']} bisection steps; log-log slope of max N vs P "
          f"{ms['loglog_slope'] or float('nan'):.2f} (linear = 1).", "",
          table(["P", "max N", "first N that does not fit", "max N / max N(P=1)",
                 "linear expectation", "compiles"], rows), ""]

  rows = [[r["P"], r["N"], r["strategy"], r["plan_strategy"], f"{r['median_s'] * 1e3:.1f}",
           " ".join(f"{x * 1e3:.0f}" for x in r["runs_s"])] for r in doc["step_time"]]
  out += ["## 4. Attention forward+backward time (simulated CPU devices)", "",
          f"N = {s['time_tokens_per_device']}·P; median of {s['repeats']} runs after a warm-up. "
          "The devices share the host's cores: not a scaling result.", "",
          table(["P", "N", "strategy", "plan", "median ms", "runs ms"], rows), ""]

  rows = [[d["plan"], d["P"], d["N"], k, mib(d[k]["temp_bytes"]),
           f"{d[k]['largest_buffer']['shape']} ({mib(d[k]['largest_buffer']['bytes'])})"]
          for d in doc.get("hoisting_diagnostic") or [] for k in DIAGNOSTIC_VARIANTS]
  if rows:
    out += ["## Diagnostic: attention inside a scanned layer stack, under jax.grad", "",
            f"{MODEL['num_layers']} layers of parallel/attention.py in lax.scan; positions "
            "loop-invariant, per layer, or tied to the layer input by an optimization_barrier.",
            "", table(["attention", "P", "N", "positions", "temp MiB per device",
                       "largest buffer (MiB)"], rows), ""]
  return "\n".join(out + [harness.expectations(doc["checks"])])


def plot(doc: dict, plt):
  """Bytes per device, train-step memory and the longest N, each vs P."""
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ax = axes[0]
  for s in STRATEGIES:
    rows = [r for r in doc["communication"] if r["strategy"] == s]
    ax.plot([r["P"] for r in rows], [r["forward"]["buffer_bytes"] / MiB for r in rows], "o-",
            label=s)
  ps = sorted({r["P"] for r in doc["communication"] if r["P"] > 1})
  tpd = doc["settings"]["tokens_per_device"]
  ax.plot(ps, [ulysses_formula_bytes(tpd * p, p) / MiB for p in ps], "k--", lw=1, zorder=0,
          label="4·N·h/P × 4 B")
  ax.set(xscale="log", xticks=DEVICE_COUNTS, xticklabels=DEVICE_COUNTS, xlabel="P (seq devices)",
         ylabel="MiB per device per layer (forward)",
         title=f"Communication, N = {tpd}·P, h = {ATT['heads'] * ATT['head_dim']}")
  ax.legend()

  ax = axes[1]
  rows = [r for r in doc["memory"]["rows"] if r["strategy"] == "ulysses"]
  p1 = doc["memory"]["p1_peak_bytes"]
  ax.plot([r["P"] for r in rows], [r["peak_bytes"] / MiB for r in rows], "o-", label="ulysses")
  ax.plot([r["P"] for r in rows], [p1 / r["P"] / MiB for r in rows], "k--", label="P=1 peak / P")
  ax.set(xscale="log", yscale="log", xticks=DEVICE_COUNTS, xticklabels=DEVICE_COUNTS,
         xlabel="P", ylabel="peak MiB per device",
         title=f"Train-step memory, N = {doc['memory']['N']}")
  ax.legend()

  ax = axes[2]
  rows = doc["max_sequence"]["rows"]
  ax.plot([r["P"] for r in rows], [r["max_n"] for r in rows], "o-", label="measured max N")
  ax.plot([r["P"] for r in rows], [rows[0]["max_n"] * r["P"] for r in rows], "k--",
          label="linear in P")
  ax.set(xscale="log", yscale="log", xticks=DEVICE_COUNTS, xticklabels=DEVICE_COUNTS,
         xlabel="P", ylabel="longest N",
         title=f"Longest N within {doc['max_sequence']['budget_mib']} MiB/device")
  ax.legend()
  for ax in axes:
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  return fig


# ----------------------------------------------------------------------------- checks


def checks(doc: dict) -> list[dict]:
  """What must hold of the figures (tests/parallel/test_hlo.py checks the Ulysses bytes and the
  ring's trips on a small layer)."""
  out, _mib, comm = [], harness.mib, doc["communication"]
  uly = [r for r in comm if r["strategy"] == "ulysses" and r["P"] > 1]
  for r in uly:
    ratio = r["forward"]["buffer_bytes"] / ulysses_formula_bytes(r["N"], r["P"])
    out.append(dict(name=f"Ulysses fwd bytes within 10% of 4·N·h/P·4 B (P={r['P']})",
                       holds=abs(ratio - 1) <= 0.10,
                       detail=f"{_mib(r['forward']['buffer_bytes'])} MiB measured vs "
                              f"{_mib(ulysses_formula_bytes(r['N'], r['P']))} MiB, ratio "
                              f"{ratio:.3f}"))
  if len(uly) > 1:
    vals = [r["forward"]["buffer_bytes"] for r in uly]
    out.append(dict(name="Ulysses bytes constant when N ∝ P (max/min ≤ 1.10)",
                       holds=max(vals) / min(vals) <= 1.10,
                       detail=f"{', '.join(_mib(v) for v in vals)} MiB for P="
                              f"{[r['P'] for r in uly]}; max/min {max(vals) / min(vals):.3f}"))
  top = max(r["P"] for r in comm)
  at_top = {r["strategy"]: r for r in comm if r["P"] == top}
  if top > 1:
    for conv in ("buffer_bytes", "wire_bytes"):
      u, a = at_top["ulysses"]["forward"][conv], at_top["allgather"]["forward"][conv]
      out.append(dict(name=f"P={top}: Ulysses ≤ ½ of allgather ({conv.split('_')[0]})",
                         holds=u <= a / 2,
                         detail=f"{_mib(u)} vs {_mib(a)} MiB, ratio {u / a:.3f}"))
  for r in comm:
    if r["ring_expected_trips"] is not None:
      trips = r["forward"]["collective_permute_trips"]
      out.append(dict(name=f"ring collective-permute executions per pass = P-1 (P={r['P']})",
                         holds=trips == [r["ring_expected_trips"]],
                         detail=f"HLO: {trips}, plan.ring-1: {r['ring_expected_trips']}"))
  unknown = sum(r["forward"]["loops_of_unknown_length"] for r in comm)
  out.append(dict(name="every loop around a collective has a known trip count", holds=not unknown,
                     detail=f"{unknown} loop(s) of unknown length, their collectives counted once"))

  mem = doc["memory"]
  p8 = [r for r in mem["rows"] if r["strategy"] == "ulysses" and r["P"] == top]
  if p8 and top > 1:
    ratio = p8[0]["peak_bytes"] / mem["p1_peak_bytes"]
    out.append(dict(name=f"train-step peak at P={top} ≤ 1/6 of P=1 (N={mem['N']}, Ulysses)",
                       holds=ratio <= 1 / 6,
                       detail=f"{_mib(p8[0]['peak_bytes'])} vs {_mib(mem['p1_peak_bytes'])} MiB, "
                              f"ratio {ratio:.3f} (1/P = {1 / top:.3f})"))

  ms = doc["max_sequence"]
  if len(ms["rows"]) > 1:
    last = ms["rows"][-1]
    growth = last["max_n"] / max(ms["rows"][0]["max_n"], 1)
    out.append(dict(name=f"longest N grows about linearly with P (max N(P={last['P']}) / "
                            f"max N(1) ≥ 0.75·{last['P']})",
                       holds=growth >= 0.75 * last["P"],
                       detail=f"{', '.join(str(r['max_n']) for r in ms['rows'])} for P="
                              f"{[r['P'] for r in ms['rows']]}; growth {growth:.2f}x, log-log "
                              f"slope {ms['loglog_slope'] or float('nan'):.2f}"))

  return out


# ----------------------------------------------------------------------------- main


def _per_strategy(counts: list[int], measure) -> list[dict]:
  """``measure(p, strategy)`` for every P and strategy; at P=1 all strategies are one local
  kernel with no communication, measured once."""
  rows = []
  for p in counts:
    for s in STRATEGIES:
      rows.append(dict(rows[0], strategy=s) if p == 1 and rows else measure(p, s))
  return rows


def run(args) -> dict:
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  if args.budget_mib:
    settings["budget_mib"] = args.budget_mib
  counts = [p for p in DEVICE_COUNTS if p <= jax.device_count()]
  fixed_n = settings["fixed_n"]
  harness.log("1/5 communication (compile only)")
  per_device, timed_per_device = settings["tokens_per_device"], settings["time_tokens_per_device"]
  comm = _per_strategy(counts, lambda p, s: attention_bench(p, per_device * p, s))
  harness.log("2/5 attention forward+backward time")
  times = _per_strategy(counts, lambda p, s: attention_time(p, timed_per_device * p, s,
                                                           settings["repeats"]))
  harness.log("3/5 train-step memory at fixed N")
  mem_rows = [step_memory(p, fixed_n) for p in counts]
  if settings["extra_strategies"] and counts[-1] > 1:
    mem_rows += [step_memory(counts[-1], fixed_n, s) for s in STRATEGIES if s != "ulysses"]
  harness.log("4/5 longest sequence within the budget")
  search, start_n = [], settings["search_start"]
  for p in counts:
    search.append(longest_sequence(p, settings["budget_mib"] * MiB, start_n, settings["refine"]))
    start_n = max(search[-1]["max_n"], settings["search_start"])  # memory falls with P
  slope = (float(np.polyfit(np.log([r["P"] for r in search]), np.log([r["max_n"] for r in search]),
                            1)[0]) if len(search) > 1 and all(r["max_n"] for r in search)
           else None)
  harness.log("5/5 diagnostic: attention in a scanned layer stack")
  diagnostic = [hoisting_diagnostic("ulysses", 1, fixed_n // 2)]
  if counts[-1] > 1:
    diagnostic.append(hoisting_diagnostic("ring", counts[-1], fixed_n // 2))

  doc = dict(
      benchmark="seq_parallel", mode=mode, settings=settings, devices=jax.device_count(),
      skipped_device_counts=[p for p in DEVICE_COUNTS if p > jax.device_count()],
      attention_shape=ATT, model=MODEL, communication=comm, step_time=times,
      memory=dict(N=fixed_n, rows=mem_rows, p1_peak_bytes=mem_rows[0]["peak_bytes"]),
      max_sequence=dict(budget_mib=settings["budget_mib"], rows=search, loglog_slope=slope),
      hoisting_diagnostic=diagnostic)
  doc["checks"] = checks(doc)
  return doc


def main(argv=None) -> dict:
  return harness.main("seq_parallel", __doc__, run, markdown, plot, argv=argv, flags=[
      ("--budget_mib", dict(type=int, default=None,
                            help="per-device memory budget for item 3 (default: 1024, quick: "
                                 "128)"))])


if __name__ == "__main__":
  main()
