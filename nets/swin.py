"""Swin Transformer classifier (Liu et al. 2021, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows").

Images are cut into p x p patches (a Dense on patchified pixels, as ViT) and flow through stages
of [B, H, W, C] feature maps; each stage after the first halves the map (patch merging: 2 x 2
neighbours concatenated, LayerNorm, 4C -> 2C). Blocks are pre-norm: x + W-MSA(LN(x));
x + MLP(LN(x)), with attention inside M x M windows and, every other block, on the map rolled by
−M/2 first and by +M/2 after (shifted windows), so information crosses window borders.

Window attention goes through the attention function the model receives (nets/attention.py or a
kernel of parallel/kernels.py): windows are its batch rows, [B·nW, N, heads, D]; the relative
position bias [heads, N, N] (gathered from a (2M−1)² x heads table) is its additive ``bias``;
and the cyclic shift's mask is a segment-id mask: after the roll a window can hold tokens from up
to four regions of the unrolled map that are not neighbours there; each token gets its region's
id and attention keeps only pairs with the same id.
A stage whose map is no larger than the window gets one window and no shift (as the reference
implementation). The parameters follow Hugging Face ``SwinForImageClassification``'s layout, up
to the fused qkv projection (nets/convert/swin.py).
Extra legend: M window size, N = M² tokens per window, nW windows per image.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from nets import attention
from nets.layers import (Dense, LayerNorm, Mlp, build_config, check_basics, check_positive_floats,
                         patchify, remat)
from nets.registry import Family


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


def to_windows(x_BxHxWxC, M: int, shift: int):
  """A map rolled by −shift and cut into windows: [B, H, W, C] -> [B·nW, N, C]."""
  if shift:
    x_BxHxWxC = jnp.roll(x_BxHxWxC, (-shift, -shift), axis=(1, 2))
  return window_partition(x_BxHxWxC, M)


def from_windows(w_BnWxNxC, M: int, shift: int, H: int, W: int):
  """The inverse of ``to_windows``: [B·nW, N, C] -> [B, H, W, C]."""
  x_BxHxWxC = window_reverse(w_BnWxNxC, M, H, W)
  return jnp.roll(x_BxHxWxC, (shift, shift), axis=(1, 2)) if shift else x_BxHxWxC


def window_attention(q, k, v, bias_table, M: int, shift: int, H: int, W: int,
                     attention_fn: Callable[..., Any] = attention.dot_product_attention):
  """Attention within the windows of ``to_windows``: q, k, v [B·nW, N, heads, D] -> the same
  shape, with the relative position bias (``bias_table`` [(2M−1)², heads]) and, for shift > 0,
  the region mask of the H x W map."""
  bias_HxNxN = bias_table[relative_position_index(M)].transpose(2, 0, 1)
  segments = None
  if shift:
    regions_nWxN = window_partition(
        jnp.asarray(shift_region_ids(H, W, M, shift))[None, ..., None], M)[..., 0]
    segments = jnp.tile(regions_nWxN, (q.shape[0] // regions_nWxN.shape[0], 1))  # image-major
  return attention_fn(q, k, v, causal=False, positions_BxS=None, segment_ids_BxS=segments,
                      bias_HxSxT=bias_HxNxN)


def shifted_window_attention(q, k, v, bias_table, M: int, shift: int,
                             attention_fn: Callable[..., Any] = attention.dot_product_attention):
  """Swin's (shifted-)window attention on [B, H, W, heads, D] maps: roll by −shift, partition,
  attend with the relative position bias and the region mask, reverse and roll back. (The block
  windows its normalised input once instead, before the qkv projection: the same function,
  since the projection acts per token.)"""
  B, H, W, Hh, D = q.shape
  part = lambda x: to_windows(x.reshape(B, H, W, Hh * D), M, shift).reshape(-1, M * M, Hh, D)
  o = window_attention(part(q), part(k), part(v), bias_table, M, shift, H, W, attention_fn)
  return from_windows(o.reshape(-1, M * M, Hh * D), M, shift, H, W).reshape(B, H, W, Hh, D)


# embed_dim, depths, heads per stage: the paper's Table 7 (window 7, patch 4, at 224).
VARIANTS = {"T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
            "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
            "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
            "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))}
# sklearn digits upscaled to 32 x 32 grey: an 8 x 8 patch grid in 4 x 4 windows (shifted), then
# one 4 x 4 window.
VARIANTS["digits"] = dict(embed_dim=48, depths=(2, 2), num_heads=(2, 4), patch_size=4,
                          window_size=4, image_size=32, channels=1, num_classes=10)
_ACT = ("act_batch", None, None, "act_embed")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  image_size: int = 224  # square images
  channels: int = 3
  num_classes: int = 1000
  patch_size: int = 4
  window_size: int = 7
  embed_dim: int = 0  # the first stage's width; each later stage doubles it
  depths: tuple = ()  # blocks per stage
  num_heads: tuple = ()  # heads per stage
  mlp_ratio: int = 4
  norm_eps: float = 1e-5
  # The MLP's GELU: exact erf (the paper's and Hugging Face's hidden_act="gelu"), or True for the
  # tanh approximation.
  gelu_approximate: bool = False
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES, per block

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    cfg = build_config(cls, "swin", VARIANTS, model_cfg, overrides)
    return dataclasses.replace(cfg, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads))

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "swin", ("image_size", "channels", "num_classes", "patch_size",
                                "window_size", "embed_dim", "mlp_ratio"))
    if not self.depths or len(self.depths) != len(self.num_heads):
      raise ValueError(f"model.depths={tuple(self.depths)} and model.num_heads="
                       f"{tuple(self.num_heads)} must name the same number (at least one) of "
                       "stages.")
    if min(self.depths) < 1 or min(self.num_heads) < 1:
      raise ValueError(f"model.depths={tuple(self.depths)} and model.num_heads="
                       f"{tuple(self.num_heads)} must be positive.")
    if self.image_size % self.patch_size:
      raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    grid, halvings = self.image_size // self.patch_size, 2 ** (len(self.depths) - 1)
    if grid % halvings:
      raise ValueError(f"the {grid} x {grid} patch grid cannot be halved {len(self.depths) - 1} "
                       f"times (one patch merging per stage after the first); use an image_size "
                       f"whose patch grid is a multiple of {halvings}.")
    for i, heads in enumerate(self.num_heads):
      width, side, M, _ = self.stage(i)
      if width % heads:
        raise ValueError(f"stage {i}: width {width} (model.embed_dim={self.embed_dim} x 2^{i}) is "
                         f"not divisible by model.num_heads[{i}]={heads}.")
      if side % M:
        raise ValueError(f"stage {i}: the {side} x {side} map is not divisible into "
                         f"model.window_size={self.window_size} windows; choose a window that "
                         "divides every stage's map (or an image_size that makes it so).")
    check_positive_floats(self, ("norm_eps",))

  def stage(self, i: int):
    """(width, map side, window, shift of odd blocks) of stage i: a map no larger than the window
    gets one window and no shift (as the reference implementation does)."""
    side = self.image_size // self.patch_size // 2 ** i
    M = min(self.window_size, side)
    return self.embed_dim * 2 ** i, side, M, (0 if side <= self.window_size else M // 2)

  # The names every family's Config shares (nets/registry.py).
  width = property(lambda self: self.embed_dim)
  depth = property(lambda self: sum(self.depths))
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: self.mlp_ratio * self.embed_dim)
  # Tokens of the first stage's map (attention itself sees windows of window_size² tokens).
  max_len = property(lambda self: (self.image_size // self.patch_size) ** 2)


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model and the paper)."""
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


