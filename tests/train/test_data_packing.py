"""train/data.py with data.packing="documents": segment ids, per-document positions and the masked
boundary targets on a stream with known EOS positions, through the grain pipeline (with resume)."""

import ml_collections
import numpy as np
import pytest

from tests import restore_data_position
from train import data

EOS, PAD = data.EOS_ID, data.PAD_ID


def test_document_fields_on_known_boundaries():
  #            0  1  2    3  4    5    6  7  8  9
  window = np.array([10, 11, EOS, 20, EOS, EOS, 30, 31, 32, EOS, 40], np.int32)
  f = data.document_fields(window[:-1], window[1:])
  # The token after an EOS starts a new segment; an EOS belongs to the document it ends (an empty
  # document is a lone EOS).
  np.testing.assert_array_equal(f["segment_ids"], [1, 1, 1, 2, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(f["positions"], [0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(f["inputs"], window[:-1])
  # No loss where the target is the first token of the next document (inputs[t] == EOS).
  np.testing.assert_array_equal(f["targets"], [11, EOS, PAD, EOS, PAD, PAD, 31, 32, EOS, PAD])
  for v in f.values():
    assert v.dtype == np.int32


def _corpus(tmp_path, sizes):
  root = tmp_path / "corpus"
  root.mkdir()
  for i, n in enumerate(sizes):
    (root / f"m{i}.py").write_bytes(bytes([97 + i]) * n)
  return ml_collections.ConfigDict(dict(name="stdlib", path=str(root), val_fraction=0.05,
                                        num_threads=0, prefetch=1))


def _dataset(cfg, packing, seq_len=8):
  cfg.packing = packing
  return data.make_dataset(cfg, split="train", seq_len=seq_len, global_batch_size=2, seed=0,
                           shuffle=True, num_epochs=None)


def test_pipeline_batches_carry_the_fields_and_resume(tmp_path):
  cfg = _corpus(tmp_path, [3, 9, 1, 6, 12, 4, 7, 5])
  stream = data.token_stream(cfg, "train").tokens.astype(np.int32)
  it = iter(_dataset(cfg, "documents"))
  batches = [next(it) for _ in range(3)]
  assert set(batches[0]) == {"inputs", "targets", "segment_ids", "positions"}
  for b in batches:
    for row in range(2):
      # Every row is one window of the stream: recompute its fields from there.
      j = next(j for j in range(len(stream) // 8)
               if np.array_equal(stream[8 * j:8 * j + 8], b["inputs"][row]))
      want = data.document_fields(stream[8 * j:8 * j + 8], stream[8 * j + 1:8 * j + 9])
      for k, v in want.items():
        np.testing.assert_array_equal(b[k][row], v, err_msg=k)
  # "none" is today's batch: the same windows, raw targets, no packing fields.
  plain = next(iter(_dataset(cfg, "none")))
  assert set(plain) == {"inputs", "targets"}
  np.testing.assert_array_equal(plain["inputs"], batches[0]["inputs"])

  # The fields come from the window alone, so the iterator checkpoint resumes them exactly.
  it = iter(_dataset(cfg, "documents"))
  next(it)
  fresh = restore_data_position(tmp_path, it, iter(_dataset(cfg, "documents")))
  for want in batches[1:]:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_unknown_packing_is_one_sentence(tmp_path):
  cfg = _corpus(tmp_path, [30, 30])
  with pytest.raises(ValueError, match=r"data.packing='docs' is not one of \('none', 'documents'\)"):
    _dataset(cfg, "docs")
