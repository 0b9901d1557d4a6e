"""The T5 encoder (Raffel et al. 2020), numerically as transformers' ``T5EncoderModel``.

A frozen text encoder for text-conditioned diffusion (PixArt-α conditions on T5 tokens): imported
weights (nets/convert/t5.py) run here under the same meshes as every family. Not a train family:
it has no task of its own, so nets.registry does not list it.

Pre-norm blocks on a residual stream [B, L, E]: x + SelfAttention(RMSNorm(x)); x + FF(RMSNorm(x));
a final RMSNorm. T5's differences from the other Transformers here:
  * RMSNorm without bias or mean subtraction (layers.RMSNorm; eps is ``layer_norm_epsilon``);
  * attention logits are q·k with no 1/sqrt(d_kv) scaling (it is folded into the initialisation);
  * no position embeddings: one learned bias per head and relative-position bucket, added to the
    logits; the bucket table is owned by layer 0 in transformers and shared by all layers (here it
    sits beside the layer stack, so the layers can be one nn.scan);
  * FF is "relu" (wi -> ReLU -> wo; T5 v1.0) or "gated-gelu" (gelu_tanh(wi_0 x) * wi_1 x -> wo;
    T5 v1.1, Flan-T5, ByT5, as transformers' ``gelu_new``).
Embeddings are not scaled. Padded keys (mask False) get the most negative float32 added to their
logits, as transformers does; padded queries are computed and are meaningless.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nets import counting
from nets.layers import Embed, Proj, RMSNorm, build_config, check_positive_floats, \
    check_remat_and_dtypes, scanned

FEED_FORWARD = ("relu", "gated-gelu")
_ACT = ("act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters, named as transformers' T5Config; built by ``Config.from_config`` or by
  nets.convert.t5.config_from_hf."""
  vocab_size: int = 384
  d_model: int = 0
  d_kv: int = 0  # head width; d_model need not equal num_heads * d_kv (t5-v1_1-xl: 2048 vs 32*64)
  num_heads: int = 0
  d_ff: int = 0
  num_layers: int = 0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"  # one of FEED_FORWARD
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype; the output is float32 whatever it is
  param_dtype: str = "float32"
  init_std: float = 0.05  # fresh parameters only (an imported encoder replaces them)
  remat: str = "none"

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from a config group of these fields (a ``name`` key is ignored)."""
    return build_config(cls, "t5", {}, model_cfg, overrides)

  @property
  def norm_eps(self) -> float:
    """layers.RMSNorm's name for the epsilon."""
    return self.layer_norm_epsilon

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"T5 {name}={value!r} must be a positive integer.")
    buckets = self.relative_attention_num_buckets
    # Bidirectional buckets: half per direction, half of those exact; fewer than 4 leaves none.
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 4:
      raise ValueError(f"T5 relative_attention_num_buckets={buckets!r} must be an integer >= 4.")
    if self.relative_attention_max_distance <= buckets // 4:
      raise ValueError(f"T5 relative_attention_max_distance={self.relative_attention_max_distance}"
                       f" must exceed relative_attention_num_buckets // 4 = {buckets // 4} (the "
                       "exact buckets of one direction).")
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(f"T5 feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       f"supported: {list(FEED_FORWARD)}.")
    check_positive_floats(self, ("layer_norm_epsilon", "init_std"))
    check_remat_and_dtypes(self)


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """[L, L] int32 bucket of key position j seen from query i (bidirectional, as Mesh TensorFlow
  and transformers: half the buckets per direction; in each, distances below a quarter of
  ``num_buckets`` are exact, larger ones logarithmic up to ``max_distance``, then clamped).

  numpy at trace time, in float32 as the reference computes the logarithm, so every backend
  gets the same buckets."""
  relative_LxL = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  half = num_buckets // 2
  bucket = (relative_LxL > 0).astype(np.int64) * half
  distance = np.abs(relative_LxL)
  exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) where the exact branch is taken
    scaled = (np.log(distance.astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
  large = exact + np.where(distance < exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(distance < exact, distance, large)).astype(np.int32)


class Block(nn.Module):
  """One encoder layer: x + SelfAttention(norm(x)); x + FF(norm(x))."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxLxE, bias_BxHxLxL):
    cfg = self.cfg
    H, D, M = cfg.num_heads, cfg.d_kv, cfg.d_ff
    dense = lambda out_shape, axes, name, n_in=1: Proj(cfg, out_shape, axes, n_in, name=name)
    x_BxLxE = nn.with_logical_constraint(x_BxLxE, _ACT)
    h_BxLxE = RMSNorm(cfg, name="attn_norm")(x_BxLxE)
    q_BxLxHxD = dense((H, D), ("embed", "heads", "head_dim"), "q")(h_BxLxE)
    k_BxLxHxD = dense((H, D), ("embed", "heads", "head_dim"), "k")(h_BxLxE)
    v_BxLxHxD = dense((H, D), ("embed", "heads", "head_dim"), "v")(h_BxLxE)
    heads = ("act_batch", "act_seq", "act_heads", "head_dim")
    q_BxLxHxD = nn.with_logical_constraint(q_BxLxHxD, heads)
    k_BxLxHxD = nn.with_logical_constraint(k_BxLxHxD, heads)
    v_BxLxHxD = nn.with_logical_constraint(v_BxLxHxD, heads)
    # No 1/sqrt(D): T5 folds it into the initialisation of q.
    logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD,
                                preferred_element_type=jnp.float32) + bias_BxHxLxL
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(v_BxLxHxD.dtype)
    o_BxLxHxD = jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL, v_BxLxHxD)
    o_BxLxHxD = nn.with_logical_constraint(o_BxLxHxD, heads)
    x_BxLxE = x_BxLxE + dense((cfg.d_model,), ("heads", "head_dim", "embed"), "o", 2)(o_BxLxHxD)

    h_BxLxE = RMSNorm(cfg, name="ff_norm")(x_BxLxE)
    if cfg.feed_forward_proj == "gated-gelu":
      gate_BxLxM = dense((M,), ("embed", "mlp"), "wi_0")(h_BxLxE)
      up_BxLxM = dense((M,), ("embed", "mlp"), "wi_1")(h_BxLxE)
      h_BxLxM = nn.gelu(gate_BxLxM, approximate=True) * up_BxLxM
    else:
      h_BxLxM = nn.relu(dense((M,), ("embed", "mlp"), "wi")(h_BxLxE))
    h_BxLxM = nn.with_logical_constraint(h_BxLxM, ("act_batch", "act_seq", "act_mlp"))
    x_BxLxE = x_BxLxE + dense((cfg.d_model,), ("mlp", "embed"), "wo")(h_BxLxM)
    return nn.with_logical_constraint(x_BxLxE, _ACT), None


class Encoder(nn.Module):
  """Token ids [B, L] int32, mask [B, L] bool (True: a real token) -> hidden [B, L, E] float32."""
  cfg: Config

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL):
    cfg = self.cfg
    L = ids_BxL.shape[1]
    x_BxLxE = Embed(cfg, name="embed")(ids_BxL)
    table_NxH = self.param(
        "rel_bias", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                 (None, "heads")),
        (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.dtype(cfg.param_dtype))
    buckets_LxL = relative_buckets(L, cfg.relative_attention_num_buckets,
                                   cfg.relative_attention_max_distance)
    bias_HxLxL = jnp.take(table_NxH.astype(jnp.float32), buckets_LxL, axis=0).transpose(2, 0, 1)
    pad_Bx1x1xL = jnp.where(mask_BxL, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    bias_BxHxLxL = bias_HxLxL[None] + pad_Bx1x1xL
    x_BxLxE, _ = scanned(Block, cfg.remat, cfg.num_layers)(cfg, name="layers")(
        x_BxLxE, bias_BxHxLxL)
    return RMSNorm(cfg, name="final_norm")(x_BxLxE).astype(jnp.float32)


def param_count(cfg: Config) -> int:
  """Parameters of ``Encoder(cfg)``."""
  E, HD, M = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
  ff = (3 if cfg.feed_forward_proj == "gated-gelu" else 2) * E * M
  layer = 4 * E * HD + ff + 2 * E
  return (cfg.vocab_size * E + cfg.relative_attention_num_buckets * cfg.num_heads
          + cfg.num_layers * layer + E)


def flops(cfg: Config, length: int, executed: bool) -> float:
  """Forward FLOPs of one sequence of ``length`` tokens: per token and layer q, k, v, o
  (2·4·E·H·D), attention over every key (bidirectional) and the FF matrices (2 or 3 of
  2·E·d_ff)."""
  E, HD, M = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
  ff = (3 if cfg.feed_forward_proj == "gated-gelu" else 2) * 2 * E * M
  per_token = 2 * 4 * E * HD + counting.attention(length, HD, False, executed) + ff
  return cfg.num_layers * length * per_token
