"""train/sft_data.py (data.name="sft"): the learned targets are exactly the completion (+EOS) or
the assistant tokens, the LM task's loss on an SFT batch is the completion tokens' mean, packed
rows carry segment ids and positions (and lose nothing against one example per row), the
iterator resumes, and every fault is one sentence naming the file and line.

Tokenizers are made here: the byte tokenizer, and a byte-level BPE trained with the tokenizers
package whose tokenizer_config.json holds bos/eos/pad and a chat template (``chat_tokenizer``,
also used by tests/user/test_sft.py)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import restore_data_position
from train import data, sft_data, tokenizer

# A tiny chat template in the style of the Hub's: BOS, a line per turn, EOS after each answer.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
            "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
ROWS = [{"prompt": "2+2=", "completion": "4"},
        {"prompt": "Name a colour: ", "completion": "blue, or green"},
        {"prompt": "", "completion": "no prompt at all"},
        {"prompt": "Say nothing.", "completion": ""},
        {"prompt": "Déjà vu? ", "completion": "Oui ✓"},
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."}]


def chat_tokenizer(folder, texts, vocab_size=320, template=TEMPLATE, bos=True):
  """A Llama-like byte-level BPE (the tokenizers package: <pad>=0, <s>=1, </s>=2, and a
  post-processor that puts <s> before a prompt when ``bos``) written as folder/tokenizer.json
  with a tokenizer_config.json naming bos/eos/pad and holding ``template``; returns its path."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  folder.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if bos:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(folder / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "clean_up_tokenization_spaces": False,
            "model_max_length": 1024}
  if template is not None:
    config["chat_template"] = template
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  return str(folder / "tokenizer.json")


def texts():
  return [json.dumps(r) for r in ROWS] * 3 + [json.dumps(CHAT)] * 3 + [TEMPLATE]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return chat_tokenizer(tmp_path_factory.mktemp("tok"), texts())


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def sft_cfg(path, tok="byte", packing="none", val_fraction=0.3):
  return ml_collections.ConfigDict(dict(name="sft", path=str(path), val_fraction=val_fraction,
                                        tokenizer=tok, packing=packing, num_threads=0,
                                        prefetch=1))


def folder(tmp_path, train_rows, val_rows=ROWS[:2]):
  """data.path as a folder of train.jsonl and val.jsonl."""
  root = tmp_path / "sft"
  root.mkdir()
  write_jsonl(root / "train.jsonl", train_rows)
  write_jsonl(root / "val.jsonl", val_rows)
  return root


def all_rows(cfg, split, seq_len, batch):
  """Every row of ``split`` once, in file order, through the grain pipeline."""
  ds = data.make_dataset(cfg, split=split, seq_len=seq_len, global_batch_size=batch, seed=0,
                         shuffle=False, num_epochs=1)
  batches = list(ds)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_targets_are_exactly_the_completion_and_its_eos(tmp_path, bpe, kind):
  spec = "byte" if kind == "byte" else bpe
  tok = tokenizer.load(spec)
  cfg = sft_cfg(folder(tmp_path, ROWS), spec)
  S = 40
  batch = all_rows(cfg, "train", S, len(ROWS))
  assert set(batch) == {"inputs", "targets"} and batch["inputs"].shape == (len(ROWS), S)
  for r, row in enumerate(ROWS):
    # Independently of sft_data: the prompt framed as train.generate frames it (bytes: as they
    # are; this BPE's post-processor puts <s> first), the completion's ids, EOS.
    prompt, completion = tok.encode_prompt(row["prompt"]), tok.encode(row["completion"]).tolist()
    assert (prompt[:1] == [tok.bos_id]) == (kind == "bpe")
    ids = prompt + completion + [tok.eos_id]
    n = len(ids) - 1
    np.testing.assert_array_equal(batch["inputs"][r, :n], ids[:-1])
    np.testing.assert_array_equal(batch["inputs"][r, n:], tok.pad_id)
    learned = batch["targets"][r] != tok.pad_id
    # The learned targets are the completion and EOS, at the positions that predict them.
    # (An empty prompt leaves nothing before the completion's first token, which is then not
    # predicted: without a BOS there is no position to predict it from.)
    assert list(np.flatnonzero(learned)) == list(range(max(len(prompt) - 1, 0), n))
    assert batch["targets"][r][learned].tolist() == (completion + [tok.eos_id])[-len(
        np.flatnonzero(learned)):]
  # A tokenizer without PAD: the skipped targets are -1 (the loss skips them too), inputs pad 0.
  example = sft_data.prompt_completion_example(tok, "ab", "c")
  row = sft_data.Source([example], 6, "none", None)[0]
  p, c = tok.encode_prompt("ab"), tok.encode("c").tolist()
  n = len(p) + len(c)  # positions: every id but the last
  assert row["targets"].tolist() == [-1] * (len(p) - 1) + c + [tok.eos_id] + [-1] * (6 - n)
  assert row["inputs"][n:].tolist() == [0] * (6 - n)


