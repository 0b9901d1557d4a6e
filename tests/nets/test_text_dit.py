"""The text-conditioned diffusion families (nets/pixart.py, nets/mmdit.py) and their caption
encoder (nets/text_encoder.py): shapes, padding masks, the reference initialisations, caption
dropout, guidance, and one joint-attention layer against a float64 numpy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import diffusion
from nets import mmdit, pixart, registry
from tests.parallel.step_parity import caption_batch
from train import diffusion_process
from train.tasks import diffusion as diffusion_task

B, L = 3, 12
TINY = dict(variant="digits", hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=2,
            in_channels=1, text_len=L, text_width=32, text_layers=1, text_heads=2)
FAMILIES = {"pixart": pixart, "mmdit": mmdit}


def _cfg(name, **overrides):
  return FAMILIES[name].Config.from_config(ml_collections.ConfigDict(
      {"name": name, **TINY, **overrides}))


def _inputs(seed=0):
  batch = caption_batch(B, 8, L, seed)
  t = jnp.asarray([10.0, 500.0, 900.0])
  return jnp.asarray(batch["images"]), t, jnp.asarray(batch["text_ids"]), jnp.asarray(
      batch["text_mask"])


def _params(model, inputs, perturb=True):
  """Initialised parameters; ``perturb`` adds noise everywhere so no zero-init hides a path."""
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"])
  if not perturb:
    return params

  @jax.jit
  def perturbed(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])

  return perturbed(params)


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request):
  cfg = _cfg(request.param)
  model = FAMILIES[request.param].Model(cfg)
  inputs = _inputs()
  return request.param, cfg, model, inputs, _params(model, inputs)


def test_families_are_text_conditioned():
  assert registry.get("pixart").conditioning == registry.get("mmdit").conditioning == "text"
  assert registry.get("dit").conditioning == "class"


def test_shapes_and_param_count(built):
  name, cfg, model, inputs, params = built
  out = jax.jit(model.apply)({"params": params}, *inputs)
  assert out.shape == (B, 8, 8, cfg.out_channels) and out.dtype == jnp.float32
  assert registry.get(name).num_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_padded_caption_positions_change_nothing(built):
  """Ids at padded positions are masked everywhere (encoder, cross or joint attention, pooling),
  while a real token's id does change the output."""
  _, _, model, (x, t, ids, mask), params = built
  assert not mask.all()
  apply = jax.jit(model.apply)
  out = apply({"params": params}, x, t, ids, mask)
  junk = jnp.where(mask, ids, 200 + jnp.arange(L)[None])
  np.testing.assert_array_equal(apply({"params": params}, x, t, junk, mask), out)
  other = ids.at[:, 0].set(ids[:, 0] + 1)
  assert np.abs(np.asarray(apply({"params": params}, x, t, other, mask) - out)).max() > 1e-4


def test_caption_dropout_is_the_forced_drop(built):
  """train=True with caption_dropout_prob=1 equals force_drop_ids_B=1: the null embedding with an
  all-ones mask, whatever the caption."""
  name, _, _, (x, t, ids, mask), params = built
  model = FAMILIES[name].Model(_cfg(name, caption_dropout_prob=1.0))
  apply = jax.jit(model.apply, static_argnames="train")  # one compile per call signature
  dropped = apply({"params": params}, x, t, ids, mask, train=True,
                  rngs={"dropout": jax.random.PRNGKey(3)})
  forced = apply({"params": params}, x, t, ids, mask, force_drop_ids_B=jnp.ones(B, int))
  np.testing.assert_array_equal(dropped, forced)
  other = apply({"params": params}, x, t, (ids + 7) % 259, jnp.ones_like(mask),
                force_drop_ids_B=jnp.ones(B, int))
  np.testing.assert_array_equal(other, forced)
  cond = apply({"params": params}, x, t, ids, mask)
  assert np.abs(np.asarray(cond - forced)).max() > 1e-4
  # force_drop decides per row: row 0 dropped, the others conditional.
  mixed = apply({"params": params}, x, t, ids, mask, force_drop_ids_B=jnp.array([1, 0, 0]))
  np.testing.assert_allclose(mixed[0], forced[0], atol=1e-6)
  np.testing.assert_allclose(mixed[1:], cond[1:], atol=1e-6)


