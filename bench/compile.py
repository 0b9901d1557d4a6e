"""Compile time of the Llama train step vs depth, and how many compilations a training run makes.

  .venv/bin/python -m bench.compile [--quick] [--out=bench/results] [--repeats=N]

Runs on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 unless the
environment already sets a count), on the loop's default mesh: data = all 8 devices.

  1. Compilations during a training run: ``train.loop.run`` (the real loop, configs/lm.py) in a
     temporary workdir, with checkpoints, metric logging, evaluation and a final sample. JAX
     reports every trace, lowering and XLA compilation through ``jax.monitoring`` with the
     function's name; ``CompileCounter`` counts them per function. The train step (the
     ``train_step`` that ``train.steps.make_train_step`` returns, which the loop jits once) must
     be traced and compiled exactly once: a second trace would mean a retrace from a Python
     scalar, a changed shape or dtype, or a config object reaching the step. The eval step must
     compile once too; everything else compiled (initialisation, the sampler, small programs
     Orbax and start-up run) is listed for information.
  2. Compile time vs depth: the same train step (``loop_program``: built exactly as the loop
     builds it, jitted with the state's and batch's shardings and the state donated) for
     num_layers 4, 8, 16, 24 at one width (size=tiny: d_model 128). Each measurement builds a
     fresh step function, so nothing is served from JAX's caches (the script checks that every
     ``compile()`` ran one XLA compilation), and times ``jitted.lower(abstract state, batch)``
     (tracing + lowering) and ``.compile()`` (XLA) apart. Sizes are measured in rounds, so a busy
     spell on the shared host slows every size alike; the figure is the median per size. The
     layers are stacked with ``nn.scan``, so XLA compiles one layer body whatever the depth and
     the 24/4 compile-time ratio should be at most 1.5.

Prints a JSON summary and markdown tables, and writes compile.{json,md} (and compile.png when
matplotlib is installed) to --out. Expectations that do not hold are printed as not holding.

What to expect (2 cores shared with other jobs): the full run takes 2.5-4 minutes; the train
step compiles in 6-13 s depending on the load, at every depth alike (24/4 ratio about 0.95-1.05),
and is traced and compiled exactly once over the 50-step run, as is the eval step; Orbax's first
checkpoint save compiles 72 small ``slice`` programs (its replica-parallel save on 8 simulated
devices, 3-4 s). --quick (size=test, batch 8 x 32, 12 steps, depths 4 and 24 once) takes 20-30 s
with the test suite's fast-compile flags.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time

_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):  # a count the user chose is respected
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_COUNT_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from bench import report  # noqa: E402
from bench.seq_parallel import _table  # noqa: E402
from configs import lm  # noqa: E402
from train import loop  # noqa: E402
from train import program as program_lib  # noqa: E402

SETTINGS = {
    # Model size, global batch x sequence, the depths timed and how many rounds over them, and
    # the training run whose compilations are counted (steps; checkpoint, log, eval intervals;
    # sampled tokens at the end).
    "full": dict(size="tiny", batch=16, seq=128, layers=(4, 8, 16, 24), repeats=3,
                 run_steps=50, ckpt_every=10, log_every=10, eval_every=25, sample_tokens=32),
    "quick": dict(size="test", batch=8, seq=32, layers=(4, 24), repeats=1,
                  run_steps=12, ckpt_every=4, log_every=2, eval_every=6, sample_tokens=8),
}
MAX_RATIO = 1.5  # compile time at the deepest / the shallowest depth, with the layers scanned


# ----------------------------------------------------------------------------- counting


_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "traces",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowerings",
           "/jax/core/compile/backend_compile_duration": "compiles"}


class CompileCounter:
  """Counts JAX traces, lowerings and XLA compilations per function name while entered.

  JAX reports each one through ``jax.monitoring`` duration events carrying the function's name
  ("train_step" when tracing, "jit(train_step)" when lowering and compiling); both count under
  the bare name. Every call of a jitted function that misses JAX's caches traces it again, so a
  retrace shows up as a second trace even where the compiled program happens to be reused.
  """

  def __init__(self):
    self.functions = {}
    self._lock = threading.Lock()  # Orbax and grain threads may compile too

  def _listen(self, event: str, duration: float, **kwargs):
    kind = _EVENTS.get(event)
    if kind is None:
      return
    name = bare_name(str(kwargs.get("fun_name", "?")))
    with self._lock:
      entry = self.functions.setdefault(
          name, dict(traces=0, lowerings=0, compiles=0, trace_s=0.0, compile_s=0.0))
      entry[kind] += 1
      if kind in ("traces", "compiles"):
        entry[kind[:-1] + "_s"] += duration

  def count(self, name: str, kind: str = "compiles") -> int:
    return self.functions.get(name, {}).get(kind, 0)

  def total(self, kind: str = "compiles") -> int:
    return sum(f[kind] for f in self.functions.values())

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def bare_name(name: str) -> str:
  """"jit(train_step)" / "jit_train_step" / "pmap(train_step)" -> "train_step"."""
  match = re.fullmatch(r"(?:jit|pmap)\((.*)\)", name) or re.fullmatch(r"(?:jit|pmap)_(.*)", name)
  return match.group(1) if match else name


# ----------------------------------------------------------------------------- the loop's step


def lm_config(settings: dict, num_layers: int | None = None):
  """configs/lm.py at ``settings``' size, batch and sequence length; the default mesh (data=all)."""
  config = lm.get_config(f"size={settings['size']}")
  if num_layers is not None:
    config.model.num_layers = num_layers
  config.train.update(batch_size=settings["batch"], seq_len=settings["seq"])
  config.eval.batch_size = settings["batch"]
  return config


