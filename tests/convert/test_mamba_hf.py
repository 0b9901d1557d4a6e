"""nets/convert/mamba.py against transformers' MambaForCausalLM (its pure-torch path on CPU).

A tiny random fp32 model, every weight randomised (norms, A_log, D and the Δ bias included, so no
layout mistake hides behind an init value of one or zero), is imported into odyssey, and a
randomised odyssey model is exported to torch; logits must agree to < 1e-4 both ways, and
odyssey's step-by-step decode must reproduce torch's full-sequence logits. Measured on CPU
(logits of magnitude up to 7): 9e-6 importing, 9e-6 decoding, 2e-5 exporting.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import convert
from nets import mamba
from nets.convert import mamba as convert_mamba
from tests.convert import parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

TOL = 1e-4
B, S = 2, 12


def _hf_model(tie: bool):
  """A random MambaForCausalLM: vocab 97, width 32, 2 layers, state 8, conv 4, expand 2."""
  torch.manual_seed(0)
  config = transformers.MambaConfig(
      vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2,
      time_step_rank="auto", layer_norm_epsilon=1e-5, tie_word_embeddings=tie,
      use_bias=False, use_conv_bias=True)
  model = transformers.MambaForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("A_log"):
        p.copy_(torch.randn_like(p) * 0.5)
      elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("dt_proj.bias"):
        p.copy_(torch.randn_like(p) - 1.0)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def _torch_logits(model, tokens_BxS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens_BxS, dtype=torch.long)).logits.float().numpy()


def _cfg(fields: dict, **overrides) -> mamba.Config:
  return mamba.Config.from_config(ml_collections.ConfigDict(fields), **overrides)


@functools.cache
def _jit_forward(cfg):
  return jax.jit(lambda params, tokens: mamba.Model(cfg).apply({"params": params}, tokens))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """(folder with the saved untied HF model, its model, tokens, torch logits)."""
  model = _hf_model(tie=False)
  path = str(tmp_path_factory.mktemp("mamba_hf"))
  model.save_pretrained(path, safe_serialization=True)
  tokens_BxS = np.random.default_rng(0).integers(0, 97, (B, S)).astype(np.int32)
  return path, model, tokens_BxS, _torch_logits(model, tokens_BxS)


@pytest.fixture(scope="module")
def imported(hf_dir):
  """(odyssey cfg, params) read from the saved HF folder."""
  path = hf_dir[0]
  config, tensors = convert.read_hf(path, convert_mamba.WEIGHTS)
  cfg = _cfg(convert_mamba.model_fields(config))
  return cfg, convert_mamba.from_hf(tensors, cfg)


def test_model_fields_and_params_tree_match_model_init(hf_dir, imported):
  cfg, params = imported
  assert (cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand,
          cfg.rank, cfg.tie_embeddings, cfg.param_dtype) == (97, 2, 32, 8, 4, 2, 2, False,
                                                             "float32")
  want = jax.eval_shape(lambda: nn.unbox(mamba.Model(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]))
  got_shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
  assert got_shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), want)
  assert all(isinstance(a, np.ndarray) for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_imported_logits_match_torch(hf_dir, imported, scan):
  _, _, tokens_BxS, want_BxSxV = hf_dir
  cfg, params = imported
  cfg = _cfg(dict(convert_mamba.model_fields(convert_mamba.hf_config(cfg))), scan=scan)
  got_BxSxV = np.asarray(_jit_forward(cfg)(params, tokens_BxS))
  diff = np.abs(got_BxSxV - want_BxSxV).max()
  print(f"import ({scan} scan): max |odyssey - torch| = {diff:.2e}")
  assert diff < TOL, diff


def test_decode_steps_match_torch_full_forward(hf_dir, imported):
  _, _, tokens_BxS, want_BxSxV = hf_dir
  cfg, params = imported
  model = mamba.Model(cfg)
  step = jax.jit(lambda params, token_B, cache: model.apply(
      {"params": params}, token_B, cache, method=mamba.Model.decode_step))
  cache = model.init_cache(B)
  diffs = []
  for t in range(S):
    logits_BxV, cache = step(params, tokens_BxS[:, t], cache)
    diffs.append(np.abs(np.asarray(logits_BxV) - want_BxSxV[:, t]).max())
  print(f"decode: max |odyssey step - torch full| = {max(diffs):.2e}")
  assert max(diffs) < TOL, diffs


def test_export_loads_in_transformers_and_matches(hf_dir, imported, tmp_path):
  """Exports new weights (the imported ones plus noise), not the torch model's, so to_hf is
  checked against odyssey's logits rather than as the inverse of from_hf."""
  _, hf_model, tokens_BxS, _ = hf_dir
  cfg, imported_params = imported
  leaves, treedef = jax.tree_util.tree_flatten(imported_params)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_unflatten(treedef, [
      np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
  tensors = convert_mamba.to_hf(params, cfg)
  assert list(tensors)[:3] == ["backbone.embeddings.weight", "backbone.layers.0.norm.weight",
                               "backbone.layers.0.mixer.A_log"]
  assert all(a.dtype == np.float32 for a in tensors.values())
  assert set(tensors) == set(hf_model.state_dict())
  convert.write_hf(str(tmp_path), convert_mamba.hf_config(cfg), tensors, convert_mamba.WEIGHTS)
  reloaded = transformers.MambaForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  for name, a in reloaded.state_dict().items():
    np.testing.assert_array_equal(a.numpy(), tensors[name], err_msg=name)
  want_BxSxV = np.asarray(_jit_forward(cfg)(params, tokens_BxS))
  diff = np.abs(_torch_logits(reloaded, tokens_BxS) - want_BxSxV).max()
  print(f"export: max |torch(exported) - odyssey| = {diff:.2e}")
  assert diff < TOL, diff


def test_tied_roundtrip_without_lm_head(tmp_path):
  model = _hf_model(tie=True)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  config, tensors = convert.read_hf(str(tmp_path), convert_mamba.WEIGHTS)
  cfg = _cfg(convert_mamba.model_fields(config))
  params = convert_mamba.from_hf(tensors, cfg)
  assert cfg.tie_embeddings and "lm_head" not in params
  out = convert_mamba.to_hf(params, cfg)
  assert "lm_head.weight" not in out
  np.testing.assert_array_equal(out["backbone.layers.1.mixer.conv1d.weight"],
                                model.state_dict()["backbone.layers.1.mixer.conv1d.weight"])


def test_missing_tensor_is_named(hf_dir, imported):
  cfg, _ = imported
  _, tensors = convert.read_hf(hf_dir[0], convert_mamba.WEIGHTS)
  name = "backbone.layers.1.mixer.dt_proj.bias"
  kept = convert.Tensors({n: tensors.take(n) for n in tensors.names() if n != name}, "ckpt")
  with pytest.raises(convert.MissingTensorError, match=name.replace(".", r"\.")):
    convert_mamba.from_hf(kept, cfg)


def test_unrepresentable_config_is_refused():
  base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2)
  with pytest.raises(ValueError, match="use_bias=true"):
    convert_mamba.model_fields({**base, "use_bias": True})
  with pytest.raises(ValueError, match="use_conv_bias=false"):
    convert_mamba.model_fields({**base, "use_conv_bias": False})
