"""DiT-MoE ("Scaling Diffusion Transformers to 16 Billion Parameters") on the 8x8 digits.

Launch (8 simulated CPU devices: 8 experts sharded 4 ways over mesh.expert, batch over data x
expert):
  python -m train --config=experiments/dit_moe_digits.py --workdir=/tmp/odyssey/dit_moe_digits \
      --cpu_devices=8

The digits DiT of experiments/dit_digits.py with every block's MLP replaced by 8 routed GELU
experts of width 64 (top-2) plus 2 shared experts of width 64 that every token uses, so a token's
active MLP width is 2·64 + 2·64 = 256, the dense MLP's, while the routed experts hold 4x the
dense MLP's parameters. Dropless routing, global-batch balance loss. Samples and the ViT
agreement check work as for dit_digits (bench/digits_agreement.py); 1,500 steps as udit_digits.
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=dit,variant=digits")
  c.model.moe.update(num_experts=8, top_k=2, shared_experts=2, expert_dim=64, every=1,
                     activation="gelu", capacity_factor=0.0, balance="global")
  c.mesh.update(data=2, expert=4)
  c.train.update(steps=1500)
  return c
