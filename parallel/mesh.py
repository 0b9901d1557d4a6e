"""Builds the device mesh from ``config.mesh``.

Axis types: we use ``AxisType.Auto`` on every axis, deliberately, although this JAX defaults
``jax.make_mesh`` to Explicit. Flax linen expresses sharding as annotations (logically named
parameters + ``with_logical_constraint`` at block boundaries) and relies on the compiler's sharding
propagation (Shardy/GSPMD) for everything in between. Explicit axes make the sharding part of each
array's type and require every op to have an unambiguous output sharding at trace time, which linen
layers do not provide. Where collectives must be explicit (sequence/expert parallelism) we use
``jax.shard_map`` over the same Auto mesh.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "seq", "expert")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 (fill with the remaining devices) and checks the product equals num_devices."""
  sizes = {name: int(getattr(mesh_cfg, name)) for name in MESH_AXES}
  unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the mesh axes are {MESH_AXES}.")
  fill = [n for n, s in sizes.items() if s == -1]
  bad = [f"{n}={s}" for n, s in sizes.items() if s == 0 or s < -1]
  if bad or len(fill) > 1:
    raise ValueError(f"config.mesh {_fmt(sizes)} is invalid: sizes must be positive, with at most "
                     "one -1 meaning 'the remaining devices'.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {_fmt(sizes)} cannot fill {num_devices} devices: the fixed "
                       f"axes multiply to {fixed}, which does not divide {num_devices}.")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh {_fmt(sizes)} needs {fixed} devices but {num_devices} are "
                     "available; change config.mesh (use -1 on one axis to fill), or for simulated "
                     f"CPU devices run with --cpu_devices={fixed} or "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={fixed}.")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh over all (or the given) devices with axes MESH_AXES, all of type Auto."""
  sizes = mesh_shape(mesh_cfg, len(jax.devices() if devices is None else devices))
  shape = tuple(sizes[n] for n in MESH_AXES)
  if devices is None:
    # make_mesh orders devices for the physical topology (TPU ICI rings, GPU NVLink islands).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fmt(sizes: dict[str, int]) -> str:
  return "(" + ", ".join(f"{n}={s}" for n, s in sizes.items()) + ")"
