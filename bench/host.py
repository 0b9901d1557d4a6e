"""How long the device waits on the host during training: input pipeline, metrics, checkpoints.

  .venv/bin/python -m bench.host [--quick] [--out=bench/results] [--steps=N]

Runs on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 unless the
environment already sets a count), mesh data=8, the byte-level Llama of configs/lm.py (tiny:
4 layers, d_model 128) at batch 16 x 128 tokens.

What runs: ``train.loop.run``, the real loop, trains ``--steps`` steps in a temporary workdir
three times: grain prefetch with async checkpoints, prefetch with synchronous checkpoints, and
no prefetch (configs/lm.py's own data settings) with async checkpoints. It saves a checkpoint
every ``ckpt_every`` steps and fetches and writes metrics every ``log_every`` steps; evaluation
and sampling happen only before step 1 and after the last step. The timed window runs from step
``ckpt_every + 2`` to the last step: it starts after the first save (whose one-time cost is
reported apart) and holds the later saves, the metric fetches, the input pipeline (grain plus
the host->device copy of each batch) and the loop's Python. Over its W steps:

  host-wait fraction = 1 - W x t_device / (wall time of the W steps),

the share of the wall time in which the device was not running a train step.

How t_device is measured: inside the same run, from two host timestamps per step. The loop
calls ``should_stop(step)`` right after it has dispatched step s and read step s-1's non-finite
count (so step s-1 has finished on the device); ``train.loop.next_batch``, wrapped for the run
(monkeypatched, then restored), records when step s's batch is on the devices, just before step
s is dispatched. A step whose host then blocked on step s-1 for more than a quarter of a typical
step was queued while the device was busy; between two consecutive such steps the device ran
exactly one step, so the median interval between them is t_device under this run's own load. As
a cross-check ("vs pure") the same train step, built and jitted as the loop does, is timed
back-to-back on one batch fetched beforehand (``pure_steps`` steps dispatched without waiting)
before the first run and after every run; those measurements are a minute away from the window,
so they are noisier. Fractions below 0 (noise) show as 0; the JSON keeps the raw values. "From
step 2" is the same fraction over steps 2.. (the first save included). The wrapped ``next_batch``
and ``Checkpointer.save`` also give the host time of the input pipeline and of each save call:
host durations that may overlap device work, not stalls.

On CPU the "device" is the host's own cores: grain's reader thread, Orbax's background writes
and the loop's Python take cores from XLA, so the fractions overstate what an accelerator would
see, and they are noisy (2 shared cores).

Prints a JSON summary and a markdown table, and writes host.{json,md} (and host.png when
matplotlib is installed) to --out. The target (under 5% with prefetch and async checkpoints) is
printed as holding or not.

What to expect (2 cores shared with other jobs, load average 3-7): the full run takes about 4
minutes; with checkpoints every 10 steps (4 s apart) host-wait is about 4-5% with async saves,
nearly all of it the step after each save, and about 8% with synchronous saves; the device step
inside the loop matches the pure one within a few percent; the first save takes 4-7 s (Orbax
compiles its replica slices, see bench/compile.py); prefetch changes nothing measurable here
(batches come from memory in a few ms). --quick (size=test, batch 8 x 32, 12 steps, a save every
3 steps of under 100 ms) takes about 40 s with the test suite's fast-compile flags and only shows
that everything runs: saves dominate such short steps.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):  # a count the user chose is respected
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_COUNT_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)

from bench import report  # noqa: E402
from bench.compile import environment, lm_config, loop_program, machine_line  # noqa: E402
from bench.seq_parallel import _table  # noqa: E402
from train import checkpoint, loop  # noqa: E402

SETTINGS = {
    # Model size, global batch x sequence, steps per loop run, checkpoint and metric intervals,
    # and the back-to-back steps of each pure device-time measurement.
    "full": dict(size="tiny", batch=16, seq=128, steps=80, ckpt_every=10, log_every=10,
                 pure_steps=20),
    "quick": dict(size="test", batch=8, seq=32, steps=12, ckpt_every=3, log_every=3,
                  pure_steps=6),
}
# grain prefetches only with reader threads: with num_threads=0 (configs/lm.py's default)
# prefetch_buffer_size is ignored and each batch is read when the loop asks for it.
RUNS = (
    dict(name="prefetch, async ckpt", num_threads=1, prefetch=2, async_save=True),
    dict(name="prefetch, sync ckpt", num_threads=1, prefetch=2, async_save=False),
    dict(name="no prefetch, async ckpt", num_threads=0, prefetch=2, async_save=True),
)
TARGET = 0.05  # the host-wait fraction to stay under with prefetch and async checkpoints
BLOCKED = 0.25  # a step whose host waited this share of a typical step on the previous one
MIN_PAIRS = 3  # device-bound step pairs needed to trust the loop's own device step time


class Probe:
  """Host timestamps of one ``loop.run``: each step, each batch fetch and each checkpoint save."""

  def __init__(self):
    self.step_at = {}  # step -> perf_counter when the loop asked should_stop(step)
    self.batch_at = {}  # step -> perf_counter when its batch was on the devices (fresh runs)
    self.fetch_s, self.transfer_s, self.saves = [], [], []

  def should_stop(self, step: int) -> bool:
    self.step_at[step] = time.perf_counter()
    return False

  @contextlib.contextmanager
  def installed(self):
    """Times ``loop.next_batch`` and ``Checkpointer.save`` while entered; restores both after."""
    next_batch, save = loop.next_batch, checkpoint.Checkpointer.save

    def timed_next_batch(train_iter, to_device):
      start = time.perf_counter()
      local = next(train_iter)
      fetched = time.perf_counter()
      batch = to_device(local)
      self.batch_at[len(self.batch_at) + 1] = time.perf_counter()
      self.fetch_s.append(fetched - start)
      self.transfer_s.append(self.batch_at[len(self.batch_at)] - fetched)
      return batch

    def timed_save(ckpt, step, state, *args, **kwargs):
      ready = all(leaf.is_ready() for leaf in jax.tree.leaves(state))
      start = time.perf_counter()
      saved = save(ckpt, step, state, *args, **kwargs)
      self.saves.append(dict(step=step, seconds=time.perf_counter() - start,
                             state_was_ready=ready))
      return saved

    loop.next_batch, checkpoint.Checkpointer.save = timed_next_batch, timed_save
    try:
      yield self
    finally:
      loop.next_batch, checkpoint.Checkpointer.save = next_batch, save


def run_loop(settings: dict, spec: dict) -> dict:
  """One ``train.loop.run`` with ``spec``'s data and checkpoint settings; its host timings."""
  config = lm_config(settings)
  config.train.steps = settings["steps"]
  config.data.update(num_threads=spec["num_threads"], prefetch=spec["prefetch"])
  config.ckpt.update(every=settings["ckpt_every"], keep=2, async_save=spec["async_save"])
  config.log.update(every=settings["log_every"], progress=False)
  config.eval.update(every=10 * settings["steps"], steps=1)
  config.sample.max_new_tokens = 0
  probe = Probe()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir, probe.installed():
    loop.run(config, workdir, should_stop=probe.should_stop)
  at, ready = probe.step_at, probe.batch_at
  last, first = settings["steps"], settings["ckpt_every"] + 2
  intervals = {s: at[s] - at[s - 1] for s in range(3, last + 1)}
  window = range(first + 1, last + 1)
  typical = statistics.median(intervals[s] for s in window)
  blocked = {s for s in window if at[s] - ready[s] > BLOCKED * typical}
  device_bound = [intervals[s] for s in window if s in blocked and s - 1 in blocked]
  saves = probe.saves[:-1]  # the last (forced) save follows the last step, outside the window
  return dict(
      name=spec["name"], num_threads=spec["num_threads"], prefetch=spec["prefetch"],
      async_save=spec["async_save"], run_wall_s=time.perf_counter() - start,
      window=[first, last], window_steps=len(window), window_s=at[last] - at[first],
      from_step2_steps=last - 2, from_step2_s=at[last] - at[2],
      interval_ms={s: 1e3 * v for s, v in intervals.items()},
      wait_ms={s: 1e3 * (at[s] - ready[s]) for s in window},
      blocked_steps=len(blocked), device_bound_pairs=len(device_bound),
      loop_device_ms=1e3 * statistics.median(device_bound) if device_bound else math.nan,
      median_interval_ms=1e3 * typical,
      fetch_ms=1e3 * statistics.mean(probe.fetch_s[1:]),
      transfer_ms=1e3 * statistics.mean(probe.transfer_s[1:]),
      first_save_s=saves[0]["seconds"] if saves else math.nan,
      later_save_ms=1e3 * statistics.mean(s["seconds"] for s in saves[1:]) if saves[1:]
      else math.nan, saves=probe.saves)


