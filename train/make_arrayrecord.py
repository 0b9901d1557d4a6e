"""Turns a folder of text files into ArrayRecord shards of byte-tokenized data.

  python -m train.make_arrayrecord --src=DIR --dst=OUT [--glob='**/*.txt'] [--chunk_len=4096]
      [--num_shards=4] [--val_fraction=0.05] [--dtype=uint16]

Files matching --glob under --src are taken in sorted order of their '/'-separated relative
paths and split into train/val by file with `train.data.split_of` (the same rule as the stdlib
corpus). Each split becomes one stream doc0 EOS doc1 EOS ..., cut into chunks of --chunk_len
tokens (the last may be shorter) stored as little-endian records; chunk c goes to shard
c % num_shards, so shards are written while streaming. OUT then holds
`{split}-0000i-of-0000n.array_record` and `metadata.json`; train with data.name="arrayrecord",
data.path=OUT.
"""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np

from train import data

_SRC = flags.DEFINE_string("src", None, "Folder of text files to convert.")
_DST = flags.DEFINE_string("dst", None, "Empty (or new) folder for the shards and metadata.json.")
_GLOB = flags.DEFINE_string("glob", "**/*.txt", "Pattern of files under --src, e.g. '**/*.py'.")
_CHUNK_LEN = flags.DEFINE_integer("chunk_len", 4096, "Tokens per record.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 4, "ArrayRecord files per split.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.05, "Fraction of files (by path hash) for val.")
_DTYPE = flags.DEFINE_enum("dtype", "uint16", ["uint16", "uint32"],
                           "Token storage type; uint32 only for vocabularies above 65536.")


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the file name of one shard."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


class _ChunkWriter:
  """Cuts an incoming token stream into chunk_len records dealt round-robin over shards."""

  def __init__(self, paths, chunk_len: int, dtype: np.dtype):
    # group_size:1 makes every record individually addressable, which grain needs for speed.
    self._writers = [ArrayRecordWriter(str(p), "group_size:1") for p in paths]
    self._chunk_len = chunk_len
    self._dtype = dtype
    self._pending = []
    self._num_pending = 0
    self.num_chunks = 0

  def add(self, tokens: np.ndarray) -> None:
    self._pending.append(tokens.astype(self._dtype))
    self._num_pending += len(tokens)
    if self._num_pending < self._chunk_len:
      return
    flat = np.concatenate(self._pending)
    num_full = len(flat) // self._chunk_len
    for i in range(num_full):
      self._write(flat[i * self._chunk_len:(i + 1) * self._chunk_len])
    rest = flat[num_full * self._chunk_len:]
    self._pending, self._num_pending = [rest], len(rest)

  def close(self) -> None:
    if self._num_pending:
      self._write(np.concatenate(self._pending))
    for writer in self._writers:
      writer.close()

  def _write(self, chunk: np.ndarray) -> None:
    self._writers[self.num_chunks % len(self._writers)].write(chunk.tobytes())
    self.num_chunks += 1


def convert(src: str, dst: str, *, glob: str = "**/*.txt", chunk_len: int = 4096,
            num_shards: int = 4, val_fraction: float = 0.05, dtype: str = "uint16") -> dict:
  """Writes the shards and metadata.json of `src` into `dst`; returns the metadata."""
  src_path, dst_path = pathlib.Path(src), pathlib.Path(dst)
  if not src_path.is_dir():
    raise ValueError(f"--src={src!r} does not exist or is not a folder.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"--val_fraction={val_fraction} must lie strictly between 0 and 1.")
  if chunk_len < 2 or num_shards < 1:
    raise ValueError(f"--chunk_len={chunk_len} must be >= 2 and --num_shards={num_shards} >= 1.")
  files = sorted(p.relative_to(src_path).as_posix() for p in src_path.glob(glob) if p.is_file())
  if not files:
    raise ValueError(f"No file under --src={src!r} matches --glob={glob!r}.")
  for split, fix in (("train", "lower"), ("val", "raise")):
    # Training evaluates on val; an empty split would only fail later, after a run has started.
    if not any(data.split_of(f, val_fraction) == split for f in files):
      raise ValueError(f"none of the {len(files)} files under --src={src!r} falls in the "
                       f"{split!r} split with --val_fraction={val_fraction} (files are split by "
                       f"a hash of their path); {fix} --val_fraction or add files.")
  if dst_path.is_dir() and any(n == "metadata.json" or n.endswith(".array_record")
                               for n in os.listdir(dst_path)):
    # Refuse rather than delete: stale shards of another run would silently mix into this one.
    raise ValueError(f"--dst={dst!r} already holds a dataset; choose an empty folder.")
  dst_path.mkdir(parents=True, exist_ok=True)

  np_dtype = np.dtype(dtype).newbyteorder("<")
  splits = {}
  for split in data.SPLITS:
    split_files = [f for f in files if data.split_of(f, val_fraction) == split]
    names = [shard_name(split, i, num_shards) for i in range(num_shards)]
    writer = _ChunkWriter([dst_path / n for n in names], chunk_len, np_dtype)
    num_tokens = 0
    for rel in split_files:
      doc = np.append(data.encode((src_path / rel).read_bytes()), data.EOS_ID)
      writer.add(doc)
      num_tokens += len(doc)
    writer.close()
    splits[split] = {"num_docs": len(split_files), "num_tokens": num_tokens,
                     "num_chunks": writer.num_chunks, "shards": names}
    logging.info("%s: %d docs, %d tokens, %d chunks", split, len(split_files), num_tokens,
                 writer.num_chunks)

  metadata = {
      "vocab": data.VOCAB_NAME, "vocab_size": data.BYTE_VOCAB, "dtype": dtype,
      "byte_order": "little", "chunk_len": chunk_len, "num_shards": num_shards,
      "layout": "chunk c of a split is record c // num_shards of shard c % num_shards",
      "glob": glob, "val_fraction": val_fraction, "splits": splits,
  }
  # Written last, so a folder with metadata.json is a complete dataset.
  (dst_path / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  return metadata


def main(argv):
  del argv
  try:
    convert(_SRC.value, _DST.value, glob=_GLOB.value, chunk_len=_CHUNK_LEN.value,
            num_shards=_NUM_SHARDS.value, val_fraction=_VAL_FRACTION.value, dtype=_DTYPE.value)
  except ValueError as e:  # Bad flags or source: one sentence, no traceback (the usage is --help).
    sys.exit(f"odyssey: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
