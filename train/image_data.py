"""Image input pipeline: the embedded digits set and folders of users' images, through grain.

Every source yields {"images": float32 [H, W, C] in [-1, 1], "labels": int32}; the grain pipeline
(shuffle with the seed, a fresh permutation each epoch -> repeat -> this process's share ->
batch) is the same one train/data.py uses for text.
  * "digits" (embedded default): the 8x8 handwritten digits that ship inside scikit-learn (1,797
    images, 10 classes; no download). Fixed split: every image whose index % 5 == 0 is test
    (360 images), the rest train (1,437). Optionally resized to 16x16 (``data.image_size``).
  * "folder": ``data.path/<class name>/*.png|jpg|jpeg``; classes are the sorted subfolder names,
    ``data.val_fraction`` of each class's files (by a hash of the file name) form the val split.
  * "arrayrecord": pre-encoded arrays, e.g. VAE latents for DiT on ImageNet:
    ``data.path/{train,val}-*.array_record`` whose records are a little-endian int32 label followed
    by the raw array, and ``metadata.json`` = {"shape": [H, W, C], "dtype": "float16",
    "num_classes": N}. ``write_arrayrecord`` writes that layout.
"""

import functools
import json
import os
import zlib

import grain
import numpy as np
from PIL import Image

from train import data

KNOWN = ("digits", "folder", "arrayrecord")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_image_config(data_cfg) -> None:
  """One sentence for a data config that cannot produce images, before anything compiles."""
  if data_cfg.name not in KNOWN:
    raise ValueError(f"data.name={data_cfg.name!r} is not an image dataset; use one of {KNOWN}.")
  if data_cfg.name == "folder":
    if not data_cfg.path or not os.path.isdir(data_cfg.path):
      raise ValueError(f"data.path={data_cfg.path!r} does not exist or is not a folder of class "
                       "subfolders with images.")
    if not _folder_index(os.path.realpath(data_cfg.path))[1]:
      raise ValueError(f"data.path={data_cfg.path!r} has no class subfolders with "
                       f"{'/'.join(IMAGE_SUFFIXES)} files.")
  if data_cfg.name == "arrayrecord":
    if not data_cfg.path or not os.path.isfile(os.path.join(data_cfg.path, "metadata.json")):
      raise ValueError(f"data.path={data_cfg.path!r} has no metadata.json; an 'arrayrecord' image "
                       "dataset is a folder written by train.image_data.write_arrayrecord.")
  if data_cfg.image_size not in (0, 8, 16, 32) and data_cfg.name == "digits":
    raise ValueError(f"data.image_size={data_cfg.image_size} must be 8, 16 or 32 for digits "
                     "(0 keeps 8).")


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # ships with scikit-learn, no download
  d = load_digits()
  images = d.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
  if size and size != 8:
    images = np.stack([_resize(im, size) for im in images])
  images = images[..., None]
  images.flags.writeable = False
  return images, d.target.astype(np.int32)


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
    with open(os.path.join(root, "metadata.json")) as f:
      self.meta = json.load(f)
    shards = sorted(os.path.join(root, n) for n in os.listdir(root)
                    if n.startswith(f"{split}-") and n.endswith(".array_record"))
    self._source = grain.sources.ArrayRecordDataSource(shards) if shards else []
    self._dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    record = self._source[i.__index__()]
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
    with Image.open(os.path.join(self.root, rel)) as im:
      im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
      image = np.asarray(im, np.float32) / 127.5 - 1.0
    return {"images": image, "labels": np.int32(label)}


def source(data_cfg, split: str):
  """The random-access source of ``split`` ("train" or "val")."""
  check_image_config(data_cfg)
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
  with open(os.path.join(data_cfg.path, "metadata.json")) as f:
    return json.load(f)


def image_shape(data_cfg) -> tuple[int, int, int]:
  """(H, W, C) of one image of this dataset."""
  if data_cfg.name == "arrayrecord":
    return tuple(_metadata(data_cfg)["shape"])
  return tuple(source(data_cfg, "train")[0]["images"].shape)


def num_classes(data_cfg) -> int:
  if data_cfg.name == "digits":
    return 10
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
