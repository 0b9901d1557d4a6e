"""Base config for image classification with ViT (nets/vit.py) on the embedded digits.

Config argument: ``variant=NAME`` (a key of nets.vit.VARIANTS; default ``digits``).
"""

import ml_collections

from configs import base, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"variant": "digits"})
  c = base.shared(steps=600, batch_size=64, lr=1e-3, warmup_steps=50)
  c.task = "classification"
  c.model = ml_collections.ConfigDict(dict(
      name="vit", variant=args["variant"], image_size=8, channels=1, num_classes=10,
      # Global average pooling keeps the token count a power of two, so the sequence can be
      # split over mesh.seq (a class token would make it 1 + patches).
      pool="gap", posemb="sincos2d", dtype="float32", param_dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(
      name="digits", path="", val_fraction=0.1, image_size=8, num_threads=0, prefetch=2,
      # native_size (data.name="folder"): keep each image's size and aspect ratio (the longer side
      # at most max_size pixels, 0 = model.image_size) and pack several per row of seq_len patch
      # tokens, at most max_images per row; train.batch_size then counts rows (docs/data.md).
      native_size=False, max_size=0, seq_len=256, max_images=16))
  c.train.label_smoothing = 0.0
  c.opt.update(weight_decay=0.05)
  c.ckpt.update(every=200, keep=2)
  c.eval.update(every=200, steps=9, batch_size=40)  # 9 x 40 = the 360 test images
  return c
