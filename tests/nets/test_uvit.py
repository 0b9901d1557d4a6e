"""nets/uvit.py: shapes, parameter counts (against the paper's), the long-skip wiring, a naive
reference forward, logical names, label dropping and config errors.

Initialisation uses "rbg" keys, as tests/nets/test_vision.py (faster to compile on CPU).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import conditioning, uvit


def key(seed=0):
  return jax.random.key(seed, impl="rbg")


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


def uvit_cfg(**kw):
  base = dict(name="uvit", input_size=8, in_channels=2, num_classes=5, patch_size=2,
              hidden_size=16, depth=7, num_heads=2)
  return uvit.Config.from_config({**base, **kw})


def inputs(cfg, B=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0, 1000, (B,)).astype(np.float32)
  y = rng.integers(0, cfg.num_classes, (B,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)


def random_params(params, seed=0):
  """Every parameter drawn from N(0, 0.3²), so no small initialisation hides a path."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), params)


@pytest.fixture(scope="module")
def initialised():
  cfg = uvit_cfg()
  model = uvit.Model(cfg)
  xs = inputs(cfg)
  out, variables = jax.jit(model.init_with_output)(key(), *xs)
  return cfg, model, nn.unbox(variables["params"]), xs, out


@pytest.mark.parametrize("kw", [{}, dict(learn_sigma=False, final_conv=False),
                                dict(class_dropout_prob=0.0, depth=1)])
def test_shapes_and_param_count(kw):
  cfg = uvit_cfg(**kw)
  model = uvit.Model(cfg)
  xs = inputs(cfg, B=3)
  out, variables = jax.jit(model.init_with_output)(key(), *xs)
  params = nn.unbox(variables["params"])
  C = cfg.in_channels * (2 if cfg.learn_sigma else 1)
  assert out.shape == (3, 8, 8, C) and out.dtype == jnp.float32
  assert count(params) == uvit.num_params(cfg)
  assert ("final_conv" in params) == cfg.final_conv
  assert params["pos_embed"].shape == (16 + 2, 16)  # time, label, 4x4 patches
  assert params["y_embedder"]["embedding"].shape[0] == 5 + (cfg.class_dropout_prob > 0)
  if cfg.depth > 1:
    L = cfg.depth // 2
    assert params["in_blocks"]["attn"]["qkv"]["kernel"].shape == (L, 16, 3, 2, 8)
    assert params["out_blocks"]["skip"]["kernel"].shape == (L, 32, 16)
    assert "skip" not in params["in_blocks"] and "skip" not in params["mid_block"]
  else:
    assert "in_blocks" not in params and "out_blocks" not in params


@pytest.mark.parametrize("variant, paper", [("M/2", 131e6), ("L/2", 287e6), ("H/2", 501e6)])
def test_paper_variants_match_the_reported_sizes(variant, paper):
  """ImageNet 256 latents (32×32×4, 1000 classes): within 1% of the paper's Table 1 (our qkv
  biases, timestep MLP and learned sigma add a little)."""
  cfg = uvit.Config.from_config({"name": "uvit", "variant": variant})
  assert abs(uvit.num_params(cfg) / paper - 1) < 0.01
  if variant == "M/2":  # the closed form against the traced tree at a paper size
    boxed = jax.eval_shape(uvit.Model(cfg).init, key(), *inputs(cfg, B=1))
    assert count(boxed) == uvit.num_params(cfg)


def _block_outputs(model, params, xs, zero_skip=None):
  """Every block's output (the sown intermediates) and the model output; ``zero_skip=i`` zeroes
  the long skip that leaves in-block i (intercepting Model.long_skips' input)."""
  def interceptor(next_fun, args, kwargs, context):
    if zero_skip is not None and context.method_name == "long_skips":
      args = (args[0].at[zero_skip].set(0.0),)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out, state = model.apply({"params": params}, *xs, mutable=["intermediates"])
  got = jax.tree.map(np.asarray, state["intermediates"])
  return {name: got[f"{name}_output{'s' * (name != 'mid_block')}"][0]
          for name in ("in_block", "mid_block", "out_block")}, out


