"""Every model family: a train step sharded over data x fsdp x tensor equals the single-device
step (initial parameters, loss, gradients and the AdamW update), both built by train/program.py."""

import pytest

from tests.parallel.step_parity import assert_matches_reference, axes, reference, run_one_step
from nets import registry

# Each family's tiny config in tests/parallel/step_parity.py (make_config's kind).
KINDS = {"llama": "lm", "mamba": "mamba", "megabyte": "megabyte", "vit": "vit", "swin": "swin",
         "dit": "dit", "udit": "udit", "uvit": "uvit", "linear_rnn": "gdn",
         "pixart": "pixart", "mmdit": "mmdit", "autoencoder": "autoencoder",
         "vqvae": "vqvae"}
MESH = axes(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("family", list(registry.families()))
def test_sharded_step_equals_single_device(family):
  if family == "var":
    pytest.skip("the var step reads token shards and a trained tokenizer workdir, which "
                "step_parity.py cannot make yet: its sharded-step check is still open (issue 22).")
  assert family in KINDS, (f"model family {family!r} has no tiny config: add one to "
                           "tests/parallel/step_parity.py's make_config and to KINDS here.")
  got = run_one_step(MESH, kind=KINDS[family])
  # The VQ tokenizer's conv gradients at 8 x 8 features over 8 images: sums of ~10^3 float32
  # terms of both signs, reordered by the sharding (seen: 4.5e-6 on a gradient of 0.12).
  assert_matches_reference(got, reference(KINDS[family]),
                           grad_atol=1e-5 if family == "vqvae" else 1e-7)
