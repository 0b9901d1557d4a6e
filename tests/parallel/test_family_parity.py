"""Every model family: a train step sharded over data x fsdp x tensor equals the single-device
step (loss and gradients, from the same initial state; for the Llama and the VQ tokenizer also
the AdamW update and, for the tokenizer, its dead-code restart), both built by
train/program.py; and the sharded initialisation draws the single-device numbers."""

import pytest

import jax
import numpy as np

from tests.parallel.step_parity import (assert_matches_reference, axes, initial_state, reference,
                                        run_one_step, setup)
from nets import registry

# Each family's tiny config in tests/parallel/step_parity.py (make_config's kind).
KINDS = {"llama": "lm", "mamba": "mamba", "megabyte": "megabyte", "vit": "vit", "swin": "swin",
         "dit": "dit", "udit": "udit", "uvit": "uvit", "linear_rnn": "gdn",
         "pixart": "pixart", "mmdit": "mmdit", "autoencoder": "autoencoder",
         "vqvae": "vqvae", "var": "var"}
MESH = axes(data=2, fsdp=2, tensor=2)
# Families whose whole step (with the update) is compared; the others compare the step's loss
# and gradients (step_parity.run_one_step's ``update``).
WHOLE_STEP = ("llama", "vqvae")


@pytest.mark.parametrize("family", list(registry.families()))
def test_sharded_step_equals_single_device(family):
  assert family in KINDS, (f"model family {family!r} has no tiny config: add one to "
                           "tests/parallel/step_parity.py's make_config and to KINDS here.")
  update = family in WHOLE_STEP
  got = run_one_step(MESH, kind=KINDS[family], update=update)
  # The VQ tokenizer's conv gradients at 8 x 8 features over 8 images: sums of ~10^3 float32
  # terms of both signs, reordered by the sharding (seen: 4.5e-6 on a gradient of 0.12). VAR's
  # embedding gradients sum over all 8 x 84 input tokens (its word_embed bias, level_embed):
  # seen up to 4.8e-7 apart, at 81% of the default bound, and 1.3e-7 on a level_embed gradient
  # of 2.4e-3 (over it) with the blocks' gates at zero.
  assert_matches_reference(got, reference(KINDS[family], update),
                           grad_atol={"vqvae": 1e-5, "var": 1e-6}.get(family, 1e-7))


# Initialisers of different kinds: embeddings and scanned layers (llama), convolutions and a
# codebook (vqvae), a joint text/image stack with zero-initialised adaLN (mmdit). The other families
# start their parity steps from the single-device state (step_parity.initial_state).
@pytest.mark.parametrize("family", ["llama", "vqvae", "mmdit"])
def test_sharded_initialisation_draws_the_single_device_numbers(family):
  program = setup(MESH, kind=KINDS[family])
  sharded = jax.device_get(program.init())
  jax.tree.map(np.testing.assert_array_equal, initial_state(KINDS[family]), sharded)
