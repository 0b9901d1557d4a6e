"""Tests for train/caption_data.py: the digit caption canvases, their held-out rule and the cells."""

import ml_collections
import numpy as np
import pytest

from train import caption_data as cd
from train import tokenizer
from train import image_data


def cfg(name="digit_captions", image_size=0, **kw):
  return ml_collections.ConfigDict(dict(name=name, path="", image_size=image_size, val_fraction=0.1,
                                        num_threads=0, prefetch=2, **kw))


def test_caption_names_each_digit_its_size_and_place_in_reading_order():
  layout = np.full(9, cd.EMPTY)
  sizes = np.zeros(9, int)
  layout[[0, 8]], sizes[[0, 8]] = [3, 7], [1, 2]
  assert cd.caption_for(layout, sizes) == "a small 3 at the top left and a large 7 at the bottom right"
  layout[8], sizes[8] = cd.EMPTY, 0
  layout[4], sizes[4] = 0, 2
  assert cd.caption_for(layout, sizes) == "a small 3 at the top left and a large 0 in the center"
  with pytest.raises(ValueError, match="not a canvas"):
    cd.caption_for(np.full(9, cd.EMPTY), np.zeros(9, int))


def test_records_match_their_layout_pixels_and_caption():
  """Each digit is painted in its cell at its size; empty cells are background; the text ids
  decode to the caption of the layout; labels is the first digit."""
  src = image_data.source(cfg(text_len=64), "val")
  small, large, labels, _ = cd._digit_split("val")
  for i in range(40):
    r = src[i]
    layout, sizes = r["layout"], r["sizes"]
    assert r["images"].shape == (48, 48, 1) and r["images"].dtype == np.float32
    assert tokenizer.byt5_text(r["text_ids"]) == cd.caption_for(layout, sizes)
    np.testing.assert_array_equal(r["text_mask"], r["text_ids"] != 0)
    assert r["text_ids"][r["text_mask"].sum() - 1] == tokenizer.BYT5_EOS
    assert int(r["labels"]) == layout[layout != cd.EMPTY][0]
    assert ((layout == cd.EMPTY) == (sizes == 0)).all() and 1 <= (sizes > 0).sum() <= 2
    cells = cd.cells(r["images"][None])[0, ..., 0]
    for c in range(9):
      if layout[c] == cd.EMPTY:
        assert (cells[c] == -1).all()
      elif sizes[c] == 1:  # an 8x8 digit of that class from the test digits, centred
        assert (cells[c][:4] == -1).all() and (cells[c][:, 12:] == -1).all()
        match = (small == cells[c][4:12, 4:12]).all(axis=(1, 2))
        assert match.any() and set(labels[match]) == {layout[c]}
      else:
        match = (large == cells[c]).all(axis=(1, 2))
        assert match.any() and set(labels[match]) == {layout[c]}


def test_generation_is_deterministic_and_splits_use_disjoint_digits():
  a, b = cd.CaptionSource("train", 64), cd.CaptionSource("train", 64)
  for i in (0, 7, 99_999):
    for k in ("images", "text_ids", "layout", "sizes"):
      np.testing.assert_array_equal(a[i][k], b[i][k])
  assert not np.array_equal(a[0]["images"], a[1]["images"])
  assert cd.layout_of("train", 5, seed=1)[0].tolist() != cd.layout_of("train", 5)[0].tolist() or \
      cd.layout_of("train", 6, seed=1)[0].tolist() != cd.layout_of("train", 6)[0].tolist()
  train_digits, test_digits = cd._digit_split("train")[0], cd._digit_split("val")[0]
  assert len(train_digits) == 1437 and len(test_digits) == 360
  flat = lambda x: {im.tobytes() for im in x}
  assert not flat(train_digits) & flat(test_digits) - {np.full((8, 8), -1, np.float32).tobytes()}
  assert [len(image_data.source(cfg(text_len=64), s)) for s in cd.SPLITS] == [100_000, 2000, 2000]


def _elements(layout, sizes):
  return [(int(layout[c]), c, int(sizes[c])) for c in range(9) if layout[c] != cd.EMPTY]


def test_heldout_rule_new_combinations_of_seen_elements():
  """No train or val canvas holds a held-out pair; every heldout canvas does; every (digit, cell,
  size) of heldout appears in train, alone and in other pairs."""
  held = set(cd.pairs()[True])
  assert 0.07 < len(held) / 3600 < 0.13 and len(cd.pairs()[False]) + len(held) == 3600
  train_elements, train_pairs = set(), set()
  for split in ("train", "val"):
    for i in range(3000):
      layout, sizes, _ = cd.layout_of(split, i)
      e = _elements(layout, sizes)
      if len(e) == 2:
        pair = tuple((d, c) for d, c, _ in e)
        assert pair not in held and not cd.is_heldout(pair)
        if split == "train":
          train_pairs.add(pair)
      if split == "train":
        train_elements.update(e)
  assert len(train_elements) == 180  # every digit in every cell at both sizes
  heldout_elements = set()
  for i in range(500):
    layout, sizes, _ = cd.layout_of("heldout", i)
    e = _elements(layout, sizes)
    assert len(e) == 2 and tuple((d, c) for d, c, _ in e) in held
    heldout_elements.update(e)
  assert heldout_elements <= train_elements
  seen_in_pairs = {x for p in train_pairs for x in p}
  assert {(d, c) for d, c, _ in heldout_elements} <= seen_in_pairs
  # The rule does not depend on which digit is named first.
  p = next(iter(held))
  assert cd.is_heldout(p[::-1])


