"""U-ViT ("All are Worth Words: A ViT Backbone for Diffusion Models", Bao et al. 2023).

Everything is a token: the timestep (sinusoidal features -> MLP), the class label (a table with a
"null" row for classifier-free guidance) and the noisy image's patches (linear patch embedding)
form one sequence [time, label, patch_1..patch_S] with a learned position embedding over all
S + 2 tokens. ``depth`` (odd) pre-norm ViT blocks run as depth//2 in-blocks, one mid-block and
depth//2 out-blocks; out-block j first takes the long skip from in-block depth//2 - 1 - j (LIFO:
the last in-block feeds the first out-block), concatenates [x, skip] on the channel axis and
projects 2E -> E, then runs the block. A final LayerNorm, the time and label tokens dropped, a
Linear to p²·C_out per patch, unpatchify and a 3×3 conv (the paper's conv after the output; off
with ``final_conv=False``). C_out = 2·C with learn_sigma (eps, then the variance values), as DiT,
so the diffusion objectives, samplers and guidance in train/ apply unchanged.

The in-blocks and out-blocks are each one nn.scan: the in-blocks' scan emits every block's output
(the skips, stacked on a leading axis), and the out-blocks' scan consumes them reversed. With the
"intermediates" collection mutable the model also sows every block's output ("in_block_outputs",
"mid_block_output", "out_block_outputs"), which tests use to check the skip wiring.

Where it differs from the paper's code (baofff/U-ViT): the qkv projection has a bias (fused,
nets/layers.py's Attention); the MLP's GELU is the tanh approximation; the timestep token always
goes through DiT's 256-feature MLP (the paper's ImageNet models use the raw width-E sinusoid);
labels are dropped to the null row only with class_dropout_prob > 0 (DiT's rule, so the table has
num_classes rows without guidance). Initialisation follows the paper: N(0, 0.02) linears,
positions and label table with zero biases (timm's trunc_normal_ at std 0.02 never truncates).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting
from nets.conditioning import (LabelEmbedder, TimestepEmbedder, check_input, drop_labels,
                               embedder_flops, embedder_params)
from nets.layers import (Attention, Dense, LayerNorm, Mlp, build_config, check_basics,
                         check_positive_floats, patchify, remat, scanned, unpatchify)
from nets.registry import Family

# hidden_size, depth, num_heads (U-ViT paper Table 1, mlp_ratio 4: 44M, 58M, 131M, 287M, 501M
# parameters); the patch size follows the slash (the paper trains S/2, S/4, M/2, M/4, L/2, H/2,
# H/4). "S-Deep" is the paper's 17-block U-ViT-S (Table 1's "U-ViT-S (Deep)").
_SIZES = {"S": (512, 13, 8), "S-Deep": (512, 17, 8), "M": (768, 17, 12), "L": (1024, 21, 16),
          "H": (1152, 29, 16)}
VARIANTS = {f"{size}/{p}": dict(hidden_size=e, depth=d, num_heads=h, patch_size=p)
            for size, (e, d, h) in _SIZES.items() for p in (2, 4)}
# sklearn digits (8×8 grey, 10 classes) and tests: about 0.29M parameters (dit_digits: 0.33M).
VARIANTS["digits"] = dict(hidden_size=64, depth=5, num_heads=4, patch_size=2, input_size=8,
                          in_channels=1, num_classes=10)

EXTRA_TOKENS = 2  # the time and label tokens in front of the patches
_ACT = ("act_batch", "act_seq", "act_embed")
_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  input_size: int = 32  # square latent (or pixel) side
  in_channels: int = 4
  num_classes: int = 1000
  patch_size: int = 0
  hidden_size: int = 0
  depth: int = 0  # odd: depth//2 in-blocks, a mid-block, depth//2 out-blocks
  num_heads: int = 0
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  final_conv: bool = True  # the 3×3 conv after unpatchify
  norm_eps: float = 1e-5  # torch's LayerNorm default, as the paper's code
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    return build_config(cls, "uvit", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "uvit", ("input_size", "in_channels", "num_classes", "patch_size",
                                "hidden_size", "depth", "num_heads"))
    if self.depth % 2 == 0:
      raise ValueError(f"model.depth={self.depth} must be odd: depth//2 in-blocks, one "
                       "mid-block and depth//2 out-blocks.")
    if self.input_size % self.patch_size:
      raise ValueError(f"model.input_size={self.input_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}.")
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"model.class_dropout_prob={self.class_dropout_prob} must be in [0, 1].")
    check_positive_floats(self, ("mlp_ratio", "norm_eps"))

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def null_label(self) -> int:
    return self.num_classes

  @property
  def num_patches(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  @property
  def max_len(self) -> int:
    """Tokens the blocks see: time, label and the patches."""
    return self.num_patches + EXTRA_TOKENS

  # The names every family's Config shares (nets/registry.py).
  width = property(lambda self: self.hidden_size)
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: int(self.hidden_size * self.mlp_ratio))
  image_size = property(lambda self: self.input_size)
  channels = property(lambda self: self.in_channels)


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  E, M, P, C = cfg.hidden_size, cfg.mlp_width, cfg.patch_size ** 2, cfg.out_channels
  block = 2 * E + (3 * E * E + 3 * E) + (E * E + E) + 2 * E + (E * M + M) + (M * E + E)
  n = P * cfg.in_channels * E + E  # patch embedding
  n += embedder_params(cfg, E)  # timestep MLP, label table (+ null row)
  n += cfg.max_len * E  # learned positions
  n += cfg.depth * block + (cfg.depth // 2) * (2 * E * E + E)  # blocks, skip projections
  n += 2 * E + (E * P * C + P * C)  # final norm and linear
  return n + (9 * C * C + C if cfg.final_conv else 0)


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: patch embedding 2·p²·C_in·E·S + timestep MLP 2·256·E + 2·E² +
  depth blocks over T = S + 2 tokens, T·(2·4·E² + 2·2·E·M + attention over T keys) + depth//2 skip
  projections 2·2E·E·T + output linear 2·E·p²·C_out·S + 3×3 conv 2·9·C_out²·H·W."""
  E, p, S, T, C = cfg.hidden_size, cfg.patch_size, cfg.num_patches, cfg.max_len, cfg.out_channels
  block = T * (2 * 4 * E * E + 2 * 2 * E * cfg.mlp_width
               + counting.attention(T, E, False, step.executed))
  total = (2 * p * p * cfg.in_channels * E * S + embedder_flops(E) + cfg.depth * block
           + (cfg.depth // 2) * T * 2 * 2 * E * E + 2 * E * p * p * C * S)
  return total + (2 * 9 * C * C * cfg.input_size ** 2 if cfg.final_conv else 0)


class Block(nn.Module):
  """Pre-norm block: x + MHA(LN(x)); x + MLP(LN(x)); with ``skip``, first Linear([x, skip]).

  Called by nn.scan as ``block(x, skip) -> (x, out)``: ``out`` is x (the in-blocks' outputs are
  the long skips; the out-blocks emit theirs only when ``emit``, for tests).
  """
  cfg: Config
  attention_fn: Callable[..., Any]
  skip: bool = False
  emit: bool = True

  @nn.compact
  def __call__(self, x_BxTxE, skip_BxTxE=None):
    cfg = self.cfg
    E = x_BxTxE.shape[-1]
    if self.skip:
      x_BxTx2E = jnp.concatenate([x_BxTxE, skip_BxTxE], axis=-1)
      x_BxTxE = Dense(cfg, (E,), ("embed", "mlp"), kernel_init=_INIT, name="skip")(x_BxTx2E)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, _ACT)
    h_BxTxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm1")(x_BxTxE)
    x_BxTxE = x_BxTxE + Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h_BxTxE)
    h_BxTxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm2")(x_BxTxE)
    x_BxTxE = x_BxTxE + Mlp(cfg, cfg.mlp_width, name="mlp")(h_BxTxE)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, _ACT)
    return x_BxTxE, (x_BxTxE if self.emit else None)


