"""U-DiT ("U-DiTs: Downsample Tokens in U-Shaped Diffusion Transformers", Tian et al. 2024).

A U-Net of DiT adaLN-Zero blocks over 2L+1 stages (the paper: L = 2, depths (2, 5, 8, 5, 2)):
encoder stages of width C·2^i on a grid halved per stage, a middle stage of width C·2^L, and
decoder stages of width C·2^max(i, 1) (the paper's decoder keeps 2C at the top). Between encoder
stages the tokens are 2×2-merged and projected (4W -> 2W); a decoder stage projects its input
(W -> 2W), pixel-shuffles it (2W -> W/2 on a doubled grid), concatenates the matching encoder
stage's output (the skip) and projects to its width. Conditioning c = t + y embeddings, one pair
of embedders per distinct width (as the paper). Each depth unit is the paper's U-DiT block: two
adaLN-Zero sub-blocks with their own modulation, so a stage scans 2·depth DiT blocks.

Attention on downsampled tokens: each block splits its h×w token grid into the four 2×2-strided
sub-maps, attends within each (cost ≈ 1/4 of full attention) and merges back
(``submap_attention``). The sub-maps are folded into the batch, so the attention function still
sees [B', S', heads, head_dim] with the sequence on axis 1 (S' = h·w/4).

Approximations of the official code (YuchuanTian/U-DiT), chosen so tokens stay [B, S, E] and the
blocks are DiT's (nets/conditioning.py):
- stem: linear patch embedding (patch_size 1 = per latent pixel, the paper's resolution) plus
  fixed 2-D sin-cos positions; the official stem is a 3×3 conv and positions are RoPE-2D in
  attention.
- down/upsampling: 2×2 merge + linear and linear + pixel shuffle; officially a 3×3 conv then
  pixel-(un)shuffle. Skip merge: concat + linear (officially a 1×1 conv, the same thing).
- token downsampler: the plain 2×2-strided split; officially preceded by a depthwise 5×5 conv
  with a shortcut, with cosine attention and a learned temperature, and a 1×1 conv output.
- FFN: DiT's GELU MLP (ratio 2 in the variants), not the re-parameterised FFN with a depthwise
  5×5 conv; no extra 3×3 conv before DiT's final layer.
- labels are dropped once per example and shared by every width's label embedder (the official
  code draws independently per level).
So parameter counts and FLOPs are close to, not equal to, the paper's.
The embedders, blocks and final layer are nets/conditioning.py's (as DiT's).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting
from nets.conditioning import (Block, FinalLayer, LabelEmbedder, TimestepEmbedder, block_flops,
                               check_input, drop_labels, embedder_flops, embedder_params)
from nets.layers import Dense, build_config, check_basics, patchify, scanned, sincos_2d, unpatchify
from nets.registry import Family

# hidden_size C, num_heads from the official U_DiT_S/B/L (mlp_ratio 2, depths (2, 5, 8, 5, 2)).
VARIANTS = {name: dict(hidden_size=c, num_heads=h, depths=(2, 5, 8, 5, 2), patch_size=1)
            for name, c, h in (("S", 96, 4), ("B", 192, 8), ("L", 384, 16))}
# sklearn digits (8×8 grey, 10 classes) and tests: one downsampling level.
VARIANTS["digits"] = dict(hidden_size=32, num_heads=2, depths=(1, 1, 1), patch_size=1,
                          input_size=8, in_channels=1, num_classes=10)

_ACT = ("act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  input_size: int = 32  # square latent side
  in_channels: int = 4
  num_classes: int = 1000
  patch_size: int = 0
  hidden_size: int = 0  # width C of the first stage
  depths: tuple[int, ...] = ()  # 2L+1 stages: L encoder, middle, L decoder (paper blocks each)
  num_heads: int = 0  # the same at every stage; head_dim grows with the width
  mlp_ratio: float = 2.0
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))  # lists from configs

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    return build_config(cls, "udit", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "udit", ("input_size", "in_channels", "num_classes", "patch_size",
                                "hidden_size", "num_heads"))
    if len(self.depths) < 3 or len(self.depths) % 2 == 0 or min(self.depths) < 1:
      raise ValueError(f"model.depths={self.depths} must be an odd number (>= 3) of positive "
                       "stage depths: encoder stages, the middle stage, decoder stages.")
    if self.input_size % self.patch_size:
      raise ValueError(f"model.input_size={self.input_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    g, m = self.input_size // self.patch_size, 2 ** (self.num_levels + 1)
    if g % m:
      raise ValueError(f"the token grid side input_size/patch_size={g} must be divisible by {m}: "
                       f"{self.num_levels} 2x downsamplings, then 2x2 sub-maps for attention.")
    if self.hidden_size % self.num_heads or self.hidden_size % 4:
      raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                       f"model.num_heads={self.num_heads} and by 4 (sin-cos positions).")
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"model.class_dropout_prob={self.class_dropout_prob} must be in [0, 1].")

  @property
  def num_levels(self) -> int:
    return len(self.depths) // 2

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def null_label(self) -> int:
    return self.num_classes

  @property
  def max_len(self) -> int:
    """Tokens of the first stage: the patches."""
    return (self.input_size // self.patch_size) ** 2

  # The names every family's Config shares (nets/registry.py); widths are the first stage's.
  width = property(lambda self: self.hidden_size)
  depth = property(lambda self: sum(self.depths))
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: int(self.hidden_size * self.mlp_ratio))
  image_size = property(lambda self: self.input_size)
  channels = property(lambda self: self.in_channels)
  mlp_norm_eps = property(lambda self: 1e-6)  # the adaLN blocks' MLP norm: the reference's

  def stage_levels(self) -> list[int]:
    """Width level j (width C·2^j) of each stage, in order: encoder, middle, decoder."""
    L = self.num_levels
    return list(range(L)) + [L] + [max(i, 1) for i in reversed(range(L))]

  def stage_widths(self) -> list[int]:
    return [self.hidden_size * 2 ** j for j in self.stage_levels()]


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  C, L, P = cfg.hidden_size, cfg.num_levels, cfg.patch_size ** 2

  def block(W):
    M = int(W * cfg.mlp_ratio)
    return (4 * W * W + 4 * W) + (2 * W * M + M + W) + (6 * W * W + 6 * W)

  n = P * cfg.in_channels * C + C  # patch embedding
  n += sum(embedder_params(cfg, C * 2 ** j) for j in range(L + 1))  # t and y embedders per width
  n += sum(2 * d * block(W) for d, W in zip(cfg.depths, cfg.stage_widths()))
  for i in range(L):
    W, W_in, W_out = C * 2 ** i, C * 2 ** (i + 1), C * 2 ** max(i, 1)
    n += 4 * W * 2 * W + W_in * 2 * W_in + (2 * W * W_out + W_out)  # down, up, skip merge
  W = cfg.stage_widths()[-1]
  return n + (2 * W * W + 2 * W) + (W * P * cfg.out_channels + P * cfg.out_channels)


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: stem 2·p²·C_in·C·g² + one timestep MLP per width C·2^j (j = 0..L)
  + stages of 2·depth adaLN-Zero blocks (``conditioning.block_flops``; MLP 2·2·W·M, attention
  within 2×2 sub-maps: S/4 keys) + downsampling 2·4W·2W per merged token + upsampling
  2·W_in·2W_in per token of the coarser grid + skip merge 2·(W_in/2 + W_skip)·W_out per token
  + final layer on width 2C.

  Grid side g = input_size / patch_size; encoder stage i runs on grid g/2^i at width C·2^i, the
  middle stage on g/2^L at C·2^L, decoder stage i on g/2^i at C·2^max(i, 1).
  """
  C, L, p = cfg.hidden_size, cfg.num_levels, cfg.patch_size
  g = cfg.input_size // p

  def stage(depth, grid, W):
    S = grid * grid
    return 2 * depth * block_flops(W, S, S // 4, 2 * 2 * W * int(W * cfg.mlp_ratio), step)

  total = 2 * p * p * cfg.in_channels * C * g * g
  total += sum(embedder_flops(C * 2 ** j) for j in range(L + 1))
  for i in range(L):
    W = C * 2 ** i
    total += stage(cfg.depths[i], g >> i, W) + (g >> (i + 1)) ** 2 * 2 * 4 * W * 2 * W
  total += stage(cfg.depths[L], g >> L, C * 2 ** L)
  for i in reversed(range(L)):
    W_in, W_out = C * 2 ** (i + 1), C * 2 ** max(i, 1)
    total += (g >> (i + 1)) ** 2 * 2 * W_in * 2 * W_in
    total += (g >> i) ** 2 * 2 * (W_in // 2 + C * 2 ** i) * W_out
    total += stage(cfg.depths[2 * L - i], g >> i, W_out)
  W = cfg.stage_widths()[-1]
  return total + 2 * W * 2 * W + 2 * W * p * p * cfg.out_channels * g * g


def submap_attention(attention_fn, grid_hw: tuple[int, int], q_BxSxHxD, k_BxSxKxD, v_BxSxKxD,
                     **kwargs):
  """``attention_fn`` within each 2×2-strided sub-map of an h×w raster token grid (S = h·w).

  Sub-map (a, b) holds the tokens at rows 2i+a, columns 2j+b; the four are folded into the batch
  ([B·4, S/4, ...], batch-major so a batch sharding stays put), attended, and put back.
  """
  h, w = grid_hw

  def split(x_BxSxNxD):
    B, _, N, D = x_BxSxNxD.shape
    x = x_BxSxNxD.reshape(B, h // 2, 2, w // 2, 2, N, D).transpose(0, 2, 4, 1, 3, 5, 6)
    x = x.reshape(B * 4, (h // 2) * (w // 2), N, D)
    return nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_heads", "head_dim"))

  o_BqxSqxHxD = attention_fn(split(q_BxSxHxD), split(k_BxSxKxD), split(v_BxSxKxD), **kwargs)
  B, H, D = q_BxSxHxD.shape[0], o_BqxSqxHxD.shape[2], o_BqxSqxHxD.shape[3]
  o = o_BqxSqxHxD.reshape(B, 2, 2, h // 2, w // 2, H, D).transpose(0, 3, 1, 4, 2, 5, 6)
  return o.reshape(B, h * w, H, D)


def merge_2x2(x_BxSxE, h: int, w: int):
  """[B, h·w, E] -> [B, h·w/4, 4E]: each 2×2 neighbourhood's tokens side by side."""
  B, _, E = x_BxSxE.shape
  x = x_BxSxE.reshape(B, h // 2, 2, w // 2, 2, E).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (h // 2) * (w // 2), 4 * E)


def shuffle_2x2(x_BxSxE, h: int, w: int):
  """Pixel shuffle, the inverse of merge_2x2: [B, h·w, 4E] -> [B, 4·h·w, E] on a 2h×2w grid."""
  B, _, E4 = x_BxSxE.shape
  x = x_BxSxE.reshape(B, h, w, 2, 2, E4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, 4 * h * w, E4 // 4)


class Model(nn.Module):
  """U-DiT: x [B, H, W, C], t [B], y [B] int -> [B, H, W, C_out] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  def stage(self, name: str, depth: int, grid: int, x_BxSxE, c_BxE):
    """``depth`` paper blocks (2·depth adaLN-Zero blocks) with sub-map attention on the grid."""
    attn = functools.partial(submap_attention, self.attention_fn, (grid, grid))
    blocks = scanned(Block, self.cfg.remat, 2 * depth)
    x_BxSxE, _ = blocks(self.cfg, attn, name=name)(x_BxSxE, c_BxE)
    return x_BxSxE

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B, train: bool = False, force_drop_ids_B=None):
    cfg = self.cfg
    check_input(cfg, x_BxHxWxC)
    C, L, p = cfg.hidden_size, cfg.num_levels, cfg.patch_size
    g = cfg.input_size // p
    x_BxSxE = Dense(cfg, (C,), ("patch", "embed"), name="x_embedder")(patchify(x_BxHxWxC, p))
    x_BxSxE = x_BxSxE + sincos_2d(g, g, C).astype(cfg.dtype)

    y_B = drop_labels(self, cfg, y_B, train, force_drop_ids_B)
    c = []  # c[j]: conditioning of width C·2^j
    for j in range(L + 1):
      W = C * 2 ** j
      c_BxW = (TimestepEmbedder(cfg, W, name=f"t_embedder{j}")(t_B)
               + LabelEmbedder(cfg, W, name=f"y_embedder{j}")(y_B))
      c.append(nn.with_logical_constraint(c_BxW, ("act_batch", "act_embed")))

    skips = []
    for i in range(L):  # encoder: grid g/2^i, width C·2^i
      x_BxSxE = self.stage(f"enc{i}", cfg.depths[i], g >> i, x_BxSxE, c[i])
      skips.append(x_BxSxE)
      x_BxSxE = merge_2x2(x_BxSxE, g >> i, g >> i)
      x_BxSxE = Dense(cfg, (2 * C * 2 ** i,), ("embed", "mlp"), use_bias=False,
                      name=f"down{i}")(x_BxSxE)
      x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    x_BxSxE = self.stage("mid", cfg.depths[L], g >> L, x_BxSxE, c[L])
    for i in reversed(range(L)):  # decoder: back to grid g/2^i, width C·2^max(i, 1)
      W_in = x_BxSxE.shape[-1]
      x_BxSxE = Dense(cfg, (2 * W_in,), ("embed", "mlp"), use_bias=False, name=f"up{i}")(x_BxSxE)
      x_BxSxE = shuffle_2x2(x_BxSxE, g >> (i + 1), g >> (i + 1))
      x_BxSxE = jnp.concatenate([x_BxSxE, skips[i]], axis=-1)
      x_BxSxE = Dense(cfg, (C * 2 ** max(i, 1),), ("embed", "mlp"), name=f"skip{i}")(x_BxSxE)
      x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
      x_BxSxE = self.stage(f"dec{i}", cfg.depths[2 * L - i], g >> i, x_BxSxE, c[max(i, 1)])

    out_BxSxP = FinalLayer(cfg, p * p * cfg.out_channels, name="final_layer")(x_BxSxE, c[1])
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    return unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)


FAMILY = Family(
    name="udit", Config=Config, Model=Model, task="diffusion",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    # The deepest level, attention within 2x2 sub-maps.
    attention_length=lambda cfg, seq_len: cfg.max_len // 4 ** (cfg.num_levels + 1),
    test_config=dict(variant="digits", hidden_size=128, num_heads=2, depths=(1, 1, 1),
                     input_size=8, in_channels=4))
