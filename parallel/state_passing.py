"""Sequence parallelism for the linear recurrences (nets/linear_recurrence.py) by state passing.

The recurrence function nets call: fn(q, k, v, log_decay, beta, *, reset_BxS, chunk) -> o, the
outputs of ``linear_recurrence.chunked`` over the whole sequence. With the sequence split over the
seq mesh axis (the one the active rules give "act_seq") into P contiguous shards, each device runs
its shard from a zero state and the shards are joined by their boundary states (LASP-2 style):

  Per head the update is linear in (state, v) jointly, so one ``chunked`` call on the augmented
  value [v | 0_K] from the initial state [0_{KxV} | I_K] gives both halves of the shard's effect:
  outputs [o_local | q̂] and final state [S_local | T] with
    o_t     = o_local_t + S_inᵀ q̂_t       (q̂ = what reads the state entering the shard)
    S_leave = T S_in + S_local             (T [K, K]: the shard's transition)
  for the delta rule, the scalar and the per-key decay alike; a reset inside the shard zeroes T and
  q̂ from there on, as it should.
  Every device all-gathers the (T, S_local) of every shard over the seq axis and folds those
  before its own: S_in(0) = 0, S_in(r+1) = T_r S_in(r) + S_local_r.

Communication per layer and device is P·K·(K+V) numbers per head, whatever the sequence length;
autodiff transposes the all-gather into a reduce-scatter of the same size. The price is compute:
the shard's recurrence runs with K+V value columns instead of V.
The short causal convolutions before the recurrence (``conv_fn``) run on the same contiguous
shards after a halo exchange: a collective-permute of each shard's last conv_size − 1 inputs to
the next device, also independent of the sequence length.
Resets come from segment ids compared with the previous token outside the shard_map, so a document
starting exactly at a shard boundary needs nothing special. The sequence stays in contiguous order
(no zigzag), so attention layers of the same model use ``attention.make_plan(..., contiguous=True)``.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from nets import linear_mixers, linear_recurrence
from parallel import sharding

# Logical names of q [B, S, H|G, K]; v, log_decay, beta and the resets drop or keep trailing axes
# (q and k's G groups split over the heads axes like v's H heads: the config checks both divide).
# The key and value widths are never split: the state update needs whole rows and columns.
NAMES = ("act_batch", "act_seq", "act_heads")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What runs: "local" (one device holds whole sequences) or "state_passing" over ``seq``."""
  strategy: str
  seq: int  # devices the sequence is split over
  rules: tuple = sharding.RULES

  def describe(self) -> str:
    if self.strategy == "local":
      return "linear recurrence: local chunked form (no sequence parallelism)"
    return f"linear recurrence: state passing over seq={self.seq} (all-gather of boundary states)"


def make_plan(parallel_cfg, mesh_sizes: dict, *, num_heads: int, seq_len: int) -> Plan:
  """The plan for these mesh sizes; raises one sentence naming the fix for what cannot split."""
  rules = sharding.rules_from_config(parallel_cfg)
  _, seq_axes, head_axes = sharding.spec(NAMES, rules)
  seq, tp = sharding.axes_size(seq_axes, mesh_sizes), sharding.axes_size(head_axes, mesh_sizes)
  if seq_len % seq:
    raise ValueError(f"train.seq_len={seq_len} is not divisible by {sharding.axes_name(seq_axes)}="
                     f"{seq}; state passing gives each device seq_len/{seq} contiguous tokens.")
  if num_heads % tp:
    raise ValueError(f"model.num_heads={num_heads} is not divisible by "
                     f"{sharding.axes_name(head_axes)}={tp}, which splits the recurrence's heads; "
                     "choose a head count it divides.")
  return Plan("local" if seq == 1 else "state_passing", seq, rules)


def local(q, k, v, log_decay, beta=None, *, reset_BxS=None, chunk: int = 64):
  """The recurrence on whole sequences: ``linear_recurrence.chunked``'s outputs."""
  return linear_recurrence.chunked(q, k, v, log_decay, beta, reset_BxS=reset_BxS, chunk=chunk)[0]


def _check_split(what: str, S: int, plan: Plan, axis) -> None:
  if S % plan.seq:
    raise ValueError(f"the {what}'s sequence of {S} tokens is not divisible by the "
                     f"{plan.seq} devices of {sharding.axes_name(axis)} that split it.")


