"""How long the device waits on the host during training: input pipeline, metrics, checkpoints.

  .venv/bin/python -m bench.host [--quick] [--out=bench/results] [--steps=N]

``train.loop.run`` (configs/lm.py tiny, batch 16 x 128, mesh data=8) trains ``--steps`` steps three
times (prefetch + async checkpoints, prefetch + sync checkpoints, no prefetch + async), with its
batch fetch and checkpoint save wrapped to record host timestamps. Over the steps after the first
save: host-wait = 1 - steps x device step / wall time, the device step timed inside the run (the
median interval between consecutive steps whose host waited on the device) and, as a cross-check,
back-to-back ("pure"). Writes host.{json,md,png}; docs/performance.md explains the method.
"""

import contextlib
import math
import statistics
import tempfile
import time

import jax

from bench import harness
from bench.compile import lm_config, loop_program
from train import checkpoint, loop

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


def markdown(doc: dict) -> str:
  s, pct = doc["settings"], harness.pct
  pairs = lambda r: r["device_bound_pairs"] if r["device_time_source"] == "loop" else "pure"
  rows = [[r["name"], f"{r['wall_ms_per_step']:.1f}", f"{r['device_ms']:.1f} ({pairs(r)})",
           f"{r['pure_device_ms']:.1f}", f"**{pct(r['host_fraction'])}**",
           pct(r["host_fraction_vs_pure"]), pct(r["host_fraction_from_step2"]),
           f"{r['fetch_ms']:.2f} + {r['transfer_ms']:.2f}", f"{r['first_save_s']:.2f}",
           f"{r['later_save_ms']:.0f}", f"{r['after_save_excess_ms']:.0f}"] for r in doc["runs"]]
  return "\n".join([
      harness.heading("Host overhead benchmark", doc),
      f"`train.loop.run` (configs/lm.py size={s['size']}, batch {s['batch']} x {s['seq']}, mesh "
      f"data={doc['environment']['devices']}), {s['steps']} steps per row; checkpoints every "
      f"{s['ckpt_every']} steps, metrics every {s['log_every']}; timed window steps "
      f"{doc['runs'][0]['window'][0]}..{s['steps']}; pure = {s['pure_steps']} back-to-back "
      "steps on one batch.", "",
      harness.table(["run", "wall ms/step", "device ms/step in loop (pairs)",
                     "device ms/step pure", "host-wait %", "vs pure %", "from step 2 %",
                     "input ms/step (grain + to device)", "first save s",
                     "later saves ms (blocking)", "after-save excess ms"], rows), "",
      harness.expectations(doc["checks"])])


def checks(doc: dict) -> list[dict]:
  pct, target = harness.pct, next(r for r in doc["runs"] if r["name"] == RUNS[0]["name"])
  sane = all(math.isfinite(r[k]) and 0 <= r[k] <= 1 for r in doc["runs"]
             for k in ("host_fraction", "host_fraction_vs_pure", "host_fraction_from_step2"))
  return [dict(name=f"{RUNS[0]['name']}: host-wait under {pct(TARGET)}%",
               holds=target["host_fraction"] < TARGET,
               detail=f"{pct(target['host_fraction'])}% (raw {pct(target['host_fraction_raw'])}%; "
                      f"vs pure {pct(target['host_fraction_vs_pure_raw'])}%) over "
                      f"{target['window_steps']} steps"),
          dict(name="fractions finite and in [0, 1]", holds=sane,
               detail=", ".join(pct(r["host_fraction"]) for r in doc["runs"]))]


def plot(doc: dict, plt):
  """Wall time between steps per run, and the host-wait fraction of each run."""
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
  axes[1].axhline(100 * TARGET, color="k", ls="--", lw=1, label=f"target {harness.pct(TARGET)}%")
  axes[1].set(ylabel="% of wall time", title="Device waiting on the host")
  axes[1].tick_params(axis="x", labelsize=8)
  axes[1].legend()
  return fig


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
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
  harness.log("compiling the pure train step")
  config = lm_config(settings)
  program = loop_program(config)
  state = program["init"]()
  batch = program["to_device"](next(iter(program["task"].datasets()[0])))
  state, device_s = pure_device_time(program, state, batch, settings["pure_steps"])
  pure = [device_s]
  runs = []
  for spec in RUNS:
    harness.log(f"training {settings['steps']} steps: {spec['name']}")
    runs.append(run_loop(settings, spec))
    state, device_s = pure_device_time(program, state, batch, settings["pure_steps"])
    pure.append(device_s)
    fractions(runs[-1], (pure[-2] + pure[-1]) / 2)
    harness.log(f"  host-wait {harness.pct(runs[-1]['host_fraction'])}% "
                f"({runs[-1]['wall_ms_per_step']:.1f} ms/step vs {runs[-1]['device_ms']:.1f} ms "
                "device)")
  doc = dict(benchmark="host", mode=mode, settings=settings,
             pure_measurements_ms=[1e3 * p for p in pure], runs=runs, target=TARGET)
  doc["checks"] = checks(doc)
  return doc


def main(argv=None) -> dict:
  return harness.main("host", __doc__, run, markdown, plot, argv=argv, flags=[
      ("--steps", dict(type=int, default=None,
                       help="training steps per run (default: 80, quick: 12)"))])


if __name__ == "__main__":
  main()
