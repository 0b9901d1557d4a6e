"""Image input pipeline: the embedded digits set and folders of users' images, through grain.

Every source yields {"images": float32 [H, W, C] in [-1, 1], "labels": int32}; the grain pipeline
(shuffle with the seed, a fresh permutation each epoch -> repeat -> this process's share ->
batch) is the same one train/data.py uses for text.
  * "digits" (embedded default): the 8x8 handwritten digits that ship inside scikit-learn (1,797
    images, 10 classes; no download). Fixed split: every image whose index % 5 == 0 is test
    (360 images), the rest train (1,437). Optionally resized to 16x16 (``data.image_size``).
  * "folder": ``data.path/<class name>/*.png|jpg|jpeg``; classes are the sorted subfolder names,
    ``data.val_fraction`` of each class's files (by a hash of the file name) form the val split.
  * "digit_captions", "digit_cells": canvases of digits with captions, and the cells a reader
    classifies (train/caption_data.py; "digit_captions" also has a "heldout" split).
  * "arrayrecord": pre-encoded arrays, e.g. VAE latents for DiT on ImageNet:
    ``data.path/{train,val}-*.array_record`` whose records are a little-endian int32 label followed
    by the raw array, and ``metadata.json`` = {"shape": [H, W, C], "dtype": "float16",
    "num_classes": N}. ``write_arrayrecord`` writes that layout.

Native sizes (``data.native_size=True``, "folder" only; ViT classification and DiT): images keep
their size and aspect ratio (downscaled to ``data.max_size`` on the longer side when larger, sides
rounded to multiples of the patch size) and are packed, several per row, into rows of
``data.seq_len`` patch tokens with at most ``data.max_images`` images each
(train/image_packing.py). The rows are formed once per split (first-fit-decreasing over the
seeded shuffle, sizes read from the file headers); the grain pipeline then shuffles and batches
rows exactly as it does images, so a batch is ``train.batch_size`` rows.

``check_splits`` (called by the image tasks' check, before the workdir is touched) refuses a split
that cannot fill one batch, a folder image whose header or PNG data is damaged
(``PIL.Image.verify``: it reads each file but decodes no pixels), and shards that are not
ArrayRecord files or whose records are not the size metadata.json gives. A JPEG cut short is only
found when decoded; ``FolderSource`` then names the file.
"""

import functools
import importlib.util
import json
import os
import zlib

import grain
import numpy as np
from PIL import Image

from train import caption_data, data, image_packing

KNOWN = ("digits", "folder", "arrayrecord") + caption_data.KNOWN
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAYRECORD_HOW = ("an 'arrayrecord' image dataset is a folder written by "
                   "train.image_data.write_arrayrecord")


def check_image_config(data_cfg) -> None:
  """One sentence for a data config that cannot produce images, before anything compiles."""
  if data_cfg.name not in KNOWN:
    raise ValueError(f"data.name={data_cfg.name!r} is not an image dataset; use one of {KNOWN}.")
  caption_data.check_config(data_cfg)
  if data_cfg.name == "folder":
    if not data_cfg.path or not os.path.isdir(data_cfg.path):
      raise ValueError(f"data.path={data_cfg.path!r} does not exist or is not a folder of class "
                       "subfolders with images.")
    if not _folder_index(os.path.realpath(data_cfg.path))[1]:
      raise ValueError(f"data.path={data_cfg.path!r} has no class subfolders with "
                       f"{'/'.join(IMAGE_SUFFIXES)} files.")
  if data_cfg.name == "arrayrecord":
    if not data_cfg.path or not os.path.isfile(os.path.join(data_cfg.path, "metadata.json")):
      raise ValueError(f"data.path={data_cfg.path!r} has no metadata.json; {ARRAYRECORD_HOW}.")
    _metadata(data_cfg)
  if data_cfg.image_size not in (0, 8, 16, 32) and data_cfg.name == "digits":
    raise ValueError(f"data.image_size={data_cfg.image_size} must be 8, 16 or 32 for digits "
                     "(0 keeps 8).")