def test_chat_spans_are_the_assistant_turns_as_transformers_marks_them(tmp_path, bpe):
  tok = tokenizer.load(bpe)
  assert tok.chat_template == TEMPLATE
  e = sft_data.chat_example(tok, CHAT, "chat")
  assert e.ids[0] == tok.bos_id
  # Each run of learned tokens is one answer with what closes it: content, EOS, newline.
  runs = np.split(np.flatnonzero(e.learn), np.flatnonzero(np.diff(np.flatnonzero(e.learn)) > 1) + 1)
  import tokenizers
  raw = tokenizers.Tokenizer.from_file(bpe)
  assert [raw.decode(e.ids[r].tolist(), skip_special_tokens=False) for r in runs] == [
      " 4</s>\n", " It is 6.</s>\n"]
  # transformers renders the same text and ids, and its assistant mask, from the same template
  # with {% generation %} around each answer, is ours.
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.dirname(bpe))
  assert hf.apply_chat_template(CHAT, tokenize=False) == sft_data.render_chat(tok, CHAT, False)
  tagged = TEMPLATE.replace("Assistant: {{ m['content'] }}{{ eos_token }}\n",
                            "Assistant:{% generation %} {{ m['content'] }}{{ eos_token }}\n"
                            "{% endgeneration %}")
  out = hf.apply_chat_template(CHAT, chat_template=tagged, return_dict=True,
                               return_assistant_tokens_mask=True)
  assert out["input_ids"] == e.ids.tolist()
  assert out["assistant_masks"] == e.learn.astype(int).tolist()
  # transformers 5 keeps the template in chat_template.jinja beside tokenizer_config.json.
  moved = tmp_path / "jinja"
  path = chat_tokenizer(moved, texts(), template=None)
  (moved / tokenizer.CHAT_TEMPLATE_FILE).write_text(TEMPLATE)
  assert tokenizer.load(path).chat_template == TEMPLATE
  # Older configs list named templates; the one named "default" is the chat template.
  listed = tmp_path / "listed"
  path = chat_tokenizer(listed, texts(), template=[{"name": "tool_use", "template": "x"},
                                                   {"name": "default", "template": TEMPLATE}])
  assert tokenizer.load(path).chat_template == TEMPLATE


# ----------------------------------------------------------------------------- the loss


@functools.cache
def tiny_llama():
  from nets import llama
  from nets.decoder import Config
  model = llama.Model(Config(vocab_size=384, num_layers=1, d_model=32, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=64))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def lm_loss(batch, packing):
  """The LM task's training loss (``LMTask.loss_fn``) on ``batch``, and its token count."""
  from configs import lm
  from train.tasks.lm import LMTask
  config = lm.get_config("size=test")
  config.data.update(name="sft", packing=packing)
  model, params = tiny_llama()
  loss, metrics = jax.jit(LMTask(config).loss_fn(model))(params, batch, jax.random.key(1))
  return float(loss), float(metrics["tokens"])


