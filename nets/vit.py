"""Vision Transformer classifier (ViT / DeiT sizes).

Images [B, H, W, C] are cut into p×p patches that are flattened and projected (no convolution), so
tokens flow as [B, S, E] with the sequence on axis 1, like the LM's, and the same attention
functions apply (nets/attention.py, or the sequence-parallel ones from parallel/). Pre-norm blocks:
x + MHA(LN(x)); x + MLP(LN(x)); then a final LN, class-token or mean pooling, and a linear head.
The layers (Dense, LayerNorm, Attention, Mlp, patchify, sincos_2d) are nets/layers.py's.

Packed images at native resolution (NaViT, Dehghani et al. 2023, "Patch n' Pack"): called with
``segment_ids_BxS``, the input is already patches [B, S, p·p·C] of several images per row
(train/image_packing.py), each token with its image's segment id (1..K; 0 = padding) and its
(row, col) patch position. Attention stays within an image, the positions are each token's own
(``posemb``: a learned table of the image_size grid, fixed sin-cos, factorised row + column
tables, or sin-cos of fractional positions, row·G/h with h the image's own height in patches),
and the pooled vector is each image's token mean, so the output is logits [B, K, classes], one
row per image slot (slots without an image give meaningless logits the loss masks). Parameters
are the same in both call forms: a fixed-size image is the one-image special case.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting
from nets.layers import (Attention, Dense, LayerNorm, Mlp, build_config, check_basics,
                         check_positive_floats, patchify, scanned, sincos_2d, sincos_at,
                         slot_onehot)
from nets.registry import Family

# width, depth, mlp_dim, heads: ViT paper Table 1 (B, L, H); Ti and S from DeiT.
_SIZES = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12),
          "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}
VARIANTS = {f"{size}/{p}": dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=p)
            for size, (w, d, m, h) in _SIZES.items() for p in (8, 14, 16, 32)}
# sklearn digits (8×8 grey, 10 classes); use image_size=16, patch_size=4 for 16×16 inputs.
VARIANTS["digits"] = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2,
                          image_size=8, channels=1, num_classes=10)

# "learn": a [G·G, E] table of the image_size grid (G = image_size / patch_size); "sincos2d":
# fixed (MAE / DiT layout); "factorized": learned row and column tables [G, E] added (NaViT);
# "fractional": sincos2d at row·G/h, col·G/w, positions relative to the image's own h×w patches.
POSEMBS = ("learn", "sincos2d", "factorized", "fractional")
POOLS = ("token", "gap")
_ACT = ("act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  image_size: int = 224  # square images
  channels: int = 3
  num_classes: int = 1000
  patch_size: int = 0
  width: int = 0
  depth: int = 0
  mlp_dim: int = 0
  num_heads: int = 0
  posemb: str = "learn"  # one of POSEMBS
  # One of POOLS: class token (the sequence becomes 1 + S, which a seq mesh axis may not divide)
  # or global average pooling.
  pool: str = "token"
  dropout: float = 0.0  # on the residual branches when train=True ("dropout" rng)
  norm_eps: float = 1e-6  # Hugging Face ViT checkpoints use 1e-12
  # The MLP's GELU: tanh approximation (big_vision), or False for the exact erf form that
  # Hugging Face ViT (hidden_act="gelu") and timm use; the two differ by up to 4.7e-4 per unit.
  gelu_approximate: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    return build_config(cls, "vit", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "vit", ("image_size", "channels", "num_classes", "patch_size", "width",
                               "depth", "mlp_dim", "num_heads"))
    if self.image_size % self.patch_size:
      raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} is not divisible by model.num_heads="
                       f"{self.num_heads}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"model.posemb={self.posemb!r} is not one of {POSEMBS}.")
    if self.posemb in ("sincos2d", "fractional") and self.width % 4:
      raise ValueError(f"model.width={self.width} must be a multiple of 4 for {self.posemb} "
                       "positions.")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is not one of {POOLS}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1).")
    check_positive_floats(self, ("norm_eps",))

  @property
  def grid(self) -> int:
    """Patches per side of the largest (square) image: image_size / patch_size."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def max_len(self) -> int:
    """Tokens the blocks see: the patches, and the class token with pool="token"."""
    return self.num_patches + (self.pool == "token")

  # The names every family's Config shares (nets/registry.py).
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: self.mlp_dim)


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  E, M, K = cfg.width, cfg.mlp_dim, cfg.num_classes
  per_layer = 2 * E + (3 * E * E + 3 * E) + (E * E + E) + 2 * E + (E * M + M) + (M * E + E)
  n = cfg.patch_size ** 2 * cfg.channels * E + E  # patch embedding
  n += cfg.num_patches * E if cfg.posemb == "learn" else 0
  n += 2 * cfg.grid * E if cfg.posemb == "factorized" else 0
  n += E if cfg.pool == "token" else 0
  return n + cfg.depth * per_layer + 2 * E + E * K + K


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: 2·p²·C·E·S_p (patch embedding) + L·S·(2·4·E² + 2·2·E·M + attention)
  + 2·E·K.

  S_p patches; S = S_p (+1 with a class token) tokens; non-causal attention over S keys, width E.
  A packed row (``step.seq_len`` tokens) counts as one image of S_p = S = seq_len tokens with
  attention over the whole row (what the masked kernels run; its images see fewer keys).
  """
  E, S_p, S = cfg.width, cfg.num_patches, cfg.max_len
  if step.seq_len:
    S_p = S = step.seq_len
  layer = S * (2 * 4 * E * E + 2 * 2 * E * cfg.mlp_dim
               + counting.attention(S, E, False, step.executed))
  return (2 * cfg.patch_size ** 2 * cfg.channels * E * S_p + cfg.depth * layer
          + 2 * E * cfg.num_classes)


class Block(nn.Module):
  """Pre-norm encoder block: x + MHA(LN(x)); x + MLP(LN(x))."""
  cfg: Config
  attention_fn: Callable[..., Any]
  train: bool = False

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS=None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=not self.train)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    h_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm1")(x_BxSxE)
    h_BxSxE = Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h_BxSxE,
                                                                             segment_ids_BxS)
    x_BxSxE = x_BxSxE + drop(h_BxSxE)
    h_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm2")(x_BxSxE)
    x_BxSxE = x_BxSxE + drop(Mlp(cfg, cfg.mlp_dim, cfg.gelu_approximate, name="mlp")(h_BxSxE))
    return nn.with_logical_constraint(x_BxSxE, _ACT), None


def _position_embedding(module, cfg: Config, rows, cols, heights, widths):
  """[..., E] embedding of patch positions rows, cols [...] (integers; ``heights``, ``widths``
  [...]: the patches per side of each token's image, which only "fractional" reads)."""
  G, E = cfg.grid, cfg.width
  param = lambda name, shape: module.param(name, nn.with_logical_partitioning(
      nn.initializers.normal(0.02), ("patch", "embed")), shape, jnp.dtype(cfg.param_dtype))
  if cfg.posemb == "learn":
    return jnp.take(param("pos_embedding", (G * G, E)), rows * G + cols, axis=0)
  if cfg.posemb == "sincos2d":
    return jnp.take(jnp.asarray(sincos_2d(G, G, E)), rows * G + cols, axis=0)
  if cfg.posemb == "factorized":
    return (jnp.take(param("pos_row", (G, E)), rows, axis=0)
            + jnp.take(param("pos_col", (G, E)), cols, axis=0))
  return sincos_at(rows * (G / heights), cols * (G / widths), E)


class Model(nn.Module):
  """ViT classifier: images [B, H, W, C] -> logits [B, num_classes] float32; or packed patches
  [B, S, p·p·C] with ``segment_ids_BxS``, ``positions_BxSx2`` (row, col) and ``num_images`` K
  -> logits [B, K, num_classes] float32 (see the module docstring)."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False, segment_ids_BxS=None,
               positions_BxSx2=None, num_images: int = 0):
    cfg = self.cfg
    packed = segment_ids_BxS is not None
    if packed:
      if cfg.pool != "gap" or positions_BxSx2 is None or num_images < 1:
        raise ValueError("packed images need model.pool='gap', positions and num_images >= 1.")
      patches_BxSxP = images_BxHxWxC
      B = patches_BxSxP.shape[0]
      rows_BxS, cols_BxS = positions_BxSx2[..., 0], positions_BxSx2[..., 1]
      onehot_BxSxK = slot_onehot(segment_ids_BxS, num_images)
      heights_BxS = widths_BxS = None
      if cfg.posemb == "fractional":  # each image's extent: 1 + its largest row / column
        extent = lambda pos_BxS: onehot_BxSxK @ jnp.max(
            onehot_BxSxK * (pos_BxS[:, :, None] + 1).astype(jnp.float32), axis=1)[:, :, None]
        heights_BxS = jnp.maximum(extent(rows_BxS)[..., 0], 1.0)
        widths_BxS = jnp.maximum(extent(cols_BxS)[..., 0], 1.0)
    else:
      B, H, W, C = images_BxHxWxC.shape
      if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.channels):
        raise ValueError(f"images are {H}x{W}x{C} but the model expects model.image_size="
                         f"{cfg.image_size} (square) and model.channels={cfg.channels}.")
      patches_BxSxP = patchify(images_BxHxWxC, cfg.patch_size)
      grid_r, grid_c = jnp.meshgrid(jnp.arange(cfg.grid), jnp.arange(cfg.grid), indexing="ij")
      rows_BxS, cols_BxS = grid_r.reshape(1, -1), grid_c.reshape(1, -1)
      heights_BxS = widths_BxS = jnp.full(rows_BxS.shape, float(cfg.grid))
    x_BxSxE = Dense(cfg, (cfg.width,), ("patch", "embed"), name="embed")(patches_BxSxP)
    E = cfg.width
    pos_BxSxE = _position_embedding(self, cfg, rows_BxS, cols_BxS, heights_BxS, widths_BxS)
    x_BxSxE = x_BxSxE + pos_BxSxE.astype(cfg.dtype)
    if cfg.pool == "token":
      cls_E = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                         (E,), jnp.dtype(cfg.param_dtype))
      cls_Bx1xE = jnp.broadcast_to(cls_E.astype(cfg.dtype), (B, 1, E))
      x_BxSxE = jnp.concatenate([cls_Bx1xE, x_BxSxE], axis=1)  # S becomes 1 + S

    blocks = scanned(Block, cfg.remat, cfg.depth)
    x_BxSxE, _ = blocks(cfg, self.attention_fn, train, name="layers")(x_BxSxE, segment_ids_BxS)
    x_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm")(x_BxSxE)
    if packed:  # each image's mean over its own tokens
      sums_BxKxE = jnp.einsum("bsk,bse->bke", onehot_BxSxK, x_BxSxE.astype(jnp.float32))
      counts_BxK = jnp.maximum(jnp.sum(onehot_BxSxK, axis=1), 1.0)
      pooled = (sums_BxKxE / counts_BxK[:, :, None]).astype(cfg.dtype)
      pooled = nn.with_logical_constraint(pooled, ("act_batch", None, "act_embed"))
    elif cfg.pool == "token":
      pooled = x_BxSxE[:, 0]
    else:
      pooled = jnp.mean(x_BxSxE.astype(jnp.float32), axis=1).astype(cfg.dtype)
    if not packed:
      pooled = nn.with_logical_constraint(pooled, ("act_batch", "act_embed"))
    # Zero-initialised head (big_vision's default): every class starts equally likely.
    logits = Dense(cfg, (cfg.num_classes,), ("embed", "classes"),
                   kernel_init=nn.initializers.zeros, out_dtype=jnp.float32, name="head")(pooled)
    logits = nn.with_logical_constraint(logits, ("act_batch",) + (None,) * (logits.ndim - 1))
    return logits.astype(jnp.float32)


FAMILY = Family(
    name="vit", Config=Config, Model=Model, task="classification",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    # seq_len: the tokens of a packed row (train/image_packing.py), else 0
    attention_length=lambda cfg, seq_len: seq_len or cfg.max_len, converter="vit",
    test_config=dict(variant="digits", width=256, mlp_dim=512, depth=2, num_heads=4,
                     image_size=16, patch_size=2, channels=3))
