"""Layers every family shares: projections, embeddings, norms, rotary, attention and MLP blocks,
patches and fixed positions, the remat policies and the one scanned-stack helper; and the config
helpers every family's ``Config.from_config`` and ``validate`` use.

The layers read their hyperparameters from the family's ``cfg`` (dtype, param_dtype, and where
named: init_std, norm_eps, vocab_size, d_model), so they take any family's Config.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from nets import moe

# train.remat, what a scanned block keeps for the backward pass; see ``remat``.
REMAT_POLICIES = ("none", "full", "selective", "offload")


def build_config(cls, family: str, variants: dict, model_cfg, overrides: dict):
  """``Config.from_config`` of every family: the dataclass ``cls`` from ``config.model``.

  ``name`` (the family) is not a field. ``variant`` (vision families) presets what config.model
  leaves unset; a field given in config.model (or in ``overrides``) wins over the variant's value,
  and a field set to None counts as unset. Unknown fields and unknown variants raise a sentence.
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  given = {k: v for k, v in model_cfg.items() if k != "name" and v is not None}
  given.update(overrides)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.model has unknown field(s) {unknown} for model '{family}'; "
                     f"known fields: {sorted(fields)}.")
  variant = given.get("variant", "")
  if variant and variant not in variants:
    raise ValueError(f"model.variant={variant!r} is not a known {family} variant; known variants: "
                     f"{sorted(variants)}.")
  cfg = cls(**{**variants.get(variant, {}), **given})
  cfg.validate()
  return cfg


def check_remat_and_dtypes(cfg) -> None:
  """Checks every family shares: a known remat policy and valid dtype / param_dtype names."""
  if cfg.remat not in REMAT_POLICIES:
    raise ValueError(f"remat={cfg.remat!r} is not one of {REMAT_POLICIES}.")
  for name in ("dtype", "param_dtype"):
    try:
      jnp.dtype(getattr(cfg, name))
    except TypeError:
      raise ValueError(f"model.{name}={getattr(cfg, name)!r} is not a dtype name.") from None


def check_positive_floats(cfg, names: tuple[str, ...]) -> None:
  """Fields that must be finite and positive (a zero RoPE base or norm epsilon compiles and
  trains NaN)."""
  for name in names:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and value > 0):
      raise ValueError(f"model.{name}={value!r} must be a finite number in (0, inf).")


_EXPERT_NAMES = jax.checkpoint_policies.save_only_these_names(moe.EXPERT_MATMUL)


def _selective(prim, *args, **params) -> bool:
  """Keeps weight-matmul outputs: dot_generals without batch dimensions (every projection is a
  tensordot of activations with a kernel, while attention's q·k and p·v einsums batch over B and
  the KV heads) and MoE expert matmuls, which are batched over experts and so tagged by name."""
  return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
          or _EXPERT_NAMES(prim, *args, **params))


def _offload(prim, *args, **params):
  """What ``_selective`` keeps, moved to pinned host memory until the backward pass needs it."""
  if _selective(prim, *args, **params):
    return jax.ad_checkpoint.Offloadable(src="device", dst="pinned_host")
  return jax.ad_checkpoint.Recompute


_REMAT = {"full": jax.checkpoint_policies.nothing_saveable, "selective": _selective,
          "offload": _offload}


def remat(module_cls, policy: str):
  """``module_cls`` wrapped for ``policy`` (one of REMAT_POLICIES): the scanned block of every
  family goes through here, so the policies mean the same thing in every family.

  none: unchanged; the backward pass keeps every intermediate of every layer.
  full: only the block's inputs are kept and its whole forward runs again in the backward pass.
  selective (Megatron-style): the outputs of the weight matmuls are kept (q/k/v/o, MLP, MoE
    router and experts, Mamba's projections, adaLN); norms, activations, RoPE, attention's
    logits and softmax and Mamba's scan are recomputed: cheap work, and the largest tensors.
  offload: what selective keeps, but in pinned host memory
    (parallel.devices.check_remat_supported). XLA:CPU
    ignores memory kinds when lowering, so on CPU it is the selective program.
  """
  if policy == "none":
    return module_cls
  # scan already prevents CSE across layers
  return nn.remat(module_cls, prevent_cse=False, policy=_REMAT[policy])


def check_basics(cfg, family: str, size_fields: tuple[str, ...]):
  """Shared validation: sizes set and positive, remat policy and dtype names known."""
  for name in size_fields:
    if getattr(cfg, name) <= 0:
      raise ValueError(f"model.{name}={getattr(cfg, name)} must be positive; set model.variant "
                       f"(see nets/{family}.py VARIANTS) or model.{name}.")
  check_remat_and_dtypes(cfg)


