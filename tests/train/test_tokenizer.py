"""train/tokenizer.py: the byte, Hugging Face and SentencePiece tokenizers behind one interface,
the BPE training command, the model.vocab_size check and the workdir's record of the tokenizer.
Every tokenizer is made here from a few kilobytes of text (nothing is downloaded)."""

import os

import numpy as np
import pytest

from configs import lm
from tests import run_module
from train import tokenizer, validate
from train import workdir as workdir_lib

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
        "# héllo wörld ✓ — unicode survives\n")
ROUND_TRIP = "def mul(x, y):\n    return x * y  # héllo ✓\n"


def corpus_folder(root):
  """A folder of a few text files (the train command's default --glob takes .txt)."""
  root.mkdir(parents=True, exist_ok=True)
  for i in range(6):
    (root / f"doc{i}.txt").write_text(TEXT.replace("add", f"add{i}") * (i + 1))
  return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE of 300 ids trained by train_bpe, in a folder of its own."""
  out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  return tokenizer.train_bpe([TEXT * 3, ROUND_TRIP], 300, str(out))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A SentencePiece BPE .model with a tiny vocabulary, trained on the same text."""
  import sentencepiece
  prefix = tmp_path_factory.mktemp("spm") / "sp"
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter((TEXT * 4 + ROUND_TRIP).splitlines()), model_prefix=str(prefix),
      vocab_size=80, model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2)
  return str(prefix) + ".model"


# Code, accented and CJK text, emoji (a ZWJ sequence), runs of spaces and tabs, control bytes.
VARIED = ("def f(x):\n\treturn  x ** 2  # two  spaces\n", "Ça déjà vu, naïve façade — Ærøskøbing",
          "日本語のテキスト、中文文本", "emoji 🙂🚀 and 👩\u200d💻!", "  leading and trailing  ",
          "\n\n\x00\x7f")


def exact_spm(folder, **options):
  """A SentencePiece BPE that spells text exactly: byte fallback, no normalisation, whitespace
  kept; ``options`` override (e.g. SentencePiece's default dummy prefix)."""
  import sentencepiece
  folder.mkdir(parents=True, exist_ok=True)
  prefix = folder / "exact"
  sentencepiece.SentencePieceTrainer.train(**{
      "sentence_iterator": iter((TEXT * 4).splitlines()), "model_prefix": str(prefix),
      "vocab_size": 300, "model_type": "bpe", "character_coverage": 1.0, "byte_fallback": True,
      "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
      "add_dummy_prefix": False, "hard_vocab_limit": False, "minloglevel": 2, **options})
  return tokenizer.load(str(prefix) + ".model")


def metaspace_json(folder, prepend_scheme):
  """A Hugging Face BPE over Metaspace (▁) words with <0xNN> byte-fallback pieces, the layout
  of tokenizer.json files converted from SentencePiece."""
  import json

  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
  tok.train_from_iterator([TEXT * 3], trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  spec = json.loads(tok.to_str())
  for b in range(256):
    spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
  spec["model"]["byte_fallback"] = True
  path = folder / f"metaspace_{prepend_scheme}.json"
  path.write_text(json.dumps(spec))
  return tokenizer.load(str(path))


def test_token_bytes_sum_to_the_utf8_bytes_of_the_text(bpe, tmp_path):
  """sum(token_bytes[encode(text)]) == len(text.encode()) for the byte tokenizer, a byte-level
  BPE (train_bpe), a SentencePiece .model and a Metaspace tokenizer.json with byte fallback;
  specials count 0. The documented exception: a dummy prefix (SentencePiece's default, Metaspace
  prepend_scheme "first") adds one space that is not in the text."""
  exact = [tokenizer.load("byte"), bpe, exact_spm(tmp_path), metaspace_json(tmp_path, "never")]
  for tok in exact:
    table = tok.token_bytes()
    assert table.dtype == np.int32 and table.shape == (tok.vocab_size,)
    assert table is tok.token_bytes()  # computed once
    assert all(table[i] == 0 for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None)
    for text in VARIED:
      assert table[tok.encode(text)].sum() == len(text.encode("utf-8")), (tok.name, text)
  assert tokenizer.load("byte").token_bytes().tolist() == [1] * 256 + [0, 0, 0]
  for tok in (exact_spm(tmp_path / "dummy", add_dummy_prefix=True),
              metaspace_json(tmp_path, "first")):
    for text in VARIED[:4]:  # none starts with a space
      assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode("utf-8")) + 1


