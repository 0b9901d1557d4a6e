"""MEGABYTE / MBLM hierarchical byte LM on the stdlib corpus.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2 as lm_stdlib):
  python -m train --config=experiments/megabyte_stdlib.py --workdir=/tmp/odyssey/megabyte \
      --cpu_devices=8
  python -m train --config=experiments/megabyte_stdlib.py:local=mamba ...   # hybrid MBLM

A global Transformer (2 layers, width 128) over 4-byte patches and a local model (2 layers,
width 128) predicting the bytes of each patch: Transformer blocks (MEGABYTE, 1.13M parameters)
or, with ``local=mamba``, Mamba blocks (a hybrid MBLM, 0.94M). ``patches=P1-P2`` (e.g. 4-2)
adds stages (the middle ones use the local block type). lm_stdlib's data, steps, batch and
optimizer, for the README's bits-per-byte comparison.
"""

import ml_collections

from configs import parse_arg
from experiments import lm_stdlib


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"local": "transformer", "patches": "4"})
  patches = tuple(int(p) for p in args["patches"].split("-"))
  stages = len(patches) + 1
  c = lm_stdlib.get_config("size=tiny")  # its data, budget, optimizer and mesh
  c.model = ml_collections.ConfigDict(dict(
      name="megabyte", vocab_size=384, patch_sizes=patches, d_model=(128,) * stages,
      num_layers=(2,) * stages, num_heads=(4,) * stages, mlp_dim=(384,) * stages,
      blocks=("transformer",) + (args["local"],) * (stages - 1), max_len=2048,
      tie_embeddings=False, dtype="float32", param_dtype="float32"))
  return c
