"""Meshes, the logical->mesh rule table, sharded state/batches, and explicit-collective kernels."""

from parallel import xla_flags as _xla_flags

# XLA:CPU flags without which sharded programs can deadlock (see xla_flags.CPU_FLAGS); XLA reads
# XLA_FLAGS when JAX starts a backend, which importing odyssey never does.
_xla_flags.apply_cpu()
