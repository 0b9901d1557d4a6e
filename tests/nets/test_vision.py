"""nets/vit.py, nets/dit.py, nets/udit.py: shapes, logical names, adaLN-Zero init, parameter
counts (DiT-XL/2 against the reference), label dropout, U-DiT stages and sub-map attention.

Initialisation uses "rbg" keys: on CPU they compile several times faster than threefry, and
every init here is jitted once (``init_with_output`` gives parameters and output together).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import attention, conditioning, dit, layers, udit, vit


def key(seed=0):
  return jax.random.key(seed, impl="rbg")


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


def diffusion_inputs(cfg, B=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0, 1000, (B,)).astype(np.float32)
  y = rng.integers(0, cfg.num_classes, (B,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)


def random_params(params, seed=0):
  """Every parameter drawn from N(0, 0.3²): no zero-initialised layer hides a code path."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), params)


def vit_cfg(**kw):
  base = dict(name="vit", image_size=8, channels=1, num_classes=5, patch_size=2, width=16,
              depth=2, mlp_dim=32, num_heads=2)
  return vit.Config.from_config({**base, **kw})


def dit_cfg(**kw):
  base = dict(name="dit", input_size=8, in_channels=2, num_classes=5, patch_size=2,
              hidden_size=16, depth=2, num_heads=2)
  return dit.Config.from_config({**base, **kw})


def udit_cfg(**kw):
  base = dict(name="udit", input_size=8, in_channels=2, num_classes=5, patch_size=1,
              hidden_size=8, depths=[1, 1, 1, 1, 1], num_heads=2)
  return udit.Config.from_config({**base, **kw})


@pytest.fixture(scope="module")
def dit_init():
  cfg = dit_cfg()
  model = dit.Model(cfg)
  inputs = diffusion_inputs(cfg)
  out, variables = jax.jit(model.init_with_output)(key(), *inputs)
  return cfg, model, nn.unbox(variables["params"]), inputs, out


# --- ViT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool, posemb", [("token", "learn"), ("gap", "sincos2d")])
def test_vit_shapes_pooling_and_param_count(pool, posemb):
  cfg = vit_cfg(pool=pool, posemb=posemb)
  model = vit.Model(cfg)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 1)), jnp.float32)
  logits, variables = jax.jit(model.init_with_output)(key(), images)
  params = nn.unbox(variables["params"])
  assert logits.shape == (3, cfg.num_classes) and logits.dtype == jnp.float32
  assert count(params) == vit.num_params(cfg)
  assert ("cls" in params) == (pool == "token")
  assert ("pos_embedding" in params) == (posemb == "learn")
  assert params["layers"]["attn"]["qkv"]["kernel"].shape == (2, 16, 3, 2, 8)  # scanned layers
  # The zero-initialised head gives uniform logits; with random weights the pooling matters.
  np.testing.assert_array_equal(logits, 0.0)
  logits = jax.jit(model.apply)({"params": random_params(params)}, images)
  assert np.all(np.isfinite(logits)) and np.std(np.asarray(logits)) > 0


def test_vit_variants_by_name():
  cfg = vit.Config.from_config({"name": "vit", "variant": "B/16"})
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) == (768, 12, 3072,
                                                                                12, 16)
  boxed = jax.eval_shape(vit.Model(cfg).init, key(), jnp.zeros((1, 224, 224, 3)))
  # timm's ViT-B/16 has 86,567,656 parameters; its position table also covers the class token.
  assert count(boxed) == vit.num_params(cfg) == 86_567_656 - 768
  small = vit.Config.from_config({"name": "vit", "variant": "Ti/16", "num_classes": 10})
  assert (small.width, small.num_heads, small.num_classes) == (192, 3, 10)
  digits = vit.Config.from_config({"name": "vit", "variant": "digits"})
  assert (digits.image_size, digits.channels, digits.num_classes) == (8, 1, 10)


# --- DiT ---------------------------------------------------------------------------------------

def test_dit_output_shape_and_zero_at_init(dit_init):
  cfg, _, params, _, out = dit_init
  assert out.shape == (2, 8, 8, 2 * cfg.in_channels) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # the final layer is zero-initialised
  assert count(params) == dit.num_params(cfg)
  np.testing.assert_array_equal(params["layers"]["adaLN"]["linear"]["kernel"], 0.0)
  assert params["y_embedder"]["embedding"].shape == (cfg.num_classes + 1, cfg.hidden_size)


