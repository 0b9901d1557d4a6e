"""The training loop: ``run(config, workdir)`` is what ``python -m train`` calls."""

import contextlib
import functools
import operator
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np

from parallel import sharding
from train import checkpoint, flops, metrics, models, watchdog
from train import program as program_lib
from train import state as state_lib
from train import workdir as workdir_lib
from train.validate import init_from, use_ema, validate, validate_workdir


def run(config, workdir: str, *, plan=None,
        should_stop: Callable[[int], bool] | None = None) -> dict:
  """Trains and evaluates as ``config`` says; rerunning with the same workdir resumes.

  ``plan`` is ``validate(config)``'s result from a caller that has validated the config and
  the workdir (``python -m train``); without it both are validated here.
  Resume order: the newest readable checkpoint in ``workdir/checkpoints`` (state and data
  position together; unreadable ones are reported and moved aside), else ``init.from``'s
  parameters, else a fresh initialisation from ``config.seed``. The checkpoint may come from
  another mesh or device count.
  ``should_stop(step)`` returning True, SIGTERM or SIGINT end the run early as a preemption
  would: the current step finishes, the state and data position after it are checkpointed, and
  rerunning continues exactly there. Non-finite steps are skipped (train/steps.py) and the run
  stops with a sentence after ``train.max_bad_steps`` of them in a row, saving nothing.
  Returns a summary: steps, last train metrics, first and last validation metrics (with a data
  mixture, pooled over its sources; ``last_val_sources`` holds each source's), checkpoints, and
  ``stopped_by`` when the run ended early.
  """
  if plan is None:
    plan = validate(config)
    validate_workdir(config, workdir)
  # One run at a time per workdir: a second is refused before it writes anything (docs/workdir.md).
  with workdir_lib.locked(workdir):
    return _run(config, workdir, plan, should_stop)


def _run(config, workdir: str, plan, should_stop) -> dict:
  os.makedirs(workdir, exist_ok=True)
  program = program_lib.build(config, plan)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  train_ds, val_ds = program.task.datasets()
  train_iter = iter(train_ds)
  resumed_from, state, init_note = _restore_or_init(program, ckpt, train_iter)
  start_step = int(jax.device_get(state.step))
  kept = workdir_lib.write_config(workdir, config)  # an earlier, different one is kept
  workdir_lib.record_tokenizer(workdir, config)
  if kept:
    print(f"odyssey: config.json differs from the previous run's, which is kept as {kept}.",
          flush=True)
  writer = metrics.Writer(workdir, total_steps=config.train.steps, start_step=start_step,
                          progress=config.log.progress)
  started = (f"resumed from step {resumed_from}" if resumed_from is not None
             else "fresh start" + init_note)
  writer.message(f"odyssey: {config.task} with model {config.model.name} "
                 f"({_count(program.abstract_state.params):,} params), "
                 f"{'pmap over' if program.pmap else 'mesh ' + str(plan.mesh) + ' on'} "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices"
                 f"{_hosts(program.mesh)}, {started}; {_plans(program)}; "
                 f"workdir {workdir}")
  loop = _Loop(program, workdir, writer, ckpt, val_ds, start_step)
  # A step, eval or sample that stops making progress (a stuck collective) ends the run with a
  # sentence naming the phase instead of hanging or aborting in C++ (train/watchdog.py).
  watchdog.start(config.train.hang_timeout_s)
  stop = _StopSignal()
  with stop.installed(), contextlib.closing(ckpt), watchdog.phase("train step"):
    state, step = loop.train(state, train_iter, stop, should_stop)
  summary = loop.summary
  if "stopped_by" in summary:  # the checkpoint is complete: closing waited for it
    writer.message(f"stopped by {summary['stopped_by']} after step {step}; its checkpoint is "
                   "written. Rerun the same command to resume from it.")
  summary["final_step"] = int(jax.device_get(state.step))
  summary["checkpoints"] = ckpt.all_steps()
  writer.message(_outputs_message(workdir, summary, program.task))
  writer.close()
  watchdog.stop()
  return summary


