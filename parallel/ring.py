"""Ring attention: K/V blocks travel around a ring of devices; each keeps an online softmax.

Called inside ``jax.shard_map`` on this device's shards (q [B, N_l, H, D], k/v [B, N_l, K, D] and a
``kernels.Mask`` with this device's positions and segment ids). At each of the ``ring_size`` steps
a device attends its queries to the K/V block it holds, merges the result into its running
(o, lse), and passes the block (with its positions and segment ids) to its ring neighbour with
``ppermute``. Memory per device is O(N_l) in both passes: the backward rotates K/V a second time
together with their dK/dV accumulators, which arrive back at their owner after a full circle.

Causal load balancing: with a contiguous layout device 0 attends one block and device P-1 all P.
With ``chunks=2`` and the zigzag layout (device i holds chunks i and 2P-1-i of 2P, see
``zigzag_permutation``) the query and key blocks are split into chunks and chunk pairs that the
causal mask hides entirely are skipped with ``lax.cond``, so every device computes 3 chunk pairs
at step 0 and 2 at every later step. Skipping is decided from the positions, never from device
indices, so any layout stays correct; a layout only changes how much is skipped.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from parallel.kernels import (EMPTY_LSE, Mask, block_backward, block_forward, delta_of, merge)


@dataclasses.dataclass(frozen=True)
class _Ring:
  """The static (hashable) part of one ring attention call."""
  causal: bool
  axis_name: str
  ring_size: int
  stride: int
  chunks: int

  @property
  def perm(self):
    # Ring neighbours are i and i + stride: with stride s the axis holds s independent rings
    # {r, r+s, r+2s, ...}; i + ring_size*stride wraps back to i, closing each ring.
    axis_size = self.ring_size * self.stride
    return [(i, (i + self.stride) % axis_size) for i in range(axis_size)]


def ring_attention(q, k, v, *, causal: bool, mask: Mask, axis_name: str, ring_size: int,
                   stride: int = 1, chunks: int = 1):
  """Attention of this device's queries over the keys of every device in its ring (in shard_map).

  Args:
    q: [B, N_l, H, D] local queries; k, v: [B, T_l, K, D] local keys/values, H % K == 0.
    mask: positions (and optional segment ids) of the local queries and keys, [B, N_l] / [B, T_l].
    axis_name: the shard_map axis the ring runs over.
    ring_size: devices in one ring; ring_size * stride must equal the size of ``axis_name``.
    stride: ring neighbours are axis indices i and i + stride (1: one ring over the whole axis).
    chunks: sequence chunks per device (1 contiguous, 2 zigzag); causal chunk pairs that the
      mask hides entirely are skipped.
  Returns:
    [B, N_l, H, D] in q's dtype.
  """
  cfg = _validate(q, k, v, mask, causal, axis_name, ring_size, stride, chunks)
  # Tie the mask to q: otherwise, under reverse-mode autodiff of a layer scan, the masks (which
  # depend only on loop-invariant positions) are hoisted out of the loop and every block pair's
  # mask is materialised at once, O(N^2) memory (bench/seq_parallel.py measured it).
  q, mask = jax.lax.optimization_barrier((q, mask))
  return _ring(q, k, v, mask, cfg)


def ring_pair_counts(q, k, v, *, causal: bool, mask: Mask, axis_name: str, ring_size: int,
                     stride: int = 1, chunks: int = 1):
  """int32 [ring_size]: chunk pairs this device computes at each forward ring step (in shard_map).

  Runs the same forward as ``ring_attention`` and counts the ``lax.cond`` branches that were
  taken, so balance checks and benchmarks see what the kernel really does.
  """
  cfg = _validate(q, k, v, mask, causal, axis_name, ring_size, stride, chunks)
  _, _, counts = _forward(q, k, v, mask, cfg)
  return counts


def pairs_computed(device: int, step: int, ring_size: int, chunks: int, causal: bool) -> int:
  """Chunk pairs a ring member computes at one step, for default positions in the standard layout.

  Layout: ``chunks=1`` contiguous (member i holds chunk i of P), ``chunks=2`` zigzag (chunks i and
  2P-1-i of 2P). At step t member i holds the K/V of member (i - t) mod P; a pair is skipped when
  its key chunk lies entirely after its query chunk.
  """
  if chunks not in (1, 2):
    raise ValueError(f"pairs_computed knows the contiguous (chunks=1) and zigzag (chunks=2) "
                     f"layouts, not chunks={chunks}.")

  def owned(i):
    return [i] if chunks == 1 else [i, 2 * ring_size - 1 - i]

  source = (device - step) % ring_size
  return sum(1 for qc in owned(device) for kc in owned(source) if not causal or kc <= qc)


def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
  """Indices ``perm`` such that ``x[:, perm]``, split contiguously over num_shards devices, gives
  device i the chunks i and 2*num_shards-1-i of the original sequence (2*num_shards chunks)."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"seq_len={seq_len} is not divisible by 2 * {num_shards} (two chunks per "
                     f"sequence shard) for the zigzag layout; use a seq_len that is a multiple of "
                     f"{2 * num_shards}, or chunks=1.")
  c = seq_len // (2 * num_shards)
  order = [j for i in range(num_shards) for j in (i, 2 * num_shards - 1 - i)]
  return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order])


