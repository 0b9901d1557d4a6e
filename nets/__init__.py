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
one place it is built) and a linen ``Model``.
"""
