"""The one logical->mesh rule table, sharded initialisation, and batch sharding."""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis -> mesh axis (or axes). Names not listed are replicated; a mesh axis already used
# earlier in the same array's spec is not reused (so ("act_batch", ..., "embed") never double-books
# fsdp). Earlier rows win; config.parallel.rules rows are placed before these.
RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp", "expert")),  # expert: data-parallel outside the MoE layers
    ("act_seq", "seq"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
)


def rules_from_config(parallel_cfg) -> tuple[tuple[str, Any], ...]:
  """RULES with the user's override rows (config.parallel.rules) taking precedence."""
  extra = tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                for name, axes in parallel_cfg.rules)
  return extra + RULES


def spec(logical: tuple, rules) -> P:
  """The mesh PartitionSpec of an array whose dimensions have these logical names.

  flax's resolution: rows in order, a row applies only when its mesh axes are still free in this
  spec, so a mesh axis used earlier is not reused. shard_map specs go through here too.
  """
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def entry_axes(entry) -> tuple[str, ...]:
  """One PartitionSpec entry (None, an axis or a tuple of axes) as a tuple of mesh axes."""
  return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def mesh_axes(logical: str, rules) -> tuple[str, ...]:
  """The mesh axes the rules shard one logical axis over; () when it is replicated."""
  return entry_axes(spec((logical,), rules)[0])


def axes_size(axes, mesh_sizes: dict) -> int:
  """How many ways these mesh axes (a spec entry or a tuple) split a dimension."""
  return math.prod(mesh_sizes[a] for a in entry_axes(axes))


def axes_name(axes) -> str:
  """The config keys of these mesh axes for messages: "mesh.tensor", "mesh.data*mesh.fsdp"."""
  return "*".join(f"mesh.{a}" for a in entry_axes(axes)) or "no mesh axis"


def unsplit(mesh_sizes: dict, rules, *logical: str) -> dict:
  """These mesh sizes with the axes of the given logical names counted as 1.

  What a model built from them sees: e.g. "act_seq" unsplit keeps whole sequences on every device
  (sampling) although the mesh's sequence axes are larger.
  """
  return {**mesh_sizes, **{a: 1 for name in logical for a in mesh_axes(name, rules)}}


def data_parallel_size(mesh_sizes: dict, rules) -> int:
  """How many ways the batch is split: the product of the mesh axes of "act_batch"."""
  return axes_size(mesh_axes("act_batch", rules), mesh_sizes)


def state_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree of logically-partitioned (boxed) abstract values."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_boxed: Any, shardings: Any, what: str = "parameter") -> None:
  """Raises one sentence naming the first array whose sharded dimension does not divide evenly."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_boxed))
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes, n = entry_axes(axes), axes_size(axes, sharding.mesh.shape)
      if size % n:
        raise ValueError(f"{what} {jax.tree_util.keystr(path)} has size {size} in dimension {dim}, "
                         f"which mesh axes {axes} (size {n}) cannot split evenly; change the model "
                         "size or config.mesh.")


def abstract_and_shardings(init_boxed: Callable[[], Any], mesh: Mesh, rules):
  """Shapes and shardings of ``init_boxed()`` without allocating or compiling anything.

  ``init_boxed`` takes no arguments and returns a pytree whose leaves may be nn.Partitioned boxes
  (their logical names decide the sharding). Returns (ShapeDtypeStructs carrying their shardings,
  shardings); the structs are also the restore target for checkpoints.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_boxed)
    shardings = state_shardings(abstract, mesh, rules)
  check_divisible(abstract, shardings)
  structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         nn.unbox(abstract), shardings)
  return structs, shardings


# The initialisation runs once and is all random-number generation (the model's forward is dead
# code in it); XLA:CPU lowers each parameter's threefry to rolled loops whose LLVM optimisation
# takes most of its compile (the VQ tokenizer's: 12 s at the default level, 2 s at 0). On CPU it
# compiles at backend level 0; the values are the same draws (the integer threefry is exact; a
# normal initialiser's erf-inverse may differ in the last bit from the default level's).
_CPU_INIT_COMPILE = {"xla_backend_optimization_level": 0}


def init_sharded(init_boxed: Callable[[], Any], shardings: Any, mesh: Mesh, rules):
  """Runs ``init_boxed`` under jit so every array is created directly in its target sharding."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    cpu = mesh.devices.flat[0].platform == "cpu"
    return jax.jit(lambda: nn.unbox(init_boxed()), out_shardings=shardings,
                   compiler_options=_CPU_INIT_COMPILE if cpu else None)()


def logical_sharding(mesh: Mesh, rules, logical: tuple) -> NamedSharding:
  """The NamedSharding of an array whose dimensions have these logical names."""
  return NamedSharding(mesh, spec(logical, rules))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, seq, ...] input: batch over the data axes, seq over the seq axis."""
  return logical_sharding(mesh, rules, ("act_batch", "act_seq") + (None,) * (ndim - 2))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules,
                 shardings: dict | None = None) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global arrays sharded over the mesh.

  ``shardings`` gives each entry's sharding (a task's batch layout); by default [batch, seq, ...].
  """
  return {k: jax.make_array_from_process_local_data(
      shardings[k] if shardings else batch_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def stack_replicas(tree: Any, mesh: Mesh) -> Any:
  """A replicated pytree viewed as [devices, ...] arrays (one row per device), without copying.

  The pmap loop's step takes its state this way; every device's row is that device's own copy of
  the replicated array, so the view costs nothing.
  """
  def stack(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(
        (x.sharding.num_devices,) + x.shape, _rows(mesh), [s.data[None] for s in shards])
  return jax.tree.map(stack, tree)


def unstack_replicas(tree: Any, mesh: Mesh) -> Any:
  """The inverse of ``stack_replicas`` for rows that are equal on every device (pmean'd state)."""
  def unstack(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(
        x.shape[1:], replicated(mesh), [s.data.reshape(x.shape[1:]) for s in shards])
  return jax.tree.map(unstack, tree)


def per_device_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The pmap loop's batch: this process's rows split into [local devices, rows per device, ...].

  Device i of the data axis gets the same rows as in the mesh loop's batch sharding.
  """
  n = len(mesh.local_devices)
  return {k: jax.make_array_from_process_local_data(
      _rows(mesh), v.reshape(n, v.shape[0] // n, *v.shape[1:])) for k, v in local.items()}


def _rows(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or None))


def bytes_per_device(abstract_boxed: Any, sizes: dict[str, int], rules) -> int:
  """Bytes one device holds of a logically-named abstract pytree on a mesh of these axis sizes.

  Needs no devices (pod-scale configs are checked on a laptop): each leaf's logical names go
  through the rule table to mesh axes, and each sharded dimension is divided by their sizes.
  """
  is_spec = lambda x: isinstance(x, P)
  specs = jax.tree.leaves(nn.get_partition_spec(abstract_boxed), is_leaf=is_spec)
  leaves = jax.tree.leaves(nn.unbox(abstract_boxed))
  total = 0
  for leaf, names in zip(leaves, specs):
    mesh_spec = spec(tuple(names), rules) if len(names) else P()
    shape = list(leaf.shape)
    for dim, axes in enumerate(mesh_spec):
      shape[dim] = -(-shape[dim] // axes_size(axes, sizes))
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total
