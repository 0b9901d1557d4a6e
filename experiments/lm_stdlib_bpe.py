"""The tiny Llama of lm_stdlib.py on the same corpus, read through a byte-level BPE of 8192 ids,
at the same training compute as lm_stdlib.

Launch (8 simulated CPU devices, data=2 x fsdp=2 x tensor=2, as lm_stdlib):
  python -m train --config=experiments/lm_stdlib_bpe.py --workdir=/tmp/odyssey/lm_stdlib_bpe \
      --cpu_devices=8
On first use the BPE is trained on the corpus's training split (about 5 s on 2 cores) and both
splits are tokenized (about 15 s), with a progress bar; both are cached in $ODYSSEY_CACHE (default
~/.cache/odyssey) and reused by later runs (train/data.py built_tokenizer).

Same batch (16 x 128 tokens), model body and schedule shape as lm_stdlib; a BPE token holds about
3.6 bytes of the corpus, so each step reads about 3.6x the text. The 8192-row embedding and output
layer make a step cost 2.11x the byte model's FLOPs (2.335e10 against 1.107e10, as the runs print),
so 240 steps here match lm_stdlib's 500 (5.60e12 against 5.54e12 FLOPs); warmup, evaluation and
checkpoints keep lm_stdlib's proportions. Compared on validation bits per UTF-8 byte, which does
not depend on the tokenizer: bench/results/runs.md (docs/data.md, Comparing tokenizers).
"""

from experiments import lm_stdlib


def get_config(arg: str | None = None):
  c = lm_stdlib.get_config(arg)
  c.data.tokenizer = "bpe:8192"
  c.model.vocab_size = 8192
  c.train.steps = 240
  c.opt.warmup_steps = 24
  c.ckpt.every = c.eval.every = 60
  return c