def test_byte_tokenizer_keeps_the_byte_ids():
  tok = tokenizer.load("byte")
  assert (tok.name, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (
      "byte259", 259, 256, 257, 258)
  ids = tok.encode("aé")
  assert ids.dtype == np.int32 and ids.tolist() == [97, 195, 169]
  assert tok.decode([257, 97, 258, 256, 300, 98]) == "a\nb"
  assert tok.encode_doc(b"\xff").tolist() == [255]  # raw bytes stay raw


def test_hf_tokenizer_json_round_trips_and_names_its_specials(bpe):
  assert bpe.name.startswith("hf:") and len(bpe.name) == 15
  assert (bpe.vocab_size, bpe.pad_id, bpe.bos_id, bpe.eos_id) == (300, 0, 1, 2)
  ids = bpe.encode(ROUND_TRIP)
  assert ids.dtype == np.int32 and len(ids) < len(ROUND_TRIP.encode())  # merges happened
  assert bpe.decode(ids) == ROUND_TRIP
  assert bpe.decode([1, *ids.tolist(), 2, 0, 999]) == ROUND_TRIP  # specials and padding dropped
  assert tokenizer.load(bpe.path).name == bpe.name


def test_sentencepiece_model_round_trips(spm_model):
  tok = tokenizer.load(spm_model)
  assert tok.name.startswith("spm:")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
  text = "def add(a, b):"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and 0 < len(ids) < len(text)
  assert tok.decode(ids) == text
  assert tok.decode([1, *ids.tolist(), 2]) == text


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.json"), "tokenizer file {p} does not exist"),
    (lambda d: d / "bad.json", "{p} is not a tokenizer.json the tokenizers package can read"),
    (lambda d: d / "bad.model", "{p} is not a SentencePiece model"),
    (lambda d: str(d / "vocab.txt"), "tokenizer '{p}' is neither 'byte'"),
])
def test_a_missing_or_malformed_file_is_one_sentence_naming_it(tmp_path, make, message):
  path = make(tmp_path)
  if not isinstance(path, str):
    path.write_text("{not a tokenizer")
  with pytest.raises(ValueError, match=message.format(p=str(path))):
    tokenizer.load(str(path))


def test_train_command_writes_the_requested_size_deterministically_and_never_overwrites(tmp_path):
  src = corpus_folder(tmp_path / "texts")
  out = tmp_path / "tok" / "tokenizer.json"
  proc = run_module("train.tokenizer", f"--src={src}", "--vocab_size=320", f"--out={out}",
                    timeout=120)
  tok = tokenizer.load(str(out))
  assert tok.vocab_size == 320 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert f"wrote {out}: 320 ids" in proc.stdout
  again = tokenizer.train_bpe((p.read_text() for p in sorted(src.glob("*.txt"))), 320,
                              str(tmp_path / "again.json"))
  assert again.name == tok.name  # same source, same bytes
  before = out.read_bytes()
  proc = run_module("train.tokenizer", f"--src={src}", "--vocab_size=400", f"--out={out}",
                    timeout=120, ok=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"odyssey: --out={out} already exists; tokenizer training never overwrites, so give a new "
      "path.")
  assert out.read_bytes() == before


def lm_config(spec, vocab_size):
  config = lm.get_config("size=test")
  config.data.tokenizer = str(spec)
  config.model.vocab_size = vocab_size
  config.train.update(batch_size=8, seq_len=32)
  config.eval.batch_size = 8
  return config