class Model(nn.Module):
  """U-ViT: x [B, H, W, C], t [B], y [B] int -> [B, H, W, C_out] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  def long_skips(self, skips_LxBxTxE):
    """The in-blocks' outputs in the order the out-blocks take them: reversed (LIFO)."""
    return skips_LxBxTxE[::-1]

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B, train: bool = False, force_drop_ids_B=None):
    cfg = self.cfg
    check_input(cfg, x_BxHxWxC)
    E, p, L = cfg.hidden_size, cfg.patch_size, cfg.depth // 2
    g = cfg.input_size // p
    x_BxSxE = Dense(cfg, (E,), ("patch", "embed"), kernel_init=_INIT, name="x_embedder")(
        patchify(x_BxHxWxC, p))
    time_BxE = TimestepEmbedder(cfg, E, name="t_embedder")(t_B)
    y_B = drop_labels(self, cfg, y_B, train, force_drop_ids_B)
    label_BxE = LabelEmbedder(cfg, E, name="y_embedder")(y_B)
    x_BxTxE = jnp.concatenate([time_BxE[:, None].astype(cfg.dtype),
                               label_BxE[:, None].astype(cfg.dtype), x_BxSxE], axis=1)
    pos_TxE = self.param("pos_embed", nn.with_logical_partitioning(_INIT, ("patch", "embed")),
                         (cfg.max_len, E), jnp.dtype(cfg.param_dtype))
    x_BxTxE = nn.with_logical_constraint(x_BxTxE + pos_TxE.astype(cfg.dtype), _ACT)

    emit = self.is_mutable_collection("intermediates")
    skips_LxBxTxE = None
    if L:
      x_BxTxE, skips_LxBxTxE = scanned(Block, cfg.remat, L)(
          cfg, self.attention_fn, name="in_blocks")(x_BxTxE)
      self.sow("intermediates", "in_block_outputs", skips_LxBxTxE)
    x_BxTxE, _ = remat(Block, cfg.remat)(cfg, self.attention_fn, name="mid_block")(x_BxTxE)
    self.sow("intermediates", "mid_block_output", x_BxTxE)
    if L:
      x_BxTxE, outs_LxBxTxE = scanned(Block, cfg.remat, L, in_axes=0)(
          cfg, self.attention_fn, skip=True, emit=emit, name="out_blocks")(
              x_BxTxE, self.long_skips(skips_LxBxTxE))
      self.sow("intermediates", "out_block_outputs", outs_LxBxTxE)

    x_BxTxE = LayerNorm(cfg, eps=cfg.norm_eps, name="norm")(x_BxTxE)
    out_BxSxP = Dense(cfg, (p * p * cfg.out_channels,), ("embed", "patch"), kernel_init=_INIT,
                      out_dtype=jnp.float32, name="decoder_pred")(x_BxTxE[:, EXTRA_TOKENS:])
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    out_BxHxWxC = unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)
    if cfg.final_conv:
      C = cfg.out_channels
      out_BxHxWxC = nn.Conv(
          C, (3, 3), padding="SAME", dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   (None, None, None, None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
          name="final_conv")(out_BxHxWxC)
    return out_BxHxWxC


FAMILY = Family(
    name="uvit", Config=Config, Model=Model, task="diffusion",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: cfg.max_len,
    test_config=dict(variant="digits", hidden_size=256, depth=3, num_heads=4, input_size=8,
                     patch_size=2, in_channels=4))
