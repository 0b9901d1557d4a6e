"""Text corpora on disk as a sequence of documents: folders of text files, jsonl, parquet, Arrow.

``open_source(src, glob=..., text_field=...)`` checks what it can before anything is read (the
files exist, their kind is known, parquet/Arrow columns exist and hold text) and returns a
:class:`Source` whose ``documents()`` yields ``(key, document)`` in a fixed order: files in sorted
order of their '/'-separated relative paths, rows in file order. The key decides a document's
train/val split (``split_of``): a text file's relative path (so a folder splits as
it always has), ``"REL:ROW"`` for row ROW (0-based; a jsonl's line) of a record file. Every fault
is a ValueError of one sentence naming the file (and line).
"""

import json
import os
import pathlib
import zlib

RECORD_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
SPLITS = ("train", "val")


def split_of(relpath: str, val_fraction: float) -> str:
  """Returns "val" or "train" for a document, from the crc32 of its key (for a file, its
  '/'-separated relative path)."""
  val = zlib.crc32(relpath.encode("utf-8")) % 1000 < round(val_fraction * 1000)
  return "val" if val else "train"


class Source:
  """The documents of ``files``: [(relative path, absolute path, kind)] with kind "text",
  "jsonl", "parquet" or "arrow"."""

  def __init__(self, src: str, files: list[tuple[str, str, str]], text_field: str, glob: str):
    self.src, self.files, self.text_field, self.glob = src, files, text_field, glob
    self.kinds = sorted({kind for _, _, kind in files})

  def documents(self):
    """Yields (split key, text or bytes) for every document; bytes for text files (raw)."""
    for rel, path, kind in self.files:
      if kind == "text":
        yield rel, _read_bytes(path)
        continue
      rows = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "arrow": _arrow_rows}[kind]
      for row, text in enumerate(rows(path, self.text_field)):
        yield f"{rel}:{row}", text


def open_source(src: str, *, glob: str = "", text_field: str = "text") -> Source:
  """The source at ``src`` (a file or folder) or one sentence saying why it cannot be read."""
  if not src or not os.path.exists(src):
    raise ValueError(f"--src={src!r} does not exist.")
  if os.path.isfile(src):
    kind = RECORD_KINDS.get(pathlib.Path(src).suffix)
    if kind is None:
      raise ValueError(f"--src={src} has an unknown extension; give a .jsonl, .parquet or .arrow "
                       "file, or a folder (of text files, or of those).")
    files = [(os.path.basename(src), os.path.abspath(src), kind)]
  else:
    glob = glob or _default_glob(src)
    root = pathlib.Path(src)
    rels = sorted(p.relative_to(root).as_posix() for p in root.glob(glob) if p.is_file())
    if not rels:
      raise ValueError(f"No file under --src={src!r} matches --glob={glob!r}.")
    files = [(r, str(root / r), RECORD_KINDS.get(pathlib.PurePath(r).suffix, "text"))
             for r in rels]
  for _, path, kind in files:
    if kind in ("parquet", "arrow"):
      _check_column(path, kind, text_field)
  return Source(src, files, text_field, glob)


def _default_glob(src: str) -> str:
  """A folder's record files when it has any (jsonl before parquet before Arrow), else its text."""
  for ext in RECORD_KINDS:
    if any(pathlib.Path(src).glob(f"**/*{ext}")):
      return f"**/*{ext}"
  return "**/*.txt"


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ValueError(f"{path} could not be read ({e.strerror}).") from None


def jsonl_lines(path: str):
  """(line number, parsed row) of each non-blank line of a jsonl file, or one sentence naming the
  file (unreadable) or the line (not JSON). Every jsonl reader of odyssey reads through it: text
  sources, SFT rows (train/sft_data.py), multiple-choice tasks (train/multiple_choice.py)."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise ValueError(f"{path} could not be read ({e.strerror}).") from None
  with f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} line {number} is not valid JSON ({e}); fix or remove that "
                         "line.") from None
      yield number, row


def _jsonl_rows(path: str, field: str):
  """The ``field`` string of each non-blank line of a jsonl file."""
  for number, row in jsonl_lines(path):
    if not isinstance(row, dict) or field not in row:
      fields = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
      raise ValueError(f"{path} line {number} has no field {field!r} (it has {fields or 'none'})"
                       "; name the text field with --text_field.")
    if not isinstance(row[field], str):
      raise ValueError(f"{path} line {number}: field {field!r} holds "
                       f"{type(row[field]).__name__}, not text; name the text field with "
                       "--text_field.")
    yield row[field]


def _arrow_schema(path: str, kind: str):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    if kind == "parquet":
      return pq.ParquetFile(path).schema_arrow
    return _open_arrow(path).schema
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} is not a readable {kind} file ({str(e)[:200]}).") from None


def _open_arrow(path: str):
  """A reader of an Arrow IPC file: the stream format (what datasets.save_to_disk writes) or
  the random-access file format."""
  import pyarrow as pa
  try:
    return pa.ipc.open_stream(pa.memory_map(path))
  except pa.ArrowInvalid:
    return pa.ipc.open_file(pa.memory_map(path))


def _check_column(path: str, kind: str, field: str) -> None:
  import pyarrow as pa
  schema = _arrow_schema(path, kind)
  if field not in schema.names:
    raise ValueError(f"{path} has no column {field!r} (it has {', '.join(map(repr, schema.names))})"
                     "; name the text column with --text_field.")
  column_type = schema.field(field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
          or pa.types.is_string_view(column_type)):
    raise ValueError(f"column {field!r} of {path} holds {column_type}, not text; name the text "
                     "column with --text_field.")


def _batch_texts(batch, path: str, field: str):
  for text in batch.column(field).to_pylist():
    if text is None:
      raise ValueError(f"column {field!r} of {path} has a null row; drop or fill it.")
    yield text


def _parquet_rows(path: str, field: str):
  import pyarrow.parquet as pq
  for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
    yield from _batch_texts(batch, path, field)


def _arrow_rows(path: str, field: str):
  reader = _open_arrow(path)
  if hasattr(reader, "num_record_batches"):  # the file format: batches by index
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
  else:
    batches = reader
  for batch in batches:
    yield from _batch_texts(batch, path, field)
