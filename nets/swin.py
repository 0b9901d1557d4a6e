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


# --- the model (work in progress: not yet a registered family) ----------------------------------

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402

from nets.layers import Dense, LayerNorm, Mlp, patchify  # noqa: E402

# embed_dim, depths, heads per stage: the paper's Table 7 (window 7, patch 4, at 224).
VARIANTS = {"T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
            "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
            "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
            "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))}


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int = 224
  channels: int = 3
  num_classes: int = 1000
  patch_size: int = 4
  window_size: int = 7
  embed_dim: int = 96
  depths: tuple = (2, 2, 6, 2)
  num_heads: tuple = (3, 6, 12, 24)
  mlp_ratio: int = 4
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  def stage(self, i: int):
    """(width, map side, window, shift of odd blocks) of stage i: a map no larger than the window
    gets one window and no shift (as the reference implementation does)."""
    side = self.image_size // self.patch_size // 2 ** i
    M = min(self.window_size, side)
    return self.embed_dim * 2 ** i, side, M, (0 if side <= self.window_size else M // 2)


def num_params(cfg: Config) -> int:
  C, P = cfg.embed_dim, cfg.patch_size
  total = P * P * cfg.channels * C + C + 2 * C  # patch embedding and its norm
  for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
    c, _, M, _ = cfg.stage(i)
    m = cfg.mlp_ratio * c
    block = 4 * c + (3 * c * c + 3 * c) + (2 * M - 1) ** 2 * heads + (c * c + c) \
        + (c * m + m) + (m * c + c)
    total += depth * block
    if i < len(cfg.depths) - 1:
      total += 2 * 4 * c + 4 * c * 2 * c  # patch merging: norm, reduction without bias
  c = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
  return total + 2 * c + c * cfg.num_classes + cfg.num_classes


def flops(cfg: Config) -> float:
  """Forward matmul FLOPs per image: the patch embedding 2·p²·C_in·E·S₀; per block at width c on
  S tokens, the projections 2·(3c² + c²)·S, the MLP 2·2·c·(r·c)·S and window attention 4·S·M²·c
  (scores and weighted values over each token's M² window keys); per merging 2·4c·2c·S/4; the
  head 2·c_last·classes."""
  g = cfg.image_size // cfg.patch_size
  total = 2 * cfg.patch_size ** 2 * cfg.channels * cfg.embed_dim * g * g
  for i, depth in enumerate(cfg.depths):
    c, side, M, _ = cfg.stage(i)
    S = side * side
    total += depth * S * (2 * 4 * c * c + 2 * 2 * c * cfg.mlp_ratio * c + 4 * M * M * c)
    if i < len(cfg.depths) - 1:
      total += 2 * 4 * c * 2 * c * S // 4
  return total + 2 * cfg.embed_dim * 2 ** (len(cfg.depths) - 1) * cfg.num_classes


class SwinBlock(nn.Module):
  cfg: Config
  heads: int
  window: int
  shift: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, M = self.cfg, self.window
    B, H, W, C = x_BxHxWxC.shape
    D = C // self.heads
    h = LayerNorm(cfg, eps=cfg.norm_eps, name="norm1")(x_BxHxWxC)
    qkv = Dense(cfg, (3, self.heads, D), ("embed", None, "heads", "head_dim"), name="qkv")(h)
    table = self.param("relative_position_bias_table", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "heads")), ((2 * M - 1) ** 2, self.heads),
        jnp.dtype(cfg.param_dtype))
    o = shifted_window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                                 table, M, self.shift)
    x_BxHxWxC = x_BxHxWxC + Dense(cfg, (C,), ("heads", "head_dim", "embed"), n_in=2,
                                  name="proj")(o)
    h = LayerNorm(cfg, eps=cfg.norm_eps, name="norm2")(x_BxHxWxC)
    return x_BxHxWxC + Mlp(cfg, cfg.mlp_ratio * C, False, name="mlp")(h)


