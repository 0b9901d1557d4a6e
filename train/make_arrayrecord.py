"""Turns a text corpus into ArrayRecord shards of tokenized data.

  python -m train.make_arrayrecord --src=SRC --dst=OUT [--glob='**/*.txt'] [--text_field=text]
      [--tokenizer=byte|PATH] [--num_proc=N] [--chunk_len=4096] [--num_shards=4]
      [--val_fraction=0.05] [--dtype=uint16|uint32]

SRC is a folder of text files (each file one document), a .jsonl file (one document per line, its
--text_field), a .parquet or .arrow file (the --text_field column), a folder of those, or a
`datasets.save_to_disk` folder (train/text_sources.py). Documents are taken in a fixed order and
split into train/val by `train.text_sources.split_of` of their key (a text file's relative path, the same
rule as the stdlib corpus; "FILE:ROW" for a row of a record file). Each document is tokenized
with --tokenizer (train/tokenizer.py; in --num_proc processes, the output the same for any number)
and followed by the tokenizer's EOS. Each split becomes one stream, cut into chunks of --chunk_len
tokens (the last may be shorter) stored as little-endian records; chunk c goes to shard
c % num_shards, so shards are written while streaming. The token offset where each document
starts is stored in `{split}-doc_starts.npy` (int64). OUT then holds
`{split}-0000i-of-0000n.array_record`, the doc_starts files and `metadata.json`; train with
data.name="arrayrecord", data.path=OUT and the same data.tokenizer.
"""

import collections
import json
import multiprocessing
import os
import pathlib
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np

from train import text_sources
from train import tokenizer as tokenizer_lib

_SRC = flags.DEFINE_string("src", None, "Text source: a folder of text files, a .jsonl, .parquet "
                           "or .arrow file or folder of them, or a datasets.save_to_disk folder.")
_DST = flags.DEFINE_string("dst", None, "Empty (or new) folder for the shards and metadata.json.")
_GLOB = flags.DEFINE_string("glob", "", "Files under a --src folder, e.g. '**/*.py' (default: its "
                            ".jsonl, .parquet or .arrow files if it has any, else '**/*.txt').")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text",
                                  "The jsonl field or parquet/Arrow column holding the text.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "byte, a tokenizer.json or a SentencePiece "
                                 ".model (train with `python -m train.tokenizer`).")
_NUM_PROC = flags.DEFINE_integer("num_proc", min(os.cpu_count() or 1, 4),
                                 "Tokenizer processes; the output does not depend on it.")