def test_zeroing_one_long_skip_changes_exactly_its_out_block_and_later(initialised):
  """LIFO: the skip of in-block i enters out-block L-1-i; the in-blocks, the mid-block and the
  out-blocks before L-1-i are unchanged (bit for bit), that one and every later one change."""
  cfg, model, params, xs, _ = initialised
  params = random_params(params)
  L = cfg.depth // 2
  base, base_out = _block_outputs(model, params, xs)
  assert base["in_block"].shape == base["out_block"].shape == (L, 2, cfg.max_len, 16)
  for i in range(L):
    got, out = _block_outputs(model, params, xs, zero_skip=i)
    np.testing.assert_array_equal(got["in_block"], base["in_block"])
    np.testing.assert_array_equal(got["mid_block"], base["mid_block"])
    first = L - 1 - i
    for j in range(L):
      same = np.array_equal(got["out_block"][j], base["out_block"][j])
      assert same == (j < first), (f"zeroing the skip of in-block {i}: out-block {j} "
                                   f"{'unchanged' if same else 'changed'}")
    assert np.abs(np.asarray(out) - np.asarray(base_out)).max() > 1e-3


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _block(p, x, cfg):
  """One pre-norm block with explicit multi-head attention."""
  H = cfg.num_heads
  h = _layer_norm(x, p["norm1"], cfg.norm_eps)
  qkv = np.einsum("bte,ekhd->btkhd", h, p["attn"]["qkv"]["kernel"]) + p["attn"]["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", probs, v)
  assert o.shape[2] == H
  x = x + np.einsum("bqhd,hde->bqe", o, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  h = _layer_norm(x, p["norm2"], cfg.norm_eps)
  h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  h = np.asarray(jax.nn.gelu(h, approximate=True))
  return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def naive_forward(cfg, params, x, t, y):
  """U-ViT written out in numpy: python loops over the blocks and a list as the skip stack."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x, t, y = np.asarray(x, np.float64), np.asarray(t), np.asarray(y)
  p, g = cfg.patch_size, cfg.input_size // cfg.patch_size
  B = x.shape[0]
  patches = x.reshape(B, g, p, g, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
  tokens = patches @ params["x_embedder"]["kernel"] + params["x_embedder"]["bias"]
  te = params["t_embedder"]
  freqs = np.asarray(conditioning.timestep_embedding(jnp.asarray(t)), np.float64)
  h = freqs @ te["fc1"]["kernel"] + te["fc1"]["bias"]
  time = (h / (1 + np.exp(-h))) @ te["fc2"]["kernel"] + te["fc2"]["bias"]
  label = params["y_embedder"]["embedding"][y]
  h = np.concatenate([time[:, None], label[:, None], tokens], 1) + params["pos_embed"]
  L = cfg.depth // 2
  layer = lambda stacked, i: jax.tree.map(lambda a: a[i], stacked)
  skips = []
  for i in range(L):
    h = _block(layer(params["in_blocks"], i), h, cfg)
    skips.append(h)
  h = _block(params["mid_block"], h, cfg)
  for j in range(L):
    q = layer(params["out_blocks"], j)
    h = np.concatenate([h, skips.pop()], -1) @ q["skip"]["kernel"] + q["skip"]["bias"]
    h = _block(q, h, cfg)
  h = _layer_norm(h, params["norm"], cfg.norm_eps)[:, 2:]
  h = h @ params["decoder_pred"]["kernel"] + params["decoder_pred"]["bias"]
  img = h.reshape(B, g, g, p, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * p, g * p, -1)
  padded = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))
  S = cfg.input_size
  kernel, out = params["final_conv"]["kernel"], params["final_conv"]["bias"]
  for di in range(3):
    for dj in range(3):
      out = out + np.einsum("bhwc,co->bhwo", padded[:, di:di + S, dj:dj + S], kernel[di, dj])
  return out


def test_forward_equals_a_naive_reference(initialised):
  cfg, model, params, xs, _ = initialised
  params = random_params(params, seed=1)
  got = jax.jit(model.apply)({"params": params}, *xs)
  want = naive_forward(cfg, params, *xs)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got) / scale, want / scale, atol=2e-5)


def test_dropped_labels_are_the_null_class(initialised):
  cfg, model, params, (x, t, y), _ = initialised
  params = random_params(params)
  forced = model.apply({"params": params}, x, t, y, force_drop_ids_B=jnp.array([1, 0]))
  null = model.apply({"params": params}, x, t, y.at[0].set(cfg.null_label))
  np.testing.assert_array_equal(forced, null)
  assert not np.allclose(forced, model.apply({"params": params}, x, t, y))


def test_every_parameter_has_logical_names():
  cfg = uvit_cfg()
  boxed = jax.eval_shape(uvit.Model(cfg).init, key(), *inputs(cfg, B=1))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  for stack in ("in_blocks", "out_blocks"):
    assert specs[stack]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", None, "heads", "head_dim")
  assert specs["out_blocks"]["skip"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "mlp")


def test_remat_traces_with_gradients():
  cfg = uvit_cfg(remat="full")
  model, xs = uvit.Model(cfg), inputs(cfg)
  boxed = jax.eval_shape(model.init, key(), *xs)
  loss = lambda p: jnp.mean(model.apply({"params": p}, *xs) ** 2)
  grads = jax.eval_shape(jax.grad(loss), nn.unbox(boxed["params"]))
  assert count(grads) == uvit.num_params(cfg)


@pytest.mark.parametrize("bad, message", [
    (dict(variant="S/2", depth=12), "must be odd"),
    (dict(variant="S/2", input_size=33), "not divisible by model.patch_size"),
    (dict(variant="S/2", num_heads=7), "not divisible by model.num_heads"),
    (dict(variant="S/2", class_dropout_prob=1.5), "must be in"),
    (dict(variant="S/2", norm_eps=0.0), "must be a finite number"),
    (dict(variant="Q/2"), "is not a known uvit variant"),
    (dict(), "must be positive; set model.variant"),
])
def test_invalid_configs_raise_a_sentence(bad, message):
  with pytest.raises(ValueError, match=message):
    uvit.Config.from_config({"name": "uvit", **bad})

