"""A train step with each sequence-parallel strategy (Llama; linear-recurrent models by state
passing) equals the single-device step: its loss and gradients (step_parity.run_one_step)."""

import functools
import math

import jax
import pytest

from tests.parallel.step_parity import (assert_matches_reference, axes, make_config, reference,
                                        run_one_step)
from train.validate import validate

# name -> (mesh sizes, config.parallel overrides); test model: 4 heads, 2 KV heads, seq_len 16.
MESHES = {
    "data2_seq4_ulysses": (axes(data=2, seq=4), dict(seq_strategy="ulysses")),
    "fsdp2_seq4_ring": (axes(fsdp=2, seq=4), dict(seq_strategy="ring")),
    "seq8_usp": (axes(seq=8), dict(seq_strategy="usp", usp_ulysses=2)),
    "data2_tensor2_seq2_allgather": (axes(data=2, tensor=2, seq=2), dict(seq_strategy="allgather")),
}


@functools.lru_cache(maxsize=None)
def sharded(name):
  sizes, parallel = MESHES[name]
  return run_one_step(sizes, **parallel)


@pytest.mark.parametrize("name", list(MESHES))
def test_sequence_parallel_step_equals_single_device(name):
  got = sharded(name)
  assert got["plan"].strategy == MESHES[name][1]["seq_strategy"]
  assert_matches_reference(got, reference())


def test_ulysses_llama_step_uses_all_to_all():
  assert "all-to-all" in sharded("data2_seq4_ulysses")["hlo"]


def test_ring_llama_step_uses_collective_permute():
  assert "collective-permute" in sharded("fsdp2_seq4_ring")["hlo"]


# Linear-recurrent models: the recurrences pass states between the sequence shards
# (parallel/state_passing.py) while the hybrid's attention layer runs its own strategy in the
# same step, in sequence order. name -> (kind, mesh sizes, config.parallel overrides). seq=4 with
# ring attention is left to tests/parallel/test_state_passing.py (the recurrence on every mesh)
# and test_seq_parallel.py (in-order ring attention): each whole-step case costs a minute. A
# seq=2 Ulysses case (one shard boundary) is left out too: data=2 x seq=4 passes states over
# three boundaries with the same strategy.
LINEAR = {
    "gdn_seq8_ring": ("gdn", axes(seq=8), dict(seq_strategy="ring")),
    "gdn_data2_seq4_ulysses": ("gdn", axes(data=2, seq=4), dict(seq_strategy="ulysses")),
    "ssd_tensor2_seq4": ("ssd", axes(tensor=2, seq=4), dict()),
}


@pytest.mark.parametrize("name", list(LINEAR))
def test_state_passing_step_equals_single_device(name):
  kind, sizes, parallel = LINEAR[name]
  got = run_one_step(sizes, jax.devices()[:math.prod(sizes.values())], kind=kind, **parallel)
  assert_matches_reference(got, reference(kind))
  if "seq_strategy" in parallel:
    assert got["plan"].strategy == parallel["seq_strategy"]
    assert got["plan"].permutation(16) is None  # the recurrences need the sequence in order
  assert "all-gather" in got["hlo"]  # the boundary states


def test_ulysses_mmdit_joint_sequence_step_equals_single_device():
  """MMDiT's joint [caption; image] sequence (16 + 16 tokens, padded captions masked by segment
  ids) split over seq=4 by Ulysses: the step equals the single-device one."""
  got = run_one_step(axes(data=2, seq=4), kind="mmdit", seq_strategy="ulysses")
  assert got["plan"].strategy == "ulysses"
  assert "all-to-all" in got["hlo"]
  assert_matches_reference(got, reference("mmdit"))


def test_mmdit_joint_length_must_split_over_seq():
  config = make_config("mmdit")
  config.model.text_len = config.data.text_len = 66  # + 16 image tokens = 82, not a multiple of 4
  config.mesh.update(axes(data=2, seq=4))
  with pytest.raises(ValueError, match="=82 is not divisible by mesh.seq=4"):
    validate(config, num_devices=8)
