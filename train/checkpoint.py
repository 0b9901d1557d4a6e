"""Orbax checkpoints of the train state and the grain iterator position, saved together."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from parallel import mesh as parallel_mesh
from parallel import sharding
from train import data, models, optimizer, tasks
from train import state as state_lib


class Checkpointer:
  """One CheckpointManager in ``workdir/checkpoints`` with items "state" and "data".

  Saves are asynchronous (the device->host copy happens before ``save`` returns, so the caller
  may donate the state right after); ``keep`` newest steps are kept, and a forced save (the final
  step) ignores the interval. Orbax writes into a temporary folder and renames it when complete, so
  an interrupted save never shadows the previous good checkpoint.
  """

  def __init__(self, workdir: str, ckpt_cfg):
    self.every = ckpt_cfg.every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, save_interval_steps=ckpt_cfg.every,
        enable_async_checkpointing=ckpt_cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Every ``ckpt.every`` steps (Orbax's own policy would also save the very first step)."""
    return step % self.every == 0

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves the state and the iterator position reached after ``step`` steps."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=data.checkpoint_args_save(data_iter))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, data_iter):
    """Restores the state into ``abstract_state``'s shardings and ``data_iter`` in place."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=data.checkpoint_args_restore(data_iter))
    return self.manager.restore(step, args=args).state

  def close(self):
    """Waits for pending async saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def load_trained(workdir: str, *, step: int | None = None, devices=None):
  """(config, model, mesh, params) of a trained workdir, for inference on ``devices`` (default: one).

  The config is the run's own ``config.json``; the mesh is replaced by plain data parallelism
  over ``devices``, and the model uses the local attention kernel.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  devices = jax.devices()[:1] if devices is None else devices
  config.mesh.update(data=len(devices), fsdp=1, tensor=1, seq=1, expert=1)
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.parallel)
  model, _, _ = models.build(config, mesh, seq_parallel=False)
  task = tasks.get(config)
  tx, _ = optimizer.make(config.opt, config.train.steps)
  example = task.example_batch(len(devices))
  init = lambda: state_lib.create(model, tx, task.init_args(
      jax.tree.map(jnp.asarray, example)), config.seed)
  abstract, _ = sharding.abstract_and_shardings(init, mesh, rules)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                  item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"{workdir} has no checkpoint to load.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  manager.close()
  return config, model, mesh, restored.state.params
