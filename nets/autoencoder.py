"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), laid
out as diffusers' ``AutoencoderKL`` so that importing its weights is a renaming
(nets/convert/autoencoder.py).

images [B, H, W, C] in [-1, 1] -> Encoder -> quant_conv (1x1) -> posterior moments (mean, logvar)
[B, H/f, W/f, latent_channels], f = 2^(len(block_out_channels) - 1); z = mean (+ std · noise when
sampling the posterior) -> post_quant_conv (1x1) -> Decoder -> reconstruction [B, H, W, C].
  Encoder: conv_in 3x3; per entry of block_out_channels a down block of ``layers_per_block``
    ResNet blocks (GroupNorm-SiLU-conv3x3 twice, a 1x1 shortcut when the channels change) and,
    on all but the last, a stride-2 conv3x3 after padding right and bottom by one (diffusers'
    Downsample2D with padding=0); mid block ResNet - attention - ResNet; GroupNorm-SiLU-conv_out
    3x3 to 2·latent_channels (mean, then logvar).
  Decoder: conv_in 3x3; mid block; per entry of reversed(block_out_channels) an up block of
    layers_per_block + 1 ResNet blocks and, on all but the last, nearest x2 + conv3x3;
    GroupNorm-SiLU-conv_out 3x3.
Every GroupNorm has eps 1e-6 and is computed in float32. The mid-block attention is one head as
wide as the channels (diffusers' attention_head_dim = channels), over the (H/f)·(W/f) latent
positions: widths of 512 are beyond the cuDNN and Splash kernels, and the sequence is short, so it
runs the dense reference (nets/attention.py) on every platform and the family has no sequence
parallelism. logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution.

Parameters: convolution kernels [kh, kw, C_in, C_out] name the channels of the network's width
"embed" (the input side when it is one, else the output side), so FSDP splits every wide kernel
and the narrow ones (image and latent channels) stay whole; norms and biases are "norm".
Initialisation is torch's Conv2d/Linear default for the kernels (uniform ±1/sqrt(fan_in)) with
zero biases.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import attention, counting
from nets.layers import build_config, check_basics, remat
from nets.registry import Family

GROUPNORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
VARIANTS = {
    # the digits upscaled to 32x32 (1 channel): f=4, 8x8x4 latents; small enough for 2 CPU cores
    "digits": dict(in_channels=1, latent_channels=4, block_out_channels=(16, 32, 64),
                   layers_per_block=1, norm_num_groups=8, image_size=32),
    # Stable Diffusion 1.x (CompVis/stable-diffusion-v1-4's vae, the LDM kl-f8): 256 px -> 32x32x4
    "sd": dict(in_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, norm_num_groups=32, image_size=256, scaling_factor=0.18215),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  in_channels: int = 3  # the reconstruction has as many
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = ()
  layers_per_block: int = 0
  norm_num_groups: int = 32
  image_size: int = 256
  scaling_factor: float = 0.0  # latents are multiplied by it; 0: train.encode computes 1/std
  mid_block_attention: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES, applied per ResNet block

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    fields = dict(model_cfg)
    if fields.get("block_out_channels") is not None:  # a JSON list back from config.json
      overrides = {"block_out_channels": tuple(int(c) for c in fields["block_out_channels"]),
                   **overrides}
    return build_config(cls, "autoencoder", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "autoencoder", ("in_channels", "latent_channels", "layers_per_block",
                                       "norm_num_groups", "image_size"))
    check_conv_stack(self, "autoencoder")
    if not (math.isfinite(self.scaling_factor) and self.scaling_factor >= 0):
      raise ValueError(f"model.scaling_factor={self.scaling_factor} must be a finite number >= 0 "
                       "(0: train.encode computes it).")

  @property
  def downscale(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downscale

  @property
  def out_channels(self) -> int:
    return self.in_channels

  # The names every family's Config shares (nets/registry.py). The one attention head spans all
  # channels and is not split over a mesh axis, so no head count is given to divide.
  width = property(lambda self: self.block_out_channels[-1])
  depth = property(lambda self: len(self.block_out_channels))
  num_heads = property(lambda self: 0)
  num_kv_heads = property(lambda self: 0)
  mlp_width = property(lambda self: self.block_out_channels[-1])
  max_len = property(lambda self: self.latent_size ** 2)  # what the mid-block attention sees
  channels = property(lambda self: self.in_channels)


def check_conv_stack(cfg, family: str) -> None:
  """One sentence for block_out_channels / norm groups / image size that the encoder and decoder
  cannot build (this family's and nets/vqvae.py's)."""
  if not cfg.block_out_channels or any(c <= 0 for c in cfg.block_out_channels):
    raise ValueError(f"model.block_out_channels={cfg.block_out_channels} must be a non-empty "
                     f"tuple of positive widths; set model.variant (see nets/{family}.py).")
  bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
  if bad:
    raise ValueError(f"model.block_out_channels {bad} are not divisible by "
                     f"model.norm_num_groups={cfg.norm_num_groups}.")
  if cfg.image_size % cfg.downscale:
    raise ValueError(f"model.image_size={cfg.image_size} is not divisible by the "
                     f"downsampling factor {cfg.downscale} (2 per block but the last).")


def _conv_init(key, shape, dtype=jnp.float32):
  """torch's Conv2d default, U(+-1/sqrt(fan_in)) (variance_scaling(1/3, "fan_in", "uniform")),
  drawn as one flat vector and reshaped: XLA:CPU compiles threefry into a 4-D shape about 15x
  slower (13 s of the digits autoencoder's initialisation)."""
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)


class Conv(nn.Module):
  """A k x k convolution, NHWC, kernel [k, k, C_in, C_out]; ``wide`` says which channel sides
  are the network's width (named "embed")."""
  cfg: Any
  features: int
  kernel: int = 3
  stride: int = 1
  padding: Any = "SAME"
  wide: tuple[bool, bool] = (True, True)

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, k, C = self.cfg, self.kernel, x_BxHxWxC.shape[-1]
    axes = ("embed" if self.wide[0] else None,
            "embed" if self.wide[1] and not self.wide[0] else None)
    w = self.param("kernel", nn.with_logical_partitioning(_conv_init, (None, None) + axes),
                   (k, k, C, self.features), jnp.dtype(cfg.param_dtype))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                   (self.features,), jnp.dtype(cfg.param_dtype))
    y = jax.lax.conv_general_dilated(x_BxHxWxC.astype(cfg.dtype), w.astype(cfg.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b.astype(y.dtype)


class GroupNorm(nn.Module):
  """GroupNorm over (H, W, channels of a group) in float32, with a per-channel affine."""
  cfg: Any
  silu: bool = False  # followed by SiLU (every norm but the attention's)

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.cfg
    B, H, W, C = x_BxHxWxC.shape
    G = cfg.norm_num_groups
    h = x_BxHxWxC.astype(jnp.float32).reshape(B, H, W, G, C // G)
    mean = jnp.mean(h, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=(1, 2, 4), keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + GROUPNORM_EPS)).reshape(B, H, W, C)
    pdt = jnp.dtype(cfg.param_dtype)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (C,), pdt)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (C,), pdt)
    h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return (nn.silu(h) if self.silu else h).astype(cfg.dtype)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv3x3 twice plus the input (through a 1x1 conv when channels change)."""
  cfg: Any
  features: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.cfg
    h = Conv(cfg, self.features, name="conv1")(GroupNorm(cfg, silu=True, name="norm1")(x_BxHxWxC))
    h = Conv(cfg, self.features, name="conv2")(GroupNorm(cfg, silu=True, name="norm2")(h))
    if x_BxHxWxC.shape[-1] != self.features:
      x_BxHxWxC = Conv(cfg, self.features, kernel=1, name="conv_shortcut")(x_BxHxWxC)
    return nn.with_logical_constraint(x_BxHxWxC.astype(cfg.dtype) + h, _ACT)


_ACT = ("act_batch", None, None, None)


class AttentionBlock(nn.Module):
  """Single-head self-attention over the positions, GroupNorm first, residual added."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.cfg
    B, H, W, C = x_BxHxWxC.shape
    h_BxSxC = GroupNorm(cfg, name="group_norm")(x_BxHxWxC).reshape(B, H * W, C)
    proj = lambda name: Conv(cfg, C, kernel=1, name=name)(h_BxSxC[:, :, None])[:, :, 0]
    q, k, v = (proj(n)[:, :, None] for n in ("to_q", "to_k", "to_v"))  # [B, S, 1, C]
    o_BxSx1xC = attention.dot_product_attention(q, k, v, causal=False)
    out = Conv(cfg, C, kernel=1, name="to_out")(o_BxSx1xC)[:, :, 0]
    return x_BxHxWxC.astype(cfg.dtype) + out.reshape(B, H, W, C)


class MidBlock(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, C = self.cfg, x_BxHxWxC.shape[-1]
    block = remat(ResnetBlock, cfg.remat)
    x_BxHxWxC = block(cfg, C, name="resnets_0")(x_BxHxWxC)
    if cfg.mid_block_attention:
      x_BxHxWxC = AttentionBlock(cfg, name="attentions_0")(x_BxHxWxC)
    return block(cfg, C, name="resnets_1")(x_BxHxWxC)


class Encoder(nn.Module):
  """images [B, H, W, C] -> moments [B, H/f, W/f, 2·latent_channels] (before quant_conv), or
  ``out_features`` channels when given (the VQ tokenizer's features, nets/vqvae.py)."""
  cfg: Any
  out_features: int | None = None

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, chans = self.cfg, self.cfg.block_out_channels
    block = remat(ResnetBlock, cfg.remat)
    x = Conv(cfg, chans[0], wide=(False, True), name="conv_in")(x_BxHxWxC)
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block):
        x = block(cfg, c, name=f"down_blocks_{i}_resnets_{j}")(x)
      if i < len(chans) - 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = Conv(cfg, c, stride=2, padding="VALID", name=f"down_blocks_{i}_downsample")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = GroupNorm(cfg, silu=True, name="conv_norm_out")(x)
    out = self.out_features or 2 * cfg.latent_channels
    return Conv(cfg, out, wide=(True, False), name="conv_out")(x)


class Decoder(nn.Module):
  """latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, H, W, C]."""
  cfg: Any

  @nn.compact
  def __call__(self, z_BxhxwxL):
    cfg, chans = self.cfg, tuple(reversed(self.cfg.block_out_channels))
    block = remat(ResnetBlock, cfg.remat)
    x = Conv(cfg, chans[0], wide=(False, True), name="conv_in")(z_BxhxwxL)
    x = MidBlock(cfg, name="mid_block")(x)
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block + 1):
        x = block(cfg, c, name=f"up_blocks_{i}_resnets_{j}")(x)
      if i < len(chans) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = Conv(cfg, c, name=f"up_blocks_{i}_upsample")(x)
    x = GroupNorm(cfg, silu=True, name="conv_norm_out")(x)
    return Conv(cfg, cfg.out_channels, wide=(True, False), name="conv_out")(x)


