"""Class-conditional U-DiT (downsampled-token attention, U-shaped with skips) on the 8x8 digits.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/udit_digits.py --workdir=/tmp/odyssey/udit_digits \
      --cpu_devices=8
Writes a PNG grid to workdir/samples/ at every eval.
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=udit,variant=digits")
  c.mesh.update(data=8)
  return c
