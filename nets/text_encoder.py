"""Text conditioning shared by the text-to-image families (nets/pixart.py, nets/mmdit.py).

Captions arrive as byte tokens (the ByT5 convention: id = utf-8 byte + 3, pad 0, eos 1) with a
mask [B, L] (True = a real token). ``encode`` runs the encoder ``model.text_encoder`` names as the
family's ``text_encoder`` submodule (params["text_encoder"]):
  * "trained": ``TextEncoder``, the small bidirectional Transformer trained with the diffusion
    model: token table + learned positions -> ``text_layers`` pre-LN blocks whose attention masks
    the padding (real tokens segment 1, padding segment 0) -> final LayerNorm -> [B, L, text_width];
  * "t5": a frozen imported T5 encoder (nets/t5.py; PixArt-α conditions on T5 features). Its
    architecture ``t5`` (a nets.t5.Config) is data the config carries: train/models.py reads it
    from the Hugging Face folder ``model.text_encoder_path`` (nets/ reads no files), text_width is
    its d_model, and it runs in the model's dtype and param_dtype. Its output goes through
    ``jax.lax.stop_gradient``, so no backward pass runs through it; train/ loads its weights into
    a fresh state and gives the optimizer a mask that never changes them (train/text_encoders.py).

``Captions`` applies caption dropout for classifier-free guidance to the encoded captions, as
PixArt-α's CaptionEmbedder: a dropped row's features are replaced by a learned null embedding
[L, text_width] (PixArt's y_embedding) and its mask by all-ones, so the unconditional model sees
no caption and no row is ever left without keys. ``train=True`` drops with
model.caption_dropout_prob ("dropout" rng); ``force_drop_ids_B`` (1 = drop) decides alone when
given, which is how guidance asks for the unconditional half.

The trained encoder runs with whole captions on every sequence shard: it calls the dense reference
attention, not the model's sequence-parallel attention function, so the caption length need not
divide mesh.seq (captions are short; the image or joint sequence is what Ulysses splits).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import attention, counting, t5
from nets.layers import Attention, LayerNorm, Mlp, scanned

TEXT_ENCODERS = ("trained", "t5")
PAD, EOS, BYTE_OFFSET = 0, 1, 3  # ByT5 ids: pad, end of sequence, utf-8 byte + 3
_TEXT_ACT = ("act_batch", None, "act_embed")  # whole captions on every seq shard


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text fields of a text-conditioned family's Config (its base class)."""
  text_encoder: str = "trained"  # one of TEXT_ENCODERS
  text_encoder_path: str = ""  # "t5": its Hugging Face folder (train/ reads it; nets/ never does)
  t5: Any = None  # "t5": the folder's nets.t5.Config, set by train/models.py from its config.json
  text_len: int = 64  # caption tokens L (padded or cut by the data)
  text_vocab: int = 384  # 259 byte ids, rounded up to a multiple of 128
  text_width: int = 0
  text_layers: int = 2
  text_heads: int = 4
  text_mlp_ratio: float = 4.0
  caption_dropout_prob: float = 0.1


def check_text(cfg, family: str) -> None:
  """Raises one sentence for unusable text fields."""
  if cfg.text_encoder not in TEXT_ENCODERS:
    raise ValueError(f"model.text_encoder={cfg.text_encoder!r} is not one of {TEXT_ENCODERS}.")
  for name in ("text_len", "text_width"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"model.{name}={getattr(cfg, name)} must be positive; set model.variant "
                       f"(see nets/{family}.py VARIANTS) or model.{name}.")
  if not 0.0 <= cfg.caption_dropout_prob <= 1.0:
    raise ValueError(f"model.caption_dropout_prob={cfg.caption_dropout_prob} must be in [0, 1].")
  if cfg.text_encoder == "t5":
    _check_t5(cfg)
    return
  if cfg.text_encoder_path:
    raise ValueError(f"model.text_encoder_path={cfg.text_encoder_path!r} is set but "
                     "model.text_encoder='trained' ignores it; set model.text_encoder='t5' to "
                     "condition on that frozen T5 encoder, or leave the path empty.")
  for name in ("text_vocab", "text_layers", "text_heads"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"model.{name}={getattr(cfg, name)} must be positive; set model.variant "
                       f"(see nets/{family}.py VARIANTS) or model.{name}.")
  if cfg.text_vocab < 256 + BYTE_OFFSET:
    raise ValueError(f"model.text_vocab={cfg.text_vocab} is too small for byte tokens; use at "
                     f"least {256 + BYTE_OFFSET} (384 is the usual rounding).")
  if cfg.text_width % cfg.text_heads:
    raise ValueError(f"model.text_width={cfg.text_width} is not divisible by "
                     f"model.text_heads={cfg.text_heads}.")


