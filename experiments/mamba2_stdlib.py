"""Mamba-2 (SSD: scalar decay per head, no attention, no MLP) byte LM on the stdlib corpus.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2 as lm_stdlib; tensor splits the
heads and the B/C groups):
  python -m train --config=experiments/mamba2_stdlib.py --workdir=/tmp/odyssey/mamba2_stdlib \
      --cpu_devices=8

7 blocks of width 128 (8 heads of 32 channels, 2 groups of B and C with state 16): 865,128
parameters against the tiny Llama's 885,888, with lm_stdlib's data, steps, batch and optimizer.
"""

import ml_collections

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  del arg
  c = lm_stdlib.get_config("size=tiny")
  c.model = ml_collections.ConfigDict(dict(
      name="linear_rnn", mixer="mamba2", vocab_size=384, num_layers=7, d_model=128,
      linear_heads=8, linear_k_heads=2, linear_k_dim=16, linear_v_dim=32, conv_size=4,
      mlp_dim=0, chunk=64, norm_eps=1e-5, residual_in_fp32=True, max_len=2048,
      tie_embeddings=False, dtype="float32", param_dtype="float32"))
  return c
