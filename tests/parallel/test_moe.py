"""Expert parallelism: MoE train steps on expert (x data / fsdp / tensor) meshes equal the
single-device step (loss and gradients), and experts really move by all-to-all."""

import functools

import jax
import pytest

from configs import lm
from parallel import sharding
from tests.parallel.step_parity import assert_matches_reference, axes, reference, run_one_step
from train import validate

CASES = {
    # kind, mesh sizes, device count
    "lm_moe-expert4": ("lm_moe", axes(expert=4), 4),
    "lm_moe-expert2-data4": ("lm_moe", axes(data=4, expert=2), 8),
    "lm_moe-expert2-fsdp2-data2": ("lm_moe", axes(data=2, fsdp=2, expert=2), 8),
    "lm_moe_capacity-expert4-data2": ("lm_moe_capacity", axes(data=2, expert=4), 8),
    "dit_moe-expert2-tensor2-data2": ("dit_moe", axes(data=2, tensor=2, expert=2), 8),
}


@functools.lru_cache(maxsize=None)
def sharded(name):
  kind, sizes, n = CASES[name]
  return run_one_step(sizes, jax.devices()[:n], kind=kind)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_step_equals_single_device(name):
  got = sharded(name)
  assert_matches_reference(got, reference(CASES[name][0]))
  assert "all-to-all" in got["hlo"]


def test_experts_are_sharded_over_the_expert_axis():
  got = sharded("lm_moe-expert2-fsdp2-data2")
  specs = {jax.tree_util.keystr(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(got["shardings"].params)}
  gate = next(v for k, v in specs.items() if "experts_gate" in k)
  assert tuple(gate)[:3] == (None, "expert", "fsdp"), gate  # [layers, experts, embed, mlp]
  # Each device holds 8/2 experts' weights, a quarter of each (expert x fsdp).
  leaf = next(v for p, v in jax.tree_util.tree_leaves_with_path(got["state"].params)
              if "experts_gate" in jax.tree_util.keystr(p))
  assert leaf.addressable_shards[0].data.shape == (2, 4, 32, 128)


def moe_config(**mesh):
  c = lm.get_config("size=test")
  c.model.moe.update(num_experts=4, top_k=2)
  c.mesh.update(**{"data": 1, "fsdp": 1, "tensor": 1, "seq": 1, "expert": 1, **mesh})
  c.train.update(batch_size=8, seq_len=16)
  c.eval.batch_size = 8
  return c


@pytest.mark.parametrize("change,message", [
    (dict(mesh=dict(expert=8)), "num_experts=4 is not divisible by mesh.expert=8"),
    (dict(moe=dict(num_experts=0), mesh=dict(expert=2, data=4)), "needs MoE layers"),
    (dict(moe=dict(groups=3), mesh=dict(data=8)), "groups=3 is not a multiple"),
    (dict(moe=dict(groups=16), mesh=dict(data=8)), "train.batch_size=8 is not divisible by the "
                                                    "16 MoE dispatch groups"),
    (dict(moe=dict(expert_dim=31), mesh=dict(tensor=2, data=4)), "expert width 31"),
    (dict(moe=dict(every=3), mesh=dict(data=8)), "not a multiple of model.moe.every=3"),
])
def test_moe_config_errors_are_one_sentence(change, message):
  c = moe_config(**change.get("mesh", {}))
  c.model.moe.update(**change.get("moe", {}))
  with pytest.raises(ValueError, match=message):
    validate.validate(c, num_devices=8)


def test_data_parallel_size_includes_expert_axis():
  assert sharding.data_parallel_size(dict(data=2, fsdp=2, expert=2, tensor=4, seq=8),
                                    sharding.RULES) == 8
  c = moe_config(data=2, expert=4)
  c.train.batch_size = 4
  with pytest.raises(ValueError, match=r"mesh.data\*mesh.fsdp\*mesh.expert=8"):
    validate.validate(c, num_devices=8)