def test_model_vocab_size_is_checked_against_the_tokenizer_in_one_sentence(bpe):
  with pytest.raises(ValueError) as e:
    validate.validate(lm_config(bpe.path, 259), num_devices=8, process_count=1)
  assert str(e.value) == (
      f"model.vocab_size=259 is smaller than the tokenizer's vocabulary (300 ids in {bpe.path}); "
      "set --config.model.vocab_size=300 or larger.")
  with pytest.raises(ValueError, match="has no end-of-sequence token"):
    # the SentencePiece model of another test has an EOS; a WordLevel file without one has not
    import tokenizers
    path = os.path.join(os.path.dirname(bpe.path), "noeos.json")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, "[UNK]")).save(path)
    validate.validate(lm_config(path, 384), num_devices=8, process_count=1)


def test_the_workdir_keeps_the_tokenizer_and_refuses_another_on_resume(bpe, spm_model, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5").mkdir(parents=True)  # a run with a checkpoint (of bytes)
  hf = lm_config(bpe.path, 384)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check_resumable(hf, str(workdir))
  assert e.value.sentence == (
      f"{workdir} holds checkpoints (newest step 5) of a run tokenized with the byte tokenizer "
      f"(byte259), but data.tokenizer='{bpe.path}' is {bpe.name}; nothing in it was touched; "
      "rerun with that tokenizer, or use a new --workdir.")
  assert sorted(os.listdir(workdir)) == ["checkpoints"]
  workdir_lib.record_tokenizer(str(workdir), hf)  # what a run of hf does first
  assert (workdir / "tokenizer.json").read_bytes() == open(bpe.path, "rb").read()
  assert tokenizer.from_workdir(str(workdir)).name == bpe.name
  workdir_lib.check_resumable(hf, str(workdir))  # the same tokenizer resumes
  for other in (lm_config("byte", 384), lm_config(spm_model, 384)):
    with pytest.raises(workdir_lib.WorkdirError, match="tokenized with .*tokenizer.json"):
      workdir_lib.check_resumable(other, str(workdir))
  assert (workdir / "tokenizer.json").read_bytes() == open(bpe.path, "rb").read()
  (tmp_path / "sp").mkdir()
  workdir_lib.record_tokenizer(str(tmp_path / "sp"), lm_config(spm_model, 384))
  assert (tmp_path / "sp" / "tokenizer.model").exists()
  assert tokenizer.from_workdir(str(tmp_path / "sp")).name == tokenizer.load(spm_model).name


def test_the_stdlib_backend_tokenizes_a_folder_with_the_configured_tokenizer(bpe, tmp_path):
  import ml_collections

  from train import data
  root = corpus_folder(tmp_path / "py")
  for p in root.glob("*.txt"):
    p.rename(p.with_suffix(".py"))
  cfg = ml_collections.ConfigDict(dict(name="stdlib", path=str(root), val_fraction=0.3,
                                       tokenizer=bpe.path, num_threads=0, prefetch=1))
  data.check_data_config(cfg)
  for split in data.SPLITS:
    stream = data.token_stream(cfg, split)
    tokens = stream.read(0, len(stream))
    assert len(stream) == data.split_tokens(cfg, split) and tokens.max() < bpe.vocab_size
    texts = [(root / rel).read_text() for rel in data.split_files(str(root), split, 0.3)]
    assert bpe.decode(tokens) == "".join(texts)  # EOS separators are special: dropped
    assert (tokens == bpe.eos_id).sum() == len(texts)


def test_bpe_spec_is_built_on_first_use_cached_and_keyed_by_the_files(tmp_path, monkeypatch,
                                                                       capsys):
  """data.tokenizer="bpe:N" trains the BPE on the training split once; a second call, and the same
  files in another folder, find the cached file (the key does not name the folder)."""
  import ml_collections

  from train import data
  monkeypatch.setenv("ODYSSEY_CACHE", str(tmp_path / "cache"))
  roots = []
  for name in ("a", "b"):
    root = corpus_folder(tmp_path / name)
    for p in root.glob("*.txt"):
      p.rename(p.with_suffix(".py"))
    roots.append(root)
  cfg = lambda root: ml_collections.ConfigDict(dict(
      name="stdlib", path=str(root), val_fraction=0.3, tokenizer="bpe:300", num_threads=0,
      prefetch=1))
  path = tokenizer.spec_of(cfg(roots[0]))
  assert "training a byte-level BPE tokenizer of 300 ids" in capsys.readouterr().out
  tok = tokenizer.load(path)
  assert tok.vocab_size == 300 and path.startswith(str(tmp_path / "cache"))
  train_text = "".join((roots[0] / rel).read_text()
                       for rel in data.split_files(str(roots[0]), "train", 0.3))
  assert tok.decode(tok.encode(train_text)) == train_text
  stamp = os.stat(path).st_mtime_ns
  data._built_bpe.cache_clear()
  assert tokenizer.spec_of(cfg(roots[1])) == path and os.stat(path).st_mtime_ns == stamp
  assert capsys.readouterr().out == ""  # reused: nothing trained, nothing printed
  stream = data.token_stream(cfg(roots[1]), "val")  # tokenized once, then memory-mapped
  assert list((tmp_path / "cache" / "tokens").glob("*-val.npy"))
  assert tok.decode(stream.read(0, len(stream))) == "".join(
      (roots[1] / rel).read_text() for rel in data.split_files(str(roots[1]), "val", 0.3))


@pytest.mark.parametrize("spec,name,message", [
    ("bpe:lots", "stdlib", "must be 'bpe:N' with N an integer of at least 259"),
    ("bpe:100", "stdlib", "must be 'bpe:N' with N an integer of at least 259"),
    ("bpe:8192", "arrayrecord", "but data.name='arrayrecord'; its shards are already tokenized"),
    ("bpe:8192", "sft", "but data.name='sft'; an SFT run uses the tokenizer of the model it "
     "fine-tunes"),
])
def test_a_bad_bpe_spec_is_one_sentence(spec, name, message):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(name=name, path="", val_fraction=0.05, tokenizer=spec))
  with pytest.raises(ValueError, match=message):
    tokenizer.spec_of(cfg)


