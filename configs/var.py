"""Base config for VAR next-scale prediction (nets/var.py) on the token maps of a VQ tokenizer.

Config argument: ``variant=NAME`` (a key of nets/var.py VARIANTS; default "digits", which fits
the tokens of experiments/vqvae_digits.py). data.path must be the output of ``python -m
train.encode`` on a tokenizer workdir (train/tasks/var.py).
"""

import ml_collections

from configs import base, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"variant": "digits"})
  c = base.shared(steps=2000, batch_size=64, lr=1e-3, warmup_steps=100)
  c.task = "var"
  c.model = ml_collections.ConfigDict(dict(
      name="var", variant=args["variant"], class_dropout_prob=0.1, dtype="float32",
      param_dtype="float32", remat="none"))
  c.data = ml_collections.ConfigDict(dict(
      name="arrayrecord", path="", val_fraction=0.1, image_size=0, num_threads=0, prefetch=2,
      native_size=False))
  c.var = ml_collections.ConfigDict(dict(
      cfg_scale=3.0,  # guidance of the samples drawn at each eval (1: none)
      top_k=0, top_p=1.0,  # sampling filters (0 / 1.0: off)
      samples_per_class=4))  # PNG per eval: one row per class
  c.opt.update(weight_decay=0.05, b2=0.95)
  c.ckpt.update(every=500, keep=2)
  c.eval.update(every=500, steps=4, batch_size=64)
  return c
