"""PixArt-α ("PixArt-α: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", Chen et al.): DiT blocks with cross-attention to the caption and adaLN-single.

Latents [B, H, W, C] -> linear patch embedding + fixed 2-D sin-cos positions -> ``depth`` blocks
-> final layer -> unpatchify to [B, H, W, C_out] (C_out = 2·C with learn_sigma). A block is
  x + gate·SelfAttn(LN(x)·(1+scale)+shift);  x + CrossAttn(x, caption);  x + gate·Mlp(LN(x)·...)
with LayerNorms without affine parameters. adaLN-single: ONE shared MLP (``t_block``: SiLU ->
Linear E -> 6E) maps the timestep embedding t to global shift/scale/gate t6 [B, 6, E]; each block
adds its own learned table [6, E] (``scale_shift_table``, init N(0, 1)/√E) to t6. The final
layer's table [2, E] is added to t itself. The caption (nets/text_encoder.py, with caption
dropout) is projected to the hidden width by an MLP (Linear, tanh-GELU, Linear); cross-attention
keys at padded caption positions are masked.

Initialisation as the reference: Xavier-uniform linears with zero biases, N(0, 0.02) timestep
MLP, t_block and caption MLP, and zero cross-attention output projections and final linear, so the
network output starts at exactly 0 and, at init, does not depend on the caption.

Sequence parallelism: self-attention runs the model's attention function over the image tokens
(Ulysses/ring over mesh.seq); the cross-attention is the dense kernel with the image queries
sequence-sharded and the caption keys whole on every shard (short; no collective).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting
from nets.conditioning import (FREQUENCY_EMBEDDING_SIZE, ImageConfig, TimestepEmbedder,
                               check_image_fields, check_input, modulate)
from nets.layers import (Attention, Dense, LayerNorm, Mlp, build_config, check_basics, patchify,
                         scanned, sincos_2d, unpatchify)
from nets.registry import Family
from nets.text_encoder import (Captions, TextConfig, captions_flops, captions_params, check_text,
                               encode)

_ACT = ("act_batch", "act_seq", "act_embed")
_TEXT = dict(text_len=120, text_layers=6, text_heads=16)
VARIANTS = {
    # PixArt-α XL/2 (the paper's only size): DiT-XL/2's transformer on 32×32×4 SD-VAE latents;
    # the trained byte encoder stands in for T5-XXL at the model's width.
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, input_size=32,
                 in_channels=4, text_width=1152, **_TEXT),
    # 48×48 grey canvases of captioned digits (train/caption_data.py) and tests.
    "digits": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, input_size=48,
                   in_channels=1, text_len=64, text_width=128, text_layers=2, text_heads=4),
}


@dataclasses.dataclass(frozen=True)
class Config(TextConfig, ImageConfig):
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  learn_sigma: bool = True

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    return build_config(cls, "pixart", VARIANTS, model_cfg, overrides)

  def validate(self):
    check_basics(self, "pixart", ("input_size", "in_channels", "patch_size", "hidden_size",
                                  "depth", "num_heads"))
    check_text(self, "pixart")
    check_image_fields(self)

  @property
  def max_len(self) -> int:
    """Image tokens the self-attention sees."""
    return self.image_tokens


class CrossAttention(nn.Module):
  """Image queries [B, S, E] attend to caption keys [B, L, E]; padded keys masked. The output
  projection starts at zero (the reference), so a new block ignores the caption."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxSxE, y_BxLxE, mask_BxL):
    cfg = self.cfg
    E, H = x_BxSxE.shape[-1], cfg.num_heads
    D = E // H
    q_BxSxHxD = Dense(cfg, (H, D), ("embed", "heads", "head_dim"), name="q")(x_BxSxE)
    kv_BxLx2xHxD = Dense(cfg, (2, H, D), ("embed", None, "heads", "head_dim"), name="kv")(y_BxLxE)
    q_BxSxHxD = nn.with_logical_constraint(q_BxSxHxD,
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    kv_names = ("act_batch", None, "act_kv_heads", "head_dim")
    k_BxLxHxD = nn.with_logical_constraint(kv_BxLx2xHxD[:, :, 0], kv_names)
    v_BxLxHxD = nn.with_logical_constraint(kv_BxLx2xHxD[:, :, 1], kv_names)
    B, S = x_BxSxE.shape[:2]
    o_BxSxHxD = attention.dot_product_attention(
        q_BxSxHxD, k_BxLxHxD, v_BxLxHxD, causal=False,
        segment_ids_BxS=jnp.ones((B, S), jnp.int32), segment_ids_BxT=mask_BxL.astype(jnp.int32))
    o_BxSxHxD = nn.with_logical_constraint(o_BxSxHxD,
                                           ("act_batch", "act_seq", "act_heads", "head_dim"))
    return Dense(cfg, (E,), ("heads", "head_dim", "embed"), n_in=2,
                 kernel_init=nn.initializers.zeros, name="out")(o_BxSxHxD)


def table_init(key, shape, dtype=jnp.float32):
  """N(0, 1)/√E, as the reference's scale_shift_table."""
  return nn.initializers.normal(shape[-1] ** -0.5)(key, shape, dtype)


class Block(nn.Module):
  """PixArt block: adaLN-single modulation = this block's [6, E] table + the shared t6."""
  cfg: Any
  attention_fn: Callable[..., Any]

  @nn.compact
  def __call__(self, x_BxSxE, t6_Bx6xE, y_BxLxE, mask_BxL):
    cfg = self.cfg
    E = x_BxSxE.shape[-1]
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    table = self.param("scale_shift_table", nn.with_logical_partitioning(table_init,
                                                                          (None, "embed")),
                       (6, E), jnp.dtype(cfg.param_dtype))
    mod_Bx6xE = table.astype(t6_Bx6xE.dtype)[None] + t6_Bx6xE
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod_Bx6xE[:, i] for i in range(6))
    h = modulate(LayerNorm(cfg, affine=False)(x_BxSxE), shift_msa, scale_msa)
    h = Attention(cfg, self.attention_fn, cfg.num_heads, name="attn")(h)
    x_BxSxE = x_BxSxE + gate_msa[:, None] * h
    x_BxSxE = x_BxSxE + CrossAttention(cfg, name="cross_attn")(x_BxSxE, y_BxLxE, mask_BxL)
    h = modulate(LayerNorm(cfg, affine=False)(x_BxSxE), shift_mlp, scale_mlp)
    h = Mlp(cfg, cfg.mlp_width, name="mlp")(h)
    x_BxSxE = x_BxSxE + gate_mlp[:, None] * h
    return nn.with_logical_constraint(x_BxSxE, _ACT), None