def test_lm_loss_on_an_sft_batch_is_the_mean_over_completion_tokens(tmp_path):
  cfg = sft_cfg(folder(tmp_path, ROWS))
  S = 40
  batch = all_rows(cfg, "train", S, len(ROWS))
  loss, count = lm_loss(batch, "none")
  # Naive numpy: the model's log-probabilities of each completion token and of EOS, at the
  # position before it, averaged; every other position is ignored.
  model, params = tiny_llama()
  logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  terms = []
  for r, row in enumerate(ROWS):
    p, c = data.encode(row["prompt"]), data.encode(row["completion"])
    ids = np.concatenate([p, c, [data.EOS_ID]])  # bytes: no BOS, as train.generate frames it
    for j in range(max(len(p), 1), len(ids)):  # token j is predicted at position j - 1
      terms.append(-logp[r, j - 1, ids[j]])
  assert count == len(terms) == sum(len(data.encode(r["completion"])) + (r["prompt"] != "")
                                    for r in ROWS)
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  # Packed: several examples per row, each attending to itself only, give the same loss.
  packed = all_rows(sft_cfg(cfg.path, packing="documents"), "train", S, 4)
  assert len(packed["inputs"]) == 4 < len(ROWS)
  packed_loss, packed_count = lm_loss(packed, "documents")
  assert packed_count == count
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
  # Without the segment ids the packed examples would see each other: another loss.
  merged = {**packed, "segment_ids": np.ones_like(packed["segment_ids"]),
            "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (4, S)).copy()}
  assert abs(lm_loss(merged, "documents")[0] - loss) > 10 * 1e-5 * loss  # 10x the tolerance


# ----------------------------------------------------------------------------- packing


def test_packed_rows_carry_segment_ids_and_positions_and_resume(tmp_path, capsys):
  # Positions per example: bytes + EOS, less one (the last id is only a target).
  lengths = [len(data.encode(r["prompt"] + r["completion"])) for r in ROWS]
  assert lengths == [5, 29, 16, 12, 18, 32]
  cfg = sft_cfg(folder(tmp_path, ROWS), packing="documents")
  S = 31
  src = sft_data.Source(sft_data.examples(cfg, "train"), S, "documents", data.PAD_ID)
  # Greedy in file order: 5 + 29 > 31 | 29 | 16 + 12 | 18 | 32 cut to 31.
  assert src.rows == [(0,), (1,), (2, 3), (4,), (5,)] and src.num_cut == 1
  row = src[2]
  np.testing.assert_array_equal(row["segment_ids"], [1] * 16 + [2] * 12 + [0] * 3)
  np.testing.assert_array_equal(row["positions"], [*range(16), *range(12), *range(3)])
  np.testing.assert_array_equal(row["inputs"][28:], data.PAD_ID)
  assert np.all(row["targets"][28:] == data.PAD_ID)
  assert row["inputs"][16] == ord(ROWS[3]["prompt"][0]) and row["targets"][15] == data.EOS_ID
  cut = src[4]  # the long example's first S positions
  assert cut["inputs"].tolist() == data.encode(
      ROWS[5]["prompt"] + ROWS[5]["completion"]).tolist()[:S]

  make = lambda: data.make_dataset(cfg, split="train", seq_len=S, global_batch_size=2, seed=0,
                                   shuffle=True, num_epochs=None)
  it = iter(make())
  assert "odyssey: 1 of 6 'train' SFT examples are longer than train.seq_len=31 and are cut." in (
      capsys.readouterr().out)
  batches = [next(it) for _ in range(4)]
  it = iter(make())
  next(it)
  fresh = restore_data_position(tmp_path, it, iter(make()))
  for want in batches[1:]:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


# ----------------------------------------------------------------------------- faults


def check(cfg, seq_len=32, train_batch=1, val_batch=1):
  data.check_splits(cfg, seq_len=seq_len, batch_sizes={"train": (train_batch, "train.batch_size"),
                                                       "val": (val_batch, "eval.batch_size")})


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "completion": "b"', ], r"train.jsonl line 2 is not valid JSON"),
    (['{"prompt": "a"}'], r"train.jsonl line 2 has no 'completion' field \(it has 'prompt'\)"),
    (['{"text": "a"}'], r"line 2 has no 'prompt' and no 'completion' field \(it has 'text'\); "
                        r"SFT rows are"),
    (['{"prompt": 3, "completion": "b"}'], r"line 2: field 'prompt' holds int, not text"),
    (['["a", "b"]'], r"line 2 is a JSON list, not an object"),
    (['{"messages": "hi"}'], r"line 2: \"messages\" holds str"),
    (['{"messages": [{"role": "user"}]}'], r"line 2: message 0 of \"messages\" is not an object "
                                           r"with a string \"role\" and a string \"content\""),
    (['{"messages": [{"role": "user", "content": "hi"}]}'],
     r"line 2: \"messages\" has no \"assistant\" message"),
    (['{"messages": [], "prompt": "a", "completion": "b"}'], r"line 2 has both"),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'],
     r"line 2 has \"messages\", but the tokenizer byte has no chat template"),
    (['{"prompt": "' + "x" * 40 + '", "completion": "b"}'],
     r"line 2: its prompt alone fills train.seq_len=32 \(the first token to learn is token 40 "
     r"of 42\), so nothing of it would be trained on"),
])
def test_a_bad_row_is_one_sentence_naming_file_and_line(tmp_path, lines, match):
  root = folder(tmp_path, ROWS[:1])
  with open(root / "train.jsonl", "a") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=match) as e:
    check(sft_cfg(root))
  assert str(root / "train.jsonl") in str(e.value) and "\n" not in str(e.value)


