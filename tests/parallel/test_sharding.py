"""Sharded vs single-device: loss, gradients and one optimizer step; shardings follow RULES."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm
from parallel import mesh as parallel_mesh
from parallel import sharding
from train import models, optimizer, steps
from train import state as state_lib

B, S = 8, 16


def setup(mesh_sizes: dict, devices=None, **parallel):
  config = lm.get_config("size=test")
  config.mesh.update(**mesh_sizes)
  config.parallel.update(**parallel)
  config.train.seq_len = S
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.parallel)
  model, _, plan = models.build(config, mesh)
  tx, lr = optimizer.make(config.opt, total_steps=10)
  init = lambda: state_lib.create(model, tx, (jnp.zeros((B, S), jnp.int32),), config.seed)
  abstract, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  return config, mesh, rules, model, tx, lr, init, shardings, plan


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 259, (B, S + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@functools.lru_cache(maxsize=None)
def reference():
  """Loss, gradients and post-step params on one device (the dense reference)."""
  return run_one_step(dict(data=1, fsdp=1, tensor=1, seq=1, expert=1), jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def sharded(name):
  sizes, parallel = MESHES[name]
  return run_one_step(sizes, **parallel)


def run_one_step(mesh_sizes, devices=None, **parallel):
  config, mesh, rules, model, tx, lr, init, shardings, plan = setup(mesh_sizes, devices, **parallel)
  permutation = plan.permutation(S)
  state = sharding.init_sharded(init, shardings, mesh, rules)
  bs = sharding.batch_sharding(mesh, rules)
  data = {k: jax.device_put(v, bs) for k, v in batch().items()}

  def loss_fn(params, data):
    inputs, targets, positions = steps.reorder(data, permutation)
    loss_sum, count = steps.token_loss(model.apply({"params": params}, inputs, positions),
                                       targets)
    return loss_sum / count

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(shardings.params, bs),
                          out_shardings=(None, shardings.params))(state.params, data)
    step_fn = jax.jit(steps.make_train_step(model, tx, lr, permutation),
                      in_shardings=(shardings, bs),
                      out_shardings=(shardings, None))
    init_params = jax.device_get(state.params)
    new_state, metrics = step_fn(state, data)
  return dict(loss=float(loss), grads=grads, init_params=init_params, new_state=new_state,
              step_loss=float(metrics["loss"]), mesh=mesh, shardings=shardings, plan=plan)


def axes(data=1, fsdp=1, tensor=1, seq=1):
  return dict(data=data, fsdp=fsdp, tensor=tensor, seq=seq, expert=1)


# name -> (mesh sizes, config.parallel overrides). The seq meshes run a whole Llama step with
# each sequence-parallel strategy (test model: 4 heads, 2 KV heads, seq_len 16).
MESHES = {
    "data8": (axes(data=8), {}),
    "data2_fsdp2_tensor2": (axes(data=2, fsdp=2, tensor=2), {}),
    "fsdp8": (axes(fsdp=8), {}),
    "data2_seq4_ulysses": (axes(data=2, seq=4), dict(seq_strategy="ulysses")),
    "fsdp2_seq4_ring": (axes(fsdp=2, seq=4), dict(seq_strategy="ring")),
    "seq8_usp": (axes(seq=8), dict(seq_strategy="usp", usp_ulysses=2)),
    "data2_tensor2_seq2_allgather": (axes(data=2, tensor=2, seq=2), dict(seq_strategy="allgather")),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(name):
  ref, got = reference(), sharded(name)
  assert got["plan"].strategy == (MESHES[name][1].get("seq_strategy") or "local")
  # Sharded initialisation draws the same numbers as the single-device one (partitionable PRNG).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref["init_params"],
               got["init_params"])
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["step_loss"], ref["step_loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(got["grads"]), jax.device_get(ref["grads"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(got["new_state"].params), jax.device_get(ref["new_state"].params))


def _spec(x):
  return x.sharding.spec


def test_parameters_are_sharded_as_the_rule_table_says():
  got = sharded("data2_fsdp2_tensor2")
  params = got["new_state"].params
  L, E, H, K, D, M, V = 2, 64, 4, 2, 16, 128, 384
  expected = {
      ("embed", "embedding"): (P("tensor", "fsdp"), (V // 2, E // 2)),
      ("layers", "q", "kernel"): (P(None, "fsdp", "tensor", None), (L, E // 2, H // 2, D)),
      ("layers", "k", "kernel"): (P(None, "fsdp", "tensor", None), (L, E // 2, K // 2, D)),
      ("layers", "o", "kernel"): (P(None, "tensor", None, "fsdp"), (L, H // 2, D, E // 2)),
      ("layers", "gate", "kernel"): (P(None, "fsdp", "tensor"), (L, E // 2, M // 2)),
      ("layers", "down", "kernel"): (P(None, "tensor", "fsdp"), (L, M // 2, E // 2)),
      ("layers", "attn_norm", "scale"): (P(None, None), (L, E)),
      ("lm_head", "kernel"): (P("fsdp", "tensor"), (E // 2, V // 2)),
  }
  for path, (spec, shard_shape) in expected.items():
    leaf = functools.reduce(lambda d, k: d[k], path, params)
    assert _equal_specs(_spec(leaf), spec), (path, _spec(leaf), spec)
    assert leaf.addressable_shards[0].data.shape == shard_shape, path
  # AdamW moments are sharded exactly like their parameters (FSDP shards optimizer state too).
  mu = got["new_state"].opt_state[1][0].mu
  jax.tree.map(lambda p, m: assert_same_spec(p, m), params, mu)


def test_fsdp_shards_every_large_parameter_over_all_devices():
  got = sharded("fsdp8")
  for path, leaf in jax.tree_util.tree_leaves_with_path(got["new_state"].params):
    if leaf.ndim >= 2 and "norm" not in jax.tree_util.keystr(path):
      assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)


def test_fsdp_step_gathers_parameters_and_reduce_scatters_gradients():
  config, mesh, rules, model, tx, lr, init, shardings, _ = setup(MESHES["fsdp8"][0])
  bs = sharding.batch_sharding(mesh, rules)
  abstract_batch = {k: jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=bs)
                    for k in ("inputs", "targets")}
  abstract_state = sharding.abstract_and_shardings(init, mesh, rules)[0]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = jax.jit(steps.make_train_step(model, tx, lr), in_shardings=(shardings, bs),
                  out_shardings=(shardings, None)).lower(abstract_state, abstract_batch)
    text = hlo.compile().as_text()
  assert "all-gather" in text
  assert "reduce-scatter" in text or "all-reduce" in text


def test_batch_sharding_splits_batch_over_data_axes_and_seq_over_seq():
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=1, seq=2, expert=1)))
  rules = sharding.RULES
  assert _equal_specs(sharding.batch_sharding(mesh, rules).spec, P(("data", "fsdp"), "seq"))
  local = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
  arr = sharding.global_batch(local, mesh, rules)["inputs"]
  assert arr.shape == (8, 4)
  assert arr.addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(arr), local["inputs"])


def test_indivisible_parameter_is_named_before_compiling():
  config, mesh, rules, model, tx, lr, init, shardings, _ = setup(MESHES["fsdp8"][0])
  config.model.update(d_model=36, num_heads=2, num_kv_heads=2)  # 36 % 8 != 0
  model, _, _ = models.build(config, mesh)
  bad_init = lambda: state_lib.create(model, tx, (jnp.zeros((B, S), jnp.int32),), 0)
  with pytest.raises(ValueError, match=r"has size 36 in dimension .* cannot split evenly"):
    sharding.abstract_and_shardings(bad_init, mesh, rules)


def assert_same_spec(p, m):
  assert _equal_specs(_spec(p), _spec(m)), (_spec(p), _spec(m))


def _equal_specs(a, b):
  norm = lambda spec: tuple(None if x is None else (x if isinstance(x, tuple) else (x,))
                            for x in spec)
  na, nb = norm(a), norm(b)
  width = max(len(na), len(nb))
  return na + (None,) * (width - len(na)) == nb + (None,) * (width - len(nb))