def scanned(block: type[nn.Module], remat_policy: str, length: int, in_axes=nn.broadcast,
            axis: str = "layers"):
  """``length`` copies of ``block`` stacked by nn.scan, parameters on a leading "layers" axis.

  Every family's layer stack goes through here. The block is called as
  ``block(carry, *args) -> (carry, out)``; ``in_axes`` says per extra argument whether it is
  broadcast (``nn.broadcast``) or scanned over its leading axis (0); one ``nn.broadcast``
  (the default) broadcasts them all.
  MoE's "aux" statistics stack per layer, and every layer draws its own dropout rng. ``axis``
  is the logical name of the stacking axis (a scan nested in a scanned unit needs its own).
  """
  return nn.scan(remat(block, remat_policy), variable_axes={"params": 0, "aux": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                 length=length, metadata_params={nn.PARTITION_NAME: axis})


# --- Decoder layers (Llama, Mamba, MEGABYTE) ---------------------------------------------------

def _init(cfg, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class Proj(nn.Module):
  """Contracts the last ``n_in`` dims of x with a kernel of shape in_dims + ``out_shape``.

  The product runs in the compute dtype and, with ``out_dtype`` float32 (the output heads), is
  accumulated and returned in float32, so bf16 logits are not rounded before the loss.
  (Not nn.DenseGeneral: it initialises a flattened 2-D kernel and applies the logical sharding
  constraint before reshaping, which fails for N-D kernels under a mesh.)
  """
  cfg: Any  # reads dtype, param_dtype, init_std
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  n_in: int = 1
  out_dtype: Any = None  # None: the compute dtype

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init(self.cfg, self.axes),
                        x.shape[x.ndim - self.n_in:] + tuple(self.out_shape),
                        jnp.dtype(self.cfg.param_dtype))
    dtype = jnp.dtype(self.cfg.dtype)
    return jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.n_in,
                         preferred_element_type=self.out_dtype)


class Embed(nn.Module):
  """Token embedding table [V, E]; ``attend`` reuses it as the output projection when tied."""
  cfg: Any  # reads dtype, param_dtype, init_std, vocab_size, d_model

  def setup(self):
    self.embedding = self.param("embedding", _init(self.cfg, ("vocab", "embed")),
                                (self.cfg.vocab_size, self.cfg.d_model),
                                jnp.dtype(self.cfg.param_dtype))

  def __call__(self, tokens_BxS):
    # A row gather from a sharded table has no efficient SPMD partitioning (XLA replicates the
    # whole lookup, with a warning). Gather the table first, as FSDP does for every weight before
    # use; the gradient flows back reduce-scattered into the sharded table.
    table_VxE = nn.with_logical_constraint(self.embedding, (None, None))
    return jnp.take(table_VxE, tokens_BxS, axis=0).astype(self.cfg.dtype)

  def attend(self, x_BxSxE):
    """Logits [B, S, V] in float32 (a compute-dtype matmul accumulated in float32)."""
    dtype = jnp.dtype(self.cfg.dtype)
    return jnp.einsum("bse,ve->bsv", x_BxSxE.astype(dtype), self.embedding.astype(dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
  """Root-mean-square norm computed in float32, cast back to the compute dtype."""
  cfg: Any  # reads dtype, param_dtype, norm_eps

  @nn.compact
  def __call__(self, x_BxSxE):
    scale_E = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x_BxSxE.shape[-1],), jnp.dtype(self.cfg.param_dtype))
    x = x_BxSxE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (x * scale_E.astype(jnp.float32)).astype(self.cfg.dtype)


def rotary(x_BxSxNxD, positions_BxS, theta: float):
  """Rotary position embedding, rotate-half convention (as in Hugging Face Llama)."""
  D = x_BxSxNxD.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  angles_BxSxD2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxSxD2)[:, :, None, :]
  sin = jnp.sin(angles_BxSxD2)[:, :, None, :]
  x = x_BxSxNxD.astype(jnp.float32)
  x1, x2 = x[..., : D // 2], x[..., D // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxD.dtype)


# --- Vision layers (ViT, DiT, U-DiT) -----------------------------------------------------------

class Dense(nn.Module):
  """x · kernel + bias, contracting the last ``n_in`` dims of x with kernel in_dims + out_shape.

  Proj without a bias and with one fixed initializer does not fit the vision
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
  def __call__(self, x_BxSxE, segment_ids_BxS=None):
    """``segment_ids_BxS`` (packed images): tokens attend only within their segment."""
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
                                  positions_BxS=None, segment_ids_BxS=segment_ids_BxS)
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


def slot_onehot(segment_ids_BxS, num_slots: int):
  """[B, S, K] float32: token s belongs to packed image slot k (segment id k + 1; 0 = padding)."""
  return (segment_ids_BxS[:, :, None] == jnp.arange(1, num_slots + 1)).astype(jnp.float32)


def sincos_at(rows, cols, dim: int):
  """``sincos_2d``'s embedding at (possibly fractional) positions: rows, cols [...] -> [..., dim]
  float32 (packed images at native size: each token's own row and column)."""
  omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim / 4))
  def one_axis(pos):
    out = pos.astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)
  return jnp.concatenate([one_axis(cols), one_axis(rows)], axis=-1)


def unpatchify(x_BxSxP, h: int, w: int, p: int):
  """Inverse of ``patchify``: [B, h·w, p·p·C] -> [B, h·p, w·p, C]."""
  B = x_BxSxP.shape[0]
  C = x_BxSxP.shape[-1] // (p * p)
  x = x_BxSxP.reshape(B, h, w, p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, h * p, w * p, C)


