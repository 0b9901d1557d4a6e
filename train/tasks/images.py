"""What the image tasks share: labelled images from train/image_data.py, batch layout, checks."""

import numpy as np

from train import image_data

IMAGE_AXES = ("act_batch", None, None, None)


class ImageTask:
  """Base of the classification and diffusion tasks: {"images": [B,H,W,C], "labels": [B]}."""
  batch_axes = {"images": IMAGE_AXES, "labels": ("act_batch",)}

  def __init__(self, config):
    self.config = config

  def check(self, model_cfg):
    image_data.check_image_config(self.config.data)
    classes = image_data.num_classes(self.config.data)
    if model_cfg.num_classes != classes:
      raise ValueError(f"model.num_classes={model_cfg.num_classes} but data "
                       f"{self.config.data.name!r} has {classes} classes.")
    # The data files themselves (images verify, shards open, each split fills a batch), before
    # the workdir is touched.
    image_data.check_splits(self.config.data, {
        "train": (self.config.train.batch_size, "train.batch_size"),
        "val": (self.config.eval.batch_size, "eval.batch_size")})

  def extra_metrics(self, model, params, *, sharding) -> dict:
    del model, params, sharding
    return {}  # everything is in the eval step's sums

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

  def model_example_batch(self, batch_size: int, model_cfg) -> dict:
    """Zeros shaped as the model's input (not the data's): for workdirs whose config holds a
    model without its dataset, such as Hugging Face weights imported by train.convert."""
    side, ch = model_cfg.image_size, model_cfg.channels
    return {"images": np.zeros((batch_size, side, side, ch), np.float32),
            "labels": np.zeros((batch_size,), np.int32)}

  def throughput_unit(self) -> tuple[str, int]:
    return "images", self.config.train.batch_size