def test_dit_without_learned_sigma_keeps_channels():
  cfg = dit_cfg(learn_sigma=False)
  out = jax.eval_shape(lambda: dit.Model(cfg).init_with_output(key(), *diffusion_inputs(cfg))[0])
  assert out.shape == (2, 8, 8, cfg.in_channels)


def test_adaln_zero_block_is_identity_at_init():
  cfg = dit_cfg()
  block = conditioning.Block(cfg, attention.dot_product_attention)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, cfg.hidden_size)), jnp.float32)
  (y, _), variables = jax.jit(block.init_with_output)(key(), x, c)
  np.testing.assert_array_equal(y, x)
  # Not trivially: with non-zero modulation the same block changes its input.
  y2, _ = jax.jit(block.apply)({"params": random_params(nn.unbox(variables["params"]))}, x, c)
  assert np.max(np.abs(np.asarray(y2 - x))) > 1e-3


def test_dit_xl2_has_the_reference_parameter_count():
  cfg = dit.Config.from_config({"name": "dit", "variant": "XL/2"})
  assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (32, 4, 1000, True)
  boxed = jax.eval_shape(dit.Model(cfg).init, key(), *diffusion_inputs(cfg, B=1))
  n = count(boxed)
  assert n == dit.num_params(cfg)
  # The reference counts its frozen sin-cos position table (256 × 1152) as a parameter.
  assert dit.num_params(cfg, include_pos_embed=True) == 675_129_632
  assert abs(n - 675e6) / 675e6 < 0.01


def test_label_dropout_equals_the_null_label(dit_init):
  cfg, model, params, (x, t, y), _ = dit_init
  params = {"params": random_params(params)}
  always_drop = dit.Model(dit_cfg(class_dropout_prob=1.0))
  null = jnp.full_like(y, cfg.null_label)

  @jax.jit
  def outputs(params):
    return (always_drop.apply(params, x, t, y, train=True, rngs={"dropout": key(1)}),
            model.apply(params, x, t, null),
            model.apply(params, x, t, y, force_drop_ids_B=jnp.ones_like(y)),
            model.apply(params, x, t, y))

  dropped, unconditional, forced, conditional = outputs(params)
  np.testing.assert_allclose(dropped, unconditional, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(forced, unconditional, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(conditional - unconditional))) > 1e-4


def test_patchify_roundtrip():
  x = jnp.arange(2 * 8 * 4 * 3, dtype=jnp.float32).reshape(2, 8, 4, 3)
  patches = layers.patchify(x, 2)
  assert patches.shape == (2, 8, 12)
  np.testing.assert_array_equal(patches[0, 1], x[0, 0:2, 2:4].reshape(-1))  # raster order
  np.testing.assert_array_equal(layers.unpatchify(patches, 4, 2, 2), x)


def test_sincos_2d_layout():
  pos = layers.sincos_2d(2, 3, 8)
  assert pos.shape == (6, 8)
  # Token (row 1, col 2) = index 5: first half encodes the column, second half the row.
  np.testing.assert_allclose(pos[5, :4], [np.sin(2), np.sin(2e-2), np.cos(2), np.cos(2e-2)],
                             rtol=1e-6)
  np.testing.assert_allclose(pos[5, 4:], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)],
                             rtol=1e-6)


# --- U-DiT -------------------------------------------------------------------------------------

