"""Class-conditional DiT (adaLN-Zero, learned sigma, DDPM) on the 8x8 digits.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/dit_digits.py --workdir=/tmp/odyssey/dit_digits \
      --cpu_devices=8
Writes a PNG grid (one row per class, DDIM 50 steps, guidance 2.0) to workdir/samples/ at every
eval. bench/digits_agreement.py measures how often the trained ViT classifies the samples as
their conditioning class (README table).
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=dit,variant=digits")
  c.mesh.update(data=8)
  return c
