"""Input pipeline: byte tokenizer, token streams, and the grain dataset the loop iterates.

A corpus is one flat token stream: each document's bytes followed by EOS_ID. Two backends:
  * "stdlib": every .py file of the running Python's standard library (or of `data.path`),
    loaded into memory. Needs no download, so every config runs anywhere.
  * "arrayrecord": shards written by `python -m train.make_arrayrecord`, read by random access.
  * "sft": prompt/completion or chat rows of a jsonl, one example (or, packed, several) per row,
    with the loss on the completion only (train/sft_data.py).
Train/val are split by file with a hash of the relative path, so the split is identical on every
machine and does not move when files are added elsewhere in the tree. For "arrayrecord" the split
was fixed by the converter's --val_fraction (recorded in metadata.json); data.val_fraction is unused.

A mixture (``data.sources``: named sources, each a backend with its own path, split and weight)
mixes the sources' shuffled, repeated windows with grain's ``MapDataset.mix`` inside the one
checkpointed pipeline; each source keeps its own validation split (docs/data.md "Mixtures").

``check_splits`` (called by the LM task's check, before the workdir is touched) refuses a split
that cannot fill one batch, a metadata.json that is not the converter's, and shards that are
missing, not ArrayRecord files, or hold other records than metadata.json promises.
"""

import functools
import hashlib
import json
import math
import os
import sysconfig
import zlib

import grain
import jax
import ml_collections
import numpy as np

# The byte vocabulary and the split rule live with the tokenizers and the text sources, which the
# converter's worker processes import without JAX; they are re-exported here for the pipeline.
from train import sft_data, tokenizer
from train.text_sources import SPLITS, split_of  # noqa: F401
from train.tokenizer import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID, VOCAB_NAME  # noqa: F401
from train.tokenizer import byte_decode as decode  # noqa: F401
from train.tokenizer import byte_encode as encode  # noqa: F401

KNOWN_DATASETS = ("stdlib", "arrayrecord", "sft")
# Third-party code is not part of the standard library; caches hold no .py sources worth training on.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# ----------------------------------------------------------------------------- documents


class DataError(ValueError):
  """A data file that turns out unreadable mid-run; ``python -m train`` prints its sentence."""


def concat_docs(docs, dtype=np.uint16) -> np.ndarray:
  """Returns the flat stream doc0 EOS doc1 EOS ... of byte strings `docs`."""
  out = np.empty(sum(len(d) + 1 for d in docs), dtype)
  pos = 0
  for doc in docs:
    out[pos:pos + len(doc)] = np.frombuffer(doc, np.uint8)
    out[pos + len(doc)] = EOS_ID
    pos += len(doc) + 1
  return out


# ----------------------------------------------------------------------------- stdlib backend


