"""Llama-style decoder-only LM: RMSNorm, RoPE, grouped-query attention, SwiGLU, pre-norm.

Layers are stacked with ``nn.scan`` so compile time does not grow with depth; ``remat`` wraps the
scanned block of every family with one of REMAT_POLICIES. Attention is a pure function passed in as
``attention_fn`` (nets/attention.py by default; parallel/attention.py supplies sequence-parallel
versions), so this file names no mesh.

Generation passes a KV cache (``init_cache``) to ``Model``: the new tokens' keys and values are
written into it at their positions and the queries attend over it, for a prompt (S > 1) and for
one token at a time alike. The cache rides in the scan carry with a layer counter, so each layer
updates its slice in place and MoE's Periodic units need no change.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp

from nets import attention, moe
from nets.moe import Config as MoEConfig

# train.remat, what a scanned block keeps for the backward pass; see ``remat``.
REMAT_POLICIES = ("none", "full", "selective", "offload")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  max_len: int
  head_dim: int = 0  # 0 means d_model // num_heads
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES
  moe: MoEConfig = MoEConfig()  # num_experts > 0: Mixtral-style MoE MLPs (nets/moe.py)

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    overrides = {"moe": MoEConfig.from_config(model_cfg.get("moe")), **overrides}
    return build_config(cls, "llama", {}, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    if self.moe.enabled and self.num_layers % self.moe.every:
      raise ValueError(f"model.num_layers={self.num_layers} is not a multiple of "
                       f"model.moe.every={self.moe.every}.")
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a positive multiple of "
                       f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                       f"{self.num_heads}; set model.head_dim explicitly or change the sizes.")
    check_remat_and_dtypes(self)
    if self.head_size % 2:
      raise ValueError(f"head_dim={self.head_size} must be even for rotary embeddings.")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


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
  offload: what selective keeps, but in pinned host memory (``check_remat_supported``). XLA:CPU
    ignores memory kinds when lowering, so on CPU it is the selective program.
  """
  if policy == "none":
    return module_cls
  # scan already prevents CSE across layers
  return nn.remat(module_cls, prevent_cse=False, policy=_REMAT[policy])


