"""Class-conditional DiT in the latent space of experiments/vae_digits.py: the digits at 32x32,
encoded to 8x8x4 latents (f=4) by train.encode, 16 tokens of 2x2 latent patches.

Launch (8 simulated CPU devices, data=8), after training the autoencoder:
  python -m train.encode --workdir=/tmp/odyssey/vae_digits --out=/tmp/odyssey/digit_latents
  python -m train --config=experiments/latent_dit_digits.py \
      --workdir=/tmp/odyssey/latent_dit_digits --cpu_devices=8
Reads the latents from data.path (default /tmp/odyssey/digit_latents; --config.data.path=DIR for
another) and decodes its samples with the autoencoder that metadata.json names, so the PNG grids
in workdir/samples/ are 32x32 digits. bench/diffusion_quality.py scores it against the same DiT
on 32x32 pixels (experiments/dit_digits.py:size=32, 64 tokens of 4x4 pixels).
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=dit,variant=digits")
  c.model.update(input_size=8, in_channels=4)
  # DiT's latent schedule. Latents are not clipped to [-1, 1] when sampled, and the cosine
  # schedule's last steps (sqrt(alpha_bar) near 1e-4) magnify an x0 prediction's error past
  # what the decoder can read; the linear one ends at sqrt(alpha_bar) = 6e-3.
  c.diffusion.schedule = "linear"
  c.data.update(name="arrayrecord", path="/tmp/odyssey/digit_latents", image_size=0)
  c.mesh.update(data=8)
  return c