class PatchMerging(nn.Module):
  """2 x 2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, 4C -> 2C."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxHxWxC):
    C = x_BxHxWxC.shape[-1]
    x = jnp.concatenate([x_BxHxWxC[:, 0::2, 0::2], x_BxHxWxC[:, 1::2, 0::2],
                         x_BxHxWxC[:, 0::2, 1::2], x_BxHxWxC[:, 1::2, 1::2]], axis=-1)
    x = LayerNorm(self.cfg, eps=self.cfg.norm_eps, name="norm")(x)
    return Dense(self.cfg, (2 * C,), ("mlp", "embed"), use_bias=False, name="reduction")(x)


class Model(nn.Module):
  """Swin classifier: images [B, H, W, C] -> logits [B, num_classes] float32."""
  cfg: Config

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False):
    cfg = self.cfg
    B = images_BxHxWxC.shape[0]
    g = cfg.image_size // cfg.patch_size
    x = Dense(cfg, (cfg.embed_dim,), ("patch", "embed"), name="patch_embed")(
        patchify(images_BxHxWxC, cfg.patch_size)).reshape(B, g, g, cfg.embed_dim)
    x = LayerNorm(cfg, eps=cfg.norm_eps, name="patch_norm")(x)
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      _, _, M, shift = cfg.stage(i)
      for j in range(depth):
        x = SwinBlock(cfg, heads, M, shift if j % 2 else 0, name=f"stage{i}_block{j}")(x)
      if i < len(cfg.depths) - 1:
        x = PatchMerging(cfg, name=f"stage{i}_merge")(x)
    x = LayerNorm(cfg, eps=cfg.norm_eps, name="norm")(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(cfg.dtype)
    return Dense(cfg, (cfg.num_classes,), ("embed", "classes"), out_dtype=jnp.float32,
                 name="head")(pooled).astype(jnp.float32)


def params_from_hf(sd: dict, cfg: Config) -> dict:
  """transformers (5.x) ``SwinForImageClassification`` state dict (numpy arrays) -> this Model's
  params.
  (Work in progress: becomes nets/convert/swin.py with export and config mapping.)"""
  t = lambda name: np.asarray(sd[name])
  ln = lambda prefix: {"scale": t(prefix + ".weight"), "bias": t(prefix + ".bias")}
  dense = lambda prefix: {"kernel": t(prefix + ".weight").T, "bias": t(prefix + ".bias")}
  conv = t("swin.embeddings.patch_embeddings.projection.weight")  # [E, C, p, p]
  p = {"patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                       "bias": t("swin.embeddings.patch_embeddings.projection.bias")},
       "patch_norm": ln("swin.embeddings.norm")}
  for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
    c = cfg.embed_dim * 2 ** i
    D = c // heads
    for j in range(depth):
      hf = f"swin.encoder.layers.{i}.blocks.{j}."
      att = hf + "attention."
      qkv_w = np.stack([t(att + n + ".weight").T.reshape(c, heads, D)
                        for n in ("q_proj", "k_proj", "v_proj")], axis=1)
      qkv_b = np.stack([t(att + n + ".bias").reshape(heads, D)
                        for n in ("q_proj", "k_proj", "v_proj")])
      p[f"stage{i}_block{j}"] = {
          "norm1": ln(hf + "layernorm_before"), "norm2": ln(hf + "layernorm_after"),
          "qkv": {"kernel": qkv_w, "bias": qkv_b},
          "relative_position_bias_table": t(
              att + "relative_position_bias.relative_position_bias_table"),
          "proj": {"kernel": t(att + "o_proj.weight").T.reshape(heads, D, c),
                   "bias": t(att + "o_proj.bias")},
          "mlp": {"fc1": dense(hf + "mlp.fc1"), "fc2": dense(hf + "mlp.fc2")}}
    if i < len(cfg.depths) - 1:
      hf = f"swin.encoder.layers.{i}.downsample."
      p[f"stage{i}_merge"] = {"norm": ln(hf + "norm"),
                              "reduction": {"kernel": t(hf + "reduction.weight").T}}
  p["norm"] = ln("swin.layernorm")
  p["head"] = dense("classifier")
  return p
