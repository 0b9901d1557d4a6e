"""Linear-recurrent LMs: Gated DeltaNet, GLA or Mamba-2 blocks (nets/linear_mixers.py), alone or
interleaved with full-attention blocks (a hybrid, as Qwen3-Next's three Gated DeltaNet layers to
one gated attention layer).

Block: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) when mlp_dim > 0 (Gated DeltaNet, GLA)
or nothing (Mamba-2's blocks are the mixer alone). With ``attention_every`` = k > 0 every k-th
layer is an attention block instead: RMSNorm, grouped-query attention with RoPE on the first
``rotary_fraction`` of each head, optional RMSNorm of q and k per head (``qk_norm``) and an
optional sigmoid output gate per channel (``attn_output_gate``), as Qwen3-Next's; attention runs
through ``attention_fn`` (parallel/attention.py), so hybrids are sequence-parallel with Ulysses or
ring attention while their recurrences pass states (parallel/state_passing.py).
Layers are stacked with nn.scan: L blocks, or L/k units of (k−1 scanned linear blocks, one
attention block). Generation carries every layer's conv windows and state, and the attention
layers' KV cache (nets/decoder.py's layout).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting, decoder, linear_mixers, linear_recurrence
from nets.layers import (Embed, Proj, RMSNorm, build_config, check_positive_floats,
                         check_remat_and_dtypes, rotary, scanned)
from nets.registry import Family

_ACT = ("act_batch", "act_seq", "act_embed")
_QKV = ("act_batch", "act_seq", "act_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the linear_rnn family; built only by ``Config.from_config``."""
  vocab_size: int
  num_layers: int
  d_model: int
  mixer: str = "gated_deltanet"  # one of linear_mixers.MIXERS
  linear_heads: int = 4  # value heads (Gated DeltaNet), heads (GLA, Mamba-2)
  linear_k_heads: int = 0  # key heads (Gated DeltaNet), B/C groups (Mamba-2); 0: linear_heads
  linear_k_dim: int = 64  # K: key width per head, the state's rows (Mamba-2: d_state)
  linear_v_dim: int = 64  # V: value width per head (Mamba-2: head_dim)
  conv_size: int = 4  # short causal convolution taps (GLA: 0, none)
  gate_rank: int = 16  # GLA: rank of the decay gate's projection
  gate_normalizer: float = 16.0  # GLA: log α = logsigmoid(.) / gate_normalizer
  dt_min: float = 1e-3  # Gated DeltaNet, Mamba-2: dt_bias starts at softplus^-1 of Δ drawn
  dt_max: float = 1e-1  # log-uniform in [dt_min, dt_max]
  chunk: int = 64  # chunk length of the chunkwise-parallel form
  mlp_dim: int = 0  # SwiGLU width after every mixer / attention; 0: no MLP (Mamba-2)
  attention_every: int = 0  # k > 0: every k-th layer is full attention (Qwen3-Next: 4)
  num_heads: int = 0  # attention layers: query heads, KV heads, head width
  num_kv_heads: int = 0
  head_dim: int = 0
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0  # RoPE on this fraction of each head's channels
  qk_norm: bool = False
  attn_output_gate: bool = False
  max_len: int = 2048  # KV cache length of the attention layers; the LM task's length check
  norm_eps: float = 1e-6
  residual_in_fp32: bool = False  # Mamba-2's float32 residual stream
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; the recurrences run in float32
  param_dtype: str = "float32"
  remat: str = "none"

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    return build_config(cls, "linear_rnn", {}, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    if self.mixer not in linear_mixers.MIXERS:
      raise ValueError(f"model.mixer={self.mixer!r} is not one of {list(linear_mixers.MIXERS)}.")
    for name in ("vocab_size", "num_layers", "d_model", "linear_heads", "linear_k_dim",
                 "linear_v_dim", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    for name in ("linear_k_heads", "conv_size", "mlp_dim", "attention_every", "gate_rank"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0.")
    if self.linear_heads % self.key_heads:
      raise ValueError(f"model.linear_heads={self.linear_heads} must be a multiple of "
                       f"model.linear_k_heads={self.key_heads}.")
    if self.mixer == "gla" and self.key_heads != self.linear_heads:
      raise ValueError("model.linear_k_heads must be 0 or linear_heads for mixer 'gla'.")
    if self.mixer == "gla" and self.gate_rank < 1:
      raise ValueError(f"model.gate_rank={self.gate_rank} must be positive for mixer 'gla'.")
    if self.mixer != "gla" and self.conv_size < 2:
      raise ValueError(f"model.conv_size={self.conv_size} must be >= 2 for mixer "
                       f"{self.mixer!r}.")
    if self.conv_size == 1:
      raise ValueError("model.conv_size=1 is not a causal convolution; use 0 (none) or >= 2.")
    if self.attention_every:
      if self.num_layers % self.attention_every:
        raise ValueError(f"model.num_layers={self.num_layers} is not a multiple of "
                         f"model.attention_every={self.attention_every}.")
      if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
        raise ValueError(f"model.num_heads={self.num_heads} must be a positive multiple of "
                         f"model.num_kv_heads={self.num_kv_heads} for the attention layers.")
      if self.rotary_dim % 2 or not 0 < self.rotary_fraction <= 1:
        raise ValueError(f"model.rotary_fraction={self.rotary_fraction} of head_dim="
                         f"{self.head_size} must give an even number of rotary channels.")
    if not 0.0 < self.dt_min <= self.dt_max:
      raise ValueError(f"model.dt_min={self.dt_min} and model.dt_max={self.dt_max} must satisfy "
                       "0 < dt_min <= dt_max.")
    check_remat_and_dtypes(self)
    check_positive_floats(self, ("norm_eps", "rope_theta", "gate_normalizer"))

  @property
  def key_heads(self) -> int:
    return self.linear_k_heads or self.linear_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or (self.d_model // self.num_heads if self.num_heads else 0)

  @property
  def rotary_dim(self) -> int:
    return int(round(self.head_size * self.rotary_fraction))

  @property
  def num_attention_layers(self) -> int:
    return self.num_layers // self.attention_every if self.attention_every else 0

  width = property(lambda self: self.d_model)
  depth = property(lambda self: self.num_layers)
  mlp_width = property(lambda self: self.mlp_dim)


# --- counts -------------------------------------------------------------------------------------

def mixer_params(cfg: Config) -> int:
  E, N, H, K, V, C = (cfg.d_model, cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim,
                      cfg.linear_v_dim, cfg.conv_size)
  if cfg.mixer == "gated_deltanet":
    return E * (2 * N * K + 2 * H * V + 2 * H) + C * (2 * N * K + H * V) + 2 * H + V + H * V * E
  if cfg.mixer == "mamba2":
    return (E * (2 * H * V + 2 * N * K + H) + (C + 1) * (H * V + 2 * N * K) + 3 * H + H * V
            + H * V * E)
  conv = C * (2 * H * K + H * V)
  return E * (2 * H * K + 2 * H * V + cfg.gate_rank) + cfg.gate_rank * H * K + H * K + conv + V \
      + H * V * E


def attention_params(cfg: Config) -> int:
  E, H, Kh, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  gate = E * H * D if cfg.attn_output_gate else 0
  return E + E * H * D + 2 * E * Kh * D + H * D * E + gate + (2 * D if cfg.qk_norm else 0)


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  del active
  E, V, L, A = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.num_attention_layers
  mlp = E + 3 * E * cfg.mlp_dim if cfg.mlp_dim else 0
  layers = (L - A) * (E + mixer_params(cfg)) + A * attention_params(cfg) + L * mlp
  return V * E + layers + E + (0 if cfg.tie_embeddings else E * V)


def mixer_flops(cfg: Config, seq_len: int, executed: bool = False) -> float:
  """One mixer, per token, as the chunkwise form runs it in training (chunk c =
  min(chunk, seq_len), n = ceil(seq_len / c) chunks).

  Projections, convolution taps, and per head: in-chunk scores q·kᵀ (2cK) and their product
  with the values (2cV), reading the incoming state (2KV) and the chunk's state update (2KV).
  The delta rule adds k·kᵀ (2cK), the transition matrix (2K²), carrying the state through it
  (2K²V/c for n − 1 of the n chunks: the last one's only feeds the unused final state), the
  products with W (2cK) and the unit lower triangular solve for [U | W]: as a model count the
  solve's c·(V+K) multiply-adds over half the square, executed the matmuls that invert the
  C x C matrix (``unit_lower_inverse_flops`` / c) and its full product with [βV | βγK]
  (2c·(V+K)). GLA's per-channel decays weigh the scores inside the chunk: a difference, an
  exponential and a product per (t, s, key channel), 3cK. Mamba-2's q·kᵀ (C·Bᵀ) is computed once
  per group, not per head (nets/linear_recurrence.py's grouped SSD).
  """
  E, N, H, K, V, C = (cfg.d_model, cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim,
                      cfg.linear_v_dim, cfg.conv_size)
  c = min(cfg.chunk, seq_len) if seq_len else cfg.chunk
  n = -(-seq_len // c) if seq_len else 1
  core = 2 * c * K + 2 * c * V + 4 * K * V  # per head
  per_group = 0  # per key head (group)
  if cfg.mixer == "gated_deltanet":
    proj = 2 * E * (2 * N * K + 2 * H * V + 2 * H)
    conv = 2 * C * (2 * N * K + H * V)
    core += 4 * c * K + 2 * K * K + 2 * K * K * V / c * (n - 1) / n
    core += (linear_recurrence.unit_lower_inverse_flops(c) / c + 2 * c * (V + K) if executed
             else c * (V + K))
  elif cfg.mixer == "mamba2":
    proj = 2 * E * (2 * H * V + 2 * N * K + H)
    conv = 2 * C * (H * V + 2 * N * K)
    core -= 2 * c * K  # the scores q·kᵀ: per group, below
    per_group = 2 * c * K
  else:
    proj = 2 * E * (2 * H * K + 2 * H * V + cfg.gate_rank) + 2 * cfg.gate_rank * H * K
    conv = 2 * C * (2 * H * K + H * V)
    core += 3 * c * K
  return proj + conv + H * core + N * per_group + 2 * H * V * E


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per token: mixers, attention layers, MLPs and the head."""
  L, A, E = cfg.num_layers, cfg.num_attention_layers, cfg.d_model
  total = (L - A) * mixer_flops(cfg, step.seq_len, step.executed) + L * 3 * 2 * E * cfg.mlp_dim
  if A:
    H, Kh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    gate = 2 * E * H * D if cfg.attn_output_gate else 0
    total += A * (2 * E * D * (2 * H + 2 * Kh) + gate
                  + counting.attention(step.seq_len, H * D, True, step.executed))
  return total + 2 * E * cfg.vocab_size


# --- blocks -------------------------------------------------------------------------------------

def _mlp(cfg, x_BxSxE):
  """x + SwiGLU(RMSNorm(x)) when mlp_dim > 0."""
  if not cfg.mlp_dim:
    return x_BxSxE
  h = RMSNorm(cfg, name="mlp_norm")(x_BxSxE)
  gate = Proj(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="gate")(h)
  up = Proj(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="up")(h)
  hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
  out = Proj(cfg, (cfg.d_model,), ("mlp", "embed"), name="down")(hidden)
  return x_BxSxE + out.astype(x_BxSxE.dtype)


class LinearBlock(nn.Module):
  """x + mixer(RMSNorm(x)) (+ the MLP); scanned, with the cache a scanned input and output."""
  cfg: Config
  recurrence_fn: Callable[..., Any] = linear_mixers.local_recurrence
  conv_fn: Callable[..., Any] = linear_mixers.local_conv

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS, cache):
    cfg = self.cfg
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    h = RMSNorm(cfg, name="norm")(x_BxSxE)
    out, cache = linear_mixers.MIXERS[cfg.mixer](cfg, self.recurrence_fn, self.conv_fn,
                                                 name="mixer")(
        h, segment_ids_BxS, cache)
    x_BxSxE = _mlp(cfg, x_BxSxE + out.astype(x_BxSxE.dtype))
    return nn.with_logical_constraint(x_BxSxE, _ACT), cache


class AttentionBlock(nn.Module):
  """x + Attn(RMSNorm(x)) (+ the MLP); Qwen3-Next's gated attention when its options are on."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, x_BxSxE, positions_BxS, segment_ids_BxS, cache, slot_pos_BxT):
    cfg = self.cfg
    H, Kh, D, R = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.rotary_dim
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    h = RMSNorm(cfg, name="attn_norm")(x_BxSxE)
    dense = lambda shape, axes, name: Proj(cfg, shape, axes, name=name)(h)
    q = dense((H, D), ("embed", "heads", "head_dim"), "q")
    k = dense((Kh, D), ("embed", "kv_heads", "head_dim"), "k")
    v = dense((Kh, D), ("embed", "kv_heads", "head_dim"), "v")
    if cfg.qk_norm:
      q, k = RMSNorm(cfg, name="q_norm")(q), RMSNorm(cfg, name="k_norm")(k)

    def rope(x):
      turned = rotary(x[..., :R], positions_BxS, cfg.rope_theta)
      return jnp.concatenate([turned, x[..., R:]], axis=-1) if R < D else turned

    q = nn.with_logical_constraint(rope(q), _QKV)
    k = nn.with_logical_constraint(rope(k), ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("act_batch", "act_seq", "act_kv_heads", "head_dim"))
    if cache is None:
      o = self.attention_fn(q, k, v, causal=True, positions_BxS=positions_BxS,
                            segment_ids_BxS=segment_ids_BxS)
    else:
      b_Bx1 = jnp.arange(q.shape[0])[:, None]
      cache = {"k": cache["k"].at[b_Bx1, positions_BxS].set(k.astype(cache["k"].dtype)),
               "v": cache["v"].at[b_Bx1, positions_BxS].set(v.astype(cache["v"].dtype))}
      o = decoder.cached_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                                   positions_BxS, slot_pos_BxT)
    o = nn.with_logical_constraint(o, _QKV)
    if cfg.attn_output_gate:
      gate = dense((H, D), ("embed", "heads", "head_dim"), "o_gate")
      o = o * nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
    out = Proj(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), 2, name="o")(o)
    x_BxSxE = _mlp(cfg, x_BxSxE + out.astype(x_BxSxE.dtype))
    return nn.with_logical_constraint(x_BxSxE, _ACT), cache


class HybridUnit(nn.Module):
  """attention_every − 1 linear blocks (an inner scan), then one attention block."""
  cfg: Config
  recurrence_fn: Callable[..., Any]
  attention_fn: Callable[..., Any]
  conv_fn: Callable[..., Any] = linear_mixers.local_conv

  @nn.compact
  def __call__(self, x_BxSxE, positions_BxS, segment_ids_BxS, cache, slot_pos_BxT):
    cfg = self.cfg
    linear = scanned(LinearBlock, "none", cfg.attention_every - 1, in_axes=(nn.broadcast, 0),
                     axis="unit_layers")
    x_BxSxE, lin_cache = linear(cfg, self.recurrence_fn, self.conv_fn, name="linear")(
        x_BxSxE, segment_ids_BxS, None if cache is None else cache["linear"])
    x_BxSxE, att_cache = AttentionBlock(cfg, self.attention_fn, name="attention")(
        x_BxSxE, positions_BxS, segment_ids_BxS, None if cache is None else cache["attention"],
        slot_pos_BxT)
    return x_BxSxE, (None if cache is None else {"linear": lin_cache, "attention": att_cache})


def init_cache(cfg: Config, batch: int, max_len: int | None = None) -> dict:
  """Empty generation state: every linear layer's conv windows and state (stacked like the
  parameters) and, for hybrids, the attention layers' KV cache and its slot positions."""
  stack = lambda tree, *lead: {k: jnp.zeros(lead + v.shape, v.dtype) for k, v in tree.items()}
  one = linear_mixers.init_cache(cfg, batch)
  if not cfg.attention_every:
    return {"layers": stack(one, cfg.num_layers)}
  units, T = cfg.num_attention_layers, max_len or cfg.max_len
  kv = jnp.zeros((units, batch, T, cfg.num_kv_heads, cfg.head_size), jnp.dtype(cfg.dtype))
  return {"layers": {"linear": stack(one, units, cfg.attention_every - 1),
                     "attention": {"k": kv, "v": kv}},
          "pos": jnp.full((batch, T), decoder.EMPTY, jnp.int32)}


class Model(nn.Module):
  """Linear-recurrent (or hybrid) LM: tokens [B, S] int32 -> logits [B, S, V] float32.

  With ``cache`` (``init_cache``) the tokens continue from the cached state at ``positions_BxS``
  (default 0..S-1: a prompt) and the call returns (logits, cache). Segment ids restart the
  recurrences and the conv windows and mask attention per segment.
  """
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention
  recurrence_fn: Callable[..., Any] = linear_mixers.local_recurrence
  conv_fn: Callable[..., Any] = linear_mixers.local_conv

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    if cache is not None and segment_ids_BxS is not None:
      raise ValueError("segment ids (packed documents) are not supported with a cache; give "
                       "each document its own batch row.")
    if positions_BxS is None:
      positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    positions_BxS = positions_BxS.astype(jnp.int32)
    embed = Embed(cfg, name="embed")
    x_BxSxE = embed(tokens_BxS)
    if cfg.residual_in_fp32:
      x_BxSxE = x_BxSxE.astype(jnp.float32)
    layers = None if cache is None else cache["layers"]
    if not cfg.attention_every:
      blocks = scanned(LinearBlock, cfg.remat, cfg.num_layers, in_axes=(nn.broadcast, 0))
      x_BxSxE, layers = blocks(cfg, self.recurrence_fn, self.conv_fn, name="layers")(
          x_BxSxE, segment_ids_BxS, layers)
    else:
      slot_pos = None
      if cache is not None:
        b_Bx1 = jnp.arange(tokens_BxS.shape[0])[:, None]
        slot_pos = cache["pos"].at[b_Bx1, positions_BxS].set(positions_BxS)
        cache = {**cache, "pos": slot_pos}
      units = scanned(HybridUnit, cfg.remat, cfg.num_attention_layers,
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))
      x_BxSxE, layers = units(cfg, self.recurrence_fn, self.attention_fn, self.conv_fn,
                                name="layers")(
          x_BxSxE, positions_BxS, segment_ids_BxS, layers, slot_pos)
    x_BxSxE = RMSNorm(cfg, name="final_norm")(x_BxSxE)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BxSxE)
    else:
      logits = Proj(cfg, (cfg.vocab_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                    name="lm_head")(x_BxSxE)
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_seq", "act_vocab"))
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, {**cache, "layers": layers})


FAMILY = Family(
    name="linear_rnn", Config=Config, Model=Model, task="lm", num_params=num_params,
    flops=flops, attention_length=lambda cfg, seq_len: seq_len, state_passing=True,
    init_cache=init_cache, converter="linear_rnn",
    # A Qwen3-Next-like hybrid: one Gated DeltaNet layer (two chunks of the 32 tokens the
    # contract tests run), then one gated attention layer.
    test_config=dict(vocab_size=1024, num_layers=2, d_model=256, linear_heads=4,
                     linear_k_heads=2, linear_k_dim=64, linear_v_dim=64, mlp_dim=512, chunk=16,
                     attention_every=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                     attn_output_gate=True, rotary_fraction=0.5, max_len=128))
