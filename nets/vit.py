"""Vision Transformer classifier (ViT / DeiT sizes) and the pieces the diffusion transformers share.

Images [B, H, W, C] are cut into p×p patches that are flattened and projected (no convolution), so
tokens flow as [B, S, E] with the sequence on axis 1, like the LM's, and the same attention
functions apply (nets/attention.py, or the sequence-parallel ones from parallel/). Pre-norm blocks:
x + MHA(LN(x)); x + MLP(LN(x)); then a final LN, class-token or mean pooling, and a linear head.
nets/dit.py and nets/udit.py import Dense, LayerNorm, Attention, Mlp, patchify, sincos_2d,
scanned and the config helpers from here.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nets import attention, llama
from nets.llama import build_config

# width, depth, mlp_dim, heads: ViT paper Table 1 (B, L, H); Ti and S from DeiT.
_SIZES = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12),
          "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}
VARIANTS = {f"{size}/{p}": dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=p)
            for size, (w, d, m, h) in _SIZES.items() for p in (8, 14, 16, 32)}
# sklearn digits (8×8 grey, 10 classes); use image_size=16, patch_size=4 for 16×16 inputs.
VARIANTS["digits"] = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2,
                          image_size=8, channels=1, num_classes=10)

POSEMBS = ("learn", "sincos2d")
POOLS = ("token", "gap")
_ACT = ("act_batch", "act_seq", "act_embed")


def check_basics(cfg, family: str, size_fields: tuple[str, ...]):
  """Shared validation: sizes set and positive, remat policy and dtype names known."""
  for name in size_fields:
    if getattr(cfg, name) <= 0:
      raise ValueError(f"model.{name}={getattr(cfg, name)} must be positive; set model.variant "
                       f"(see nets/{family}.py VARIANTS) or model.{name}.")
  llama.check_remat_and_dtypes(cfg)


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
  posemb: str = "learn"  # one of POSEMBS; "sincos2d" is fixed (MAE / DiT layout)
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
  remat: str = "none"  # one of nets.llama.REMAT_POLICIES

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
    if self.posemb == "sincos2d" and self.width % 4:
      raise ValueError(f"model.width={self.width} must be a multiple of 4 for sincos2d positions.")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is not one of {POOLS}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1).")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  E, M, K = cfg.width, cfg.mlp_dim, cfg.num_classes
  per_layer = 2 * E + (3 * E * E + 3 * E) + (E * E + E) + 2 * E + (E * M + M) + (M * E + E)
  n = cfg.patch_size ** 2 * cfg.channels * E + E  # patch embedding
  n += cfg.num_patches * E if cfg.posemb == "learn" else 0
  n += E if cfg.pool == "token" else 0
  return n + cfg.depth * per_layer + 2 * E + E * K + K


# --- Shared pieces (also used by nets/dit.py and nets/udit.py) ---------------------------------

def patchify(x_BxHxWxC, p: int):
  """[B, H, W, C] -> [B, (H/p)·(W/p), p·p·C], raster order; a patch flattens as (row, col, C)."""
  B, H, W, C = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // p) * (W // p), p * p * C)


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos positions [h·w, dim] in raster order, laid out as MAE/DiT's
  get_2d_sincos_pos_embed: first half encodes the column, second the row; each half is
  [sin, cos] of pos·10000^(-k/(dim/4))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                           indexing="ij")
  def one_axis(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def scanned(block: type[nn.Module], cfg, length: int, num_broadcast: int):
  """``length`` copies of ``block`` stacked by nn.scan (parameters on a leading "layers" axis).

  The block is called as ``block(carry, *broadcast_args) -> (carry, None)``.
  """
  return nn.scan(llama.remat(block, cfg.remat), variable_axes={"params": 0, "aux": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * num_broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Dense(nn.Module):
  """x · kernel + bias, contracting the last ``n_in`` dims of x with kernel in_dims + out_shape.

  nets.llama.Proj without a bias and with one fixed initializer does not fit the vision
  references; like Proj, it avoids nn.DenseGeneral (which breaks for N-D kernels under a mesh).
  ``kernel_init=None`` is Xavier-uniform over the flattened (in, out) dims, as torch's
  xavier_uniform_ on the equivalent nn.Linear. The bias is zero-initialised and takes the output
  dims' logical names. ``out_dtype`` float32 (the output heads) accumulates and returns the
  compute-dtype product in float32, so what the loss sees is not rounded to bf16.
  """
  cfg: Any  # reads dtype and param_dtype
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int = 1
  use_bias: bool = True
  kernel_init: Callable[..., Any] | None = None
  out_dtype: Any = None  # None: the compute dtype

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    n_out = len(self.out_shape)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(self.n_in)),
        out_axis=tuple(range(self.n_in, self.n_in + n_out)))
    param_dtype, dtype = jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        in_shape + tuple(self.out_shape), param_dtype)
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.n_in,
                      preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[self.n_in:]),
                        tuple(self.out_shape), param_dtype)
      y = y + bias.astype(y.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32; ``affine=False`` is DiT's parameter-free norm."""
  cfg: Any  # reads dtype, param_dtype
  affine: bool = True
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      E, param_dtype = x.shape[-1], jnp.dtype(self.cfg.param_dtype)
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (E,), param_dtype)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        (E,), param_dtype)
      h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return h.astype(self.cfg.dtype)