def pure_device_time(program: dict, state, batch, steps: int):
  """Seconds per step of ``steps`` back-to-back train steps on one batch; the state after them."""
  with program["context"]():
    state, metrics = program["step"](state, batch)  # not timed: leaves the queue empty
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = program["step"](state, batch)
    jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / steps


def fractions(run: dict, pure_s: float) -> None:
  """Adds the host-wait fractions of ``run``: against its own device-bound step time (falling
  back to the pure step when fewer than MIN_PAIRS step pairs were device-bound) and the pure one."""
  own = run["device_bound_pairs"] >= MIN_PAIRS
  run["device_time_source"] = "loop" if own else "pure"
  run["pure_device_ms"] = 1e3 * pure_s
  run["device_ms"] = run["loop_device_ms"] if own else run["pure_device_ms"]
  for key, device_ms in (("", run["device_ms"]), ("_vs_pure", run["pure_device_ms"])):
    for span, steps, wall in (("", run["window_steps"], run["window_s"]),
                              ("_from_step2", run["from_step2_steps"], run["from_step2_s"])):
      raw = 1 - steps * device_ms / 1e3 / wall
      run["host_fraction" + span + key + "_raw"] = raw
      run["host_fraction" + span + key] = min(max(raw, 0.0), 1.0)
  run["wall_ms_per_step"] = 1e3 * run["window_s"] / run["window_steps"]
  after = [run["interval_ms"][s["step"] + 1] for s in run["saves"]
           if s["step"] + 1 in run["wait_ms"]]
  run["after_save_excess_ms"] = statistics.mean(after) - run["device_ms"] if after else math.nan


