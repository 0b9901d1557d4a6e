"""ViT classifier on the 8x8 digits that ship with scikit-learn (1,437 train / 360 test images).

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/vit_digits.py --workdir=/tmp/odyssey/vit_digits \
      --cpu_devices=8
Expect: test accuracy >= 95% (see the README table for the measured figure).
"""

from configs import vit


def get_config(arg: str | None = None):
  c = vit.get_config(arg)
  c.mesh.update(data=8)
  return c
