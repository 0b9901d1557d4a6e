"""Input pipeline: byte tokenizer, token streams, and the grain dataset the loop iterates.

A corpus is one flat token stream: each document's bytes followed by EOS_ID. Two backends:
  * "stdlib": every .py file of the running Python's standard library (or of `data.path`),
    loaded into memory. Needs no download, so every config runs anywhere.
  * "arrayrecord": shards written by `python -m train.make_arrayrecord`, read by random access.
Train/val are split by file with a hash of the relative path, so the split is identical on every
machine and does not move when files are added elsewhere in the tree. For "arrayrecord" the split
was fixed by the converter's --val_fraction (recorded in metadata.json); data.val_fraction is unused.
"""

import functools
import json
import os
import sysconfig
import zlib

import grain
import jax
import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB = 259
VOCAB_NAME = "byte259"

KNOWN_DATASETS = ("stdlib", "arrayrecord")
SPLITS = ("train", "val")
# Third-party code is not part of the standard library; caches hold no .py sources worth training on.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# ----------------------------------------------------------------------------- tokenizer


def encode(text: str | bytes) -> np.ndarray:
  """Returns the byte ids (0..255) of `text` (utf-8 for str) as int32; no specials added."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Returns the text of `ids`: EOS becomes a newline, PAD/BOS and ids >= BYTE_VOCAB are dropped."""
  # Ids past BYTE_VOCAB can be sampled when the model's vocab is padded; they carry no text.
  ids = np.asarray(ids, np.int64).reshape(-1)
  ids = np.where(ids == EOS_ID, ord("\n"), ids)
  kept = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
  return kept.tobytes().decode("utf-8", errors="replace")


def concat_docs(docs, dtype=np.uint16) -> np.ndarray:
  """Returns the flat stream doc0 EOS doc1 EOS ... of byte strings `docs`."""
  out = np.empty(sum(len(d) + 1 for d in docs), dtype)
  pos = 0
  for doc in docs:
    out[pos:pos + len(doc)] = np.frombuffer(doc, np.uint8)
    out[pos + len(doc)] = EOS_ID
    pos += len(doc) + 1
  return out


def split_of(relpath: str, val_fraction: float) -> str:
  """Returns "val" or "train" for a file, from the crc32 of its '/'-separated relative path."""
  val = zlib.crc32(relpath.encode("utf-8")) % 1000 < round(val_fraction * 1000)
  return "val" if val else "train"


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
def _stdlib_tokens(root: str, split: str, val_fraction: float) -> np.ndarray:
  docs = []
  for rel in split_files(root, split, val_fraction):
    try:
      with open(os.path.join(root, rel), "rb") as f:
        docs.append(f.read())
    except OSError:  # Permission-denied or dangling files are not worth failing a run for.
      continue
  tokens = concat_docs(docs)
  tokens.flags.writeable = False  # Shared by every caller through the cache.
  return tokens


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


class ArrayRecordStream:
  """A token stream stored as fixed-size chunk records in ArrayRecord shards.

  Chunk c of a split is record c // num_shards of shard c % num_shards (the converter deals
  chunks round-robin so it can stream); only the last chunk may be shorter than chunk_len.
  """

  def __init__(self, path: str, split: str):
    with open(os.path.join(path, "metadata.json")) as f:
      meta = json.load(f)
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
  if data_cfg.name not in KNOWN_DATASETS:
    raise ValueError(f"data.name={data_cfg.name!r} is unknown; use one of {KNOWN_DATASETS}.")
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={data_cfg.val_fraction} must lie strictly between 0 and 1.")
  if data_cfg.path and not os.path.isdir(data_cfg.path):
    raise ValueError(f"data.path={data_cfg.path!r} does not exist or is not a folder.")
  if data_cfg.name == "arrayrecord":
    how = "write one with `python -m train.make_arrayrecord --src=TEXT_DIR --dst=DIR`"
    if not data_cfg.path:
      raise ValueError(f"data.name='arrayrecord' needs data.path set to a shard folder; {how}.")
    if not os.path.isfile(os.path.join(data_cfg.path, "metadata.json")):
      raise ValueError(f"data.path={data_cfg.path!r} has no metadata.json; {how}.")
    if not any(n.endswith(".array_record") for n in os.listdir(data_cfg.path)):
      raise ValueError(f"data.path={data_cfg.path!r} has no .array_record shards; {how}.")


def token_stream(data_cfg, split: str) -> ArrayStream | ArrayRecordStream:
  """Returns the token stream of `split` ("train" or "val")."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}.")
  if data_cfg.name == "arrayrecord":
    return ArrayRecordStream(data_cfg.path, split)
  root = os.path.realpath(data_cfg.path) if data_cfg.path else default_stdlib_root()
  return ArrayStream(_stdlib_tokens(root, split, float(data_cfg.val_fraction)))


class WindowSource:
  """grain random-access source of LM windows: element j covers stream[j*L : j*L + L + 1]."""

  def __init__(self, stream, seq_len: int):
    self.stream = stream
    self.seq_len = seq_len

  def __len__(self) -> int:
    return max(len(self.stream) - 1, 0) // self.seq_len

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range for {len(self)} windows")
    window = self.stream.read(index * self.seq_len, self.seq_len + 1).astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}

  def __repr__(self) -> str:  # grain logs the source; keep the token array out of it.
    return f"WindowSource(num_windows={len(self)}, seq_len={self.seq_len})"


def num_windows(data_cfg, split: str, seq_len: int) -> int:
  """Returns the number of seq_len windows in one epoch of `split`."""
  return len(WindowSource(token_stream(data_cfg, split), seq_len))


def make_dataset(data_cfg, *, split: str, seq_len: int, global_batch_size: int, seed: int,
                 shuffle: bool, num_epochs: int | None) -> grain.IterDataset:
  """Returns this process's batches {"inputs", "targets": int32[local_b, seq_len]} of `split`."""
  check_data_config(data_cfg)
  source = WindowSource(token_stream(data_cfg, split), seq_len)
  if len(source) < global_batch_size:
    raise ValueError(f"The {split!r} split of data {data_cfg.name!r} has {len(source)} windows of "
                     f"seq_len={seq_len}, fewer than one batch of {global_batch_size}.")
  return batched(source, data_cfg, global_batch_size=global_batch_size, seed=seed,
                 shuffle=shuffle, num_epochs=num_epochs)


def batched(source, data_cfg, *, global_batch_size: int, seed: int, shuffle: bool,
            num_epochs: int | None) -> grain.IterDataset:
  """The grain pipeline every dataset shares: shuffle -> repeat -> this process's share -> batch."""
  process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{process_count} JAX processes; make it a multiple of {process_count}.")
  ds = grain.MapDataset.source(source)
  if shuffle:
    # Before repeat, so each epoch is a full fresh permutation (repeat reseeds per epoch).
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
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
