"""What the image tasks share: labelled images from train/image_data.py, batch layout, checks."""

import numpy as np

from train import image_data, models

IMAGE_AXES = ("act_batch", None, None, None)
# data.native_size=True: packed rows (train/image_packing.py); rows shard over the data axes like
# images, and a row's tokens stay together on its device.
PACKED_AXES = {"patches": ("act_batch", None, None), "segment_ids": ("act_batch", None),
               "positions": ("act_batch", None, None), "labels": ("act_batch", None),
               "image_mask": ("act_batch", None)}


class ImageTask:
  """Base of the classification and diffusion tasks: {"images": [B,H,W,C], "labels": [B]}."""
  batch_axes = {"images": IMAGE_AXES, "labels": ("act_batch",)}

  def __init__(self, config):
    self.config = config
    self.packed = image_data.native(config.data)
    if self.packed:
      self.batch_axes = PACKED_AXES

  def check(self, model_cfg):
    image_data.check_image_config(self.config.data)
    if self.packed:
      self.check_packed(model_cfg)
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

  def check_packed(self, model_cfg):
    """data.native_size=True: the tasks that read packed rows override this."""
    raise ValueError(f"data.native_size=True does not work with config.task="
                     f"{self.config.task!r}; set data.native_size=False.")

  def datasets(self):
    c = self.config
    if self.packed:
      model_cfg = models.model_config(c)
      make = lambda split, batch, shuffle, epochs: image_data.make_packed_dataset(
          c.data, model_cfg, split=split, global_batch_size=batch, seed=c.seed, shuffle=shuffle,
          num_epochs=epochs)
    else:
      make = lambda split, batch, shuffle, epochs: image_data.make_dataset(
          c.data, split=split, global_batch_size=batch, seed=c.seed, shuffle=shuffle,
          num_epochs=epochs)
    return make("train", c.train.batch_size, True, None), make("val", c.eval.batch_size, False, 1)

  def example_batch(self, batch_size: int) -> dict:
    if self.packed:
      model_cfg = models.model_config(self.config)
      S, K, p = self.config.data.seq_len, self.config.data.max_images, model_cfg.patch_size
      return {"patches": np.zeros((batch_size, S, p * p * model_cfg.channels), np.float32),
              "segment_ids": np.ones((batch_size, S), np.int32),
              "positions": np.zeros((batch_size, S, 2), np.int32),
              "labels": np.zeros((batch_size, K), np.int32),
              "image_mask": np.ones((batch_size, K), bool)}
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
    """Packed (data.native_size): rows of data.seq_len tokens, as train/flops.py counts them."""
    return ("rows" if self.packed else "images"), self.config.train.batch_size
