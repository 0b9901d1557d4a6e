"""The training loop: ``run(config, workdir)`` is what ``python -m train`` calls."""

import math
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from parallel import mesh as parallel_mesh
from parallel import moe as parallel_moe
from parallel import sharding
from train import checkpoint, metrics, models, optimizer, steps, tasks
from train import state as state_lib
from train.validate import validate


def run(config, workdir: str, *, should_stop: Callable[[int], bool] | None = None) -> dict:
  """Trains and evaluates as ``config`` says; rerunning with the same workdir resumes.

  Resume order: the newest checkpoint in ``workdir/checkpoints`` (state and data position
  together), else a fresh initialisation from ``config.seed``.
  ``should_stop(step)`` returning True ends the run early as a preemption would: the state and
  data position after that step are checkpointed, so rerunning continues exactly there.
  Returns a summary: steps, last train metrics, first and last validation metrics, checkpoints.
  """
  plan = validate(config)
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
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state = ckpt.restore(resumed_from, abstract, train_iter)
  else:
    state = sharding.init_sharded(init_boxed, shardings, mesh, rules)
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

  writer = metrics.Writer(workdir, total_steps=t.steps, start_step=start_step,
                          progress=config.log.progress)
  writer.message(f"odyssey: {config.task} with model {config.model.name} "
                 f"({_count(abstract.params):,} params), mesh {plan.mesh} on "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices, "
                 + (f"resumed from step {resumed_from}" if resumed_from is not None
                    else "fresh start") + f"; {attention_plan.describe()}; workdir {workdir}")
  batch_shardings = {k: sharding.logical_sharding(mesh, rules, axes)
                     for k, axes in task.batch_axes.items()}
  unit, units_per_step = task.throughput_unit()
  summary = {"start_step": start_step}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(steps.make_train_step(task.loss_fn(model, permutation), tx, lr_schedule),
                         in_shardings=(shardings, batch_shardings),
                         out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(task.eval_fn(model, permutation),
                        in_shardings=(shardings.params, batch_shardings),
                        out_shardings=sharding.replicated(mesh))
    sampler, _, _ = models.build(config, mesh, seq_parallel=False)
    dp = parallel_moe.data_parallel(plan.mesh)

    def evaluate(step, params, final=False):
      sums = None
      for _, local in zip(range(config.eval.steps), val_ds):
        out = eval_step(params, sharding.global_batch(local, mesh, rules, batch_shardings))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
      result = task.summarize(jax.device_get(sums))
      writer.write(step, result, split="val")
      writer.message(f"step {step}: {task.headline(result)}")
      summary.setdefault("first_val", result)
      summary["last_val"] = result
      produced = task.samples(sampler, params, step=step, final=final, workdir=workdir,
                              data_parallel=dp, sharding=batch_shardings)
      if produced is not None:
        summary["samples"] = produced
        if isinstance(produced, list) and produced and isinstance(produced[0], str):
          writer.message("sample:\n" + produced[0] + "\n" + "-" * 40)

    if start_step == 0:
      evaluate(0, state.params)
    clock = {"time": time.perf_counter(), "step": start_step}

    def flush(step, device_metrics):
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not math.isfinite(host["loss"]):
        raise FloatingPointError(
            f"train loss is {host['loss']} at step {step}; stopping without saving this state "
            f"(newest checkpoint: step {ckpt.latest_step()}). Lower opt.lr or check the data.")
      now = time.perf_counter()
      rate = (step - clock["step"]) / max(now - clock["time"], 1e-9)
      clock.update(time=now, step=step)
      host.update(steps_per_s=rate, **{f"{unit}_per_s": rate * units_per_step})
      writer.write(step, host)
      writer.progress(step, host, unit)
      summary["last_train"] = host

    # Metrics are fetched one step late so the host never waits on the step it just dispatched.
    pending = None
    for step in range(start_step + 1, t.steps + 1):  # `step` counts completed steps
      batch = sharding.global_batch(next(train_iter), mesh, rules, batch_shardings)
      state, step_metrics = train_step(state, batch)
      if pending is not None:
        flush(*pending)
      pending = (step, step_metrics) if step % config.log.every == 0 or step == t.steps else None
      stopping = should_stop is not None and should_stop(step)
      if ckpt.should_save(step) or step == t.steps or stopping:
        if pending is not None:  # never checkpoint a state whose loss was not looked at
          flush(*pending)
          pending = None
        ckpt.save(step, state, train_iter, force=True)
      if stopping:
        writer.message(f"stopping after step {step} (checkpointed); rerun to resume.")
        break
      if step % config.eval.every == 0 or step == t.steps:
        evaluate(step, state.params, final=step == t.steps)
    if pending is not None:
      flush(*pending)
    if start_step >= t.steps:
      evaluate(start_step, state.params, final=True)
    ckpt.close()
  summary["final_step"] = int(jax.device_get(state.step))
  summary["checkpoints"] = ckpt.all_steps()
  writer.message(_outputs_message(workdir, summary, task))
  writer.close()
  return summary


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
