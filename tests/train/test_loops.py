"""The pmap loop against the mesh loop, gradient accumulation, profiling."""

import glob
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.parallel import step_parity
from tests.train.test_faults import lm_config
from tests.train.test_loop import train_losses
from train import loop
from train.validate import validate

STEPS = 10


def data8_config(kind):
  c = lm_config(steps=STEPS, mesh=(8, 1, 1))
  c.ckpt.update(every=5)
  c.parallel.loop = kind
  return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  runs = {}
  for kind in ("mesh", "pmap"):
    workdir = str(tmp_path_factory.mktemp(kind))
    loop.run(data8_config(kind), workdir)
    runs[kind] = workdir
  return runs


def test_pmap_loop_follows_the_mesh_loop(straight):
  mesh, pmap = train_losses(straight["mesh"]), train_losses(straight["pmap"])
  assert sorted(mesh) == sorted(pmap) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([pmap[s] for s in mesh], [mesh[s] for s in mesh], rtol=1e-6)
  assert mesh[STEPS] < mesh[1] - 0.5


@pytest.mark.parametrize("first,then", [("mesh", "pmap"), ("pmap", "mesh")])
def test_checkpoint_of_one_loop_resumes_in_the_other(straight, tmp_path, first, then):
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[first], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  summary = loop.run(data8_config(then), workdir)
  assert summary["start_step"] == 5
  resumed, reference = train_losses(workdir), train_losses(straight[then])
  np.testing.assert_allclose([resumed[s] for s in range(6, STEPS + 1)],
                             [reference[s] for s in range(6, STEPS + 1)], rtol=1e-6)


@pytest.mark.parametrize("kind,accum", [("lm", 2), ("vit", 2)])
def test_accumulated_step_equals_the_large_batch_step(kind, accum):
  # grad_accum micro-batches of B/accum on a data x fsdp x tensor mesh against one step of the
  # whole batch on one device: same loss, same gradients.
  got = step_parity.run_one_step(step_parity.axes(data=2, fsdp=2, tensor=2), kind=kind,
                                 grad_accum=accum)
  step_parity.assert_matches_reference(got, step_parity.reference(kind))
  assert "while" in got["hlo"]  # the micro-batches are a loop inside the one step


def test_profile_steps_write_a_trace(tmp_path):
  config = lm_config(steps=4)
  config.log.profile_steps = "2:3"
  loop.run(config, str(tmp_path))
  traces = glob.glob(os.path.join(tmp_path, "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 1000


@pytest.mark.parametrize("change,message", [
    (dict(loop="pmap", tensor=2), "parallel.loop='pmap' is data parallelism only"),
    (dict(loop="pmap", moe=4), "parallel.loop='pmap' does not run MoE layers"),
    (dict(loop="scan"), "config.parallel.loop='scan' is not one of"),
    (dict(grad_accum=3), "train.batch_size=8 is not divisible by train.grad_accum=3"),
    (dict(profile="5:2"), "config.log.profile_steps='5:2' must be 'a:b'"),
    (dict(max_bad_steps=0), "config.train.max_bad_steps=0 must be a positive integer"),
])
def test_invalid_loop_settings_get_one_sentence(change, message):
  config = lm_config(mesh=(-1, 1, 1))
  config.mesh.tensor = change.get("tensor", 1)
  config.parallel.loop = change.get("loop", "mesh")
  if "moe" in change:
    config.model.moe.update(num_experts=change["moe"], top_k=1)
  config.train.grad_accum = change.get("grad_accum", 1)
  config.train.max_bad_steps = change.get("max_bad_steps", 5)
  config.log.profile_steps = change.get("profile", "")
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    validate(config)


def test_bf16_compute_trains_with_float32_master_weights(tmp_path):
  config = lm_config(steps=6)
  config.model.update(dtype="bfloat16", param_dtype="float32")
  loop.run(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert losses[6] < losses[1] - 0.3
  state = checkpoint_state(str(tmp_path), 6)
  dtypes = {str(x.dtype) for x in jax.tree.leaves((state["params"], state["opt_state"]))
            if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)}
  assert dtypes == {"float32"}


def checkpoint_state(workdir, step):
  """The raw saved state tree (dtypes as written), without a restore target."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    manager.close()