class Model(nn.Module):
  """images [B, H, W, C] -> (reconstruction [B, H, W, C], mean, logvar [B, h, w, L]), float32.

  ``sample_posterior=True`` decodes mean + exp(logvar / 2) · noise, the noise drawn from the
  "latent" rng; otherwise the mean. ``attention_fn`` is accepted as every family's Model takes
  it, and unused (see the module docstring).
  """
  cfg: Config
  attention_fn: Callable[..., Any] | None = None

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    L = 2 * cfg.latent_channels
    self.quant_conv = Conv(cfg, L, kernel=1, wide=(False, False))
    self.post_quant_conv = Conv(cfg, cfg.latent_channels, kernel=1, wide=(False, False))
    self.decoder = Decoder(cfg)

  def encode(self, x_BxHxWxC):
    """The posterior's (mean, logvar) [B, h, w, latent_channels], float32."""
    cfg = self.cfg
    B, H, W, C = x_BxHxWxC.shape
    if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f"images are {H}x{W}x{C} but the model expects model.image_size="
                       f"{cfg.image_size} (square) and model.in_channels={cfg.in_channels}.")
    x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, _ACT)
    moments = self.quant_conv(self.encoder(x_BxHxWxC)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z_BxhxwxL):
    """Images [B, H, W, C] (float32) from unscaled latents."""
    x = self.decoder(self.post_quant_conv(nn.with_logical_constraint(z_BxhxwxL, _ACT)))
    return nn.with_logical_constraint(x.astype(jnp.float32), _ACT)

  def __call__(self, x_BxHxWxC, train: bool = False, sample_posterior: bool = False):
    del train  # no dropout
    mean, logvar = self.encode(x_BxHxWxC)
    z = mean
    if sample_posterior:
      noise = jax.random.normal(self.make_rng("latent"), mean.shape, jnp.float32)
      z = mean + jnp.exp(0.5 * logvar) * noise
    return self.decode(z), mean, logvar


