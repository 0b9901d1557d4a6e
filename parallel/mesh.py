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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "seq", "expert")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 (fill with the remaining devices) and checks the product equals num_devices."""
  sizes = {name: int(getattr(mesh_cfg, name)) for name in MESH_AXES}
  unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES) - {"dcn"})
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


def granules(devices) -> int:
  """Groups of devices joined by the slow network (DCN): TPU slices, else processes (hosts)."""
  tpu = devices[0].platform == "tpu"
  return len({getattr(d, "slice_index", 0) if tpu else d.process_index for d in devices})


def dcn_shape(mesh_cfg, sizes: dict[str, int], num_granules: int) -> dict[str, int]:
  """How many granules each axis spans (``config.mesh.dcn``); the rest of it is within one.

  The default puts every granule on ``data`` (``dcn.data=-1``), so only data parallelism's
  gradient all-reduce crosses hosts, while fsdp/tensor/seq/expert collectives stay on the fast
  interconnect (ICI, NVLink). Raises one sentence when the split does not fit.
  """
  given = dict(mesh_cfg.get("dcn") or {"data": -1})
  unknown = sorted(set(given) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh.dcn has unknown axes {unknown}; the mesh axes are {MESH_AXES}.")
  dcn = {n: int(given.get(n, 1)) for n in MESH_AXES}
  fill = [n for n, s in dcn.items() if s == -1]
  fixed = math.prod(s for s in dcn.values() if s != -1)
  if fill:
    dcn[fill[0]] = max(num_granules // fixed, 1)
  if math.prod(dcn.values()) != num_granules or any(s < 1 for s in dcn.values()):
    raise ValueError(f"config.mesh.dcn {_fmt(dcn)} must multiply to the {num_granules} hosts "
                     "(TPU slices, or processes elsewhere) the mesh spans; put them on data "
                     "(dcn.data=-1) unless you mean to split another axis across hosts.")
  for n in MESH_AXES:
    if sizes[n] % dcn[n]:
      raise ValueError(f"config.mesh.{n}={sizes[n]} is not divisible by mesh.dcn.{n}={dcn[n]}, "
                       f"the hosts it spans; make mesh.{n} a multiple of {dcn[n]}.")
  return dcn


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh over all (or the given) devices with axes MESH_AXES, all of type Auto.

  Over several hosts (``granules``) the mesh is hybrid: each axis is ``mesh.dcn`` host groups
  times a block within one host, laid out by ``mesh_utils.create_hybrid_device_mesh``.
  """
  sizes = mesh_shape(mesh_cfg, len(jax.devices() if devices is None else devices))
  shape = tuple(sizes[n] for n in MESH_AXES)
  all_devices = jax.devices() if devices is None else list(devices)
  hosts = granules(all_devices)
  if hosts > 1:
    dcn = dcn_shape(mesh_cfg, sizes, hosts)
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(sizes[n] // dcn[n] for n in MESH_AXES), tuple(dcn[n] for n in MESH_AXES),
        all_devices, process_is_granule=all_devices[0].platform != "tpu",
        allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  if devices is None:
    # make_mesh orders devices for the physical topology (TPU ICI rings, GPU NVLink islands).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fmt(sizes: dict[str, int]) -> str:
  return "(" + ", ".join(f"{n}={s}" for n, s in sizes.items()) + ")"
