"""The diffusion transformers' conditioning and adaLN-Zero blocks (DiT, Peebles & Xie, as
facebookresearch/DiT), shared by nets/dit.py and nets/udit.py; nets/uvit.py uses the embedders
(its time and label tokens).

c = timestep embedding (sinusoidal features -> MLP) + label embedding (a table with a "null" row
for classifier-free guidance); each block and the final layer regress shift/scale/gate vectors
from c (adaLN), with zero-initialised modulation so every block starts as the identity.

Packed rows of several images (NaViT-style; nets/dit.py): c is per image slot [B, K, E], and
``segment_ids_BxS`` (slot k's tokens carry k + 1, padding 0) selects each token's slot, so the
modulation is regressed once per image and applied to that image's tokens only, and attention
stays within each image.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import counting, moe
from nets.layers import Attention, Dense, LayerNorm, Mlp, slot_onehot

FREQUENCY_EMBEDDING_SIZE = 256
_ACT = ("act_batch", "act_seq", "act_embed")


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
  """x·(1 + scale) + shift with one vector per row [B, E] or per token [B, S, E]."""
  return x_BxSxE * (1 + _per_token(scale_BxE)) + _per_token(shift_BxE)


def _per_token(v):
  return v[:, None] if v.ndim == 2 else v


def _modulation(cfg, n: int, c, segment_ids_BxS, name: str):
  """AdaLN's n vectors per row [B, n, E], or per token [B, S, n, E] when packed (c [B, K, E]):
  regressed once per image slot, then given to the slot's tokens."""
  mod = AdaLN(cfg, n, name=name)(c)
  if segment_ids_BxS is None:
    return mod
  onehot_BxSxK = slot_onehot(segment_ids_BxS, c.shape[1])
  return jnp.einsum("bsk,bkne->bsne", onehot_BxSxK.astype(mod.dtype), mod)


def embed_packed_timesteps(embedder, t_BxK):
  """A TimestepEmbedder over per-slot timesteps [B, K] -> [B, K, E]."""
  B, K = t_BxK.shape
  return embedder(t_BxK.reshape(B * K)).reshape(B, K, -1)


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
    # Gather from a replicated table, as nets.layers.Embed does (a sharded gather is replicated
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
    # c [B, K, E] (packed image slots) gives [B, K, n, E].
    return nn.with_logical_constraint(
        mod_BxNxE, ("act_batch",) + (None,) * (mod_BxNxE.ndim - 2) + ("act_embed",))


