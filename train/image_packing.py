"""Native-resolution image packing (NaViT, Dehghani et al. 2023, "Patch n' Pack").

Images keep their own size and aspect ratio: one larger than ``max_size`` on its longer side is
downscaled to it, and both sides are rounded to multiples of the patch size (at least one patch).
Their patches are concatenated into rows of ``seq_len`` tokens, at most ``max_images`` images per
row, by greedy first-fit-decreasing on the token counts (``pack_rows``); ``assemble`` lays out one
row as the packed ViT reads it (nets/vit.py):

  patches      float32 [seq_len, p·p·C]  each image's patches in raster order, then zeros
  segment_ids  int32 [seq_len]           image slot k's tokens carry k + 1; padding 0
  positions    int32 [seq_len, 2]        (row, col) of the patch within its own image
  labels       int32 [max_images]        slot k's label (0 for an empty slot)
  image_mask   bool [max_images]         whether slot k holds an image

A patch flattens as (row, col, channel), as nets.layers.patchify does, so a packed image's tokens
equal the fixed-size path's.
"""

import numpy as np


def fit_size(height: int, width: int, patch: int, max_size: int) -> tuple[int, int]:
  """(h, w) of an image of ``height`` x ``width`` pixels once fitted: its longer side at most
  ``max_size`` (a multiple of ``patch``), aspect ratio kept, both sides multiples of ``patch``."""
  scale = min(1.0, max_size / max(height, width))
  fit = lambda side: min(max_size, max(patch, int(round(side * scale / patch)) * patch))
  return fit(height), fit(width)


def num_tokens(size: tuple[int, int], patch: int) -> int:
  return (size[0] // patch) * (size[1] // patch)


class _FirstFit:
  """Leftmost row whose free tokens are >= n (a max segment tree over rows): O(log rows) per
  query, so packing a large folder stays O(images · log images)."""

  def __init__(self, capacity: int):
    self.size = 1
    while self.size < max(capacity, 1):
      self.size *= 2
    self.tree = [-1] * (2 * self.size)

  def set(self, row: int, free: int):
    i = row + self.size
    self.tree[i] = free
    while i > 1:
      i //= 2
      self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

  def find(self, n: int) -> int:
    """The leftmost row with free >= n, or -1."""
    if self.tree[1] < n:
      return -1
    i = 1
    while i < self.size:
      i = 2 * i if self.tree[2 * i] >= n else 2 * i + 1
    return i - self.size


def pack_rows(lengths, seq_len: int, max_images: int) -> list[list[int]]:
  """Indices of ``lengths`` grouped into rows: first-fit-decreasing, at most ``seq_len`` tokens
  and ``max_images`` images per row. Ties keep the given order (shuffle it for random groups)."""
  lengths = [int(n) for n in lengths]
  too_long = [n for n in lengths if n > seq_len]
  if too_long:
    raise ValueError(f"an image of {max(too_long)} tokens does not fit one packed row of "
                     f"data.seq_len={seq_len} tokens; raise data.seq_len or lower data.max_size.")
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
  rows, free = [], []
  fit = _FirstFit(len(lengths))
  for i in order:
    r = fit.find(lengths[i])
    if r < 0:
      r = len(rows)
      rows.append([])
      free.append(seq_len)
    rows[r].append(i)
    free[r] -= lengths[i]
    # A full row (max_images) offers nothing; lengths only decrease, so a free count of 0 can
    # never be used again either.
    fit.set(r, free[r] if len(rows[r]) < max_images and free[r] > 0 else -1)
  return rows


def fill(rows, lengths, seq_len: int) -> float:
  """Tokens used / tokens available over ``rows``."""
  used = sum(lengths[i] for row in rows for i in row)
  return used / max(len(rows) * seq_len, 1)


def patches(image_HxWxC: np.ndarray, patch: int) -> np.ndarray:
  """[H, W, C] -> [(H/p)·(W/p), p·p·C], raster order, as nets.layers.patchify."""
  H, W, C = image_HxWxC.shape
  x = image_HxWxC.reshape(H // patch, patch, W // patch, patch, C).transpose(0, 2, 1, 3, 4)
  return x.reshape((H // patch) * (W // patch), patch * patch * C)


def assemble(images, labels, seq_len: int, max_images: int, patch: int, channels: int) -> dict:
  """One packed row (the module docstring's layout) of ``images`` [h, w, C] with ``labels``."""
  if len(images) > max_images:
    raise ValueError(f"{len(images)} images do not fit a row of {max_images} slots.")
  out = {"patches": np.zeros((seq_len, patch * patch * channels), np.float32),
         "segment_ids": np.zeros((seq_len,), np.int32),
         "positions": np.zeros((seq_len, 2), np.int32),
         "labels": np.zeros((max_images,), np.int32),
         "image_mask": np.zeros((max_images,), bool)}
  start = 0
  for k, (image, label) in enumerate(zip(images, labels)):
    h, w = image.shape[0] // patch, image.shape[1] // patch
    n = h * w
    if start + n > seq_len:
      raise ValueError(f"images of {start + n} tokens do not fit a row of {seq_len}.")
    out["patches"][start:start + n] = patches(np.asarray(image, np.float32), patch)
    out["segment_ids"][start:start + n] = k + 1
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out["positions"][start:start + n] = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)
    out["labels"][k], out["image_mask"][k] = label, True
    start += n
  return out
