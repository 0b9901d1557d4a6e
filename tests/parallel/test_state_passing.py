"""State-passing sequence parallelism for the linear recurrences vs ``chunked`` on one device.

Forward outputs and gradients (of a random projection of the outputs, w.r.t. q, k, v, log_decay and
beta) on the meshes seq=2, 4, 8, data=2 x seq=4 and tensor=2 x seq=4, for the delta rule with a
scalar decay, the scalar decay alone and the per-key decay alone, with document resets inside
shards and exactly at shard boundaries. Plus the compiled step's collectives, whose bytes do not
grow with the sequence, and the up-front validation sentences.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nets import linear_recurrence
from parallel import hlo, state_passing
from parallel import mesh as parallel_mesh

B, S, H, K, V = 2, 32, 4, 8, 6  # K != V, so a transposed state would not fit
CHUNK = 4  # several chunks per shard on the smaller meshes
MESHES = {
    "seq2": dict(seq=2),
    "seq4": dict(seq=4),
    "seq8": dict(seq=8),
    "data2_seq4": dict(data=2, seq=4),
    "tensor2_seq4": dict(tensor=2, seq=4),
}
KINDS = ("delta", "scalar", "per_key")  # delta rule + scalar decay; decay alone: scalar, per key
TOL = dict(rtol=1e-4, atol=1e-4)


def _sizes(mesh_name: str) -> dict:
  return {**dict(data=1, fsdp=1, tensor=1, seq=1, expert=1), **MESHES[mesh_name]}


@functools.lru_cache(maxsize=None)
def _mesh(mesh_name: str):
  sizes = _sizes(mesh_name)
  n = int(np.prod(list(sizes.values())))
  return parallel_mesh.make_mesh(ml_collections.ConfigDict(sizes), jax.devices()[:n])


def _parallel_cfg():
  return ml_collections.ConfigDict(dict(rules=()))


def _resets(seq_len: int) -> np.ndarray:
  """Resets from packed documents' segment ids, compared with the previous token globally.

  Row 0 starts documents at 5 (inside a shard on every mesh here) and at seq_len/2 (a shard
  boundary on all of them); row 1 at seq_len/4 (a boundary for seq=4 and 8, inside for seq=2)
  and at 3·seq_len/4 + 3 (inside).
  """
  starts = [[5, seq_len // 2], [seq_len // 4, 3 * seq_len // 4 + 3]]
  segments = np.stack([np.searchsorted(np.asarray(s), np.arange(seq_len), side="right")
                       for s in starts]).astype(np.int32)
  reset = np.zeros_like(segments, bool)
  reset[:, 1:] = segments[:, 1:] != segments[:, :-1]
  return reset


def _inputs(kind: str, seq_len: int = S):
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = normal(B, seq_len, H, K), normal(B, seq_len, H, K), normal(B, seq_len, H, V)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # the delta rule's keys are unit vectors
  decay_shape = (B, seq_len, H, K) if kind == "per_key" else (B, seq_len, H)
  log_decay = np.log(rng.uniform(0.7, 1.0, decay_shape)).astype(np.float32)
  beta = rng.uniform(0.1, 0.9, (B, seq_len, H)).astype(np.float32) if kind == "delta" else None
  w = normal(B, seq_len, H, V)  # the loss is sum(o * w)
  return dict(q=q, k=k, v=v, log_decay=log_decay, beta=beta), w, _resets(seq_len)


def _loss_and_grads(fn, args: dict, w, reset):
  names = [n for n, x in args.items() if x is not None]

  def loss(*xs):
    kw = {**args, **dict(zip(names, xs))}
    o = fn(kw["q"], kw["k"], kw["v"], kw["log_decay"], kw["beta"], reset_BxS=reset, chunk=CHUNK)
    return jnp.sum(o * w), o

  (_, o), grads = jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True)(
      *[args[n] for n in names])
  return o, dict(zip(names, grads))


@functools.lru_cache(maxsize=None)
def _reference(kind: str):
  args, w, reset = _inputs(kind)
  chunked = lambda *xs, reset_BxS, chunk: linear_recurrence.chunked(
      *xs, reset_BxS=reset_BxS, chunk=chunk)[0]
  o, grads = jax.jit(functools.partial(_loss_and_grads, chunked))(args, w, reset)
  return np.asarray(o), {n: np.asarray(g) for n, g in grads.items()}


@functools.lru_cache(maxsize=None)
def _sharded(mesh_name: str, kind: str, seq_len: int = S):
  """(outputs, gradients, plan, compiled HLO text) of the state-passing function on a mesh."""
  mesh = _mesh(mesh_name)
  plan = state_passing.make_plan(_parallel_cfg(), _sizes(mesh_name), num_heads=H,
                                 seq_len=seq_len)
  fn = state_passing.recurrence_fn(plan, mesh)
  args, w, reset = _inputs(kind, seq_len)
  # Inputs as the model's activations are laid out: batch over data, sequence over seq, heads
  # over tensor; shard_map takes them from there.
  lay = lambda x: jax.device_put(x, NamedSharding(
      mesh, P(("data", "fsdp"), "seq", *(("tensor",) if x.ndim > 2 else ()))))
  args = {n: None if x is None else lay(x) for n, x in args.items()}
  step = jax.jit(functools.partial(_loss_and_grads, fn))
  with jax.set_mesh(mesh):
    compiled = step.lower(args, lay(w), lay(reset)).compile()
    o, grads = compiled(args, lay(w), lay(reset))
  return np.asarray(o), {n: np.asarray(g) for n, g in grads.items()}, plan, compiled.as_text()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_state_passing_matches_one_device(mesh_name, kind):
  o, grads, plan, _ = _sharded(mesh_name, kind)
  assert plan.strategy == "state_passing" and plan.seq == MESHES[mesh_name]["seq"]
  want_o, want_grads = _reference(kind)
  np.testing.assert_allclose(o, want_o, err_msg="o", **TOL)
  assert set(grads) == set(want_grads) == {"q", "k", "v", "log_decay"} | (
      {"beta"} if kind == "delta" else set())
  for name, g in grads.items():
    np.testing.assert_allclose(g, want_grads[name], err_msg=f"d{name}", **TOL)


def test_boundary_state_matters():
  """The comparison above can fail: the shards' outputs without the passed state are wrong."""
  args, _, reset = _inputs("delta")
  shard = lambda x: x.reshape((B * 4, S // 4) + x.shape[2:])  # 4 shards as independent rows
  o_local = jax.jit(functools.partial(state_passing.local, chunk=CHUNK))(
      shard(args["q"]), shard(args["k"]), shard(args["v"]), shard(args["log_decay"]),
      shard(args["beta"]), reset_BxS=shard(reset))
  o_local = np.asarray(o_local).reshape(B, S, H, V)
  want = _reference("delta")[0]
  assert not np.allclose(o_local, want, **TOL)
  # Shard 2 of row 0 starts a document (seq_len/2 is a boundary and a reset), so nothing flows in.
  np.testing.assert_allclose(o_local[0, S // 2:3 * S // 4], want[0, S // 2:3 * S // 4], **TOL)


def test_collective_bytes_do_not_grow_with_the_sequence():
  """Per layer, each device gathers P·K·(K+V) numbers per head, for any sequence length."""
  comm = {}
  for seq_len in (64, 256):
    text = _sharded("seq4", "delta", seq_len)[3]
    comm[seq_len] = hlo.collectives(text, 4)
  short, long = comm[64], comm[256]
  assert short["buffer_bytes"] == long["buffer_bytes"] > 0, (short["by_op"], long["by_op"])
  gathered = 4 * B * H * K * (K + V) * 4  # P=4 shards of [B, H, K, V+K] float32
  assert short["by_op"]["all-gather"]["buffer_bytes"] == gathered, short["ops"]
  assert short["by_op"]["reduce-scatter"]["buffer_bytes"] == gathered, short["ops"]
  # Nothing else moves: the forward gathers the boundary states, the backward reduce-scatters
  # their gradients, and no activation crosses devices.
  assert set(short["by_op"]) == {"all-gather", "reduce-scatter"}, short["by_op"]


def test_one_seq_device_is_the_local_function():
  sizes = _sizes("tensor2_seq4") | dict(seq=1, data=4)
  plan = state_passing.make_plan(_parallel_cfg(), sizes, num_heads=H, seq_len=S)
  assert plan.strategy == "local"
  assert state_passing.recurrence_fn(plan, _mesh("seq8")) is state_passing.local


def test_invalid_layouts_raise_a_sentence():
  with pytest.raises(ValueError, match=r"train.seq_len=30 is not divisible by mesh.seq=4"):
    state_passing.make_plan(_parallel_cfg(), _sizes("seq4"), num_heads=H, seq_len=30)
  with pytest.raises(ValueError, match=r"model.num_heads=3 is not divisible by mesh.tensor=2"):
    state_passing.make_plan(_parallel_cfg(), _sizes("tensor2_seq4"), num_heads=3, seq_len=S)
  plan = state_passing.make_plan(_parallel_cfg(), _sizes("seq4"), num_heads=H, seq_len=S)
  fn = state_passing.recurrence_fn(plan, _mesh("seq4"))
  args, _, _ = _inputs("scalar", seq_len=30)
  with pytest.raises(ValueError, match=r"sequence of 30 tokens is not divisible by the 4 devices"):
    jax.eval_shape(lambda: fn(args["q"], args["k"], args["v"], args["log_decay"], None))


# The short causal convolutions: a halo exchange instead of the partitioner's re-layout.
CONV = 4  # taps


def _segments(seq_len: int) -> np.ndarray:
  """Segment ids whose documents start inside shards and exactly at shard boundaries."""
  return np.cumsum(_resets(seq_len), axis=1).astype(np.int32)


def _conv_loss_and_grads(fn, x, w, b, seg, proj):
  def loss(x, w, b):
    out = fn(x, w, b, seg)
    return jnp.sum(out * proj), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b)
  return out, grads


@functools.lru_cache(maxsize=None)
def _conv_case(mesh_name: str, seq_len: int = S):
  """(outputs, (dx, dw, db), compiled HLO) of the sharded conv, and the same from local_conv."""
  from nets import linear_mixers
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, seq_len, H, K)).astype(np.float32)
  w = rng.standard_normal((CONV, H, K)).astype(np.float32)
  b = rng.standard_normal((H, K)).astype(np.float32)
  proj = rng.standard_normal((B, seq_len, H, K)).astype(np.float32)
  seg = _segments(seq_len)
  want = jax.jit(functools.partial(_conv_loss_and_grads, linear_mixers.local_conv))(
      x, w, b, seg, proj)
  mesh = _mesh(mesh_name)
  plan = state_passing.make_plan(_parallel_cfg(), _sizes(mesh_name), num_heads=H,
                                 seq_len=seq_len)
  fn = state_passing.conv_fn(plan, mesh)
  lay = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  act = P(("data", "fsdp"), "seq", "tensor", None)
  args = (lay(x, act), lay(w, P(None, "tensor", None)), lay(b, P("tensor", None)),
          lay(seg, P(("data", "fsdp"), "seq")), lay(proj, act))
  step = jax.jit(functools.partial(_conv_loss_and_grads, fn))
  with jax.set_mesh(mesh):
    compiled = step.lower(*args).compile()
    got = compiled(*args)
  return jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want), compiled.as_text()


