"""Mixtral-style byte LM on the stdlib corpus: 8 SwiGLU experts, top-2, every layer, expert-parallel.

Launch (8 simulated CPU devices: experts sharded 4 ways over mesh.expert, batch over data x expert):
  python -m train --config=experiments/moe_lm_stdlib.py --workdir=/tmp/odyssey/moe_lm_stdlib \
      --cpu_devices=8

The tiny Llama of experiments/lm_stdlib.py with every MLP (width 384) replaced by 8 experts of
width 192: top-2 routing activates 2 x 192 = 384 hidden units per token, the dense model's width,
so active parameters per token match (plus the small router) while total MLP parameters are 4x.
Capacity factor 1.25 (GShard/Switch: each expert takes at most 1.25x its even share of a dispatch
group's assignments; the dropped fraction is logged: about 20% at step 1, 4% by step 500 of the
README run); ``--config.model.moe.capacity_factor=0`` gives the dropless mode (grouped matmuls,
slower on CPU and, under expert parallelism, with worst-case all-to-all buffers). Global-batch
balance loss (coefficient 0.01) and router z-loss (0.001).
Same steps, batch, data and optimizer as lm_stdlib for a like-for-like comparison (README).
Config argument: ``experts=N,top_k=K`` (defaults 8, 2).
"""

from configs import parse_arg
from experiments import lm_stdlib


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"experts": 8, "top_k": 2})
  c = lm_stdlib.get_config("size=tiny")  # its data, budget and optimizer
  c.model.moe.update(num_experts=args["experts"], top_k=args["top_k"],
                     expert_dim=384 // args["top_k"], capacity_factor=1.25, balance="global",
                     aux_loss_coef=0.01, z_loss_coef=0.001)
  c.mesh.update(data=2, fsdp=1, tensor=1, seq=1, expert=4)
  return c
