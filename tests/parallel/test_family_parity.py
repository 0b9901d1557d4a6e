"""Every model family: a train step sharded over data x fsdp x tensor equals the single-device
step (initial parameters, loss, gradients and the AdamW update), both built by train/program.py."""

import pytest

from tests.parallel.step_parity import assert_matches_reference, axes, reference, run_one_step
from nets import registry
from train import tasks

# Each family's tiny config in tests/parallel/step_parity.py (make_config's kind).
KINDS = {"llama": "lm", "mamba": "mamba", "megabyte": "megabyte", "vit": "vit", "swin": "swin",
         "dit": "dit", "udit": "udit", "uvit": "uvit", "linear_rnn": "gdn",
         "pixart": "pixart", "mmdit": "mmdit", "autoencoder": "autoencoder"}
MESH = axes(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("family", list(registry.families()))
def test_sharded_step_equals_single_device(family):
  task = registry.get(family).task
  if task not in tasks.TASKS:  # the var family, until its training task exists
    pytest.skip(f"the {task} task is not wired yet (train/tasks has no {task!r} task to build a "
                "step from).")
  assert family in KINDS, (f"model family {family!r} has no tiny config: add one to "
                           "tests/parallel/step_parity.py's make_config and to KINDS here.")
  got = run_one_step(MESH, kind=KINDS[family])
  assert_matches_reference(got, reference(KINDS[family]))
