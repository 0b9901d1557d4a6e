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


def reorder(batch: dict, permutation):
  """Applies the attention plan's sequence order to inputs and targets, with true positions.

  Every op but attention is position-wise and the loss is a sum over tokens, so running the model
  on a permuted sequence (with its original positions for RoPE and causal masking) changes
  nothing but which device holds which tokens.
  """
  inputs, targets = batch["inputs"], batch["targets"]
  if permutation is None:
    return inputs, targets, None
  positions = jnp.broadcast_to(jnp.asarray(permutation, jnp.int32), inputs.shape)
  return inputs[:, permutation], targets[:, permutation], positions


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    permutation=None):
  """Builds the pure train step; jit it once with in/out shardings and donate the state."""

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    inputs, targets, positions = reorder(batch, permutation)

    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, positions, rngs={"dropout": step_rng})
      loss_sum, count = token_loss(logits, targets)
      return loss_sum / jnp.maximum(count, 1.0), count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step), "tokens": count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step


def make_eval_step(model, permutation=None):
  """Eval step: (params, batch) -> summed loss and token count (averaged by the caller)."""

  def eval_step(params, batch: dict):
    inputs, targets, positions = reorder(batch, permutation)
    logits = model.apply({"params": params}, inputs, positions)
    loss_sum, count = token_loss(logits, targets)
    return {"loss_sum": loss_sum, "tokens": count}

  return eval_step