def default_stdlib_root() -> str:
  """Returns the standard library folder of the running Python."""
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=None)
def py_files(root: str) -> tuple[str, ...]:
  """Returns the sorted '/'-separated relative paths of all .py files under `root`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith(".py"):
        rel = name if rel_dir == "." else os.path.join(rel_dir, name)
        found.append(rel.replace(os.sep, "/"))
  return tuple(sorted(found))


def split_files(root: str, split: str, val_fraction: float) -> tuple[str, ...]:
  """Returns the .py files of `split` under `root`, in stream order."""
  return tuple(f for f in py_files(root) if split_of(f, val_fraction) == split)


@functools.lru_cache(maxsize=8)
def _stdlib_tokens(root: str, split: str, val_fraction: float,
                   tokenizer_spec: str = "byte") -> np.ndarray:
  files = split_files(root, split, val_fraction)
  if tokenizer_spec == "byte":  # bytes are the files themselves: read each run, nothing cached
    tokens = concat_docs(_read_docs(root, files))
    tokens.flags.writeable = False  # Shared by every caller through the cache.
    return tokens
  # A subword vocabulary: each document's ids, then the tokenizer's EOS, tokenized once and kept
  # in the cache (keyed by the tokenizer's content and the split's files), memory-mapped after.
  tok = tokenizer.load(tokenizer_spec)
  path = os.path.join(cache_dir(), "tokens", f"{tok.name.replace(':', '-')}-"
                      f"{_files_key(root, files, val_fraction)}-{split}.npy")
  if not os.path.isfile(path):
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    print(f"odyssey: tokenizing the {split!r} split ({len(files)} files under {root}) with "
          f"{tok.path} ({tok.name}); once, cached as {path}.", flush=True)
    from tqdm import tqdm
    parts, docs = [], _read_docs(root, files)
    with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=None) as bar:
      for i in range(0, len(docs), 256):
        parts += [np.append(ids, tok.eos_id).astype(dtype)
                  for ids in tok.encode_docs(docs[i:i + 256])]
        bar.update(len(docs[i:i + 256]))
    _save_atomically(path, np.concatenate(parts or [np.zeros((0,), dtype)]))
  try:
    return np.load(path, mmap_mode="r")  # read-only, shared by every caller through the cache
  except (OSError, ValueError) as e:
    raise ValueError(f"the cached token stream {path} is unreadable ({e}); delete it and rerun "
                     "to rebuild it.") from None


def _read_docs(root: str, files) -> list[bytes]:
  docs = []
  for rel in files:
    try:
      with open(os.path.join(root, rel), "rb") as f:
        docs.append(f.read())
    except OSError:  # Permission-denied or dangling files are not worth failing a run for.
      continue
  return docs


def _files_key(root: str, files, val_fraction: float) -> str:
  """12 hex digits naming a split's files by their relative paths and sizes (not the folder, so
  the same corpus at another path, or on another machine, has the same key)."""
  sizes = [f"{rel}\t{_stat(os.path.join(root, rel))[0]}" for rel in files]
  text = json.dumps([float(val_fraction), sizes])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _save_atomically(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}.npy"
  np.save(tmp, array)
  os.replace(tmp, path)  # a complete file or none, also when two processes build it at once


# ----------------------------------------------------------------------------- built on first use


def cache_dir() -> str:
  """Where tokenizers and token streams built on first use are kept: $ODYSSEY_CACHE, else
  ~/.cache/odyssey. Everything in it can be deleted; it is rebuilt, identically, when needed."""
  return os.environ.get("ODYSSEY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "odyssey")


def built_tokenizer(data_cfg, spec: str) -> str:
  """The tokenizer.json of ``data.tokenizer="bpe:N"``: a byte-level BPE of N ids (the 3 special
  tokens included; train/tokenizer.py train_bpe) trained on the training split of the run's
  stdlib-style corpus (the standard library, or the .py files of data.path). Trained on first use
  and kept in the cache under a key of N and the split's files; later runs, on any machine with
  the same files, reuse or rebuild the same file (training is deterministic)."""
  size = spec[len(tokenizer.BUILT_PREFIX):]
  if not size.isdigit() or int(size) < 256 + len(tokenizer.SPECIALS):
    raise ValueError(f"data.tokenizer={spec!r} must be 'bpe:N' with N an integer of at least "
                     f"{256 + len(tokenizer.SPECIALS)} (the 256 byte symbols and the "
                     f"{len(tokenizer.SPECIALS)} special tokens), e.g. 'bpe:8192'.")
  if data_cfg.get("source") or source_keys(data_cfg):
    raise ValueError(f"data.tokenizer={spec!r} is trained on the one corpus of a run, but "
                     "data.sources mixes several; train a tokenizer on the text you want with "
                     "`python -m train.tokenizer` and set data.tokenizer to its tokenizer.json.")
  if data_cfg.name != "stdlib":
    instead = ("an SFT run uses the tokenizer of the model it fine-tunes (experiments/sft.py:"
               "from=WORKDIR takes it from the workdir)" if data_cfg.name == "sft" else
               "its shards are already tokenized: use the tokenizer.json they were written with "
               "(train.make_arrayrecord --tokenizer)")
    raise ValueError(f"data.tokenizer={spec!r} trains a BPE on a stdlib-style corpus "
                     f"(data.name='stdlib'), but data.name={data_cfg.name!r}; {instead}.")
  if data_cfg.path and not os.path.isdir(data_cfg.path):
    raise ValueError(f"data.path={data_cfg.path!r} does not exist or is not a folder.")
  root = os.path.realpath(data_cfg.path) if data_cfg.path else default_stdlib_root()
  return _built_bpe(root, float(data_cfg.val_fraction), int(size))


@functools.lru_cache(maxsize=8)
def _built_bpe(root: str, val_fraction: float, vocab_size: int) -> str:
  files = split_files(root, "train", val_fraction)
  folder = os.path.join(cache_dir(), "tokenizers",
                        f"bpe{vocab_size}-{_files_key(root, files, val_fraction)}")
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(path):
    print(f"odyssey: training a byte-level BPE tokenizer of {vocab_size} ids on the {len(files)} "
          f"train files under {root}; once, cached as {path}.", flush=True)
    tmp = os.path.join(folder, f"tokenizer.tmp.{os.getpid()}.json")
    if os.path.exists(tmp):
      os.remove(tmp)
    tokenizer.train_bpe(_read_docs(root, files), vocab_size, tmp)
    os.replace(tmp, path)
  return path


class ArrayStream:
  """A token stream held in memory."""

  def __init__(self, tokens: np.ndarray):
    self.tokens = tokens

  def __len__(self) -> int:
    return len(self.tokens)

  def read(self, start: int, length: int) -> np.ndarray:
    """Returns tokens [start, start + length)."""
    return self.tokens[start:start + length]


# ----------------------------------------------------------------------------- arrayrecord backend


REBUILD = "rewrite the dataset with `python -m train.make_arrayrecord --src=TEXT_DIR --dst=DIR`"


def read_metadata(path: str) -> dict:
  """``path``/metadata.json of an "arrayrecord" text dataset, or one sentence saying what is wrong
  with it (unreadable, not JSON, or lacking a field the reader needs)."""
  meta_path = os.path.join(path, "metadata.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{meta_path} could not be read as JSON ({e}); {REBUILD}.") from None
  problem = _metadata_problem(meta)
  if problem:
    raise ValueError(f"{meta_path} is not the metadata of train.make_arrayrecord: {problem}; "
                     f"{REBUILD}.")
  return meta


def _metadata_problem(meta) -> str:
  if not isinstance(meta, dict):
    return "it is not a JSON object"
  for key in ("dtype", "chunk_len", "splits"):
    if key not in meta:
      return f"it has no {key!r}"
  try:
    np.dtype(meta["dtype"])
  except TypeError:
    return f"dtype {meta['dtype']!r} is not a numpy dtype"
  if type(meta["chunk_len"]) is not int or meta["chunk_len"] < 1:
    return f"chunk_len {meta['chunk_len']!r} is not a positive integer"
  for split in SPLITS:
    info = meta["splits"].get(split) if isinstance(meta["splits"], dict) else None
    if not isinstance(info, dict) or not all(k in info for k in ("num_tokens", "num_chunks",
                                                                   "shards")):
      return f"splits.{split} lacks num_tokens, num_chunks or shards"
    if not info["shards"] or not all(isinstance(n, str) and n == os.path.basename(n)
                                     for n in info["shards"]):
      return f"splits.{split}.shards is not a list of file names of the folder"
  return ""


class ArrayRecordStream:
  """A token stream stored as fixed-size chunk records in ArrayRecord shards.

  Chunk c of a split is record c // num_shards of shard c % num_shards (the converter deals
  chunks round-robin so it can stream); only the last chunk may be shorter than chunk_len.
  """

  def __init__(self, path: str, split: str):
    meta = read_metadata(path)
    info = meta["splits"][split]
    self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    self.chunk_len = meta["chunk_len"]
    self.num_tokens = info["num_tokens"]
    self._num_shards = len(info["shards"])
    counts = [len(range(s, info["num_chunks"], self._num_shards)) for s in range(self._num_shards)]
    self._first_key = np.cumsum([0] + counts[:-1])
    shards = [os.path.join(path, name) for name in info["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(shards)

  def __len__(self) -> int:
    return self.num_tokens

  def read(self, start: int, length: int) -> np.ndarray:
    """Returns tokens [start, start + length) by reading only the chunks they lie in."""
    stop = min(start + length, self.num_tokens)
    if stop <= start:
      return np.zeros((0,), self.dtype)
    chunks = range(start // self.chunk_len, (stop - 1) // self.chunk_len + 1)
    keys = [int(self._first_key[c % self._num_shards]) + c // self._num_shards for c in chunks]
    records = self._source.__getitems__(keys)
    flat = np.concatenate([np.frombuffer(r, self.dtype) for r in records])
    offset = start - chunks[0] * self.chunk_len
    return flat[offset:offset + stop - start]


# ----------------------------------------------------------------------------- public API


def check_data_config(data_cfg) -> None:
  """Raises ValueError with one sentence if `data_cfg` cannot produce a dataset."""
  if source_keys(data_cfg):
    _check_sources(data_cfg)
    return
  if data_cfg.name not in KNOWN_DATASETS:
    raise ValueError(f"{_field(data_cfg, 'name')}={data_cfg.name!r} is unknown; use one of "
                     f"{KNOWN_DATASETS}.")
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise ValueError(f"{_field(data_cfg, 'val_fraction')}={data_cfg.val_fraction} must lie "
                     "strictly between 0 and 1.")
  if data_cfg.name == "sft":
    # a .jsonl file, or a folder of train.jsonl and val.jsonl
    sft_data.check_path(data_cfg, _field(data_cfg, "path"))
  elif data_cfg.path and not os.path.isdir(data_cfg.path):
    raise ValueError(f"{_field(data_cfg, 'path')}={data_cfg.path!r} does not exist or is not a "
                     "folder.")
  if packing_of(data_cfg) not in PACKINGS:
    raise ValueError(f"data.packing={packing_of(data_cfg)!r} is not one of {PACKINGS}.")
  if data_cfg.name == "arrayrecord":
    how = "write one with `python -m train.make_arrayrecord --src=TEXT_DIR --dst=DIR`"
    path = _field(data_cfg, "path")
    if not data_cfg.path:
      raise ValueError(f"{_field(data_cfg, 'name')}='arrayrecord' needs {path} set to a shard "
                       f"folder; {how}.")
    if not os.path.isfile(os.path.join(data_cfg.path, "metadata.json")):
      raise ValueError(f"{path}={data_cfg.path!r} has no metadata.json; {how}.")
    if not any(n.endswith(".array_record") for n in os.listdir(data_cfg.path)):
      raise ValueError(f"{path}={data_cfg.path!r} has no .array_record shards; {how}.")
    check_dataset_tokenizer(data_cfg, read_metadata(data_cfg.path))
  else:
    _data_tokenizer(data_cfg)


# ----------------------------------------------------------------------------- mixtures

# The fields of one entry of data.sources; the tokenizer, packing and reader settings stay in data
# and are shared by every source. val_fraction (stdlib sources only) defaults to data.val_fraction.
SOURCE_FIELDS = ("name", "path", "weight", "val_fraction")


def source_keys(data_cfg) -> tuple[str, ...]:
  """The names of data.sources in sorted order, the order they are mixed in (config.json sorts
  its keys, so a resumed run mixes them the same way); () for one dataset (data.name/path) and
  for a config.json written before data.sources existed."""
  sources = data_cfg.get("sources")
  return tuple(sorted(sources.keys())) if isinstance(sources, ml_collections.ConfigDict) else ()


def source_config(data_cfg, key: str) -> ml_collections.ConfigDict:
  """The data config of source ``key`` of a mixture alone: the shared settings of data with the
  source's name, path and val_fraction, and ``source`` naming it for the error messages."""
  src = data_cfg.sources[key]
  cfg = data_cfg.to_dict()
  del cfg["sources"]
  cfg.update(name=src.name, path=src.get("path", ""),
             val_fraction=src.get("val_fraction", data_cfg.val_fraction), source=key)
  return ml_collections.ConfigDict(cfg)