def kl(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) per example [B]: summed over the latent elements."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


# --- Closed forms ------------------------------------------------------------------------------

def _conv(k, ci, co):
  return k * k * ci * co + co


def _resnet(ci, co):
  return 2 * ci + _conv(3, ci, co) + 2 * co + _conv(3, co, co) + (_conv(1, ci, co) if ci != co
                                                                  else 0)


def _mid(cfg, c):
  return 2 * _resnet(c, c) + (2 * c + 4 * _conv(1, c, c) if cfg.mid_block_attention else 0)


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  b, n, L = cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels
  enc = _conv(3, cfg.in_channels, b[0])
  prev = b[0]
  for i, c in enumerate(b):
    enc += _resnet(prev, c) + (n - 1) * _resnet(c, c) + (_conv(3, c, c) if i < len(b) - 1 else 0)
    prev = c
  enc += _mid(cfg, b[-1]) + 2 * b[-1] + _conv(3, b[-1], 2 * L)
  dec = _conv(3, L, b[-1]) + _mid(cfg, b[-1])
  rev = b[::-1]
  prev = rev[0]
  for i, c in enumerate(rev):
    dec += _resnet(prev, c) + n * _resnet(c, c) + (_conv(3, c, c) if i < len(b) - 1 else 0)
    prev = c
  dec += 2 * b[0] + _conv(3, b[0], cfg.out_channels)
  return enc + _conv(1, 2 * L, 2 * L) + _conv(1, L, L) + dec