# ----------------------------------------------------------------------------- report


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(doc: dict) -> str:
  s = doc["settings"]
  out = [f"# Host overhead benchmark ({doc['mode']})", "", machine_line(doc["environment"]), "",
         f"`train.loop.run` (configs/lm.py size={s['size']}, batch {s['batch']} x {s['seq']} "
         f"tokens, mesh data={doc['environment']['devices']}) for {s['steps']} steps per row; "
         f"checkpoints every {s['ckpt_every']} steps, metrics every {s['log_every']}. Timed "
         f"window: steps {doc['runs'][0]['window'][0]}..{s['steps']} (after the first save). "
         "host-wait = 1 - steps x device step / wall time, with the device step timed inside "
         "the run (the median interval between consecutive steps whose host waited on the "
         "device; how many such pairs in brackets); \"vs pure\" uses instead the same train step "
         f"run back-to-back on one batch ({s['pure_steps']} steps, measured before and after "
         "each row). After-save excess: how much longer than a device step the step after a "
         "save took. Input and save times are host durations that may overlap device work.", ""]
  pairs = lambda r: r["device_bound_pairs"] if r["device_time_source"] == "loop" else "pure"
  rows = [[r["name"], f"{r['wall_ms_per_step']:.1f}", f"{r['device_ms']:.1f} ({pairs(r)})",
           f"{r['pure_device_ms']:.1f}", f"**{_pct(r['host_fraction'])}**",
           _pct(r["host_fraction_vs_pure"]), _pct(r["host_fraction_from_step2"]),
           f"{r['fetch_ms']:.2f} + {r['transfer_ms']:.2f}", f"{r['first_save_s']:.2f}",
           f"{r['later_save_ms']:.0f}", f"{r['after_save_excess_ms']:.0f}"] for r in doc["runs"]]
  out += [_table(["run", "wall ms/step", "device ms/step in loop (pairs)",
                  "device ms/step pure", "host-wait %", "vs pure %", "from step 2 %",
                  "input ms/step (grain + to device)", "first save s",
                  "later saves ms (blocking)", "after-save excess ms"], rows), ""]
  rows = [[c["name"], "yes" if c["holds"] else "**NO**", c["detail"]] for c in doc["checks"]]
  out += ["## Expectations", "", _table(["expectation", "holds", "measured"], rows), ""]
  out += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
  return "\n".join(out)