class Model(nn.Module):
  """PixArt-α: x [B, H, W, C], t [B], caption ids/mask [B, L] -> [B, H, W, C_out] float32."""
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, text_ids_BxL, text_mask_BxL, train: bool = False,
               force_drop_ids_B=None):
    cfg = self.cfg
    E, p = cfg.hidden_size, cfg.patch_size
    g = cfg.input_size // p
    check_input(cfg, x_BxHxWxC)
    x_BxSxE = Dense(cfg, (E,), ("patch", "embed"), name="x_embedder")(patchify(x_BxHxWxC, p))
    x_BxSxE = x_BxSxE + sincos_2d(g, g, E).astype(cfg.dtype)
    t_BxE = TimestepEmbedder(cfg, E, name="t_embedder")(t_B)
    t6_Bx6xE = Dense(cfg, (6, E), ("embed", None, "mlp"), kernel_init=nn.initializers.normal(0.02),
                     name="t_block")(nn.silu(t_BxE))
    t6_Bx6xE = nn.with_logical_constraint(t6_Bx6xE, ("act_batch", None, "act_embed"))
    feats_BxLxT, mask_BxL = Captions(cfg, name="captions")(
        encode(cfg, text_ids_BxL, text_mask_BxL), text_mask_BxL, train, force_drop_ids_B)
    init = nn.initializers.normal(0.02)
    y_BxLxE = Dense(cfg, (E,), ("embed", "mlp"), kernel_init=init, name="y_fc1")(feats_BxLxT)
    y_BxLxE = Dense(cfg, (E,), ("mlp", "embed"), kernel_init=init, name="y_fc2")(
        nn.gelu(y_BxLxE, approximate=True))
    y_BxLxE = nn.with_logical_constraint(y_BxLxE, ("act_batch", None, "act_embed"))

    blocks = scanned(Block, cfg.remat, cfg.depth)(cfg, self.attention_fn, name="blocks")
    x_BxSxE, _ = blocks(x_BxSxE, t6_Bx6xE, y_BxLxE, mask_BxL)
    out_BxSxP = FinalLayer(cfg, p * p * cfg.out_channels, name="final_layer")(x_BxSxE, t_BxE)
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    return unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)