def inverse_permutation(perm) -> np.ndarray:
  """``inv`` with ``x[:, perm][:, inv] == x``."""
  return np.argsort(np.asarray(perm))


# ----------------------------------------------------------------------------- internals


def _validate(q, k, v, mask, causal, axis_name, ring_size, stride, chunks) -> _Ring:
  B, N, H, D = q.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"ring attention needs k and v of shape [B={B}, T, K, D={D}], got k "
                     f"{k.shape} and v {v.shape}.")
  T, K = k.shape[1], k.shape[2]
  if H % K:
    raise ValueError(f"num_heads={H} is not divisible by num_kv_heads={K} on this device; choose "
                     "head counts whose ratio is an integer after sharding.")
  if mask.q_positions.shape != (B, N) or mask.kv_positions.shape != (B, T):
    raise ValueError(f"ring attention needs this device's positions, q [{B}, {N}] and kv "
                     f"[{B}, {T}]; got {mask.q_positions.shape} and {mask.kv_positions.shape}. "
                     "Shard the mask like q/k/v in the shard_map in_specs.")
  if min(ring_size, stride, chunks) < 1:
    raise ValueError(f"ring_size={ring_size}, stride={stride} and chunks={chunks} must all be "
                     ">= 1.")
  if N % chunks or T % chunks:
    raise ValueError(f"the local sequence lengths (q {N}, kv {T}) are not divisible by "
                     f"chunks={chunks}; use a seq_len divisible by (seq axis size * {chunks}).")
  try:
    axis_size = jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"ring_attention must run inside jax.shard_map over a mesh with axis "
                     f"{axis_name!r}.") from e
  if ring_size * stride != axis_size:
    raise ValueError(f"ring_size={ring_size} * stride={stride} must equal the size "
                     f"{axis_size} of mesh axis {axis_name!r}; use ring_size={axis_size // stride}"
                     " (or a stride that divides the axis).")
  return _Ring(bool(causal), axis_name, ring_size, stride, chunks)


def _split(x, n):
  """Static split of [B, N, ...] into n chunks along the sequence (None stays None)."""
  if x is None:
    return [None] * n
  c = x.shape[1] // n
  return [x[:, i * c:(i + 1) * c] for i in range(n)]


def _allowed(causal, qp, kp, qs, ks):
  return Mask(qp, kp, qs, ks).block(causal)


def _unless_hidden(causal, qp, kp, compute, state):
  """compute(state), or state unchanged when causality hides every (query, key) pair.

  Hidden means every key of the chunk lies after every query of the chunk, in every batch row.
  Bidirectional attention never skips (and pays no cond).
  """
  if not causal:
    return compute(state)
  hidden = jnp.all(jnp.min(kp, axis=1) > jnp.max(qp, axis=1))
  return jax.lax.cond(hidden, lambda s: s, compute, state)


def _rotate(tree, cfg: _Ring):
  return jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, cfg.perm), tree)


def _scan_ring(step, carry, kv, cfg: _Ring):
  """Runs step(carry, kv) on each of the ring_size blocks; K/V rotate between steps (not after).

  The next block is sent before this one is used, so the collective-permute can overlap the
  compute; the last block is used without sending it on. Returns (carry, stacked step outputs).
  """
  def body(c, _):
    carry, kv = c
    kv_next = _rotate(kv, cfg)
    carry, y = step(carry, kv)
    return (carry, kv_next), y

  (carry, kv), ys = jax.lax.scan(body, (carry, kv), None, length=cfg.ring_size - 1)
  carry, y_last = step(carry, kv)
  ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), ys, y_last)
  return carry, ys