def test_text_len_bounds_every_caption():
  longest = 0
  for (d1, c1), (d2, c2) in cd._all_pairs():
    layout, sizes = np.full(9, cd.EMPTY), np.zeros(9, int)
    layout[[c1, c2]], sizes[[c1, c2]] = [d1, d2], 2
    longest = max(longest, len(cd.caption_for(layout, sizes).encode()) + 1)
  assert longest == cd.max_text_ids() == 63
  with pytest.raises(ValueError, match=r"data.text_len=32 is shorter than the longest caption"):
    image_data.check_image_config(cfg(text_len=32))
  with pytest.raises(ValueError, match=r"data.image_size=64 must be in \[1, 48\]"):
    image_data.check_image_config(cfg(text_len=64, image_size=64))
  small = image_data.source(cfg(text_len=64, image_size=16), "val")[0]["images"]
  assert small.shape == (16, 16, 1) and small.min() >= -1.0 and small.max() > 0.0
  with pytest.raises(ValueError, match=r"needs data.text_len"):
    image_data.source(cfg(), "train")
  with pytest.raises(ValueError, match="more than 4"):
    cd.caption_ids("héllo", 4)
  ids = cd.caption_ids("héllo", 10)
  assert ids.tolist() == [107, 198, 172, 111, 111, 114, 1, 0, 0, 0]  # utf-8 + 3, EOS, PAD
  assert tokenizer.byt5_text(ids) == "héllo"


def test_cells_dataset_classes_and_batches():
  c = cfg("digit_cells")
  assert image_data.num_classes(c) == 11 and image_data.image_shape(c) == (16, 16, 1)
  train, val = image_data.source(c, "train"), image_data.source(c, "val")
  assert (len(train), len(val)) == (2 * 1437 + 287, 2 * 360 + 72)
  counts = np.bincount([int(val[i]["labels"]) for i in range(len(val))], minlength=11)
  assert counts[cd.EMPTY] == 72 and counts[:10].sum() == 720 and counts.min() > 50
  empty = np.stack([val[i]["images"] for i in range(720, 792)])  # faint noise on the background
  assert empty.min() >= -1.0 and empty.max() < 0.0 and -0.95 < empty.mean() < -0.8
  it = image_data.make_dataset(c, split="val", global_batch_size=72, seed=0, shuffle=False,
                               num_epochs=1)
  batches = list(it)
  assert len(batches) == 11 and batches[0]["images"].shape == (72, 16, 16, 1)
  with pytest.raises(ValueError, match="'heldout' of 'digit_cells'"):
    image_data.source(c, "heldout")


def test_caption_batches_through_the_image_pipeline():
  it = image_data.make_dataset(cfg(text_len=64), split="train", global_batch_size=8, seed=0,
                               shuffle=True, num_epochs=None)
  b = next(iter(it))
  assert b["images"].shape == (8, 48, 48, 1) and b["text_ids"].shape == (8, 64)
  assert b["layout"].shape == (8, 9) and b["text_mask"].dtype == bool


def test_word_ids_are_the_tokenizers_wordlevel_vocabulary_and_bound_every_caption():
  # PAD, EOS and UNK as ByT5's, then the 23 words a caption can hold, sorted.
  assert cd.WORDS == tuple(sorted(set(cd.WORDS))) and len(cd.WORDS) == 23
  assert cd.WORD_VOCAB == 26
  text = "a large 3 at the top left and a small 7 in the center"
  want = [3 + cd.WORDS.index(w) for w in text.split()] + [1, 0]
  assert cd.caption_ids(text, 16, "words").tolist() == want
  ids, mask = cd.caption_batch([text, "a small 0 on the left"], 16, "words")
  assert ids.shape == (2, 16) and mask.sum(1).tolist() == [15, 7]
  longest = 0
  for (d1, c1), (d2, c2) in cd._all_pairs():
    layout, sizes = np.full(9, cd.EMPTY), np.zeros(9, int)
    layout[[c1, c2]], sizes[[c1, c2]] = [d1, d2], 2
    longest = max(longest, len(cd.caption_ids(cd.caption_for(layout, sizes), 16, "words")
                               .nonzero()[0]))
  assert longest == cd.max_text_ids("words") == 16  # the EOS (1) counted, PAD (0) not
  with pytest.raises(ValueError, match=r"words outside the 'words' caption vocabulary \('seven'"):
    cd.caption_ids("a large seven in the center", 16, "words")
  with pytest.raises(ValueError, match="takes 17 word ids with its EOS, more than 16"):
    cd.caption_ids(" ".join(["a"] * 16), 16, "words")
  with pytest.raises(ValueError, match=r"data.caption_tokens='bpe' is not one of"):
    cd.caption_ids(text, 16, "bpe")


def test_word_caption_records_and_config_errors():
  c = cfg(text_len=16, caption_tokens="words")
  byte = image_data.source(cfg(text_len=64), "val")[3]
  word = image_data.source(c, "val")[3]
  np.testing.assert_array_equal(word["images"], byte["images"])  # the same canvas
  assert cd.caption_ids(cd.caption_for(word["layout"], word["sizes"]), 16, "words").tolist() \
      == word["text_ids"].tolist()
  assert word["text_mask"].tolist() == (word["text_ids"] != 0).tolist()
  with pytest.raises(ValueError, match=r"data.text_len=15 is shorter than the longest caption "
                     r"of 'digit_captions' \(16 word ids"):
    image_data.check_image_config(cfg(text_len=15, caption_tokens="words"))
  with pytest.raises(ValueError, match=r"data.caption_tokens='bpe' is not one of"):
    image_data.check_image_config(cfg(text_len=64, caption_tokens="bpe"))