_CHUNK_LEN = flags.DEFINE_integer("chunk_len", 4096, "Tokens per record.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 4, "ArrayRecord files per split.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.05,
                                   "Fraction of documents (by a hash of their key) for val.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["uint16", "uint32"], "Token storage type (default: "
                           "uint16, or uint32 for vocabularies above 65536).")
# Documents per task sent to a tokenizer process, and tasks in flight per process.
_BATCH_DOCS = 64
_IN_FLIGHT = 4

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


def convert(src: str, dst: str, *, glob: str = "", text_field: str = "text",
            tokenizer: str = "byte", chunk_len: int = 4096, num_shards: int = 4,
            val_fraction: float = 0.05, dtype: str | None = None, num_proc: int = 1,
            progress: bool = False) -> dict:
  """Writes the shards, doc_starts and metadata.json of `src` into `dst`; returns the metadata.

  Nothing is left in `dst` when the source turns out bad midway (a jsonl line, an empty split):
  everything is written into a folder inside it and moved into place at the end.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"--val_fraction={val_fraction} must lie strictly between 0 and 1.")
  if chunk_len < 2 or num_shards < 1 or num_proc < 1:
    raise ValueError(f"--chunk_len={chunk_len} must be >= 2, --num_shards={num_shards} >= 1 and "
                     f"--num_proc={num_proc} >= 1.")
  tok = tokenizer_lib.load(tokenizer)
  dtype = _storage_dtype(dtype, tok)
  if tok.eos_id is None:
    raise ValueError(f"tokenizer {tokenizer} has no end-of-sequence token, which separates the "
                     "documents of a stream; give one that has.")
  source = text_sources.open_source(src, glob=glob, text_field=text_field)
  if source.kinds == ["text"]:  # the split of every document is known before reading any
    _check_splits_filled([rel for rel, _, _ in source.files], src, val_fraction)
  dst_path = pathlib.Path(dst)
  if dst_path.is_dir() and any(n == "metadata.json" or n.endswith(".array_record")
                               for n in os.listdir(dst_path)):
    # Refuse rather than delete: stale shards of another run would silently mix into this one.
    raise ValueError(f"--dst={dst!r} already holds a dataset; choose an empty folder.")
  created = not dst_path.exists()
  partial = dst_path / f".partial-{os.getpid()}"
  partial.mkdir(parents=True)
  try:
    splits = _write_splits(source, tokenizer, tok, partial, chunk_len=chunk_len,
                           num_shards=num_shards, dtype=np.dtype(dtype).newbyteorder("<"),
                           val_fraction=val_fraction, num_proc=num_proc, progress=progress)
    for name in sorted(os.listdir(partial)):
      os.replace(partial / name, dst_path / name)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
    if created and dst_path.is_dir() and not os.listdir(dst_path):
      dst_path.rmdir()
  metadata = {
      "vocab": tok.name, "vocab_size": tok.vocab_size, "dtype": dtype,
      "byte_order": "little", "chunk_len": chunk_len, "num_shards": num_shards,
      "layout": "chunk c of a split is record c // num_shards of shard c % num_shards",
      "glob": source.glob, "val_fraction": val_fraction, "splits": splits,
      "tokenizer": {"name": tok.name, "spec": tokenizer, "vocab_size": tok.vocab_size,
                    "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
      "source": {"src": os.path.abspath(src), "kinds": source.kinds, "text_field": text_field},
      "documents": "each document is followed by eos_id; {split}-doc_starts.npy holds the "
                   "token offset where each document starts in its split's stream",
  }
  # Written last, so a folder with metadata.json is a complete dataset.
  (dst_path / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  return metadata


def _storage_dtype(dtype: str | None, tok) -> str:
  if dtype is None:
    return "uint16" if tok.vocab_size <= 65536 else "uint32"
  if np.iinfo(dtype).max < tok.vocab_size - 1:
    raise ValueError(f"--dtype={dtype} cannot hold the {tok.vocab_size} ids of tokenizer "
                     f"{tok.name}; use --dtype=uint32.")
  return dtype


def _check_splits_filled(files, src: str, val_fraction: float) -> None:
  """Training evaluates on val; an empty split would only fail later, after a run has started."""
  for split, fix in (("train", "lower"), ("val", "raise")):
    if not any(text_sources.split_of(f, val_fraction) == split for f in files):
      raise ValueError(f"none of the {len(files)} files under --src={src!r} falls in the "
                       f"{split!r} split with --val_fraction={val_fraction} (files are split by "
                       f"a hash of their path); {fix} --val_fraction or add files.")


def _write_splits(source, spec: str, tok, out: pathlib.Path, *, chunk_len: int, num_shards: int,
                  dtype: np.dtype, val_fraction: float, num_proc: int, progress: bool) -> dict:
  """Streams every document's tokens into its split's shards; returns metadata's "splits"."""
  names = {s: [shard_name(s, i, num_shards) for i in range(num_shards)] for s in text_sources.SPLITS}
  writers = {s: _ChunkWriter([out / n for n in names[s]], chunk_len, dtype) for s in text_sources.SPLITS}
  starts = {s: [] for s in text_sources.SPLITS}
  num_tokens = dict.fromkeys(text_sources.SPLITS, 0)
  keyed = ((text_sources.split_of(key, val_fraction), doc) for key, doc in source.documents())
  try:
    for split, tokens in _tokenized(keyed, spec, tok, dtype, num_proc, progress,
                                    total=len(source.files) if source.kinds == ["text"] else None):
      starts[split].append(num_tokens[split])
      writers[split].add(tokens)
      num_tokens[split] += len(tokens)
  finally:
    for writer in writers.values():
      writer.close()
  num_docs = sum(map(len, starts.values()))
  if not num_docs:
    raise ValueError(f"--src={source.src!r} holds no documents; give a source with text.")
  for split, fix in (("train", "lower"), ("val", "raise")):
    if not starts[split]:
      raise ValueError(f"none of the {num_docs} documents of --src={source.src!r} falls in the "
                       f"{split!r} split with --val_fraction={val_fraction} (documents are split "
                       f"by a hash of their key); {fix} --val_fraction or add documents.")
  splits = {}
  for split in text_sources.SPLITS:
    np.save(out / f"{split}-doc_starts.npy", np.asarray(starts[split], np.int64))
    splits[split] = {"num_docs": len(starts[split]), "num_tokens": num_tokens[split],
                     "num_chunks": writers[split].num_chunks, "shards": names[split],
                     "doc_starts": f"{split}-doc_starts.npy"}
    logging.info("%s: %d docs, %d tokens, %d chunks", split, len(starts[split]),
                 num_tokens[split], writers[split].num_chunks)
  return splits


_WORKER_TOKENIZER = None


def _init_worker(spec: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizer_lib.load(spec)


def _encode_batch(batch, tok=None, dtype=np.uint16):
  """[(split, tokens + EOS as `dtype`)] of [(split, document)]."""
  tok = tok or _WORKER_TOKENIZER
  return [(split, np.append(tok.encode_doc(doc), tok.eos_id).astype(dtype))
          for split, doc in batch]


def _batches(keyed, size: int):
  batch = []
  for item in keyed:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _tokenized(keyed, spec: str, tok, dtype, num_proc: int, progress: bool, total: int | None):
  """Yields (split, tokens) in document order, tokenized in ``num_proc`` processes (ordered
  results, so the output does not depend on the number), with a progress bar of documents."""
  from tqdm import tqdm
  bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr)
  with bar:
    if num_proc == 1:
      for batch in _batches(keyed, _BATCH_DOCS):
        yield from _encode_batch(batch, tok, dtype)
        bar.update(len(batch))
      return
    # forkserver, not fork: a process that has started JAX's (or the tokenizers') threads must
    # not fork; the server imports this module once and forks the workers from a clean state.
    context = multiprocessing.get_context("forkserver")
    with context.Pool(num_proc, _init_worker, (spec,)) as pool:
      pending = collections.deque()
      for batch in _batches(keyed, _BATCH_DOCS):
        pending.append(pool.apply_async(_encode_batch, (batch, None, dtype)))
        while len(pending) >= num_proc * _IN_FLIGHT:  # bounded: the corpus need not fit in memory
          done = pending.popleft().get()
          bar.update(len(done))
          yield from done
      while pending:
        done = pending.popleft().get()
        bar.update(len(done))
        yield from done


def main(argv):
  del argv
  try:
    metadata = convert(_SRC.value, _DST.value, glob=_GLOB.value, text_field=_TEXT_FIELD.value,
                       tokenizer=_TOKENIZER.value, chunk_len=_CHUNK_LEN.value,
                       num_shards=_NUM_SHARDS.value, val_fraction=_VAL_FRACTION.value,
                       dtype=_DTYPE.value, num_proc=_NUM_PROC.value, progress=True)
  except ValueError as e:  # Bad flags or source: one sentence, no traceback (the usage is --help).
    sys.exit(f"odyssey: {e}")
  counts = ", ".join(f"{s} {info['num_docs']:,} docs / {info['num_tokens']:,} tokens"
                     for s, info in metadata["splits"].items())
  print(f"odyssey: wrote {_DST.value} ({metadata['vocab']}): {counts}.", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
