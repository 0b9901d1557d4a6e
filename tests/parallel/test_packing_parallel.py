"""Packed documents under sequence parallelism: the LM loss and gradients of a packed batch on a
seq=4 mesh (four devices) equal the dense single-device packed loss for Ulysses, ring, USP and the K/V
all-gather (segment ids travel with q/k/v: gathered by Ulysses and all-gather, rotated with K/V
by ring; ring and USP also permute them into the zigzag order)."""

import jax
import numpy as np
import pytest

from parallel import mesh as parallel_mesh
from tests.nets.test_packing import packed_batch
from tests.parallel import step_parity
from train import program as program_lib
from train.validate import validate

B, S = step_parity.B, step_parity.S
# 24 documents of 1..12 bytes: one to five per 16-token row, several crossing rows.
LENGTHS = tuple(int(n) for n in np.random.default_rng(3).integers(1, 13, 24))


def loss_and_grads(mesh_sizes: dict, devices=None, **parallel):
  config = step_parity.make_config("lm")
  config.data.packing = "documents"
  config.mesh.update(**mesh_sizes)
  config.parallel.update(**parallel)
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  program = program_lib.build(config, validate(config, num_devices=mesh.devices.size), mesh=mesh)
  state = program.init()
  batch = program.eval_batch(packed_batch(LENGTHS, S, B))
  task_loss = program.task.loss_fn(program.model, program.attention.permutation(S))
  loss_fn = lambda params, batch: task_loss(params, batch, state.rng)[0]
  with program.context():
    # One computation (value and gradients) per jit: no second sharded computation whose
    # collectives XLA:CPU could order differently on different devices.
    step = jax.jit(jax.value_and_grad(loss_fn),
                   in_shardings=(program.state_shardings.params, program.batch_shardings),
                   out_shardings=(None, program.state_shardings.params))
    loss, grads = step(state.params, batch)
  return float(loss), jax.device_get(grads), program.attention


_REFERENCE = {}


def reference():
  if not _REFERENCE:
    _REFERENCE["ref"] = loss_and_grads(step_parity.axes(), jax.devices()[:1], attention="dense")
  return _REFERENCE["ref"]


@pytest.mark.parametrize("strategy", ["ulysses", "ring", "usp", "allgather"])
def test_packed_sharded_loss_equals_dense_single_device(strategy):
  loss, grads, plan = loss_and_grads(step_parity.axes(seq=4), jax.devices()[:4],
                                     seq_strategy=strategy,
                                     usp_ulysses=2 if strategy == "usp" else 0)
  assert plan.strategy == strategy
  want, want_grads, _ = reference()
  diff = max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
  print(f"\n{strategy}: loss {loss:.6f} vs dense single device {want:.6f} "
        f"(|diff| {abs(loss - want):.1e}), max |grad diff| {diff:.1e}")
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               want_grads)
