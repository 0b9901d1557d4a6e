"""DeepSpeed-Ulysses and the K/V all-gather baseline, as per-device functions run in shard_map.

Ulysses: each device holds N/P tokens of every head. all-to-all #1 scatters heads and gathers the
sequence ([b, N/P, h, D] -> [b, N, h/P, D]); attention runs locally over the whole sequence for
h/P heads with any kernel; all-to-all #2 returns to sequence sharding. Per device and layer it
moves about 4·N·h/P elements (q, k, v, out), constant when N and P grow together.

``groups`` restricts the all-to-alls to groups of consecutive devices of the axis: the Ulysses
half of the USP hybrid (ring attention then runs across the groups).
"""

import math

import jax
import jax.numpy as jnp

from parallel import kernels


def kv_repeats(num_kv_heads: int, degree: int) -> int:
  """How many times to repeat each KV head so the KV head count divides the Ulysses degree.

  The minimal r with (K * r) % degree == 0; it divides the GQA group size whenever the query
  heads divide the degree, so grouped-query pairing survives the head scatter.
  """
  return 1 if num_kv_heads % degree == 0 else degree // math.gcd(num_kv_heads, degree)


def _a2a(x, axis_name, split_axis, concat_axis, groups):
  return jax.lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=True,
                            axis_index_groups=groups)


def _gather_seq(x, axis_name, groups):
  if x is None:
    return None
  return jax.lax.all_gather(x, axis_name, axis=1, tiled=True, axis_index_groups=groups)


def seq_to_heads(q, k, v, mask: kernels.Mask, *, axis_name: str, degree: int, groups=None):
  """all-to-all #1: [b, N/P, h, D] -> [b, N, h/P, D] for q, k, v; positions/segments gathered."""
  r = kv_repeats(k.shape[2], degree)
  if r > 1:  # GQA with fewer KV heads than devices: repeat only as far as needed
    k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
  q, k, v = (_a2a(x, axis_name, 2, 1, groups) for x in (q, k, v))
  positions = _gather_seq(mask.q_positions, axis_name, groups)
  segments = _gather_seq(mask.q_segments, axis_name, groups)
  return q, k, v, kernels.Mask(positions, positions, segments, segments)


def heads_to_seq(o, *, axis_name: str, groups=None):
  """all-to-all #2: [b, N, h/P, D] -> [b, N/P, h, D]."""
  return _a2a(o, axis_name, 1, 2, groups)


def ulysses_attention(q, k, v, *, causal: bool, mask: kernels.Mask, kernel, axis_name: str,
                      degree: int):
  """Ulysses over the whole ``axis_name`` axis (degree = its size)."""
  q, k, v, full_mask = seq_to_heads(q, k, v, mask, axis_name=axis_name, degree=degree)
  o = kernel(q, k, v, causal=causal, mask=full_mask)
  return heads_to_seq(o, axis_name=axis_name)


def allgather_attention(q, k, v, *, causal: bool, mask: kernels.Mask, kernel, axis_name: str):
  """Baseline: all-gather K/V over the axis; local queries attend to the whole sequence.

  Moves about 2·N·h_kv elements per device (P times more than Ulysses at equal heads) and holds
  the full K/V on every device.
  """
  k = jax.lax.all_gather(k, axis_name, axis=1, tiled=True)
  v = jax.lax.all_gather(v, axis_name, axis=1, tiled=True)
  kv_mask = kernels.Mask(mask.q_positions, _gather_seq(mask.kv_positions, axis_name, None),
                         mask.q_segments, _gather_seq(mask.kv_segments, axis_name, None))
  return kernel(q, k, v, causal=causal, mask=kv_mask)


def consecutive_groups(axis_size: int, group_size: int) -> list[list[int]]:
  """[[0..g-1], [g..2g-1], ...]: the Ulysses groups of the USP hybrid."""
  return [list(range(s, s + group_size)) for s in range(0, axis_size, group_size)]
