"""train/text_encoders.py and optimizer.make(frozen=...): an imported T5 folder replaces the fresh
encoder params in their shardings, and an AdamW step with weight decay leaves it bitwise intact.

The folders are written with nets/convert/t5.py's exporter (tests/convert/test_t5_hf.py checks
that transformers reads them), so no torch is needed here.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import nets.convert
from configs import lm
from nets import t5
from nets.convert import t5 as convert_t5
from parallel import mesh as parallel_mesh
from parallel import sharding
from train import optimizer, text_encoders

FIELDS = dict(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              feed_forward_proj="gated-gelu")


def t5_params(cfg, seed):
  ids, mask = jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), bool)
  return nn.unbox(jax.jit(t5.Encoder(cfg).init)(jax.random.PRNGKey(seed), ids, mask)["params"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(cfg, params, folder): a T5 encoder exported as a Hugging Face folder."""
  cfg = t5.Config.from_config(ml_collections.ConfigDict(FIELDS))
  params = jax.tree.map(np.asarray, t5_params(cfg, 7))
  directory = str(tmp_path_factory.mktemp("t5_folder"))
  nets.convert.write_hf(directory, convert_t5.hf_config(cfg),
                        convert_t5.hf_from_params(params, cfg), convert_t5.WEIGHTS)
  return cfg, params, directory


def test_check_and_load_read_the_folder(folder):
  cfg, params, directory = folder
  assert text_encoders.check(directory) == cfg
  got_cfg, got = text_encoders.load(directory, dtype="bfloat16")
  assert got_cfg.dtype == "bfloat16" and got_cfg.param_dtype == "float32"
  jax.tree.map(np.testing.assert_array_equal, got, params)
  _, bf16 = text_encoders.load(directory, param_dtype="bfloat16")
  assert {str(a.dtype) for a in jax.tree.leaves(bf16)} == {"bfloat16"}


@pytest.mark.parametrize("make, message", [
    (lambda d, tmp: "", "model.text_encoder_path='' must name a Hugging Face T5 folder"),
    (lambda d, tmp: str(tmp / "nowhere"), "is not a directory; it must be a Hugging Face T5"),
    (lambda d, tmp: str(tmp), "has no config.json."),
])
def test_bad_path_is_one_sentence_naming_the_key(folder, tmp_path, make, message):
  path = make(folder[2], tmp_path)
  for call in (text_encoders.check, text_encoders.load):
    with pytest.raises(ValueError, match=message) as info:
      call(path)
    assert str(info.value).startswith("model.text_encoder_path=")


def test_missing_weights_and_bad_config_name_the_file(folder, tmp_path):
  _, _, directory = folder
  config_path = tmp_path / "config.json"
  with open(os.path.join(directory, "config.json")) as f:
    config_path.write_text(f.read())
  with pytest.raises(ValueError, match=f"^{tmp_path} has neither model.safetensors"):
    text_encoders.load(str(tmp_path))
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                     "feed_forward_proj": "gated-silu"}))
  with pytest.raises(ValueError, match=f"^{config_path} has feed_forward_proj='gated-silu'"):
    text_encoders.check(str(tmp_path))


def model_params(cfg):
  """A text-conditioned model's params as a family would have them: the encoder (zeros) under
  "text_encoder" beside trained parameters."""
  shapes = jax.eval_shape(lambda: t5_params(cfg, 0))  # values: place replaces them
  return {"text_encoder": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
          "blocks": {"proj": {"kernel": jnp.full((16, 8), 0.5)}, "norm": {"scale": jnp.ones(8)}}}


def test_place_puts_the_loaded_weights_in_the_fresh_shardings(folder):
  cfg, params, _ = folder
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=2, seq=1, expert=1)))
  init = lambda: {"text_encoder": t5.Encoder(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), bool))["params"]}
  _, shardings = sharding.abstract_and_shardings(init, mesh, sharding.RULES)
  fresh = sharding.init_sharded(init, shardings, mesh, sharding.RULES)
  fresh["other"] = jnp.arange(3.0)
  placed = text_encoders.place(fresh, params)
  assert placed["other"] is fresh["other"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               placed["text_encoder"], params)
  jax.tree.map(lambda a, b: (a.sharding == b.sharding) or pytest.fail(f"{a.sharding}"),
               placed["text_encoder"], fresh["text_encoder"])
  assert placed["text_encoder"]["layers"]["q"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_place_refuses_another_encoder_config(folder):
  cfg, params, _ = folder
  wider = t5.Config.from_config(ml_collections.ConfigDict({**FIELDS, "d_ff": 48}))
  with pytest.raises(ValueError, match=r"text_encoder\['layers'\]\['wi_0'\]\['kernel'\] has shape "
                     r"\(2, 16, 32\), but the model's has \(2, 16, 48\)"):
    text_encoders.place(model_params(wider), params)
  relu = t5.Config.from_config(ml_collections.ConfigDict({**FIELDS, "feed_forward_proj": "relu"}))
  with pytest.raises(ValueError, match=r"do not match the model's text_encoder: missing "
                     r"\[\"\['layers'\]\['wi'\]\['kernel'\]\"\]"):
    text_encoders.place(model_params(relu), params)
  with pytest.raises(ValueError, match="no parameters at text_encoder to hold"):
    text_encoders.place({"blocks": {}}, params)


def test_frozen_mask_marks_only_the_prefix(folder):
  mask = text_encoders.frozen_mask(model_params(folder[0]))
  assert all(jax.tree.leaves(mask["text_encoder"]))
  assert mask["blocks"] == {"proj": {"kernel": False}, "norm": {"scale": False}}
  boxed = {"text_encoder": {"w": nn.Partitioned(jnp.ones(2), ("embed",))}, "x": jnp.ones(1)}
  assert text_encoders.frozen_mask(boxed) == {"text_encoder": {"w": True}, "x": False}


def test_adamw_with_weight_decay_leaves_frozen_params_bitwise_unchanged(folder):
  """Two steps with nonzero gradients everywhere and weight decay: the encoder is bitwise what was
  loaded and has no Adam moments; the trained parameters move exactly as when the optimizer sees
  them alone (the clip's global norm ignores the frozen gradients)."""
  cfg, loaded, _ = folder
  opt = lm.get_config("size=test").opt
  opt.update(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=1.0, final_lr_frac=1.0)
  params = text_encoders.place(model_params(cfg), loaded)
  tx, _ = optimizer.make(opt, total_steps=10, frozen=text_encoders.frozen_mask)
  plain, _ = optimizer.make(opt, total_steps=10)
  trained = {"blocks": params["blocks"]}
  state, plain_state = tx.init(params), plain.init(trained)
  n_moments = lambda s: sum(a.size for a in jax.tree.leaves(s) if a.ndim > 0)
  assert n_moments(state) == n_moments(plain_state)  # no moments for the frozen encoder
  for step in range(2):
    grads = jax.tree.map(lambda a: jnp.full(a.shape, 0.3 + step, a.dtype), params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    plain_updates, plain_state = plain.update({"blocks": grads["blocks"]}, plain_state, trained)
    trained = jax.tree.map(lambda p, u: p + u, trained, plain_updates)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               params["text_encoder"], loaded)
  jax.tree.map(np.testing.assert_array_equal, params["blocks"], trained["blocks"])
  assert not np.array_equal(params["blocks"]["proj"]["kernel"], jnp.full((16, 8), 0.5))
