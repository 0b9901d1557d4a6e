"""Process-level device setup (before JAX initialises its backends) and device capability checks."""

import os
import re

import jax

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def set_cpu_devices(count: int | None) -> None:
  """Simulates ``count`` CPU devices, unless the user's XLA_FLAGS already chose a count.

  The user's XLA_FLAGS is never rewritten: if it names a different count, that is an error, not a
  silent override.
  """
  if count is None:
    return
  if count < 1:
    raise ValueError(f"--cpu_devices={count} must be a positive integer.")
  found = _COUNT_FLAG.search(os.environ.get("XLA_FLAGS", ""))
  if found:
    if int(found.group(1)) != count:
      raise ValueError(f"--cpu_devices={count} conflicts with XLA_FLAGS, which sets "
                       f"--xla_force_host_platform_device_count={found.group(1)}; drop one of them.")
    return
  jax.config.update("jax_num_cpu_devices", count)


def check_remat_supported(policy: str, devices) -> None:
  """Raises one sentence when the remat ``policy`` needs a memory space the ``devices`` lack
  (before anything compiles; train/validate.py passes the devices it will run on)."""
  if policy != "offload":
    return
  for device in devices:
    kinds = sorted(m.kind for m in device.addressable_memories())
    if "pinned_host" not in kinds:
      raise ValueError(f"train.remat='offload' needs devices with a pinned_host memory space "
                       f"to offload to; this {device.platform} device has only {kinds}, so use "
                       "train.remat='selective' instead.")
