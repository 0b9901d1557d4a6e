"""Swin classifier (shifted 4 x 4 windows, one patch merging) on the digits upscaled to 32 x 32.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/swin_digits.py --workdir=/tmp/odyssey/swin_digits \
      --cpu_devices=8
Expect: test accuracy >= the ViT's (see bench/results/runs.md for the measured figures).
"""

from configs import swin


def get_config(arg: str | None = None):
  c = swin.get_config(arg)
  c.mesh.update(data=8)
  return c
