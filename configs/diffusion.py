"""Base config for class-conditional diffusion with DiT, U-DiT or U-ViT on the embedded digits.

Config argument: ``model=dit|udit|uvit,variant=NAME`` (a key of the family's VARIANTS).
"""

import ml_collections

from configs import base, moe_group, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"model": "dit", "variant": "digits"})
  c = base.shared(steps=3000, batch_size=128, lr=1e-3, warmup_steps=100)
  c.task = "diffusion"
  c.model = ml_collections.ConfigDict(dict(
      name=args["model"], variant=args["variant"], input_size=8, in_channels=1, num_classes=10,
      learn_sigma=True, class_dropout_prob=0.1, dtype="float32", param_dtype="float32"))
  if args["model"] == "dit":  # DiT-MoE: set model.moe.num_experts
    c.model.moe = moe_group(activation="gelu")
  c.data = ml_collections.ConfigDict(dict(
      name="digits", path="", val_fraction=0.1, image_size=8, num_threads=0, prefetch=2,
      # native_size (DiT on data.name="folder"): packed rows of images at their own sizes, as
      # configs/vit.py; samples stay square at model.input_size (docs/data.md).
      native_size=False, max_size=0, seq_len=256, max_images=16))
  c.diffusion = ml_collections.ConfigDict(dict(
      objective="ddpm",  # ddpm (epsilon prediction, + learned variance) | flow (rectified flow)
      schedule="cosine", num_steps=1000,  # DDPM noise schedule: linear | cosine
      sampler="ddim",  # ddpm | ddim (objective ddpm), flow (objective flow)
      sample_steps=50, ddim_eta=0.0, cfg_scale=2.0, samples_per_class=8,
      sample_classes=0))  # grid rows: the first N classes (0 = all)
  c.opt.update(weight_decay=0.0, b2=0.999)
  # Samples and evaluation use the EMA weights (eval.weights="auto"). DiT's 0.9999 averages over
  # ~10k updates, more than this 3000-step run has; 0.999 with the ratio warm-up averages over the
  # last ~1000 and follows the fast early updates.
  c.train.ema.update(decay=0.999, warmup="ratio")
  c.ckpt.update(every=500, keep=2)
  c.eval.update(every=500, steps=2, batch_size=128)
  return c
