"""The training loop: ``run(config, workdir)`` is what ``python -m train`` calls."""

import contextlib
import functools
import os
import signal
import threading
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from parallel import mesh as parallel_mesh
from parallel import sharding
from train import checkpoint, flops, metrics, models, optimizer, steps, tasks, watchdog
from train import state as state_lib
from train import workdir as workdir_lib
from train.validate import init_from, validate, validate_workdir


def run(config, workdir: str, *, should_stop: Callable[[int], bool] | None = None) -> dict:
  """Trains and evaluates as ``config`` says; rerunning with the same workdir resumes.

  Resume order: the newest readable checkpoint in ``workdir/checkpoints`` (state and data
  position together; unreadable ones are reported and moved aside), else a fresh initialisation
  from ``config.seed``. The checkpoint may come from another mesh or device count.
  ``should_stop(step)`` returning True, SIGTERM or SIGINT end the run early as a preemption
  would: the current step finishes, the state and data position after it are checkpointed, and
  rerunning continues exactly there. Non-finite steps are skipped (train/steps.py) and the run
  stops with a sentence after ``train.max_bad_steps`` of them in a row, saving nothing.
  Returns a summary: steps, last train metrics, first and last validation metrics, checkpoints,
  and ``stopped_by`` when the run ended early.
  """
  plan = validate(config)
  validate_workdir(config, workdir)
  # One run at a time per workdir: a second is refused before it writes anything (docs/workdir.md).
  with workdir_lib.locked(workdir):
    return _run(config, workdir, plan, should_stop)


