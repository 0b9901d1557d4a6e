"""parallel/hlo.py on small real compiled programs: collective counts, loop trip counts, bytes.

Also the sequence-parallel benchmark's expectations on a small attention layer: Ulysses moves
4·N·h/P elements per device (q, k, v and out), and the ring's collective-permute runs P-1 times.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import attention, hlo
from parallel import mesh as parallel_mesh

DEVICES = 8


def _compiled_text(fn, shape) -> str:
  """The compiled HLO of ``fn`` run per device on a float32 array of ``shape`` split over 8."""
  mesh = jax.make_mesh((DEVICES,), ("x",))
  x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("x")))
  body = jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  return jax.jit(body).lower(x).compile().as_text()


def test_all_to_all_count_and_bytes():
  text = _compiled_text(lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True),
                        (DEVICES * DEVICES, 16))  # [8, 16] per device
  comm = hlo.collectives(text, DEVICES)
  a2a = comm["by_op"]["all-to-all"]
  assert a2a["count"] == 1 and a2a["executions"] == 1, comm["ops"]
  assert a2a["buffer_bytes"] == DEVICES * 16 * 4
  assert a2a["wire_bytes"] == DEVICES * 16 * 4 * (DEVICES - 1) / DEVICES
  assert hlo.instructions(text, "all-to-all")


def test_all_gather_counts_the_gathered_result():
  text = _compiled_text(lambda a: jax.lax.all_gather(a, "x", tiled=True)[:4] * 2,
                        (DEVICES * 4, 16))  # [4, 16] per device
  gather = hlo.collectives(text, DEVICES)["by_op"]["all-gather"]
  assert gather["count"] == 1 and gather["executions"] == 1
  assert gather["buffer_bytes"] == DEVICES * 4 * 16 * 4


def test_collective_permute_in_a_loop_is_multiplied_by_its_trip_count():
  shift = [(i, (i + 1) % DEVICES) for i in range(DEVICES)]

  def ring(a):
    return jax.lax.fori_loop(0, 3, lambda _, b: jax.lax.ppermute(b, "x", shift) * 1.5, a)

  text = _compiled_text(ring, (DEVICES * 2, 16))
  comm = hlo.collectives(text, DEVICES)
  permute = comm["by_op"]["collective-permute"]
  assert permute["count"] == 1 and permute["executions"] == 3, comm["ops"]
  assert permute["buffer_bytes"] == permute["wire_bytes"] == 3 * 2 * 16 * 4
  assert comm["loops_of_unknown_length"] == 0
  assert "all-to-all" not in comm["by_op"] and "all-gather" not in comm["by_op"]


def test_one_pair_collective_permute_moves_its_operand():
  # A halo exchange on two devices is a permute with one pair: it crosses devices all the same.
  text = _compiled_text(lambda a: jax.lax.ppermute(a, "x", [(0, 1)]) + a, (DEVICES * 2, 16))
  comm = hlo.collectives(text, DEVICES)
  permute = comm["by_op"]["collective-permute"]
  assert permute["buffer_bytes"] == permute["wire_bytes"] == 2 * 16 * 4, comm["ops"]
  assert all("ppermute" in o["source"] for o in comm["ops"]), comm["ops"]


def test_parse_needs_an_entry_computation():
  try:
    hlo.parse("HloModule m\n")
  except ValueError as e:
    assert "ENTRY" in str(e)
  else:
    raise AssertionError("no error for a module without ENTRY")


def _attention_hlo(strategy: str, n: int, heads: int = 8, head_dim: int = 8):
  """The compiled forward of one causal sequence-parallel attention layer on seq=8."""
  sizes = dict(data=1, fsdp=1, tensor=1, seq=DEVICES, expert=1)
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(sizes))
  config = ml_collections.ConfigDict(dict(attention="dense", seq_strategy=strategy,
                                          usp_ulysses=0, block_size=8, rules=()))
  plan = attention.make_plan(config, sizes, num_heads=heads, num_kv_heads=heads, seq_len=n)
  fn = attention.attention_fn(plan, mesh)
  spec = NamedSharding(mesh, P(("data", "fsdp"), "seq", "tensor", None))
  q = jax.ShapeDtypeStruct((1, n, heads, head_dim), jnp.float32, sharding=spec)
  with jax.set_mesh(mesh):
    text = jax.jit(lambda q, k, v: fn(q, k, v, causal=True)).lower(q, q, q).compile().as_text()
  return plan, text


def test_ulysses_moves_four_n_h_over_p_per_device():
  n, heads, head_dim = 256, 8, 8
  plan, text = _attention_hlo("ulysses", n, heads, head_dim)
  assert plan.strategy == "ulysses"
  comm = hlo.collectives(text, DEVICES)
  formula = 4 * n * heads * head_dim / DEVICES * 4  # q, k, v and out, float32
  assert comm["by_op"]["all-to-all"]["buffer_bytes"] == formula, comm["by_op"]
  # Everything else is the int32 positions of the causal mask: a few percent at this width.
  assert abs(comm["buffer_bytes"] / formula - 1) <= 0.10, comm["by_op"]


def test_ring_permutes_p_minus_one_times_per_pass():
  plan, text = _attention_hlo("ring", 128)
  assert plan.strategy == "ring"
  trips = {o["times"] for o in hlo.collectives(text, DEVICES)["ops"]
           if o["op"] == "collective-permute"}
  assert trips == {plan.ring - 1}, trips
  assert plan.ring == DEVICES
  # K/V travel block by block; only the int32 positions may be gathered.
  assert all("f32" not in ins["type"] for ins in hlo.instructions(text, "all-gather"))