def test_cfg_scale_one_is_conditional_and_zero_unconditional(built):
  _, _, model, (x, t, ids, mask), params = built
  jitted = jax.jit(model.apply)
  apply = lambda x, t, y, drop=None: jitted({"params": params}, x, t, *y, force_drop_ids_B=drop)
  cond, uncond = apply(x, t, (ids, mask)), apply(x, t, (ids, mask), jnp.ones(B, int))
  g1 = diffusion_process.cfg_drop_model_fn(apply, 1.0)(x, t, (ids, mask))
  g0 = diffusion_process.cfg_drop_model_fn(apply, 0.0)(x, t, (ids, mask))
  C = x.shape[-1]
  # uncond + 1·(cond − uncond) is cond up to one float32 rounding.
  np.testing.assert_allclose(g1, cond, rtol=0, atol=1e-6)
  np.testing.assert_allclose(g0[..., :C], uncond[..., :C], rtol=0, atol=1e-6)
  np.testing.assert_allclose(g0[..., C:], cond[..., C:], rtol=0, atol=1e-6)


def test_init_output_is_zero_and_ignores_the_caption(built):
  """Zero final linear: the output starts at 0. PixArt's zero cross-attention projections and
  MMDiT's zero adaLN-Zero modulations: at init the network ignores the caption, which a random
  final linear makes visible."""
  name, cfg, model, (x, t, ids, mask), _ = built
  params = _params(model, (x, t, ids, mask), perturb=False)
  apply = jax.jit(model.apply)
  assert not np.asarray(apply({"params": params}, x, t, ids, mask)).any()
  final = params["final_layer"]["linear"]
  params["final_layer"]["linear"] = {
      "kernel": jax.random.normal(jax.random.PRNGKey(2), final["kernel"].shape),
      "bias": final["bias"]}
  a = apply({"params": params}, x, t, ids, mask)
  b = apply({"params": params}, x, t, (ids + 5) % 259, mask)
  assert np.abs(np.asarray(a)).max() > 1e-3
  np.testing.assert_array_equal(a, b)


def _blocks_output(model, params, *inputs):
  """What the blocks hand to the final layer."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, pixart.FinalLayer) and context.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, *inputs)
  return seen[0]


def test_pixart_adaln_single_zero_t_block_leaves_only_the_tables():
  """With the shared t_block zeroed each block's modulation is its own table: the blocks' output
  no longer depends on the timestep (it does with the reference's N(0, 0.02) t_block)."""
  cfg = _cfg("pixart")
  model = pixart.Model(cfg)
  x, t, ids, mask = _inputs()
  params = _params(model, (x, t, ids, mask))
  t2 = t[::-1]
  assert np.abs(np.asarray(_blocks_output(model, params, x, t, ids, mask)
                           - _blocks_output(model, params, x, t2, ids, mask))).max() > 1e-5
  params["t_block"] = jax.tree.map(jnp.zeros_like, params["t_block"])
  np.testing.assert_array_equal(_blocks_output(model, params, x, t, ids, mask),
                                _blocks_output(model, params, x, t2, ids, mask))


def test_pixart_block_is_identity_when_gates_and_cross_attention_are_zero():
  cfg = _cfg("pixart")
  block = pixart.Block(cfg, pixart.attention.dot_product_attention)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, 16, 64)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((B, L, 64)), jnp.float32)
  t6 = jnp.asarray(rng.standard_normal((B, 6, 64)), jnp.float32)
  mask = jnp.ones((B, L), bool)
  params = nn.unbox(block.init(jax.random.PRNGKey(0), x, t6, y, mask)["params"])
  # Gates are table rows 2 and 5 plus t6's; zero both, and the cross-attention output is zero
  # at init: the block is the identity.
  table = params["scale_shift_table"].at[jnp.array([2, 5])].set(0.0)
  t6_no_gate = t6.at[:, jnp.array([2, 5])].set(0.0)
  out, _ = block.apply({"params": {**params, "scale_shift_table": table}}, x, t6_no_gate, y, mask)
  np.testing.assert_array_equal(out, x)
  out, _ = block.apply({"params": params}, x, t6, y, mask)
  assert np.abs(np.asarray(out - x)).max() > 1e-3


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _ln_modulate(x, shift, scale):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]


