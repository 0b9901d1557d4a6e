"""VAR's multi-scale residual VQ tokenizer ("Visual Autoregressive Modeling", Tian et al. 2024):
the convolutional encoder and decoder of latent diffusion's autoencoder (nets/autoencoder.py)
around the multi-scale quantiser of nets/msvq.py.

images [B, H, W, C] in [-1, 1] -> Encoder (conv_out to ``embed_dim`` channels) -> quant_conv 3x3
-> features f [B, h, h, embed_dim], h = H / 2^(len(block_out_channels) - 1) -> Quantizer: token
maps of every scale (ids [B, s_k, s_k], one shared codebook) and f̂, the sum of their upsampled
codes -> post_quant_conv 3x3 -> Decoder -> reconstruction [B, H, W, C]. As in VAR, the quant and
post-quant convolutions are 3x3 and the decoder sees f̂ through the straight-through estimator, so
the reconstruction loss trains the encoder too.

A tokenizer run (train/tasks/vqvae.py) trains it with the reconstruction loss plus the quantiser's
VQ loss (commitment and codebook terms), tracks each code's running usage in the train state and
restarts dead codes there; ``train.encode`` writes a trained tokenizer's token maps of an image
source as ArrayRecord shards, which VAR (nets/var.py) trains on. ``tokenize`` and ``decode_ids``
are the two halves a VAR sampler needs.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import autoencoder, counting, msvq
from nets.autoencoder import Conv, Decoder, Encoder
from nets.layers import build_config, check_basics
from nets.registry import Family

VARIANTS = {
    # the digits upscaled to 32x32 (1 channel): f=4, 8x8 features quantised at 1, 2, 3, 4, 6, 8
    "digits": dict(in_channels=1, block_out_channels=(16, 32, 64), layers_per_block=1,
                   norm_num_groups=8, image_size=32, codebook_size=512, embed_dim=16,
                   scales=(1, 2, 3, 4, 6, 8)),
    # VAR's 256 px tokenizer: f=16, 16x16x32 features, 4096 codes, ten scales 1..16
    "var256": dict(in_channels=3, block_out_channels=(160, 160, 320, 320, 640), layers_per_block=2,
                   norm_num_groups=32, image_size=256, codebook_size=4096, embed_dim=32,
                   scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  in_channels: int = 3
  block_out_channels: tuple[int, ...] = ()
  layers_per_block: int = 0
  norm_num_groups: int = 32
  image_size: int = 256
  mid_block_attention: bool = True
  codebook_size: int = 0  # V
  embed_dim: int = 0  # C: feature channels, the codebook's width
  scales: tuple[int, ...] = ()  # token-map sides, coarse to fine; the last is the feature side h
  beta: float = 0.25  # commitment weight
  quant_resi: float = 0.5  # share of phi's 3x3 conv (nets/msvq.py)
  dtype: str = "float32"  # compute dtype of the convolutions; the quantiser runs in float32
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES, applied per ResNet block

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    fields = dict(model_cfg)
    for name in ("block_out_channels", "scales"):  # JSON lists back from config.json
      if fields.get(name) is not None:
        overrides = {name: tuple(int(c) for c in fields[name]), **overrides}
    return build_config(cls, "vqvae", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "vqvae", ("in_channels", "layers_per_block", "norm_num_groups",
                                 "image_size", "codebook_size", "embed_dim"))
    autoencoder.check_conv_stack(self, "vqvae")
    self.quantizer.validate()
    if self.scales[-1] != self.latent_size:
      raise ValueError(f"the last of model.scales={self.scales} must be the feature side "
                       f"{self.latent_size} (model.image_size {self.image_size} / "
                       f"{self.downscale}).")

  @property
  def quantizer(self) -> msvq.QuantizerConfig:
    return msvq.QuantizerConfig(
        codebook_size=self.codebook_size, embed_dim=self.embed_dim, scales=tuple(self.scales),
        beta=self.beta, quant_resi=self.quant_resi, param_dtype=self.param_dtype)

  @property
  def downscale(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downscale

  @property
  def tokens(self) -> int:
    """Tokens of one image over all scales."""
    return sum(s * s for s in self.scales)

  # What nets/autoencoder.py's Encoder and Decoder read.
  latent_channels = property(lambda self: self.embed_dim)
  out_channels = property(lambda self: self.in_channels)
  # The names every family's Config shares (nets/registry.py), as the autoencoder's.
  width = property(lambda self: self.block_out_channels[-1])
  depth = property(lambda self: len(self.block_out_channels))
  num_heads = property(lambda self: 0)
  num_kv_heads = property(lambda self: 0)
  mlp_width = property(lambda self: self.block_out_channels[-1])
  max_len = property(lambda self: self.latent_size ** 2)
  channels = property(lambda self: self.in_channels)


_ACT = ("act_batch", None, None, None)


class Model(nn.Module):
  """images [B, H, W, C] -> (reconstruction [B, H, W, C] float32, ids of every scale (a tuple
  of [B, s_k, s_k] int32), VQ loss (scalar), code counts [V] of the batch's ids).

  ``attention_fn`` is accepted as every family's Model takes it, and unused (the mid blocks'
  one-head attention runs the dense reference, as in nets/autoencoder.py)."""
  cfg: Config
  attention_fn: Callable[..., Any] | None = None

  def setup(self):
    cfg = self.cfg
    C = cfg.embed_dim
    self.encoder = Encoder(cfg, out_features=C)
    self.quant_conv = Conv(cfg, C, wide=(False, False))
    self.quantizer = msvq.Quantizer(cfg.quantizer)
    self.post_quant_conv = Conv(cfg, C, wide=(False, False))
    self.decoder = Decoder(cfg)

  def features(self, x_BxHxWxC):
    """f [B, h, h, embed_dim] float32: the encoder's output before quantisation."""
    cfg = self.cfg
    _, H, W, C = x_BxHxWxC.shape
    if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f"images are {H}x{W}x{C} but the model expects model.image_size="
                       f"{cfg.image_size} (square) and model.in_channels={cfg.in_channels}.")
    x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, _ACT)
    return self.quant_conv(self.encoder(x_BxHxWxC)).astype(jnp.float32)

  def decode_features(self, f_BxhxhxC):
    """Images [B, H, W, C] float32 from (quantised) features."""
    x = self.decoder(self.post_quant_conv(nn.with_logical_constraint(f_BxhxhxC, _ACT)))
    return nn.with_logical_constraint(x.astype(jnp.float32), _ACT)

  def tokenize(self, x_BxHxWxC):
    """(ids of every scale, residual vectors [B, tokens, embed_dim]): the token maps of images
    and the residuals they quantised (the candidates of a dead-code restart)."""
    return self.quantizer.encode(self.features(x_BxHxWxC))

  def decode_ids(self, ids):
    """Images [B, H, W, C] float32 from the ids of every scale (or of the first k scales: the
    coarser reconstruction VAR has drawn after k of them)."""
    ids = tuple(ids)
    f_hat = self.quantizer.decode_ids(ids, partial=True)
    return self.decode_features(f_hat)

  def __call__(self, x_BxHxWxC, train: bool = False):
    del train  # no dropout
    f_st, ids, vq_loss, counts = self.quantizer(self.features(x_BxHxWxC))
    return self.decode_features(f_st), ids, vq_loss, counts


