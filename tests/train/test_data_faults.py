"""Damaged data is one sentence naming the file or split, before the workdir exists: corrupt
images in a folder dataset, files that are not ArrayRecord shards, empty or too small splits."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests import run_module
from train import data, image_data, make_arrayrecord

REBUILD = "rewrite the dataset with `python -m train.make_arrayrecord --src=TEXT_DIR --dst=DIR`."
BATCHES = {"train": (2, "train.batch_size"), "val": (2, "eval.batch_size")}


def text_cfg(path, name="arrayrecord", val_fraction=0.05):
  return ml_collections.ConfigDict(dict(name=name, path=str(path), val_fraction=val_fraction,
                                        num_threads=0, prefetch=1))


def image_cfg(path, name="folder", val_fraction=0.3):
  return ml_collections.ConfigDict(dict(name=name, path=str(path), val_fraction=val_fraction,
                                        image_size=8, num_threads=0, prefetch=1))


def texts(root, names, val_fraction):
  """Text files ``names`` under ``root``; returns how many fall in the val split."""
  root.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    (root / name).write_text(f"document {i} " * 20)
  return sum(data.split_of(n, val_fraction) == "val" for n in names)


@pytest.fixture
def shards(tmp_path):
  """A make_arrayrecord dataset whose train and val splits both hold documents."""
  names = [f"doc{i}.txt" for i in range(12)]
  assert texts(tmp_path / "src", names, 0.3) >= 2
  make_arrayrecord.convert(str(tmp_path / "src"), str(tmp_path / "ds"), chunk_len=16,
                           num_shards=2, val_fraction=0.3)
  return tmp_path / "ds"


def check_text(path, seq_len=8):
  data.check_splits(text_cfg(path), seq_len=seq_len, batch_sizes=BATCHES)


def test_good_shards_pass(shards):
  check_text(shards)  # the baseline the faults below break
  assert len(data.token_stream(text_cfg(shards), "val")) > 16


@pytest.mark.parametrize("damage", ["text", "truncated", "empty"])
def test_shard_that_is_not_arrayrecord(shards, damage):
  shard = shards / "val-00001-of-00002.array_record"
  if damage == "text":  # reproduced: a text file renamed *.array_record
    shard.write_text("this is a plain text file\n" * 100)
  elif damage == "truncated":
    shard.write_bytes(shard.read_bytes()[:-40])
  else:
    shard.write_bytes(b"")
  with pytest.raises(ValueError) as info:
    check_text(shards)
  assert str(info.value) == (f"{shard} is not a readable ArrayRecord file (truncated, or not "
                             f"written as ArrayRecord); {REBUILD}")


def test_missing_shard(shards):
  shard = shards / "train-00000-of-00002.array_record"
  shard.unlink()
  with pytest.raises(ValueError, match=f"^ArrayRecord shard {shard} is missing; rewrite"):
    check_text(shards)


def test_shard_of_another_dataset(shards, tmp_path):
  """A readable shard holding other records than metadata.json promises (e.g. copied from
  another conversion) is named, with the counts."""
  from array_record.python.array_record_module import ArrayRecordWriter
  shard = shards / "train-00001-of-00002.array_record"
  writer = ArrayRecordWriter(str(shard), "group_size:1")
  writer.write(np.zeros(16, "<u2").tobytes())
  writer.close()
  with pytest.raises(ValueError, match=f"^{shard} holds 1 records, but metadata.json promises "
                     r"\d+ for it"):
    check_text(shards)


def test_shard_of_another_dtype(shards):
  meta = json.loads((shards / "metadata.json").read_text())
  meta["dtype"] = "uint32"
  (shards / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"train-00000-of-00002.array_record starts with a record "
                     r"of 32 bytes, but metadata.json promises 16 uint32 tokens \(64 bytes\)"):
    check_text(shards)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "could not be read as JSON"),
    ("[]", "is not the metadata of train.make_arrayrecord: it is not a JSON object"),
    ('{"dtype": "uint16", "chunk_len": 16, "splits": {}}', "splits.train lacks num_tokens"),
    ('{"dtype": "nonsense", "chunk_len": 16, "splits": {}}', "dtype 'nonsense' is not a numpy"),
])
def test_garbage_metadata(shards, content, expected):
  (shards / "metadata.json").write_text(content)
  with pytest.raises(ValueError) as info:
    check_text(shards)
  message = str(info.value)
  assert message.startswith(str(shards / "metadata.json")) and expected in message, message


def test_make_arrayrecord_refuses_an_empty_split(tmp_path):
  names = [n for n in (f"doc{i}.txt" for i in range(40)) if data.split_of(n, 0.05) == "train"]
  assert texts(tmp_path / "src", names[:6], 0.05) == 0
  with pytest.raises(ValueError, match=(
      rf"^none of the 6 files under --src='{tmp_path / 'src'}' falls in the 'val' split with "
      r"--val_fraction=0.05 \(files are split by a hash of their path\); raise --val_fraction "
      r"or add files\.$")):
    make_arrayrecord.convert(str(tmp_path / "src"), str(tmp_path / "ds"), val_fraction=0.05)
  assert not (tmp_path / "ds").exists()  # refused before anything was written
  proc = run_module("train.make_arrayrecord", f"--src={tmp_path / 'src'}",
                    f"--dst={tmp_path / 'ds'}", "--val_fraction=0.05", ok=False, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      f"odyssey: none of the 6 files under --src='{tmp_path / 'src'}' falls in the 'val' split "
      "with --val_fraction=0.05 (files are split by a hash of their path); raise --val_fraction "
      "or add files."], proc.stderr[-2000:]


def empty_val(ds):
  """``ds`` as an older converter left it when no file fell in val: empty val shards."""
  from array_record.python.array_record_module import ArrayRecordWriter
  meta = json.loads((ds / "metadata.json").read_text())
  for name in meta["splits"]["val"]["shards"]:
    ArrayRecordWriter(str(ds / name), "group_size:1").close()
  meta["splits"]["val"].update(num_docs=0, num_tokens=0, num_chunks=0)
  (ds / "metadata.json").write_text(json.dumps(meta))


def test_empty_val_split_of_arrayrecord(shards):
  empty_val(shards)
  with pytest.raises(ValueError) as info:
    check_text(shards)
  assert str(info.value) == (
      f"the 'val' split of data.path='{shards}' has 0 tokens (it is empty), 0 windows "
      "of train.seq_len=8, fewer than one batch of eval.batch_size=2; rewrite the dataset with "
      "another --val_fraction, or lower eval.batch_size.")


def test_too_small_split_of_a_text_folder(tmp_path):
  names = [f"m{i}.py" for i in range(30)]
  assert texts(tmp_path / "py", names, 0.3) >= 2
  cfg = text_cfg(tmp_path / "py", name="stdlib", val_fraction=0.3)
  data.check_splits(cfg, seq_len=8, batch_sizes=BATCHES)  # each split fills a batch of 2
  val_tokens = len(data.token_stream(cfg, "val"))
  assert data.split_tokens(cfg, "val") == val_tokens  # counted from file sizes, none read
  too_many = (val_tokens - 1) // 8 + 1
  with pytest.raises(ValueError, match=(
      rf"^the 'val' split of data.path='{tmp_path / 'py'}' has {val_tokens:,} tokens, "
      rf"{too_many - 1} windows of train.seq_len=8, fewer than one batch of "
      rf"eval.batch_size={too_many}; change data.val_fraction or add files, or lower "
      r"eval.batch_size\.$")):
    data.check_splits(cfg, seq_len=8, batch_sizes={"val": (too_many, "eval.batch_size")})


def image_folder(root, per_class=6, suffix="png"):
  for label in ("cat", "dog"):
    os.makedirs(root / label, exist_ok=True)
    for i in range(per_class):
      rng = np.random.default_rng(i)
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
          root / label / f"{i}.{suffix}")
  return root


def check_images(cfg, batches=None):
  image_data.check_splits(cfg, batches or {"train": (2, "train.batch_size"),
                                           "val": (1, "eval.batch_size")})


def test_good_image_folder_passes(tmp_path):
  check_images(image_cfg(image_folder(tmp_path / "img")))


@pytest.mark.parametrize("damage, detail", [
    ("truncated", "Truncated File Read"),
    ("text", "cannot identify image file"),
    ("empty", "cannot identify image file"),
])
def test_damaged_png_is_named_before_training(tmp_path, damage, detail):
  root = image_folder(tmp_path / "img")
  bad = root / "dog" / "3.png"
  if damage == "truncated":  # reproduced: OSError: image file is truncated, at eval, no name
    bad.write_bytes(bad.read_bytes()[:200])
  elif damage == "text":
    bad.write_text("not an image")
  else:
    bad.write_bytes(b"")
  with pytest.raises(ValueError) as info:
    check_images(image_cfg(root))
  message = str(info.value)
  assert message.startswith(f"image {bad} is damaged or not an image (") and detail in message
  assert message.endswith("; replace or remove it.")


def test_truncated_jpeg_is_named_when_decoded(tmp_path):
  """PIL's verify reads no JPEG data, so a JPEG cut short passes the check; its decode in the
  grain pipeline then names the file instead of PIL's bare 'image file is truncated'."""
  root = image_folder(tmp_path / "img", suffix="jpg")
  cfg = image_cfg(root, val_fraction=0.01)
  files = image_data.source(cfg, "train").files
  bad = root / files[0][0]
  bad.write_bytes(bad.read_bytes()[:-100])
  check_images(cfg, {"train": (2, "train.batch_size")})
  ds = image_data.make_dataset(cfg, split="train", global_batch_size=2, seed=0, shuffle=False,
                               num_epochs=1)
  with pytest.raises(ValueError, match=rf"^image {bad} could not be decoded \(image file is "
                     r"truncated.*\); replace or remove it\."):
    list(ds)


