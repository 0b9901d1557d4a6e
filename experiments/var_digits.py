"""VAR on the digits: a 4-layer, width-64 next-scale Transformer (0.35M parameters, as the digits
DiT) over the 130 tokens (scales 1, 2, 3, 4, 6, 8) of experiments/vqvae_digits.py's tokenizer,
class-conditional with guidance. Measured: bench/results/runs.md and
bench/results/var_digits_quality/diffusion_quality.md.

Launch (8 simulated CPU devices, data=8), after training the tokenizer and writing its tokens:
  python -m train --config=experiments/vqvae_digits.py --workdir=/tmp/odyssey/vqvae_digits \
      --cpu_devices=8
  python -m train.encode --workdir=/tmp/odyssey/vqvae_digits --out=/tmp/odyssey/digit_tokens
  python -m train --config=experiments/var_digits.py --workdir=/tmp/odyssey/var_digits \
      --cpu_devices=8 --config.data.path=/tmp/odyssey/digit_tokens
Writes workdir/samples/step_NNNNNN.png (4 samples of each digit, one row per class, guidance 3)
at every eval.
"""

from configs import var


def get_config(arg: str | None = None):
  c = var.get_config(arg or "variant=digits")
  c.mesh.update(data=8)
  return c