def source_seed(seed: int, key: str) -> int:
  """The shuffle seed of source ``key``: a function of config.seed and the source's name alone, so
  adding or reweighting a source leaves the order of the others' windows as it was."""
  return int(np.random.SeedSequence([seed, zlib.crc32(key.encode())]).generate_state(1)[0])


def _field(data_cfg, name: str) -> str:
  """How the config names field ``name`` of ``data_cfg`` (one source of a mixture, or data)."""
  key = data_cfg.get("source", "")
  return f"data.sources.{key}.{name}" if key and name in SOURCE_FIELDS else f"data.{name}"


def _check_sources(data_cfg) -> None:
  """data.sources: each entry a group of known fields with a usable weight and a dataset that
  check_data_config accepts on its own; no data.path beside them."""
  if data_cfg.path:
    raise ValueError(f"data.path={data_cfg.path!r} names one dataset, but data.sources names the "
                     "datasets of a mixture; set data.path='' and give each source its own path "
                     "(data.sources.NAME.path).")
  if not 0.0 < data_cfg.val_fraction < 1.0:  # the stdlib sources' default
    raise ValueError(f"data.val_fraction={data_cfg.val_fraction} must lie strictly between 0 "
                     "and 1.")
  for key in source_keys(data_cfg):
    src = data_cfg.sources[key]
    if not isinstance(src, ml_collections.ConfigDict):
      raise ValueError(f"data.sources.{key}={src!r} is not a source; each source is a group of "
                       f"{SOURCE_FIELDS} (docs/data.md, Mixtures).")
    unknown = sorted(set(src.keys()) - set(SOURCE_FIELDS))
    missing = [f for f in ("name", "weight") if f not in src]
    if unknown or missing:
      problem = f"has no {missing[0]!r}" if missing else f"has unknown field(s) {unknown}"
      raise ValueError(f"data.sources.{key} {problem}; a source has a name and a weight, and "
                       "optionally a path and a val_fraction.")
    weight = src.weight
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight <= 0):
      raise ValueError(f"data.sources.{key}.weight={weight!r} must be a finite number above 0 "
                       "(the weights are normalised to sum to 1).")
    if "val_fraction" in src and src.name == "arrayrecord":
      raise ValueError(f"data.sources.{key}.val_fraction is unused by an 'arrayrecord' source, "
                       "whose split the converter's --val_fraction fixed; remove it.")
    check_data_config(source_config(data_cfg, key))


