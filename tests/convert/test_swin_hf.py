"""nets/convert/swin.py against transformers' SwinForImageClassification: logits parity after
import and after export (loaded back by from_pretrained), the exact params tree, the sentences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import convert, swin
from nets.convert import swin as convert_swin
from tests.convert import classifier_logits, parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random fp32 SwinForImageClassification saved as safetensors, and its logits: three
  stages, shifted windows in the first two, the last map no larger than the window (unshifted)."""
  torch.manual_seed(0)
  config = transformers.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16,
                                   depths=[2, 2, 2], num_heads=[2, 4, 4], window_size=4,
                                   num_labels=5)
  model = transformers.SwinForImageClassification(config).eval()
  # Every parameter random (the bias tables start at zero, norms at one) so that no zero or unit
  # hides a layout mistake.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("swin_hf")
  model.save_pretrained(path, safe_serialization=True)
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  return path, images, classifier_logits(model, images)


def _import(path):
  config, tensors = convert.read_hf(str(path), convert_swin.WEIGHTS)
  cfg = swin.Config.from_config(ml_collections.ConfigDict(convert_swin.model_fields(config)))
  return cfg, tensors


def test_import_export_logits_match_transformers(hf_dir, tmp_path):
  path, images, hf_logits = hf_dir
  cfg, tensors = _import(path)
  assert [cfg.stage(i)[3] for i in range(3)] == [2, 2, 0]  # the 4 x 4 last map is not shifted
  params = convert_swin.from_hf(tensors, cfg)
  model = swin.Model(cfg)
  expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(images)))["params"]
  shape_dtype = lambda x: (x.shape, jnp.dtype(x.dtype))
  assert jax.tree.map(shape_dtype, params) == jax.tree.map(shape_dtype, expected)

  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
  diff = np.max(np.abs(logits - hf_logits))
  print(f"Swin import: max |odyssey - transformers| = {diff:.2e} (logits up to "
        f"{np.abs(hf_logits).max():.1f})")
  assert diff < TOL * max(1.0, np.abs(hf_logits).max())

  out = tmp_path / "export"
  convert.write_hf(str(out), convert_swin.hf_config(cfg), convert_swin.to_hf(params, cfg),
                   convert_swin.WEIGHTS)
  reloaded = transformers.SwinForImageClassification.from_pretrained(out).eval()
  diff = np.max(np.abs(classifier_logits(reloaded, images) - logits))
  print(f"Swin export: max |transformers(exported) - odyssey| = {diff:.2e}")
  assert diff < TOL * max(1.0, np.abs(hf_logits).max())
  back = convert_swin.from_hf(_import(out)[1], cfg)  # export then import: the identity
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_missing_tensor_is_named(hf_dir):
  path, _, _ = hf_dir
  cfg, tensors = _import(path)
  name = "swin.encoder.layers.1.blocks.1.attention.self.relative_position_bias_table"
  kept = {n: tensors._tensors[n] for n in tensors.names() if n != name}
  with pytest.raises(convert.MissingTensorError, match=name.replace(".", r"\.")):
    convert_swin.from_hf(convert.Tensors(kept, tensors.source), cfg)


@pytest.mark.parametrize("fields,match", [
    (dict(model_type="swinv2"), "model_type='swinv2'"),
    (dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    (dict(use_absolute_embeddings=True), "use_absolute_embeddings"),
    (dict(mlp_ratio=2.5), "mlp_ratio=2.5"),
])
def test_unrepresentable_configs_are_refused(fields, match):
  base = dict(model_type="swin", image_size=32, patch_size=2, window_size=4, embed_dim=16,
              depths=[2], num_heads=[2], num_labels=3)
  with pytest.raises(ValueError, match=match):
    convert_swin.model_fields({**base, **fields})


def test_a_stored_relative_position_index_is_checked(hf_dir):
  """Checkpoints saved by older transformers also hold each block's relative_position_index: the
  right one is accepted (and not imported), a wrong one refused with a sentence naming it."""
  path, _, _ = hf_dir
  cfg, tensors = _import(path)
  name = "swin.encoder.layers.0.blocks.1.attention.self.relative_position_index"
  index = swin.relative_position_index(4).astype(np.int64)
  stored = {n: tensors._tensors[n] for n in tensors.names()}
  ok = convert.Tensors({**stored, name: index}, tensors.source)
  jax.tree.map(np.testing.assert_array_equal, convert_swin.from_hf(ok, cfg),
               convert_swin.from_hf(_import(path)[1], cfg))
  bad = convert.Tensors({**stored, name: index[::-1]}, tensors.source)
  with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*window_size"):
    convert_swin.from_hf(bad, cfg)
