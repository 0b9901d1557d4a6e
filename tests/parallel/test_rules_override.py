"""A config.parallel.rules override reaches the explicit collectives and the validation.

The sequence-parallel kernel's shard_map and all-to-all / ring axis, the expert dispatch's token
spec, and the data-parallel size and divisibility checks all follow the active rule table: an
override moves them, and the numerics still equal the dense single-device reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import lm
from parallel import attention, sharding
from parallel import mesh as parallel_mesh
from tests.parallel import test_seq_parallel as seq_tests
from tests.parallel.step_parity import (assert_matches_reference, axes, make_config, reference,
                                        run_one_step)
from train import models, tasks, validate

SEQ_MESH = dict(data=2, fsdp=1, tensor=1, seq=4, expert=1)
# The sequence moves to the data axis and the batch to the seq axis.
SEQ_OVERRIDE = (("act_seq", "data"), ("act_batch", "seq"))
MOE_KIND, MOE_MESH = "lm_moe_capacity", axes(data=2, expert=4)
# Tokens split over data only (replicated over expert); the experts stay on the expert axis.
MOE_OVERRIDE = (("act_batch", ("data",)),)


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _traced(fn, *args):
  """(in_specs of every shard_map, {collective: axis names}) in the jaxpr of fn(*args)."""
  specs, axes_of = [], {}
  for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "shard_map":
      specs.append(eqn.params["in_specs"])
    elif eqn.primitive.name in ("all_to_all", "ppermute"):
      axes_of.setdefault(eqn.primitive.name, set()).add(
          sharding.entry_axes(eqn.params["axis_name"]))
  return specs, axes_of


def _attention(strategy, rules):
  cfg = seq_tests.parallel_cfg(strategy)
  cfg.rules = rules
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(SEQ_MESH))
  plan = attention.make_plan(cfg, SEQ_MESH, num_heads=seq_tests.H, num_kv_heads=2,
                             seq_len=seq_tests.N)
  return plan, attention.attention_fn(plan, mesh), mesh


@pytest.mark.parametrize("strategy, collective", [("ulysses", "all_to_all"),
                                                  ("ring", "ppermute")])
def test_sequence_parallel_kernel_follows_the_rules(strategy, collective):
  q, k, v, w, seg = seq_tests.inputs(2)
  want = {(): (P(("data", "fsdp", "expert"), "seq", "tensor", None), "seq", 4),
          SEQ_OVERRIDE: (P("seq", "data", "tensor", None), "data", 2)}
  for rules, (qkv_spec, axis, degree) in want.items():
    plan, fn, mesh = _attention(strategy, rules)
    assert plan.seq == degree
    with jax.set_mesh(mesh):
      specs, axes_of = _traced(lambda q, k, v: fn(q, k, v, causal=True), q, k, v)
    assert specs and all(s[:3] == (qkv_spec,) * 3 for s in specs), specs
    assert axes_of[collective] == {(axis,)}, axes_of

  # Under the override: forward and gradients equal the dense reference.
  plan, fn, mesh = _attention(strategy, SEQ_OVERRIDE)
  spec = sharding.spec(attention.QKV_NAMES, plan.rules)
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
  positions = np.broadcast_to(np.arange(seq_tests.N, dtype=np.int32), (seq_tests.B, seq_tests.N))

  def loss(q, k, v, w, positions, seg):
    o = fn(q, k, v, causal=True, positions_BxS=positions, segment_ids_BxS=seg)
    return jnp.sum(o * w), o

  with jax.set_mesh(mesh):
    seq_spec = P(*spec[:2])
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        put(q, spec), put(k, spec), put(v, spec), put(w, spec), put(positions, seq_spec),
        put(seg, seq_spec))
  seq_tests.check((np.asarray(o), [np.asarray(g) for g in grads]),
                  seq_tests.reference(2, True, True))


def _dispatch_specs(rules):
  """The in_specs of the expert dispatch's shard_map when the MoE LM is initialised."""
  config = make_config(MOE_KIND)
  config.mesh.update(**MOE_MESH)
  config.parallel.rules = rules
  mesh = parallel_mesh.make_mesh(config.mesh)
  model, _, _ = models.build(config, mesh)
  task = tasks.get(config)
  args = task.init_args(task.example_batch(8))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.parallel)):
    specs, axes_of = _traced(lambda: model.init(jax.random.key(0), *args))
  return specs, axes_of


def test_expert_dispatch_follows_the_rules():
  default, override = _dispatch_specs(()), _dispatch_specs(MOE_OVERRIDE)
  for (specs, axes_of), batch in ((default, ("data", "fsdp", "expert")), (override, ("data",))):
    assert specs, "no expert dispatch shard_map was traced"
    for s in specs:  # flattened: x, idx, gates [groups, seq chunks, T, ...], then down, gate, up
      assert s[:3] == (P(batch, None, None, None),) * 3, s
      assert s[3] == P("expert", "tensor", None), s  # the experts stay on the expert axis
    assert axes_of["all_to_all"] == {("expert",)}

  got = run_one_step(MOE_MESH, jax.devices()[:8], kind=MOE_KIND, rules=MOE_OVERRIDE)
  assert_matches_reference(got, reference(MOE_KIND))
  assert "all-to-all" in got["hlo"]


def _config(**mesh):
  c = lm.get_config("size=test")
  c.mesh.update(**{**axes(), **mesh})
  c.train.update(batch_size=8, seq_len=32)
  c.eval.update(batch_size=8)
  return c


def test_divisibility_checks_follow_the_rules():
  c = _config(data=4, fsdp=2)
  validate.validate(c, num_devices=8)  # vocab 384 over tensor=1 by default
  c.model.vocab_size = 260
  c.parallel.rules = (("vocab", ("data", "fsdp")),)
  with pytest.raises(ValueError, match=r"model.vocab_size=260 is not divisible by "
                                       r"mesh.data\*mesh.fsdp=8; use a mesh.data\*mesh.fsdp"):
    validate.validate(c, num_devices=8)
  c = _config(data=2, fsdp=4)
  c.parallel.rules = (("kv_heads", "fsdp"),)  # the test model has 2 KV heads
  with pytest.raises(ValueError, match=r"model.num_kv_heads=2 is not divisible by mesh.fsdp=4 "
                                       r"\(grouped-query KV heads are sharded over fsdp"):
    validate.validate(c, num_devices=8)


def test_data_parallel_size_follows_the_rules():
  sizes = axes(data=2, fsdp=4)
  assert sharding.data_parallel_size(sizes, sharding.RULES) == 8
  rules = sharding.rules_from_config(ml_collections.ConfigDict(dict(rules=MOE_OVERRIDE)))
  assert sharding.data_parallel_size(sizes, rules) == 2
  c = _config(data=2, fsdp=4)
  c.train.batch_size = c.eval.batch_size = 6
  with pytest.raises(ValueError, match=r"data-parallel size mesh.data\*mesh.fsdp\*mesh.expert=8"):
    validate.validate(c, num_devices=8)
  c.parallel.rules = MOE_OVERRIDE
  c.train.batch_size = c.eval.batch_size = 3
  with pytest.raises(ValueError, match=r"train.batch_size=3 is not divisible by the "
                                       r"data-parallel size mesh.data=2"):
    validate.validate(c, num_devices=8)
  c.train.batch_size = c.eval.batch_size = 6
  validate.validate(c, num_devices=8)
