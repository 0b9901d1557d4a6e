"""MMDiT ("Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Esser et al.,
SD3): two token streams with their own weights and one joint attention over both.

Latents [B, H, W, C] -> linear patch embedding + fixed 2-D sin-cos positions (image stream);
caption features (nets/text_encoder.py, with caption dropout) -> Linear to the hidden width (text
stream). c = timestep embedding + MLP(masked mean of the caption features) (SD3's pooled text
vector). Each block: per stream adaLN-Zero modulation from c, its own QKV with QK-RMSNorm per
head, one attention over the concatenation [text; image], per-stream output projection and MLP,
gated residuals. The last block keeps only the image stream's outputs (SD3's context_pre_only:
the text stream there only supplies keys and values). The final adaLN layer runs on image tokens
only -> unpatchify to [B, H, W, C_out].

Padded caption tokens are masked as keys through segment ids over the joint sequence: image
tokens and real caption tokens are segment 1, padding segment 2 (padding attends only to
padding, whose outputs nothing reads). The segment ids travel through any attention function,
Ulysses included: with mesh.seq > 1 the joint sequence of text_len + image tokens is what the
seq axis splits.

Initialisation as DiT: Xavier-uniform linears with zero biases, N(0, 0.02) timestep and pooled
MLPs, zero modulation linears and a zero final layer, so every block starts as the identity on the
image stream and the output starts at exactly 0.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting
from nets.conditioning import (FREQUENCY_EMBEDDING_SIZE, AdaLN, FinalLayer, ImageConfig,
                               TimestepEmbedder, check_image_fields, check_input, modulate)
from nets.layers import (Dense, LayerNorm, Mlp, RMSNorm, build_config, check_basics, patchify,
                         scanned, sincos_2d, unpatchify)
from nets.registry import Family
from nets.text_encoder import (Captions, TextConfig, captions_flops, captions_params, check_text,
                               encode)

_ACT = ("act_batch", "act_seq", "act_embed")
_TEXT_ACT = ("act_batch", None, "act_embed")
_QKV = ("act_batch", "act_seq", "act_heads", "head_dim")
VARIANTS = {
    # SD3-medium's transformer shape (depth 24, width 64 x 24 heads) on 128×128×16 latents
    # (1024 px); the trained byte encoder stands in for SD3's CLIP + T5 text features.
    "medium": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2, input_size=128,
                   in_channels=16, text_len=256, text_width=1536, text_layers=6, text_heads=24),
    # 48×48 grey canvases of captioned digits (train/caption_data.py) and tests.
    "digits": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, input_size=48,
                   in_channels=1, text_len=64, text_width=128, text_layers=2, text_heads=4),
}


@dataclasses.dataclass(frozen=True)
class Config(TextConfig, ImageConfig):
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  learn_sigma: bool = False  # SD3 trains rectified flow (diffusion.objective="flow")
  qk_norm_eps: float = 1e-6

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    return build_config(cls, "mmdit", VARIANTS, model_cfg, overrides)

  def validate(self):
    check_basics(self, "mmdit", ("input_size", "in_channels", "patch_size", "hidden_size",
                                 "depth", "num_heads"))
    check_text(self, "mmdit")
    check_image_fields(self)
    if not self.qk_norm_eps > 0:
      raise ValueError(f"model.qk_norm_eps={self.qk_norm_eps} must be positive.")

  @property
  def max_len(self) -> int:
    """The joint sequence: caption tokens + image tokens."""
    return self.text_len + self.image_tokens

  norm_eps = property(lambda self: self.qk_norm_eps)  # what nets.layers.RMSNorm reads


def joint_segment_ids(mask_BxL, image_tokens: int):
  """[B, L + S] int32: real caption tokens and image tokens 1, caption padding 2."""
  B = mask_BxL.shape[0]
  text_BxL = jnp.where(mask_BxL, 1, 2).astype(jnp.int32)
  return jnp.concatenate([text_BxL, jnp.ones((B, image_tokens), jnp.int32)], axis=1)


class Block(nn.Module):
  """Joint block on the carry (image x [B, S, E], text [B, L, E]); ``pre_only``: the text stream
  only gives keys and values (its modulation is 2 vectors, no output projection or MLP)."""
  cfg: Any
  attention_fn: Callable[..., Any]
  pre_only: bool = False

  @nn.compact
  def __call__(self, carry, c_BxE, segment_ids_BxN):
    cfg = self.cfg
    x_BxSxE, ctx_BxLxE = carry
    E, H = x_BxSxE.shape[-1], cfg.num_heads
    D, L = E // H, ctx_BxLxE.shape[1]
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    ctx_BxLxE = nn.with_logical_constraint(ctx_BxLxE, _TEXT_ACT)
    mod_x = AdaLN(cfg, 6, name="adaLN_x")(c_BxE)
    mod_c = AdaLN(cfg, 2 if self.pre_only else 6, name="adaLN_c")(c_BxE)

    def qkv(h, mod, stream):
      h = modulate(LayerNorm(cfg, affine=False)(h), mod[:, 0], mod[:, 1])
      qkv_Bx_x3xHxD = Dense(cfg, (3, H, D), ("embed", None, "heads", "head_dim"),
                            name=f"qkv_{stream}")(h)
      q = RMSNorm(cfg, name=f"norm_q_{stream}")(qkv_Bx_x3xHxD[:, :, 0])
      k = RMSNorm(cfg, name=f"norm_k_{stream}")(qkv_Bx_x3xHxD[:, :, 1])
      return q, k, qkv_Bx_x3xHxD[:, :, 2].astype(q.dtype)

    (qc, kc, vc), (qx, kx, vx) = qkv(ctx_BxLxE, mod_c, "c"), qkv(x_BxSxE, mod_x, "x")
    q_BxNxHxD, k_BxNxHxD, v_BxNxHxD = (
        nn.with_logical_constraint(jnp.concatenate(pair, axis=1), _QKV)
        for pair in ((qc, qx), (kc, kx), (vc, vx)))
    o_BxNxHxD = self.attention_fn(q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, causal=False,
                                  positions_BxS=None, segment_ids_BxS=segment_ids_BxN)
    o_BxNxHxD = nn.with_logical_constraint(o_BxNxHxD, _QKV)

    def finish(h, o, mod, stream, names):
      h = h + mod[:, 2, None] * Dense(cfg, (E,), ("heads", "head_dim", "embed"), n_in=2,
                                      name=f"out_{stream}")(o)
      m = Mlp(cfg, cfg.mlp_width, name=f"mlp_{stream}")(
          modulate(LayerNorm(cfg, affine=False)(h), mod[:, 3], mod[:, 4]))
      return nn.with_logical_constraint(h + mod[:, 5, None] * m, names)

    x_BxSxE = finish(x_BxSxE, o_BxNxHxD[:, L:], mod_x, "x", _ACT)
    if not self.pre_only:
      ctx_BxLxE = finish(ctx_BxLxE, o_BxNxHxD[:, :L], mod_c, "c", _TEXT_ACT)
    return (x_BxSxE, ctx_BxLxE), None


class Model(nn.Module):
  """MMDiT: x [B, H, W, C], t [B], caption ids/mask [B, L] -> [B, H, W, C_out] float32."""
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
    feats_BxLxT, mask_BxL = Captions(cfg, name="captions")(
        encode(cfg, text_ids_BxL, text_mask_BxL), text_mask_BxL, train, force_drop_ids_B)
    ctx_BxLxE = Dense(cfg, (E,), (None, "embed"), name="context_embedder")(feats_BxLxT)
    # SD3's pooled text vector: here the masked mean of the caption features, through an MLP.
    w_BxL = mask_BxL.astype(jnp.float32)
    pooled_BxT = (jnp.einsum("bl,blt->bt", w_BxL, feats_BxLxT.astype(jnp.float32))
                  / jnp.sum(w_BxL, axis=1, keepdims=True)).astype(cfg.dtype)
    init = nn.initializers.normal(0.02)
    pooled_BxE = Dense(cfg, (E,), (None, "mlp"), kernel_init=init, name="pooled_fc1")(pooled_BxT)
    pooled_BxE = Dense(cfg, (E,), ("mlp", "embed"), kernel_init=init, name="pooled_fc2")(
        nn.silu(pooled_BxE))
    c_BxE = TimestepEmbedder(cfg, E, name="t_embedder")(t_B) + pooled_BxE
    c_BxE = nn.with_logical_constraint(c_BxE, ("act_batch", "act_embed"))

    segment_ids_BxN = joint_segment_ids(mask_BxL, cfg.image_tokens)
    carry = (x_BxSxE, ctx_BxLxE)
    if cfg.depth > 1:
      blocks = scanned(Block, cfg.remat, cfg.depth - 1)(cfg, self.attention_fn, name="blocks")
      carry, _ = blocks(carry, c_BxE, segment_ids_BxN)
    (x_BxSxE, _), _ = Block(cfg, self.attention_fn, pre_only=True, name="last_block")(
        carry, c_BxE, segment_ids_BxN)
    out_BxSxP = FinalLayer(cfg, p * p * cfg.out_channels, name="final_layer")(x_BxSxE, c_BxE)
    out_BxSxP = nn.with_logical_constraint(out_BxSxP, ("act_batch", "act_seq", None))
    return unpatchify(out_BxSxP, g, g, p).astype(jnp.float32)


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  del active
  E, P, M, T = cfg.hidden_size, cfg.patch_size ** 2, cfg.mlp_width, cfg.text_width
  D = E // cfg.num_heads
  stream_in = (3 * E * E + 3 * E) + 2 * D  # qkv, q/k RMSNorm scales
  stream_out = (E * E + E) + (E * M + M) + (M * E + E)  # out projection, MLP
  ada = lambda n: E * n * E + n * E
  block = 2 * (ada(6) + stream_in + stream_out)
  last = ada(6) + ada(2) + 2 * stream_in + stream_out
  n = P * cfg.in_channels * E + E  # patch embedding
  n += FREQUENCY_EMBEDDING_SIZE * E + E + E * E + E  # timestep MLP
  n += captions_params(cfg) + (T * E + E) + (T * E + E) + (E * E + E)  # context, pooled MLP
  n += (cfg.depth - 1) * block + last
  n += ada(2) + E * P * cfg.out_channels + P * cfg.out_channels  # final layer
  return n


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: patch embedding + timestep and pooled MLPs + caption encoder and
  context projection + per block: modulation (2·E·6E per stream), QKV 2·3E² per joint token,
  attention over the N = L + S joint tokens, output projection and MLP per token of the streams
  that keep outputs (the last block: image only) + final layer."""
  E, p, S, M, L = cfg.hidden_size, cfg.patch_size, cfg.image_tokens, cfg.mlp_width, cfg.text_len
  T, N = cfg.text_width, cfg.max_len
  joint = N * (2 * 3 * E * E + counting.attention(N, E, False, step.executed))
  out = 2 * E * E + 4 * E * M
  block = 2 * 2 * E * 6 * E + joint + N * out
  last = 2 * E * 6 * E + 2 * E * 2 * E + joint + S * out
  return (2 * p * p * cfg.in_channels * E * S + 2 * FREQUENCY_EMBEDDING_SIZE * E + 2 * E * E
          + captions_flops(cfg, step) + L * 2 * T * E + 2 * T * E + 2 * E * E
          + (cfg.depth - 1) * block + last + 2 * E * 2 * E + 2 * E * p * p * cfg.out_channels * S)


FAMILY = Family(
    name="mmdit", Config=Config, Model=Model, task="diffusion", num_params=num_params,
    flops=flops, attention_length=lambda cfg, seq_len: cfg.max_len, conditioning="text",
    test_config=dict(variant="digits", hidden_size=256, depth=2, num_heads=4, input_size=8,
                     patch_size=2, in_channels=4, text_len=16, text_width=256, text_layers=1))
