"""The attention entry point nets call: local kernel + sequence-parallel strategy, by config.

``config.parallel.attention`` picks the local kernel (dense | blockwise | cudnn | splash | auto:
cuDNN on NVIDIA GPUs, Splash on TPUs, blockwise elsewhere; parallel/kernels.py) and
``config.parallel.seq_strategy`` how attention crosses the ``seq`` mesh axis:
  ulysses    all-to-all seq->heads, local attention over the whole sequence, all-to-all back;
  ring       K/V blocks travel around the seq axis with an online softmax (any head count);
  usp        Ulysses inside groups of ``usp_ulysses`` consecutive seq devices, ring across groups;
  allgather  all-gather K/V (the Megatron-SP-style baseline, for comparison);
  auto       Ulysses when the heads divide, else USP when some degree > 1 divides them, else ring.
With mesh.seq == 1 the local kernel runs alone (the compiler partitions batch and heads).
The seq (and batch and head) mesh axes are the ones the active rules give "act_seq" ("act_batch",
"act_heads"): ``seq`` (data/fsdp/expert, tensor) by default, config.parallel.rules can move them.

Outside attention nothing changes: activations keep their ("act_batch", "act_seq", ...) logical
names, so norms and MLPs stay sequence-sharded and per-device activation memory falls with P.
For causal LMs, ring and USP process the sequence in zigzag order (device i holds chunks i and
2P-1-i) so causal work is balanced; the LM task applies ``plan.permutation`` to tokens, targets
and positions (the loss is a sum over tokens, so the order does not change it). Bidirectional
vision models keep their patch order: without a causal mask every ring step is equal work.
``make_plan(..., contiguous=True)`` keeps the sequence in order (device i holds the i-th block)
for models whose other layers need it: a linear recurrence passes its state from each block to
the next (parallel/state_passing.py). Ring and USP then run unbalanced, device i attending i + 1
blocks.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from parallel import kernels, ring, sharding, ulysses

STRATEGIES = ("auto", "ulysses", "ring", "usp", "allgather")
KERNEL_NAMES = tuple(sorted(kernels.KERNELS)) + ("auto",)
# The logical names nets give q; k and v enter the kernel with the same spec, since grouped-query
# pairing needs their heads split like the query heads. The rules turn them into mesh axes.
QKV_NAMES = ("act_batch", "act_seq", "act_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What runs: the resolved strategy and kernel, and the degrees along the seq axis."""
  strategy: str  # "local" when mesh.seq == 1
  kernel: str
  seq: int  # mesh.seq
  ulysses: int  # all-to-all group size (1 for ring/allgather/local)
  ring: int  # ring length (1 for ulysses/allgather/local)
  block_size: int
  rules: tuple = sharding.RULES  # the active rule table (config.parallel.rules rows first)
  contiguous: bool = False  # ring/usp on the sequence in order instead of zigzag

  def describe(self) -> str:
    if self.strategy == "local":
      return f"attention: local {self.kernel} kernel (no sequence parallelism)"
    detail = {"ulysses": f"all-to-all over seq={self.seq}", "ring": f"ring of {self.ring}",
              "usp": f"Ulysses groups of {self.ulysses} x ring of {self.ring}",
              "allgather": f"K/V all-gather over seq={self.seq}"}[self.strategy]
    kernel = "" if self.strategy == "ring" else f", local {self.kernel} kernel"
    order = ", sequence in order" if self.contiguous and self.strategy in ("ring", "usp") else ""
    return f"attention: {self.strategy} ({detail}{kernel}{order})"

  def permutation(self, seq_len: int) -> np.ndarray | None:
    """Sequence order the steps apply before the model (zigzag for ring-based strategies)."""
    if self.strategy in ("ring", "usp") and not self.contiguous:
      return ring.zigzag_permutation(seq_len, self.ring)
    return None