def _check_t5(cfg) -> None:
  """The frozen T5 encoder: its Config arrived (train/ reads it) and fits byte captions."""
  if not isinstance(cfg.t5, t5.Config):
    raise ValueError("model.text_encoder='t5' needs the encoder's architecture, which train/ "
                     "reads from model.text_encoder_path (a Hugging Face T5 folder); build the "
                     "config with train.models.model_config.")
  if cfg.text_width != cfg.t5.d_model:
    raise ValueError(f"model.text_width={cfg.text_width} differs from the T5 encoder's "
                     f"d_model={cfg.t5.d_model}; leave model.text_width unset with "
                     "model.text_encoder='t5'.")
  if cfg.t5.vocab_size < 256 + BYTE_OFFSET:
    raise ValueError(f"the T5 encoder at model.text_encoder_path={cfg.text_encoder_path} has "
                     f"vocab_size={cfg.t5.vocab_size}, too small for byte tokens (at least "
                     f"{256 + BYTE_OFFSET}); captions are ByT5 byte ids, so use a ByT5 encoder.")


def _text_mlp(cfg) -> int:
  return int(cfg.text_width * cfg.text_mlp_ratio)


class _Block(nn.Module):
  """Pre-LN block: x + Attn(LN(x)) over the caption's real tokens, then x + Mlp(LN(x))."""
  cfg: Any
  attention_fn: Callable[..., Any]

  @nn.compact
  def __call__(self, x_BxLxT, segment_ids_BxL):
    cfg = self.cfg
    h = Attention(cfg, self.attention_fn, cfg.text_heads, name="attn")(
        LayerNorm(cfg, name="norm1")(x_BxLxT), segment_ids_BxL)
    x_BxLxT = nn.with_logical_constraint(x_BxLxT + h, _TEXT_ACT)
    h = Mlp(cfg, _text_mlp(cfg), name="mlp")(LayerNorm(cfg, name="norm2")(x_BxLxT))
    return nn.with_logical_constraint(x_BxLxT + h, _TEXT_ACT), None


