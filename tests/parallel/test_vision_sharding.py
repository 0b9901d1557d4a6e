"""ViT and DiT steps sharded over data x seq with Ulysses and ring equal the single-device step:
loss and gradients (data x fsdp x tensor: tests/parallel/test_family_parity.py)."""

import functools

import pytest

from tests.parallel.step_parity import assert_matches_reference, axes, reference, run_one_step

MESHES = {
    "data2_seq4_ulysses": (axes(data=2, seq=4), dict(seq_strategy="ulysses")),
    "data2_seq4_ring": (axes(data=2, seq=4), dict(seq_strategy="ring")),
}


@functools.lru_cache(maxsize=None)
def sharded(kind, name):
  sizes, parallel = MESHES[name]
  return run_one_step(sizes, kind=kind, **parallel)


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize("kind", ["vit", "dit"])
def test_vision_step_equals_single_device(kind, name):
  got = sharded(kind, name)
  assert got["plan"].strategy == MESHES[name][1].get("seq_strategy", "local")
  assert_matches_reference(got, reference(kind))