def digits_file() -> str:
  """The 1,797 sklearn digits as scikit-learn ships them (``load_digits`` reads the same file):
  one row per image, 64 pixel values 0..16 then the label. Found without importing scikit-learn,
  whose import (about 0.9 s, most of a run's imports) every digits run would otherwise pay."""
  spec = importlib.util.find_spec("sklearn")
  root = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
  path = os.path.join(root, "datasets", "data", "digits.csv.gz")
  if not root or not os.path.isfile(path):
    raise FileNotFoundError("the digits dataset ships with scikit-learn (a dependency of "
                            f"odyssey), and {path if root else 'scikit-learn'} is missing; "
                            "reinstall with make install.")
  return path


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
  rows = np.loadtxt(digits_file(), delimiter=",")
  images = rows[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
  if size and size != 8:
    images = np.stack([_resize(im, size) for im in images])
  images = images[..., None]
  images.flags.writeable = False
  return images, rows[:, -1].astype(np.int32)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  pil = Image.fromarray(image.astype(np.float32), mode="F")
  return np.asarray(pil.resize((size, size), Image.BILINEAR), np.float32)


@functools.lru_cache(maxsize=4)
def _folder_index(root: str):
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = []
  for label, name in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, name))):
      if f.lower().endswith(IMAGE_SUFFIXES):
        files.append((os.path.join(name, f), label))
  return tuple(classes), tuple(files)


class ArraySource:
  """Random-access (image, label) pairs held in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    i = i.__index__()
    return {"images": self.images[i], "labels": self.labels[i]}


class ArrayRecordSource:
  """Records of (int32 label, raw array) from ArrayRecord shards, decoded on demand."""

  def __init__(self, root: str, split: str):
    self.meta = _read_metadata(root)
    self.root, self.split = root, split
    shards = _shards(root, split)
    self._source = grain.sources.ArrayRecordDataSource(shards) if shards else []
    self._dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
    self.record_bytes = _record_bytes(self.meta)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    i = i.__index__()
    record = self._source[i]
    if len(record) != self.record_bytes:
      raise ValueError(f"record {i} of the {self.split!r} split in {self.root} has {len(record)} "
                       f"bytes, but metadata.json gives {self.record_bytes} (a 4-byte label and "
                       f"a {self.meta['dtype']} array of shape {self.meta['shape']}).")
    label = np.frombuffer(record[:4], "<i4")[0]
    image = np.frombuffer(record[4:], self._dtype).reshape(self.meta["shape"])
    return {"images": image.astype(np.float32), "labels": np.int32(label)}


def write_arrayrecord(path: str, split: str, images: np.ndarray, labels: np.ndarray,
                      num_classes: int, dtype: str = "float16"):
  """Writes (label, array) records of ``split`` and metadata.json: the "arrayrecord" layout."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(path, exist_ok=True)
  writer = ArrayRecordWriter(os.path.join(path, f"{split}-00000-of-00001.array_record"),
                             "group_size:1")
  for image, label in zip(images, labels):
    writer.write(np.int32(label).astype("<i4").tobytes()
                 + np.asarray(image, np.dtype(dtype).newbyteorder("<")).tobytes())
  writer.close()
  with open(os.path.join(path, "metadata.json"), "w") as f:
    json.dump({"shape": list(images.shape[1:]), "dtype": dtype, "num_classes": num_classes}, f)


class FolderSource:
  """Random-access images decoded from files on demand (resized to size x size, RGB)."""

  def __init__(self, root: str, files, size: int):
    self.root, self.files, self.size = root, files, size

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i):
    rel, label = self.files[i.__index__()]
    path = os.path.join(self.root, rel)
    try:
      with Image.open(path) as im:
        im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        image = np.asarray(im, np.float32) / 127.5 - 1.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      # PIL names no file ("image file is truncated"); the user needs to know which one.
      raise data.DataError(f"image {path} could not be decoded ({e}); replace or remove it.") from None
    return {"images": image, "labels": np.int32(label)}


