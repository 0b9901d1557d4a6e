"""optax AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask,
wrapped in ``optax.apply_if_finite`` so a non-finite gradient never reaches the parameters."""

import flax.linen as nn
import jax
import optax

# Leaf names of parameters that never take weight decay (norm scales, biases).
NO_DECAY = ("scale", "bias")


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate: 0 -> opt.lr over opt.warmup_steps, then cosine to opt.lr * opt.final_lr_frac."""
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.final_lr_frac)


def decay_mask(params, decay_embeddings: bool):
  """True where weight decay applies: not norms/biases, embeddings only if configured."""
  def leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""

  def decays(path, _):
    name = leaf_name(path)
    return name not in NO_DECAY and (decay_embeddings or name != "embedding")

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map_with_path(decays, params, is_leaf=is_box)


def make(opt_cfg, total_steps: int):
  """Returns (tx, lr_schedule).

  The outer ``optax.apply_if_finite`` rejects (zero update, optimizer state kept) every step
  whose gradients are not finite and counts them in its state (``notfinite_count`` consecutive,
  ``total_notfinite`` in all), which is checkpointed with the rest; its own give-up threshold
  is never reached, because the loop stops the run at ``train.max_bad_steps`` instead.
  """
  if opt_cfg.name != "adamw":
    raise ValueError(f"config.opt.name={opt_cfg.name!r} is not supported; use 'adamw'.")
  lr = schedule(opt_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm),
      optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay,
                  mask=lambda p: decay_mask(p, opt_cfg.decay_embeddings)))
  return optax.apply_if_finite(tx, max_consecutive_errors=NEVER_ACCEPT), lr


NEVER_ACCEPT = 2**30  # apply_if_finite accepts non-finite updates only after this many in a row
