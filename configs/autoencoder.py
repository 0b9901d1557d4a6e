"""Base config for the KL autoencoder of latent diffusion (nets/autoencoder.py) on images.

Config argument: ``variant=NAME`` (a key of nets/autoencoder.py VARIANTS; default the digits
upscaled to 32x32). Any image source works (data.name digits | folder | arrayrecord); labels are
read and ignored.
"""

import ml_collections

from configs import base, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"variant": "digits"})
  c = base.shared(steps=1000, batch_size=32, lr=1e-3, warmup_steps=50)
  c.task = "autoencoder"
  c.model = ml_collections.ConfigDict(dict(
      name="autoencoder", variant=args["variant"], scaling_factor=0.0, mid_block_attention=True,
      dtype="float32", param_dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(
      name="digits", path="", val_fraction=0.1, image_size=32, num_threads=0, prefetch=2,
      native_size=False))
  c.autoencoder = ml_collections.ConfigDict(dict(
      loss="l1",  # reconstruction: l1 | l2 (mean over pixels)
      kl_weight=1e-6,  # x KL(posterior || N(0, I)) summed over latent elements (LDM's kl-f8)
      sample_images=8))  # PNG per eval: this many val images (top) and their reconstructions
  c.opt.update(weight_decay=0.0, b2=0.999)
  c.ckpt.update(every=500, keep=2)
  c.eval.update(every=250, steps=2, batch_size=64)
  return c