class Block(nn.Module):
  """adaLN-Zero block: x + gate·Attn(LN(x)·(1+scale)+shift); the same for the MLP.

  The width comes from x; reads cfg.num_heads, cfg.mlp_ratio, cfg.mlp_norm_eps (and cfg.moe
  with ``use_moe``).
  """
  cfg: Any
  attention_fn: Callable[..., Any]
  moe_layout: moe.Layout = moe.Layout()
  use_moe: bool = False  # DiT-MoE: the MLP is a mixture of experts

  @nn.compact
  def __call__(self, x_BxSxE, c_BxE, segment_ids_BxS=None):
    """``segment_ids_BxS`` given: packed images, c per image slot [B, K, E]."""
    cfg = self.cfg
    E = x_BxSxE.shape[-1]
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    mod = _modulation(cfg, 6, c_BxE, segment_ids_BxS, "adaLN")  # [B, 6, E] or [B, S, 6, E]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[..., i, :] for i in range(6))
    h_BxSxE = modulate(LayerNorm(cfg, affine=False)(x_BxSxE), shift_msa, scale_msa)
    h_BxSxE = Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h_BxSxE,
                                                                             segment_ids_BxS)
    x_BxSxE = x_BxSxE + _per_token(gate_msa) * h_BxSxE
    h_BxSxE = modulate(LayerNorm(cfg, affine=False, eps=cfg.mlp_norm_eps)(x_BxSxE), shift_mlp,
                       scale_mlp)
    if self.use_moe:
      h_BxSxE = moe.MoE(cfg.moe, int(E * cfg.mlp_ratio), cfg.dtype, cfg.param_dtype,
                        nn.initializers.xavier_uniform(),
                        nn.initializers.xavier_uniform(batch_axis=(0,)), self.moe_layout,
                        name="moe")(h_BxSxE)
    else:
      h_BxSxE = Mlp(cfg, int(E * cfg.mlp_ratio), name="mlp")(h_BxSxE)
    x_BxSxE = x_BxSxE + _per_token(gate_mlp) * h_BxSxE
    return nn.with_logical_constraint(x_BxSxE, _ACT), None


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> LN -> zero-initialised Linear to ``out_dim`` (p·p·C_out)."""
  cfg: Any
  out_dim: int

  @nn.compact
  def __call__(self, x_BxSxE, c_BxE, segment_ids_BxS=None):
    mod = _modulation(self.cfg, 2, c_BxE, segment_ids_BxS, "adaLN")
    h_BxSxE = modulate(LayerNorm(self.cfg, affine=False)(x_BxSxE), mod[..., 0, :],
                       mod[..., 1, :])
    return Dense(self.cfg, (self.out_dim,), ("embed", "patch"), kernel_init=nn.initializers.zeros,
                 out_dtype=jnp.float32, name="linear")(h_BxSxE)


def check_input(cfg, x_BxHxWxC):
  """Raises a sentence when the input does not match model.input_size / model.in_channels."""
  _, H, W, C = x_BxHxWxC.shape
  if (H, W, C) != (cfg.input_size, cfg.input_size, cfg.in_channels):
    raise ValueError(f"inputs are {H}x{W}x{C} but the model expects model.input_size="
                     f"{cfg.input_size} (square) and model.in_channels={cfg.in_channels}.")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """The square-latent transformer fields the text-conditioned families share (PixArt, MMDiT):
  a base of their Config, whose ``learn_sigma`` each family sets."""
  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 0
  hidden_size: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_ratio: float = 4.0
  learn_sigma: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def image_tokens(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  width = property(lambda self: self.hidden_size)
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: int(self.hidden_size * self.mlp_ratio))
  image_size = property(lambda self: self.input_size)
  channels = property(lambda self: self.in_channels)


def check_image_fields(cfg) -> None:
  """Patch, head and sin-cos divisibility of a square-latent family (PixArt, MMDiT)."""
  if cfg.input_size % cfg.patch_size:
    raise ValueError(f"model.input_size={cfg.input_size} is not divisible by "
                     f"model.patch_size={cfg.patch_size}.")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by "
                     f"model.num_heads={cfg.num_heads}.")
  if cfg.hidden_size % 4:
    raise ValueError(f"model.hidden_size={cfg.hidden_size} must be a multiple of 4 for the "
                     "2-D sin-cos positions.")


def block_flops(width: int, tokens: int, keys: int, mlp: float, step: counting.Step) -> float:
  """One adaLN-Zero block, per image: 2·W·6W (modulation from c) + S·(2·4·W² (qkv, out)
  + non-causal attention over ``keys`` + ``mlp`` per token)."""
  return 2 * width * 6 * width + tokens * (2 * 4 * width * width
                                           + counting.attention(keys, width, False, step.executed)
                                           + mlp)


def embedder_flops(width: int) -> float:
  """Timestep MLP per image: 2·256·W + 2·W·W (the label embedding is a gather)."""
  return 2 * FREQUENCY_EMBEDDING_SIZE * width + 2 * width * width


def embedder_params(cfg, width: int) -> int:
  """Parameters of one timestep MLP and label table (+ null row) of ``width``."""
  rows = cfg.num_classes + (cfg.class_dropout_prob > 0)
  return FREQUENCY_EMBEDDING_SIZE * width + width + width * width + width + rows * width