def _conv_flops(k, ci, co, side, executed=False, stride=1):
  """2·C_in·C_out per kernel tap over the output pixels; ``executed`` counts only the taps that
  land inside the image (XLA skips the zero padding, 3·side - 2 taps per row at 3x3 SAME)."""
  out = side // stride
  taps = k * out  # per spatial dimension
  if executed and k > 1:
    taps = 3 * side - 2 if stride == 1 else 3 * out - 1  # stride 2: one padded row/column
  return 2 * ci * co * taps * taps


def _resnet_flops(ci, co, side, executed):
  return (_conv_flops(3, ci, co, side, executed) + _conv_flops(3, co, co, side, executed)
          + (_conv_flops(1, ci, co, side) if ci != co else 0))


def _mid_flops(cfg, c, side, executed):
  S = side * side
  attn = 4 * 2 * c * c * S + S * counting.attention(S, c, False, True)
  return 2 * _resnet_flops(c, c, side, executed) + (attn if cfg.mid_block_attention else 0)


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image (encode + decode): 2·k²·C_in·C_out per output pixel of every
  convolution (executed: the taps inside the image only), and the mid blocks' attention (four
  C x C projections and 4·S·C per position)."""
  b, n, L, ex = cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, step.executed
  side = cfg.image_size
  total = _conv_flops(3, cfg.in_channels, b[0], side, ex)
  prev = b[0]
  for i, c in enumerate(b):
    total += _resnet_flops(prev, c, side, ex) + (n - 1) * _resnet_flops(c, c, side, ex)
    if i < len(b) - 1:
      total += _conv_flops(3, c, c, side, ex, stride=2)
      side //= 2
    prev = c
  total += _mid_flops(cfg, b[-1], side, ex) + _conv_flops(3, b[-1], 2 * L, side, ex)
  total += _conv_flops(1, 2 * L, 2 * L, side) + _conv_flops(1, L, L, side)
  rev = b[::-1]
  total += _conv_flops(3, L, rev[0], side, ex) + _mid_flops(cfg, rev[0], side, ex)
  prev = rev[0]
  for i, c in enumerate(rev):
    total += _resnet_flops(prev, c, side, ex) + n * _resnet_flops(c, c, side, ex)
    if i < len(b) - 1:
      side *= 2
      total += _conv_flops(3, c, c, side, ex)
    prev = c
  return total + _conv_flops(3, b[0], cfg.out_channels, side, ex)


FAMILY = Family(
    name="autoencoder", Config=Config, Model=Model, task="autoencoder",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: cfg.max_len, sequence_parallel=False,
    converter="autoencoder",
    test_config=dict(variant="digits", in_channels=3, block_out_channels=(64, 64),
                     layers_per_block=1, image_size=8))