@pytest.mark.parametrize("mesh_name,seq_len", [("seq2", S), ("seq8", S), ("data2_seq4", S),
                                               ("tensor2_seq4", S), ("seq8", 16)])
def test_sharded_conv_matches_one_device(mesh_name, seq_len):
  """seq8 at 16 tokens: shards of 2 tokens, so the 3-step window spans two earlier shards."""
  (out, grads), (want_out, want_grads), _ = _conv_case(mesh_name, seq_len)
  np.testing.assert_allclose(out, want_out, err_msg="out", **TOL)
  for name, g, want in zip(("x", "w", "b"), grads, want_grads):
    np.testing.assert_allclose(g, want, err_msg=f"d{name}", **TOL)


def test_sharded_conv_needs_its_halo():
  """The comparison above can fail: shards convolved from zeros differ at their first taps."""
  from nets import linear_mixers
  (out, _), _, _ = _conv_case("seq8")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, S, H, K)).astype(np.float32)
  w = rng.standard_normal((CONV, H, K)).astype(np.float32)
  b = rng.standard_normal((H, K)).astype(np.float32)
  shards = x.reshape(B * 8, S // 8, H, K)
  seg = _segments(S).reshape(B * 8, S // 8)
  alone = np.asarray(linear_mixers.local_conv(shards, w, b, seg)).reshape(B, S, H, K)
  assert not np.allclose(alone, out, **TOL)


def test_sharded_conv_bytes_do_not_grow_with_the_sequence():
  """One collective-permute each way of B·(C−1)·H·K per device, at any sequence length."""
  comm = {n: hlo.collectives(_conv_case("seq4", n)[2], 4) for n in (64, 256)}
  short, long = comm[64], comm[256]
  assert short["buffer_bytes"] == long["buffer_bytes"] > 0, (short["by_op"], long["by_op"])
  # Forward: the inputs' halo (float32) and the segment ids' (int32); backward: the halo's
  # gradient back to the shard it came from. Plus the all-reduce of the kernel's and bias's
  # gradients over seq, which every replicated parameter has.
  halo, seg_halo = B * (CONV - 1) * H * K * 4, B * (CONV - 1) * 4
  assert short["by_op"]["collective-permute"]["buffer_bytes"] == 2 * halo + seg_halo, short["ops"]
  assert short["by_op"]["all-reduce"]["buffer_bytes"] == (CONV + 1) * H * K * 4, short["ops"]
  assert set(short["by_op"]) == {"collective-permute", "all-reduce"}, short["by_op"]
