"""What a run executes, built once from a validated config: ``build(config, plan) -> Program``.

The loop, the benches and the parity tests take the model, task, optimizer, shardings and jitted
steps from here, so a step measured or tested is the step the loop runs.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from parallel import mesh as parallel_mesh
from parallel import sharding
from train import models, optimizer, steps, text_encoders
from train import state as state_lib
from train.validate import Plan, validate


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything one run needs, from the model to the jitted steps; built by ``build``."""
  config: Any
  plan: Plan
  mesh: Mesh
  rules: tuple
  task: Any  # train.tasks: data, loss, evaluation and samples of config.task
  model: nn.Module
  sample_model: nn.Module  # the same model with the local attention kernel only
  attention: Any  # parallel.attention.Plan of ``model`` on ``mesh``
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  example_batch: dict  # zeros with the global shapes of one train batch
  create_state: Callable[[], state_lib.TrainState]  # a fresh state, parameters boxed
  abstract_state: state_lib.TrainState  # ShapeDtypeStructs with shardings: the restore target
  state_shardings: state_lib.TrainState
  batch_shardings: dict
  step_fn: Callable  # the pure train step, unjitted (for programs that wrap it)
  step_with_grads: Callable  # step_fn that also returns the gradients it applied (for checks)
  step_gradients: Callable  # step_fn's first half: (state, batch) -> (loss, metrics, grads)
  train_step: Callable  # (state, batch) -> (state, metrics), jitted once, state donated
  eval_step: Callable  # (params, batch) -> sums
  text_encoder_path: str = ""  # the imported frozen text encoder's folder; "" for none

  @property
  def pmap(self) -> bool:
    return self.config.parallel.loop == "pmap"

  def context(self):
    """The mesh and logical rules that tracing a step or sampling needs (a context manager)."""
    return _mesh_context(self.mesh, self.rules)

  def init(self) -> state_lib.TrainState:
    """A fresh state from ``config.seed``, created directly in its shardings; a frozen imported
    text encoder's weights replace its fresh ones (a resumed run restores them instead)."""
    loaded = None
    if self.text_encoder_path:  # read first: a missing weights file is a sentence, not a compile
      _, loaded = text_encoders.load(self.text_encoder_path)
    state = sharding.init_sharded(self.create_state, self.state_shardings, self.mesh, self.rules)
    if loaded is not None:
      state = state.replace(params=text_encoders.place(state.params, loaded))
    return state

  def train_batch(self, local: dict) -> dict:
    """This process's rows of a batch, laid out for ``train_step``."""
    if self.pmap:
      return sharding.per_device_batch(local, self.mesh)
    return self.eval_batch(local)

  def eval_batch(self, local: dict) -> dict:
    """This process's rows of a batch as global arrays in the task's batch shardings."""
    return sharding.global_batch(local, self.mesh, self.rules, self.batch_shardings)

  def abstract_batch(self) -> dict:
    """``example_batch`` as ShapeDtypeStructs with their shardings (to lower a step with)."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
            for k, v in self.example_batch.items()}


def build(config, plan: Plan | None = None, *, mesh: Mesh | None = None,
          devices=None) -> Program:
  """The Program of ``config``: validates it first unless ``plan`` (validate's result) is given.

  The mesh is built from ``config.mesh`` over ``devices`` (default: all) unless ``mesh`` is
  given. Nothing is compiled or allocated here: the steps compile on their first call.
  """
  if mesh is None:
    mesh = parallel_mesh.make_mesh(config.mesh, devices)
  if plan is None:
    plan = validate(config, num_devices=mesh.devices.size)
  rules = sharding.rules_from_config(config.parallel)
  task = plan.task
  model, model_cfg, attention = models.build(config, mesh)
  sample_model, _, _ = models.build(config, mesh, seq_parallel=False)
  text_encoder_path = models.frozen_text_encoder(config, model_cfg)
  tx, lr_schedule = optimizer.make(config.opt, config.train.steps, frozen=(
      text_encoders.frozen_mask if text_encoder_path else None))
  example = task.example_batch(config.train.batch_size)
  ema_decay = steps.ema_schedule(config.train.ema)
  # A task's non-gradient state and its update after each optimizer step (the VQ tokenizer's
  # code usage and dead-code restart); most tasks keep none.
  init_task_state = getattr(task, "init_task_state", None)
  task_update = task.task_update(model) if hasattr(task, "task_update") else None
  create_state = lambda: state_lib.create(
      model, tx, task.init_args(example), config.seed, ema=ema_decay is not None,
      task_state=init_task_state(model_cfg) if init_task_state else None)
  abstract, shardings = sharding.abstract_and_shardings(create_state, mesh, rules)
  batch_shardings = {k: sharding.logical_sharding(mesh, rules, axes)
                     for k, axes in task.batch_axes.items()}
  permutation = attention.permutation(config.train.seq_len) if config.task == "lm" else None
  pmap = config.parallel.loop == "pmap"
  make_step = functools.partial(
      steps.make_train_step, task.loss_fn(model, permutation), tx, lr_schedule,
      grad_accum=config.train.grad_accum, batch_axes=None if pmap else task.batch_axes,
      axis_name=steps.PMAP_AXIS if pmap else None, ema_decay=ema_decay, task_update=task_update)
  step_fn, step_with_grads = make_step(), make_step(with_grads=True)
  step_gradients = make_step(grads_only=True)
  context = functools.partial(_mesh_context, mesh, rules)
  if pmap:  # called outside the mesh context: inside pmap every array is one device's
    train_step = steps.pmapped(step_fn, mesh)
  else:
    train_step = InMesh(context, jax.jit(
        step_fn, in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0))
  eval_step = InMesh(context, jax.jit(task.eval_fn(model, permutation),
                                      in_shardings=(shardings.params, batch_shardings),
                                      out_shardings=sharding.replicated(mesh)))
  return Program(config=config, plan=plan, mesh=mesh, rules=rules, task=task, model=model,
                 sample_model=sample_model, attention=attention, tx=tx, lr_schedule=lr_schedule,
                 example_batch=example, create_state=create_state, abstract_state=abstract,
                 state_shardings=shardings, batch_shardings=batch_shardings, step_fn=step_fn,
                 step_with_grads=step_with_grads, step_gradients=step_gradients,
                 train_step=train_step, eval_step=eval_step, text_encoder_path=text_encoder_path)


@contextlib.contextmanager
def _mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class InMesh:
  """A jitted function that is called and lowered inside ``context()`` (the mesh and logical
  rules its tracing needs), so callers need not enter it."""

  def __init__(self, context, jitted):
    self._context, self.jitted = context, jitted
    self.__name__ = jitted.__name__

  def __call__(self, *args):
    with self._context():
      return self.jitted(*args)

  def lower(self, *args):
    with self._context():
      return self.jitted.lower(*args)