def _data_tokenizer(data_cfg):
  """The tokenizer of data.tokenizer, which must be able to separate documents (an EOS)."""
  spec = tokenizer.spec_of(data_cfg)
  tok = tokenizer.load(spec)
  if tok.eos_id is None:
    raise ValueError(f"data.tokenizer={spec!r} has no end-of-sequence token, which separates the "
                     "documents of a stream; give a tokenizer that has one.")
  return tok


def check_dataset_tokenizer(data_cfg, meta: dict) -> None:
  """The dataset at data.path was tokenized with data.tokenizer (metadata.json's "vocab")."""
  tok = _data_tokenizer(data_cfg)
  if meta.get("vocab", "byte259") != tok.name:
    made_with = meta.get("tokenizer", {}).get("spec") if isinstance(meta.get("tokenizer"),
                                                                    dict) else None
    raise ValueError(f"{_field(data_cfg, 'path')}={data_cfg.path!r} was tokenized with "
                     f"{meta.get('vocab')!r}"
                     f"{f' ({made_with})' if made_with else ''}, but data.tokenizer="
                     f"{tokenizer.spec_of(data_cfg)!r} is {tok.name!r}; set --config.data.tokenizer "
                     "to the dataset's tokenizer, or rewrite the dataset with --tokenizer.")


