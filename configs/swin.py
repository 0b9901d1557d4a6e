"""Base config for image classification with Swin (nets/swin.py) on the embedded digits, upscaled
to 32 x 32 so the patch grid (8 x 8 at patch 4) holds several 4 x 4 windows to shift.

Config argument: ``variant=NAME`` (a key of nets.swin.VARIANTS; default ``digits``).
"""

import ml_collections

from configs import parse_arg, vit


_unset = ml_collections.config_dict.placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"variant": "digits"})
  c = vit.get_config()  # the same data, optimizer, schedule and eval as the ViT classifier
  c.model = ml_collections.ConfigDict(dict(
      name="swin", variant=args["variant"], image_size=32, channels=1, num_classes=10,
      # Unset (None): the variant's value; each can be set on the command line, e.g.
      # --config.model.embed_dim=32 or --config.model.depths="(2, 2)".
      patch_size=_unset(int), window_size=_unset(int), embed_dim=_unset(int),
      depths=_unset(tuple), num_heads=_unset(tuple), mlp_ratio=_unset(int),
      dtype="float32", param_dtype="float32"))
  c.data.image_size = 32
  return c
