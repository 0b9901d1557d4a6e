"""The training loop: ``run(config, workdir)`` is what ``python -m train`` calls."""

import math
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parallel import mesh as parallel_mesh
from parallel import sharding
from train import checkpoint, data, metrics, models, optimizer, sampling, steps
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
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel_mesh.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.parallel)
  model, _, attention_plan = models.build(config, mesh)
  permutation = attention_plan.permutation(config.train.seq_len)
  tx, lr_schedule = optimizer.make(config.opt, config.train.steps)
  t = config.train

  def init_boxed():
    return state_lib.create(model, tx, (jnp.zeros((t.batch_size, t.seq_len), jnp.int32),),
                            config.seed)

  abstract, shardings = sharding.abstract_and_shardings(init_boxed, mesh, rules)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  train_iter = iter(data.make_dataset(config.data, split="train", seq_len=t.seq_len,
                                      global_batch_size=t.batch_size, seed=config.seed,
                                      shuffle=True, num_epochs=None))
  val_ds = data.make_dataset(config.data, split="val", seq_len=t.seq_len,
                             global_batch_size=config.eval.batch_size, seed=config.seed,
                             shuffle=False, num_epochs=1)
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
  writer.message(f"odyssey: model {config.model.name} ({_count(abstract.params):,} params), mesh "
                 f"{plan.mesh} on {jax.device_count()} {jax.devices()[0].platform} devices, "
                 + (f"resumed from step {resumed_from}" if resumed_from is not None
                    else "fresh start") + f"; {attention_plan.describe()}; workdir {workdir}")
  batch_sharding = sharding.batch_sharding(mesh, rules)
  summary = {"start_step": start_step}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(steps.make_train_step(model, tx, lr_schedule, permutation),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(steps.make_eval_step(model, permutation), in_shardings=(shardings.params, batch_sharding),
                        out_shardings=sharding.replicated(mesh))

    def evaluate(step, params):
      out = _evaluate(eval_step, params, val_ds, config.eval.steps, mesh, rules)
      writer.write(step, out, split="val")
      writer.message(f"step {step}: val loss {out['loss']:.4f}, "
                     f"{out['bits_per_byte']:.3f} bits/byte")
      summary.setdefault("first_val", out)
      summary["last_val"] = out

    if start_step == 0:
      evaluate(0, state.params)
    tokens_per_step = t.batch_size * t.seq_len
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
      host.update(steps_per_s=rate, tokens_per_s=rate * tokens_per_step)
      writer.write(step, host)
      writer.progress(step, host)
      summary["last_train"] = host

    # Metrics are fetched one step late so the host never waits on the step it just dispatched.
    pending = None
    for step in range(start_step + 1, t.steps + 1):  # `step` counts completed steps
      batch = sharding.global_batch(next(train_iter), mesh, rules)
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
        evaluate(step, state.params)
    if pending is not None:
      flush(*pending)
    if start_step >= t.steps:
      evaluate(start_step, state.params)
    ckpt.close()
    finished = int(jax.device_get(state.step)) >= t.steps
    if finished and config.sample.max_new_tokens > 0:
      sampler, _, _ = models.build(config, mesh, seq_parallel=False)
      summary["samples"] = _write_samples(sampler, state.params, config, plan, mesh, rules,
                                          workdir, writer)
  summary["final_step"] = int(jax.device_get(state.step))
  summary["checkpoints"] = ckpt.all_steps()
  writer.message(_outputs_message(workdir, summary))
  writer.close()
  return summary


def _evaluate(eval_step, params, val_ds, max_batches: int, mesh, rules) -> dict:
  """Mean validation loss over the first ``max_batches`` batches of the (unshuffled) val split."""
  loss_sum = tokens = 0.0
  for _, local in zip(range(max_batches), val_ds):
    out = eval_step(params, sharding.global_batch(local, mesh, rules))
    loss_sum, tokens = loss_sum + out["loss_sum"], tokens + out["tokens"]
  loss = float(loss_sum) / max(float(tokens), 1.0)
  return {"loss": loss, "bits_per_byte": loss / math.log(2), "tokens": float(tokens)}


def _write_samples(model, params, config, plan, mesh, rules, workdir, writer) -> list[str]:
  """Generates text from the trained model, prints the first sample, appends all to samples.txt."""
  s = config.sample
  dp = plan.mesh["data"] * plan.mesh["fsdp"]
  n = -(-s.num_samples // dp) * dp  # rounded up so the batch splits over the data axes
  prompt = data.encode(s.prompt)
  tokens = sampling.sample(model, params, prompt, num_samples=n, max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, seed=config.seed,
                           valid_vocab=256, pad_id=data.PAD_ID,
                           sharding=sharding.batch_sharding(mesh, rules))
  texts = [data.decode(row) for row in tokens[:s.num_samples]]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "samples.txt"), "a") as f:
      for i, text in enumerate(texts):
        f.write(f"=== sample {i} (step {config.train.steps}, temperature {s.temperature}) ===\n"
                f"{text}\n")
  writer.message("sample:\n" + texts[0] + "\n" + "-" * 40)
  return texts


def _outputs_message(workdir, summary) -> str:
  lines = [f"done: step {summary['final_step']}."]
  if "first_val" in summary and "last_val" in summary:
    lines.append(f"validation bits/byte {summary['first_val']['bits_per_byte']:.3f} -> "
                 f"{summary['last_val']['bits_per_byte']:.3f}")
  lines.append(f"outputs in {os.path.abspath(workdir)}: metrics.jsonl, tb/ (tensorboard "
               f"--logdir {os.path.join(workdir, 'tb')}), checkpoints/ (steps "
               f"{summary['checkpoints']}), config.json, samples.txt")
  return "\n".join(lines)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
