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

from configs import lm


def get_config(arg: str | None = None):
  del arg
  c = lm.get_config("size=tiny")
  c.model = ml_collections.ConfigDict(dict(
      name="mamba", vocab_size=384, num_layers=7, d_model=128, d_state=16, d_conv=4, expand=2,
      dt_rank=0, scan_chunk=0, max_len=2048, tie_embeddings=False, dtype="float32",
      param_dtype="float32"))
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(steps=500, batch_size=16, seq_len=128)
  c.opt.update(lr=3e-3, warmup_steps=50)
  c.ckpt.update(every=100, keep=2)
  c.log.update(every=10)
  c.eval.update(every=100, steps=8, batch_size=32)
  return c
