"""nets/t5.py + nets/convert/t5.py: parity with transformers' T5EncoderModel, export, a float64
numpy reference of one layer, the sharded forward, and the sentences for broken folders.

Tiny random fp32 T5 encoders (T5 v1.0 "relu" and v1.1 "gated-gelu", norm weights randomised so a
swapped norm shows) are saved with save_pretrained and read back by load_pretrained.
"""

import dataclasses
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
from nets import t5
from nets.convert import t5 as convert
from parallel import mesh as parallel_mesh
from parallel import sharding
from tests.convert import parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

# Hidden states after the final norm are O(1); fp32 on both sides agree far below this.
TOL = 1e-5
B, L = 4, 24  # B = data x fsdp of the sharded test's mesh
LENGTHS = (24, 17, 9, 1)  # real tokens per row; the rest is padding
# relu: max_distance 20 < L - 1, so the clamped last bucket is reached; gated-gelu: 16 buckets,
# so distances 4..23 fall in the logarithmic ones.
HF = {"relu": dict(relative_attention_num_buckets=32, relative_attention_max_distance=20),
      "gated-gelu": dict(relative_attention_num_buckets=16, relative_attention_max_distance=128)}


def hf_model(proj: str, seed: int = 0, cls=None):
  """A tiny random T5 encoder (or ``cls``, e.g. a full T5ForConditionalGeneration)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
      feed_forward_proj=proj, dropout_rate=0.0, layer_norm_epsilon=1e-6, **HF[proj])
  model = (cls or transformers.T5EncoderModel)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):  # they init to ones, which would hide a swap
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def batch(seed: int = 1, pad_id: int = 0):
  """(ids [B, L] int32, mask [B, L] bool): random byte-like ids, rows of LENGTHS real tokens;
  padded positions hold ``pad_id`` (or random ids for pad_id=None)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 384, (B, L)).astype(np.int32)
  mask = np.arange(L)[None, :] < np.asarray(LENGTHS)[:, None]
  if pad_id is not None:
    ids = np.where(mask, ids, pad_id).astype(np.int32)
  return ids, mask


def hf_hidden(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


@functools.cache
def jitted_apply(cfg):
  return jax.jit(lambda params, ids, mask: t5.Encoder(cfg).apply({"params": params}, ids, mask))


def encode(cfg, params, ids, mask):
  return np.asarray(jitted_apply(cfg)(params, jnp.asarray(ids), jnp.asarray(mask)))


def real(x_BxLxE, mask):
  """The rows' real tokens only (padded queries are meaningless in both implementations)."""
  return x_BxLxE[mask]


@pytest.fixture(scope="module", params=sorted(HF))
def saved(request, tmp_path_factory):
  """(proj, HF model, folder written by save_pretrained)."""
  model = hf_model(request.param)
  directory = tmp_path_factory.mktemp(f"t5_{request.param}")
  model.save_pretrained(directory)
  return request.param, model, str(directory)


def test_buckets_match_transformers():
  """Every (query, key) bucket of a 200-token sequence, for the default and unusual settings."""
  relative_LxL = torch.arange(200)[None, :] - torch.arange(200)[:, None]
  for buckets, distance in [(32, 128), (16, 20), (32, 20), (8, 7), (64, 160)]:
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative_LxL, bidirectional=True, num_buckets=buckets, max_distance=distance).numpy()
    got = t5.relative_buckets(200, buckets, distance)
    # every bucket is used but "distance 0, looking right", which cannot happen
    assert got.dtype == np.int32 and len(np.unique(got)) == buckets - 1
    np.testing.assert_array_equal(got, want, err_msg=f"{buckets} buckets, max {distance}")