class TextEncoder(nn.Module):
  """Byte-token captions ids [B, L], mask [B, L] -> features [B, L, text_width]."""
  cfg: Any  # a Config with TextConfig's fields (and dtype, param_dtype, remat)
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL):
    cfg = self.cfg
    L, W = ids_BxL.shape[1], cfg.text_width
    init = nn.initializers.normal(0.02)
    table = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                       (cfg.text_vocab, W), jnp.dtype(cfg.param_dtype))
    pos = self.param("pos_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                     (L, W), jnp.dtype(cfg.param_dtype))
    table = nn.with_logical_constraint(table, (None, None))  # gather from a replicated table
    x_BxLxT = (jnp.take(table, ids_BxL, axis=0) + pos[None]).astype(cfg.dtype)
    x_BxLxT = nn.with_logical_constraint(x_BxLxT, _TEXT_ACT)
    segment_ids_BxL = mask_BxL.astype(jnp.int32)  # real tokens 1, padding 0: never mixed
    blocks = scanned(_Block, cfg.remat, cfg.text_layers)(cfg, self.attention_fn, name="blocks")
    x_BxLxT, _ = blocks(x_BxLxT, segment_ids_BxL)
    return LayerNorm(cfg, name="norm")(x_BxLxT)


def make_encoder(cfg, name: str = "text_encoder") -> nn.Module:
  """The caption encoder model.text_encoder names: ids [B, L], mask [B, L] -> [B, L, text_width]."""
  if cfg.text_encoder == "t5":
    return t5.Encoder(dataclasses.replace(cfg.t5, dtype=cfg.dtype, param_dtype=cfg.param_dtype),
                      name=name)
  return TextEncoder(cfg, attention.dot_product_attention, name=name)


def encode(cfg, ids_BxL, mask_BxL):
  """Caption features [B, L, text_width], from the encoder built as the calling module's
  ``text_encoder`` submodule (call it inside a compact method). A frozen (imported) encoder's
  output carries no gradient, so the backward pass never runs through it."""
  L = ids_BxL.shape[1]
  if L != cfg.text_len:
    raise ValueError(f"captions have {L} tokens but model.text_len={cfg.text_len}.")
  feats_BxLxT = make_encoder(cfg)(ids_BxL, mask_BxL.astype(bool))
  if cfg.text_encoder == "t5":
    feats_BxLxT = jax.lax.stop_gradient(feats_BxLxT)
  return nn.with_logical_constraint(feats_BxLxT, _TEXT_ACT)


def drop_mask(module: nn.Module, cfg, batch: int, train: bool, force_drop_ids_B=None):
  """bool [B]: rows whose caption is dropped (force_drop_ids_B decides alone when given)."""
  if force_drop_ids_B is not None:
    return force_drop_ids_B == 1
  if train and cfg.caption_dropout_prob > 0:
    return jax.random.uniform(module.make_rng("dropout"), (batch,)) < cfg.caption_dropout_prob
  return jnp.zeros((batch,), bool)


class Captions(nn.Module):
  """Caption dropout on encoded captions: (features [B, L, text_width], mask [B, L] bool)."""
  cfg: Any

  @nn.compact
  def __call__(self, feats_BxLxT, mask_BxL, train: bool = False, force_drop_ids_B=None):
    cfg = self.cfg
    B, L = mask_BxL.shape
    mask_BxL = mask_BxL.astype(bool)
    null_LxT = self.param("null_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.text_width ** -0.5), (None, "embed")), (L, cfg.text_width),
        jnp.dtype(cfg.param_dtype))
    drop_B = drop_mask(self, cfg, B, train, force_drop_ids_B)
    feats_BxLxT = jnp.where(drop_B[:, None, None], null_LxT.astype(feats_BxLxT.dtype)[None],
                            feats_BxLxT)
    mask_BxL = mask_BxL | drop_B[:, None]
    return nn.with_logical_constraint(feats_BxLxT, _TEXT_ACT), mask_BxL


def captions_params(cfg) -> int:
  """Parameters of the caption path: the encoder (T5's, or the trained one's token table,
  positions, blocks and final LN) and the null embedding."""
  W, M, L = cfg.text_width, _text_mlp(cfg), cfg.text_len
  if cfg.text_encoder == "t5":
    return t5.param_count(cfg.t5) + L * W
  block = 4 * W + (3 * W * W + 3 * W) + (W * W + W) + (W * M + M) + (M * W + W)
  return cfg.text_vocab * W + L * W + cfg.text_layers * block + 2 * W + L * W


def captions_flops(cfg, step: counting.Step) -> float:
  """Encoder forward FLOPs per caption. Trained: per token 2·4·W² (qkv, out) + attention over the
  L keys + 2·2·W·M (MLP), ``text_layers`` times (the embedding is a gather). T5: nets.t5.flops.
  A frozen encoder runs no backward pass, so train/flops.py's 3 x forward per step overcounts it
  by two of its forward passes."""
  W, L = cfg.text_width, cfg.text_len
  if cfg.text_encoder == "t5":
    return t5.flops(cfg.t5, L, step.executed)
  per_token = (2 * 4 * W * W + counting.attention(L, W, False, step.executed)
               + 4 * W * _text_mlp(cfg))
  return cfg.text_layers * L * per_token