class FinalLayer(nn.Module):
  """LN -> modulate by (its [2, E] table + t) -> zero-initialised Linear to p·p·C_out."""
  cfg: Any
  out_dim: int

  @nn.compact
  def __call__(self, x_BxSxE, t_BxE):
    E = x_BxSxE.shape[-1]
    table = self.param("scale_shift_table", nn.with_logical_partitioning(table_init,
                                                                          (None, "embed")),
                       (2, E), jnp.dtype(self.cfg.param_dtype))
    mod_Bx2xE = table.astype(t_BxE.dtype)[None] + t_BxE[:, None]
    h = modulate(LayerNorm(self.cfg, affine=False)(x_BxSxE), mod_Bx2xE[:, 0], mod_Bx2xE[:, 1])
    return Dense(self.cfg, (self.out_dim,), ("embed", "patch"), kernel_init=nn.initializers.zeros,
                 out_dtype=jnp.float32, name="linear")(h)


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  del active
  E, P, M, T = cfg.hidden_size, cfg.patch_size ** 2, cfg.mlp_width, cfg.text_width
  block = (6 * E + (3 * E * E + 3 * E) + (E * E + E)  # table, self-attention
           + (E * E + E) + (2 * E * E + 2 * E) + (E * E + E)  # cross-attention q, kv, out
           + (E * M + M) + (M * E + E))  # MLP
  n = P * cfg.in_channels * E + E  # patch embedding
  n += FREQUENCY_EMBEDDING_SIZE * E + E + E * E + E  # timestep MLP
  n += E * 6 * E + 6 * E  # t_block
  n += captions_params(cfg) + (T * E + E) + (E * E + E)  # encoder + caption MLP
  n += cfg.depth * block + 2 * E + (E * P * cfg.out_channels + P * cfg.out_channels)
  return n


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: patch embedding + timestep MLP + t_block 2·E·6E + caption encoder
  and MLP (L tokens) + depth × (self-attention block over S, cross-attention S queries x L keys,
  the caption K/V projections 2·2·E²·L) + final linear."""
  E, p, S, M, L = cfg.hidden_size, cfg.patch_size, cfg.max_len, cfg.mlp_width, cfg.text_len
  T = cfg.text_width
  block = (S * (2 * 4 * E * E + counting.attention(S, E, False, step.executed) + 4 * E * M)
           + S * (2 * 2 * E * E + counting.attention(L, E, False, step.executed))  # q, out
           + L * 2 * 2 * E * E)  # caption k, v
  return (2 * p * p * cfg.in_channels * E * S + 2 * FREQUENCY_EMBEDDING_SIZE * E + 2 * E * E
          + 2 * E * 6 * E + captions_flops(cfg, step) + L * (2 * T * E + 2 * E * E)
          + cfg.depth * block + 2 * E * p * p * cfg.out_channels * S)


FAMILY = Family(
    name="pixart", Config=Config, Model=Model, task="diffusion", num_params=num_params,
    flops=flops, attention_length=lambda cfg, seq_len: cfg.max_len, conditioning="text",
    test_config=dict(variant="digits", hidden_size=256, depth=2, num_heads=4, input_size=8,
                     patch_size=2, in_channels=4, text_len=16, text_width=256, text_layers=1))