def test_udit_stages_shapes_and_param_count():
  cfg = udit_cfg()
  model = udit.Model(cfg)
  inputs = diffusion_inputs(cfg)
  # Shapes from eval_shape, then one compiled forward with random weights (the zero-initialised
  # final layer is DiT's, tested above).
  params = nn.unbox(jax.eval_shape(model.init, key(), *inputs)["params"])
  assert count(params) == udit.num_params(cfg)
  # Widths C, 2C | 4C | 2C, 2C; each depth unit is two adaLN-Zero sub-blocks.
  assert cfg.stage_widths() == [8, 16, 32, 16, 16]
  for name, width in zip(("enc0", "enc1", "mid", "dec1", "dec0"), cfg.stage_widths()):
    assert params[name]["attn"]["qkv"]["kernel"].shape == (2, width, 3, 2, width // 2), name
  assert params["down0"]["kernel"].shape == (4 * 8, 16)  # 2x2 merge then 4W -> 2W
  assert params["up1"]["kernel"].shape == (32, 64)  # W -> 2W then pixel shuffle to W/2
  assert params["skip1"]["kernel"].shape == (16 + 16, 16)  # [upsampled, encoder skip] -> W
  assert params["skip0"]["kernel"].shape == (8 + 8, 16)
  assert {f"t_embedder{j}" for j in range(3)} <= set(params)
  out = jax.jit(model.apply)({"params": random_params(params)}, *inputs)
  assert out.shape == (2, 8, 8, 2 * cfg.in_channels) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.std(np.asarray(out)) > 0


def test_udit_paper_variants_trace():
  for name in ("S", "B"):
    cfg = udit.Config.from_config({"name": "udit", "variant": name})
    assert cfg.depths == (2, 5, 8, 5, 2)
    boxed = jax.eval_shape(udit.Model(cfg).init, key(), *diffusion_inputs(cfg, B=1))
    assert count(boxed) == udit.num_params(cfg)


def test_submap_attention_equals_attention_on_each_strided_submap():
  rng = np.random.default_rng(0)
  B, h, w, H, D = 2, 4, 6, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((B, h * w, H, D)), jnp.float32) for _ in range(3))
  seen = []

  def simple_attention(q, k, v, *, causal, positions_BxS=None, segment_ids_BxS=None):
    seen.append(q.shape)
    p = jax.nn.softmax(jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", p, v)

  out = udit.submap_attention(simple_attention, (h, w), q, k, v, causal=False)
  assert seen == [(4 * B, h * w // 4, H, D)]  # 1/4 of the tokens per attention call
  grid = lambda x: x.reshape(B, h, w, H, D)
  expected = np.zeros((B, h, w, H, D), np.float32)
  for a in range(2):
    for b in range(2):
      sub = lambda x: grid(x)[:, a::2, b::2].reshape(B, -1, H, D)
      o = simple_attention(sub(q), sub(k), sub(v), causal=False)
      expected[:, a::2, b::2] = np.asarray(o).reshape(B, h // 2, w // 2, H, D)
  np.testing.assert_allclose(grid(out), expected, rtol=1e-5, atol=1e-6)
  dense = udit.submap_attention(attention.dot_product_attention, (h, w), q, k, v, causal=False)
  np.testing.assert_allclose(dense, out, rtol=1e-5, atol=1e-6)


# --- All families --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "dit", "udit"])
def test_every_parameter_has_logical_names(family):
  if family == "vit":
    cfg = vit_cfg()
    boxed = jax.eval_shape(vit.Model(cfg).init, key(), jnp.zeros((1, 8, 8, 1)))
  else:
    module, cfg = (dit, dit_cfg()) if family == "dit" else (udit, udit_cfg())
    boxed = jax.eval_shape(module.Model(cfg).init, key(), *diffusion_inputs(cfg, B=1))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  stacked = specs["layers" if family != "udit" else "mid"]
  assert stacked["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", None, "heads", "head_dim")
  assert stacked["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")


@pytest.mark.parametrize("module", [dit, udit])
def test_remat_traces_with_gradients(module):
  cfg = dit_cfg(remat="full") if module is dit else udit_cfg(remat="full")
  model, inputs = module.Model(cfg), diffusion_inputs(cfg)
  boxed = jax.eval_shape(model.init, key(), *inputs)
  loss = lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
  grads = jax.eval_shape(jax.grad(loss), nn.unbox(boxed["params"]))
  assert count(grads) == module.num_params(cfg)


@pytest.mark.parametrize("module, bad, message", [
    (vit, dict(name="vit", variant="B/16", bogus=1), r"unknown field\(s\) \['bogus'\]"),
    (vit, dict(name="vit", variant="Q/16"), "is not a known vit variant"),
    (vit, dict(name="vit"), "must be positive; set model.variant"),
    (vit, dict(name="vit", variant="B/16", pool="cls"), "is not one of"),
    (dit, dict(name="dit", variant="XL/2", input_size=33), "not divisible by model.patch_size"),
    (dit, dict(name="dit", variant="S/2", remat="sometimes"), "is not one of"),
    (udit, dict(name="udit", variant="S", depths=[2, 2]), "must be an odd number"),
    (udit, dict(name="udit", variant="S", input_size=28), "must be divisible by 8"),
])
def test_invalid_configs_raise_a_sentence(module, bad, message):
  with pytest.raises(ValueError, match=message):
    module.Config.from_config(bad)


def test_overrides_win_over_the_variant():
  cfg = dit.Config.from_config({"name": "dit", "variant": "XL/2", "depth": 3, "patch_size": None},
                               remat="full")
  assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.remat) == (3, 1152, 2, "full")
