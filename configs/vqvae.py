"""Base config for VAR's multi-scale VQ tokenizer (nets/vqvae.py) on images.

Config argument: ``variant=NAME`` (a key of nets/vqvae.py VARIANTS; default the digits upscaled
to 32x32, 8x8 features at scales 1, 2, 3, 4, 6, 8). Any image source works (data.name digits |
folder | arrayrecord); labels are read and ignored (``train.encode`` keeps them with the tokens).
"""

import ml_collections

from configs import base, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"variant": "digits"})
  c = base.shared(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50)
  c.task = "vqvae"
  c.model = ml_collections.ConfigDict(dict(
      name="vqvae", variant=args["variant"], beta=0.25, quant_resi=0.5, mid_block_attention=True,
      dtype="float32", param_dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(
      name="digits", path="", val_fraction=0.1, image_size=32, num_threads=0, prefetch=2,
      native_size=False))
  c.vqvae = ml_collections.ConfigDict(dict(
      loss="l2",  # reconstruction: l1 | l2 (mean over pixels)
      vq_weight=1.0,  # x the quantiser's loss (beta x commitment + codebook, mean over scales)
      # Each code's running usage is an EMA (this decay) of the ids per step that chose it; a
      # code below the threshold is moved onto a random residual of the batch (0: never).
      usage_decay=0.99, restart_threshold=1.0,
      sample_images=8))  # PNG per eval: val images over reconstructions from 1, 2, ..., K scales
  c.opt.update(weight_decay=0.0, b2=0.99)
  c.ckpt.update(every=500, keep=2)
  c.eval.update(every=500, steps=2, batch_size=64)
  return c
