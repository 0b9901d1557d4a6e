"""Image classification (ViT): cross-entropy with optional label smoothing, accuracy.

With data.native_size=True a batch is packed rows of images at their native sizes
(train/image_packing.py): the model gives logits per image slot [B, K, classes], and the loss and
accuracy are means over the slots that hold an image (``image_mask``).
"""

import jax
import jax.numpy as jnp
import optax

from train import image_data
from train.tasks import images


def _apply(model, params, batch, **kwargs):
  """Logits, labels and a weight per image: the slot mask of packed rows, else None (all)."""
  if "patches" not in batch:
    return model.apply({"params": params}, batch["images"], **kwargs), batch["labels"], None
  logits = model.apply({"params": params}, batch["patches"], segment_ids_BxS=batch["segment_ids"],
                       positions_BxSx2=batch["positions"], num_images=batch["labels"].shape[1],
                       **kwargs)
  return logits, batch["labels"], batch["image_mask"].astype(jnp.float32)


class ClassificationTask(images.ImageTask):
  """Labels from images: cross-entropy, accuracy."""

  def init_args(self, batch):
    if self.packed:
      return (batch["patches"], False, batch["segment_ids"], batch["positions"],
              batch["labels"].shape[1])
    return (batch["images"],)

  def check_packed(self, model_cfg):
    image_data.check_native(self.config.data, model_cfg, {
        "train": (self.config.train.batch_size, "train.batch_size"),
        "val": (self.config.eval.batch_size, "eval.batch_size")}, self.config.seed)
    if model_cfg.pool != "gap":
      raise ValueError(f"data.native_size=True pools each packed image by its token mean; set "
                       f"model.pool='gap' (got {model_cfg.pool!r}).")

  def loss_fn(self, model, permutation=None):
    del permutation  # bidirectional attention over patches: no causal balancing needed
    smoothing = self.config.train.label_smoothing

    def loss_fn(params, batch, rng):
      logits, labels, weight = _apply(model, params, batch, train=True, rngs={"dropout": rng})
      num_classes = logits.shape[-1]
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
      losses = optax.softmax_cross_entropy(logits, targets)
      correct = jnp.argmax(logits, -1) == labels
      if weight is None:
        return jnp.mean(losses), {"accuracy": jnp.mean(correct)}
      images = jnp.sum(weight)  # a count metric: it weighs micro-batches (train/steps.py)
      n = jnp.maximum(images, 1.0)
      return jnp.sum(losses * weight) / n, {"accuracy": jnp.sum(correct * weight) / n,
                                            "images": images}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    del permutation

    def eval_fn(params, batch):
      logits, labels, weight = _apply(model, params, batch)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      if weight is None:
        weight = jnp.ones(labels.shape, jnp.float32)
      return {"loss_sum": jnp.sum(losses * weight),
              "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
              "count": jnp.sum(weight)}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n,
            "images": float(sums["count"])}

  def headline(self, metrics: dict) -> str:
    return f"val loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.2%}"

  def samples(self, *args, **kwargs):
    return None

