"""diffusers ``AutoencoderKL`` safetensors <-> odyssey autoencoder (nets/autoencoder.py).

The module tree is diffusers' own, so every tensor maps by name:
  names       odyssey joins list indices into module names (down_blocks_0_resnets_1,
              mid_block/attentions_0); diffusers dots them (down_blocks.0.resnets.1). The
              resamplers are down_blocks_{i}_downsample = down_blocks.{i}.downsamplers.0.conv and
              up_blocks_{i}_upsample = up_blocks.{i}.upsamplers.0.conv; to_out = to_out.0.
  layouts     Conv2d weight [C_out, C_in, k, k] <-> kernel [k, k, C_in, C_out] (HWIO); the
              attention's Linear weights [C_out, C_in] <-> 1x1 kernels [1, 1, C_in, C_out];
              GroupNorm weight <-> scale.
AutoencoderKL's scaling_factor travels in the config (model.scaling_factor). Configurations
odyssey does not compute (other block types or activation, no quant convs, a shift_factor or
per-channel latents_mean/std) are refused with a sentence.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nets import autoencoder, convert
from nets.convert.vit import cast, square, stored_dtype

WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKL"
DIFFUSERS_VERSION = "0.42.1"
_LINEAR = ("to_q", "to_k", "to_v", "to_out")
_RENAMES = ((r"(down|up)_blocks_(\d+)_resnets_(\d+)", r"\1_blocks.\2.resnets.\3"),
            (r"down_blocks_(\d+)_downsample", r"down_blocks.\1.downsamplers.0.conv"),
            (r"up_blocks_(\d+)_upsample", r"up_blocks.\1.upsamplers.0.conv"),
            (r"^(resnets|attentions)_(\d+)$", r"\1.\2"), (r"^to_out$", "to_out.0"))


def model_fields(hf_config: dict) -> dict:
  """odyssey ``config.model`` fields for a diffusers AutoencoderKL config.json, or a sentence."""
  class_name = hf_config.get("_class_name", CLASS_NAME)
  if class_name != CLASS_NAME:
    raise ValueError(f"config.json _class_name={class_name!r} is not {CLASS_NAME}.")
  chans = tuple(int(c) for c in hf_config.get("block_out_channels", (64,)))
  for key, want in (("down_block_types", ["DownEncoderBlock2D"] * len(chans)),
                    ("up_block_types", ["UpDecoderBlock2D"] * len(chans))):
    if list(hf_config.get(key, want)) != want:
      raise ValueError(f"config.json {key}={hf_config[key]} has no odyssey equivalent (it needs "
                       f"{want}).")
  for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                    ("shift_factor", None), ("latents_mean", None), ("latents_std", None)):
    if hf_config.get(key, want) != want:
      raise ValueError(f"config.json {key}={hf_config[key]!r} has no odyssey autoencoder "
                       f"equivalent (it needs {want!r}).")
  in_channels = int(hf_config.get("in_channels", 3))
  if int(hf_config.get("out_channels", 3)) != in_channels:
    raise ValueError(f"config.json out_channels={hf_config['out_channels']} differs from "
                     f"in_channels={in_channels}; odyssey's autoencoder reconstructs its input.")
  return dict(
      name="autoencoder", variant="", in_channels=in_channels,
      latent_channels=int(hf_config.get("latent_channels", 4)), block_out_channels=chans,
      layers_per_block=int(hf_config.get("layers_per_block", 1)),
      norm_num_groups=int(hf_config.get("norm_num_groups", 32)),
      image_size=square(hf_config, "sample_size") if "sample_size" in hf_config else 32,
      scaling_factor=float(hf_config.get("scaling_factor", 0.18215)),
      mid_block_attention=bool(hf_config.get("mid_block_add_attention", True)),
      dtype=stored_dtype(hf_config), param_dtype=stored_dtype(hf_config))


def hf_config(cfg: autoencoder.Config) -> dict:
  """The diffusers config.json for ``cfg`` (AutoencoderKL)."""
  n = len(cfg.block_out_channels)
  return {
      "_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(cfg.block_out_channels),
      "layers_per_block": cfg.layers_per_block, "act_fn": "silu",
      "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
      "sample_size": cfg.image_size,
      # 0 (unset): the SD value diffusers defaults to; train.encode records the one it used
      "scaling_factor": cfg.scaling_factor or 0.18215, "shift_factor": None,
      "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
      "use_post_quant_conv": True, "mid_block_add_attention": cfg.mid_block_attention,
  }


def _layout(cfg: autoencoder.Config) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """(odyssey params path, shape) of every parameter, in the model's order."""
  model = autoencoder.Model(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return [(tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in leaves]


def _hf_name(path: tuple[str, ...]) -> str:
  parts = []
  for part in path[:-1]:
    for pattern, repl in _RENAMES:
      part = re.sub(pattern, repl, part)
    parts.append(part)
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(parts + [leaf])


def _hf_shape(path, shape) -> tuple[int, ...]:
  if path[-1] != "kernel":
    return shape
  k, _, ci, co = shape
  return (co, ci) if path[-2] in _LINEAR else (co, ci, k, k)


def from_hf(tensors: convert.Tensors, cfg: autoencoder.Config) -> dict:
  """The odyssey autoencoder params tree from AutoencoderKL tensors."""
  params = {}
  for path, shape in _layout(cfg):
    a = tensors.take(_hf_name(path), _hf_shape(path, shape))
    if path[-1] == "kernel":
      a = a.T.reshape(shape) if path[-2] in _LINEAR else a.transpose(2, 3, 1, 0)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = a
  tensors.check_all_used()
  return cast(params, cfg.param_dtype)


def to_hf(params: dict, cfg: autoencoder.Config) -> dict:
  """{diffusers tensor name: array} for AutoencoderKL, in the params' dtype."""
  out = {}
  for path, shape in _layout(cfg):
    node = params
    for part in path:
      node = node[part]
    a = np.asarray(node)
    if path[-1] == "kernel":
      k, _, ci, co = shape
      a = a.reshape(ci, co).T if path[-2] in _LINEAR else a.transpose(3, 2, 0, 1)
    out[_hf_name(path)] = np.ascontiguousarray(a)
  return out
