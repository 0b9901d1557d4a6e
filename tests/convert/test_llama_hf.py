"""nets/convert/llama.py: logits parity with transformers' LlamaForCausalLM, import and export.

A tiny random fp32 LlamaForCausalLM (GQA, randomised norm weights) is saved with save_pretrained,
imported with read_hf + from_hf and run by nets.llama.Model on the same tokens; odyssey params are
exported with to_hf + write_hf and loaded back by LlamaForCausalLM.from_pretrained.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

import nets.convert
from nets import llama
from nets.convert import llama as convert
from tests.convert import parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

# Logits of the tiny models are O(1); fp32 kernels on both sides agree far below this.
TOL = 1e-4
B, S = 2, 16


def hf_model(tie=False, rope_theta=10000.0, head_dim=None, seed=0):
  """A tiny random LlamaForCausalLM whose weights are large enough for the logits to matter."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
      rope_theta=rope_theta, head_dim=head_dim, rms_norm_eps=1e-5, tie_word_embeddings=tie,
      initializer_range=0.1, dtype="float32")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # they init to ones, which would hide a swapped norm
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def tokens(vocab=97, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, (B, S)).astype(np.int32)


def hf_logits(model, tokens_BxS):
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BxS).long()).logits.numpy()


def import_hf(directory):
  """(cfg, params) read back from a Hugging Face folder through the converter interface."""
  hf, tensors = nets.convert.read_hf(directory, convert.WEIGHTS)
  cfg = llama.Config.from_config(ml_collections.ConfigDict(convert.model_fields(hf)))
  return cfg, convert.from_hf(tensors, cfg)


@functools.cache
def jitted_apply(cfg):
  """One compile per config: eager apply dispatches (and compiles) every op separately."""
  return jax.jit(lambda params, tokens_BxS: llama.Model(cfg).apply({"params": params}, tokens_BxS))


def odyssey_logits(cfg, params, tokens_BxS):
  return np.asarray(jitted_apply(cfg)(params, jnp.asarray(tokens_BxS)))


