"""docs/convert.md's fine-tuning path, as written: a Hugging Face Llama with its own tokenizer ->
`python -m train.convert` -> SFT on a jsonl with `experiments/sft.py:from=IMPORTED` ->
`python -m train.generate` prints decoded text -> `python -m train.convert` export ->
transformers loads the export with its tokenizer, and its greedy tokens are odyssey's.

HF_DIR is made here: a tiny random LlamaForCausalLM (transformers, CPU torch) and a byte-level
BPE of 320 ids trained with the tokenizers package, with a tokenizer_config.json that names
bos/eos/pad and holds a chat template (tests/train/test_sft_data.py ``chat_tokenizer``).
chat.jsonl holds prompt/completion and chat rows, one of them longer than the run's seq_len.

Overrides of the SFT command, sizes and steps only, except the learning rate:
``--config.train.steps=40`` (of 300), ``--config.train.batch_size=4`` and
``--config.eval.batch_size=2`` (of 16; val holds 5% of the rows), ``--config.train.seq_len=64``
(of 128, the tiny model's max_len), ``--config.eval.steps=2``,
``--config.sample.max_new_tokens=8`` (of 64), and ``--config.opt.lr=3e-3
--config.opt.warmup_steps=1``: the experiment's 2e-5 suits a pretrained model, but a random one
of 40k parameters needs this rate and 40 steps (about 3 s of the run's 20) to say more than EOS,
and greedy text of EOS alone would make the comparison with transformers vacuous.
"""

import json

from tests.convert import parity_import
from tests.train.test_sft_data import CHAT, ROWS, chat_tokenizer
from tests.user import check_run, run, substitute
from tests.user.commands import doc

torch = parity_import("torch")
transformers = parity_import("transformers")

IMPORT = doc("python -m train.convert --from=hf --family=llama --src=HF_DIR --dst=IMPORTED")
SFT = doc("python -m train --config=experiments/sft.py:from=IMPORTED --workdir=RUN "
          "--config.data.path=chat.jsonl")
GENERATE = doc("python -m train.generate --workdir=RUN --prompt=\"Q: What is the capital of "
               "France? A:\" --max_new_tokens=16")
EXPORT = doc("python -m train.convert --from=odyssey --family=llama --src=RUN --dst=HF_OUT")
STEPS, SEQ_LEN = 40, 64
OVERRIDES = (f" --config.train.steps={STEPS} --config.train.batch_size=4"
             f" --config.eval.batch_size=2 --config.train.seq_len={SEQ_LEN} --config.eval.steps=2"
             " --config.sample.max_new_tokens=8 --config.opt.lr=3e-3 --config.opt.warmup_steps=1")
PROMPT = "Q: What is the capital of France? A:"


def chat_rows():
  """48 rows of both formats, and one whose completion is longer than SEQ_LEN tokens (cut, not
  refused; the tokenizer never saw its text, so it takes about a token per character)."""
  rows = [{"prompt": f"Q: What is {a} plus {a}? A:", "completion": f" The answer is {2 * a}."}
          for a in range(20)]
  rows += [{"messages": CHAT}, *ROWS] * 2 + [
      {"prompt": PROMPT, "completion": " Paris is the capital of France."}] * 14
  return rows, {"prompt": "Q: Spell it. A:", "completion": " " + "zyxwvutsrq" * 10}


def test_import_sft_generate_export_and_transformers_agree(tmp_path):
  hf_dir, imported, workdir, hf_out = (tmp_path / n for n in ("hf", "imported", "run", "hf_out"))
  rows, long = chat_rows()
  chat_tokenizer(hf_dir, [json.dumps(r) for r in rows] * 4)
  rows.append(long)
  (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)

  out = run(substitute(IMPORT, HF_DIR=hf_dir, IMPORTED=imported), tmp_path / "import.log",
            timeout=120).stdout
  assert "odyssey: imported" in out and (imported / "tokenizer_config.json").exists(), out

  paths = {"IMPORTED": imported, "RUN": workdir, "chat.jsonl": tmp_path / "chat.jsonl"}
  out = run(substitute(SFT, **paths) + OVERRIDES, tmp_path / "sft.log", timeout=300).stdout
  assert f"fresh start with parameters from {imported} step 0" in out, out[-3000:]
  check_run(workdir, out, STEPS, {"data": 1})
  # The long row is cut with a note; which split it is in follows the CRC32 of "chat.jsonl:ROW".
  from train.text_sources import split_of
  split = split_of(f"chat.jsonl:{len(rows) - 1}", 0.05)
  count = sum(split_of(f"chat.jsonl:{i}", 0.05) == split for i in range(len(rows)))
  assert (f"odyssey: 1 of {count} {split!r} SFT examples are longer than train.seq_len={SEQ_LEN} "
          "and are cut.") in out
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["tokenizer"] == str(imported / "tokenizer.json")
  assert json.loads((workdir / "tokenizer_config.json").read_text())["chat_template"]

  out = run(substitute(GENERATE, RUN=workdir), tmp_path / "generate.log", timeout=120).stdout
  ours = out.split("=== prompt 0, sample 0 ===\n", 1)[1].rstrip("\n")
  assert ours.startswith(PROMPT) and len(ours) > len(PROMPT), out[-2000:]

  run(substitute(EXPORT, RUN=workdir, HF_OUT=hf_out), tmp_path / "export.log", timeout=120)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_out).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_out)
  ids = hf_tok(PROMPT, return_tensors="pt").input_ids
  assert ids[0, 0].item() == 1  # the tokenizer's own framing: <s> first, as odyssey's prompt
  model.generation_config.eos_token_id = None  # odyssey generates all 16 tokens, EOS or not
  with torch.no_grad():
    theirs = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0]
  new = theirs[len(ids[0]):].tolist()
  assert len(new) == 16 and sum(t not in (0, 1, 2) for t in new) >= 4, new  # not EOS alone
  assert hf_tok.decode(theirs, skip_special_tokens=True) == ours
