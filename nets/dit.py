"""DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie), as facebookresearch/DiT.

Latents [B, H, W, C] -> linear patch embedding + fixed 2-D sin-cos positions -> ``depth``
adaLN-Zero blocks conditioned on c = timestep embedding + label embedding -> adaLN final layer ->
unpatchify to [B, H, W, C_out] (C_out = 2·C with learn_sigma: eps then the variance values).
Initialisation follows the reference: Xavier-uniform linears with zero biases, N(0, 0.02) label
table and timestep MLP, zero modulation linears and a zero final layer, so every block starts as
the identity and the network output starts at exactly zero. (One difference: the reference leaves
its patch-embedding conv bias at torch's default uniform init; here it starts at zero.)

Classifier-free guidance: the label table has one extra "null" row (index num_classes) when
class_dropout_prob > 0; train=True drops labels to it with that probability ("dropout" rng);
``force_drop_ids_B`` (1 = drop) or passing y = num_classes directly gives the unconditional model.
nets/udit.py reuses Block, FinalLayer, TimestepEmbedder, LabelEmbedder and drop_labels.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import attention, moe
from nets.moe import Config as MoEConfig
from nets.vit import (Attention, Dense, LayerNorm, Mlp, build_config, check_basics, patchify,
                      scanned, sincos_2d)

# depth, hidden_size, num_heads (DiT paper Table 1); the patch size is the number after the slash.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS = {f"{size}/{p}": dict(depth=d, hidden_size=e, num_heads=h, patch_size=p)
            for size, (d, e, h) in _SIZES.items() for p in (2, 4, 8)}
# sklearn digits (8×8 grey, 10 classes) and tests.
VARIANTS["digits"] = dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8,
                          in_channels=1, num_classes=10)

FREQUENCY_EMBEDDING_SIZE = 256
_ACT = ("act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  input_size: int = 32  # square latent side: 32 = 256×256 images through the SD VAE
  in_channels: int = 4
  num_classes: int = 1000
  patch_size: int = 0
  hidden_size: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  # diffusers' DiT differs from the reference in two constants (nets/convert/dit.py sets them):
  # its timestep frequencies are 10000^(-k/(128 - shift)) with downscale_freq_shift=1, and the
  # LayerNorm before each MLP (norm3) takes its config's norm_eps, 1e-5 by default.
  timestep_freq_shift: float = 0.0
  mlp_norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.llama.REMAT_POLICIES
  # num_experts > 0: DiT-MoE blocks (routed GELU experts, optional shared experts; nets/moe.py)
  moe: MoEConfig = MoEConfig()

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    overrides = {"moe": MoEConfig.from_config(model_cfg.get("moe")), **overrides}
    return build_config(cls, "dit", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "dit", ("input_size", "in_channels", "num_classes", "patch_size",
                               "hidden_size", "depth", "num_heads"))
    if self.input_size % self.patch_size:
      raise ValueError(f"model.input_size={self.input_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}.")
    if self.hidden_size % 4:
      raise ValueError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 for the "
                       "2-D sin-cos positions.")
    if self.moe.enabled and self.depth % self.moe.every:
      raise ValueError(f"model.depth={self.depth} is not a multiple of "
                       f"model.moe.every={self.moe.every}.")
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"model.class_dropout_prob={self.class_dropout_prob} must be in [0, 1].")
    if not 0.0 <= self.timestep_freq_shift < FREQUENCY_EMBEDDING_SIZE // 2:
      raise ValueError(f"model.timestep_freq_shift={self.timestep_freq_shift} must be in "
                       f"[0, {FREQUENCY_EMBEDDING_SIZE // 2}).")
    if self.mlp_norm_eps <= 0:
      raise ValueError(f"model.mlp_norm_eps={self.mlp_norm_eps} must be positive.")

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def null_label(self) -> int:
    return self.num_classes


def num_params(cfg: Config, include_pos_embed: bool = False, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model).

  The fixed positions are a constant here, not a parameter; the reference stores them as a frozen
  nn.Parameter and counts them, which ``include_pos_embed=True`` reproduces. ``active=True``
  counts the top_k routed experts a token uses in MoE blocks, not all of them.
  """
  E, P = cfg.hidden_size, cfg.patch_size ** 2
  M = int(E * cfg.mlp_ratio)
  mlp = (E * M + M) + (M * E + E)
  block = (3 * E * E + 3 * E) + (E * E + E) + mlp + (6 * E * E + 6 * E)
  n = P * cfg.in_channels * E + E  # patch embedding
  n += FREQUENCY_EMBEDDING_SIZE * E + E + E * E + E  # timestep MLP
  n += (cfg.num_classes + (cfg.class_dropout_prob > 0)) * E  # label table (+ null row)
  n += cfg.depth * block + (2 * E * E + 2 * E) + (E * P * cfg.out_channels + P * cfg.out_channels)
  if include_pos_embed:
    n += (cfg.input_size // cfg.patch_size) ** 2 * E
  if cfg.moe.enabled:
    total, used = cfg.moe.num_params(E, M)
    n += (cfg.depth // cfg.moe.every) * ((used if active else total) - mlp)
  return n


def unpatchify(x_BxSxP, h: int, w: int, p: int):
  """Inverse of nets.vit.patchify: [B, h·w, p·p·C] -> [B, h·p, w·p, C]."""
  B = x_BxSxP.shape[0]
  C = x_BxSxP.shape[-1] // (p * p)
  x = x_BxSxP.reshape(B, h, w, p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, h * p, w * p, C)


def timestep_embedding(t_B, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0,
                       freq_shift: float = 0.0):
  """Sinusoidal timestep features [B, dim] float32, [cos, sin] as GLIDE/DiT; t may be fractional.

  ``freq_shift`` is diffusers' downscale_freq_shift (frequencies max_period^(-k/(half - shift))).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  args_BxF = t_B.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args_BxF), jnp.sin(args_BxF)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x_BxSxE, shift_BxE, scale_BxE):
  return x_BxSxE * (1 + scale_BxE[:, None]) + shift_BxE[:, None]


def drop_labels(module: nn.Module, cfg, y_B, train: bool, force_drop_ids_B=None):
  """Replaces dropped labels by the null label (num_classes), as the reference's token_drop.

  ``force_drop_ids_B`` (1 = drop), when given, decides alone; otherwise train=True drops each
  label with probability cfg.class_dropout_prob, drawing from the module's "dropout" rng.
  """
  if force_drop_ids_B is not None:
    drop_B = force_drop_ids_B == 1
  elif train and cfg.class_dropout_prob > 0:
    drop_B = jax.random.uniform(module.make_rng("dropout"), y_B.shape) < cfg.class_dropout_prob
  else:
    return y_B
  return jnp.where(drop_B, cfg.num_classes, y_B)


class TimestepEmbedder(nn.Module):
  """t [B] -> 256 sinusoidal features -> Linear -> SiLU -> Linear -> [B, width]."""
  cfg: Any
  width: int
  freq_shift: float = 0.0  # see timestep_embedding

  @nn.compact
  def __call__(self, t_B):
    init = nn.initializers.normal(0.02)
    h_BxM = Dense(self.cfg, (self.width,), (None, "mlp"), kernel_init=init, name="fc1")(
        timestep_embedding(t_B, freq_shift=self.freq_shift))
    return Dense(self.cfg, (self.width,), ("mlp", "embed"), kernel_init=init, name="fc2")(
        nn.silu(h_BxM))


class LabelEmbedder(nn.Module):
  """Label table [num_classes (+1 null row when class_dropout_prob > 0), width]."""
  cfg: Any
  width: int

  @nn.compact
  def __call__(self, y_B):
    cfg = self.cfg
    rows = cfg.num_classes + (cfg.class_dropout_prob > 0)
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("classes", "embed")), (rows, self.width),
        jnp.dtype(cfg.param_dtype))
    # Gather from a replicated table, as nets.llama.Embed does (a sharded gather is replicated
    # by XLA anyway, with a warning).
    table = nn.with_logical_constraint(table, (None, None))
    return jnp.take(table, y_B, axis=0).astype(cfg.dtype)


class AdaLN(nn.Module):
  """SiLU(c) -> zero-initialised Linear to ``n`` shift/scale/gate vectors: [B, n, width].

  The kernel's output dim is a model width, named "mlp" so the tensor axis splits these large
  n·E² kernels (a third of DiT's weights) instead of replicating them.
  """
  cfg: Any
  n: int

  @nn.compact
  def __call__(self, c_BxE):
    E = c_BxE.shape[-1]
    mod_BxNxE = Dense(self.cfg, (self.n, E), ("embed", None, "mlp"),
                      kernel_init=nn.initializers.zeros, name="linear")(nn.silu(c_BxE))
    return nn.with_logical_constraint(mod_BxNxE, ("act_batch", None, "act_embed"))


class Block(nn.Module):
  """adaLN-Zero block: x + gate·Attn(LN(x)·(1+scale)+shift); the same for the MLP.

  The width comes from x; reads cfg.num_heads and cfg.mlp_ratio (shared with nets/udit.py).
  """
  cfg: Any
  attention_fn: Callable[..., Any]
  moe_layout: moe.Layout = moe.Layout()
  use_moe: bool = False  # DiT-MoE: the MLP is a mixture of experts

  @nn.compact
  def __call__(self, x_BxSxE, c_BxE):
    cfg = self.cfg
    E = x_BxSxE.shape[-1]
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    mod_Bx6xE = AdaLN(cfg, 6, name="adaLN")(c_BxE)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod_Bx6xE[:, i] for i in range(6))
    h_BxSxE = modulate(LayerNorm(cfg, affine=False)(x_BxSxE), shift_msa, scale_msa)
    h_BxSxE = Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h_BxSxE)
    x_BxSxE = x_BxSxE + gate_msa[:, None] * h_BxSxE
    # nets/udit.py's Config has no mlp_norm_eps field: U-DiT keeps the reference's 1e-6.
    mlp_norm_eps = getattr(cfg, "mlp_norm_eps", 1e-6)
    h_BxSxE = modulate(LayerNorm(cfg, affine=False, eps=mlp_norm_eps)(x_BxSxE), shift_mlp,
                       scale_mlp)
    if self.use_moe:
      h_BxSxE = moe.MoE(cfg.moe, int(E * cfg.mlp_ratio), cfg.dtype, cfg.param_dtype,
                        nn.initializers.xavier_uniform(),
                        nn.initializers.xavier_uniform(batch_axis=(0,)), self.moe_layout,
                        name="moe")(h_BxSxE)
    else:
      h_BxSxE = Mlp(cfg, int(E * cfg.mlp_ratio), name="mlp")(h_BxSxE)
    x_BxSxE = x_BxSxE + gate_mlp[:, None] * h_BxSxE
    return nn.with_logical_constraint(x_BxSxE, _ACT), None


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> LN -> zero-initialised Linear to ``out_dim`` (p·p·C_out)."""
  cfg: Any
  out_dim: int

  @nn.compact
  def __call__(self, x_BxSxE, c_BxE):
    mod_Bx2xE = AdaLN(self.cfg, 2, name="adaLN")(c_BxE)
    h_BxSxE = modulate(LayerNorm(self.cfg, affine=False)(x_BxSxE), mod_Bx2xE[:, 0],
                       mod_Bx2xE[:, 1])
    return Dense(self.cfg, (self.out_dim,), ("embed", "patch"), kernel_init=nn.initializers.zeros,
                 out_dtype=jnp.float32, name="linear")(h_BxSxE)


def check_input(cfg, x_BxHxWxC):
  """Raises a sentence when the input does not match model.input_size / model.in_channels."""
  _, H, W, C = x_BxHxWxC.shape
  if (H, W, C) != (cfg.input_size, cfg.input_size, cfg.in_channels):
    raise ValueError(f"inputs are {H}x{W}x{C} but the model expects model.input_size="
                     f"{cfg.input_size} (square) and model.in_channels={cfg.in_channels}.")


class Model(nn.Module):
  """DiT: x [B, H, W, C], t [B], y [B] int -> [B, H, W, C_out] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention
  moe_layout: moe.Layout = moe.Layout()  # MoE dispatch groups and expert parallelism

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B, train: bool = False, force_drop_ids_B=None):
    cfg = self.cfg
    check_input(cfg, x_BxHxWxC)
    E, p = cfg.hidden_size, cfg.patch_size
    g = cfg.input_size // p
    x_BxSxE = Dense(cfg, (E,), ("patch", "embed"), name="x_embedder")(patchify(x_BxHxWxC, p))
    x_BxSxE = x_BxSxE + sincos_2d(g, g, E).astype(cfg.dtype)
    y_B = drop_labels(self, cfg, y_B, train, force_drop_ids_B)
    c_BxE = (TimestepEmbedder(cfg, E, cfg.timestep_freq_shift, name="t_embedder")(t_B)
             + LabelEmbedder(cfg, E, name="y_embedder")(y_B))
    c_BxE = nn.with_logical_constraint(c_BxE, ("act_batch", "act_embed"))

    blocks = moe.stack(Block, cfg.moe, (cfg, self.attention_fn, self.moe_layout), cfg.depth,
                       lambda unit, length: scanned(unit, cfg, length, num_broadcast=1))
    x_BxSxE, _ = blocks(x_BxSxE, c_BxE)
    out_BxSxP = FinalLayer(cfg, p * p * cfg.out_channels, name="final_layer")(x_BxSxE, c_BxE)
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    return unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)