def open_shard(path: str, what: str):
  """An ArrayRecordReader of shard ``path``, or one sentence naming it when it is missing or not
  a readable ArrayRecord file (``what`` says how to make a good one)."""
  from array_record.python.array_record_module import ArrayRecordReader
  if not os.path.isfile(path):
    raise ValueError(f"ArrayRecord shard {path} is missing; {what}.")
  reader = ArrayRecordReader(path)
  if not reader.ok():  # a text file, a truncated shard or an empty file: no valid footer
    raise ValueError(f"{path} is not a readable ArrayRecord file (truncated, or not written as "
                     f"ArrayRecord); {what}.")
  return reader


@functools.lru_cache(maxsize=16)
def _check_shards(path: str, split: str, signature: tuple) -> None:
  """Every shard of ``split`` opens and holds the records metadata.json promises (chunk c in shard
  c % num_shards; the first record of a shard is a full chunk unless it is the last)."""
  del signature  # the shards' (name, size, mtime): part of the cache key only
  meta = read_metadata(path)
  info, chunk_len = meta["splits"][split], meta["chunk_len"]
  itemsize = np.dtype(meta["dtype"]).itemsize
  num_shards, num_chunks = len(info["shards"]), info["num_chunks"]
  for s, name in enumerate(info["shards"]):
    shard = os.path.join(path, name)
    reader = open_shard(shard, REBUILD)
    try:
      want = len(range(s, num_chunks, num_shards))
      if reader.num_records() != want:
        raise ValueError(f"{shard} holds {reader.num_records()} records, but metadata.json "
                         f"promises {want} for it ({num_chunks} chunks of the {split!r} split "
                         f"over {num_shards} shards); {REBUILD}.")
      if want:
        length = len(reader.read([0])[0])
        tokens = min(chunk_len, info["num_tokens"] - s * chunk_len)
        if length != tokens * itemsize:
          raise ValueError(f"{shard} starts with a record of {length} bytes, but metadata.json "
                           f"promises {tokens} {meta['dtype']} tokens ({tokens * itemsize} bytes)"
                           f"; {REBUILD}.")
    finally:
      reader.close()


