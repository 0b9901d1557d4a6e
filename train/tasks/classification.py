"""Image classification (ViT): cross-entropy with optional label smoothing, accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import image_data

IMAGE_AXES = ("act_batch", None, None, None)


class ClassificationTask:
  batch_axes = {"images": IMAGE_AXES, "labels": ("act_batch",)}

  def __init__(self, config):
    self.config = config

  def check(self, model_cfg):
    image_data.check_image_config(self.config.data)
    classes = image_data.num_classes(self.config.data)
    if model_cfg.num_classes != classes:
      raise ValueError(f"model.num_classes={model_cfg.num_classes} but data "
                       f"{self.config.data.name!r} has {classes} classes.")

  def datasets(self):
    c = self.config
    make = lambda split, batch, shuffle, epochs: image_data.make_dataset(
        c.data, split=split, global_batch_size=batch, seed=c.seed, shuffle=shuffle,
        num_epochs=epochs)
    return make("train", c.train.batch_size, True, None), make("val", c.eval.batch_size, False, 1)

  def example_batch(self, batch_size: int) -> dict:
    h, w, ch = image_data.image_shape(self.config.data)
    return {"images": np.zeros((batch_size, h, w, ch), np.float32),
            "labels": np.zeros((batch_size,), np.int32)}

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

  def throughput_unit(self) -> tuple[str, int]:
    return "images", self.config.train.batch_size

  def samples(self, *args, **kwargs):
    return None

