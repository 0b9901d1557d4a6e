"""The tiny Llama of lm_stdlib.py on the same corpus, read through a byte-level BPE of 8192 ids.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2, as lm_stdlib):
  python -m train --config=experiments/lm_stdlib_bpe.py --workdir=/tmp/odyssey/lm_stdlib_bpe \
      --cpu_devices=8
On first use the BPE is trained on the corpus's training split (about 5 s on 2 cores) and both
splits are tokenized (about 15 s), with a progress bar; both are cached in $ODYSSEY_CACHE (default
~/.cache/odyssey) and reused by later runs (train/data.py built_tokenizer).

Same steps, batch and sequence length as lm_stdlib, so the same number of tokens per step; a BPE
token holds about 3.6 bytes, so the model reads about 3.6x the text, and its 8192-row embedding and
output layer cost more FLOPs per token (the run prints both figures). Compared on validation
bits per UTF-8 byte, which does not depend on the tokenizer (docs/data.md#comparing-tokenizers).
"""

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  c = lm_stdlib.get_config(arg)
  c.data.tokenizer = "bpe:8192"
  c.model.vocab_size = 8192
  return c