def test_empty_val_split_of_an_image_folder(tmp_path):
  root = image_folder(tmp_path / "img", per_class=2)
  cfg = image_cfg(root, val_fraction=0.01)
  assert len(image_data.source(cfg, "val")) == 0
  with pytest.raises(ValueError) as info:
    check_images(cfg)
  assert str(info.value) == (
      f"the 'val' split of data.path='{root}' has 0 images (it is empty), fewer than one batch "
      "of eval.batch_size=1; change data.val_fraction or add images, or lower eval.batch_size.")


def test_digits_split_smaller_than_a_batch():
  cfg = image_cfg("", name="digits")
  with pytest.raises(ValueError, match=r"^the 'val' split of data 'digits' has 360 images, "
                     r"fewer than one batch of eval.batch_size=400; the digits split is fixed"):
    check_images(cfg, {"train": (2, "train.batch_size"), "val": (400, "eval.batch_size")})


@pytest.fixture
def latents(tmp_path):
  x = np.zeros((3, 4, 4, 2), np.float16)
  for split in ("train", "val"):
    image_data.write_arrayrecord(str(tmp_path / "lat"), split, x, np.arange(3), num_classes=3)
  return tmp_path / "lat"


def test_image_shards_faults(latents):
  cfg = image_cfg(latents, name="arrayrecord")
  check_images(cfg)  # the baseline
  shard = latents / "val-00000-of-00001.array_record"
  shard.write_text("renamed text\n")
  with pytest.raises(ValueError, match=f"^{shard} is not a readable ArrayRecord file"):
    check_images(cfg)
  shard.unlink()  # no val shard at all: the split is empty
  with pytest.raises(ValueError, match=r"^the 'val' split of data.path='.*' has 0 images \(it is "
                     r"empty\), fewer than one batch of eval.batch_size=1; write val-\*"):
    check_images(cfg)