def _restore_or_init(program, ckpt, train_iter):
  """(step resumed from or None, state, note on init.from) in the resume order of ``run``."""
  resumed_from, state = ckpt.restore_newest_valid(
      program.abstract_state, train_iter, report=lambda m: print(f"odyssey: {m}", flush=True))
  if resumed_from is not None:
    return resumed_from, state, ""
  init_note, init_params = "", None
  source, source_step = init_from(program.config)
  if source:  # read (and shape-checked) before anything compiles
    init_step, init_params = checkpoint.restore_params(
        source, program.abstract_state.params, step=source_step)
    init_note = f" with parameters from {source} step {init_step}"
    changed = checkpoint.model_differences(source, program.config)
    if changed:  # e.g. norm_eps or rope_theta: same shapes, different function
      init_note += f" (model fields that differ from its config: {', '.join(changed)})"
  state = program.init()
  if init_params is not None:  # raw parameters; an EMA this run keeps starts from them too
    state = state_lib.with_ema_of(state, init_params)
  return None, state, init_note


class _Loop:
  """One run's steps, one-step-late metrics, checkpoints, evaluations and samples."""

  def __init__(self, program, workdir, writer, ckpt, val_ds, start_step):
    self.program, self.config, self.workdir = program, program.config, workdir
    self.writer, self.ckpt, self.val_ds = writer, ckpt, val_ds
    self.summary = {"start_step": start_step}
    self.unit, self.units_per_step = program.task.throughput_unit()
    self.step_flops = flops.model_flops_per_step(self.config, program.plan.mesh)
    self.peak = flops.peak_flops(self.config.model.dtype)
    writer.message(f"model FLOPs: {self.step_flops.model:.4g} per step "
                   f"({self.step_flops.model_per_unit:.4g} per {self.unit[:-1]}); peak "
                   f"{self.peak:.4g} FLOP/s ({_peak_source()}); MFU is their ratio")
    self.clock = None  # time and step of the last flush, set when the steps start
    # XLA:CPU with several (simulated) devices: one train launch at a time, as ``_eval_sums``
    # does for evaluation. Two queued launches of the sharded step deadlocked once there (a
    # Gated DeltaNet run on 2 loaded cores, stuck after step 480 of 500, every device thread
    # spinning), the way queued eval and decode launches did. On CPU the host and the devices
    # share the cores, so waiting costs nothing worth keeping; accelerators keep one step queued.
    self.one_launch = jax.default_backend() == "cpu" and jax.device_count() > 1
    self.weights = "ema" if use_ema(self.config) else "raw"  # eval.weights, resolved

  def eval_params(self, state):
    """The parameters evaluation and samples use: the EMA or the raw ones (eval.weights)."""
    return state.ema_params if self.weights == "ema" else state.params

  def evaluate(self, step, params, final=False):
    """Validation metrics over eval.steps batches, then the task's samples.

    A task whose val side is {source: dataset} (a data mixture) gets eval.steps batches of each:
    each source's metrics are written as split "val/<source>", and the sums of all of them,
    pooled, give the "val" metrics (each source counts equally, whatever its mixture weight).
    """
    program, summary, task = self.program, self.summary, self.program.task
    sources = self.val_ds if isinstance(self.val_ds, dict) else {None: self.val_ds}
    with watchdog.phase("eval"):
      sums = {key: self._eval_sums(params, ds) for key, ds in sources.items()}
      result = task.summarize(functools.reduce(
          lambda a, b: jax.tree.map(operator.add, a, b), sums.values()))
      by_source = {key: task.summarize(s) for key, s in sums.items() if key is not None}
      with program.context():
        result.update(task.extra_metrics(program.sample_model, params,
                                         sharding=program.batch_shardings))
    for key, metrics_of_source in by_source.items():
      self.writer.write(step, metrics_of_source, split=f"val/{key}")
    self.writer.write(step, {**result, "weights": self.weights}, split="val")
    headline = task.headline(result) + (" (EMA weights)" if self.weights == "ema" else "")
    if by_source:
      headline += f" ({task.source_headline(by_source)})"
      summary["last_val_sources"] = by_source
    self.writer.message(f"step {step}: {headline}")
    summary.setdefault("first_val", result)
    summary["last_val"] = result
    with program.context(), watchdog.phase("sample"):
      produced = program.task.samples(
          program.sample_model, params, step=step, final=final, workdir=self.workdir,
          data_parallel=sharding.data_parallel_size(program.plan.mesh, program.rules),
          sharding=program.batch_shardings)
    if produced is not None:
      summary["samples"] = produced
      if isinstance(produced, list) and produced and isinstance(produced[0], str):
        self.writer.message("sample:\n" + produced[0] + "\n" + "-" * 40)

  def _eval_sums(self, params, val_ds):
    """The task's eval sums over eval.steps batches of ``val_ds``, on the host.

    One eval launch at a time: with launches of a sharded program queued, XLA:CPU can deadlock,
    a device that finished one launch blocking a thread of the shared host pool in a collective
    of the next while a device it waits for still needs a thread to finish the first (seen in an
    lm_stdlib_bpe evaluation with 2 queued on 2 cores: half the devices in the next launch's
    all-reduce, the others in the previous launch's all-gathers; train/decoding.py _IN_FLIGHT).
    The host waits for each batch's sums before launching the next (each wait a watchdog beat);
    an eval step is short, so little is lost.
    """
    program, sums = self.program, None
    for _, local in zip(range(self.config.eval.steps), val_ds):
      out = jax.device_get(program.eval_step(params, program.eval_batch(local)))
      watchdog.beat()
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return sums

  def flush(self, step, device_metrics):
    """Writes the train metrics of ``step`` with the throughput since the last flush."""
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    rate = (step - self.clock["step"]) / max(now - self.clock["time"], 1e-9)
    self.clock.update(time=now, step=step)
    host.update(steps_per_s=rate, **{f"{self.unit}_per_s": rate * self.units_per_step},
                model_flops_per_s=rate * self.step_flops.model,
                mfu=flops.mfu(self.step_flops.model, 1 / max(rate, 1e-12), self.peak))
    self.writer.write(step, host)
    self.writer.progress(step, host, self.unit)
    self.summary["last_train"] = host

  def train(self, state, train_iter, stop, should_stop):
    """Steps to train.steps or an agreed stop; returns the state and the last step run."""
    t, every, ckpt, summary = self.config.train, self.config.log.every, self.ckpt, self.summary
    start_step = summary["start_step"]
    if start_step == 0:
      self.evaluate(0, self.eval_params(state))
    self.clock = {"time": time.perf_counter(), "step": start_step}
    profile = _Profile(self.config.log.profile_steps, self.workdir, self.writer)
    # Metrics are fetched one step late so the host never waits on the step it just dispatched;
    # the consecutive non-finite count is read the same way, every step.
    pending = None
    previous_bad = None
    step = start_step
    for step in range(start_step + 1, t.steps + 1):  # `step` counts completed steps
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = self.program.train_step(
            state, next_batch(train_iter, self.program.train_batch))
      if self.one_launch:
        jax.block_until_ready(step_metrics["bad_steps"])
      profile.after(step, state)
      ckpt.check_saved()  # a failed async save stops the run here, naming its step
      if previous_bad is not None:
        _check_bad_steps(int(previous_bad[1]), previous_bad[0], t.max_bad_steps, ckpt)
        watchdog.beat()  # the host has seen the previous step finish
      previous_bad = (step, step_metrics["bad_steps"])
      if pending is not None:
        self.flush(*pending)
      pending = (step, step_metrics) if step % every == 0 or step == t.steps else None
      stopped_by = ("should_stop" if should_stop is not None and should_stop(step)
                    else stop.agreed(step, every))
      if ckpt.should_save(step) or step == t.steps or stopped_by:
        # Never checkpoint a state whose bad-step count and loss were not looked at.
        _check_bad_steps(int(previous_bad[1]), step, t.max_bad_steps, ckpt)
        if pending is not None:
          self.flush(*pending)
          pending = None
        with watchdog.phase("checkpoint save"):
          ckpt.save(step, state, train_iter, force=True)
      if stopped_by:
        summary["stopped_by"] = stopped_by
        break
      if step % self.config.eval.every == 0 or step == t.steps:
        self.evaluate(step, self.eval_params(state), final=step == t.steps)
    if pending is not None:
      self.flush(*pending)
    if start_step >= t.steps:
      self.evaluate(start_step, self.eval_params(state), final=True)
    return state, step


