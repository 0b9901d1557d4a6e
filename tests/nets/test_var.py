"""nets/var.py: the block-causal mask by Jacobian, a naive float64 forward, teacher-forcing
inputs, cached = uncached scale-by-scale sampling, guidance at w = 1, the counts and config
errors. (tests/nets/test_contract.py checks the shapes, the parameter count, the executed FLOPs
against XLA and each cached scale against the full forward.)"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import counting, msvq, var
from parallel import attention as parallel_attention
from parallel import mesh as parallel_mesh
from parallel import sharding as parallel_sharding

SCALES = (1, 2, 3)  # L = 14 tokens
B = 2


def make_cfg(**kw):
  fields = {**dict(depth=2, hidden_size=32, num_heads=2, num_classes=5, codebook_size=16,
                  vae_dim=3, scales=SCALES), **kw}
  return var.Config.from_config({"name": "var", **fields})


CFG = make_cfg()
QCFG = msvq.QuantizerConfig(codebook_size=CFG.codebook_size, embed_dim=CFG.vae_dim,
                            scales=SCALES)


def random_params(model, *inputs, seed=0, std=0.2):
  """N(0, std²) parameters of the init's shapes (no zero-initialised adaLN hides a path)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


def inputs(cfg=CFG, seed=1, dtype=jnp.float32):
  x = np.random.default_rng(seed).standard_normal((B, cfg.max_len - cfg.first_len, cfg.vae_dim))
  return jnp.asarray(x, dtype), jnp.asarray([3, 0], jnp.int32)


def quantizer(seed=0):
  q = msvq.Quantizer(QCFG)
  f = jnp.zeros((1, SCALES[-1], SCALES[-1], QCFG.embed_dim))
  params = nn.unbox(q.init(jax.random.PRNGKey(seed), f)["params"])
  codebook = jax.random.normal(jax.random.PRNGKey(seed + 7), params["codebook"].shape)
  return q, {**params, "codebook": codebook}


# --- The mask and the forward ------------------------------------------------------------------