# --- Closed forms ------------------------------------------------------------------------------

def num_params(cfg: Config) -> int:
  """Closed-form parameter count: the autoencoder's encoder and decoder (conv_out to embed_dim
  instead of 2·latent_channels; 3x3 quant convs), the codebook and one phi conv per scale."""
  ae = autoencoder.num_params(cfg)  # counts conv_out to 2C, 1x1 quant convs 2C->2C and C->C
  C, L = cfg.embed_dim, 2 * cfg.embed_dim
  b0 = cfg.block_out_channels[-1]
  ae -= autoencoder._conv(3, b0, L) - autoencoder._conv(3, b0, C)
  ae -= autoencoder._conv(1, L, L) + autoencoder._conv(1, C, C)
  ae += 2 * autoencoder._conv(3, C, C)
  return ae + cfg.codebook_size * C + len(cfg.scales) * autoencoder._conv(3, C, C)


def quantizer_flops(cfg: Config, executed: bool) -> float:
  """Forward FLOPs of the quantiser per image: per scale the code distances (2·V·C per token),
  the area downsampling and cubic upsampling (two small matmuls each) and phi's 3x3 conv at the
  feature side."""
  h, C, V = cfg.latent_size, cfg.embed_dim, cfg.codebook_size
  total = 0.0
  for s in cfg.scales:
    total += 2 * V * C * s * s
    total += 2 * C * (s * h * h + s * s * h)  # down: h x h -> s x h -> s x s
    total += 2 * C * (h * s * s + h * h * s)  # up: s x s -> h x s -> h x h
    total += autoencoder._conv_flops(3, C, C, h, executed)
  return total


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: the autoencoder's convolutions and attention with this family's
  conv_out and 3x3 quant convs, plus the quantiser."""
  ex, C, L = step.executed, cfg.embed_dim, 2 * cfg.embed_dim
  h, b0 = cfg.latent_size, cfg.block_out_channels[-1]
  total = autoencoder.flops(cfg, step)
  total -= autoencoder._conv_flops(3, b0, L, h, ex) - autoencoder._conv_flops(3, b0, C, h, ex)
  total -= autoencoder._conv_flops(1, L, L, h) + autoencoder._conv_flops(1, C, C, h)
  total += 2 * autoencoder._conv_flops(3, C, C, h, ex)
  return total + quantizer_flops(cfg, ex)


FAMILY = Family(
    name="vqvae", Config=Config, Model=Model, task="vqvae",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: cfg.max_len, sequence_parallel=False,
    test_config=dict(variant="digits", in_channels=3, block_out_channels=(64, 64),
                     layers_per_block=1, image_size=8, codebook_size=64, embed_dim=8,
                     scales=(1, 2, 4)))