def recurrence_fn(plan: Plan, mesh: Mesh | None) -> Callable:
  """The function nets call: fn(q, k, v, log_decay, beta, *, reset_BxS=None, chunk=64) -> o."""
  if plan.strategy == "local":
    return local
  batch, seq, heads = sharding.spec(NAMES, plan.rules)
  axis = seq  # the mesh axis (or axes) the sequence is split over

  def fn(q, k, v, log_decay, beta=None, *, reset_BxS=None, chunk: int = 64):
    _check_split("recurrence", q.shape[1], plan, axis)
    specs = {3: P(batch, seq, heads), 4: P(batch, seq, heads, None)}
    args = [q, k, v, log_decay]
    in_specs = [specs[4], specs[4], specs[4], specs[log_decay.ndim]]
    if beta is not None:
      args.append(beta)
      in_specs.append(specs[3])
    if reset_BxS is not None:
      args.append(reset_BxS)
      in_specs.append(P(batch, seq))

    def body(q, k, v, log_decay, *rest):
      rest = list(rest)
      beta_l = rest.pop(0) if beta is not None else None
      reset_l = rest.pop(0) if reset_BxS is not None else None
      return _per_device(q, k, v, log_decay, beta_l, reset_l, chunk=chunk, axis_name=axis)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=specs[4],
                         check_vma=False)(*args)

  return fn


def conv_fn(plan: Plan, mesh: Mesh | None) -> Callable:
  """The short causal convolution nets call when training: fn(x [B, S, H, D], w [C, H, D],
  b [H, D], segment_ids [B, S] | None) -> conv output (before SiLU), as ``linear_mixers.local_conv``.

  Split over seq, each device convolves its own contiguous shard after a halo exchange: one
  collective-permute passes the last C − 1 inputs (and their segment ids) of every shard to the
  next; the first shard's are zeros. Per device that is B·(C−1)·H·D numbers at any sequence
  length (and the same back for the gradients), where leaving the shifted taps to the SPMD
  partitioner re-laid the whole activation out.
  """
  if plan.strategy == "local":
    return linear_mixers.local_conv
  batch, seq, heads = sharding.spec(NAMES, plan.rules)

  def fn(x_BxSxHxD, w_CxHxD, b_HxD, segment_ids_BxS=None):
    C = w_CxHxD.shape[0]
    _check_split("convolution", x_BxSxHxD.shape[1], plan, seq)
    args = [x_BxSxHxD, w_CxHxD, b_HxD]
    in_specs = [P(batch, seq, heads, None), P(None, heads, None), P(heads, None)]
    if segment_ids_BxS is not None:
      args.append(segment_ids_BxS)
      in_specs.append(P(batch, seq))

    def halo(a, s):
      """The C − 1 steps before this shard: from the previous shard, or from the previous
      ceil((C − 1)/s) shards when shards are shorter than the window."""
      tail = a[:, max(0, s - (C - 1)):]
      hops = -(-(C - 1) // s)
      parts = [jax.lax.ppermute(tail, seq, [(r, r + j) for r in range(plan.seq - j)])
               for j in range(hops, 0, -1)]
      return jnp.concatenate(parts, axis=1)[:, -(C - 1):]

    def body(x, w, b, *seg):
      s = x.shape[1]
      seg_l = seg[0] if seg else None
      seg_prev = None if seg_l is None else halo(seg_l, s)
      return linear_mixers.head_conv(x, w, b, halo(x, s), seg_l, seg_prev)[0]

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=P(batch, seq, heads, None), check_vma=False)(*args)

  return fn


def _per_device(q, k, v, log_decay, beta, reset_BxS, *, chunk: int, axis_name):
  """This device's outputs given its contiguous shard (inside shard_map over ``axis_name``)."""
  B, _, _, K = q.shape  # q and k may have fewer heads (groups) than v
  H, Vd = v.shape[2:]
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  v_aug = jnp.concatenate([v.astype(dtype), jnp.zeros(v.shape[:3] + (K,), dtype)], axis=-1)
  start_KxW = jnp.concatenate([jnp.zeros((K, Vd), dtype), jnp.eye(K, dtype=dtype)], axis=-1)
  o_aug, final_BxHxKxW = linear_recurrence.chunked(
      q, k, v_aug, log_decay, beta, initial_state=jnp.broadcast_to(start_KxW, (B, H, K, K + Vd)),
      reset_BxS=reset_BxS, chunk=chunk)
  o_local, qhat_BxSxHxK = o_aug[..., :Vd], o_aug[..., Vd:]
  # [P, B, H, K, V+K]: every shard's [S_local | T], in shard order along the seq axis.
  shards = jax.lax.all_gather(final_BxHxKxW, axis_name)

  def fold(state, shard):
    s_local, trans = shard[..., :Vd], shard[..., Vd:]
    return jnp.einsum("bhkj,bhjv->bhkv", trans, state) + s_local, state

  _, entering = jax.lax.scan(fold, jnp.zeros((B, H, K, Vd), o_aug.dtype), shards)
  s_in_BxHxKxV = jax.lax.dynamic_index_in_dim(entering, jax.lax.axis_index(axis_name),
                                              keepdims=False)
  return o_local + jnp.einsum("bshk,bhkv->bshv", qhat_BxSxHxK, s_in_BxHxKxV)
