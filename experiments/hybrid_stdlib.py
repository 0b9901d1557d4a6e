"""A Qwen3-Next-style hybrid byte LM on the stdlib corpus: three Gated DeltaNet blocks, then one
gated full-attention block (q/k RMSNorm, RoPE on a quarter of each head, sigmoid output gate).

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2 as lm_stdlib):
  python -m train --config=experiments/hybrid_stdlib.py --workdir=/tmp/odyssey/hybrid_stdlib \
      --cpu_devices=8
With --config.mesh.seq > 1 the Gated DeltaNet layers pass states between sequence shards and the
attention layer runs Ulysses (or ring attention, in sequence order) in the same step.

4 blocks of width 128 (SwiGLU 336): 884,024 parameters against the tiny Llama's 885,888, with
lm_stdlib's data, steps, batch and optimizer.
"""

import ml_collections

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  del arg
  c = lm_stdlib.get_config("size=tiny")
  c.model = ml_collections.ConfigDict(dict(
      name="linear_rnn", mixer="gated_deltanet", vocab_size=384, num_layers=4, d_model=128,
      linear_heads=4, linear_k_heads=2, linear_k_dim=32, linear_v_dim=32, conv_size=4,
      mlp_dim=336, chunk=64, attention_every=4, num_heads=4, num_kv_heads=2, head_dim=32,
      qk_norm=True, attn_output_gate=True, rotary_fraction=0.25, max_len=2048,
      tie_embeddings=False, dtype="float32", param_dtype="float32"))
  return c