def checks_and_notes(doc: dict) -> tuple[list, list]:
  runs = {r["name"]: r for r in doc["runs"]}
  target = runs[RUNS[0]["name"]]
  checks = [dict(name=f"{RUNS[0]['name']}: host-wait under {_pct(TARGET)}%",
                 holds=target["host_fraction"] < TARGET,
                 detail=f"{_pct(target['host_fraction'])}% (raw "
                        f"{_pct(target['host_fraction_raw'])}%; vs pure "
                        f"{_pct(target['host_fraction_vs_pure_raw'])}%) over "
                        f"{target['window_steps']} steps")]
  sane = all(math.isfinite(r[k]) and 0 <= r[k] <= 1 for r in doc["runs"]
             for k in ("host_fraction", "host_fraction_vs_pure", "host_fraction_from_step2"))
  checks.append(dict(name="fractions finite and in [0, 1]", holds=sane,
                     detail=", ".join(_pct(r["host_fraction"]) for r in doc["runs"])))
  sync, asyn = runs[RUNS[1]["name"]], runs[RUNS[0]["name"]]
  first_saves = ", ".join(f"{r['first_save_s']:.2f}" for r in doc["runs"])
  blocked = ", ".join(str(r["blocked_steps"]) for r in doc["runs"])
  ready = sum(s["state_was_ready"] for r in doc["runs"] for s in r["saves"])
  saves = sum(len(r["saves"]) for r in doc["runs"])
  every = doc["settings"]["ckpt_every"]
  per_save = asyn["after_save_excess_ms"] / (every * asyn["wall_ms_per_step"])
  notes = [
      f"Checkpoint saves are most of the host wait: the step after a save takes "
      f"{asyn['after_save_excess_ms']:.0f} ms longer than a device step with async saves and "
      f"{sync['after_save_excess_ms']:.0f} ms with synchronous ones, whose save call blocks for "
      f"the whole write ({sync['later_save_ms']:.0f} ms vs {asyn['later_save_ms']:.0f} ms). "
      f"Every {every} steps, async saves cost about "
      f"{_pct(per_save)}% of the wall time; the fraction scales with the save frequency "
      "(configs default: ckpt.every=200). A save is called right after its step is "
      f"dispatched; {saves - ready} of {saves} saves found that step's state still being "
      "computed.",
      f"The first save costs {max(r['first_save_s'] for r in doc['runs']):.1f} s in the first "
      "run (it compiles Orbax's replica slices, one small program per array shape and device; "
      f"later runs in this process reuse them: {first_saves} s). The \"from step 2\" "
      "column includes it.",
      "The loop reads step s-1's non-finite count (a device->host fetch) after dispatching step "
      "s, so the host is never more than one step ahead of the device: any host pause longer "
      "than what is left of the running step (a blocking save, an evaluation) leaves the "
      f"device idle. In the timed windows {blocked} "
      f"of {doc['runs'][0]['window_steps']} steps had the host waiting on the device.",
      "grain prefetches only with reader threads (data.num_threads > 0); configs/lm.py sets "
      "num_threads=0, so its data.prefetch=2 has no effect and each batch is read when the loop "
      "asks for it. The stdlib windows come from memory, so reading a batch costs "
      f"{runs[RUNS[2]['name']]['fetch_ms']:.2f} ms without prefetch and "
      f"{asyn['fetch_ms']:.2f} ms with it.",
      "On CPU the device is the host's cores: host work (Orbax's background writes, grain's "
      "reader thread, the loop's Python) slows the device too, so these fractions overstate an "
      "accelerator's."]
  return checks, notes


