"""Attention entry point: picks the attention function that nets call, by config name.

Sequence-parallel strategies (Ulysses, ring, hybrid) and memory-efficient kernels plug in here;
each is a pure function with the signature of nets.attention.dot_product_attention.
"""

from typing import Callable

from jax.sharding import Mesh

from nets.attention import dot_product_attention

KERNELS = ("dense",)


def get_attention_fn(name: str, mesh: Mesh | None = None) -> Callable:
  """The attention function for config.parallel.attention."""
  del mesh  # the dense kernel lets the compiler partition it (batch/heads sharded, seq whole)
  if name == "dense":
    return dot_product_attention
  raise ValueError(f"config.parallel.attention={name!r} is not one of {KERNELS}.")
