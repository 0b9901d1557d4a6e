"""The Llama decoder block (RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE, pre-norm) with
its hyperparameters and KV cache: what nets/llama.py stacks into an LM and nets/megabyte.py into
its Transformer stages.

Attention is a pure function passed in as ``attention_fn`` (nets/attention.py by default;
parallel/attention.py supplies sequence-parallel versions), so this file names no mesh.

Generation passes a KV cache (``init_cache``) through the blocks: the new tokens' keys and values
are written into it at their positions and the queries attend over it, for a prompt (S > 1) and
for one token at a time alike. The cache rides in the scan carry with a layer counter, so each
layer updates its slice in place and MoE's Periodic units need no change.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import counting, moe
from nets.layers import (Proj, RMSNorm, build_config, check_positive_floats, check_remat_and_dtypes,
                         rotary)
from nets.moe import Config as MoEConfig


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the llama family (nets/llama.py) and of MEGABYTE's Transformer stages;
  built only by ``Config.from_config(config.model)`` (or megabyte.stage_config)."""
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
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES
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
    check_positive_floats(self, ("rope_theta", "norm_eps"))
    if self.head_size % 2:
      raise ValueError(f"head_dim={self.head_size} must be even for rotary embeddings.")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  # The names every family's Config shares (nets/registry.py).
  width = property(lambda self: self.d_model)
  depth = property(lambda self: self.num_layers)
  mlp_width = property(lambda self: self.mlp_dim)


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


def layer_flops(cfg: Config, seq_len: int, step: counting.Step) -> float:
  """One decoder block without its MLP, per token.

  2·E·D·(2H + 2K) (q, k, v, o projections) + causal attention over seq_len keys.
  """
  E, H, K, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  return 2 * E * D * (2 * H + 2 * K) + counting.attention(seq_len, H * D, True, step.executed)


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