def plot(doc: dict, path: str) -> str | None:
  """host.png; returns a message instead when matplotlib is missing."""
  try:
    import matplotlib
  except ImportError:
    return "matplotlib is not installed; skipped the plot."
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[2, 1]))
  for i, r in enumerate(doc["runs"]):
    intervals = {int(s): ms for s, ms in r["interval_ms"].items()}  # JSON keys are strings
    steps = sorted(intervals)
    axes[0].plot(steps, [intervals[s] for s in steps], ".-", color=f"C{i}", lw=0.8,
                 label=r["name"])
    axes[0].axhline(r["device_ms"], color=f"C{i}", ls="--", lw=1)
  for save in doc["runs"][0]["saves"][:-1]:
    axes[0].axvline(save["step"] + 1, color="0.7", lw=0.6)
  top = 3 * max(r["device_ms"] for r in doc["runs"])
  axes[0].set(xlabel="step (grey: the step after a checkpoint save)", ylabel="ms",
              ylim=(0, top), title="Wall time between steps (dashed: device step in the loop)")
  axes[0].annotate("the first save (with Orbax's slice compiles) is off the scale",
                   (0.01, 0.97), xycoords="axes fraction", va="top", fontsize=8)
  axes[0].legend(fontsize=8)
  names = [r["name"].replace(", ", "\n") for r in doc["runs"]]
  axes[1].bar(names, [100 * r["host_fraction"] for r in doc["runs"]], color="C0")
  axes[1].axhline(100 * TARGET, color="k", ls="--", lw=1, label=f"target {_pct(TARGET)}%")
  axes[1].set(ylabel="% of wall time", title="Device waiting on the host")
  axes[1].tick_params(axis="x", labelsize=8)
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return None


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="size=test model, batch 8 x 32, 12 steps per run")
  parser.add_argument("--out", default="bench/results", help="folder for json, md and png")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per run (default: 80, quick: 12)")
  args = parser.parse_args(argv)
  mode = "quick" if args.quick else "full"
  settings = dict(SETTINGS[mode])
  if args.steps:
    settings["steps"] = args.steps
  if settings["steps"] < settings["ckpt_every"] * 2 + 3:
    raise ValueError(f"--steps={settings['steps']} leaves no checkpoint inside the timed window; "
                     f"use at least {settings['ckpt_every'] * 2 + 3}.")
  if settings["batch"] % jax.device_count():
    raise ValueError(f"batch {settings['batch']} is not divisible by the "
                     f"{jax.device_count()} devices.")
  start, env = time.perf_counter(), environment()

  print("compiling the pure train step", file=sys.stderr, flush=True)
  config = lm_config(settings)
  program = loop_program(config)
  state = program["init"]()
  batch = program["to_device"](next(iter(program["task"].datasets()[0])))
  state, device_s = pure_device_time(program, state, batch, settings["pure_steps"])
  pure = [device_s]
  runs = []
  for spec in RUNS:
    print(f"training {settings['steps']} steps: {spec['name']}", file=sys.stderr, flush=True)
    runs.append(run_loop(settings, spec))
    state, device_s = pure_device_time(program, state, batch, settings["pure_steps"])
    pure.append(device_s)
    fractions(runs[-1], (pure[-2] + pure[-1]) / 2)
    print(f"  host-wait {_pct(runs[-1]['host_fraction'])}% ({runs[-1]['wall_ms_per_step']:.1f} "
          f"ms/step vs {runs[-1]['device_ms']:.1f} ms device)", file=sys.stderr, flush=True)

  env["load_average"].append(os.getloadavg()[0])
  doc = dict(benchmark="host", mode=mode, settings=settings, environment=env,
             pure_measurements_ms=[1e3 * p for p in pure], runs=runs, target=TARGET)
  doc["checks"], doc["notes"] = checks_and_notes(doc)
  doc["wall_time_s"] = time.perf_counter() - start

  md = report.write(args.out, "host", doc, markdown(doc), doc["wall_time_s"], plot)
  print(json.dumps({r["name"]: dict(host_fraction=round(r["host_fraction"], 4),
                                    wall_ms_per_step=round(r["wall_ms_per_step"], 2),
                                    device_ms=round(r["device_ms"], 2)) for r in runs}))
  print(md)
  return doc


if __name__ == "__main__":
  main()