def test_bad_paths_splits_and_templates_are_one_sentence(tmp_path, bpe):
  with pytest.raises(ValueError, match=r"data.name='sft' needs data.path set to a .jsonl file"):
    check(sft_cfg(""))
  with pytest.raises(ValueError, match=r"data.path='.*nope.jsonl' does not exist"):
    check(sft_cfg(tmp_path / "nope.jsonl"))
  (tmp_path / "half").mkdir()
  write_jsonl(tmp_path / "half" / "train.jsonl", ROWS)
  with pytest.raises(ValueError, match=r"is a folder without val.jsonl"):
    check(sft_cfg(tmp_path / "half"))
  # One file: its rows split by a CRC32 of "NAME:ROW"; a fraction that leaves val empty says so.
  one = write_jsonl(tmp_path / "one.jsonl", ROWS)
  with pytest.raises(ValueError, match=r"the 'val' split of data.path='.*one.jsonl' is empty "
                                       r"\(data.val_fraction=0.001 .*raise data.val_fraction"):
    check(sft_cfg(one, val_fraction=0.001))
  cfg = sft_cfg(one, val_fraction=0.5)
  val = [w for w, _ in sft_data.split_rows(str(one), "val", 0.5)]
  want = [f"{one} line {i + 1}" for i in range(len(ROWS))
          if data.split_of(f"one.jsonl:{i}", 0.5) == "val"]
  assert val == want and 0 < len(val) < len(ROWS)
  with pytest.raises(ValueError, match=rf"the 'val' split of .* has {len(val)} SFT examples in "
                                       rf"{len(val)} rows of train.seq_len=32, fewer than one "
                                       r"batch of eval.batch_size=9; add rows, or lower"):
    check(cfg, val_batch=9)
  # A template whose rendering of a conversation's start is not the start of the whole one.
  path = chat_tokenizer(tmp_path / "odd", texts(), template=TEMPLATE + "{% if not "
                        "add_generation_prompt %}END{% endif %}")
  root = folder(tmp_path, [{"messages": CHAT}])
  with pytest.raises(ValueError, match=r"train.jsonl line 1: the chat template of .* does not "
                                       r"render the conversation up to message 2 as the start"):
    check(sft_cfg(root, path))
  bad_role = [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
  write_jsonl(root / "train.jsonl", [{"messages": bad_role}])
  with pytest.raises(ValueError, match=r"line 1: the chat template of .* failed "
                                       r"\(TemplateError: unknown role tool\)"):
    check(sft_cfg(root, bpe))


def test_sft_sources_mix_and_their_faults_name_the_source(tmp_path):
  """data.sources may name "sft" datasets: rows of each, by weight; a fault names the source."""
  one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "A"}] * 40)
  root = folder(tmp_path, [{"prompt": "b", "completion": "B"}] * 20)
  cfg = sft_cfg("", val_fraction=0.5)
  cfg.sources = dict(ones=dict(name="sft", path=str(one), weight=0.5),
                     twos=dict(name="sft", path=str(root), weight=0.5))
  check(cfg, train_batch=8, val_batch=2)
  batch = next(iter(data.make_dataset(cfg, split="train", seq_len=8, global_batch_size=8, seed=0,
                                      shuffle=True, num_epochs=None)))
  letters = sorted(chr(t) for t in batch["inputs"][:, 0])  # the prompt's byte (no BOS)
  assert letters == ["a"] * 4 + ["b"] * 4, letters
  cfg.sources.twos.path = str(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match=r"data.sources.twos.path='.*nope.jsonl' does not exist"):
    check(cfg)
  cfg.sources.twos.path = str(one)
  cfg.sources.twos.val_fraction = 0.001
  with pytest.raises(ValueError, match=r"the 'val' split of data.sources.twos \('.*one.jsonl'\) "
                                       r"is empty \(data.sources.twos.val_fraction=0.001"):
    check(cfg)