def test_a_bpe_spec_with_a_mixture_is_one_sentence():
  """One run, one tokenizer: "bpe:N" would train one per stdlib source of a mixture."""
  from experiments import lm_mixture
  c = lm_mixture.get_config()
  c.data.tokenizer = "bpe:8192"
  with pytest.raises(ValueError, match="data.sources mixes several"):
    validate.validate(c)


BYT5_TEXTS = ["héllo", "a", "", "✓ four", b"raw\xff"]


def test_byt5_ids_pad_end_in_eos_and_truncate_keeping_eos():
  ids, mask = tokenizer.byt5_ids(BYT5_TEXTS, 5)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (5, 5)
  assert ids.tolist() == [
      [ord("h") + 3, 0xC3 + 3, 0xA9 + 3, ord("l") + 3, 1],  # 6 bytes: the first 4, then EOS
      [ord("a") + 3, 1, 0, 0, 0],
      [1, 0, 0, 0, 0],  # an empty caption is EOS alone
      [0xE2 + 3, 0x9C + 3, 0x93 + 3, ord(" ") + 3, 1],  # the check mark, cut after 1 byte more
      [ord("r") + 3, ord("a") + 3, ord("w") + 3, 0xFF + 3, 1]]
  assert mask.sum(1).tolist() == [5, 2, 1, 5, 5] and (ids[mask] > 0).all()
  assert ids.max() < tokenizer.BYT5_VOCAB


def test_byt5_ids_match_transformers_byt5_tokenizer():
  transformers = pytest.importorskip("transformers")
  texts = [t if isinstance(t, str) else t.decode("latin-1") for t in BYT5_TEXTS[:4]]
  for length in (1, 3, 12):
    want = transformers.ByT5Tokenizer()(texts, max_length=length, truncation=True,
                                         padding="max_length")
    ids, mask = tokenizer.byt5_ids(texts, length)
    assert ids.tolist() == want["input_ids"] and mask.astype(int).tolist() == \
        want["attention_mask"], length


@pytest.mark.parametrize("texts, length, message", [
    (["a"], 0, "byt5_ids length=0 must be an integer >= 1"),
    (["a"], 2.0, "byt5_ids length=2.0 must be an integer >= 1"),
    ("a caption", 4, "takes a list of texts, not one string"),
])
def test_byt5_ids_refuses_bad_arguments(texts, length, message):
  with pytest.raises(ValueError, match=message):
    tokenizer.byt5_ids(texts, length)
