"""parallel/mesh.py and parallel/devices.py: mesh from config, -1 fill, clear errors."""

import jax
import ml_collections
import pytest
from jax.sharding import AxisType

from parallel import devices, mesh as parallel_mesh


def cfg(**sizes):
  base = dict(data=1, fsdp=1, tensor=1, seq=1, expert=1)
  return ml_collections.ConfigDict({**base, **sizes})


def test_minus_one_fills_the_remaining_devices():
  assert parallel_mesh.mesh_shape(cfg(data=-1, tensor=2), 8)["data"] == 4
  m = parallel_mesh.make_mesh(cfg(data=2, fsdp=-1, tensor=2))
  assert dict(m.shape) == dict(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  assert m.axis_names == parallel_mesh.MESH_AXES
  assert all(t == AxisType.Auto for t in m.axis_types)
  assert m.devices.size == jax.device_count() == 8


@pytest.mark.parametrize("sizes, message", [
    (dict(data=2, fsdp=2, tensor=4), r"needs 16 devices but 8 are available"),
    (dict(data=-1, tensor=3), r"the fixed axes multiply to 3, which does not divide 8"),
    (dict(data=-1, fsdp=-1), r"at most one -1"),
    (dict(data=0, fsdp=8), r"sizes must be positive"),
])
def test_mesh_that_does_not_fit_raises_a_sentence(sizes, message):
  with pytest.raises(ValueError, match=message):
    parallel_mesh.mesh_shape(cfg(**sizes), 8)


def test_unknown_mesh_axis_is_named():
  c = cfg(data=8)
  c.pipeline = 1
  with pytest.raises(ValueError, match=r"unknown axes \['pipeline'\]"):
    parallel_mesh.mesh_shape(c, 8)


def test_explicit_devices_subset():
  m = parallel_mesh.make_mesh(cfg(data=2), jax.devices()[:2])
  assert m.devices.size == 2


def test_cpu_device_flag_never_overrides_users_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  devices.set_cpu_devices(8)  # agrees: fine, nothing to do
  with pytest.raises(ValueError, match=r"--cpu_devices=4 conflicts with XLA_FLAGS"):
    devices.set_cpu_devices(4)