def loop_program(config) -> dict:
  """The mesh loop's train step for ``config``, built and jitted exactly as train/loop.py does.

  Returns the jitted step (call, lower or compile it inside ``program["context"]()``: the mesh
  and logical rules its tracing needs), the abstract state and batch to lower it with, what
  initialises a real state, and the names JAX reports the train and eval steps under. Every call
  builds a fresh step function, so jitting it never hits a cache filled by an earlier call.
  """
  program = program_lib.build(config)
  abstract = program.abstract_state
  return dict(step=program.train_step, abstract=abstract,
              abstract_batch=program.abstract_batch(), context=program.context,
              init=program.init, to_device=program.train_batch, task=program.task,
              mesh=program.mesh, params=sum(a.size for a in jax.tree.leaves(abstract.params)),
              train_name=program.train_step.__name__, eval_name=program.eval_step.__name__)


# ----------------------------------------------------------------------------- measurements


def count_loop_compilations(settings: dict) -> dict:
  """Runs ``train.loop.run`` for ``run_steps`` steps in a temporary workdir, counting compiles."""
  config = lm_config(settings)
  config.train.steps = settings["run_steps"]
  config.ckpt.update(every=settings["ckpt_every"], keep=2, async_save=True)
  config.log.update(every=settings["log_every"], progress=False)
  config.eval.update(every=settings["eval_every"], steps=2)
  config.sample.update(max_new_tokens=settings["sample_tokens"], num_samples=2)
  names = loop_program(config)  # only for the names; its step is never traced
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir, CompileCounter() as counter:
    summary = loop.run(config, workdir)
  train, evals = names["train_name"], names["eval_name"]
  return dict(
      steps=summary["final_step"], wall_s=time.perf_counter() - start,
      checkpoints=summary["checkpoints"],
      evaluations=1 + len(range(settings["eval_every"], settings["run_steps"] + 1,
                                settings["eval_every"]))
      + (settings["run_steps"] % settings["eval_every"] != 0),
      train_name=train, eval_name=evals,
      train_step_traces=counter.count(train, "traces"),
      train_step_compiles=counter.count(train),
      eval_step_traces=counter.count(evals, "traces"), eval_step_compiles=counter.count(evals),
      total_compiles=counter.total(), total_compile_s=sum(
          f["compile_s"] for f in counter.functions.values()),
      functions=dict(sorted(counter.functions.items(), key=lambda kv: -kv[1]["compile_s"])))


def time_compile(settings: dict, num_layers: int) -> dict:
  """Lowers and compiles a fresh train step of ``num_layers`` layers; wall times in seconds."""
  program = loop_program(lm_config(settings, num_layers))
  with program["context"](), CompileCounter() as counter:
    start = time.perf_counter()
    lowered = program["step"].lower(program["abstract"], program["abstract_batch"])
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
  return dict(layers=num_layers, params=program["params"], lower_s=lowered_at - start,
              compile_s=compiled_at - lowered_at,
              xla_compiles=counter.count(program["train_name"]))


# ----------------------------------------------------------------------------- report


def environment() -> dict:
  """The host and JAX a benchmark ran on (bench/host.py shares it)."""
  return dict(jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
              xla_flags=os.environ.get("XLA_FLAGS", ""), host_cores=os.cpu_count(),
              load_average=[os.getloadavg()[0]], machine=platform.machine(),
              python=platform.python_version())


def machine_line(env: dict) -> str:
  load = " / ".join(f"{x:.1f}" for x in env["load_average"])
  return (f"Machine: {env['host_cores']} CPU cores ({env['machine']}), {env['devices']} simulated "
          f"JAX devices on backend `{env['backend']}`, jax {env['jax']}, python {env['python']}; "
          f"1-minute load average {load} (start / end). Timings on a shared host are noisy: "
          "compare figures measured in the same run, not across runs or with an accelerator.")


