"""Class-conditional DiT (adaLN-Zero, learned sigma, DDPM) on the 8x8 digits.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/dit_digits.py --workdir=/tmp/odyssey/dit_digits \
      --cpu_devices=8
Writes a PNG grid (one row per class, DDIM 50 steps, guidance 2.0) to workdir/samples/ at every
eval. bench/digits_agreement.py measures how often the trained ViT classifies the samples as
their conditioning class (README table).

``:size=32`` trains on the digits upscaled to 32x32 in 64 tokens of 4x4 pixels (``:size=16``: 64
tokens of 2x2), the pixel-space counterpart of experiments/latent_dit_digits.py (the same digits
through vae_digits' 8x8x4 latents, 16 tokens); bench/diffusion_quality.py compares the two.
"""

from configs import diffusion, parse_arg


def get_config(arg: str | None = None):
  size = parse_arg(arg, {"size": 8})["size"]
  if size not in (8, 16, 32):
    raise ValueError(f"experiments/dit_digits.py:size={size} must be 8, 16 or 32.")
  c = diffusion.get_config("model=dit,variant=digits")
  c.data.image_size = size
  c.model.update(input_size=size, patch_size=max(2, size // 8))
  c.mesh.update(data=8)
  return c
