"""Shared harness: one train step on a mesh vs the single-device reference (not a test file)."""

import functools

import flax.linen as nn
import jax
import numpy as np

from configs import diffusion, lm, vit
from parallel import mesh as parallel_mesh
from parallel import sharding
from train import image_data, models, optimizer, steps, tasks
from train import state as state_lib

B, S = 8, 16
KINDS = ("lm", "vit", "dit")
# MoE variants: a Mixtral-style LM (dropless top-2), the same with capacity dropping (8 fixed
# dispatch groups, so any mesh groups tokens alike) and micro-batch balance, and DiT-MoE with a
# shared expert and every other block MoE.
MOE = {
    "lm_moe": dict(num_experts=8, top_k=2),
    "lm_moe_capacity": dict(num_experts=8, top_k=2, capacity_factor=1.0, groups=8,
                            balance="micro", router="sigmoid"),
    "dit_moe": dict(num_experts=4, top_k=1, shared_experts=1, every=2, activation="gelu"),
}


def make_config(kind: str):
  """Tiny configs: the test Llama (seq_len 16), the digits ViT and the digits DiT (+ MoE)."""
  base_kind = kind.split("_")[0]
  if base_kind == "lm":
    config = lm.get_config("size=test")
    config.train.seq_len = S
  elif base_kind == "vit":
    config = vit.get_config("variant=digits")
  else:
    config = diffusion.get_config("model=dit,variant=digits")
  if kind in MOE:
    config.model.moe.update(MOE[kind])
  config.train.batch_size = B
  config.eval.batch_size = B
  return config


def setup(mesh_sizes: dict, devices=None, kind: str = "lm", **parallel):
  config = make_config(kind)
  config.mesh.update(**mesh_sizes)
  config.parallel.update(**parallel)
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.parallel)
  model, _, plan = models.build(config, mesh)
  tx, lr = optimizer.make(config.opt, total_steps=10)
  task = tasks.get(config)
  example = task.example_batch(B)
  init = lambda: state_lib.create(model, tx, task.init_args(example), config.seed)
  abstract, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  return config, mesh, rules, model, tx, lr, init, shardings, plan


def batch(kind: str = "lm"):
  """One fixed batch: random bytes for the LM, the first training digits for vision."""
  if kind.startswith("lm"):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, (B, S + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  source = image_data.source(make_config(kind).data, "train")
  items = [source[i] for i in range(B)]
  return {"images": np.stack([x["images"] for x in items]),
          "labels": np.array([x["labels"] for x in items], np.int32)}


@functools.lru_cache(maxsize=None)
def reference(kind: str = "lm"):
  """Loss, gradients and post-step params on one device (the dense reference)."""
  return run_one_step(dict(data=1, fsdp=1, tensor=1, seq=1, expert=1), jax.devices()[:1],
                      kind=kind)


def run_one_step(mesh_sizes, devices=None, kind: str = "lm", grad_accum: int = 1, **parallel):
  config, mesh, rules, model, tx, lr, init, shardings, plan = setup(mesh_sizes, devices, kind,
                                                                   **parallel)
  task = tasks.get(config)
  permutation = plan.permutation(S) if kind.startswith("lm") else None
  state = sharding.init_sharded(init, shardings, mesh, rules)
  bs = {k: sharding.logical_sharding(mesh, rules, axes) for k, axes in task.batch_axes.items()}
  data = {k: jax.device_put(v, bs[k]) for k, v in batch(kind).items()}

  # The same rng for the reference and the sharded run: noise, timesteps and label dropout agree
  # because JAX's PRNG is partitionable (values do not depend on the sharding).
  task_loss = task.loss_fn(model, permutation)
  loss_fn = lambda params, data: task_loss(params, data, jax.random.split(state.rng)[1])[0]
  train_step = steps.make_train_step(task_loss, tx, lr, grad_accum=grad_accum,
                                     batch_axes=task.batch_axes)

  def loss_grads_and_step(state, data):
    # One program (one compile) for the gradients and the real optimizer step.
    loss, grads = jax.value_and_grad(loss_fn)(state.params, data)
    new_state, metrics = train_step(state, data)
    return loss, grads, new_state, metrics

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(loss_grads_and_step, in_shardings=(shardings, bs),
                       out_shardings=(None, shardings.params, shardings, None)).lower(
                           state, data).compile()
    init_params = jax.device_get(state.params)
    loss, grads, new_state, metrics = compiled(state, data)
  return dict(loss=float(loss), grads=grads, init_params=init_params, new_state=new_state,
              step_loss=float(metrics["loss"]), mesh=mesh, shardings=shardings, plan=plan,
              hlo=compiled.as_text())


def assert_matches_reference(got, ref):
  """Same init, loss, gradients and post-AdamW parameters as the single-device run."""
  # Sharded initialisation draws the same numbers as the single-device one (partitionable PRNG).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref["init_params"],
               got["init_params"])
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["step_loss"], ref["step_loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(got["grads"]), jax.device_get(ref["grads"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(got["new_state"].params), jax.device_get(ref["new_state"].params))


def axes(data=1, fsdp=1, tensor=1, seq=1, expert=1):
  return dict(data=data, fsdp=fsdp, tensor=tensor, seq=seq, expert=expert)