class _Profile:
  """Traces the steps of ``log.profile_steps="a:b"`` (none when empty; validated before)."""

  def __init__(self, spec: str, workdir: str, writer):
    self.first, self.last = (int(x) for x in str(spec).split(":")) if spec else (0, 0)
    self.dir = os.path.join(workdir, "profile")
    if jax.process_count() > 1:
      self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
    self.writer = writer

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.dir)

  def after(self, step: int, state) -> None:
    if step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.writer.message(f"profile of steps {self.first}..{step} written to {self.dir} (open "
                          "it with TensorBoard or xprof).")


def _plans(program) -> str:
  """How attention and (for linear-recurrent families) the recurrences cross the mesh."""
  config, model_cfg = program.config, program.plan.model_cfg
  recurrence = models.recurrence_plan(config, dict(program.mesh.shape), model_cfg)
  if recurrence is None:
    return program.attention.describe()
  if not model_cfg.num_heads:  # no attention layers
    return recurrence.describe()
  return f"{program.attention.describe()}; {recurrence.describe()}"


def _hosts(mesh) -> str:
  """", over N processes (axes across them: ...)" when the mesh spans several processes."""
  if jax.process_count() == 1:
    return ""
  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  across = [name for i, name in enumerate(mesh.axis_names)
            if np.any(np.diff(processes, axis=i) != 0)]
  return f" over {jax.process_count()} processes (axes spanning them: {across})"


