"""Pure step functions: train_step(state, batch) -> (state, metrics) and eval_step(params, batch).

A task supplies ``loss_fn(params, batch, rng) -> (loss, metrics)`` and
``eval_fn(params, batch) -> sums``; these wrap them with the optimizer, the PRNG stream and the
metrics every task reports.
"""

import jax
import optax

from train.state import TrainState


def make_train_step(loss_fn, tx: optax.GradientTransformation, lr_schedule: optax.Schedule):
  """Builds the pure train step; jit it once with in/out shardings and donate the state."""

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                        step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step
