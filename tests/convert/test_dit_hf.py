"""nets/convert/dit.py against diffusers' DiTTransformer2DModel: output parity after import and
after export (loaded back by from_pretrained), the exact params tree, and the sentences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import convert, dit, layers
from nets.convert import dit as convert_dit
from tests.convert import parity_import

torch = parity_import("torch")
diffusers = parity_import("diffusers")

TOL = 1e-4
B = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random fp32 DiTTransformer2DModel saved as safetensors, its inputs and output."""
  torch.manual_seed(0)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
      sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
  # adaLN-Zero initialises the modulation and output layers to zero, which would hide most of the
  # network: every parameter is random instead. The per-block embedders then get block 0's
  # values, the one shared embedder odyssey (and the DiT reference) has.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.1 * torch.randn_like(p))
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
  path = tmp_path_factory.mktemp("dit_hf")
  model.save_pretrained(path, safe_serialization=True)
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((B, 8, 8, 4)).astype(np.float32),
            rng.integers(0, 1000, (B,)).astype(np.float32), rng.integers(0, 11, (B,)))
  inputs[2][0] = 10  # the null (unconditional) label row
  return path, inputs, _hf_sample(model, *inputs), model.pos_embed.pos_embed[0].numpy()


def _hf_sample(model, x_BxHxWxC, t_B, y_B):
  """diffusers' output for NHWC inputs, back in NHWC."""
  with torch.no_grad():
    out = model(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)),
                timestep=torch.from_numpy(t_B), class_labels=torch.from_numpy(y_B)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _import(path):
  config, tensors = convert.read_hf(str(path), convert_dit.WEIGHTS)
  cfg = dit.Config.from_config(ml_collections.ConfigDict(convert_dit.model_fields(config)))
  return cfg, tensors


def test_import_export_output_matches_diffusers(hf_dir, tmp_path):
  path, (x, t, y), hf_out, hf_pos = hf_dir
  cfg, tensors = _import(path)
  assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps, cfg.learn_sigma) == (1.0, 1e-5, True)
  # diffusers' fixed positions (an unsaved buffer) are odyssey's sin-cos table.
  np.testing.assert_allclose(hf_pos, layers.sincos_2d(4, 4, 32), atol=1e-6)
  params = convert_dit.from_hf(tensors, cfg)
  model = dit.Model(cfg)
  args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]
  shape_dtype = lambda a: (a.shape, jnp.dtype(a.dtype))
  assert jax.tree.map(shape_dtype, params) == jax.tree.map(shape_dtype, expected)

  out = np.asarray(jax.jit(model.apply)({"params": params}, *args))  # jit: faster than eager
  diff = np.max(np.abs(out - hf_out))
  print(f"DiT import: max |odyssey - diffusers| = {diff:.2e} (outputs up to "
        f"{np.abs(hf_out).max():.1f})")
  assert diff < TOL

  exported = tmp_path / "export"
  convert.write_hf(str(exported), convert_dit.hf_config(cfg), convert_dit.to_hf(params, cfg),
                   convert_dit.WEIGHTS)
  reloaded = diffusers.DiTTransformer2DModel.from_pretrained(exported).eval()
  diff = np.max(np.abs(_hf_sample(reloaded, x, t, y) - out))
  print(f"DiT export: max |diffusers(exported) - odyssey| = {diff:.2e}")
  assert diff < TOL
  back = convert_dit.from_hf(_import(exported)[1], cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def _tensors_without(path, drop=(), change=()):
  cfg, tensors = _import(path)
  kept = {n: np.array(tensors._tensors[n]) for n in tensors.names() if n not in drop}
  for n in change:
    kept[n] = kept[n] + 1.0
  return cfg, convert.Tensors(kept, tensors.source)


def test_missing_tensor_and_unshared_embedders_are_named(hf_dir):
  path = hf_dir[0]
  name = "transformer_blocks.1.ff.net.2.weight"
  cfg, tensors = _tensors_without(path, drop=[name])
  with pytest.raises(convert.MissingTensorError, match=name.replace(".", r"\.")):
    convert_dit.from_hf(tensors, cfg)
  name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
  cfg, tensors = _tensors_without(path, change=[name])
  with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*shares one"):
    convert_dit.from_hf(tensors, cfg)


def test_unrepresentable_configs_are_refused():
  moe = dit.Config.from_config(ml_collections.ConfigDict(dict(
      name="dit", variant="digits", moe=dict(num_experts=2, top_k=1))))
  with pytest.raises(ValueError, match="mixture of experts"):
    convert_dit.hf_config(moe)
  reference = dit.Config.from_config(dict(name="dit", variant="digits"))
  with pytest.raises(ValueError, match="timestep_freq_shift=0.0"):
    convert_dit.hf_config(reference)
