"""Sharded vs single-device: loss, gradients and one optimizer step; shardings follow RULES."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel import mesh as parallel_mesh
from parallel import sharding
from tests.parallel.step_parity import (B, S, assert_matches_reference, axes, reference,
                                        run_one_step, setup)
from train import models
from train import state as state_lib

MESHES = {
    "data8": axes(data=8),
    "data2_fsdp2_tensor2": axes(data=2, fsdp=2, tensor=2),
    "fsdp8": axes(fsdp=8),
}


@functools.lru_cache(maxsize=None)
def sharded(name):
  # Its own sharded initialisation; the whole step, so the AdamW state's sharding is checked.
  return run_one_step(MESHES[name], fresh_init=True, update=True)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(name):
  got = sharded(name)
  assert got["plan"].strategy == "local"
  assert_matches_reference(got, reference(update=True))


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
  mu = got["new_state"].opt_state.inner_state[1][0].mu
  jax.tree.map(lambda p, m: assert_same_spec(p, m), params, mu)


def test_fsdp_shards_every_large_parameter_over_all_devices():
  got = sharded("fsdp8")
  for path, leaf in jax.tree_util.tree_leaves_with_path(got["new_state"].params):
    if leaf.ndim >= 2 and "norm" not in jax.tree_util.keystr(path):
      assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)


def test_fsdp_step_gathers_parameters_and_reduce_scatters_gradients():
  text = sharded("fsdp8")["hlo"]
  assert "all-gather" in text
  assert "reduce-scatter" in text or "all-reduce" in text


def test_batch_sharding_splits_batch_over_data_axes_and_seq_over_seq():
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=1, seq=2, expert=1)))
  rules = sharding.RULES
  assert _equal_specs(sharding.batch_sharding(mesh, rules).spec,
                      P(("data", "fsdp", "expert"), "seq"))
  local = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
  arr = sharding.global_batch(local, mesh, rules)["inputs"]
  assert arr.shape == (8, 4)
  assert arr.addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(arr), local["inputs"])


def test_indivisible_parameter_is_named_before_compiling():
  program = setup(MESHES["fsdp8"])
  config, mesh, rules, tx = program.config, program.mesh, program.rules, program.tx
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
