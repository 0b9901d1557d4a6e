"""nets/mamba.py: scan vs a numpy recurrence, chunking, generation mode, causality, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import mamba, ssm
from parallel import mesh as parallel_mesh
from parallel import sharding
from tests.nets import assert_causal_by_jacobian

B, S = 4, 12  # B = data × fsdp of the test mesh
# Compiling without LLVM optimisation takes about half the time on CPU for these tiny graphs; the
# HLO passes (fusion, SPMD partitioning) still run.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make_cfg(**kw):
  base = dict(vocab_size=32, num_layers=2, d_model=16, d_state=4)
  return mamba.Config(**{**base, **kw})


def scan_inputs(seed=0, Bsz=2, S=12, I=3, N=4):
  """Random float32 (u, Δ, A, B, C, D, h0); A < 0 and Δ > 0 as in the model."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  dt = rng.uniform(0.05, 1.0, (Bsz, S, I)).astype(np.float32)
  A = -rng.uniform(0.5, 2.0, (I, N)).astype(np.float32)
  return f(Bsz, S, I), dt, A, f(Bsz, S, N), f(Bsz, S, N), f(I), f(Bsz, I, N)


@pytest.mark.parametrize("impl", ["associative", "sequential"])
def test_scan_matches_sequential_numpy_recurrence(impl):
  u, dt, A, Bm, Cm, D, h0 = scan_inputs(S=7)
  keep = np.ones((2, 7), np.float32)
  keep[1, 4] = 0.0  # a new segment starts at step 4 of the second row
  y, h_last = jit(functools.partial(ssm.selective_scan, impl=impl))(
      u, dt, A, Bm, Cm, D, h0_BxIxN=h0, keep_BxS=keep)
  h = h0.astype(np.float64)
  ref = np.zeros(u.shape)
  for t in range(u.shape[1]):
    a = np.exp(dt[:, t, :, None] * A) * keep[:, t, None, None]
    h = a * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
    ref[:, t] = (h * Cm[:, t, None, :]).sum(-1) + D * u[:, t]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h, rtol=1e-5, atol=1e-5)


def test_causal_conv_matches_numpy():
  rng = np.random.default_rng(1)
  u, w, b, prev = (rng.standard_normal(s).astype(np.float32)
                   for s in ((2, 6, 3), (4, 3), (3,), (2, 3, 3)))
  out, last = jit(ssm.causal_conv)(u, w, b, prev)
  full = np.concatenate([prev, u], axis=1)
  ref = b + np.stack([sum(w[k] * full[:, t + k] for k in range(4)) for t in range(6)], axis=1)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(last, u[:, -3:])


def test_chunked_scan_equals_unchunked_forward_and_gradients():
  """Chunks of 5 do not divide S = 12, so identity steps pad the last chunk (the sharded model
  test below runs the same chunking inside the model)."""
  def loss(inputs, chunk, impl="associative"):
    u, dt, A, Bm, Cm, D, h0 = inputs
    y, h_last = ssm.selective_scan(u, dt, A, Bm, Cm, D, h0_BxIxN=h0, chunk=chunk, impl=impl)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h_last ** 2), (y, h_last)

  # Also the sequential scan (CPU's "auto" choice), whole and chunked, against the same numbers.
  grads = jit(lambda inputs: [jax.grad(loss, has_aux=True)(inputs, c, i)
                              for c, i in ((0, "associative"), (5, "associative"),
                                           (0, "sequential"), (5, "sequential"))])
  (g0, (y0, h0)), *chunked = grads(scan_inputs())
  for g1, (y1, h1) in chunked:
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):  # d/d u, Δ, A, B, C, D, h0
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def ce_loss(model, params, tokens_BxS1):
  """Mean next-token cross-entropy of tokens[:, :-1] -> tokens[:, 1:]."""
  logits = model.apply({"params": params}, tokens_BxS1[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens_BxS1[:, 1:, None], axis=-1))


def sharded_and_reference(model, ref_model, tokens_BxS1, host_init=False):
  """Loss and gradients of ``model`` initialised and run on a data=2, fsdp=2, tensor=2 mesh, and
  of ``ref_model`` on one device with the same parameters (which come back as numpy).

  ``host_init`` draws every parameter from N(0, 0.3²) in numpy and places it in its sharding
  instead of compiling the model's initialisers (parity does not depend on the values).
  """
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=2, seq=1, expert=1)))
  rules = sharding.RULES
  init = lambda: model.init(jax.random.PRNGKey(0), tokens_BxS1[:, :-1])["params"]
  structs, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  tokens = jax.device_put(tokens_BxS1, sharding.batch_sharding(mesh, rules))
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if host_init:
      params = jax.tree.map(lambda a: jax.device_put(
          rng.normal(0.0, 0.3, a.shape).astype(a.dtype), a.sharding), structs)
    else:  # sharding.init_sharded, with the quicker compile
      params = jit(lambda: nn.unbox(init()), out_shardings=shardings)()
    loss, grads = jit(jax.value_and_grad(functools.partial(ce_loss, model)),
                      out_shardings=(None, shardings))(params, tokens)
  specs = jax.tree.map(lambda x: x.sharding.spec, params)
  params = jax.device_get(params)
  ref_loss, ref_grads = jit(jax.value_and_grad(functools.partial(ce_loss, ref_model)))(
      params, tokens_BxS1)
  return dict(params=params, specs=specs, loss=loss, grads=jax.device_get(grads),
              ref_loss=ref_loss, ref_grads=jax.device_get(ref_grads))


