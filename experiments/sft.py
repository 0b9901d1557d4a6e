"""Supervised fine-tuning (docs/data.md, "SFT") of a language model on a jsonl of
{"prompt", "completion"} or {"messages"} rows, the loss on the completions (assistant turns) only.

Launch, on a Hugging Face Llama imported with train.convert (docs/convert.md, "Fine-tune on your
own examples"):
  python -m train --config=experiments/sft.py:from=IMPORTED --workdir=RUN \
      --config.data.path=chat.jsonl
``from=WORKDIR`` (an imported or a trained LM workdir) supplies the model group of its
config.json, its tokenizer (the tokenizer.json or tokenizer.model it keeps, with the chat template
of the tokenizer_config.json beside it) and the starting parameters (``init.from``). Without it,
the tiny byte-level Llama of configs/lm.py starts from scratch.

Expect: the validation loss (over completion tokens only) falls from the imported model's; the
run's workdir generates and exports like any other (docs/convert.md).
"""

import json
import os

import ml_collections

from configs import lm, parse_arg
from train import tokenizer


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"from": ""})
  c = lm.get_config("size=tiny")
  source = args["from"]
  if source:
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"from={source} has no config.json; give a workdir imported with `python "
                       "-m train.convert --from=hf` or trained by `python -m train`.")
    with open(path) as f:
      theirs = json.load(f)
    if theirs.get("task") != "lm":
      raise ValueError(f"from={source} holds a {theirs.get('task')!r} model, not a language "
                       "model (task 'lm').")
    c.model = ml_collections.ConfigDict(theirs["model"])
    kept = tokenizer.workdir_file(source)
    c.data.tokenizer = os.path.abspath(kept) if kept else "byte"
    c.init.from_ = source
  c.data.update(name="sft", path="", val_fraction=0.05, packing="none")
  c.train.update(steps=300, batch_size=16, seq_len=min(512, c.model.max_len))
  # A fine-tune's usual AdamW: a small rate, no weight decay pulling towards zero.
  c.opt.update(lr=2e-5, warmup_steps=20, weight_decay=0.0)
  c.ckpt.update(every=100, keep=2)
  c.eval.update(every=100, steps=4, batch_size=16)
  c.sample.update(max_new_tokens=64)
  return c
