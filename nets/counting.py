"""FLOP formula pieces several families share (attention, MLP and MoE matmuls).

Convention (PaLM, Chowdhery et al. 2022, appendix B): a matmul costs 2 FLOPs per multiply-add;
elementwise work, gathers and the loss are not counted. Each family's ``flops(cfg, step)`` (its
``Family.flops``) is the forward pass per token (LM) or per image; train/flops.py turns it into
step totals and MFU.
"""

import dataclasses
from typing import Callable

from nets import moe


@dataclasses.dataclass(frozen=True)
class Step:
  """What a family's count needs besides its Config."""
  batch: int  # sequences or images
  seq_len: int  # LM tokens per sequence, or patch tokens per packed image row (0 for images)
  executed: bool  # count what the kernels run, not the model convention
  # The MoE dispatch layout (batch and sequence groups) of a MoE config on the run's mesh
  # (capacity mode); None: one device, ``model.moe.groups`` batch groups or one.
  moe_layout: Callable[[moe.Config], moe.Layout] | None = None


def attention(keys: int, width: int, causal: bool, executed: bool) -> float:
  """Forward FLOPs per query: scores q·k and the weighted values, 2·keys·width each.

  ``width`` is heads × head_dim. Causal attention is half of it in the model count (the work a
  causal kernel must do); executed, the dense masked kernel runs the full square.
  """
  full = 4 * keys * width
  return full if executed or not causal else full / 2


def mlp_matrices(activation: str) -> int:
  return 3 if activation == "swiglu" else 2  # gate, up, down / up, down


def moe_layer(moe_cfg: moe.Config, width: int, mlp_dim: int, tokens_per_sequence: int,
              step: Step) -> float:
  """Forward FLOPs per token of a MoE layer: router, routed and shared experts.

  2·E·X (router) + slots · m·2·E·M_e (routed) + shared · m·2·E·M_e, with m = 3 matrices for
  SwiGLU and 2 for GELU experts. The model count takes slots = top_k (active parameters).
  Executed, capacity mode: every expert runs its C = ceil(factor · T·k / X) slots per dispatch
  group of T tokens, filled or not, so slots = X·C / T; dropless: top_k (ragged_dot; the CPU
  block-padded fallback runs a little more).
  """
  M = moe_cfg.hidden(mlp_dim)
  expert = mlp_matrices(moe_cfg.activation) * 2 * width * M
  slots = moe_cfg.top_k
  if step.executed and moe_cfg.capacity_factor:
    if step.moe_layout is None:
      batch_groups, seq_groups = moe_cfg.groups or 1, 1
    else:
      layout = step.moe_layout(moe_cfg)
      batch_groups, seq_groups = layout.batch_groups, layout.seq_groups
    T = (step.batch // batch_groups) * (tokens_per_sequence // seq_groups)
    slots = moe_cfg.num_experts * moe_cfg.capacity(T) / T
  return 2 * width * moe_cfg.num_experts + (slots + moe_cfg.shared_experts) * expert
