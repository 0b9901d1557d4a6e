"""train/image_packing.py and the native-size folder pipeline (data.native_size=True): sizes
fitted to data.max_size and the patch grid, first-fit-decreasing rows that fill >= 90% of their
tokens on a folder of mixed-size PNGs, the grain batches' layout, and one sentence for settings
that cannot pack."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from nets import vit
from train import image_data, image_packing


def make_folder(root, per_class=40, classes=3, seed=0, low=6, high=48):
  """PNGs of random heights and widths in [low, high) pixels, ``per_class`` per class."""
  rng = np.random.default_rng(seed)
  for c in range(classes):
    os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(per_class):
      h, w = rng.integers(low, high, 2)
      pixels = (rng.random((h, w, 3)) * 80 + c * 80).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, f"class{c}", f"{i}.png"))
  return str(root)


def data_cfg(path, **kw):
  return ml_collections.ConfigDict({**dict(
      name="folder", path=path, val_fraction=0.2, image_size=0, num_threads=0, prefetch=2,
      native_size=True, max_size=32, seq_len=128, max_images=8), **kw})


def model_cfg(**kw):
  return vit.Config.from_config({**dict(
      name="vit", variant="digits", image_size=32, channels=3, patch_size=4, num_classes=3,
      pool="gap", posemb="factorized"), **kw})


def test_fit_size_keeps_aspect_and_rounds_to_patches():
  assert image_packing.fit_size(100, 50, 4, 32) == (32, 16)  # downscaled, aspect kept
  assert image_packing.fit_size(11, 21, 4, 32) == (12, 20)  # rounded to the patch grid
  assert image_packing.fit_size(1, 300, 4, 32) == (4, 32)  # at least one patch
  assert image_packing.fit_size(32, 32, 4, 32) == (32, 32)


def test_first_fit_decreasing_respects_both_limits():
  lengths = [60, 50, 40, 30, 20, 10, 5, 5, 5, 5, 5]
  rows = image_packing.pack_rows(lengths, 64, 3)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 64 and len(row) <= 3 for row in rows)
  assert rows[0][0] == 0  # decreasing: the longest opens the first row
  with pytest.raises(ValueError, match="does not fit one packed row"):
    image_packing.pack_rows([65], 64, 3)


def test_packer_fills_at_least_90_percent_on_a_mixed_size_folder(tmp_path):
  d, m = data_cfg(make_folder(tmp_path / "imgs")), model_cfg()
  for split in ("train", "val"):
    src = image_data.packed_source(d, split, m, seed=0)
    lengths = [image_packing.num_tokens(size, 4) for size in src.sizes]
    assert len(set(src.sizes)) > 10  # many shapes, most not square
    used = image_packing.fill(src.rows, lengths, d.seq_len)
    print(f"{split}: {len(src.files)} images in {len(src)} rows, fill {used:.1%}")
    assert used >= 0.9, used
    assert sorted(i for row in src.rows for i in row) == list(range(len(src.files)))


def test_grain_batches_of_packed_rows(tmp_path):
  d, m = data_cfg(make_folder(tmp_path / "imgs")), model_cfg()
  ds = image_data.make_packed_dataset(d, m, split="train", global_batch_size=4, seed=0,
                                      shuffle=True, num_epochs=None)
  batch = next(iter(ds))
  assert batch["patches"].shape == (4, 128, 48) and batch["positions"].shape == (4, 128, 2)
  assert batch["labels"].shape == batch["image_mask"].shape == (4, 8)
  for r in range(4):
    seg = batch["segment_ids"][r]
    count = int(batch["image_mask"][r].sum())
    assert set(np.unique(seg)) - {0} == set(range(1, count + 1))
    assert (np.diff(seg[seg > 0]) >= 0).all()  # each image contiguous, padding at the end
    assert np.abs(batch["patches"][r][seg > 0]).max() <= 1.0
    assert (batch["patches"][r][seg == 0] == 0).all()


@pytest.mark.parametrize("change, match", [
    (dict(seq_len=32), "data.seq_len=32 tokens cannot hold one image of data.max_size=32"),
    (dict(max_size=30), "data.max_size=30 must be a positive multiple of model.patch_size=4"),
    (dict(max_size=-4), "data.max_size=-4 must be a positive multiple"),
    (dict(max_size=64), "at most model.image_size=32"),
    (dict(max_images=0), "data.max_images=0 must be a positive integer"),
    (dict(name="digits"), "use data.name='folder'"),
])
def test_bad_native_settings_are_one_sentence(tmp_path, change, match):
  d = data_cfg(make_folder(tmp_path / "imgs", per_class=4), **change)
  with pytest.raises(ValueError, match=match):
    image_data.check_native(d, model_cfg(), {"train": (1, "train.batch_size")}, seed=0)


def test_a_split_that_cannot_fill_a_batch_of_rows(tmp_path):
  d = data_cfg(make_folder(tmp_path / "imgs", per_class=4))
  with pytest.raises(ValueError, match="fewer than one batch of train.batch_size=64 rows"):
    image_data.check_native(d, model_cfg(), {"train": (64, "train.batch_size")}, seed=0)


@pytest.mark.parametrize("kind, change, match", [
    ("vit", dict(pool="token"), "set model.pool='gap'"),
    ("udit", {}, "data.native_size=True trains model 'dit'"),
])
def test_models_that_cannot_read_packed_rows_are_refused_by_validate(tmp_path, kind, change,
                                                                    match):
  from configs import diffusion, vit as vit_config
  from train.validate import validate
  if kind == "vit":
    c = vit_config.get_config("variant=digits")
    c.model.update(image_size=32, channels=3, patch_size=4, num_classes=3, **change)
  else:
    c = diffusion.get_config("model=udit,variant=digits")
    c.model.update(input_size=32, in_channels=3, num_classes=3)
  c.data.update(name="folder", path=make_folder(tmp_path / "imgs", per_class=8),
                native_size=True, max_size=32, seq_len=128, max_images=8)
  c.train.batch_size = c.eval.batch_size = 1
  c.mesh.update(data=1)
  with pytest.raises(ValueError, match=match):
    validate(c, num_devices=1)
