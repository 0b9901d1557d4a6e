"""Tests for train/data.py and train/make_arrayrecord.py."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from tests import restore_data_position
from train import data
from train import make_arrayrecord


def make_cfg(name="stdlib", path="", val_fraction=0.05):
  return ml_collections.ConfigDict(dict(name=name, path=str(path), val_fraction=val_fraction,
                                        num_threads=2, prefetch=4))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


def stdlib_dataset(seed=0, seq_len=16, global_batch_size=8, shuffle=True, num_epochs=None):
  return data.make_dataset(make_cfg(), split="train", seq_len=seq_len,
                           global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                           num_epochs=num_epochs)


@pytest.fixture
def tiny_corpus(tmp_path):
  """A folder of .py files with distinct contents, small enough for a few dozen windows."""
  root = tmp_path / "corpus"
  (root / "pkg").mkdir(parents=True)
  for i in range(8):
    (root / ("pkg" if i % 2 else "") / f"mod{i}.py").write_text(f"x{i} = {i * 1111}  # file {i}\n")
  return root


def test_encode_decode_roundtrip():
  text = "def f(x):\n  return 'héllo ✓'\n"
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert data.decode(ids) == text
  np.testing.assert_array_equal(data.encode(text.encode("utf-8")), ids)
  # Specials: EOS reads as a newline; PAD, BOS and ids of a padded vocab vanish.
  assert data.decode([data.BOS_ID, *data.encode("a"), data.EOS_ID, data.PAD_ID, 300, 98]) == "a\nb"


def test_same_seed_same_batches_and_different_seed_differs():
  first = take(iter(stdlib_dataset(seed=3)), 2)
  assert_batches_equal(first, take(iter(stdlib_dataset(seed=3)), 2))
  other = next(iter(stdlib_dataset(seed=4)))
  assert not np.array_equal(first[0]["inputs"], other["inputs"])


def test_stdlib_split_is_disjoint_nonempty_and_complete():
  root = data.default_stdlib_root()
  train = set(data.split_files(root, "train", 0.05))
  val = set(data.split_files(root, "val", 0.05))
  assert train and val and not train & val
  found = set()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
    found |= {os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
              for f in filenames if f.endswith(".py")}
  assert train | val == found
  # Roughly the requested fraction, since the hash is uniform.
  assert 0.02 < len(val) / len(found) < 0.1


def test_windows_shift_dtype_shape():
  seq_len, batch = 16, 8
  batch0 = next(iter(stdlib_dataset(seq_len=seq_len, global_batch_size=batch, shuffle=False)))
  for key in ("inputs", "targets"):
    assert batch0[key].shape == (batch, seq_len) and batch0[key].dtype == np.int32
  np.testing.assert_array_equal(batch0["inputs"][:, 1:], batch0["targets"][:, :-1])
  # Unshuffled window j is stream[j*L : j*L + L + 1].
  stream = data.token_stream(make_cfg(), "train")
  for j in range(batch):
    window = stream.read(j * seq_len, seq_len + 1)
    np.testing.assert_array_equal(batch0["inputs"][j], window[:-1])
    np.testing.assert_array_equal(batch0["targets"][j], window[1:])
  assert data.num_windows(make_cfg(), "train", seq_len) == (len(stream) - 1) // seq_len


def test_resume_from_state_continues_exactly():
  reference = iter(stdlib_dataset())
  take(reference, 3)
  state = reference.get_state()
  expected = take(reference, 2)
  resumed = iter(stdlib_dataset())
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected)


def test_resume_through_orbax_checkpoint_manager(tmp_path):
  it = iter(stdlib_dataset())
  take(it, 3)
  fresh = restore_data_position(tmp_path, it, iter(stdlib_dataset()), step=3)
  expected = take(it, 2)
  assert_batches_equal(take(fresh, 2), expected)


def test_epochs_cover_every_window_once_in_a_new_order(tiny_corpus):
  cfg, seq_len = make_cfg(path=tiny_corpus), 8
  windows = data.WindowSource(data.token_stream(cfg, "train"), seq_len)
  n = len(windows)
  assert n >= 8
  expected = sorted(windows[j]["inputs"].tobytes() for j in range(n))
  ds = data.make_dataset(cfg, split="train", seq_len=seq_len, global_batch_size=1, seed=0,
                         shuffle=True, num_epochs=2)
  seen = [b["inputs"][0].tobytes() for b in ds]
  assert len(seen) == 2 * n
  epoch1, epoch2 = seen[:n], seen[n:]
  assert sorted(epoch1) == expected and sorted(epoch2) == expected
  assert epoch1 != epoch2


def test_processes_split_each_global_batch(monkeypatch):
  whole = next(iter(stdlib_dataset(global_batch_size=4)))
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts.append(next(iter(stdlib_dataset(global_batch_size=4))))
  # Elements are dealt process_index::process_count, so process p holds rows p, p + 2.
  for index, part in enumerate(parts):
    assert part["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(part["inputs"], whole["inputs"][index::2])
  with pytest.raises(ValueError, match="not divisible by the 2 JAX processes"):
    stdlib_dataset(global_batch_size=3)


def test_too_few_windows_is_a_clear_error(tiny_corpus):
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_dataset(make_cfg(path=tiny_corpus), split="train", seq_len=8,
                      global_batch_size=1000, seed=0, shuffle=False, num_epochs=1)


def test_arrayrecord_stream_matches_encoded_docs(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  texts = {f"d{i:02d}/{'sub/' if i % 3 else ''}doc.txt": ("héllo ✓ " * i) + f"doc {i}\n"
           for i in range(12)}
  for rel, text in texts.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  (src / "ignored.md").write_text("not matched by the glob")
  val_fraction = 0.3
  meta = make_arrayrecord.convert(str(src), str(dst), glob="**/*.txt", chunk_len=7,
                                  num_shards=3, val_fraction=val_fraction)
  assert sorted(os.listdir(dst)) == sorted(
      ["metadata.json"] + [make_arrayrecord.shard_name(s, i, 3) for s in data.SPLITS
                           for i in range(3)] + [f"{s}-doc_starts.npy" for s in data.SPLITS])

  cfg = make_cfg(name="arrayrecord", path=dst, val_fraction=val_fraction)
  data.check_data_config(cfg)
  for split in data.SPLITS:
    # Documented order: sorted '/'-separated relative paths, split by data.split_of.
    docs = [texts[rel].encode() for rel in sorted(texts) if data.split_of(rel, val_fraction) == split]
    expected = data.concat_docs(docs)
    assert meta["splits"][split]["num_docs"] == len(docs)
    assert meta["splits"][split]["num_tokens"] == len(expected)
    stream = data.token_stream(cfg, split)
    np.testing.assert_array_equal(stream.read(0, len(expected)), expected)
    starts = np.load(dst / meta["splits"][split]["doc_starts"])
    np.testing.assert_array_equal(starts, np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]))
    # Random reads that straddle chunk (and so shard) boundaries.
    for start, length in [(5, 4), (6, 9), (13, 1), (len(expected) - 3, 10)]:
      np.testing.assert_array_equal(stream.read(start, length), expected[start:start + length])

  train = data.concat_docs([texts[r].encode() for r in sorted(texts)
                            if data.split_of(r, val_fraction) == "train"])
  seq_len = 5
  ds = data.make_dataset(cfg, split="train", seq_len=seq_len, global_batch_size=1, seed=0,
                         shuffle=False, num_epochs=1)
  batches = list(ds)
  assert len(batches) == data.num_windows(cfg, "train", seq_len) == (len(train) - 1) // seq_len
  got = np.concatenate([b["inputs"][0] for b in batches] + [batches[-1]["targets"][0][-1:]])
  np.testing.assert_array_equal(got, train[:len(got)])


@pytest.mark.parametrize("overrides, message", [
    (dict(name="imagenet"), r"data.name='imagenet' is unknown"),
    (dict(path="/no/such/folder"), r"data.path='/no/such/folder' does not exist"),
    (dict(val_fraction=0.0), r"val_fraction=0.0 must lie strictly between 0 and 1"),
    (dict(val_fraction=1.5), r"val_fraction=1.5 must lie strictly between 0 and 1"),
    (dict(name="arrayrecord"), r"needs data.path set to a shard folder"),
])
def test_check_data_config_messages(overrides, message):
  with pytest.raises(ValueError, match=message):
    data.check_data_config(make_cfg(**overrides))


def test_check_data_config_arrayrecord_folder(tmp_path):
  with pytest.raises(ValueError, match="has no metadata.json"):
    data.check_data_config(make_cfg(name="arrayrecord", path=tmp_path))
  (tmp_path / "metadata.json").write_text("{}")
  with pytest.raises(ValueError, match="has no .array_record shards"):
    data.check_data_config(make_cfg(name="arrayrecord", path=tmp_path))