def test_mmdit_joint_attention_layer_matches_float64_numpy():
  """One joint block (the pre_only last one: image outputs only) against numpy in float64:
  separate per-stream QKV and QK-RMSNorm, one softmax over [text; image] with padded caption
  keys removed, gated output projection and MLP."""
  cfg = _cfg("mmdit")
  block = mmdit.Block(cfg, mmdit.attention.dot_product_attention, pre_only=True)
  rng = np.random.default_rng(0)
  S, E, H = 16, 64, 4
  D = E // H
  x = rng.standard_normal((B, S, E)).astype(np.float32)
  ctx = rng.standard_normal((B, L, E)).astype(np.float32)
  c = rng.standard_normal((B, E)).astype(np.float32)
  mask = np.arange(L)[None] < np.array([[L], [5], [1]])
  seg = mmdit.joint_segment_ids(jnp.asarray(mask), S)
  params = _params(block, ((jnp.asarray(x), jnp.asarray(ctx)), jnp.asarray(c), seg))
  (got, _), _ = block.apply({"params": params}, (x, ctx), c, seg)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda v: v / (1 + np.exp(-v))
  mod = lambda name: np.einsum("bi,ino->bno", silu(c.astype(np.float64)),
                               p[name]["linear"]["kernel"]) + p[name]["linear"]["bias"]
  mx, mc = mod("adaLN_x"), mod("adaLN_c")

  def qkv(h, m, s):
    h = _ln_modulate(h.astype(np.float64), m[:, 0], m[:, 1])
    out = np.einsum("bse,ethd->bsthd", h, p[f"qkv_{s}"]["kernel"]) + p[f"qkv_{s}"]["bias"]
    return (_rms(out[:, :, 0], p[f"norm_q_{s}"]["scale"], 1e-6),
            _rms(out[:, :, 1], p[f"norm_k_{s}"]["scale"], 1e-6), out[:, :, 2])

  (qc, kc, vc), (qx, kx, vx) = qkv(ctx, mc, "c"), qkv(x, mx, "x")
  q, k, v = (np.concatenate(a, axis=1) for a in ((qc, qx), (kc, kx), (vc, vx)))
  logits = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(D)
  keep = np.concatenate([mask, np.ones((B, S), bool)], axis=1)[:, None, None, :]
  logits = np.where(keep, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum("bhst,bthd->bshd", probs, v)[:, L:]  # image queries
  h = x + mx[:, 2, None] * (np.einsum("bshd,hde->bse", o, p["out_x"]["kernel"])
                             + p["out_x"]["bias"])
  m = _ln_modulate(h, mx[:, 3], mx[:, 4])
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  m = gelu(m @ p["mlp_x"]["fc1"]["kernel"] + p["mlp_x"]["fc1"]["bias"])
  m = m @ p["mlp_x"]["fc2"]["kernel"] + p["mlp_x"]["fc2"]["bias"]
  want = h + mx[:, 5, None] * m
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_validation_sentences():
  # The T5 Config is data train/models.py reads from the folder (tests/train/test_frozen_t5.py).
  with pytest.raises(ValueError, match="text_encoder='t5' needs the encoder's architecture"):
    _cfg("mmdit", text_encoder="t5")
  with pytest.raises(ValueError, match="text_encoder_path='/x' is set but "
                     "model.text_encoder='trained' ignores it"):
    _cfg("pixart", text_encoder_path="/x")
  with pytest.raises(ValueError, match="text_vocab=200 is too small"):
    _cfg("pixart", text_vocab=200)
  with pytest.raises(ValueError, match="caption_dropout_prob"):
    _cfg("pixart", caption_dropout_prob=1.5)


def test_task_samples_from_prompts():
  """The task's text path: a batch of prompts through guided flow sampling (mmdit) or DDIM."""
  for name in ("mmdit", "pixart"):
    config = diffusion.get_config(f"model={name}")
    config.model.update(TINY)
    config.data.image_size = 8
    config.diffusion.update(sample_steps=2, cfg_scale=3.0)
    task = diffusion_task.DiffusionTask(config)  # not task.check: the canvases here are 8 px
    cfg = FAMILIES[name].Config.from_config(config.model)
    model = FAMILIES[name].Model(cfg)
    batch = diffusion_task.text_batch(np.zeros((2, 8, 8, 1)), ["the digit 3", "7"], L)
    params = _params(model, task.init_args(batch))
    images = task.sample_text_images(model, params, batch["text_ids"], batch["text_mask"], 0)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
    loss, _ = jax.jit(task.loss_fn(model))(params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
