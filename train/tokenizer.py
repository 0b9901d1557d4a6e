"""One tokenizer interface for data preparation, training, evaluation and generation.

  python -m train.tokenizer --src=TEXT_SOURCE --vocab_size=8192 --out=DIR/tokenizer.json
      [--glob=...] [--text_field=text]

trains a byte-level BPE (the ``tokenizers`` package) on a text source (the sources of
``train.make_arrayrecord``: a folder of text files, jsonl, parquet, Arrow) with the special tokens
``<pad>`` (0), ``<s>`` (1) and ``</s>`` (2) and writes ``tokenizer.json``; it never overwrites.

``load(spec)`` gives a :class:`Tokenizer` for ``"byte"`` (odyssey's byte vocabulary: bytes 0..255,
PAD 256, BOS 257, EOS 258), a Hugging Face ``tokenizer.json`` or a SentencePiece ``.model``. A
tokenizer's ``name`` ("byte259", "hf:<sha256 prefix>", "spm:<sha256 prefix>") is what dataset
metadata and workdirs record, so a dataset or checkpoint is never read with another vocabulary.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np

BYTE_SPEC = "byte"
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB = 259
VOCAB_NAME = "byte259"
# Special tokens a trained tokenizer gets, in id order (pad 0, bos 1, eos 2).
SPECIALS = ("<pad>", "<s>", "</s>")
# Names a Hugging Face tokenizer.json's special tokens go by when no tokenizer_config.json says.
_KNOWN = {"bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
          "eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "[SEP]"),
          "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")}
# data.tokenizer="bpe:N": a byte-level BPE of N ids trained on the run's own training split, built
# on first use and cached (train/data.py built_tokenizer).
BUILT_PREFIX = "bpe:"
# The file a workdir keeps its tokenizer in, by kind.
WORKDIR_FILES = {"hf": "tokenizer.json", "spm": "tokenizer.model"}
# A byte-fallback piece (SentencePiece, and Hugging Face BPEs converted from it): one raw byte.
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Where transformers 5 saves a tokenizer's chat template (older ones: in tokenizer_config.json).
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def byte_encode(text: str | bytes) -> np.ndarray:
  """Returns the byte ids (0..255) of `text` (utf-8 for str) as int32; no specials added."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, np.uint8).astype(np.int32)


def byte_decode(ids) -> str:
  """Returns the text of `ids`: EOS becomes a newline, PAD/BOS and ids >= BYTE_VOCAB are dropped."""
  # Ids past BYTE_VOCAB can be sampled when the model's vocab is padded; they carry no text.
  ids = np.asarray(ids, np.int64).reshape(-1)
  ids = np.where(ids == EOS_ID, ord("\n"), ids)
  kept = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
  return kept.tobytes().decode("utf-8", errors="replace")


# ByT5's vocabulary (Xue et al. 2022), which a text encoder of captions reads: PAD 0, EOS 1, UNK 2,
# then byte b as b + 3. No files: it is the same for every ByT5 checkpoint.
BYT5_PAD, BYT5_EOS, BYT5_OFFSET = 0, 1, 3
BYT5_VOCAB = 256 + BYT5_OFFSET