def test_image_records_of_another_shape(latents):
  cfg = image_cfg(latents, name="arrayrecord")
  meta = json.loads((latents / "metadata.json").read_text())
  (latents / "metadata.json").write_text(json.dumps({**meta, "shape": [8, 8, 2]}))
  with pytest.raises(ValueError, match=r"train-00000-of-00001.array_record holds records of 68 "
                     r"bytes, but metadata.json gives 260 \(a 4-byte label and a float16 array "
                     r"of shape \[8, 8, 2\]\)"):
    check_images(cfg)
  (latents / "metadata.json").write_text('{"shape": [4, 4, 2], "dtype": "float16"}')
  with pytest.raises(ValueError, match="does not hold a shape .*, a numpy dtype name and "
                     "num_classes"):
    check_images(cfg)


# The user's path: `python -m train` refuses before the workdir exists, without a traceback.
LM = ["--config=configs/lm.py:size=test", "--cpu_devices=1", "--config.train.seq_len=8",
      "--config.train.batch_size=2", "--config.eval.batch_size=2"]


def refused(tmp_path, *args) -> str:
  workdir = tmp_path / "run"
  proc = run_module("train", *args, f"--workdir={workdir}", ok=False, timeout=180)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not workdir.exists()
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("odyssey: "), proc.stderr[-3000:]
  return lines[0]


def test_cli_refuses_a_text_file_shard_and_an_empty_val_split(shards, tmp_path):
  shard = shards / "train-00000-of-00002.array_record"
  good = shard.read_bytes()
  shard.write_text("hello\n" * 50)
  line = refused(tmp_path, *LM, "--config.data.name=arrayrecord", f"--config.data.path={shards}")
  assert line == (f"odyssey: {shard} is not a readable ArrayRecord file (truncated, or not "
                  f"written as ArrayRecord); {REBUILD}")
  shard.write_bytes(good)
  empty_val(shards)
  line = refused(tmp_path, *LM, "--config.data.name=arrayrecord", f"--config.data.path={shards}")
  assert line == (f"odyssey: the 'val' split of data.path='{shards}' has 0 tokens (it is empty), "
                  "0 windows of train.seq_len=8, fewer than one batch of eval.batch_size=2; "
                  "rewrite the dataset with another --val_fraction, or lower eval.batch_size.")


def test_cli_refuses_a_corrupt_image(tmp_path):
  root = image_folder(tmp_path / "img")
  bad = root / "cat" / "1.png"
  bad.write_bytes(bad.read_bytes()[:150])
  line = refused(tmp_path, "--config=experiments/vit_digits.py", "--cpu_devices=8",
                 "--config.data.name=folder", f"--config.data.path={root}",
                 "--config.model.num_classes=2", "--config.model.channels=3",
                 "--config.train.batch_size=8", "--config.eval.batch_size=8")
  assert line.startswith(f"odyssey: image {bad} is damaged or not an image (")
