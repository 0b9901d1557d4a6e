"""Gated DeltaNet (Qwen3-Next's linear attention, no attention layers) byte LM on the stdlib corpus.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2 as lm_stdlib; tensor splits the
heads of every recurrence):
  python -m train --config=experiments/gdn_stdlib.py --workdir=/tmp/odyssey/gdn_stdlib \
      --cpu_devices=8
Sequence parallel (the recurrences pass states between the 4 shards of every sequence):
  python -m train --config=experiments/gdn_stdlib.py --workdir=/tmp/odyssey/gdn_seq \
      --cpu_devices=8 --config.mesh.data=2 --config.mesh.fsdp=1 --config.mesh.tensor=1 \
      --config.mesh.seq=4

4 blocks of width 128 (2 key heads shared by 4 value heads of 32, SwiGLU 336): 886,048
parameters against the tiny Llama's 885,888, with lm_stdlib's data, steps, batch and optimizer;
bench/results/runs.md compares the families' bits per byte.
"""

import ml_collections

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  del arg
  c = lm_stdlib.get_config("size=tiny")  # its data, budget, optimizer and mesh
  c.model = ml_collections.ConfigDict(dict(
      name="linear_rnn", mixer="gated_deltanet", vocab_size=384, num_layers=4, d_model=128,
      linear_heads=4, linear_k_heads=2, linear_k_dim=32, linear_v_dim=32, conv_size=4,
      mlp_dim=336, chunk=64, max_len=2048, tie_embeddings=False, dtype="float32",
      param_dtype="float32"))
  return c
