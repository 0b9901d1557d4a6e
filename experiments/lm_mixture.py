"""A data mixture: the byte-level Llama of lm_stdlib on 70% Python code (the standard library's
source) and 30% text of your own, converted once to ArrayRecord (docs/data.md, Mixtures).

Launch (convert the text first, byte-tokenized; a folder of .txt files, a jsonl, parquet or
Arrow source all work, see docs/data.md):
  python -m train.make_arrayrecord --src=my_texts/ --dst=/data/my_corpus --glob='**/*.txt'
  python -m train --config=experiments/lm_mixture.py --workdir=DIR --cpu_devices=8 \
      --config.data.sources.prose.path=/data/my_corpus
Rerun the same command to resume: the mixture continues exactly where its checkpoint left it.
Change the weights with --config.data.sources.code.weight=... (they are normalised).

Expect: lm_stdlib's budget, mesh and model, with document packing (no token attends across a
document boundary, the two sources' documents included); every evaluation writes "val/code" and "val/prose"
lines to metrics.jsonl (each source's own val split) and a "val" line for the two pooled, and
prints each source's bits/byte after the pooled figures.
"""

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  c = lm_stdlib.get_config(arg)
  # Each source: a backend and its path, a weight, and (stdlib) the fraction of files held out.
  c.data.sources.code = dict(name="stdlib", path="", weight=0.7, val_fraction=0.05)
  c.data.sources.prose = dict(name="arrayrecord", path="", weight=0.3)
  # Windows of a mixture hold documents of both sources side by side: each attends to itself only,
  # with positions from its own start (docs/data.md, Document packing).
  c.data.packing = "documents"
  return c