def check_remat_supported(policy: str, devices) -> None:
  """Raises one sentence when ``policy`` needs a memory space the ``devices`` lack (before
  anything compiles; train/validate.py passes the devices it will run on)."""
  if policy != "offload":
    return
  for device in devices:
    kinds = sorted(m.kind for m in device.addressable_memories())
    if "pinned_host" not in kinds:
      raise ValueError(f"train.remat='offload' needs devices with a pinned_host memory space "
                       f"to offload to; this {device.platform} device has only {kinds}, so use "
                       "train.remat='selective' instead.")


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model).

  ``active=True`` counts what one token uses: top_k routed experts per MoE layer, not all.
  """
  E, D, H, K, M, V = (cfg.d_model, cfg.head_size, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim,
                      cfg.vocab_size)
  attn = 2 * E + E * H * D + 2 * E * K * D + H * D * E
  n = V * E + cfg.num_layers * (attn + 3 * E * M) + E + (0 if cfg.tie_embeddings else E * V)
  if cfg.moe.enabled:
    total, used = cfg.moe.num_params(E, M)
    n += (cfg.num_layers // cfg.moe.every) * ((used if active else total) - 3 * E * M)
  return n


def _init(cfg: Config, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class Proj(nn.Module):
  """Contracts the last ``n_in`` dims of x with a kernel of shape in_dims + ``out_shape``.

  The product runs in the compute dtype and, with ``out_dtype`` float32 (the output heads), is
  accumulated and returned in float32, so bf16 logits are not rounded before the loss.
  (Not nn.DenseGeneral: it initialises a flattened 2-D kernel and applies the logical sharding
  constraint before reshaping, which fails for N-D kernels under a mesh.)
  """
  cfg: Config
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
  cfg: Config

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
  cfg: Config

  @nn.compact
  def __call__(self, x_BxSxE):
    scale_E = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x_BxSxE.shape[-1],), jnp.dtype(self.cfg.param_dtype))
    x = x_BxSxE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (x * scale_E.astype(jnp.float32)).astype(self.cfg.dtype)


# Position of an empty cache slot: larger than any query position, so the causal mask hides it.
EMPTY = jnp.iinfo(jnp.int32).max


def init_cache(cfg: Config, batch_size: int, max_len: int | None = None, dtype=None) -> dict:
  """Empty KV cache for ``max_len`` positions (default cfg.max_len) in ``dtype`` (default the
  compute dtype).

  k, v [L, B, T, K, D]: slot t holds the keys/values of position t (so positions must be < T);
  pos [B, T] int32: the position each slot holds, EMPTY until written, which is what keeps
  unwritten slots out of attention whatever order positions are fed in.
  """
  L, B, K, D = cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_size
  T = max_len or cfg.max_len
  dtype = jnp.dtype(dtype or cfg.dtype)
  return {"k": jnp.zeros((L, B, T, K, D), dtype), "v": jnp.zeros((L, B, T, K, D), dtype),
          "pos": jnp.full((B, T), EMPTY, jnp.int32)}


def cached_attention(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, positions_BxS, slot_pos_BxT):
  """Dense GQA attention of new queries over cache slots: a query at position p sees the slots
  holding positions <= p (nets/attention.py's math; its causal mask assumes keys == queries)."""
  B, S, H, D = q_BxSxHxD.shape
  K = k_BxTxKxD.shape[2]
  q_BxSxKxGxD = q_BxSxHxD.reshape(B, S, K, H // K, D)
  logits_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k_BxTxKxD,
                                preferred_element_type=jnp.float32) * (D ** -0.5)
  seen_BxSxT = slot_pos_BxT[:, None, :] <= positions_BxS[:, :, None]
  logits_BxKxGxSxT = jnp.where(seen_BxSxT[:, None, None], logits_BxKxGxSxT,
                               jnp.finfo(jnp.float32).min)
  probs_BxKxGxSxT = jax.nn.softmax(logits_BxKxGxSxT, axis=-1)
  o_BxSxKxGxD = jnp.einsum("bkgst,btkd->bskgd", probs_BxKxGxSxT.astype(v_BxTxKxD.dtype),
                           v_BxTxKxD)
  return o_BxSxKxGxD.reshape(B, S, H, D)


def _attend_cached(cache: dict, layer, q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxS):
  """Writes this layer's new keys/values at their positions; attends over the layer's slots."""
  b_Bx1 = jnp.arange(q_BxSxHxD.shape[0])[:, None]
  k_LxBxTxKxD = cache["k"].at[layer, b_Bx1, positions_BxS].set(k_BxSxKxD.astype(cache["k"].dtype))
  v_LxBxTxKxD = cache["v"].at[layer, b_Bx1, positions_BxS].set(v_BxSxKxD.astype(cache["v"].dtype))
  dtype = q_BxSxHxD.dtype
  o_BxSxHxD = cached_attention(q_BxSxHxD, k_LxBxTxKxD[layer].astype(dtype),
                               v_LxBxTxKxD[layer].astype(dtype), positions_BxS, cache["pos"])
  return {**cache, "k": k_LxBxTxKxD, "v": v_LxBxTxKxD}, o_BxSxHxD


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


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)) (or + MoE(...))."""
  cfg: Config
  attention_fn: Callable[..., Any]
  moe_layout: moe.Layout = moe.Layout()
  use_moe: bool = False

  @nn.compact
  def __call__(self, x_BxSxE, positions_BxS, segment_ids_BxS):
    """The scan carry ``x_BxSxE`` is the activations, or when decoding (activations, KV cache,
    this layer's index); the index lives in the carry so MoE's Periodic units count too."""
    cfg = self.cfg
    cache = None
    if isinstance(x_BxSxE, tuple):
      x_BxSxE, cache, layer = x_BxSxE
    dense = lambda out_shape, n_in, axes, name: Proj(cfg, out_shape, axes, n_in, name=name)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, ("act_batch", "act_seq", "act_embed"))

    h_BxSxE = RMSNorm(cfg, name="attn_norm")(x_BxSxE)
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    q_BxSxHxD = dense((H, D), 1, ("embed", "heads", "head_dim"), "q")(h_BxSxE)
    k_BxSxKxD = dense((K, D), 1, ("embed", "kv_heads", "head_dim"), "k")(h_BxSxE)
    v_BxSxKxD = dense((K, D), 1, ("embed", "kv_heads", "head_dim"), "v")(h_BxSxE)
    q_BxSxHxD = rotary(q_BxSxHxD, positions_BxS, cfg.rope_theta)
    k_BxSxKxD = rotary(k_BxSxKxD, positions_BxS, cfg.rope_theta)
    q_BxSxHxD = nn.with_logical_constraint(q_BxSxHxD,
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    k_BxSxKxD = nn.with_logical_constraint(k_BxSxKxD,
                                           ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    v_BxSxKxD = nn.with_logical_constraint(v_BxSxKxD,
                                           ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    if cache is None:
      o_BxSxHxD = self.attention_fn(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, causal=True,
                                    positions_BxS=positions_BxS, segment_ids_BxS=segment_ids_BxS)
    else:
      cache, o_BxSxHxD = _attend_cached(cache, layer, q_BxSxHxD, k_BxSxKxD, v_BxSxKxD,
                                        positions_BxS)
    o_BxSxHxD = nn.with_logical_constraint(o_BxSxHxD,
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    x_BxSxE = x_BxSxE + dense((cfg.d_model,), 2, ("heads", "head_dim", "embed"), "o")(o_BxSxHxD)

    h_BxSxE = RMSNorm(cfg, name="mlp_norm")(x_BxSxE)
    if self.use_moe:
      init = nn.initializers.normal(cfg.init_std)
      x_BxSxE = x_BxSxE + moe.MoE(cfg.moe, cfg.mlp_dim, cfg.dtype, cfg.param_dtype, init, init,
                                  self.moe_layout, name="moe")(h_BxSxE)
    else:
      gate_BxSxM = dense((cfg.mlp_dim,), 1, ("embed", "mlp"), "gate")(h_BxSxE)
      up_BxSxM = dense((cfg.mlp_dim,), 1, ("embed", "mlp"), "up")(h_BxSxE)
      hidden_BxSxM = nn.with_logical_constraint(nn.silu(gate_BxSxM) * up_BxSxM,
                                                ("act_batch", "act_seq", "act_mlp"))
      x_BxSxE = x_BxSxE + dense((cfg.d_model,), 1, ("mlp", "embed"), "down")(hidden_BxSxM)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, ("act_batch", "act_seq", "act_embed"))
    return (x_BxSxE if cache is None else (x_BxSxE, cache, layer + 1)), None


class Model(nn.Module):
  """Decoder LM: tokens [B, S] int32 -> logits [B, S, V] float32.

  With ``cache`` (from ``init_cache``) the tokens are the next ones at ``positions_BxS`` (default
  0..S-1, a prompt), attention runs over the cache with the dense math whatever ``attention_fn``
  is, and the call returns (logits, updated cache).
  """
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention
  moe_layout: moe.Layout = moe.Layout()  # MoE dispatch groups and expert parallelism

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    if cache is not None and segment_ids_BxS is not None:
      raise ValueError("segment ids (packed documents) are not supported with a KV cache; give "
                       "each document its own batch row.")
    if positions_BxS is None:
      positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    embed = Embed(cfg, name="embed")
    x_BxSxE = embed(tokens_BxS)

    def scan(unit, length):
      return nn.scan(remat(unit, cfg.remat), variable_axes={"params": 0, "aux": 0},
                     split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                     length=length, metadata_params={nn.PARTITION_NAME: "layers"})

    blocks = moe.stack(Block, cfg.moe, (cfg, self.attention_fn, self.moe_layout), cfg.num_layers,
                       scan)
    if cache is None:
      x_BxSxE, _ = blocks(x_BxSxE, positions_BxS, segment_ids_BxS)
    else:
      positions_BxS = positions_BxS.astype(jnp.int32)
      b_Bx1 = jnp.arange(tokens_BxS.shape[0])[:, None]
      cache = {**cache, "pos": cache["pos"].at[b_Bx1, positions_BxS].set(positions_BxS)}
      (x_BxSxE, cache, _), _ = blocks((x_BxSxE, cache, jnp.zeros((), jnp.int32)), positions_BxS,
                                      None)
    x_BxSxE = RMSNorm(cfg, name="final_norm")(x_BxSxE)
    if cfg.tie_embeddings:
      logits_BxSxV = embed.attend(x_BxSxE)
    else:
      logits_BxSxV = Proj(cfg, (cfg.vocab_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                          name="lm_head")(x_BxSxE)
    logits_BxSxV = nn.with_logical_constraint(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    return logits_BxSxV if cache is None else (logits_BxSxV, cache)
