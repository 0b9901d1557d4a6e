"""Pure step functions: train_step(state, batch) -> (state, metrics) and eval_step(params, batch)."""

import jax
import jax.numpy as jnp
import optax

from train.data import PAD_ID
from train.state import TrainState


def token_loss(logits_BxSxV, targets_BxS):
  """Summed float32 cross-entropy over non-padding targets, and their count."""
  weights_BxS = (targets_BxS != PAD_ID).astype(jnp.float32)
  losses_BxS = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxSxV.astype(jnp.float32), targets_BxS)
  return jnp.sum(losses_BxS * weights_BxS), jnp.sum(weights_BxS)


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule):
  """Builds the pure train step; jit it once with in/out shardings and donate the state."""

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"], rngs={"dropout": step_rng})
      loss_sum, count = token_loss(logits, batch["targets"])
      return loss_sum / jnp.maximum(count, 1.0), count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step), "tokens": count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step


def make_eval_step(model):
  """Eval step: (params, batch) -> summed loss and token count (averaged by the caller)."""

  def eval_step(params, batch: dict):
    logits = model.apply({"params": params}, batch["inputs"])
    loss_sum, count = token_loss(logits, batch["targets"])
    return {"loss_sum": loss_sum, "tokens": count}

  return eval_step
