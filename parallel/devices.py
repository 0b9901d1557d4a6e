"""Process-level device setup that must happen before JAX initialises its backends."""

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