class Attention(nn.Module):
  """Bidirectional multi-head self-attention; fused biased qkv projection as timm / DiT.

  The width E comes from the input; head_dim = E // num_heads.
  """
  cfg: Any
  attention_fn: Callable[..., Any]
  num_heads: int

  @nn.compact
  def __call__(self, x_BxSxE):
    E, H = x_BxSxE.shape[-1], self.num_heads
    D = E // H
    qkv_BxSx3xHxD = Dense(self.cfg, (3, H, D), ("embed", None, "heads", "head_dim"),
                          name="qkv")(x_BxSxE)
    q_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 0],
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    k_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 1],
                                           ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    v_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 2],
                                           ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    o_BxSxHxD = self.attention_fn(q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, causal=False,
                                  positions_BxS=None, segment_ids_BxS=None)
    o_BxSxHxD = nn.with_logical_constraint(o_BxSxHxD,
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    return Dense(self.cfg, (E,), ("heads", "head_dim", "embed"), n_in=2, name="out")(o_BxSxHxD)


class Mlp(nn.Module):
  """Linear -> GELU (tanh-approximate unless ``approximate=False``) -> Linear, back to the input
  width."""
  cfg: Any
  hidden: int
  approximate: bool = True

  @nn.compact
  def __call__(self, x_BxSxE):
    h_BxSxM = Dense(self.cfg, (self.hidden,), ("embed", "mlp"), name="fc1")(x_BxSxE)
    h_BxSxM = nn.with_logical_constraint(nn.gelu(h_BxSxM, approximate=self.approximate),
                                         ("act_batch", "act_seq", "act_mlp"))
    return Dense(self.cfg, (x_BxSxE.shape[-1],), ("mlp", "embed"), name="fc2")(h_BxSxM)


# --- ViT ---------------------------------------------------------------------------------------

class Block(nn.Module):
  """Pre-norm encoder block: x + MHA(LN(x)); x + MLP(LN(x))."""
  cfg: Config
  attention_fn: Callable[..., Any]
  train: bool = False

  @nn.compact
  def __call__(self, x_BxSxE):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=not self.train)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    h_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm1")(x_BxSxE)
    h_BxSxE = Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h_BxSxE)
    x_BxSxE = x_BxSxE + drop(h_BxSxE)
    h_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm2")(x_BxSxE)
    x_BxSxE = x_BxSxE + drop(Mlp(cfg, cfg.mlp_dim, cfg.gelu_approximate, name="mlp")(h_BxSxE))
    return nn.with_logical_constraint(x_BxSxE, _ACT), None


class Model(nn.Module):
  """ViT classifier: images [B, H, W, C] -> logits [B, num_classes] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False):
    cfg = self.cfg
    B, H, W, C = images_BxHxWxC.shape
    if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"images are {H}x{W}x{C} but the model expects model.image_size="
                       f"{cfg.image_size} (square) and model.channels={cfg.channels}.")
    x_BxSxE = Dense(cfg, (cfg.width,), ("patch", "embed"), name="embed")(
        patchify(images_BxHxWxC, cfg.patch_size))
    S, E = x_BxSxE.shape[1], cfg.width
    if cfg.posemb == "learn":
      pos_SxE = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("patch", "embed")), (S, E), jnp.dtype(cfg.param_dtype))
    else:
      g = cfg.image_size // cfg.patch_size
      pos_SxE = sincos_2d(g, g, E)
    x_BxSxE = x_BxSxE + pos_SxE.astype(cfg.dtype)
    if cfg.pool == "token":
      cls_E = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                         (E,), jnp.dtype(cfg.param_dtype))
      cls_Bx1xE = jnp.broadcast_to(cls_E.astype(cfg.dtype), (B, 1, E))
      x_BxSxE = jnp.concatenate([cls_Bx1xE, x_BxSxE], axis=1)  # S becomes 1 + S

    blocks = scanned(Block, cfg, cfg.depth, num_broadcast=0)
    x_BxSxE, _ = blocks(cfg, self.attention_fn, train, name="layers")(x_BxSxE)
    x_BxSxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm")(x_BxSxE)
    if cfg.pool == "token":
      pooled_BxE = x_BxSxE[:, 0]
    else:
      pooled_BxE = jnp.mean(x_BxSxE.astype(jnp.float32), axis=1).astype(cfg.dtype)
    pooled_BxE = nn.with_logical_constraint(pooled_BxE, ("act_batch", "act_embed"))
    # Zero-initialised head (big_vision's default): every class starts equally likely.
    logits_BxK = Dense(cfg, (cfg.num_classes,), ("embed", "classes"),
                       kernel_init=nn.initializers.zeros, out_dtype=jnp.float32,
                       name="head")(pooled_BxE)
    logits_BxK = nn.with_logical_constraint(logits_BxK, ("act_batch", None))
    return logits_BxK.astype(jnp.float32)
