"""train.make_arrayrecord's sources (folders of text files, jsonl, parquet, Arrow as
datasets.save_to_disk writes it) and tokenizers: the shards decode back to the documents, split
by their keys, with document starts in doc_starts; the output does not depend on --num_proc; bad
input is one sentence naming the file and leaves nothing behind."""

import json
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import run_module
from train import data, make_arrayrecord, tokenizer

VAL = 0.3
DOCS = [f"doc {i}: " + "héllo wörld ✓ " * (i % 4) + f"def f{i}(x):\n    return x * {i}\n"
        for i in range(24)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  return tokenizer.train_bpe(DOCS, 300, str(out))


def write_folder(root):
  for i, doc in enumerate(DOCS):
    (root / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
    (root / f"part{i % 3}" / f"doc{i:02d}.txt").write_text(doc)
  return root, sorted((p.relative_to(root).as_posix(), p.read_text()) for p in root.glob("**/*.txt"))


def write_jsonl(root):
  root.mkdir()
  with open(root / "docs.jsonl", "w") as f:
    for i, doc in enumerate(DOCS):
      f.write(json.dumps({"id": i, "text": doc}) + "\n")
  return root / "docs.jsonl", [(f"docs.jsonl:{i}", d) for i, d in enumerate(DOCS)]


def write_parquet(root):
  root.mkdir()
  pq.write_table(pa.table({"id": list(range(24)), "body": DOCS}), root / "docs.parquet",
                 row_group_size=5)
  return root / "docs.parquet", [(f"docs.parquet:{i}", d) for i, d in enumerate(DOCS)]


def write_save_to_disk(root):
  """The layout of datasets.Dataset.save_to_disk: Arrow IPC streams plus two JSON files."""
  root.mkdir()
  table = pa.table({"text": DOCS, "id": list(range(24))})
  names = []
  for shard, rows in enumerate((slice(0, 10), slice(10, 24))):
    names.append(f"data-{shard:05d}-of-00002.arrow")
    with pa.ipc.new_stream(root / names[-1], table.schema) as writer:
      writer.write_table(table[rows], max_chunksize=4)
  (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
  (root / "dataset_info.json").write_text("{}")
  keys = [f"{names[0]}:{i}" for i in range(10)] + [f"{names[1]}:{i}" for i in range(14)]
  return root, list(zip(keys, DOCS))


SOURCES = {"folder": (write_folder, {}), "jsonl": (write_jsonl, {}),
           "parquet": (write_parquet, {"text_field": "body"}), "arrow": (write_save_to_disk, {})}


def decoded_split(dst, meta, split, tok):
  cfg = ml_collections.ConfigDict(dict(name="arrayrecord", path=str(dst), val_fraction=VAL,
                                       tokenizer=tok.path or "byte", num_threads=0, prefetch=1))
  data.check_data_config(cfg)
  stream = data.token_stream(cfg, split)
  tokens = stream.read(0, len(stream))
  starts = np.load(dst / meta["splits"][split]["doc_starts"]).tolist() + [len(tokens)]
  docs = [tokens[a:b] for a, b in zip(starts[:-1], starts[1:])]
  assert all(d[-1] == tok.eos_id for d in docs)
  return [tok.decode(d[:-1]) for d in docs]


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("tok_spec", ["byte", "bpe"])
def test_each_source_converts_and_its_shards_decode_to_the_documents(tmp_path, kind, tok_spec,
                                                                     bpe):
  write, kwargs = SOURCES[kind]
  src, keyed = write(tmp_path / "src")
  tok = tokenizer.load("byte") if tok_spec == "byte" else bpe
  meta = make_arrayrecord.convert(str(src), str(tmp_path / "dst"), tokenizer=tok.path or "byte",
                                  chunk_len=64, num_shards=2, val_fraction=VAL, **kwargs)
  assert meta["vocab"] == meta["tokenizer"]["name"] == tok.name
  assert meta["source"]["kinds"] == ["text" if kind == "folder" else kind]
  for split in data.SPLITS:
    want = [doc for key, doc in keyed if data.split_of(key, VAL) == split]
    assert want and decoded_split(tmp_path / "dst", meta, split, tok) == want
  if tok_spec == "bpe":  # a stream of another vocabulary is refused in one sentence
    cfg = ml_collections.ConfigDict(dict(name="arrayrecord", path=str(tmp_path / "dst"),
                                         val_fraction=VAL, tokenizer="byte"))
    with pytest.raises(ValueError, match=f"was tokenized with '{tok.name}' .*but data.tokenizer="
                                         "'byte' is 'byte259'; set --config.data.tokenizer"):
      data.check_data_config(cfg)


def test_the_output_is_the_same_for_any_number_of_processes(tmp_path, bpe):
  src, _ = write_jsonl(tmp_path / "src")
  outs = []
  for num_proc in (1, 2):
    outs.append(tmp_path / f"dst{num_proc}")
    make_arrayrecord.convert(str(src), str(outs[-1]), tokenizer=bpe.path, chunk_len=16,
                             num_shards=3, val_fraction=VAL, num_proc=num_proc)
  names = sorted(os.listdir(outs[0]))
  assert names == sorted(os.listdir(outs[1])) and len(names) == 9
  for name in names:
    assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def bad_jsonl(root, lines):
  root.mkdir()
  (root / "a.jsonl").write_text("".join(line + "\n" for line in lines))
  return root / "a.jsonl"


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda r: bad_jsonl(r, ['{"text": "a"}', '{"body": "b"}']), {},
     "{src} line 2 has no field 'text' (it has 'body'); name the text field with --text_field."),
    (lambda r: bad_jsonl(r, ['{"text": "a"}', "", '{"text": "b",']), {},
     "{src} line 3 is not valid JSON"),
    (lambda r: bad_jsonl(r, ['{"text": 3}']), {},
     "{src} line 1: field 'text' holds int, not text; name the text field with --text_field."),
    (lambda r: bad_jsonl(r, []), {},
     "--src='{src}' holds no documents; give a source with text."),
    (lambda r: write_parquet(r)[0], {"text_field": "id"},
     "column 'id' of {src} holds int64, not text; name the text column with --text_field."),
    (lambda r: write_parquet(r)[0], {},
     "{src} has no column 'text' (it has 'id', 'body'); name the text column with --text_field."),
    (lambda r: (r.mkdir(), r / "notes.csv", (r / "notes.csv").write_text("a,b"))[1], {},
     "--src={src} has an unknown extension; give a .jsonl, .parquet or .arrow file"),
    (lambda r: bad_jsonl(r, ['{"text": "only one"}']), {},
     "none of the 1 documents of --src='{src}' falls in the 'train' split"),
])
def test_bad_input_is_one_sentence_naming_the_file_and_leaves_nothing(tmp_path, make, kwargs,
                                                                      message):
  src = make(tmp_path / "src")
  with pytest.raises(ValueError) as e:
    make_arrayrecord.convert(str(src), str(tmp_path / "dst"), val_fraction=0.99 if
                             "train' split" in message else VAL, **kwargs)
  assert str(e.value).startswith(message.format(src=src)), str(e.value)
  assert not (tmp_path / "dst").exists()


def test_the_cli_prints_one_sentence_with_the_line_number(tmp_path):
  src = bad_jsonl(tmp_path / "src", ['{"text": "a"}', "{oops"])
  (tmp_path / "dst").mkdir()
  proc = run_module("train.make_arrayrecord", f"--src={src}", f"--dst={tmp_path / 'dst'}",
                    "--num_proc=2", timeout=120, ok=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"odyssey: {src} line 2 is not valid JSON"), proc.stderr[-2000:]
  assert os.listdir(tmp_path / "dst") == []