def split_tokens(data_cfg, split: str) -> int:
  """The number of tokens in ``split``, from metadata.json or file sizes (no token is read)."""
  if data_cfg.name == "arrayrecord":
    return int(read_metadata(data_cfg.path)["splits"][split]["num_tokens"])
  root = os.path.realpath(data_cfg.path) if data_cfg.path else default_stdlib_root()
  if _tokenizer_spec(data_cfg) != "byte":  # subword ids: counted by tokenizing (cached for the run)
    return len(_stdlib_tokens(root, split, float(data_cfg.val_fraction), _tokenizer_spec(data_cfg)))
  # Each document is its bytes and one EOS; unreadable files are skipped when read, so this is
  # an upper bound (make_dataset counts again).
  return sum(os.path.getsize(os.path.join(root, rel)) + 1
             for rel in split_files(root, split, float(data_cfg.val_fraction))
             if os.path.isfile(os.path.join(root, rel)))


def _where(data_cfg) -> str:
  """The dataset of ``data_cfg`` as the messages name it (a mixture's source by its name)."""
  key = data_cfg.get("source", "")
  if key:
    return f"data.sources.{key} ({data_cfg.path!r})" if data_cfg.path else (
        f"data.sources.{key} ({data_cfg.name!r})")
  return f"data.path={data_cfg.path!r}" if data_cfg.path else f"data {data_cfg.name!r}"


def check_splits(data_cfg, *, seq_len: int, batch_sizes: dict[str, tuple[int, str]]) -> None:
  """One sentence for a split that cannot fill one batch or whose shards are damaged, before
  anything is written; ``batch_sizes``: {split: (global batch size, the config field)}. Each
  source of a mixture is checked alone: its val split is evaluated alone, and one batch of its
  own train split is the same floor as for one dataset (each source is repeated, and fills part
  of every batch)."""
  check_data_config(data_cfg)
  keys = source_keys(data_cfg)
  for cfg in [source_config(data_cfg, key) for key in keys] if keys else [data_cfg]:
    _check_filled(cfg, seq_len, batch_sizes)


def _check_filled(data_cfg, seq_len: int, batch_sizes: dict[str, tuple[int, str]]) -> None:
  if data_cfg.name == "sft":
    sft_data.check_splits(data_cfg, packing_of(data_cfg), seq_len=seq_len,
                          batch_sizes=batch_sizes, where=_where(data_cfg),
                          val_field=_field(data_cfg, "val_fraction"))
    return
  if data_cfg.name == "arrayrecord":
    meta = read_metadata(data_cfg.path)
    for split in batch_sizes:
      names = meta["splits"][split]["shards"]
      signature = tuple((n, *_stat(os.path.join(data_cfg.path, n))) for n in names)
      _check_shards(os.path.realpath(data_cfg.path), split, signature)
  for split, (batch, field) in batch_sizes.items():
    tokens = split_tokens(data_cfg, split)
    windows = max(tokens - 1, 0) // seq_len
    if windows < batch:
      empty = " (it is empty)" if tokens == 0 else ""
      if split != "val":
        hint = "add data"
      elif data_cfg.name == "arrayrecord":
        hint = "rewrite the dataset with another --val_fraction"
      else:
        hint = f"change {_field(data_cfg, 'val_fraction')} or add files"
      raise ValueError(f"the {split!r} split of {_where(data_cfg)} has {tokens:,} tokens{empty}, "
                       f"{windows} windows of train.seq_len={seq_len}, fewer than one batch of "
                       f"{field}={batch}; {hint}, or lower {field}.")


def _stat(path: str) -> tuple:
  try:
    st = os.stat(path)
  except OSError:
    return (None, None)
  return (st.st_size, st.st_mtime_ns)


def token_stream(data_cfg, split: str) -> ArrayStream | ArrayRecordStream:
  """Returns the token stream of `split` ("train" or "val")."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}.")
  if data_cfg.name == "arrayrecord":
    return ArrayRecordStream(data_cfg.path, split)
  root = os.path.realpath(data_cfg.path) if data_cfg.path else default_stdlib_root()
  return ArrayStream(_stdlib_tokens(root, split, float(data_cfg.val_fraction),
                                    _tokenizer_spec(data_cfg)))


def _tokenizer_spec(data_cfg) -> str:
  """data.tokenizer as a cache key: "byte", or the tokenizer file's absolute path."""
  spec = tokenizer.spec_of(data_cfg)
  return spec if spec == tokenizer.BYTE_SPEC else os.path.abspath(spec)


