"""Text-to-image MMDiT (joint text-image attention, rectified flow) on 48x48 captioned digit
canvases (train/caption_data.py), in pixels.

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/t2i_digits.py --workdir=/tmp/odyssey/t2i_digits \
      --cpu_devices=8
At every eval: the flow loss on the "val" captions and on the "heldout" ones (digit pairs never
trained on), and a PNG grid to workdir/samples/, one row per diffusion.prompts caption (the last
four held out). Captions are word ids (data.caption_tokens="words": at most 16 with the EOS) and
patches are 8 pixels, so the joint sequence is 16 caption + 36 image tokens, about 3 steps a
second on a 2-core CPU; `python -m train.sample --workdir=... --prompt=...` draws more.
Expect (bench/results/runs.md): 57 min; flow loss val 1.943 -> 0.028, heldout 1.939 -> 0.032;
held-out captions drawn as asked 65-66% of the time unguided, 95-96% at guidance 3 (chance
0.29%; bench/results/diffusion_quality_t2i). The places come within a few hundred steps, the
digits only after 3,000-4,500: a 3,000-step run draws chance digits.
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=mmdit,variant=digits")
  c.model.update(patch_size=8, hidden_size=96, text_width=96, text_len=16)
  c.data.update(caption_tokens="words", text_len=16)
  c.diffusion.update(time_dist="logit_normal")  # SD3's timestep density
  c.train.update(steps=9000, batch_size=64)
  c.eval.update(every=1500, steps=4, batch_size=64)
  c.ckpt.update(every=1500)
  c.mesh.update(data=8)
  return c