def test_logits_depend_on_exactly_the_coarser_scales_and_their_own():
  """d logits[t] / d x[u] is exactly zero when input token u is of a finer scale than token t,
  and non-zero otherwise; the first scale's logits depend on the label alone."""
  model = var.Model(CFG)
  x, y = inputs()
  params = random_params(model, x, y)
  jac = jax.jacfwd(lambda x: model.apply({"params": params}, x, y))(x)  # [B, L, V, B, T, C]
  per_pair = np.abs(np.asarray(jac)).max(axis=(2, 5))  # [B, L, B, T]
  levels = CFG.levels
  later = levels[CFG.first_len:][None, :] > levels[:, None]  # [L, T]: input of a finer scale
  for b in range(B):
    own = per_pair[b, :, b]
    assert np.all(own[later] == 0.0)
    assert np.all(own[~later] > 1e-6), own[~later].min()
    assert np.all(per_pair[b, :, 1 - b] == 0.0)  # rows of the batch are independent
  first = model.apply({"params": params}, x, y)[:, :CFG.first_len]
  assert not np.allclose(first, model.apply({"params": params}, x, y[::-1])[:, :CFG.first_len])


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _norm(x, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def naive_forward(cfg, p, x, y):
  """VAR's forward in float64 loops with an explicit [L, L] block-causal mask."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  E, H, L, eps = cfg.width, cfg.num_heads, cfg.max_len, cfg.norm_eps
  D = E // H
  sizes = [s * s for s in cfg.scales]
  level = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
  allowed = np.zeros((L, L), bool)
  for t in range(L):
    for u in range(L):
      allowed[t, u] = level[u] <= level[t]
  silu = lambda a: a / (1 + np.exp(-a))
  out = np.zeros((x.shape[0], L, cfg.codebook_size))
  for b in range(x.shape[0]):
    c = p["class_embed"]["embedding"][y[b]]
    h = np.zeros((L, E))
    for t in range(L):
      if t < cfg.first_len:
        h[t] = c + p["pos_start"][t]
      else:
        h[t] = x[b, t - cfg.first_len] @ p["word_embed"]["kernel"] + p["word_embed"]["bias"]
      h[t] += p["pos_embed"][t] + p["level_embed"][level[t]]
    for layer in range(cfg.depth):
      w = jax.tree.map(lambda a: a[layer], p["layers"])
      mod = np.einsum("e,enf->nf", silu(c), w["adaLN"]["linear"]["kernel"]) + w["adaLN"][
          "linear"]["bias"]
      a = _norm(h, eps) * (1 + mod[1]) + mod[0]
      qkv = np.einsum("le,ekhd->lkhd", a, w["qkv"]["kernel"]) + w["qkv"]["bias"]
      o = np.zeros((L, H, D))
      for head in range(H):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        s = np.where(allowed, q @ k.T / np.sqrt(D), -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        o[:, head] = (prob / prob.sum(-1, keepdims=True)) @ v
      h = h + mod[2] * (np.einsum("lhd,hde->le", o, w["out"]["kernel"]) + w["out"]["bias"])
      a = _norm(h, eps) * (1 + mod[4]) + mod[3]
      hidden = _gelu(a @ w["mlp"]["fc1"]["kernel"] + w["mlp"]["fc1"]["bias"])
      h = h + mod[5] * (hidden @ w["mlp"]["fc2"]["kernel"] + w["mlp"]["fc2"]["bias"])
    mod = np.einsum("e,enf->nf", silu(c), p["head_adaLN"]["linear"]["kernel"]) + p["head_adaLN"][
        "linear"]["bias"]
    out[b] = (_norm(h, eps) * (1 + mod[1]) + mod[0]) @ p["head"]["kernel"] + p["head"]["bias"]
  return out


def test_forward_matches_a_naive_float64_reference():
  """The float32 model against numpy float64 loops (no float64 model: its attention logits and
  output logits are float32 by design, so it would test nothing more)."""
  x, y = inputs()
  params = random_params(var.Model(CFG), x, y)
  want = naive_forward(CFG, params, x, y)
  got = var.Model(CFG).apply({"params": params}, x, y)
  assert got.dtype == jnp.float32 and np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_parallel_kernels_apply_the_block_causal_mask():
  """The blockwise kernel, and ring and Ulysses attention over a seq=2 mesh, take the mask from
  the scale indices given as positions: the same logits as the dense reference."""
  model = var.Model(CFG)
  x, y = inputs()
  params = random_params(model, x, y)
  want = model.apply({"params": params}, x, y)
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=1, fsdp=1, tensor=1, seq=2, expert=1)), jax.devices()[:2])
  plans = [parallel_attention.Plan("local", "blockwise", 1, 1, 1, 7),
           parallel_attention.Plan("ring", "blockwise", 2, 1, 2, 7, contiguous=True),
           parallel_attention.Plan("ulysses", "blockwise", 2, 2, 1, 7)]
  for plan in plans:
    fn = parallel_attention.attention_fn(plan, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel_sharding.RULES):
      got = jax.jit(lambda p: var.Model(CFG, attention_fn=fn).apply({"params": p}, x, y))(params)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=plan.describe())


# --- Teacher forcing and sampling --------------------------------------------------------------

def random_ids(seed=3):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.integers(0, QCFG.codebook_size, (B, s, s)), jnp.int32) for s in SCALES]


def test_teacher_inputs_match_a_naive_loop():
  q, qparams = quantizer()
  ids = random_ids()
  h = SCALES[-1]
  f_hat, want = np.zeros((B, h, h, QCFG.embed_dim)), []
  for k, s in enumerate(SCALES[1:]):
    f_hat += np.asarray(q.apply({"params": qparams}, k, ids[k], h,
                                method=msvq.Quantizer.scale_features), np.float64)
    pooled = np.zeros((B, s, s, QCFG.embed_dim))
    for i in range(s):  # adaptive average pooling, by its definition
      r0, r1 = (i * h) // s, -(-((i + 1) * h) // s)
      for j in range(s):
        c0, c1 = (j * h) // s, -(-((j + 1) * h) // s)
        pooled[:, i, j] = f_hat[:, r0:r1, c0:c1].mean((1, 2))
    want.append(pooled.reshape(B, s * s, -1))
  got = var.teacher_inputs(q, qparams, ids)
  assert got.shape == (B, CFG.max_len - CFG.first_len, CFG.vae_dim)
  np.testing.assert_allclose(got, np.concatenate(want, 1), atol=1e-5)


@pytest.fixture(scope="module")
def sampler():
  model = var.Model(CFG)
  x, y = inputs()
  q, qparams = quantizer()
  return model, random_params(model, x, y, std=0.3), q, qparams


def test_cached_sampling_equals_uncached_with_guidance_and_top_k(sampler):
  model, params, q, qparams = sampler
  labels, rng = jnp.asarray([1, 4], jnp.int32), jax.random.PRNGKey(5)
  knobs = dict(cfg_scale=2.5, top_k=4, top_p=0.9, temperature=1.0)
  cached = var.sample(model, params, q, qparams, labels, rng, cache=True, **knobs)
  full = var.sample(model, params, q, qparams, labels, rng, cache=False, **knobs)
  assert [i.shape for i in cached] == [(B, s, s) for s in SCALES]
  assert all(i.dtype == jnp.int32 for i in cached)
  for a, b in zip(cached, full):
    np.testing.assert_array_equal(a, b)
  # the sampled ids are the model's own: recomputing the teacher-forcing logits of the whole
  # sequence from them gives every scale's top-4 set the sampled id lies in
  x = var.teacher_inputs(q, qparams, cached)
  cond, uncond = (model.apply({"params": params}, x, y) for y in (labels, jnp.full((B,), 5)))
  logits = np.asarray(var.guide(cond, uncond, 2.5))
  flat = np.concatenate([np.asarray(i).reshape(B, -1) for i in cached], 1)
  rank = (logits > np.take_along_axis(logits, flat[..., None], -1)).sum(-1)
  assert rank.max() < 4
  again = var.sample(model, params, q, qparams, labels, jax.random.PRNGKey(6), **knobs)
  assert any(not np.array_equal(a, b) for a, b in zip(cached, again))


def test_guidance_at_one_is_the_conditional_model(sampler):
  model, params, q, qparams = sampler
  c, u = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
  np.testing.assert_array_equal(var.guide(c, u, 1.0), c)
  labels, rng = jnp.asarray([2, 0], jnp.int32), jax.random.PRNGKey(1)
  guided = var.sample(model, params, q, qparams, labels, rng, cfg_scale=1.0, guidance=True)
  plain = var.sample(model, params, q, qparams, labels, rng, cfg_scale=1.0)
  for a, b in zip(guided, plain):
    np.testing.assert_array_equal(a, b)
  # the conditional half of the doubled batch has the single batch's logits
  y2 = jnp.concatenate([labels, jnp.full((B,), CFG.null_label)])
  one, _ = model.apply({"params": params}, None, labels, var.init_cache(CFG, B), 0,
                       method=var.Model.decode_scale)
  two, _ = model.apply({"params": params}, None, y2, var.init_cache(CFG, 2 * B), 0,
                       method=var.Model.decode_scale)
  np.testing.assert_allclose(two[:B], one, atol=1e-6, rtol=1e-6)
  assert not np.allclose(two[B:], one)


def test_greedy_and_filters_of_choose():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  draw = lambda **kw: np.asarray(var.choose(logits, jax.random.PRNGKey(0), **kw))
  assert set(draw(temperature=0.0, top_k=0, top_p=1.0)) == {0}
  assert set(draw(temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(temperature=1.0, top_k=0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(draw(temperature=1.0, top_k=0, top_p=1.0)) == {0, 1, 2, 3}


# --- Counts and configs ------------------------------------------------------------------------

def test_model_flops_count_only_the_block_causal_pairs():
  """Executed counts all L^2 query-key pairs; the model count the mask's allowed ones."""
  cfg = make_cfg()
  step = lambda executed: counting.Step(B, 0, executed)
  levels = cfg.levels
  allowed = int((levels[None, :] <= levels[:, None]).sum())
  hidden = cfg.max_len ** 2 - allowed
  assert var.flops(cfg, step(True)) - var.flops(cfg, step(False)) == (
      cfg.depth * 4 * cfg.width * hidden)


def test_parameters_have_logical_names_and_remat_keeps_the_tree():
  cfg = make_cfg(remat="full")
  x, y = inputs(cfg)
  boxed = jax.eval_shape(var.Model(cfg).init, jax.random.PRNGKey(0), x, y)
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.Partitioned) and len(a.names) == a.value.ndim
                        for a in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["layers"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", None, "heads", "head_dim")
  assert specs["head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  loss = lambda p: jnp.mean(var.Model(cfg).apply({"params": p}, x, y) ** 2)
  grads = jax.eval_shape(jax.grad(loss), nn.unbox(boxed["params"]))
  assert sum(a.size for a in jax.tree.leaves(grads)) == var.num_params(cfg)


def test_label_dropout_uses_the_null_row():
  model = var.Model(CFG)
  x, y = inputs()
  params = random_params(model, x, y)
  null = model.apply({"params": params}, x, jnp.full((B,), CFG.null_label))
  forced = model.apply({"params": params}, x, y, force_drop_ids_B=jnp.ones((B,), jnp.int32))
  np.testing.assert_array_equal(forced, null)
  dropped = model.apply({"params": params}, x, y, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  assert dropped.shape == null.shape


@pytest.mark.parametrize("bad, message", [
    (dict(scales=(1, 3, 2)), r"must be positive token-map sides in increasing order"),
    (dict(scales=(0, 1)), r"must be positive token-map sides in increasing order"),
    (dict(num_heads=3), r"hidden_size=32 is not divisible by model.num_heads=3"),
    (dict(class_dropout_prob=1.5), r"class_dropout_prob=1.5 must be in \[0, 1\]"),
    (dict(norm_eps=0.0), r"norm_eps=0.0 must be a finite number"),
    (dict(variant="d99"), r"is not a known var variant"),
    (dict(depth=0), r"depth=0 must be positive"),
])
def test_invalid_configs_raise_a_sentence(bad, message):
  with pytest.raises(ValueError, match=message) as err:
    make_cfg(**bad)
  assert not re.search(r"\.\s+[A-Z]", str(err.value)) and str(err.value).endswith(".")


def test_sampling_refuses_what_it_cannot_do(sampler):
  model, params, q, qparams = sampler
  labels, rng = jnp.asarray([1, 2], jnp.int32), jax.random.PRNGKey(0)
  no_null = var.Model(make_cfg(class_dropout_prob=0.0))
  with pytest.raises(ValueError, match="needs the null label"):
    var.sample(no_null, params, q, qparams, labels, rng, cfg_scale=2.0)
  with pytest.raises(ValueError, match="top_p=0.0 in"):
    var.sample(model, params, q, qparams, labels, rng, top_p=0.0)
  other = msvq.Quantizer(msvq.QuantizerConfig(codebook_size=16, embed_dim=3, scales=(1, 2, 4)))
  with pytest.raises(ValueError, match="differ from the model's"):
    var.sample(model, params, other, qparams, labels, rng)
  with pytest.raises(ValueError, match="not max_len=7"):
    var.init_cache(CFG, 2, 7)
