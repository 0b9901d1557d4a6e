"""Image classification (ViT): cross-entropy with optional label smoothing, accuracy."""

import jax
import jax.numpy as jnp
import optax

from train.tasks import images


class ClassificationTask(images.ImageTask):
  """Labels from images: cross-entropy, accuracy."""

  def init_args(self, batch):
    return (batch["images"],)

  def loss_fn(self, model, permutation=None):
    del permutation  # bidirectional attention over patches: no causal balancing needed
    smoothing = self.config.train.label_smoothing

    def loss_fn(params, batch, rng):
      logits = model.apply({"params": params}, batch["images"], train=True,
                           rngs={"dropout": rng})
      num_classes = logits.shape[-1]
      targets = optax.smooth_labels(jax.nn.one_hot(batch["labels"], num_classes), smoothing)
      loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
      accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
      return loss, {"accuracy": accuracy}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    del permutation

    def eval_fn(params, batch):
      logits = model.apply({"params": params}, batch["images"])
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      return {"loss_sum": jnp.sum(losses),
              "correct": jnp.sum(jnp.argmax(logits, -1) == batch["labels"]),
              "count": jnp.float32(batch["labels"].shape[0])}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n,
            "images": float(sums["count"])}

  def headline(self, metrics: dict) -> str:
    return f"val loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.2%}"

  def samples(self, *args, **kwargs):
    return None