def _forward(q, k, v, mask: Mask, cfg: _Ring):
  """(o float32, lse, pair counts per step) of this device's queries over its whole ring."""
  n = cfg.chunks
  q_c, qp_c, qs_c = _split(q, n), _split(mask.q_positions, n), _split(mask.q_segments, n)

  def step(acc, kv):
    k, v, kp, ks = kv
    k_c, v_c, kp_c, ks_c = _split(k, n), _split(v, n), _split(kp, n), _split(ks, n)
    o, lse = list(acc[0]), list(acc[1])
    # The counter starts from a value derived from the (device-varying) positions so that both
    # cond branches agree on its type under shard_map's varying-axes check.
    count = jnp.zeros_like(kp[0, 0])
    for a in range(n):
      for b in range(n):
        def compute(state, a=a, b=b):
          o_a, lse_a, count = state
          o2, lse2 = block_forward(q_c[a], k_c[b], v_c[b],
                                   _allowed(cfg.causal, qp_c[a], kp_c[b], qs_c[a], ks_c[b]))
          return (*merge(o_a, lse_a, o2, lse2), count + 1)
        o[a], lse[a], count = _unless_hidden(cfg.causal, qp_c[a], kp_c[b], compute,
                                             (o[a], lse[a], count))
    return (o, lse), count

  # zeros_like/full_like of q keep q's varying mesh axes, which scan's carry check requires.
  o0 = [jnp.zeros_like(x, jnp.float32) for x in q_c]
  lse0 = [jnp.full_like(x[..., 0], EMPTY_LSE, jnp.float32) for x in q_c]
  (o, lse), counts = _scan_ring(step, (o0, lse0), (k, v, mask.kv_positions, mask.kv_segments),
                                cfg)
  return jnp.concatenate(o, axis=1), jnp.concatenate(lse, axis=1), counts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, mask, cfg):
  o, _, _ = _forward(q, k, v, mask, cfg)
  return o.astype(q.dtype)


def _ring_fwd(q, k, v, mask, cfg):
  o, lse, _ = _forward(q, k, v, mask, cfg)
  o = o.astype(q.dtype)
  # Residuals are all local: O(N_l) per device, no gathered K/V.
  return o, (q, k, v, mask, o, lse)


def _ring_bwd(cfg: _Ring, res, do):
  q, k, v, mask, o, lse = res
  n = cfg.chunks
  delta = delta_of(o, do)
  q_c, do_c = _split(q, n), _split(do, n)
  lse_c, delta_c = _split(lse, n), _split(delta, n)
  qp_c, qs_c = _split(mask.q_positions, n), _split(mask.q_segments, n)

  def step(carry, kv):
    # dK/dV travel with their K/V block: accumulate this device's contribution, then pass both
    # on. After ring_size steps (and ring_size rotations of dK/dV) they are back at the owner.
    dq, (dk, dv) = carry
    k, v, kp, ks = kv
    k_c, v_c, kp_c, ks_c = _split(k, n), _split(v, n), _split(kp, n), _split(ks, n)
    dq, dk_c, dv_c = list(dq), _split(dk, n), _split(dv, n)
    for a in range(n):
      for b in range(n):
        def compute(state, a=a, b=b):
          dq_a, dk_b, dv_b = state
          dq_ab, dk_ab, dv_ab = block_backward(
              q_c[a], k_c[b], v_c[b], _allowed(cfg.causal, qp_c[a], kp_c[b], qs_c[a], ks_c[b]),
              do_c[a], lse_c[a], delta_c[a])
          return dq_a + dq_ab, dk_b + dk_ab, dv_b + dv_ab
        dq[a], dk_c[b], dv_c[b] = _unless_hidden(cfg.causal, qp_c[a], kp_c[b], compute,
                                                 (dq[a], dk_c[b], dv_c[b]))
    dkv = _rotate((jnp.concatenate(dk_c, axis=1), jnp.concatenate(dv_c, axis=1)), cfg)
    return (dq, dkv), None

  dq0 = [jnp.zeros_like(x, jnp.float32) for x in q_c]
  dkv0 = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
  (dq, (dk, dv)), _ = _scan_ring(step, (dq0, dkv0), (k, v, mask.kv_positions, mask.kv_segments),
                                 cfg)
  mask_ct = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
  return (jnp.concatenate(dq, axis=1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          mask_ct)


_ring.defvjp(_ring_fwd, _ring_bwd)
