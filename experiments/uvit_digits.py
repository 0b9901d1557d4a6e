"""Class-conditional U-ViT (time, label and patches as tokens, long skips) on the 8x8 digits.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/uvit_digits.py --workdir=/tmp/odyssey/uvit_digits \
      --cpu_devices=8
The same budget as experiments/dit_digits.py (3,000 steps of 128 images, AdamW 1e-3). Writes a PNG
grid to workdir/samples/ at every eval; bench/digits_agreement.py measures how often the trained
ViT classifies the samples as their conditioning class (README table).
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=uvit,variant=digits")
  c.mesh.update(data=8)
  return c
