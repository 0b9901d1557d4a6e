"""Ring attention on 8 simulated CPU devices against dense attention on the unsharded arrays.

Every case is described by its layout: the global arrays are split contiguously over the mesh's
"seq" axis, and ``groups`` lists, for each independent sequence, the layout indices of its tokens
in sequence order. The positions handed to the ring are each token's rank in its group, and the
reference runs ``kernels.dense_attention`` on every group's tokens gathered in order (positions
0..L-1, no sharding) and scatters the result back. Outputs and gradients (vjp with one random
cotangent) are compared in layout space, so zigzag and strided layouts need no special casing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel import kernels, ring

B, N, H, D = 2, 64, 4, 8
AXES = ("data", "fsdp", "tensor", "seq", "expert")
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _mesh(data: int, seq: int):
  return jax.make_mesh((data, 1, 1, seq, 1), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _groups(kind: str, seq: int, n: int = N):
  """Layout indices of each independent sequence, in sequence order."""
  if kind == "contiguous":
    return [np.arange(n)]
  if kind == "zigzag":
    # x_layout = x[:, perm], so the sequence in order is x_layout[:, inverse(perm)].
    return [ring.inverse_permutation(ring.zigzag_permutation(n, seq))]
  if kind == "stride2":
    # Axis size 8, stride 2: rings {0,2,4,6} and {1,3,5,7}. The ring only ever combines the
    # blocks of its own members, so each ring is its own sequence: ring r is the blocks of devices
    # r, r+2, r+4, r+6 in that order. This is what USP relies on (each ring holds the whole
    # sequence for a different subset of heads). A wrong permutation (e.g. one ring over all 8)
    # would mix the two groups and fail the comparison.
    n_l = n // seq
    return [np.concatenate([np.arange(d * n_l, (d + 1) * n_l) for d in range(r, seq, 2)])
            for r in range(2)]
  raise ValueError(kind)


def _segments_in_order(L: int):
  """Two packed documents, then padding (the last quarter) as its own segment."""
  return np.repeat(np.arange(3, dtype=np.int32), [3 * L // 8, 3 * L // 8, L - 6 * L // 8])


def _inputs(K: int, groups, segments: bool, n: int = N):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, n, H, D), jnp.float32)
  k = jax.random.normal(ks[1], (B, n, K, D), jnp.float32)
  v = jax.random.normal(ks[2], (B, n, K, D), jnp.float32)
  w = jax.random.normal(ks[3], (B, n, H, D), jnp.float32)  # cotangent: grad of sum(out * w)
  pos = np.zeros(n, np.int32)
  seg = np.zeros(n, np.int32)
  for g in groups:
    pos[g] = np.arange(len(g))
    seg[g] = _segments_in_order(len(g))
  pos = jnp.broadcast_to(jnp.asarray(pos), (B, n))
  seg = jnp.broadcast_to(jnp.asarray(seg), (B, n)) if segments else None
  return q, k, v, w, kernels.make_mask(n, batch=B, q_positions=pos, q_segments=seg)


def _reference(q, k, v, mask, causal, groups):
  out = jnp.zeros(q.shape, jnp.float32)
  for g in groups:
    L = len(g)
    seg = None if mask.q_segments is None else mask.q_segments[:, g]
    m = kernels.make_mask(L, batch=B, q_segments=seg)  # positions 0..L-1 in sequence order
    out = out.at[:, g].set(kernels.dense_attention(q[:, g], k[:, g], v[:, g], causal=causal,
                                                   mask=m))
  return out


def _out_and_grads(attend, q, k, v, mask, w):
  o, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
  return (o, *vjp(w))


# (name, data, seq, layout, stride, causal, chunks, K, segments, n): covers contiguous, zigzag and
# bidirectional; GQA with 1, 2 and H kv heads; padding/segments; batch over data; a strided ring.
# The last case has one token per chunk, where a diagonal pair's min key position equals its max
# query position: the skip test must be strict (>) there or the token loses its own key.
CASES = [
    ("causal-contiguous", 1, 8, "contiguous", 1, True, 1, 2, False, N),
    ("causal-zigzag-mqa", 1, 8, "zigzag", 1, True, 2, 1, False, N),
    ("bidirectional-mha", 1, 8, "contiguous", 1, False, 1, 4, False, N),
    ("causal-zigzag-padding", 1, 8, "zigzag", 1, True, 2, 2, True, N),
    ("bidirectional-padding-data2xseq4", 2, 4, "contiguous", 1, False, 1, 1, True, N),
    ("causal-zigzag-data2xseq4-mha", 2, 4, "zigzag", 1, True, 2, 4, False, N),
    ("causal-stride2-padding", 1, 8, "stride2", 2, True, 1, 2, True, N),
    ("causal-zigzag-one-token-chunks", 1, 8, "zigzag", 1, True, 2, 2, False, 16),
]


@functools.lru_cache(maxsize=None)
def _ring_case(data, seq, layout, stride, causal, chunks, K, segments, n):
  """(ring outputs+grads, reference outputs+grads, compiled HLO text) of one case, once."""
  groups = _groups(layout, seq, n)
  q, k, v, w, mask = _inputs(K, groups, segments, n)
  spec = P("data", "seq") if data > 1 else P(None, "seq")

  def local(q, k, v, mask):
    return ring.ring_attention(q, k, v, causal=causal, mask=mask, axis_name="seq",
                               ring_size=seq // stride, stride=stride, chunks=chunks)

  sharded = jax.shard_map(local, mesh=_mesh(data, seq), in_specs=(spec, spec, spec, spec),
                          out_specs=spec)
  compiled = jax.jit(functools.partial(_out_and_grads, sharded)).lower(q, k, v, mask, w).compile()
  got = compiled(q, k, v, mask, w)
  want = jax.jit(functools.partial(
      _out_and_grads, lambda q, k, v, m: _reference(q, k, v, m, causal, groups)))(q, k, v, mask, w)
  return got, want, compiled.as_text()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_dense(case):
  got, want, _ = _ring_case(*case[1:])
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), err_msg=name, **TOL)


def test_compiled_step_rotates_with_collective_permute():
  _, _, hlo = _ring_case(*CASES[0][1:])
  assert "collective-permute" in hlo
  assert "all-gather" not in hlo  # K/V travel block by block, never gathered whole
  assert "conditional" in hlo  # causal chunk pairs are skipped at run time
  _, _, hlo_bidirectional = _ring_case(*CASES[2][1:])
  assert "conditional" not in hlo_bidirectional  # nothing to skip without a causal mask


@pytest.mark.parametrize("chunks", [1, 2], ids=["contiguous", "zigzag"])
def test_causal_work_per_device(chunks):
  """Counts the cond branches the forward really takes, per device and ring step."""
  P_ = 8
  layout = "zigzag" if chunks == 2 else "contiguous"
  q, k, v, _, mask = _inputs(2, _groups(layout, P_), segments=False)

  def local(q, k, v, mask):
    return ring.ring_pair_counts(q, k, v, causal=True, mask=mask, axis_name="seq",
                                 ring_size=P_, chunks=chunks)

  spec = P(None, "seq")
  counts = jax.jit(jax.shard_map(local, mesh=_mesh(1, P_), in_specs=(spec,) * 4,
                                 out_specs=P("seq")))(q, k, v, mask)
  counts = np.asarray(counts).reshape(P_, P_)  # [device, step]
  expected = np.array([[ring.pairs_computed(d, t, P_, chunks, True) for t in range(P_)]
                       for d in range(P_)])
  np.testing.assert_array_equal(counts, expected)
  if chunks == 2:
    # Balanced: every device does 3 chunk pairs at step 0 (its own diagonal) and 2 afterwards.
    assert (counts == counts[0]).all() and list(counts[0]) == [3] + [2] * (P_ - 1)
  else:
    # Contiguous: device i only attends the i + 1 blocks at or before its own.
    assert list(counts.sum(axis=1)) == list(range(1, P_ + 1))
  assert [ring.pairs_computed(d, t, P_, chunks, False) for d in range(P_)
          for t in range(P_)] == [chunks * chunks] * P_ * P_


def test_zigzag_permutation_layout():
  perm = ring.zigzag_permutation(32, 4)  # 8 chunks of 4
  shards = perm.reshape(4, 8) // 4  # chunk id of each element, per device
  for i in range(4):
    assert list(shards[i]) == [i] * 4 + [7 - i] * 4
  x = np.arange(32)
  np.testing.assert_array_equal(x[perm][ring.inverse_permutation(perm)], x)
  with pytest.raises(ValueError, match="multiple of 8"):
    ring.zigzag_permutation(36, 4)


def test_validation_errors_are_sentences():
  q, k, v, _, mask = _inputs(2, _groups("contiguous", 8), segments=False)
  spec = P(None, "seq")

  def traced(**kw):
    f = jax.shard_map(lambda q, k, v, m: ring.ring_attention(q, k, v, causal=True, mask=m,
                                                             axis_name="seq", **kw),
                      mesh=_mesh(1, 8), in_specs=(spec,) * 4, out_specs=spec)
    return jax.eval_shape(f, q, k, v, mask)

  with pytest.raises(ValueError, match="must equal the size 8"):
    traced(ring_size=4)
  with pytest.raises(ValueError, match="not divisible by chunks=3"):
    traced(ring_size=8, chunks=3)
