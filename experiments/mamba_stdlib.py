"""Mamba (selective state spaces, no attention) byte LM on the stdlib corpus.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2 as lm_stdlib; tensor splits the
inner channels):
  python -m train --config=experiments/mamba_stdlib.py --workdir=/tmp/odyssey/mamba_stdlib \
      --cpu_devices=8

7 Mamba blocks of width 128 (inner 256, state 16): 0.91M parameters against the tiny Llama's
0.89M, with lm_stdlib's data, steps, batch and optimizer, so the README compares bits per byte
at equal budgets. ``scan_chunk`` > 0 bounds the scan's memory for long contexts.
"""

import ml_collections

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  del arg
  c = lm_stdlib.get_config("size=tiny")  # its data, budget, optimizer and mesh
  c.model = ml_collections.ConfigDict(dict(
      name="mamba", vocab_size=384, num_layers=7, d_model=128, d_state=16, d_conv=4, expand=2,
      dt_rank=0, scan_chunk=0, max_len=2048, tie_embeddings=False, dtype="float32",
      param_dtype="float32"))
  return c