def byt5_ids(texts, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, length] int32, mask [N, length] bool) of ``texts`` (str as utf-8, or bytes) in
  ByT5's vocabulary, as transformers' ByT5Tokenizer with truncation and max_length padding: the
  bytes, then EOS, then PAD. A text of ``length`` bytes or more keeps its first ``length - 1``
  bytes (possibly cutting a multi-byte character) and still ends in EOS."""
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f"byt5_ids length={length!r} must be an integer >= 1 (room for EOS).")
  if isinstance(texts, (str, bytes)):
    raise ValueError("byt5_ids takes a list of texts, not one string.")
  ids = np.full((len(texts), length), BYT5_PAD, np.int32)
  for row, text in enumerate(texts):
    kept = byte_encode(text)[:length - 1] + BYT5_OFFSET
    ids[row, :len(kept)] = kept
    ids[row, len(kept)] = BYT5_EOS
  return ids, ids != BYT5_PAD


def byt5_text(ids) -> str:
  """The text of ByT5 ids, up to the first EOS or PAD."""
  out = bytearray()
  for i in np.asarray(ids).tolist():
    if i in (BYT5_PAD, BYT5_EOS):
      break
    out.append(i - BYT5_OFFSET)
  return out.decode("utf-8")


class Tokenizer:
  """Text <-> int32 ids. ``encode`` adds no special tokens; ``decode`` drops them.

  Attributes: ``name`` (stable id), ``vocab_size`` (ids the model must embed), ``bos_id``,
  ``eos_id``, ``pad_id`` (int or None), ``sample_vocab`` (ids below it are text a sampler may
  emit), ``path`` (the file it was read from; None for bytes), ``chat_template`` (the Jinja chat
  template of a Hugging Face tokenizer, or None; train/sft_data.py renders it).
  """
  name: str
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  sample_vocab: int
  path: str | None = None
  chat_template: str | None = None
  _bytes: np.ndarray | None = None  # token_bytes(), once computed

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """int32[vocab_size]: the UTF-8 byte length of the text each id stands for (0 for special
    and unknown tokens), computed once. ``token_bytes()[encode(text)].sum()`` is
    ``len(text.encode())`` wherever the tokenizer spells the text exactly (docs/evaluation.md
    lists the exceptions), so bits per byte compare across tokenizers."""
    if self._bytes is None:
      self._bytes = self._count_bytes()
      self._bytes.flags.writeable = False
    return self._bytes

  def _count_bytes(self) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def encode_prompt(self, text: str) -> list[int]:
    """A generation prompt's ids, framed as the tokenizer itself frames text (a Hugging Face
    tokenizer.json's post-processor may add e.g. Llama's leading BOS); ``encode`` elsewhere."""
    return [int(i) for i in self.encode(text)]

  def encode_doc(self, doc: str | bytes) -> np.ndarray:
    """``encode`` of a document that may be raw bytes (a text file; invalid utf-8 replaced)."""
    return self.encode(doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc)

  def encode_docs(self, docs) -> list[np.ndarray]:
    """``encode_doc`` of each of ``docs`` (a batch: a Hugging Face tokenizer spreads it over
    threads)."""
    return [self.encode_doc(d) for d in docs]


class ByteTokenizer(Tokenizer):
  """odyssey's byte vocabulary: bytes 0..255, PAD 256, BOS 257, EOS 258."""

  def __init__(self):
    self.name, self.vocab_size = VOCAB_NAME, BYTE_VOCAB
    self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
    self.sample_vocab = 256  # EOS/BOS/PAD are never sampled, as before

  def encode(self, text):
    return byte_encode(text)

  def encode_doc(self, doc):
    return byte_encode(doc)  # raw bytes stay raw: shards are byte-identical to before

  def decode(self, ids):
    return byte_decode(ids)

  def _count_bytes(self):
    return (np.arange(BYTE_VOCAB) < 256).astype(np.int32)


def _file_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def _as_ids(ids, vocab_size: int) -> list[int]:
  """Ids as ints, without those outside the vocabulary (a padded model may sample them)."""
  flat = np.asarray(ids, np.int64).reshape(-1)
  return [int(i) for i in flat if 0 <= i < vocab_size]


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizer.json``, through the ``tokenizers`` package."""

  def __init__(self, path: str):
    import tokenizers
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
      raise ValueError(f"{path} is not a tokenizer.json the tokenizers package can read "
                       f"({str(e).splitlines()[0][:200]}); give a Hugging Face tokenizer.json, "
                       "a SentencePiece .model or 'byte'.") from None
    self.path, self.name = path, f"hf:{_file_hash(path)}"
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.sample_vocab = self.vocab_size
    config = _tokenizer_config(path)
    ids = _hf_special_ids(self._tok, config)
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self.chat_template = _chat_template(path, config)

  def encode(self, text):
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_with_offsets(self, text) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``encode``, and each id's (start, end) character span in ``text``."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, np.int32), list(encoding.offsets)

  def token_text(self, token_id: int) -> str:
    """The text of one id (a chat template's ``bos_token``/``eos_token``)."""
    return self._tok.id_to_token(token_id)

  def encode_prompt(self, text):
    return list(self._tok.encode(text).ids)

  def encode_docs(self, docs):
    texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids):
    return self._tok.decode(_as_ids(ids, self.vocab_size), skip_special_tokens=True)

  def _count_bytes(self):
    """Byte-level BPE (GPT-2, Llama 3, ``train_bpe``): each symbol of a token is one byte of
    ByteLevel's byte-to-unicode alphabet. Otherwise (SentencePiece-style vocabularies): the
    token's text with the Metaspace symbol (▁) as one space byte, and ``<0xNN>`` byte-fallback
    pieces one byte each. Added tokens are their own text; special ones and the unknown token
    count 0."""
    spec = json.loads(self._tok.to_str())
    parts = list(_components([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]))
    byte_level = any(part.get("type") == "ByteLevel" for part in parts)
    space = next((part["replacement"] for part in parts if part.get("type") == "Metaspace"
                  and isinstance(part.get("replacement"), str)), "\u2581")
    model = spec.get("model") or {}
    byte_fallback, unknown = bool(model.get("byte_fallback")), model.get("unk_token")
    alphabet = _byte_level_alphabet()
    added = self._tok.get_added_tokens_decoder()
    out = np.zeros(self.vocab_size, np.int32)
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if not 0 <= i < self.vocab_size:
        continue
      if i in added:
        out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
      elif token == unknown:
        out[i] = 0  # the text it replaced is not recoverable from the id
      elif byte_level:
        out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
      elif byte_fallback and _BYTE_PIECE.fullmatch(token):
        out[i] = 1
      else:
        out[i] = len(token.replace(space, " ").encode("utf-8"))
    return out


