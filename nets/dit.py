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
The embedders, blocks and final layer are nets/conditioning.py's (U-DiT uses them too).

Packed images at native sizes (NaViT-style): called with ``segment_ids_BxS``
and ``positions_BxSx2``, x is patches [B, S, p·p·C] of several latents per row
(train/image_packing.py's layout), t and y are per image slot [B, K], and the output is per
token [B, S, p·p·C_out]: attention stays within each image, positions are each token's own (row,
col) on the input_size grid's sin-cos table, and each image's adaLN modulation comes from its own
t and y. The diffusion task trains it on packed folder rows (data.native_size=True); sampling
uses the square path, with the same parameters.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting, moe
from nets.conditioning import (FREQUENCY_EMBEDDING_SIZE, Block, FinalLayer, LabelEmbedder,
                               TimestepEmbedder, block_flops, check_input, drop_labels,
                               embed_packed_timesteps, embedder_flops, embedder_params)
from nets.layers import Dense, build_config, check_basics, patchify, scanned, sincos_2d, unpatchify
from nets.moe import Config as MoEConfig
from nets.registry import Family

# depth, hidden_size, num_heads (DiT paper Table 1); the patch size is the number after the slash.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS = {f"{size}/{p}": dict(depth=d, hidden_size=e, num_heads=h, patch_size=p)
            for size, (d, e, h) in _SIZES.items() for p in (2, 4, 8)}
# sklearn digits (8×8 grey, 10 classes) and tests.
VARIANTS["digits"] = dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8,
                          in_channels=1, num_classes=10)

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
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES
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

  @property
  def max_len(self) -> int:
    """Tokens the blocks see: the patches."""
    return (self.input_size // self.patch_size) ** 2

  # The names every family's Config shares (nets/registry.py).
  width = property(lambda self: self.hidden_size)
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: int(self.hidden_size * self.mlp_ratio))
  image_size = property(lambda self: self.input_size)
  channels = property(lambda self: self.in_channels)


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
  n += embedder_params(cfg, E)  # timestep MLP, label table (+ null row)
  n += cfg.depth * block + (2 * E * E + 2 * E) + (E * P * cfg.out_channels + P * cfg.out_channels)
  if include_pos_embed:
    n += (cfg.input_size // cfg.patch_size) ** 2 * E
  if cfg.moe.enabled:
    total, used = cfg.moe.num_params(E, M)
    n += (cfg.depth // cfg.moe.every) * ((used if active else total) - mlp)
  return n


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: patch embedding 2·p²·C_in·E·S + timestep MLP + depth adaLN-Zero
  blocks (``conditioning.block_flops``; MLP 2·2·E·M, M = mlp_ratio·E, or every ``moe.every``-th
  a MoE layer) + final layer 2·E·2E (modulation) + 2·E·p²·C_out·S."""
  E, p, S, M = cfg.hidden_size, cfg.patch_size, cfg.max_len, cfg.mlp_width
  S = step.seq_len or S  # a packed row of seq_len tokens counts as one image of that length
  n_moe = cfg.depth // cfg.moe.every if cfg.moe.enabled else 0
  dense_mlp = 2 * 2 * E * M
  moe_mlp = counting.moe_layer(cfg.moe, E, M, S, step) if n_moe else 0.0
  blocks = ((cfg.depth - n_moe) * block_flops(E, S, S, dense_mlp, step)
            + n_moe * block_flops(E, S, S, moe_mlp, step))
  return (2 * p * p * cfg.in_channels * E * S + embedder_flops(E) + blocks
          + 2 * E * 2 * E + 2 * E * p * p * cfg.out_channels * S)


class Model(nn.Module):
  """DiT: x [B, H, W, C], t [B], y [B] int -> [B, H, W, C_out] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention
  moe_layout: moe.Layout = moe.Layout()  # MoE dispatch groups and expert parallelism

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B, train: bool = False, force_drop_ids_B=None,
               segment_ids_BxS=None, positions_BxSx2=None):
    cfg = self.cfg
    E, p = cfg.hidden_size, cfg.patch_size
    g = cfg.input_size // p
    packed = segment_ids_BxS is not None
    if packed:  # x: patches [B, S, p·p·C]; t, y: per image slot [B, K]
      if positions_BxSx2 is None or t_B.ndim != 2 or y_B.shape != t_B.shape:
        raise ValueError("packed latents need positions [B, S, 2] and t, y per slot [B, K].")
      x_BxSxP = x_BxHxWxC
      index_BxS = positions_BxSx2[..., 0] * g + positions_BxSx2[..., 1]
      pos_BxSxE = jnp.take(jnp.asarray(sincos_2d(g, g, E)), index_BxS, axis=0)
    else:
      check_input(cfg, x_BxHxWxC)
      x_BxSxP, pos_BxSxE = patchify(x_BxHxWxC, p), sincos_2d(g, g, E)
    x_BxSxE = Dense(cfg, (E,), ("patch", "embed"), name="x_embedder")(x_BxSxP)
    x_BxSxE = x_BxSxE + pos_BxSxE.astype(cfg.dtype)
    y_B = drop_labels(self, cfg, y_B, train, force_drop_ids_B)
    t_embedder = TimestepEmbedder(cfg, E, cfg.timestep_freq_shift, name="t_embedder")
    t_emb = embed_packed_timesteps(t_embedder, t_B) if packed else t_embedder(t_B)
    c_BxE = t_emb + LabelEmbedder(cfg, E, name="y_embedder")(y_B)  # [B, K, E] when packed
    c_BxE = nn.with_logical_constraint(c_BxE, ("act_batch",) + (None,) * packed + ("act_embed",))

    blocks = moe.stack(Block, cfg.moe, (cfg, self.attention_fn, self.moe_layout), cfg.depth,
                       lambda unit, length: scanned(unit, cfg.remat, length))
    rest = (c_BxE, segment_ids_BxS) if packed else (c_BxE,)
    x_BxSxE, _ = blocks(x_BxSxE, *rest)
    out_BxSxP = FinalLayer(cfg, p * p * cfg.out_channels, name="final_layer")(x_BxSxE, *rest)
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    if packed:
      return out_BxSxP.astype(jnp.float32)
    return unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)


FAMILY = Family(
    name="dit", Config=Config, Model=Model, task="diffusion", num_params=num_params, flops=flops,
    attention_length=lambda cfg, seq_len: seq_len or cfg.max_len, moe=lambda cfg: cfg.moe,
    converter="dit",
    test_config=dict(variant="digits", hidden_size=256, depth=2, num_heads=4, input_size=8,
                     patch_size=2, in_channels=4))