def flops(cfg: Config, step=None) -> float:
  """Forward matmul FLOPs per image: the patch embedding 2·p²·C_in·E·S₀; per block at width c on
  S tokens, the projections 2·(3c² + c²)·S, the MLP 2·2·c·(r·c)·S and window attention 4·S·M²·c
  (scores and weighted values over each token's M² window keys, all executed: no causal skip);
  per merging 2·4c·2c·S/4; the head 2·c_last·classes."""
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
  """x + W-MSA(LN(x)) (shifted when ``shift`` > 0); x + MLP(LN(x)), on [B, H, W, C] maps."""
  cfg: Config
  attention_fn: Callable[..., Any]
  heads: int
  window: int
  shift: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, M = self.cfg, self.window
    C = x_BxHxWxC.shape[-1]
    D = C // self.heads
    x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, _ACT)
    B, H, W, _ = x_BxHxWxC.shape
    # LayerNorm, the projections and the residual act per token: window the normalised map once
    # ([B·nW, N, C], the windows as batch rows) and un-window the attention's projected output.
    h = LayerNorm(cfg, eps=cfg.norm_eps, name="norm1")(x_BxHxWxC)
    h_BnWxNxC = nn.with_logical_constraint(to_windows(h, M, self.shift),
                                           ("act_batch", "act_seq", "act_embed"))
    qkv = Dense(cfg, (3, self.heads, D), ("embed", None, "heads", "head_dim"), name="qkv")(
        h_BnWxNxC)
    qkv = nn.with_logical_constraint(qkv, ("act_batch", "act_seq", None, "act_heads", "head_dim"))
    table = self.param("relative_position_bias_table", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "heads")), ((2 * M - 1) ** 2, self.heads),
        jnp.dtype(cfg.param_dtype))
    o = window_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], table, M, self.shift, H, W,
                         self.attention_fn)
    o = nn.with_logical_constraint(o, ("act_batch", "act_seq", "act_heads", "head_dim"))
    o_BnWxNxC = Dense(cfg, (C,), ("heads", "head_dim", "embed"), n_in=2, name="proj")(o)
    x_BxHxWxC = x_BxHxWxC + from_windows(o_BnWxNxC, M, self.shift, H, W)
    h = LayerNorm(cfg, eps=cfg.norm_eps, name="norm2")(x_BxHxWxC)
    x_BxHxWxC = x_BxHxWxC + Mlp(cfg, cfg.mlp_ratio * C, cfg.gelu_approximate, name="mlp")(h)
    return nn.with_logical_constraint(x_BxHxWxC, _ACT)


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
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False):
    cfg = self.cfg
    B, H, W, C = images_BxHxWxC.shape
    if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"images are {H}x{W}x{C} but the model expects model.image_size="
                       f"{cfg.image_size} (square) and model.channels={cfg.channels}.")
    g = cfg.image_size // cfg.patch_size
    x = Dense(cfg, (cfg.embed_dim,), ("patch", "embed"), name="patch_embed")(
        patchify(images_BxHxWxC, cfg.patch_size)).reshape(B, g, g, cfg.embed_dim)
    x = LayerNorm(cfg, eps=cfg.norm_eps, name="patch_norm")(x)
    block = remat(SwinBlock, cfg.remat)
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      _, _, M, shift = cfg.stage(i)
      for j in range(depth):
        x = block(cfg, self.attention_fn, heads, M, shift if j % 2 else 0,
                  name=f"stage{i}_block{j}")(x)
      if i < len(cfg.depths) - 1:
        x = PatchMerging(cfg, name=f"stage{i}_merge")(x)
    x = LayerNorm(cfg, eps=cfg.norm_eps, name="norm")(x)
    pooled_BxC = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(cfg.dtype)
    pooled_BxC = nn.with_logical_constraint(pooled_BxC, ("act_batch", "act_embed"))
    logits_BxK = Dense(cfg, (cfg.num_classes,), ("embed", "classes"), out_dtype=jnp.float32,
                       name="head")(pooled_BxC)
    return nn.with_logical_constraint(logits_BxK, ("act_batch", None)).astype(jnp.float32)


FAMILY = Family(
    name="swin", Config=Config, Model=Model, task="classification",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: min(cfg.window_size, cfg.image_size // cfg.patch_size)
    ** 2, sequence_parallel=False, converter="swin",
    # The tanh GELU: XLA counts the exact erf's polynomial, 3.5% of this model's FLOPs.
    test_config=dict(variant="digits", embed_dim=256, depths=(2, 2), num_heads=(4, 8),
                     image_size=32, patch_size=2, window_size=8, channels=3,
                     gelu_approximate=True))
