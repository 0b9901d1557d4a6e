"""Pure step functions: train_step(state, batch) -> (state, metrics), shared by both loops.

A task supplies ``loss_fn(params, batch, rng) -> (loss, metrics)``; ``make_train_step`` wraps it
with gradient accumulation, the optimizer, the PRNG stream, the non-finite guard and the metrics
every task reports. The mesh loop jits that one body with shardings; the pmap loop
(``parallel.loop="pmap"``) maps the same body over devices with ``axis_name`` set, which adds the
``pmean`` of gradients and metrics. There is no second copy of the model or optimizer logic.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from parallel import sharding
from train.state import TrainState

PMAP_AXIS = "batch"  # the pmap loop's device axis

# Metrics that are counts: summed over micro-batches and devices, not averaged. The first one a
# task reports weighs its micro-batches (tokens: the LM's token-mean loss; images: packed image
# rows, whose loss is a mean over the images they hold).
COUNT_METRICS = ("tokens", "images")


def make_train_step(loss_fn, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, *,
                    grad_accum: int = 1, batch_axes: dict | None = None,
                    axis_name: str | None = None, with_grads: bool = False,
                    grads_only: bool = False,
                    ema_decay: Callable | None = None, task_update: Callable | None = None):
  """Builds the pure train step; the caller jits (or pmaps) it once and donates the state.

  ``grad_accum`` > 1 splits the batch into that many micro-batches inside the step (a
  ``lax.scan``), so activations are held for one micro-batch at a time while the update equals
  the one of the whole batch: micro-batch gradients are averaged with weights equal to their
  ``tokens`` (or ``images``) count when the task reports one (token- or image-mean losses of
  uneven micro-batches), else equally. Micro-batch ``a``
  takes rows ``a, a+A, a+2A, ...`` so every data-parallel device contributes to every micro-batch
  and no resharding is needed; ``batch_axes`` (the task's logical batch axes) pins that layout.

  ``axis_name`` (the pmap loop) averages gradients and metrics over that device axis
  (``lax.pmean``; counts are summed) and folds the device index into the step's PRNG key so
  devices draw different noise.

  A step whose loss or gradients are not finite changes nothing but the step counter and the
  data position: ``optimizer.make`` wraps the optimizer in ``optimizer.skip_nonfinite``, which
  returns zero updates and keeps its inner state, and counts consecutive (``bad_steps``) and
  total (``skipped_steps``) rejected steps; a non-finite loss poisons the gradients so it is
  rejected too. A step whose gradients are finite but whose new parameters or optimizer state
  are not (an overflowing update) is rejected and counted the same way, so no non-finite value
  ever reaches the state the loop checkpoints. The loop stops the run after
  ``train.max_bad_steps`` consecutive bad steps.

  ``ema_decay`` (``ema_schedule``'s result; None: no EMA) maps the number of updates applied so
  far to the decay of this one; after the optimizer update the step moves ``state.ema_params``
  towards the new parameters, ``ema = d * ema + (1 - d) * params``, in float32 and cast back to
  the parameter dtype. A rejected step leaves the EMA as it was (d = 1) and does not count.

  ``task_update`` (a task's non-gradient state, e.g. the VQ tokenizer's code usage; None: none)
  runs after the optimizer update and before the EMA as ``task_update(params, state.task_state,
  batch, rng, axis_name) -> (params, task_state, metrics)``: it may change parameters outside the
  gradient (a dead-code restart) and adds its metrics to the step's. Under the pmap loop it gets
  the device's rows and ``axis_name``, and must reduce over that axis so every device changes
  the parameters alike; its rng is the step's before the device index is folded in.

  ``with_grads`` makes the step return ``(state, metrics, grads)``, the gradients it applied
  (averaged over micro-batches and devices), for checks that compare them without a second
  backward pass.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def single(params, batch, rng):
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, metrics, grads

  compute = single if grad_accum == 1 else functools.partial(
      _accumulated, single, grad_accum=grad_accum, batch_axes=batch_axes)

  def gradients(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    update_rng = jax.random.fold_in(step_rng, 1)
    if axis_name is not None:
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    loss, metrics, grads = compute(state.params, batch, step_rng)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      loss = jax.lax.pmean(loss, axis_name)
      metrics = {k: (jax.lax.psum(v, axis_name) if k in COUNT_METRICS
                     else jax.lax.pmean(v, axis_name)) for k, v in metrics.items()}
    return rng, update_rng, loss, metrics, grads

  if grads_only:
    return lambda state, batch: gradients(state, batch)[2:]

  def train_step(state: TrainState, batch: dict):
    rng, update_rng, loss, metrics, grads = gradients(state, batch)
    # A non-finite loss makes one gradient leaf NaN, hence the global norm, so skip_nonfinite
    # rejects the step (one leaf, not all: an add per leaf is a kernel per leaf to compile).
    poison = jnp.where(jnp.isfinite(loss), 0.0, jnp.nan)
    leaves, tree = jax.tree.flatten(grads)
    applied = jax.tree.unflatten(tree, [leaves[0] + poison.astype(leaves[0].dtype), *leaves[1:]])
    updates, opt_state = tx.update(applied, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(applied),
               "lr": lr_schedule(state.step), **bad_step_counts(opt_state)}
    if task_update is not None:
      params, task_state, task_metrics = task_update(params, state.task_state, batch, update_rng,
                                                     axis_name)
      metrics = {**metrics, **task_metrics}
      state = state.replace(task_state=task_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    if ema_decay is not None:
      # Updates applied before this one; a rejected step (last_finite False) keeps the EMA.
      updates_done = state.step - state.opt_state.total_notfinite
      decay = jnp.where(opt_state.last_finite, ema_decay(updates_done), 1.0)
      new_state = new_state.replace(ema_params=ema_update(state.ema_params, params, decay))
    return (new_state, metrics, grads) if with_grads else (new_state, metrics)

  return train_step


def ema_schedule(ema_cfg) -> Callable | None:
  """``t -> decay`` of ``train.ema`` (t: updates applied before this one), or None when
  ``ema_cfg.decay`` is 0 (no EMA). warmup "none": the constant decay; "ratio": min(decay,
  (1+t)/(10+t)) (TensorFlow's ExponentialMovingAverage with num_updates); "power": min(decay,
  1 - (1+t)^-power) (Karras et al.'s warm-up). Both warm-ups let the early EMA follow the
  fast-moving parameters instead of staying near the random initialisation."""
  decay, warmup, power = float(ema_cfg.decay), ema_cfg.warmup, float(ema_cfg.power)
  if decay == 0.0:
    return None

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    if warmup == "ratio":
      return jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    if warmup == "power":
      return jnp.minimum(decay, 1.0 - (1.0 + t) ** -power)
    return jnp.full_like(t, decay)

  return schedule


def ema_update(ema, params, decay):
  """``decay * ema + (1 - decay) * params`` per leaf, in float32, in ``params``' dtypes."""
  d = jnp.asarray(decay, jnp.float32)

  def leaf(e, p):
    if not jnp.issubdtype(p.dtype, jnp.inexact):
      return p
    return (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(p.dtype)

  return jax.tree.map(leaf, ema, params)


def _accumulated(single, params, batch, rng, *, grad_accum: int, batch_axes: dict | None):
  """``single(params, batch, rng)`` over ``grad_accum`` micro-batches (a ``lax.scan``), the
  gradients and metrics averaged with the micro-batches' ``tokens`` or ``images`` as weights
  (else equally)."""
  micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)
  if batch_axes is not None:
    micro = {k: nn.with_logical_constraint(v, (None,) + tuple(batch_axes[k]))
             for k, v in micro.items()}

  def body(carry, xs):
    micro_batch, micro_rng = xs
    loss, metrics, grads = single(params, micro_batch, micro_rng)
    counts = [metrics[k] for k in COUNT_METRICS if k in metrics]
    w = (counts[0] if counts else jnp.ones((), jnp.float32)).astype(jnp.float32)
    weighted = jax.tree.map(lambda g: g.astype(jnp.float32) * w, grads)
    summed = {k: (v if k in COUNT_METRICS else v * w) for k, v in metrics.items()}
    new = (carry[0] + w, jax.tree.map(jnp.add, carry[1], weighted), carry[2] + loss * w,
           jax.tree.map(jnp.add, carry[3], summed))
    return new, None

  zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  _, first_metrics, _ = jax.eval_shape(single, *jax.tree.map(
      abstract, (params, jax.tree.map(lambda x: x[0], micro), rng)))
  zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), first_metrics)
  rngs = jax.random.split(rng, grad_accum)
  (w, grads, loss, metrics), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros_g, jnp.zeros((), jnp.float32), zeros_m),
      (micro, rngs))
  grads = jax.tree.map(lambda g, p: (g / w).astype(p.dtype), grads, params)
  metrics = {k: (v if k in COUNT_METRICS else v / w) for k, v in metrics.items()}
  return loss / w, metrics, grads


def bad_step_counts(opt_state) -> dict:
  """``bad_steps`` (consecutive rejected steps) and ``skipped_steps`` (all rejected steps)."""
  return {"bad_steps": opt_state.notfinite_count, "skipped_steps": opt_state.total_notfinite}


def _split_micro(x, num: int):
  """[B, ...] -> [num, B/num, ...] with micro-batch a = rows a, a+num, a+2num, ..."""
  return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)


def pmapped(train_step, mesh):
  """The pmap loop's step: ``train_step`` mapped over every device with ``jax.pmap``.

  It takes and returns the same replicated state (and replicated metrics) as the mesh loop's
  jitted step, so everything around it (checkpoints, evaluation, sampling) is shared: the state
  is viewed as a stacked [devices, ...] array on entry and as one replicated array on exit, both
  without copying. ``batch`` must already be split per device (``sharding.per_device_batch``).
  """
  step = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=0)

  def run(state, batch):
    state, metrics = step(sharding.stack_replicas(state, mesh), batch)
    return sharding.unstack_replicas(state, mesh), sharding.unstack_replicas(metrics, mesh)

  return run