def make_plan(parallel_cfg, mesh_sizes: dict, *, num_heads: int, num_kv_heads: int,
              seq_len: int, contiguous: bool = False, position_masks: bool = False) -> Plan:
  """Resolves "auto" and validates the combination; raises one sentence naming the fix.

  ``contiguous=True``: ring and USP keep the sequence in order (no zigzag permutation).
  ``position_masks=True``: the model's causal mask is in its positions, not in token order
  (VAR's block-causal mask by scale), which the cuDNN and Splash kernels do not read: "auto"
  then picks blockwise, and naming either of them is refused.
  """
  strategy, kernel_name = parallel_cfg.seq_strategy, parallel_cfg.attention
  if strategy not in STRATEGIES:
    raise ValueError(f"config.parallel.seq_strategy={strategy!r} is not one of {STRATEGIES}.")
  if kernel_name not in KERNEL_NAMES:
    raise ValueError(f"config.parallel.attention={kernel_name!r} is not one of {KERNEL_NAMES}.")
  kernel = kernels.pick_kernel(kernel_name)
  if position_masks and kernel in ("cudnn", "splash"):
    if kernel_name != "auto":
      raise ValueError(f"parallel.attention={kernel_name!r} masks causally by token order, but "
                       "this model's mask is in its positions (block-causal by scale); use "
                       "'auto' or 'blockwise'.")
    kernel = "blockwise"
  rules = sharding.rules_from_config(parallel_cfg)
  _, seq_axes, head_axes, _ = sharding.spec(QKV_NAMES, rules)
  P, tp = sharding.axes_size(seq_axes, mesh_sizes), sharding.axes_size(head_axes, mesh_sizes)
  seq_name, tp_name = sharding.axes_name(seq_axes), sharding.axes_name(head_axes)
  heads = num_heads // tp  # query heads on one tensor shard
  block = int(parallel_cfg.block_size)
  if seq_len % P:
    raise ValueError(f"train.seq_len={seq_len} is not divisible by {seq_name}={P}; sequence "
                     f"parallelism gives each device seq_len/{P} tokens.")
  if P == 1:
    plan = Plan("local", kernel, 1, 1, 1, block, rules)
  elif strategy == "auto":
    if heads % P == 0:
      plan = Plan("ulysses", kernel, P, P, 1, block, rules)
    else:
      u = max(d for d in range(1, P + 1) if P % d == 0 and heads % d == 0)
      plan = Plan("usp" if u > 1 else "ring", kernel, P, u, P // u, block, rules)
  elif strategy == "ulysses":
    if heads % P:
      raise ValueError(
          f"model.num_heads={num_heads} split over {tp_name}={tp} leaves {heads} heads per "
          f"device, which is not divisible by {seq_name}={P} as Ulysses needs; use "
          f"parallel.seq_strategy='ring' or 'usp' (or 'auto'), or a {seq_name} dividing {heads}.")
    plan = Plan("ulysses", kernel, P, P, 1, block, rules)
  elif strategy == "usp":
    u = int(parallel_cfg.usp_ulysses) or max(
        d for d in range(1, P + 1) if P % d == 0 and heads % d == 0)
    if P % u or heads % u:
      raise ValueError(f"parallel.usp_ulysses={u} must divide both {seq_name}={P} and the {heads} "
                       "heads per tensor shard; set it to a common divisor (0 picks one).")
    plan = Plan("usp", kernel, P, u, P // u, block, rules)
  else:
    plan = Plan(strategy, kernel, P, 1, P if strategy == "ring" else 1, block, rules)
  plan = dataclasses.replace(plan, contiguous=contiguous)
  if plan.strategy in ("ring", "usp") and not contiguous and seq_len % (2 * plan.ring):
    raise ValueError(f"train.seq_len={seq_len} is not divisible by 2 x {plan.ring} (ring length), "
                     f"which {plan.strategy} attention's zigzag layout needs; use a multiple of "
                     f"{2 * plan.ring}.")
  attended = seq_len if plan.strategy in ("local", "ulysses", "allgather") else None
  if plan.kernel in ("blockwise", "cudnn", "splash") and attended is not None:  # or their fallback
    local_q = seq_len // P if plan.strategy == "allgather" else seq_len
    for n in {local_q, attended}:
      if n % min(block, n):
        raise ValueError(f"parallel.block_size={block} does not divide the attended length {n}; "
                         "choose a block size that divides it.")
  return plan


def attention_fn(plan: Plan, mesh: Mesh | None) -> Callable:
  """The function nets call: fn(q, k, v, *, causal, positions_BxS=None, segment_ids_BxS=None,
  bias_HxSxT=None); an additive bias (Swin's windows) needs the local strategy."""
  kernel = kernels.KERNELS[plan.kernel]
  if plan.kernel in ("blockwise", "cudnn", "splash"):  # cudnn/splash fall back to blockwise
    kernel = functools.partial(kernel, block_q=plan.block_size, block_kv=plan.block_size)

  def local(q, k, v, *, causal, positions_BxS=None, segment_ids_BxS=None, bias_HxSxT=None):
    mask = kernels.make_mask(q.shape[1], batch=q.shape[0], q_positions=positions_BxS,
                             q_segments=segment_ids_BxS)
    return kernel(q, k, v, causal=causal, mask=mask, bias=bias_HxSxT)

  if plan.strategy == "local":
    if plan.kernel == "splash" and mesh is not None:
      # Whole sequences per device: a plan is local also when sampling on a mesh with seq > 1.
      return functools.partial(_per_device_under_mesh, local=local, sharded=functools.partial(
          _sharded, per_device=kernel, mesh=mesh, rules=plan.rules, seq_sharded=False))
    return local
  axis = sharding.spec(QKV_NAMES, plan.rules)[1]  # the mesh axis the sequence is split over
  chunks = 1 if plan.contiguous else 2  # sequence chunks per device: in order, or zigzag's two
  if plan.strategy == "ulysses":
    per_device = functools.partial(ulysses.ulysses_attention, kernel=kernel, axis_name=axis,
                                   degree=plan.seq)
  elif plan.strategy == "allgather":
    per_device = functools.partial(ulysses.allgather_attention, kernel=kernel, axis_name=axis)
  elif plan.strategy == "ring":
    per_device = functools.partial(ring.ring_attention, axis_name=axis, ring_size=plan.ring,
                                   stride=1, chunks=chunks)
  else:
    per_device = functools.partial(_usp, axis_name=axis, ulysses_degree=plan.ulysses,
                                   ring_size=plan.ring, chunks=chunks)
  return functools.partial(_sharded, per_device=per_device, mesh=mesh, rules=plan.rules)


def _per_device_under_mesh(q, k, v, *, local, sharded, **kwargs):
  """The local kernel per device in shard_map when a mesh is set (jit), else directly (pmap).

  Mosaic (Pallas TPU) kernels cannot be partitioned by the compiler: under jit over several
  devices they must run in shard_map; inside pmap the arrays already are one device's.
  """
  if jax.sharding.get_abstract_mesh().empty or kwargs.get("bias_HxSxT") is not None:
    return local(q, k, v, **kwargs)  # with a bias Splash runs blockwise, which XLA partitions
  return sharded(q, k, v, **kwargs)


def _usp(q, k, v, *, causal, mask, axis_name, ulysses_degree, ring_size, chunks):
  """Ulysses within consecutive groups of the seq axis, ring attention across the groups."""
  groups = ulysses.consecutive_groups(ulysses_degree * ring_size, ulysses_degree)
  q, k, v, group_mask = ulysses.seq_to_heads(q, k, v, mask, axis_name=axis_name,
                                             degree=ulysses_degree, groups=groups)
  o = ring.ring_attention(q, k, v, causal=causal, mask=group_mask, axis_name=axis_name,
                          ring_size=ring_size, stride=ulysses_degree, chunks=chunks)
  return ulysses.heads_to_seq(o, axis_name=axis_name, groups=groups)


def _sharded(q, k, v, *, causal, positions_BxS=None, segment_ids_BxS=None, bias_HxSxT=None,
             per_device, mesh, rules, seq_sharded=True):
  """Runs ``per_device`` in shard_map, q/k/v split as the rules split QKV_NAMES.

  ``seq_sharded=False`` keeps whole sequences on every device (the local kernel on a mesh).
  """
  if bias_HxSxT is not None:  # families with a bias (Swin) are not sequence-parallel
    raise ValueError("an additive attention bias runs only with the local attention strategy "
                     "(mesh.seq=1).")
  B, N = q.shape[:2]
  if positions_BxS is None:
    positions_BxS = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  batch, seq, heads, head_dim = sharding.spec(QKV_NAMES, rules)
  seq = seq if seq_sharded else None
  qkv_spec, seq_spec = P(batch, seq, heads, head_dim), P(batch, seq)
  has_segments = segment_ids_BxS is not None

  def body(q, k, v, positions, *segments):
    seg = segments[0] if has_segments else None
    return per_device(q, k, v, causal=causal, mask=kernels.Mask(positions, positions, seg, seg))

  args = (q, k, v, positions_BxS.astype(jnp.int32)) + ((segment_ids_BxS,) if has_segments else ())
  specs = (qkv_spec,) * 3 + (seq_spec,) * (2 if has_segments else 1)
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                       check_vma=False)(*args)