def checks(doc: dict) -> list[dict]:
  run, times = doc["loop_run"], doc["compile_times"]
  out = [dict(name=f"train step traced and compiled once over the {run['steps']}-step run",
              holds=run["train_step_traces"] == 1 and run["train_step_compiles"] == 1,
              detail=f"{run['train_step_traces']} trace(s), {run['train_step_compiles']} "
                     "compilation(s)"),
         dict(name=f"eval step compiled once over {run['evaluations']} evaluations",
              holds=run["eval_step_compiles"] == 1,
              detail=f"{run['eval_step_traces']} trace(s), {run['eval_step_compiles']} "
                     "compilation(s)")]
  if len(times) > 1:
    out.append(dict(
        name=f"compile time {times[-1]['layers']} layers / {times[0]['layers']} layers "
             f"<= {MAX_RATIO}",
        holds=doc["ratio"] <= MAX_RATIO,
        detail=f"{doc['ratio']:.2f} ({times[-1]['compile_s']:.1f} s / "
               f"{times[0]['compile_s']:.1f} s, medians)"))
  fresh = all(n == 1 for t in times for n in t["xla_compiles"])
  out.append(dict(name="every timed compile() ran one XLA compilation (no cache hit)",
                  holds=fresh, detail=str([t["xla_compiles"] for t in times])))
  return out


def markdown(doc: dict) -> str:
  s, run = doc["settings"], doc["loop_run"]
  out = [f"# Compile benchmark ({doc['mode']})", "", machine_line(doc["environment"]), "",
         f"Byte-level Llama LM, configs/lm.py size={s['size']} (d_model "
         f"{doc['model']['d_model']}, {doc['model']['num_heads']} heads, MLP width "
         f"{doc['model']['mlp_dim']}), batch {s['batch']} x {s['seq']} tokens, float32, AdamW, "
         f"mesh data={doc['environment']['devices']}. The whole train step (forward, backward, "
         "update; state donated), built and jitted as train/loop.py does.", ""]
  rows = [[t["layers"], f"{t['params']:,}", f"{t['lower_s']:.2f}", f"{t['compile_s']:.2f}",
           ", ".join(f"{x:.2f}" for x in t["compile_s_all"]),
           f"{t['compile_s'] / doc['compile_times'][0]['compile_s']:.2f}"]
          for t in doc["compile_times"]]
  out += ["## Compile time vs depth (layers stacked with nn.scan)", "",
          f"Seconds; median of {s['repeats']} per depth, each from a fresh step function. "
          "`lower` = tracing + lowering to StableHLO, `compile` = `.compile()` (XLA).", "",
          _table(["layers", "params", "lower s", "compile s", "compile s (all)",
                  f"vs {doc['compile_times'][0]['layers']} layers"], rows), ""]
  rows = [[name, f["traces"], f["compiles"], f"{f['compile_s']:.2f}"]
          for name, f in run["functions"].items()]
  out += [f"## Compilations during a {run['steps']}-step `train.loop.run`", "",
          f"Checkpoints every {s['ckpt_every']} steps (async; steps {run['checkpoints']} kept), "
          f"metrics every {s['log_every']}, {run['evaluations']} evaluations, "
          f"{s['sample_tokens']} sampled tokens at the end; {run['wall_s']:.0f} s wall. "
          f"{run['total_compiles']} XLA compilations ({run['total_compile_s']:.1f} s), by "
          "function (JAX's names; `train_step` is the jitted step, `eval_fn` the eval step):", "",
          _table(["function", "traces", "XLA compilations", "compile s"], rows), ""]
  rows = [[c["name"], "yes" if c["holds"] else "**NO**", c["detail"]] for c in doc["checks"]]
  out += ["## Expectations", "", _table(["expectation", "holds", "measured"], rows), ""]
  out += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
  return "\n".join(out)


def notes(doc: dict) -> list[str]:
  run = doc["loop_run"]
  out = []
  slices = run["functions"].get("slice")
  if slices and slices["compiles"] > 1:
    out.append(
        f"`slice` ({slices['compiles']} compilations, {slices['compile_s']:.1f} s): Orbax's "
        "replica-parallel save splits every replicated array's shards over the "
        f"{doc['environment']['devices']} devices holding a copy and slices each device's part "
        "with an eager `jax.lax.slice_in_dim`, one compiled program per distinct (shape, slice, "
        "device); JAX caches them, so only the first checkpoint save pays (bench/host.py "
        "reports that save's time).")
  out.append("The other programs compile once per run: `<lambda>` is the sharded "
             "initialisation; `dot`, `broadcast_in_dim` and `convert_element_type` the start-up "
             "measure of the host's matmul peak (train/flops.py); `add` the eager sum of eval "
             "batches in the loop's `evaluate`; `_sample`, `stage` and `_threefry_seed` the "
             "sampler and its set-up. `init_boxed` is traced for shapes only (`eval_shape`).")
  return out