def native(data_cfg) -> bool:
  """``data.native_size`` (False for a config.json written before the field existed)."""
  return bool(data_cfg.get("native_size", False))


def max_size(data_cfg, model_cfg) -> int:
  """``data.max_size``, 0 meaning model.image_size."""
  return data_cfg.max_size or model_cfg.image_size


def check_native(data_cfg, model_cfg, batch_sizes: dict[str, tuple[int, str]],
                 seed: int) -> None:
  """One sentence for native-size settings that cannot work, before anything compiles;
  ``batch_sizes`` as ``check_splits``'s (a batch is that many packed rows), ``seed`` the run's
  (the rows it packs are the ones counted)."""
  if data_cfg.name != "folder":
    raise ValueError(f"data.native_size=True packs images of a folder; use data.name='folder' "
                     f"(got {data_cfg.name!r}).")
  p, side = model_cfg.patch_size, max_size(data_cfg, model_cfg)
  if side <= 0 or side % p or side > model_cfg.image_size:
    raise ValueError(f"data.max_size={side} must be a positive multiple of model.patch_size={p} "
                     f"and at most model.image_size={model_cfg.image_size} (the position grid).")
  for name in ("seq_len", "max_images"):
    value = data_cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"data.{name}={value!r} must be a positive integer with "
                       "data.native_size=True.")
  if (side // p) ** 2 > data_cfg.seq_len:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} tokens cannot hold one image of "
                     f"data.max_size={side} pixels ({(side // p) ** 2} patches of "
                     f"{p}x{p}); raise data.seq_len or lower data.max_size.")
  if model_cfg.channels != 3:
    raise ValueError(f"model.channels={model_cfg.channels} but folder images are read as RGB "
                     "(3 channels).")
  for split, (batch, field) in batch_sizes.items():
    rows = len(packed_source(data_cfg, split, model_cfg, seed))
    if rows < batch:
      raise ValueError(f"the {split!r} split of {_where(data_cfg)} packs into {rows} rows of "
                       f"data.seq_len={data_cfg.seq_len} tokens, fewer than one batch of "
                       f"{field}={batch} rows; add images, or lower {field}.")


@functools.lru_cache(maxsize=8)
def _image_sizes(root: str, files: tuple) -> tuple[tuple[int, int], ...]:
  """(height, width) of every file, from its header (no pixels decoded)."""
  sizes = []
  for rel, _ in files:
    path = os.path.join(root, rel)
    try:
      with Image.open(path) as im:
        sizes.append((im.size[1], im.size[0]))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise ValueError(f"image {path} is damaged or not an image ({e}); replace or remove it."
                       ) from None
  return tuple(sizes)


class PackedFolderSource:
  """Random-access packed rows (train/image_packing.py's layout) of a folder's images at their
  native sizes, decoded on demand."""

  def __init__(self, root: str, files, sizes, rows, *, seq_len: int, max_images: int,
               patch: int):
    self.root, self.files, self.sizes, self.rows = root, files, sizes, rows
    self.seq_len, self.max_images, self.patch = seq_len, max_images, patch

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i):
    images, labels = [], []
    for j in self.rows[i.__index__()]:
      rel, label = self.files[j]
      path = os.path.join(self.root, rel)
      h, w = self.sizes[j]
      try:
        with Image.open(path) as im:
          im = im.convert("RGB")
          if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
          images.append(np.asarray(im, np.float32) / 127.5 - 1.0)
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise data.DataError(f"image {path} could not be decoded ({e}); replace or remove it."
                             ) from None
      labels.append(label)
    return image_packing.assemble(images, labels, self.seq_len, self.max_images, self.patch, 3)