def _components(node):
  """Every component (a dict) of a tokenizer.json tree, Sequences' parts included."""
  if isinstance(node, dict):
    yield node
    node = list(node.values())
  if isinstance(node, list):
    for value in node:
      yield from _components(value)


@functools.cache
def _byte_level_alphabet() -> frozenset[str]:
  """The 256 symbols ByteLevel writes bytes as (GPT-2's bytes_to_unicode): printable Latin-1
  bytes stand for themselves, the other 68 bytes for U+0100 onwards."""
  kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  moved = [256 + n for n in range(256 - len(kept))]
  return frozenset(map(chr, kept + moved))


def _tokenizer_config(path: str) -> dict:
  """tokenizer_config.json next to ``path``; {} when there is none or it is not a JSON object."""
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def _chat_template(path: str, config: dict) -> str | None:
  """The chat template of a tokenizer.json: tokenizer_config.json's "chat_template" (a string, or
  the one named "default" of a list), else a chat_template.jinja beside it (transformers 5 saves
  it there); None when it has none."""
  template = config.get("chat_template")
  if isinstance(template, list):
    template = next((t.get("template") for t in template
                     if isinstance(t, dict) and t.get("name") == "default"), None)
  if isinstance(template, str):
    return template
  jinja = os.path.join(os.path.dirname(path), CHAT_TEMPLATE_FILE)
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  return None


def _hf_special_ids(tok, config: dict) -> dict:
  """bos/eos/pad ids: as tokenizer_config.json (``config``) names them, else by the usual names
  among the tokenizer's special tokens; None where there is none."""
  named = {}
  for kind in _KNOWN:
    token = config.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str):
      named[kind] = token
  specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
  out = {}
  for kind, names in _KNOWN.items():
    token = named.get(kind) or next((n for n in names if n in specials), None)
    out[kind] = tok.token_to_id(token) if token is not None else None
  return out


