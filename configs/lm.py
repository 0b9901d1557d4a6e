"""Base config for decoder language models (nets/llama.py) on text, byte-level by default.

Sizes (``size=`` in the config argument): ``test`` (tests only), ``tiny`` (the ``make run`` job),
``small`` and ``base``.
"""

import ml_collections

from configs import base, moe_group, parse_arg

SIZES = {
    #          layers d_model heads kv_heads mlp_dim
    "test": (2, 64, 4, 2, 128),
    "tiny": (4, 128, 4, 2, 384),
    "small": (6, 256, 8, 4, 768),
    "base": (12, 768, 12, 4, 2048),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Config groups: task, model, data, mesh, parallel, train, opt, ckpt, log, eval, sample, seed."""
  args = parse_arg(arg, {"size": "tiny"})
  if args["size"] not in SIZES:
    raise ValueError(f"size={args['size']!r} is not one of {sorted(SIZES)}.")
  layers, d_model, heads, kv_heads, mlp_dim = SIZES[args["size"]]
  c = base.shared(steps=1000, batch_size=32, lr=3e-3, warmup_steps=100)
  c.task = "lm"
  c.model = ml_collections.ConfigDict(dict(
      name="llama", vocab_size=384,  # 259 byte ids padded to a multiple of 128 for sharding
      num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=kv_heads,
      mlp_dim=mlp_dim, max_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
      dtype="float32", param_dtype="float32",
      moe=moe_group()))
  c.data = ml_collections.ConfigDict(dict(
      name="stdlib", path="", val_fraction=0.05,
      # byte | a tokenizer.json | a SentencePiece .model (train/tokenizer.py); model.vocab_size
      # must hold its ids. An arrayrecord dataset must have been written with the same one.
      tokenizer="byte",
      packing="none",  # "documents": attention, positions and loss stay within each document
      num_threads=0,  # in-memory windows: reader threads only add GIL contention
      prefetch=2,
      # A mixture: named sources, each a group of name ("stdlib" | "arrayrecord"), path, weight
      # (normalised) and optionally val_fraction (stdlib). Set, they replace name and path above
      # and share the rest (docs/data.md, Mixtures). Add them in an experiment file; the command
      # line can then change their fields (--config.data.sources.NAME.weight=0.7).
      sources=ml_collections.ConfigDict()))
  c.train.seq_len = 256
  # Multiple-choice tasks scored at every evaluation (train/multiple_choice.py): comma-separated
  # jsonl files and built-in names (stdlib_next_line), each logged as val mc/<name>/acc[_norm].
  c.eval.tasks = ""
  c.sample = ml_collections.ConfigDict(dict(
      prompt="def ", max_new_tokens=200, temperature=0.7, top_k=0, top_p=1.0, num_samples=4))
  return c