PACKINGS = ("none", "documents")


def packing_of(data_cfg) -> str:
  """``data.packing``; "none" for a config.json written before the field existed."""
  return data_cfg.get("packing", "none")


def document_fields(inputs_S: np.ndarray, targets_S: np.ndarray, eos_id: int = EOS_ID,
                    pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """The packed-document fields of one window (``data.packing="documents"``).

  Conventions (docs/data.md): a document ends with its EOS, and the token after an EOS starts the
  next one. ``segment_ids`` numbers the documents of the window 1, 2, ... (the first one, usually
  the tail of a document begun in an earlier window, is 1; 0 is left for padding); ``positions``
  restart at 0 at each document start (and at the window's first token). A target that is the
  first token of the next document (``inputs[t] == EOS``) becomes ``pad_id``, so the loss skips it.
  """
  is_eos_S = inputs_S == eos_id
  # Segment t counts the EOS tokens strictly before t: the EOS stays with the document it ends.
  segment_ids_S = (1 + np.concatenate([[0], np.cumsum(is_eos_S[:-1])])).astype(np.int32)
  index_S = np.arange(len(inputs_S), dtype=np.int32)
  starts_S = np.concatenate([[True], is_eos_S[:-1]])
  first_S = np.maximum.accumulate(np.where(starts_S, index_S, 0))
  return {"inputs": inputs_S, "targets": np.where(is_eos_S, pad_id, targets_S).astype(np.int32),
          "segment_ids": segment_ids_S, "positions": (index_S - first_S).astype(np.int32)}


class WindowSource:
  """grain random-access source of LM windows: element j covers stream[j*L : j*L + L + 1].

  ``packing="documents"`` adds per-document ``segment_ids`` and ``positions`` and masks the
  targets that cross a document boundary (``document_fields``); a pure function of the window,
  so the data iterator's checkpoint covers it.
  """

  def __init__(self, stream, seq_len: int, packing: str = "none", eos_id: int = EOS_ID,
               pad_id: int | None = PAD_ID):
    self.stream = stream
    self.seq_len = seq_len
    self.packing = packing
    # The tokenizer's ids; a masked target is its PAD, or -1 (which the loss also skips) when it
    # has none.
    self.eos_id, self.pad_id = eos_id, -1 if pad_id is None else pad_id

  def __len__(self) -> int:
    return max(len(self.stream) - 1, 0) // self.seq_len

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range for {len(self)} windows")
    window = self.stream.read(index * self.seq_len, self.seq_len + 1).astype(np.int32)
    if self.packing == "documents":
      return document_fields(window[:-1], window[1:], self.eos_id, self.pad_id)
    return {"inputs": window[:-1], "targets": window[1:]}

  def __repr__(self) -> str:  # grain logs the source; keep the token array out of it.
    return f"WindowSource(num_windows={len(self)}, seq_len={self.seq_len})"


def num_windows(data_cfg, split: str, seq_len: int) -> int:
  """Returns the number of seq_len windows in one epoch of `split`."""
  return len(WindowSource(token_stream(data_cfg, split), seq_len))


def make_dataset(data_cfg, *, split: str, seq_len: int, global_batch_size: int, seed: int,
                 shuffle: bool, num_epochs: int | None) -> grain.IterDataset:
  """Returns this process's batches {"inputs", "targets": int32[local_b, seq_len]} of `split`,
  plus "segment_ids" and "positions" with ``data.packing="documents"`` (``document_fields``;
  for "sft", per packed example: train/sft_data.py).

  With ``data.sources`` the windows of every source's `split` are mixed by weight (``mixed``);
  ``source_config(data_cfg, key)`` gives the config of one source alone (its own val split)."""
  check_data_config(data_cfg)
  keys = source_keys(data_cfg)
  if keys:
    sources = {key: window_source(source_config(data_cfg, key), split, seq_len,
                                  global_batch_size) for key in keys}
    return mixed(sources, {key: float(data_cfg.sources[key].weight) for key in keys}, data_cfg,
                 global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                 num_epochs=num_epochs)
  return batched(window_source(data_cfg, split, seq_len, global_batch_size), data_cfg,
                 global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                 num_epochs=num_epochs)


def window_source(data_cfg, split: str, seq_len: int,
                  global_batch_size: int) -> WindowSource | sft_data.Source:
  """The WindowSource (for "sft", the sft_data.Source) of `split` of one dataset, which must fill
  one global batch."""
  tok = tokenizer.load(tokenizer.spec_of(data_cfg))
  if data_cfg.name == "sft":
    source = sft_data.Source(sft_data.examples(data_cfg, split), seq_len, packing_of(data_cfg),
                             tok.pad_id)
    if source.num_cut and jax.process_index() == 0:
      print(f"odyssey: {source.num_cut} of {len(source.examples)} {split!r} SFT examples are "
            f"longer than train.seq_len={seq_len} and are cut.", flush=True)
  else:
    source = WindowSource(token_stream(data_cfg, split), seq_len, packing_of(data_cfg),
                          tok.eos_id, tok.pad_id)
  if len(source) < global_batch_size:
    raise ValueError(f"The {split!r} split of {_where(data_cfg)} has {len(source)} "
                     f"{'rows' if data_cfg.name == 'sft' else 'windows'} of "
                     f"seq_len={seq_len}, fewer than one batch of {global_batch_size}.")
  return source


def batched(source, data_cfg, *, global_batch_size: int, seed: int, shuffle: bool,
            num_epochs: int | None) -> grain.IterDataset:
  """The grain pipeline every dataset shares: shuffle -> repeat -> this process's share -> batch."""
  _check_processes(global_batch_size)
  ds = _epochs(grain.MapDataset.source(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  return _shared_batches(ds, data_cfg, global_batch_size=global_batch_size, num_epochs=num_epochs)


def mixed(sources: dict, weights: dict[str, float], data_cfg, *, global_batch_size: int, seed: int,
          shuffle: bool, num_epochs: int | None) -> grain.IterDataset:
  """``batched`` for a mixture: each source shuffled (with ``source_seed``) and repeated on its
  own, then interleaved by ``grain.MapDataset.mix`` in proportion to its weight.

  The mix is a deterministic interleave (among any k consecutive windows, source i gives
  k * weight_i of them to within two, the weights rounded to 1% of the smallest one), a function
  of the position alone, so the iterator's checkpoint (its position) resumes the mixture exactly. With ``num_epochs`` set, the mixture ends where its
  first source would run out of its epochs. ``sources``: {name: random-access source}.
  """
  _check_processes(global_batch_size)
  keys = sorted(sources)
  parents = [_epochs(grain.MapDataset.source(sources[key]), seed=source_seed(seed, key),
                     shuffle=shuffle, num_epochs=num_epochs) for key in keys]
  smallest = min(weights.values())
  # Integer parts, the smallest weight 100 of them: grain keeps integers as they are, whereas its
  # own scaling of floats truncates (weights 0.3 and 0.2 would become 149 and 100 parts).
  ds = grain.MapDataset.mix(parents, [round(100 * weights[key] / smallest) for key in keys])
  return _shared_batches(ds, data_cfg, global_batch_size=global_batch_size, num_epochs=num_epochs)


def _check_processes(global_batch_size: int) -> None:
  if global_batch_size % jax.process_count():
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} JAX processes; make it a multiple of "
                     f"{jax.process_count()}.")


def _epochs(ds: grain.MapDataset, *, seed: int, shuffle: bool,
            num_epochs: int | None) -> grain.MapDataset:
  if shuffle:
    # Before repeat, so each epoch is a full fresh permutation (repeat reseeds per epoch).
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs)


def _shared_batches(ds: grain.MapDataset, data_cfg, *, global_batch_size: int,
                    num_epochs: int | None) -> grain.IterDataset:
  """This process's share of each global batch of ``ds``, batched and read with data's options."""
  process_index, process_count = jax.process_index(), jax.process_count()
  if num_epochs is not None:
    # Drop the tail that cannot fill a global batch so every process yields the same number of
    # batches; otherwise one host would wait forever in a collective on the last step.
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
  # Strided rather than contiguous sharding: consecutive elements form one global batch.
  ds = ds[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  read_options = grain.ReadOptions(num_threads=data_cfg.num_threads,
                                   prefetch_buffer_size=data_cfg.prefetch)
  return ds.to_iter_dataset(read_options)


def checkpoint_args_save(it):
  """Returns the Orbax args that save the position of iterator `it` (use in ocp.args.Composite)."""
  return grain.checkpoint.CheckpointSave(it)


def checkpoint_args_restore(it):
  """Returns the Orbax args that restore a saved position into iterator `it`, in place."""
  return grain.checkpoint.CheckpointRestore(it)