def max_diff(a, b):
  return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("tie,rope_theta,head_dim,shard", [
    (False, 10000.0, None, None),
    (True, 500000.0, None, "20KB"),  # tied, non-default theta, sharded with an index file
    (False, 1234.5, 32, None),  # head_dim != hidden / heads: H*D = 128 != E = 64
])
def test_import_matches_transformers_logits(tmp_path, tie, rope_theta, head_dim, shard):
  model = hf_model(tie, rope_theta, head_dim)
  kwargs = {"max_shard_size": shard} if shard else {}
  model.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
  if shard:
    assert os.path.exists(tmp_path / (convert.WEIGHTS + ".index.json"))
  cfg, params = import_hf(str(tmp_path))
  assert cfg.tie_embeddings == tie and cfg.rope_theta == rope_theta
  # The exact tree Model.init makes: same names, shapes and dtypes.
  ref = nn.unbox(jax.eval_shape(lambda: llama.Model(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"])
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params)
          == jax.tree.map(lambda a: (a.shape, a.dtype), ref))
  x = tokens()
  ref_logits = hf_logits(model, x)
  assert np.abs(ref_logits).max() > 1.0  # the comparison is not between near-zero logits
  diff = max_diff(odyssey_logits(cfg, params, x), ref_logits)
  print(f"import tie={tie} theta={rope_theta} head_dim={head_dim}: max |diff| = {diff:.2e}")
  assert diff < TOL


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
  fields = dict(name="llama", vocab_size=97, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                mlp_dim=96, max_len=128, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=tie,
                init_std=0.1)
  cfg = llama.Config.from_config(ml_collections.ConfigDict(fields))
  x = tokens()
  params = nn.unbox(jax.jit(llama.Model(cfg).init)(jax.random.PRNGKey(0), jnp.asarray(x))["params"])
  key = jax.random.PRNGKey(1)
  params = jax.tree_util.tree_map_with_path(  # norm scales init to ones; make them count
      lambda path, a: a + 0.5 * jax.random.normal(key, a.shape) if "scale" in str(path) else a,
      params)
  tensors = convert.to_hf(params, cfg)
  assert list(tensors)[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
  assert ("lm_head.weight" in tensors) != tie
  files = nets.convert.write_hf(str(tmp_path), convert.hf_config(cfg), tensors, convert.WEIGHTS,
                                max_shard_bytes=40_000)
  assert len(files) > 1
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  diff = max_diff(hf_logits(model, x), odyssey_logits(cfg, params, x))
  print(f"export tie={tie}: max |diff| = {diff:.2e}")
  assert diff < TOL
  # And back: the round trip is exact, and the config reads back as the same Config.
  cfg_back, params_back = import_hf(str(tmp_path))
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, params_back, jax.tree.map(np.asarray, params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A single-file checkpoint that the error tests copy and break."""
  directory = tmp_path_factory.mktemp("llama")
  hf_model().save_pretrained(directory, safe_serialization=True)
  with open(directory / "config.json") as f:
    hf = json.load(f)
  return hf, safetensors.numpy.load_file(str(directory / convert.WEIGHTS))


def write(directory, hf, tensors):
  with open(directory / "config.json", "w") as f:
    json.dump(hf, f)
  safetensors.numpy.save_file(tensors, str(directory / convert.WEIGHTS))
  return str(directory)


def test_missing_tensor_is_named(tmp_path, saved):
  hf, tensors = saved
  name = "model.layers.1.mlp.up_proj.weight"
  directory = write(tmp_path, hf, {n: a for n, a in tensors.items() if n != name})
  with pytest.raises(nets.convert.MissingTensorError, match=name):
    import_hf(directory)


def test_config_disagreeing_with_weights_names_tensor_and_shapes(tmp_path, saved):
  hf, tensors = saved
  directory = write(tmp_path, {**hf, "hidden_size": 48, "head_dim": 12}, tensors)
  with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight'.*\(97, 64\).*\(97, 48\)"):
    import_hf(directory)


def test_extra_tensor_is_named(tmp_path, saved):
  """A config with fewer layers than the checkpoint leaves layer 1 unused: say so."""
  hf, tensors = saved
  directory = write(tmp_path, {**hf, "num_hidden_layers": 1}, tensors)
  with pytest.raises(ValueError, match=r"no place for: 'model\.layers\.1\."):
    import_hf(directory)


def base_hf(**kw):
  return {"vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 128, **kw}


@pytest.mark.parametrize("hf,theta", [
    (base_hf(), 10000.0),  # transformers' default
    (base_hf(rope_theta=500000.0, rope_scaling=None), 500000.0),  # transformers 4 layout
    (base_hf(rope_parameters={"rope_type": "default", "rope_theta": 2e5}), 2e5),  # transformers 5
])
def test_model_fields_reads_rope_theta_from_both_layouts(hf, theta):
  fields = convert.model_fields(hf)
  cfg = llama.Config.from_config(ml_collections.ConfigDict(fields))
  assert cfg.rope_theta == theta and cfg.head_dim == 0 and cfg.param_dtype == "float32"


@pytest.mark.parametrize("hf,match", [
    (base_hf(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (base_hf(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (base_hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (base_hf(attention_bias=True), "bias"),
    (base_hf(mlp_bias=True), "bias"),
    (base_hf(hidden_act="gelu"), "gelu"),
])
def test_model_fields_refuses_what_odyssey_does_not_compute(hf, match):
  with pytest.raises(ValueError, match=match):
    convert.model_fields(hf)


def test_hf_config_loads_in_transformers_and_reads_back():
  fields = dict(name="llama", vocab_size=97, num_layers=3, d_model=64, num_heads=4, num_kv_heads=1,
                mlp_dim=96, max_len=256, head_dim=32, rope_theta=1e6, norm_eps=1e-6,
                tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16")
  cfg = llama.Config.from_config(ml_collections.ConfigDict(fields))
  hf = convert.hf_config(cfg)
  config = transformers.LlamaConfig.from_dict(hf)
  assert (config.head_dim, config.num_key_value_heads, config.rope_parameters["rope_theta"]) == (
      32, 1, 1e6)
  assert llama.Config.from_config(ml_collections.ConfigDict(convert.model_fields(hf))) == cfg


def test_moe_has_no_llama_layout():
  fields = dict(name="llama", vocab_size=97, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                mlp_dim=96, max_len=128, moe=dict(num_experts=4))
  cfg = llama.Config.from_config(ml_collections.ConfigDict(fields))
  with pytest.raises(ValueError, match="MoE"):
    convert.hf_config(cfg)


def test_tied_config_refuses_a_different_lm_head(tmp_path, saved):
  """An untied checkpoint read as tied would silently drop lm_head.weight; say so instead."""
  hf, tensors = saved
  directory = write(tmp_path, {**hf, "tie_word_embeddings": True}, tensors)
  with pytest.raises(ValueError, match="lm_head.weight that differs"):
    import_hf(directory)
