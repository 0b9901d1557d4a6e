"""nets/convert/vit.py against transformers' ViTForImageClassification: logits parity after import
and after export (loaded back by from_pretrained), the exact params tree, and the sentences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import convert, vit
from nets.convert import vit as convert_vit
from tests.convert import classifier_logits, parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random fp32 ViTForImageClassification saved as safetensors, and its logits."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=5)
  model = transformers.ViTForImageClassification(config).eval()
  # Every parameter random, LayerNorms and the class/position embeddings included, so neither a
  # unit scale nor a zero bias hides a layout mistake.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vit_hf")
  model.save_pretrained(path, safe_serialization=True)
  images = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
  return path, images, classifier_logits(model, images)


def _import(path):
  config, tensors = convert.read_hf(str(path), convert_vit.WEIGHTS)
  cfg = vit.Config.from_config(ml_collections.ConfigDict(convert_vit.model_fields(config)))
  return cfg, tensors


def test_import_export_logits_match_transformers(hf_dir, tmp_path):
  path, images, hf_logits = hf_dir
  cfg, tensors = _import(path)
  assert (cfg.norm_eps, cfg.gelu_approximate, cfg.num_classes) == (1e-12, False, 5)
  params = convert_vit.from_hf(tensors, cfg)
  model = vit.Model(cfg)
  # The exact tree (structure, shapes, dtypes) Model.init builds.
  expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(images)))["params"]
  shape_dtype = lambda x: (x.shape, jnp.dtype(x.dtype))
  assert jax.tree.map(shape_dtype, params) == jax.tree.map(shape_dtype, expected)

  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
  diff = np.max(np.abs(logits - hf_logits))
  print(f"ViT import: max |odyssey - transformers| = {diff:.2e}")
  assert diff < TOL

  out = tmp_path / "export"
  convert.write_hf(str(out), convert_vit.hf_config(cfg), convert_vit.to_hf(params, cfg),
                   convert_vit.WEIGHTS)
  reloaded = transformers.ViTForImageClassification.from_pretrained(out).eval()
  diff = np.max(np.abs(classifier_logits(reloaded, images) - logits))
  print(f"ViT export: max |transformers(exported) - odyssey| = {diff:.2e}")
  assert diff < TOL
  # Export then import is the identity on parameters.
  back = convert_vit.from_hf(_import(out)[1], cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_missing_tensor_is_named(hf_dir):
  path, _, _ = hf_dir
  cfg, tensors = _import(path)
  name = "vit.encoder.layer.1.attention.attention.key.weight"
  kept = {n: tensors._tensors[n] for n in tensors.names() if n != name}
  with pytest.raises(convert.MissingTensorError, match=name.replace(".", r"\.")):
    convert_vit.from_hf(convert.Tensors(kept, tensors.source), cfg)


def test_unrepresentable_configs_are_refused():
  with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
    convert_vit.model_fields({"model_type": "vit", "hidden_act": "quick_gelu"})
  gap = vit.Config.from_config(dict(name="vit", variant="digits", pool="gap"))
  with pytest.raises(ValueError, match="pool='gap'"):
    convert_vit.hf_config(gap)
