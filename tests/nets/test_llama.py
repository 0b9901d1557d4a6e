"""nets/llama.py: shapes, causality by gradient, GQA, parameter count, remat, attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import attention, llama
from tests.nets import assert_causal_by_jacobian


def make_cfg(**kw):
  base = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
              max_len=64)
  return llama.Config(**{**base, **kw})


def init(cfg, B=2, S=12, seed=0):
  model = llama.Model(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (B, S), 0, cfg.vocab_size)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])
  return model, params, tokens


def test_output_shape_and_dtype():
  cfg = make_cfg()
  model, params, tokens = init(cfg, B=3, S=10)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 10, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_layers_are_stacked_by_scan():
  cfg = make_cfg(num_layers=3)
  _, params, _ = init(cfg)
  assert params["layers"]["q"]["kernel"].shape == (3, 32, 4, 8)
  assert params["layers"]["k"]["kernel"].shape == (3, 32, 2, 8)


def test_causal_by_gradient():
  """d logits[t] / d input[t'] is exactly zero for t' > t and non-zero for t' <= t."""
  cfg = make_cfg()
  model, params, tokens = init(cfg, B=1, S=8)
  assert_causal_by_jacobian(model, params, tokens, cfg.d_model)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads):
  """GQA with K kv-heads is MHA whose K/V projections repeat each kv head H/K times."""
  cfg = make_cfg(num_kv_heads=num_kv_heads)
  model, params, tokens = init(cfg)
  gqa = model.apply({"params": params}, tokens)
  mha_cfg = make_cfg(num_kv_heads=cfg.num_heads)
  rep = cfg.num_heads // num_kv_heads
  mha_params = jax.tree.map(lambda x: x, params)
  for name in ("k", "v"):
    mha_params["layers"][name]["kernel"] = jnp.repeat(params["layers"][name]["kernel"], rep,
                                                      axis=2)
  mha = llama.Model(mha_cfg).apply({"params": mha_params}, tokens)
  np.testing.assert_allclose(gqa, mha, rtol=1e-5, atol=1e-5)
  assert params["layers"]["k"]["kernel"].shape[2] == num_kv_heads


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_formula(tie):
  cfg = make_cfg(tie_embeddings=tie, num_layers=3)
  _, params, _ = init(cfg)
  counted = sum(x.size for x in jax.tree.leaves(params))
  assert counted == llama.num_params(cfg)
  assert ("lm_head" in params) == (not tie)


def test_every_parameter_has_logical_names():
  cfg = make_cfg()
  boxed = jax.eval_shape(llama.Model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["layers"]["q"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "head_dim")
  assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_remat_changes_nothing_numerically():
  cfg = make_cfg()
  model, params, tokens = init(cfg)
  remat_model = llama.Model(make_cfg(remat="full"))
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
  l0, g0 = jax.value_and_grad(loss(model))(params)
  l1, g1 = jax.value_and_grad(loss(remat_model))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_dense_attention_matches_naive_numpy():
  rng = np.random.default_rng(0)
  B, S, H, K, D = 2, 6, 4, 2, 8
  q, k, v = (rng.standard_normal((B, S, n, D)).astype(np.float32) for n in (H, K, K))
  seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  out = attention.dot_product_attention(q, k, v, causal=True, segment_ids_BxS=seg)
  ref = np.zeros((B, S, H, D), np.float32)
  for b in range(B):
    for h in range(H):
      kh = h // (H // K)
      for s in range(S):
        allowed = [t for t in range(S) if t <= s and seg[b, t] == seg[b, s]]
        logits = np.array([q[b, s, h] @ k[b, t, kh] / np.sqrt(D) for t in allowed])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        ref[b, s, h] = sum(wi * v[b, t, kh] for wi, t in zip(w, allowed))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=4, num_kv_heads=3), "must be a positive multiple of model.num_kv_heads"),
    (dict(d_model=30), "not divisible by model.num_heads"),
    (dict(remat="sometimes"), "is not one of"),
    (dict(dtype="float33"), "is not a dtype name"),
])
def test_invalid_hyperparameters_raise_a_sentence(bad, message):
  with pytest.raises(ValueError, match=message):
    make_cfg(**bad).validate()
