"""The KL autoencoder of latent diffusion on the digits upscaled to 32x32 (f=4: 8x8x4 latents).

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/vae_digits.py --workdir=/tmp/odyssey/vae_digits \
      --cpu_devices=8
Writes workdir/samples/step_NNNNNN.png (val digits on top, reconstructions below) at every eval.
Then encode the digits into latent shards for a latent DiT (docs/data.md):
  python -m train.encode --workdir=/tmp/odyssey/vae_digits --out=/tmp/odyssey/digit_latents
Expect: val PSNR ~8 dB at step 0, rising within a few steps (the user-path test checks it rises
by step 6). Measured once so far, on a wider digits variant (channels 32/64/64, batch 64) on 2
loaded cores: 7.9 -> 17.1 -> 22.0 dB at steps 0/20/40 (~5 min). This variant: 7.8 -> 44.2 dB
in 1,000 steps (bench/results/runs.md).
"""

from configs import autoencoder


def get_config(arg: str | None = None):
  c = autoencoder.get_config(arg or "variant=digits")
  c.mesh.update(data=8)
  return c