def plot(doc: dict, path: str) -> str | None:
  """compile.png; returns a message instead when matplotlib is missing."""
  try:
    import matplotlib
  except ImportError:
    return "matplotlib is not installed; skipped the plot."
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  times = doc["compile_times"]
  layers = [t["layers"] for t in times]
  for t in times:
    axes[0].plot([t["layers"]] * len(t["compile_s_all"]), t["compile_s_all"], "o", color="C0",
                 alpha=0.4)
  axes[0].plot(layers, [t["compile_s"] for t in times], "o-", color="C0", label="XLA compile")
  axes[0].plot(layers, [t["lower_s"] for t in times], "s-", color="C1", label="trace + lower")
  axes[0].axhline(MAX_RATIO * times[0]["compile_s"], color="k", ls="--", lw=1,
                  label=f"{MAX_RATIO}x compile at {layers[0]} layers")
  axes[0].set(xlabel="num_layers", ylabel="seconds", title="Train-step compile time (nn.scan)",
              ylim=(0, None), xticks=layers)
  axes[0].legend(loc="center right")
  functions = doc["loop_run"]["functions"]
  names = [n for n, f in functions.items() if f["compiles"]]
  axes[1].barh(names, [functions[n]["compile_s"] for n in names], color="C2")
  for i, n in enumerate(names):
    axes[1].annotate(f" {functions[n]['compiles']}x", (functions[n]["compile_s"], i),
                     va="center")
  axes[1].invert_yaxis()
  axes[1].set_xlim(0, 1.15 * max(functions[n]["compile_s"] for n in names))
  axes[1].set(xlabel="XLA compile seconds (count at the bar's end)",
              title=f"Compilations in a {doc['loop_run']['steps']}-step loop run")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return None


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="size=test model, batch 8 x 32, depths 4 and 24 once, 12-step run")
  parser.add_argument("--out", default="bench/results", help="folder for json, md and png")
  parser.add_argument("--repeats", type=int, default=None,
                      help="compile-time rounds over the depths (default: 3, quick: 1)")
  args = parser.parse_args(argv)
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  if args.repeats:
    settings["repeats"] = args.repeats
  if settings["batch"] % jax.device_count():
    raise ValueError(f"batch {settings['batch']} is not divisible by the "
                     f"{jax.device_count()} devices.")
  start, env = time.perf_counter(), environment()

  # The training run goes first: it also warms up what every later compile shares (XLA's
  # one-time set-up), so the first timed depth is not charged for it.
  print(f"training {settings['run_steps']} steps through train.loop.run", file=sys.stderr,
        flush=True)
  run = count_loop_compilations(settings)
  print(f"timing compiles: {settings['repeats']} round(s) over num_layers {settings['layers']}",
        file=sys.stderr, flush=True)
  measured = {n: [] for n in settings["layers"]}
  for _ in range(settings["repeats"]):
    for n in settings["layers"]:
      measured[n].append(time_compile(settings, n))
      print(f"  {n:3d} layers: lower {measured[n][-1]['lower_s']:.2f} s, compile "
            f"{measured[n][-1]['compile_s']:.2f} s", file=sys.stderr, flush=True)
  times = [dict(layers=n, params=ms[0]["params"],
                lower_s=statistics.median(m["lower_s"] for m in ms),
                compile_s=statistics.median(m["compile_s"] for m in ms),
                lower_s_all=[m["lower_s"] for m in ms], compile_s_all=[m["compile_s"] for m in ms],
                xla_compiles=[m["xla_compiles"] for m in ms]) for n, ms in measured.items()]

  config = lm_config(settings)
  env["load_average"].append(os.getloadavg()[0])
  doc = dict(benchmark="compile", mode=mode, settings=settings, environment=env,
             model=dict(size=settings["size"], d_model=config.model.d_model,
                        num_heads=config.model.num_heads, mlp_dim=config.model.mlp_dim),
             loop_run=run, compile_times=times,
             ratio=times[-1]["compile_s"] / times[0]["compile_s"])
  doc["ratio_holds"] = doc["ratio"] <= MAX_RATIO
  doc["checks"], doc["notes"] = checks(doc), notes(doc)
  doc["wall_time_s"] = time.perf_counter() - start

  md = report.write(args.out, "compile", doc, markdown(doc), doc["wall_time_s"], plot)
  print(json.dumps({k: doc[k] for k in ("ratio", "ratio_holds")} | {
      "train_step_compiles": run["train_step_compiles"],
      "train_step_traces": run["train_step_traces"],
      "eval_step_compiles": run["eval_step_compiles"],
      "compile_s": {t["layers"]: round(t["compile_s"], 3) for t in times}}))
  print(md)
  return doc


if __name__ == "__main__":
  main()