@functools.lru_cache(maxsize=8)
def _packed_rows(root: str, files: tuple, patch: int, side: int, seq_len: int, max_images: int,
                 seed: int):
  fitted = [image_packing.fit_size(h, w, patch, side) for h, w in _image_sizes(root, files)]
  order = np.random.default_rng(seed).permutation(len(files))  # random ties, random groups
  lengths = [image_packing.num_tokens(fitted[j], patch) for j in order]
  rows = [[int(order[k]) for k in row]
          for row in image_packing.pack_rows(lengths, seq_len, max_images)]
  return tuple(fitted), rows


def packed_source(data_cfg, split: str, model_cfg, seed: int) -> PackedFolderSource:
  """The packed rows of ``split`` of a folder at native sizes (``data.native_size=True``)."""
  folder = source(data_cfg, split)
  fitted, rows = _packed_rows(folder.root, tuple(folder.files), model_cfg.patch_size,
                              max_size(data_cfg, model_cfg), data_cfg.seq_len,
                              data_cfg.max_images, seed)
  return PackedFolderSource(folder.root, folder.files, fitted, rows, seq_len=data_cfg.seq_len,
                            max_images=data_cfg.max_images, patch=model_cfg.patch_size)


def make_packed_dataset(data_cfg, model_cfg, *, split: str, global_batch_size: int, seed: int,
                        shuffle: bool, num_epochs: int | None) -> grain.IterDataset:
  """This process's batches of packed rows of ``split`` (train/image_packing.py's layout, a
  leading batch axis added)."""
  src = packed_source(data_cfg, split, model_cfg, seed)
  if len(src) < global_batch_size:
    raise ValueError(f"the {split!r} split of {data_cfg.name!r} packs into {len(src)} rows, "
                     f"fewer than one batch of {global_batch_size}.")
  return data.batched(src, data_cfg, global_batch_size=global_batch_size, seed=seed,
                      shuffle=shuffle, num_epochs=num_epochs)


def source(data_cfg, split: str):
  """The random-access source of ``split`` ("train" or "val")."""
  check_image_config(data_cfg)
  if data_cfg.name in caption_data.KNOWN:
    return caption_data.source(data_cfg, split)
  if data_cfg.name == "digits":
    images, labels = _digits(data_cfg.image_size)
    test = np.arange(len(labels)) % 5 == 0
    keep = test if split == "val" else ~test
    return ArraySource(images[keep], labels[keep])
  if data_cfg.name == "arrayrecord":
    return ArrayRecordSource(os.path.realpath(data_cfg.path), split)
  root = os.path.realpath(data_cfg.path)
  _, files = _folder_index(root)
  in_val = lambda rel: zlib.crc32(rel.encode()) % 1000 < round(data_cfg.val_fraction * 1000)
  chosen = [(rel, label) for rel, label in files if in_val(rel) == (split == "val")]
  return FolderSource(root, chosen, data_cfg.image_size or 32)


def _metadata(data_cfg) -> dict:
  return _read_metadata(data_cfg.path)


def _read_metadata(root: str) -> dict:
  """metadata.json of an "arrayrecord" image dataset, or one sentence naming what is wrong."""
  path = os.path.join(root, "metadata.json")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} could not be read as JSON ({e}); {ARRAYRECORD_HOW}.") from None
  ok = (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and meta["shape"]
        and all(type(d) is int and d > 0 for d in meta["shape"])
        and type(meta.get("num_classes")) is int and meta["num_classes"] > 0
        and isinstance(meta.get("dtype"), str))
  if ok:
    try:
      np.dtype(meta["dtype"])
    except TypeError:
      ok = False
  if not ok:
    raise ValueError(f"{path} does not hold a shape (positive integers), a numpy dtype name and "
                     f"num_classes; {ARRAYRECORD_HOW}.")
  return meta


