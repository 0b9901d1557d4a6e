"""Compile time of the Llama train step vs depth, and how many compilations a training run makes.

  .venv/bin/python -m bench.compile [--quick] [--out=bench/results] [--repeats=N]

On the loop's default mesh (data = 8 simulated CPU devices): (1) ``train.loop.run`` in a temporary
workdir, counting every trace and XLA compilation per function (the train and eval steps must
compile once); (2) a fresh train step per depth, lowered and compiled, timed in rounds over the
depths (median per depth). Writes compile.{json,md,png}; docs/performance.md explains the figures.
"""

import re
import statistics
import tempfile
import threading
import time

import jax

from bench import harness
from configs import lm
from train import loop
from train import program as program_lib

SETTINGS = {
    # Model size, global batch x sequence, the depths timed and how many rounds over them, and
    # the training run whose compilations are counted (steps; checkpoint, log, eval intervals;
    # sampled tokens at the end).
    "full": dict(size="tiny", batch=16, seq=128, layers=(4, 8, 16, 24), repeats=3,
                 run_steps=50, ckpt_every=10, log_every=10, eval_every=25, sample_tokens=32),
    "quick": dict(size="test", batch=8, seq=32, layers=(2, 8), repeats=1,
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
  s, run, model = doc["settings"], doc["loop_run"], doc["model"]
  times = doc["compile_times"]
  rows = [[t["layers"], f"{t['params']:,}", f"{t['lower_s']:.2f}", f"{t['compile_s']:.2f}",
           ", ".join(f"{x:.2f}" for x in t["compile_s_all"]),
           f"{t['compile_s'] / times[0]['compile_s']:.2f}"] for t in times]
  functions = [[name, f["traces"], f["compiles"], f"{f['compile_s']:.2f}"]
               for name, f in run["functions"].items()]
  return "\n".join([
      harness.heading("Compile benchmark", doc),
      f"configs/lm.py size={s['size']} (d_model {model['d_model']}, {model['num_heads']} heads, "
      f"MLP {model['mlp_dim']}), batch {s['batch']} x {s['seq']}, float32, AdamW, mesh "
      f"data={doc['environment']['devices']}; the train step as train/loop.py jits it.", "",
      "## Compile time vs depth (layers stacked with nn.scan)", "",
      f"Seconds, median of {s['repeats']} per depth, each a fresh step function; lower = trace "
      "+ lower to StableHLO, compile = XLA.", "",
      harness.table(["layers", "params", "lower s", "compile s", "compile s (all)",
                     f"vs {times[0]['layers']} layers"], rows), "",
      f"## Compilations during a {run['steps']}-step `train.loop.run`", "",
      f"Checkpoints every {s['ckpt_every']} steps (async; steps {run['checkpoints']} kept), "
      f"metrics every {s['log_every']}, {run['evaluations']} evaluations, {s['sample_tokens']} "
      f"sampled tokens; {run['wall_s']:.0f} s wall; {run['total_compiles']} XLA compilations "
      f"({run['total_compile_s']:.1f} s).", "",
      harness.table(["function", "traces", "XLA compilations", "compile s"], functions), "",
      harness.expectations(doc["checks"])])


def plot(doc: dict, plt):
  """Compile time vs depth, and the compile seconds of each function in the loop run."""
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
  return fig


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  if args.repeats:
    settings["repeats"] = args.repeats
  if settings["batch"] % jax.device_count():
    raise ValueError(f"batch {settings['batch']} is not divisible by the "
                     f"{jax.device_count()} devices.")
  # The training run goes first: it also warms up what every later compile shares (XLA's
  # one-time set-up), so the first timed depth is not charged for it.
  harness.log(f"training {settings['run_steps']} steps through train.loop.run")
  loop_run = count_loop_compilations(settings)
  harness.log(f"timing compiles: {settings['repeats']} round(s) over num_layers "
              f"{settings['layers']}")
  measured = {n: [] for n in settings["layers"]}
  for _ in range(settings["repeats"]):  # rounds: a busy spell on the host slows every depth
    for n in settings["layers"]:
      measured[n].append(time_compile(settings, n))
      harness.log(f"  {n:3d} layers: lower {measured[n][-1]['lower_s']:.2f} s, compile "
                  f"{measured[n][-1]['compile_s']:.2f} s")
  times = [dict(layers=n, params=ms[0]["params"],
                lower_s=statistics.median(m["lower_s"] for m in ms),
                compile_s=statistics.median(m["compile_s"] for m in ms),
                lower_s_all=[m["lower_s"] for m in ms], compile_s_all=[m["compile_s"] for m in ms],
                xla_compiles=[m["xla_compiles"] for m in ms]) for n, ms in measured.items()]
  config = lm_config(settings)
  doc = dict(benchmark="compile", mode=mode, settings=settings,
             model=dict(size=settings["size"], d_model=config.model.d_model,
                        num_heads=config.model.num_heads, mlp_dim=config.model.mlp_dim),
             loop_run=loop_run, compile_times=times,
             ratio=times[-1]["compile_s"] / times[0]["compile_s"])
  doc["ratio_holds"] = doc["ratio"] <= MAX_RATIO
  doc["checks"] = checks(doc)
  return doc


def main(argv=None) -> dict:
  return harness.main("compile", __doc__, run, markdown, plot, argv=argv, flags=[
      ("--repeats", dict(type=int, default=None,
                         help="compile-time rounds over the depths (default: 3, quick: 1)"))])


if __name__ == "__main__":
  main()