def _run(config, workdir: str, plan, should_stop) -> dict:
  task = tasks.get(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel_mesh.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.parallel)
  model, _, attention_plan = models.build(config, mesh)
  permutation = attention_plan.permutation(config.train.seq_len) if config.task == "lm" else None
  tx, lr_schedule = optimizer.make(config.opt, config.train.steps)
  t = config.train
  example = task.example_batch(t.batch_size)

  def init_boxed():
    return state_lib.create(model, tx, task.init_args(example), config.seed)

  abstract, shardings = sharding.abstract_and_shardings(init_boxed, mesh, rules)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  train_ds, val_ds = task.datasets()
  train_iter = iter(train_ds)
  resumed_from, state = ckpt.restore_newest_valid(
      abstract, train_iter, report=lambda m: print(f"odyssey: {m}", flush=True))
  init_note = ""
  if resumed_from is None:
    init_params = None
    source, source_step = init_from(config)
    if source:  # read (and shape-checked) before anything compiles
      init_step, init_params = checkpoint.restore_params(source, abstract.params, step=source_step)
      init_note = f" with parameters from {source} step {init_step}"
      changed = checkpoint.model_differences(source, config)
      if changed:  # e.g. norm_eps or rope_theta: same shapes, different function
        init_note += f" (model fields that differ from its config: {', '.join(changed)})"
    state = sharding.init_sharded(init_boxed, shardings, mesh, rules)
    if init_params is not None:
      state = state.replace(params=init_params)
  start_step = int(jax.device_get(state.step))
  kept = workdir_lib.write_config(workdir, config)  # an earlier, different one is kept
  if kept:
    print(f"odyssey: config.json differs from the previous run's, which is kept as {kept}.",
          flush=True)

  writer = metrics.Writer(workdir, total_steps=t.steps, start_step=start_step,
                          progress=config.log.progress)
  pmap = config.parallel.loop == "pmap"
  writer.message(f"odyssey: {config.task} with model {config.model.name} "
                 f"({_count(abstract.params):,} params), "
                 f"{'pmap over' if pmap else 'mesh ' + str(plan.mesh) + ' on'} "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices{_hosts(mesh)}, "
                 + (f"resumed from step {resumed_from}" if resumed_from is not None
                    else "fresh start" + init_note) + f"; {attention_plan.describe()}; workdir {workdir}")
  batch_shardings = {k: sharding.logical_sharding(mesh, rules, axes)
                     for k, axes in task.batch_axes.items()}
  unit, units_per_step = task.throughput_unit()
  step_flops = flops.model_flops_per_step(config, plan.mesh)
  peak = flops.peak_flops(config.model.dtype)
  writer.message(f"model FLOPs: {step_flops.model:.4g} per step ({step_flops.model_per_unit:.4g} "
                 f"per {unit[:-1]}); peak {peak:.4g} FLOP/s ({_peak_source()}); MFU is their ratio")
  summary = {"start_step": start_step}
  step_body = steps.make_train_step(
      task.loss_fn(model, permutation), tx, lr_schedule, grad_accum=t.grad_accum,
      batch_axes=None if pmap else task.batch_axes, axis_name=steps.PMAP_AXIS if pmap else None)
  in_mesh = functools.partial(_mesh_context, mesh, rules)
  if pmap:  # called outside the mesh context: inside pmap every array is one device's
    train_step = steps.pmapped(step_body, mesh)
    to_device = lambda local: sharding.per_device_batch(local, mesh)
  else:
    train_step = _within(in_mesh, jax.jit(
        step_body, in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0))
    to_device = lambda local: sharding.global_batch(local, mesh, rules, batch_shardings)
  eval_step = _within(in_mesh, jax.jit(task.eval_fn(model, permutation),
                                       in_shardings=(shardings.params, batch_shardings),
                                       out_shardings=sharding.replicated(mesh)))
  sampler, _, _ = models.build(config, mesh, seq_parallel=False)
  dp = sharding.data_parallel_size(plan.mesh, rules)
  stop = _StopSignal()
  profile = _profile_window(config.log.profile_steps)
  profile_dir = os.path.join(workdir, "profile")
  if jax.process_count() > 1:
    profile_dir = os.path.join(profile_dir, f"process_{jax.process_index()}")

  def evaluate(step, params, final=False):
    sums = None
    with watchdog.phase("eval"):
      for _, local in zip(range(config.eval.steps), val_ds):
        out = eval_step(params, sharding.global_batch(local, mesh, rules, batch_shardings))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
      result = task.summarize(jax.device_get(sums))
    writer.write(step, result, split="val")
    writer.message(f"step {step}: {task.headline(result)}")
    summary.setdefault("first_val", result)
    summary["last_val"] = result
    with in_mesh(), watchdog.phase("sample"):
      produced = task.samples(sampler, params, step=step, final=final, workdir=workdir,
                              data_parallel=dp, sharding=batch_shardings)
    if produced is not None:
      summary["samples"] = produced
      if isinstance(produced, list) and produced and isinstance(produced[0], str):
        writer.message("sample:\n" + produced[0] + "\n" + "-" * 40)

  # A step, eval or sample that stops making progress (a stuck collective) ends the run with a
  # sentence naming the phase instead of hanging or aborting in C++ (train/watchdog.py).
  watchdog.start(t.hang_timeout_s)
  with stop.installed(), contextlib.closing(ckpt), watchdog.phase("train step"):
    if start_step == 0:
      evaluate(0, state.params)
    clock = {"time": time.perf_counter(), "step": start_step}

    def flush(step, device_metrics):
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      now = time.perf_counter()
      rate = (step - clock["step"]) / max(now - clock["time"], 1e-9)
      clock.update(time=now, step=step)
      host.update(steps_per_s=rate, **{f"{unit}_per_s": rate * units_per_step},
                  model_flops_per_s=rate * step_flops.model,
                  mfu=flops.mfu(step_flops.model, 1 / max(rate, 1e-12), peak))
      writer.write(step, host)
      writer.progress(step, host, unit)
      summary["last_train"] = host

    # Metrics are fetched one step late so the host never waits on the step it just dispatched;
    # the consecutive non-finite count is read the same way, every step.
    pending = None
    previous_bad = None
    for step in range(start_step + 1, t.steps + 1):  # `step` counts completed steps
      if step == profile[0]:
        jax.profiler.start_trace(profile_dir)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, next_batch(train_iter, to_device))
      if step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        writer.message(f"profile of steps {profile[0]}..{step} written to {profile_dir} (open "
                       "it with TensorBoard or xprof).")
      ckpt.check_saved()  # a failed async save stops the run here, naming its step
      if previous_bad is not None:
        _check_bad_steps(int(previous_bad[1]), previous_bad[0], t.max_bad_steps, ckpt)
        watchdog.beat()  # the host has seen the previous step finish
      previous_bad = (step, step_metrics["bad_steps"])
      if pending is not None:
        flush(*pending)
      pending = (step, step_metrics) if step % config.log.every == 0 or step == t.steps else None
      stopped_by = ("should_stop" if should_stop is not None and should_stop(step)
                    else stop.agreed(step, config.log.every))
      if ckpt.should_save(step) or step == t.steps or stopped_by:
        # Never checkpoint a state whose bad-step count and loss were not looked at.
        _check_bad_steps(int(previous_bad[1]), step, t.max_bad_steps, ckpt)
        if pending is not None:
          flush(*pending)
          pending = None
        with watchdog.phase("checkpoint save"):
          ckpt.save(step, state, train_iter, force=True)
      if stopped_by:
        summary["stopped_by"] = stopped_by
        break
      if step % config.eval.every == 0 or step == t.steps:
        evaluate(step, state.params, final=step == t.steps)
    if pending is not None:
      flush(*pending)
    if start_step >= t.steps:
      evaluate(start_step, state.params, final=True)
  if "stopped_by" in summary:  # the checkpoint is complete: closing waited for it
    writer.message(f"stopped by {summary['stopped_by']} after step {step}; its checkpoint is "
                   "written. Rerun the same command to resume from it.")
  summary["final_step"] = int(jax.device_get(state.step))
  summary["checkpoints"] = ckpt.all_steps()
  writer.message(_outputs_message(workdir, summary, task))
  writer.close()
  watchdog.stop()
  return summary


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


@contextlib.contextmanager
def _mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _within(context, fn):
  """``fn`` called inside ``context()`` (the mesh and logical rules its tracing needs)."""
  def wrapped(*args):
    with context():
      return fn(*args)
  return wrapped


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


def _profile_window(spec: str) -> tuple[int, int]:
  """(first, last) step of ``log.profile_steps="a:b"``; (0, 0) when empty (validated before)."""
  if not spec:
    return 0, 0
  first, last = (int(x) for x in str(spec).split(":"))
  return first, last


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
