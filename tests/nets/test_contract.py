"""The family contract (nets/registry.py): every registered family, checked the same way.

Each family's ``test_config`` is a tiny but matmul-dominated model, so its forward FLOP formula
can be held to XLA's cost analysis as tests/train/test_flops.py holds the training steps. A new
family is covered by adding its module; nothing here names a family.
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import attention, counting, moe, registry
from tests.train.test_flops import TOLERANCE, loop_free_flops, unroll_scans

FAMILIES = list(registry.families())
SHARED = ("width", "depth", "num_heads", "mlp_width", "max_len", "dtype")
B = 2


def _build(name):
  family = registry.get(name)
  cfg = family.Config.from_config(ml_collections.ConfigDict({"name": name,
                                                             **family.test_config}))
  return family, cfg


def _seq_len(family, cfg) -> int:
  """An LM length: about 32 tokens, whole multiples of what the family needs."""
  m = family.length_multiple(cfg)
  return min(-(-32 // m) * m, cfg.max_len)


def _inputs(family, cfg):
  """Positional model inputs of the family's task, and the expected output shape."""
  rng = np.random.default_rng(0)
  if family.task == "lm":
    S = _seq_len(family, cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
    return (tokens,), (B, S, cfg.vocab_size)
  if family.task == "var":  # teacher-forcing features of every token after the first scale
    x = rng.standard_normal((B, cfg.max_len - cfg.first_len, cfg.vae_dim))
    return (jnp.asarray(x, jnp.float32), jnp.asarray([1, 0], jnp.int32)), (
        B, cfg.max_len, cfg.codebook_size)
  images = jnp.asarray(rng.standard_normal((B, cfg.image_size, cfg.image_size, cfg.channels)),
                       jnp.float32)
  if family.task == "classification":
    return (images,), (B, cfg.num_classes)
  if family.task in ("autoencoder", "vqvae"):  # (reconstruction, ...): the first is checked
    return (images,), (B, cfg.image_size, cfg.image_size, cfg.out_channels)
  t, y = jnp.asarray([3.0, 500.0]), jnp.asarray([1, 0], jnp.int32)
  shape = (B, cfg.image_size, cfg.image_size, cfg.out_channels)
  if family.conditioning == "text":  # byte-token captions, the second one padded
    ids = jnp.asarray(rng.integers(3, 259, (B, cfg.text_len)), jnp.int32)
    mask = jnp.arange(cfg.text_len)[None] < jnp.asarray([[cfg.text_len], [cfg.text_len // 2]])
    return (images, t, jnp.where(mask, ids, 0), mask), shape
  return (images, t, y), shape


def _init(model, inputs):
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"])


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
  family, cfg = _build(request.param)
  model = family.Model(cfg)
  inputs, shape = _inputs(family, cfg)
  return family, cfg, model, inputs, shape, _init(model, inputs)


def test_registry_names_and_unknown_name():
  assert FAMILIES and all(registry.get(n).name == n for n in FAMILIES)
  with pytest.raises(ValueError, match="is not a known model; known models"):
    registry.get("no_such_family")


def test_config_shares_the_concept_names(built):
  family, cfg, *_ = built
  names = SHARED + (("image_size", "channels") if family.task != "lm" else ())
  for name in names:
    getattr(cfg, name)  # an AttributeError names the missing shared concept
  assert cfg.max_len > 0 and jnp.dtype(cfg.dtype)


def test_forward_shape_and_dtype(built):
  family, _, model, inputs, shape, params = built
  out = jax.jit(model.apply)({"params": params}, *inputs)
  if family.task in ("autoencoder", "vqvae"):
    out = out[0]
  assert out.shape == shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_num_params_counts_the_initialised_tree(built):
  family, cfg, *_, params = built
  assert family.num_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
  assert family.num_params(cfg, active=True) <= family.num_params(cfg)


def test_forward_flops_match_xla(built, monkeypatch):
  """The executed forward count against XLA's, every nn.scan unrolled (see test_flops.py)."""
  family, cfg, model, inputs, _, params = built
  unroll_scans(monkeypatch)
  forward = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs))
  got = loop_free_flops(forward.lower(params, *inputs).compile())
  lm = family.task == "lm"
  S = inputs[0].shape[1] if lm else 0
  counted = family.flops(cfg, counting.Step(B, S, executed=True)) * (B * S if lm else B)
  assert 1.0 <= got / counted < 1.0 + TOLERANCE, (
      f"{family.name}: XLA {got:.4g} vs formula {counted:.4g} ({100 * (got / counted - 1):+.2f}%)")


def test_attention_length_is_what_attention_sees(built):
  """A sequence-parallel family's attention_length is the shortest sequence its attention
  function is called with (what mesh.seq must split)."""
  family, cfg, _, inputs, *_ = built
  if not family.sequence_parallel:
    pytest.skip("no sequence parallelism: mesh.seq stays 1")
  seen = []

  def recording(q_BxSxHxD, *args, **kwargs):
    seen.append(q_BxSxHxD.shape[1])
    return attention.dot_product_attention(q_BxSxHxD, *args, **kwargs)

  jax.eval_shape(lambda: family.Model(cfg, attention_fn=recording).init(
      jax.random.PRNGKey(0), *inputs))
  S = inputs[0].shape[1] if family.task == "lm" else 0
  assert min(seen) == family.attention_length(cfg, S)


def test_expert_parallel_families_take_a_moe_layout(built):
  family, cfg, _, inputs, _, params = built
  if not family.expert_parallel:
    assert family.moe_config(cfg) is None
    return
  assert isinstance(family.moe_config(cfg), moe.Config)
  model = family.Model(cfg, moe_layout=moe.Layout())
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *inputs)["params"]))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)


def test_decode_cache_continues_the_full_forward(built):
  """A family with a decode cache: prefill all but the last token, decode that one; its logits
  equal the full forward's last ones."""
  family, cfg, model, inputs, _, params = built
  if not family.decodes_with_cache:
    pytest.skip("no decode cache: sampling reruns the whole buffer")
  if family.task == "var":  # scale by scale: every scale's logits equal the full forward's
    x, y = inputs
    want = model.apply({"params": params}, x, y)
    cache, first = family.init_cache(cfg, B, cfg.max_len), cfg.first_len
    for k, (start, end) in enumerate(zip(cfg.offsets, cfg.offsets[1:])):
      x_k = x[:, start - first:end - first] if k else None
      got, cache = model.apply({"params": params}, x_k, y, cache, k, method="decode_scale")
      np.testing.assert_allclose(got, want[:, start:end], atol=1e-4, rtol=1e-4)
    return
  tokens = inputs[0]
  S = tokens.shape[1]
  want = model.apply({"params": params}, tokens)[:, -1]
  cache = family.init_cache(cfg, B, S)
  _, cache = model.apply({"params": params}, tokens[:, :-1], None, None, cache)
  last = jnp.full((B, 1), S - 1, jnp.int32)
  got, _ = model.apply({"params": params}, tokens[:, -1:], last, None, cache)
  np.testing.assert_allclose(got[:, 0], want, atol=1e-4, rtol=1e-4)


def test_converter_module_exists(built):
  family = built[0]
  if family.converter is None:
    pytest.skip("no Hugging Face converter")
  module = importlib.import_module(f"nets.convert.{family.converter}")
  assert callable(module.from_hf) and callable(module.to_hf)