def test_import_matches_transformers(saved):
  proj, model, directory = saved
  cfg, params = convert.load_pretrained(directory)
  assert cfg.feed_forward_proj == proj and cfg.relative_attention_max_distance == \
      HF[proj]["relative_attention_max_distance"] and cfg.param_dtype == "float32"
  # The exact tree Encoder.init makes: same names, shapes and dtypes.
  ids, mask = batch()
  ref = nn.unbox(jax.eval_shape(lambda: t5.Encoder(cfg).init(jax.random.PRNGKey(0), ids, mask)
                                )["params"])
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params)
          == jax.tree.map(lambda a: (a.shape, a.dtype), ref))
  assert t5.param_count(cfg) == sum(a.size for a in jax.tree.leaves(params)) == \
      sum(p.numel() for p in model.parameters())
  want = hf_hidden(model, ids, mask)
  got = encode(cfg, params, ids, mask)
  assert got.dtype == np.float32 and np.abs(real(want, mask)).max() > 0.5
  diff = float(np.abs(real(got, mask) - real(want, mask)).max())
  print(f"T5 {proj}: max |diff| over real tokens = {diff:.2e}")
  assert diff < TOL


def test_gradients_match_transformers(saved):
  """d(loss)/d(params) of a weighted sum of the real tokens' outputs: ours (mapped to transformers'
  names by the exporter) against torch autograd's, for every tensor."""
  _, model, directory = saved
  cfg, params = convert.load_pretrained(directory)
  ids, mask = batch()
  w = np.random.default_rng(2).standard_normal((B, L, cfg.d_model)).astype(np.float32)
  w *= mask[..., None]
  loss = lambda p: jnp.sum(t5.Encoder(cfg).apply({"params": p}, ids, mask) * w)
  ours = convert.hf_from_params(jax.device_get(jax.jit(jax.grad(loss))(params)), cfg)
  model.zero_grad()
  out = model(input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  (out * torch.from_numpy(w)).sum().backward()
  theirs = dict(model.named_parameters())
  assert set(ours) == set(theirs)
  for name, g in ours.items():
    want = theirs[name].grad.numpy()
    # within 1e-4 of the tensor's largest gradient (fp32 sums in another order on each side)
    np.testing.assert_allclose(g, want, atol=1e-4 * np.abs(want).max(), rtol=0, err_msg=name)
    assert np.abs(want).max() > 0, name


def test_bfloat16_import_computes_in_bfloat16(saved):
  _, model, directory = saved
  cfg, params = convert.load_pretrained(directory, "bfloat16")
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16"}
  ids, mask = batch()
  got, want = encode(cfg, params, ids, mask), hf_hidden(model, ids, mask)
  assert got.dtype == np.float32
  err = np.abs(real(got - want, mask)).max() / np.abs(real(want, mask)).max()
  assert 1e-4 < err < 5e-2, err  # bf16 rounding, not a different function


def test_padding_does_not_change_real_tokens(saved):
  """What padded positions hold is irrelevant, and a row encoded alone (no padding at all) gives
  the same real-token outputs as inside the padded batch."""
  _, _, directory = saved
  cfg, params = convert.load_pretrained(directory)
  ids, mask = batch()
  padded = encode(cfg, params, ids, mask)
  garbage = encode(cfg, params, batch(pad_id=None)[0], mask)
  np.testing.assert_array_equal(real(garbage, mask), real(padded, mask))
  for row, n in enumerate(LENGTHS):
    alone = encode(cfg, params, ids[row:row + 1, :n], mask[row:row + 1, :n])
    np.testing.assert_allclose(alone[0], padded[row, :n], atol=TOL, rtol=0)


def test_full_encoder_decoder_folder_loads_the_encoder(tmp_path):
  """A T5ForConditionalGeneration folder (google/byt5-small's layout): decoder and lm_head are
  ignored, the encoder's output is transformers' encoder's."""
  model = hf_model("gated-gelu", cls=transformers.T5ForConditionalGeneration)
  model.save_pretrained(tmp_path)
  assert any(k.startswith("decoder.") for k in safetensors.numpy.load_file(
      str(tmp_path / convert.WEIGHTS)))
  cfg, params = convert.load_pretrained(str(tmp_path))
  ids, mask = batch()
  want = hf_hidden(model.encoder, ids, mask)
  assert np.abs(real(encode(cfg, params, ids, mask) - want, mask)).max() < TOL


def test_export_round_trip_and_loads_in_transformers(saved, tmp_path):
  proj, model, directory = saved
  cfg, params = convert.load_pretrained(directory)
  exported = convert.hf_from_params(params, cfg)
  written = safetensors.numpy.load_file(os.path.join(directory, convert.WEIGHTS))
  assert list(exported) == [n for n in exported if n in written] and set(exported) == set(written)
  for name, a in written.items():
    assert exported[name].dtype == a.dtype
    np.testing.assert_array_equal(exported[name], a, err_msg=name)
  # Our config.json + weights load in transformers with nothing missing, and encode the same.
  nets.convert.write_hf(str(tmp_path), convert.hf_config(cfg), exported, convert.WEIGHTS)
  back, info = transformers.T5EncoderModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not any(info.values()), info
  ids, mask = batch()
  np.testing.assert_array_equal(real(hf_hidden(back.eval(), ids, mask), mask),
                                real(hf_hidden(model, ids, mask), mask))
  assert convert.config_from_hf(convert.hf_config(cfg)) == cfg


# --- float64 numpy reference -------------------------------------------------------------------

def rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def numpy_encoder(params, cfg, ids, mask):
  """The encoder in float64 numpy, written from the T5 paper / Mesh TensorFlow, not from nets.t5:
  buckets by an explicit loop over (query, key)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  half, n = cfg.relative_attention_num_buckets // 2, ids.shape[1]
  exact = half // 2
  bucket = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      d = abs(j - i)
      if d < exact:
        b = d
      else:
        b = exact + int(np.log(d / exact) / np.log(cfg.relative_attention_max_distance / exact)
                        * (half - exact))
        b = min(b, half - 1)
      bucket[i, j] = b + (half if j > i else 0)
  bias_HxLxL = p["rel_bias"][bucket].transpose(2, 0, 1)
  x = p["embed"]["embedding"][ids]
  for layer in range(cfg.num_layers):
    w = jax.tree.map(lambda a: a[layer], p["layers"])
    h = rms(x, w["attn_norm"]["scale"], cfg.layer_norm_epsilon)
    q, k, v = (np.einsum("ble,ehd->blhd", h, w[n]["kernel"]) for n in "qkv")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias_HxLxL[None]
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd,hde->bqe", probs, v, w["o"]["kernel"])
    h = rms(x, w["ff_norm"]["scale"], cfg.layer_norm_epsilon)
    if cfg.feed_forward_proj == "gated-gelu":
      g = h @ w["wi_0"]["kernel"]
      g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
      f = g * (h @ w["wi_1"]["kernel"])
    else:
      f = np.maximum(h @ w["wi"]["kernel"], 0)
    x = x + f @ w["wo"]["kernel"]
  return rms(x, p["final_norm"]["scale"], cfg.layer_norm_epsilon)


@pytest.mark.parametrize("proj", sorted(HF))
def test_one_layer_matches_float64_numpy(proj):
  cfg = t5.Config.from_config(ml_collections.ConfigDict(dict(
      vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1, init_std=0.3,
      feed_forward_proj=proj, **HF[proj])))
  ids, mask = batch()
  params = nn.unbox(jax.jit(t5.Encoder(cfg).init)(jax.random.PRNGKey(0), ids, mask)["params"])
  key = jax.random.PRNGKey(1)
  params = jax.tree_util.tree_map_with_path(  # norm scales init to ones; make them count
      lambda path, a: a + 0.5 * jax.random.normal(key, a.shape) if "scale" in str(path) else a,
      params)
  want = numpy_encoder(params, cfg, ids, mask)
  got = encode(cfg, params, ids, mask)
  assert np.abs(real(want, mask)).max() > 0.5
  np.testing.assert_allclose(real(got, mask), real(want, mask), atol=5e-6, rtol=1e-5)


# --- sharded ------------------------------------------------------------------------------------

def test_sharded_forward_and_gradients_equal_single_device(saved):
  """data2 x fsdp2 x tensor2: parameters sharded by their logical names (heads and mlp over
  tensor, embed over fsdp), the batch over data x fsdp; the output and the gradients of a
  weighted sum of it are the single-device ones."""
  _, _, directory = saved
  cfg, params = convert.load_pretrained(directory)
  ids, mask = batch()
  w = np.random.default_rng(3).standard_normal((B, L, cfg.d_model)).astype(np.float32)
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=2, seq=1, expert=1)))
  rules = sharding.RULES
  init = lambda: t5.Encoder(cfg).init(jax.random.PRNGKey(0), ids, mask)["params"]
  structs, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  q_spec = structs["layers"]["q"]["kernel"].sharding.spec
  assert q_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q_spec
  placed = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), params, structs)
  data = jax.device_put((ids, mask), sharding.batch_sharding(mesh, rules))

  def out_and_grads(p, i, m):
    apply = lambda p: t5.Encoder(cfg).apply({"params": p}, i, m)
    return apply(p), jax.grad(lambda p: jnp.sum(apply(p) * w * m[..., None]))(p)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out, grads = jax.jit(out_and_grads, out_shardings=(None, shardings))(placed, *data)
  assert out.sharding.spec[0] == ("data", "fsdp")
  single, single_grads = jax.jit(out_and_grads)(params, ids, mask)
  # sums split over fsdp / tensor: another order
  np.testing.assert_allclose(real(np.asarray(out), mask), real(np.asarray(single), mask),
                             atol=TOL, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=1e-4 * np.abs(np.asarray(b)).max(), rtol=0),
      grads, single_grads)


# --- faults -------------------------------------------------------------------------------------

def copy_folder(saved, tmp_path) -> str:
  _, _, directory = saved
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as src:
      (tmp_path / name).write_bytes(src.read())
  return str(tmp_path)


def test_missing_config_json_is_named(saved, tmp_path):
  directory = copy_folder(saved, tmp_path)
  os.remove(os.path.join(directory, "config.json"))
  with pytest.raises(FileNotFoundError, match=f"^{directory} has no config.json.$"):
    convert.load_pretrained(directory)


def test_truncated_safetensors_is_named(saved, tmp_path):
  directory = copy_folder(saved, tmp_path)
  weights = os.path.join(directory, convert.WEIGHTS)
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)
  with pytest.raises(ValueError) as info:
    convert.load_pretrained(directory)
  message = str(info.value)
  assert weights in message and "truncated" in message and "\n" not in message, message


def test_missing_tensor_is_named(saved, tmp_path):
  directory = copy_folder(saved, tmp_path)
  weights = os.path.join(directory, convert.WEIGHTS)
  tensors = safetensors.numpy.load_file(weights)
  del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(nets.convert.MissingTensorError,
                     match=r"has no tensor 'encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
    convert.load_pretrained(directory)


@pytest.mark.parametrize("change, expected", [
    (dict(feed_forward_proj="gated-silu", dense_act_fn="silu"),
     "has feed_forward_proj='gated-silu'; the T5 encoder supports ['relu', 'gated-gelu']"),
    (dict(is_gated_act=False), "has is_gated_act=False, which contradicts feed_forward_proj"),
    (dict(dense_act_fn="gelu"), "has dense_act_fn='gelu', but feed_forward_proj='gated-gelu' "
     "computes 'gelu_new'"),
    (dict(model_type="umt5"), "has model_type='umt5'; the T5 encoder converter reads"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets=2 must be an "
     "integer >= 4"),
    (dict(d_model="big"), "T5 d_model='big' must be a positive integer"),
])
def test_unsupported_config_is_one_sentence(tmp_path, change, expected):
  model = hf_model("gated-gelu")
  model.save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(ValueError) as info:
    convert.load_pretrained(str(tmp_path))
  message = str(info.value)
  assert message.startswith(str(path)) and expected in message and "\n" not in message, message


def test_config_defaults_and_dtype():
  """An old config.json without the bucket keys gets T5Config's defaults; bf16 is kept."""
  cfg = convert.config_from_hf({"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128,
                                "num_layers": 2, "vocab_size": 100, "torch_dtype": "bfloat16"})
  assert dataclasses.asdict(cfg) | {} == dataclasses.asdict(t5.Config(
      vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
      dtype="bfloat16", param_dtype="bfloat16"))
