"""Byte-level Llama on the Python standard library's source (the embedded default corpus).

Launch (what `make run` does; 8 simulated CPU devices, really sharded data=2 x fsdp=2 x tensor=2):
  python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=/tmp/odyssey/lm_stdlib \
      --cpu_devices=8
Rerun the same command to resume from the newest checkpoint.

Expect (tiny, 500 steps, 2-core CPU, under 3 min): validation falls from 8.59 bits/byte (near
uniform over 384 ids) to about 2.5 bits/byte, and the sample has Python's shape (indentation,
`def`, `self`, `class`).
"""

from configs import lm


def get_config(arg: str | None = None):
  c = lm.get_config(arg)
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(steps=500, batch_size=16, seq_len=128)
  c.opt.update(lr=3e-3, warmup_steps=50)
  c.ckpt.update(every=100, keep=2)
  c.log.update(every=10)
  c.eval.update(every=100, steps=8, batch_size=32)
  return c
