"""Swin Transformer geometry (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows"): window partitioning, the relative position index of the bias table, the
cyclic shift's region ids, and shifted-window attention. (Work in progress on branch ``swin``: the
family, its variants, patch merging and the converter come next; see issue 20.)

Tokens are [B, H, W, C] feature maps; windows are M x M; a shifted block rolls the map by −M/2
before partitioning and by +M/2 after. After the roll a window can hold tokens from up to four
regions of the unrolled map that are not neighbours there; each token gets its region's id and
attention keeps only pairs with the same id, the cyclic-shift mask as a segment-id mask.
Extra legend: M window size, N = M² tokens per window, nW windows per image.
"""

import jax
import jax.numpy as jnp
import numpy as np


def window_partition(x_BxHxWxC, M: int):
  """[B, H, W, C] -> [B·nW, M·M, C], windows in row-major order, tokens row-major inside."""
  B, H, W, C = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(B, H // M, M, W // M, M, C)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, M * M, C)


def window_reverse(windows_BnWxNxC, M: int, H: int, W: int):
  """The inverse of ``window_partition``: [B·nW, M·M, C] -> [B, H, W, C]."""
  C = windows_BnWxNxC.shape[-1]
  x = windows_BnWxNxC.reshape(-1, H // M, W // M, M, M, C)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(M: int) -> np.ndarray:
  """[N, N] indices into the (2M − 1)² bias table: for tokens i, j of a window at (y, x) offsets,
  (y_i − y_j + M − 1)·(2M − 1) + (x_i − x_j + M − 1)."""
  ys, xs = np.meshgrid(np.arange(M), np.arange(M), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + M - 1
  dx = xs[:, None] - xs[None, :] + M - 1
  return (dy * (2 * M - 1) + dx).astype(np.int32)


def shift_region_ids(H: int, W: int, M: int, shift: int) -> np.ndarray:
  """[H, W] region id of each position of the rolled map: the map is cut at H − M and H − shift
  (and likewise along W) into 3 x 3 regions; tokens of different regions that share a window after
  the roll were not neighbours before it. All zeros when ``shift`` is 0."""
  ids = np.zeros((H, W), np.int32)
  if shift == 0:
    return ids
  cuts = lambda n: (slice(0, n - M), slice(n - M, n - shift), slice(n - shift, n))
  for i, hs in enumerate(cuts(H)):
    for j, ws in enumerate(cuts(W)):
      ids[hs, ws] = 3 * i + j
  return ids


def window_attention(q, k, v, bias_HxNxN, region_ids_nWxN=None):
  """Attention inside each window: q, k, v [B·nW, N, heads, D]; the bias [heads, N, N] added to
  the scaled logits; pairs of different regions masked (shifted blocks). Logits and softmax in
  float32 (float64 for float64 inputs). Returns [B·nW, N, heads, D]."""
  BnW, N, Hh, D = q.shape
  f = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("wihd,wjhd->whij", q, k, preferred_element_type=f) * D ** -0.5
  logits = logits + bias_HxNxN.astype(f)[None]
  if region_ids_nWxN is not None:
    nW = region_ids_nWxN.shape[0]
    same = region_ids_nWxN[:, :, None] == region_ids_nWxN[:, None, :]  # [nW, N, N]
    logits = logits.reshape(BnW // nW, nW, Hh, N, N)
    logits = jnp.where(same[None, :, None], logits, jnp.finfo(f).min)
    logits = logits.reshape(BnW, Hh, N, N)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("whij,wjhd->wihd", probs, v)


def shifted_window_attention(q, k, v, bias_table, M: int, shift: int):
  """Swin's (shifted-)window attention on [B, H, W, heads, D] maps: roll by −shift, partition,
  attend with the relative position bias (``bias_table`` [(2M−1)², heads]) and the region mask,
  reverse and roll back."""
  B, H, W, Hh, D = q.shape
  roll = lambda x, s: jnp.roll(x, (s, s), axis=(1, 2)) if shift else x
  part = lambda x: window_partition(roll(x, -shift).reshape(B, H, W, Hh * D), M).reshape(
      -1, M * M, Hh, D)
  bias = bias_table[relative_position_index(M)].transpose(2, 0, 1)  # [heads, N, N]
  regions = None
  if shift:
    regions = window_partition(jnp.asarray(shift_region_ids(H, W, M, shift))[None, ..., None],
                               M)[..., 0]  # [nW, N]
  o = window_attention(part(q), part(k), part(v), bias, regions)
  o = window_reverse(o.reshape(-1, M * M, Hh * D), M, H, W).reshape(B, H, W, Hh, D)
  return roll(o, shift)
