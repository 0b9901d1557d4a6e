"""Functional Flax (linen) model families, one per module; logical axis names only.

Shape-suffix legend used in variable names (e.g. ``q_BxSxHxD``):
  B  batch                      S  query sequence length       T  key/value sequence length
  E  model width (d_model)      H  query heads                 K  key/value heads (GQA)
  G  query heads per KV head    D  head dimension              M  MLP hidden width
  V  vocabulary                 L  layers (stacked by nn.scan)
  X  experts (MoE)              T  tokens of one MoE dispatch group (in nets/moe.py)

Logical axis names (mapped to mesh axes only by parallel/sharding.py):
  parameters:  "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "norm", "layers",
               "expert" (stacked MoE expert weights, nets/moe.py)
  activations: "act_batch", "act_seq", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
               "act_vocab"
A family module exposes a frozen ``Config`` dataclass (``Config.from_config(config.model)`` is the
one place it is built), a linen ``Model``, and at its bottom ``FAMILY``, its nets.registry.Family
(parameter count, FLOPs, capabilities, decode cache). Shared modules, which families import
instead of each other: layers.py (projections, embeddings, norms, rotary, attention/MLP blocks,
patches, remat policies, the scanned stack, config helpers), decoder.py (the Llama block and KV
cache), ssm.py (the Mamba block), conditioning.py (DiT's embedders and adaLN-Zero blocks),
moe.py, attention.py and counting.py (shared FLOP formula pieces).
"""