class SPTokenizer(Tokenizer):
  """A SentencePiece ``.model``, through the ``sentencepiece`` package."""

  def __init__(self, path: str):
    import sentencepiece
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path} is not a SentencePiece model the sentencepiece package can read "
                       f"({str(e).splitlines()[0][:200]}); give a Hugging Face tokenizer.json, "
                       "a SentencePiece .model or 'byte'.") from None
    self.path, self.name = path, f"spm:{_file_hash(path)}"
    self.vocab_size = self.sample_vocab = self._sp.get_piece_size()
    special = lambda i: i if i >= 0 else None  # sentencepiece says -1 for a disabled token
    self.bos_id, self.eos_id = special(self._sp.bos_id()), special(self._sp.eos_id())
    self.pad_id = special(self._sp.pad_id())

  def encode(self, text):
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids):
    return self._sp.decode(_as_ids(ids, self.vocab_size))

  def _count_bytes(self):
    """Control, unknown and unused pieces 0; byte pieces 1; others their text, ▁ one space."""
    sp, out = self._sp, np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        out[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
        out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


@functools.lru_cache(maxsize=16)
def _load_file(path: str, stamp: tuple) -> Tokenizer:
  del stamp  # the file's (size, mtime): part of the cache key only
  return SPTokenizer(path) if path.endswith(".model") else HFTokenizer(path)


def load(spec: str) -> Tokenizer:
  """The tokenizer ``spec`` names: "byte", a tokenizer.json path or a SentencePiece .model path;
  a ValueError with one sentence naming the file when it is missing or unreadable."""
  if spec == BYTE_SPEC or spec == "":
    return ByteTokenizer()
  if not (spec.endswith(".json") or spec.endswith(".model")):
    raise ValueError(f"tokenizer {spec!r} is neither 'byte', a Hugging Face tokenizer.json nor a "
                     "SentencePiece .model file.")
  if not os.path.isfile(spec):
    raise ValueError(f"tokenizer file {spec} does not exist; train one with `python -m "
                     "train.tokenizer --src=TEXT_DIR --vocab_size=8192 --out=DIR/tokenizer.json`.")
  st = os.stat(spec)
  return _load_file(os.path.abspath(spec), (st.st_size, st.st_mtime_ns))


def spec_of(data_cfg) -> str:
  """``data.tokenizer`` of a config as a loadable spec: "byte" (also for a config.json written
  before the field existed), a file path, or for ``"bpe:N"`` the path of the BPE of N ids built on
  the run's training split on first use and cached (``train.data.built_tokenizer``)."""
  spec = data_cfg.get("tokenizer", BYTE_SPEC) or BYTE_SPEC
  if spec.startswith(BUILT_PREFIX):
    from train import data  # imported here: train.data imports this module
    return data.built_tokenizer(data_cfg, spec)
  return spec


def from_config(config) -> Tokenizer:
  """The tokenizer of a run's config (``config.data.tokenizer``)."""
  return load(spec_of(config.data))


def workdir_file(workdir: str) -> str | None:
  """The tokenizer file a workdir keeps (tokenizer.json or tokenizer.model), or None (bytes)."""
  for name in WORKDIR_FILES.values():
    if os.path.isfile(os.path.join(workdir, name)):
      return os.path.join(workdir, name)
  return None


def from_workdir(workdir: str) -> Tokenizer:
  """The tokenizer a workdir's model was trained or imported with: its tokenizer file, else bytes."""
  path = workdir_file(workdir)
  return load(path) if path else ByteTokenizer()


def record(workdir: str, tok: Tokenizer) -> str | None:
  """Copies ``tok``'s file into ``workdir`` (tokenizer.json / tokenizer.model, with a Hugging Face
  tokenizer_config.json and chat_template.jinja beside it) unless it already holds it; returns the
  path, None for bytes."""
  if tok.path is None:
    return None
  dst = os.path.join(workdir, WORKDIR_FILES[tok.name.split(":")[0]])
  if not os.path.exists(dst) or _file_hash(dst) != tok.name.split(":")[1]:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(tok.path, tmp)
    os.replace(tmp, dst)
  for name in ("tokenizer_config.json", CHAT_TEMPLATE_FILE):
    config = os.path.join(os.path.dirname(tok.path), name)
    if tok.name.startswith("hf:") and os.path.isfile(config) and not os.path.samefile(
        os.path.dirname(tok.path), workdir):
      shutil.copyfile(config, os.path.join(workdir, name))
  return dst


# ----------------------------------------------------------------------------- training


def train_bpe(docs, vocab_size: int, out: str) -> Tokenizer:
  """Trains a byte-level BPE of ``vocab_size`` ids (specials included) on the texts ``docs`` and
  writes it to ``out`` (a new file); returns it loaded."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  if vocab_size < 256 + len(SPECIALS):
    raise ValueError(f"--vocab_size={vocab_size} must be at least {256 + len(SPECIALS)} (the 256 "
                     f"byte symbols and the {len(SPECIALS)} special tokens).")
  if os.path.exists(out):
    raise ValueError(f"--out={out} already exists; tokenizer training never overwrites, so give "
                     "a new path.")
  if not out.endswith(".json"):
    raise ValueError(f"--out={out} must name a .json file (a Hugging Face tokenizer.json).")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=sys.stderr.isatty())
  texts = (d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp.{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, out)  # a complete file or none
  return load(out)


def main(argv):
  from absl import app
  from train import text_sources
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  flag = app.flags.FLAGS
  try:
    source = text_sources.open_source(flag.src, glob=flag.glob, text_field=flag.text_field)
    if os.path.exists(flag.out):  # before reading the whole source
      raise ValueError(f"--out={flag.out} already exists; tokenizer training never overwrites, "
                       "so give a new path.")
    tok = train_bpe((doc for _, doc in source.documents()), flag.vocab_size, flag.out)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  print(f"odyssey: wrote {flag.out}: {tok.vocab_size} ids ({tok.name}; pad {tok.pad_id}, bos "
        f"{tok.bos_id}, eos {tok.eos_id}).", flush=True)


def define_flags():
  from absl import flags
  flags.DEFINE_string("src", None, "Text source: a folder of text files, a .jsonl, .parquet or "
                      ".arrow file or folder of them, or a datasets.save_to_disk folder.")
  flags.DEFINE_string("glob", "", "Files under a --src folder (default: its .jsonl, .parquet or "
                      ".arrow files if it has any, else '**/*.txt').")
  flags.DEFINE_string("text_field", "text", "The jsonl field or parquet/Arrow column of the text.")
  flags.DEFINE_integer("vocab_size", 8192, "Ids in the tokenizer, the 3 special tokens included.")
  flags.DEFINE_string("out", None, "The tokenizer.json to write (must not exist).")
  flags.mark_flags_as_required(["src", "out"])


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