def _peak_source() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return "the host's matmul rate, measured at start-up; simulated CPU devices share it"
  return f"{jax.device_count()} x {device.device_kind}"


def next_batch(train_iter, to_device):
  """The next training batch on the devices (a function so fault tests can poison it)."""
  return to_device(next(train_iter))


class BadStepsError(FloatingPointError):
  """Raised after train.max_bad_steps consecutive non-finite steps."""


def _check_bad_steps(consecutive: int, step: int, limit: int, ckpt) -> None:
  if consecutive >= limit:
    raise BadStepsError(
        f"{consecutive} consecutive training steps up to step {step} had a non-finite loss or "
        f"gradients and were skipped (train.max_bad_steps={limit}); stopping without saving "
        f"(newest checkpoint: step {ckpt.latest_step()}). Lower opt.lr or check the data.")


class _StopSignal:
  """SIGTERM / SIGINT ask the loop to stop after the current step (a second SIGINT aborts)."""

  def __init__(self):
    self.received = None

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self  # signal handlers can only be set from the main thread
      return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, _):
      name = signal.Signals(signum).name
      if self.received == "SIGINT" and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, no checkpoint
      self.received = name
      print(f"odyssey: {name} received; finishing the current step and checkpointing "
            "(Ctrl-C again to abort without saving).", flush=True)

    for s in previous:
      signal.signal(s, handler)
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)

  def agreed(self, step: int, every: int) -> str | None:
    """The signal name if any process received one; every process must stop at the same step,
    so over several processes they compare notes (a tiny all-gather) every ``every`` steps."""
    if jax.process_count() == 1:
      return self.received
    if step % every:
      return None
    from jax.experimental import multihost_utils
    names = ("SIGTERM", "SIGINT")
    flags = multihost_utils.process_allgather(
        np.array([self.received == n for n in names], np.int32))
    hit = np.asarray(flags).reshape(-1, len(names)).any(axis=0)
    return next((n for n, h in zip(names, hit) if h), None)


def _outputs_message(workdir, summary, task) -> str:
  lines = [f"done: step {summary['final_step']}."]
  if "first_val" in summary and "last_val" in summary:
    lines.append(f"validation: step {summary['start_step']} "
                 f"{task.headline(summary['first_val'])} -> {task.headline(summary['last_val'])}")
  lines.append(f"outputs in {os.path.abspath(workdir)}: metrics.jsonl, tb/ (tensorboard "
               f"--logdir {os.path.join(workdir, 'tb')}), checkpoints/ (steps "
               f"{summary['checkpoints']}), config.json, samples")
  return "\n".join(lines)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