def assert_same_loss_and_grads(run):
  np.testing.assert_allclose(run["loss"], run["ref_loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               run["grads"], run["ref_grads"])


@pytest.fixture(scope="module")
def sharded_run():
  """The sharded run uses the chunked scan and full remat; the single-device reference neither."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, S + 1), 0, 32)
  return sharded_and_reference(mamba.Model(make_cfg(scan_chunk=5, remat="full")),
                               mamba.Model(make_cfg()), tokens)


@pytest.fixture(scope="module")
def params(sharded_run):
  """Initialised parameters (init does not depend on the mesh), reused to save compiles."""
  return sharded_run["params"]


def test_sharded_loss_and_gradients_equal_single_device(sharded_run):
  P = jax.sharding.PartitionSpec
  specs = sharded_run["specs"]
  assert specs["layers"]["in_proj"]["kernel"] == P(None, "fsdp", None, "tensor")
  assert specs["layers"]["A_log"] == P(None, "tensor", None)
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert_same_loss_and_grads(sharded_run)


@jit
def forward_with_segments(params, tokens_2x10, segment_ids_2x10):
  """One compiled parallel forward shared by the generation and segment tests."""
  return mamba.Model(make_cfg()).apply({"params": params}, tokens_2x10, None, segment_ids_2x10)


def test_generation_mode_matches_parallel_forward(params):
  """Token-by-token decoding, and a prefill followed by decoding, give the parallel logits."""
  model = mamba.Model(make_cfg())
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, 32)
  full = forward_with_segments(params, tokens, jnp.ones_like(tokens))  # one segment per row
  step = jit(functools.partial(model.apply, method=mamba.Model.decode_step))
  cache, stepped = model.init_cache(2), []
  for t in range(tokens.shape[1]):
    logits, cache = step({"params": params}, tokens[:, t], cache)
    stepped.append(logits)
  np.testing.assert_allclose(np.stack(stepped, axis=1), full, rtol=1e-5, atol=1e-5)

  prefill_logits, cache = jit(model.apply)({"params": params}, tokens[:, :6],
                                           cache=model.init_cache(2))
  np.testing.assert_allclose(prefill_logits, full[:, :6], rtol=1e-5, atol=1e-5)
  for t in range(6, tokens.shape[1]):
    logits, cache = step({"params": params}, tokens[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_causal_by_gradient(params):
  """d logits[t] / d input[t'] is exactly zero for t' > t and non-zero for t' <= t."""
  cfg = make_cfg()
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 8), 0, 32)
  assert_causal_by_jacobian(mamba.Model(cfg), params, tokens, cfg.d_model)


def test_segment_ids_restart_the_state(params):
  """A document packed after another gets the logits it gets at the start of a row."""
  doc1, doc2, doc3 = (jax.random.randint(jax.random.PRNGKey(4 + i), (1, n), 0, 32)
                      for i, n in enumerate((4, 6, 4)))
  tokens = jnp.concatenate([jnp.concatenate([doc1, doc2], 1), jnp.concatenate([doc2, doc3], 1)])
  segments = jnp.array([[1] * 4 + [2] * 6, [2] * 6 + [3] * 4])
  logits = forward_with_segments(params, tokens, segments)
  np.testing.assert_allclose(logits[0, 4:], logits[1, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[0, :4], logits[1, :4])


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_and_logical_names(tie):
  cfg = make_cfg(tie_embeddings=tie, num_layers=3, dt_rank=3)
  boxed = jax.eval_shape(mamba.Model(cfg).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  assert sum(x.value.size for x in leaves) == mamba.num_params(cfg)
  assert ("lm_head" in boxed) == (not tie)
  specs = nn.get_partition_spec(boxed)
  assert specs["layers"]["out_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "mlp", "embed")
  assert boxed["layers"]["dt_kernel"].value.shape == (3, 3, 32)


def test_initial_dt_and_A(params):
  """softplus(dt_bias) lies in [dt_min, dt_max]; A_log = log(1..N) for every channel (S4D-real)."""
  cfg, layers = make_cfg(), params["layers"]
  dt = jax.nn.softplus(layers["dt_bias"])
  assert np.all(dt >= cfg.dt_min * (1 - 1e-5)) and np.all(dt <= cfg.dt_max * (1 + 1e-5))
  assert np.std(np.log(dt)) > 0.5  # spread over the log range, not one value
  np.testing.assert_allclose(np.exp(layers["A_log"]), np.broadcast_to(np.arange(1, 5), (2, 32, 4)),
                             rtol=1e-6)
  np.testing.assert_array_equal(layers["D"], 1.0)


@pytest.mark.parametrize("bad, message", [
    (dict(d_state=0), "model.d_state=0 must be positive"),
    (dict(scan_chunk=-1), "model.scan_chunk=-1 must be >= 0"),
    (dict(dt_min=0.2), "must satisfy 0 < dt_min <= dt_max"),
    (dict(remat="sometimes"), "is not one of"),
    (dict(dtype="float33"), "is not a dtype name"),
])
def test_invalid_hyperparameters_raise_a_sentence(bad, message):
  with pytest.raises(ValueError, match=message):
    make_cfg(**bad).validate()


def test_from_config_rejects_unknown_fields():
  model_cfg = ml_collections.ConfigDict(dict(name="mamba", vocab_size=32, num_layers=1,
                                             d_model=16, num_heads=4))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_heads'\] for model 'mamba'"):
    mamba.Config.from_config(model_cfg)
