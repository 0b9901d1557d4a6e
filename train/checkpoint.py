"""Orbax checkpoints of the train state and the grain iterator position, saved together."""

import os

import orbax.checkpoint as ocp

from train import data


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