def _record_bytes(meta: dict) -> int:
  return 4 + int(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize


def _shards(root: str, split: str) -> list[str]:
  return sorted(os.path.join(root, n) for n in os.listdir(root)
                if n.startswith(f"{split}-") and n.endswith(".array_record"))


@functools.lru_cache(maxsize=4)
def _verify_images(root: str, files: tuple) -> None:
  """Opens every image of a folder dataset and verifies it (PNG: every chunk's CRC), decoding no
  pixels; one sentence naming the first file that is not a whole image."""
  for rel, _ in files:
    path = os.path.join(root, rel)
    try:
      with Image.open(path) as im:
        im.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise ValueError(f"image {path} is damaged or not an image ({e}); replace or remove it."
                       ) from None


@functools.lru_cache(maxsize=16)
def _check_shards(root: str, split: str, signature: tuple) -> int:
  """The number of records in ``split``'s shards, each opened and its first record's size checked
  against metadata.json."""
  del signature  # the shards' (name, size, mtime): part of the cache key only
  meta = _read_metadata(root)
  want, total = _record_bytes(meta), 0
  for shard in _shards(root, split):
    reader = data.open_shard(shard, ARRAYRECORD_HOW)
    try:
      if reader.num_records():
        length = len(reader.read([0])[0])
        if length != want:
          raise ValueError(f"{shard} holds records of {length} bytes, but metadata.json gives "
                           f"{want} (a 4-byte label and a {meta['dtype']} array of shape "
                           f"{meta['shape']}); {ARRAYRECORD_HOW}.")
      total += reader.num_records()
    finally:
      reader.close()
  return total


def check_splits(data_cfg, batch_sizes: dict[str, tuple[int, str]]) -> None:
  """One sentence for a split that cannot fill one batch or whose files are damaged, before
  anything is written; ``batch_sizes``: {split: (global batch size, the config field)}."""
  check_image_config(data_cfg)
  for split, (batch, field) in batch_sizes.items():
    if data_cfg.name == "arrayrecord":
      root = os.path.realpath(data_cfg.path)
      signature = tuple((n, os.path.getsize(n), os.path.getmtime(n)) for n in _shards(root, split))
      count = _check_shards(root, split, signature)
      hint = f"write {split}-*.array_record shards with train.image_data.write_arrayrecord"
    elif data_cfg.name == "folder":
      src = source(data_cfg, split)
      _verify_images(src.root, tuple(src.files))
      count = len(src)
      hint = ("change data.val_fraction or add images" if split == "val"
              else "add images")
    else:
      count, hint = len(source(data_cfg, split)), "the digits split is fixed"
    if count < batch:
      empty = " (it is empty)" if count == 0 else ""
      raise ValueError(f"the {split!r} split of {_where(data_cfg)} has {count} images{empty}, "
                       f"fewer than one batch of {field}={batch}; {hint}, or lower {field}.")


def _where(data_cfg) -> str:
  return f"data.path={data_cfg.path!r}" if data_cfg.path else f"data {data_cfg.name!r}"


def image_shape(data_cfg) -> tuple[int, int, int]:
  """(H, W, C) of one image of this dataset."""
  if data_cfg.name == "arrayrecord":
    return tuple(_metadata(data_cfg)["shape"])
  return tuple(source(data_cfg, "train")[0]["images"].shape)


def num_classes(data_cfg) -> int:
  if data_cfg.name == "digits":
    return 10
  if data_cfg.name in caption_data.KNOWN:
    return caption_data.num_classes(data_cfg)
  if data_cfg.name == "arrayrecord":
    return int(_metadata(data_cfg)["num_classes"])
  return len(_folder_index(os.path.realpath(data_cfg.path))[0])


def make_dataset(data_cfg, *, split: str, global_batch_size: int, seed: int, shuffle: bool,
                 num_epochs: int | None) -> grain.IterDataset:
  """This process's batches {"images": f32 [b, H, W, C], "labels": i32 [b]} of ``split``."""
  src = source(data_cfg, split)
  if len(src) < global_batch_size:
    raise ValueError(f"the {split!r} split of {data_cfg.name!r} has {len(src)} images, fewer "
                     f"than one batch of {global_batch_size}.")
  return data.batched(src, data_cfg, global_batch_size=global_batch_size, seed=seed,
                      shuffle=shuffle, num_epochs=num_epochs)
