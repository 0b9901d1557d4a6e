"""VAR's multi-scale VQ tokenizer on the digits upscaled to 32x32: 8x8x16 features, 512 codes,
token maps at scales 1, 2, 3, 4, 6, 8 (130 tokens an image).

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/vqvae_digits.py --workdir=/tmp/odyssey/vqvae_digits \
      --cpu_devices=8
Writes workdir/samples/step_NNNNNN.png at every eval: val digits on top, then their
reconstructions from the token maps of the first 1, 2, ..., 6 scales (the last row is the full
reconstruction). Then write the token maps of every digit for VAR (docs/data.md):
  python -m train.encode --workdir=/tmp/odyssey/vqvae_digits --out=/tmp/odyssey/digit_tokens
Measured figures: bench/results/runs.md.
"""

from configs import vqvae


def get_config(arg: str | None = None):
  c = vqvae.get_config(arg or "variant=digits")
  c.mesh.update(data=8)
  return c
