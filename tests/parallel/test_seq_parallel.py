"""Sequence-parallel attention through the entry point vs the dense single-device reference.

Forward output and gradients w.r.t. q, k, v, for ulysses / ring / usp / allgather on the meshes
seq=8, data=2 x seq=4, fsdp=2 x seq=4, data=2 x tensor=2 x seq=2; causal and bidirectional; GQA
with 1, 2 and H KV heads; a padding (segment) mask. Plus the collectives in the compiled HLO and
the up-front validation sentences.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nets.attention import dot_product_attention
from parallel import attention, kernels
from parallel import hlo as parallel_hlo
from parallel import mesh as parallel_mesh

B, N, H, D = 4, 32, 8, 8
MESHES = {
    "seq8": dict(data=1, fsdp=1, tensor=1, seq=8, expert=1),
    "data2_seq4": dict(data=2, fsdp=1, tensor=1, seq=4, expert=1),
    "fsdp2_seq4": dict(data=1, fsdp=2, tensor=1, seq=4, expert=1),
    "data2_tensor2_seq2": dict(data=2, fsdp=1, tensor=2, seq=2, expert=1),
}
# usp needs a Ulysses group smaller than the seq axis; 2 works on every mesh above.
STRATEGIES = {"ulysses": 0, "ring": 0, "usp": 2, "allgather": 0}


def parallel_cfg(strategy, kernel="dense", usp_ulysses=0, block_size=8):
  return ml_collections.ConfigDict(dict(attention=kernel, seq_strategy=strategy,
                                        usp_ulysses=usp_ulysses, block_size=block_size, rules=()))


def inputs(num_kv_heads, seed=0, n=N):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, n, H, D)).astype(np.float32)
  k = rng.standard_normal((B, n, num_kv_heads, D)).astype(np.float32)
  v = rng.standard_normal((B, n, num_kv_heads, D)).astype(np.float32)
  w = rng.standard_normal((B, n, H, D)).astype(np.float32)  # random output cotangent
  # Padding: the last quarter of every other sequence is a separate segment.
  seg = np.ones((B, n), np.int32)
  seg[::2, 3 * n // 4:] = 2
  return q, k, v, w, seg


@functools.lru_cache(maxsize=None)
def reference(num_kv_heads, causal, padded, n=N):
  q, k, v, w, seg = inputs(num_kv_heads, n=n)
  seg = seg if padded else None

  def loss(q, k, v):
    o = dot_product_attention(q, k, v, causal=causal, segment_ids_BxS=seg)
    return jnp.sum(o * w), o

  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return np.asarray(o), [np.asarray(g) for g in grads]


def sharded(strategy, mesh_name, num_kv_heads, causal, padded, kernel="dense", permute=False,
            contiguous=False, n=N):
  sizes = MESHES[mesh_name]
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(sizes))
  plan = attention.make_plan(parallel_cfg(strategy, kernel, STRATEGIES[strategy]), sizes,
                             num_heads=H, num_kv_heads=num_kv_heads, seq_len=n,
                             contiguous=contiguous)
  fn = attention.attention_fn(plan, mesh)
  q, k, v, w, seg = inputs(num_kv_heads, n=n)
  seg = seg if padded else None
  perm = plan.permutation(n) if permute else None
  perm = np.arange(n) if perm is None else perm
  positions = np.broadcast_to(perm.astype(np.int32), (B, n))
  qkv = NamedSharding(mesh, P(("data", "fsdp"), "seq", "tensor", None))
  put = lambda x: jax.device_put(x[:, perm], qkv)

  def loss(q, k, v, w, positions, seg):
    o = fn(q, k, v, causal=causal, positions_BxS=positions, segment_ids_BxS=seg)
    return jnp.sum(o * w), o

  seq = NamedSharding(mesh, P(("data", "fsdp"), "seq"))
  args = (put(q), put(k), put(v), put(w), jax.device_put(positions, seq),
          None if seg is None else jax.device_put(seg[:, perm], seq))
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, o), grads = step(*args)
    hlo = step.lower(*args).compile().as_text()
  inv = np.argsort(perm)
  return (np.asarray(o)[:, inv], [np.asarray(g)[:, inv] for g in grads], plan, hlo)


def check(got, want):
  o, grads = got[0], got[1]
  np.testing.assert_allclose(o, want[0], rtol=2e-5, atol=2e-5)
  for name, g, r in zip("qkv", grads, want[1]):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("causal, num_kv_heads, padded", [(True, 2, True), (False, H, False)])
def test_strategy_matches_dense(strategy, mesh_name, causal, num_kv_heads, padded):
  got = sharded(strategy, mesh_name, num_kv_heads, causal, padded)
  assert got[2].strategy == strategy
  check(got, reference(num_kv_heads, causal, padded))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("mesh_name, num_kv_heads", [("seq8", 1), ("seq8", 8), ("data2_seq4", 1),
                                                     ("fsdp2_seq4", 1)])
def test_gqa_head_counts(strategy, mesh_name, num_kv_heads):
  # (One KV head cannot be split over tensor=2, so the tensor mesh uses 2 and H above.)
  check(sharded(strategy, mesh_name, num_kv_heads, True, True),
        reference(num_kv_heads, True, True))


def test_cudnn_kernel_falls_back_to_blockwise_for_float32_and_segments():
  q, k, v, w, seg = inputs(2)
  mask = kernels.make_mask(N, batch=B, q_segments=seg)
  got = kernels.cudnn_attention(q, k, v, causal=True, mask=mask, block_q=8, block_kv=8)
  np.testing.assert_allclose(got, kernels.dense_attention(q, k, v, causal=True, mask=mask),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ring", "usp"])
def test_zigzag_layout_gives_the_same_attention(strategy):
  got = sharded(strategy, "seq8", 2, True, True, permute=True)
  assert not np.array_equal(got[2].permutation(N), np.arange(N))
  check(got, reference(2, True, True))


@pytest.mark.parametrize("strategy", ["ring", "usp"])
def test_contiguous_layout_keeps_the_order_and_matches_dense(strategy):
  """make_plan(contiguous=True): no zigzag, so a linear recurrence's state can pass shard to shard.

  24 tokens over seq=8 leave 3 per device, which the ring's zigzag (two chunks per device) cannot
  split and make_plan refuses without contiguous, so the ring passing also shows one chunk per
  device is used.
  """
  got = sharded(strategy, "seq8", 2, True, True, permute=True, contiguous=True, n=24)
  assert got[2].strategy == strategy and got[2].permutation(24) is None
  assert "in order" in got[2].describe()
  check(got, reference(2, True, True, n=24))
  if strategy == "ring":
    with pytest.raises(ValueError, match="zigzag layout needs"):
      attention.make_plan(parallel_cfg(strategy), MESHES["seq8"], num_heads=H, num_kv_heads=2,
                          seq_len=24)


def test_blockwise_kernel_under_ulysses_matches_dense():
  check(sharded("ulysses", "data2_seq4", 2, True, True, kernel="blockwise"),
        reference(2, True, True))


def _collectives(text: str, op: str) -> list[str]:
  return [ins["line"] for ins in parallel_hlo.instructions(text, op)]


def test_ulysses_hlo_has_all_to_all_and_gathers_no_activations():
  hlo = sharded("ulysses", "seq8", 2, True, True)[3]
  assert _collectives(hlo, "all-to-all")
  # Only the int32 positions/segment ids are gathered; K/V (f32) never are.
  gathers = _collectives(hlo, "all-gather")
  assert all("f32" not in line.split("=")[1].split("all-gather")[0] for line in gathers), gathers


def test_ring_and_allgather_hlo_collectives():
  assert _collectives(sharded("ring", "seq8", 2, True, True)[3], "collective-permute")
  gathers = _collectives(sharded("allgather", "seq8", 2, True, True)[3], "all-gather")
  assert any("f32" in line for line in gathers)


@pytest.mark.parametrize("heads, sizes, strategy, want", [
    (8, dict(seq=8, tensor=1), "auto", ("ulysses", 8, 1)),
    (6, dict(seq=4, tensor=1), "auto", ("usp", 2, 2)),
    (3, dict(seq=4, tensor=1), "auto", ("ring", 1, 4)),
    (8, dict(seq=2, tensor=2), "auto", ("ulysses", 2, 1)),
    (8, dict(seq=1, tensor=2), "auto", ("local", 1, 1)),
])
def test_auto_picks_ulysses_when_heads_divide_else_usp_or_ring(heads, sizes, strategy, want):
  full = dict(data=1, fsdp=1, expert=1, **sizes)
  plan = attention.make_plan(parallel_cfg(strategy), full, num_heads=heads, num_kv_heads=1,
                             seq_len=48)
  assert (plan.strategy, plan.ulysses, plan.ring) == want
  assert plan.strategy in plan.describe()


@pytest.mark.parametrize("kw, message", [
    (dict(strategy="ulysses", heads=6, seq=4, seq_len=32),
     r"6 heads per device, which is not divisible by mesh.seq=4 as Ulysses needs; use "
     r"parallel.seq_strategy='ring' or 'usp'"),
    (dict(strategy="ulysses", heads=8, seq=4, seq_len=30), r"train.seq_len=30 is not divisible "
                                                           r"by mesh.seq=4"),
    (dict(strategy="ring", heads=8, seq=4, seq_len=36), r"not divisible by 2 x 4 \(ring length\)"),
    (dict(strategy="usp", heads=6, seq=4, seq_len=32, usp=4), r"usp_ulysses=4 must divide both"),
    (dict(strategy="spiral", heads=8, seq=4, seq_len=32), r"seq_strategy='spiral' is not one of"),
])
def test_invalid_combinations_raise_a_sentence(kw, message):
  cfg = parallel_cfg(kw["strategy"], usp_ulysses=kw.get("usp", 0))
  sizes = dict(data=1, fsdp=1, tensor=1, seq=kw["seq"], expert=1)
  with pytest.raises(ValueError, match=message):
    attention.make_plan(cfg, sizes, num_heads=kw["heads"], num_kv_heads=1,
                        seq_len=kw["seq_len"])


def test_blockwise_equals_dense_with_segments():
  q, k, v, w, seg = inputs(2)
  mask = kernels.make_mask(N, batch=B, q_segments=seg)
  for causal in (True, False):
    dense = lambda q, k, v: jnp.sum(kernels.dense_attention(q, k, v, causal=causal, mask=mask) * w)
    block = lambda q, k, v: jnp.sum(kernels.blockwise_attention(
        q, k, v, causal=causal, mask=mask, block_q=8, block_kv=16) * w)
    np.testing.assert_allclose(block(q, k, v), dense(q, k, v), rtol=1e-5)
    for g, r in zip(jax.grad(block, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
