"""Expert parallelism: the MoE layer's experts sharded over the ``expert`` mesh axis.

The ``expert`` axis shards two things: the experts' weights (logical name "expert") and, like a
data axis, the batch (``act_batch`` maps to data, fsdp and expert), so every device routes its own
tokens. Inside ``shard_map`` each device runs nets.moe.run_experts on its dispatch groups; the
assignments travel to the device that holds their expert by ``all_to_all`` over ``expert`` and
come back the same way. The other axes compose: fsdp-sharded expert weights are gathered on entry
(the in_specs ask for them unsharded over fsdp, as FSDP gathers every weight before use), the
tensor axis splits each expert's hidden width (Megatron MLP: column then row split, one psum), and
seq-sharded tokens are dispatched per sequence shard.

Dispatch groups (nets/moe.py): ``config.model.moe.groups`` batch groups (default: one per
data-parallel shard, data·fsdp·expert) times mesh.seq sequence chunks. Every device holds whole
groups, so capacity decisions never need another device's tokens.

The axes named above are the default rule table's (parallel/sharding.py RULES): every spec and
collective axis here comes from logical names through the active rules, config.parallel.rules
included.
"""

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from nets import moe
from parallel import sharding

# Logical names of the dispatched tokens [batch groups, seq chunks, T, E] and of the expert weights
# inside shard_map ("down" is [X, M, E], "gate"/"up" [X, E, M]); the embed dimension is None
# because FSDP-sharded weights are gathered on entry, as FSDP gathers every weight before use.
TOKEN_NAMES = ("act_batch", "act_seq", None, None)
DOWN_NAMES, UP_NAMES = ("expert", "mlp", None), ("expert", None, "mlp")


def batch_groups(moe_cfg: moe.Config, mesh_sizes: dict, rules) -> int:
  return moe_cfg.groups or sharding.data_parallel_size(mesh_sizes, rules)


def check(moe_cfg: moe.Config, mesh_sizes: dict, *, batch_sizes: dict, expert_width: int,
          rules):
  """One sentence for a MoE config that cannot run on this mesh (before anything compiles)."""
  ep_axes, tp_axes = sharding.spec(DOWN_NAMES, rules)[:2]
  ep, ep_name = sharding.axes_size(ep_axes, mesh_sizes), sharding.axes_name(ep_axes)
  tp, tp_name = sharding.axes_size(tp_axes, mesh_sizes), sharding.axes_name(tp_axes)
  if not moe_cfg.enabled:
    if ep > 1:
      raise ValueError(f"{ep_name}={ep} needs MoE layers, but model.moe.num_experts=0; set "
                       "model.moe.num_experts or use mesh.data for data parallelism.")
    return
  if moe_cfg.num_experts % ep:
    raise ValueError(f"model.moe.num_experts={moe_cfg.num_experts} is not divisible by "
                     f"{ep_name}={ep}; each expert-parallel device holds num_experts/{ep} "
                     "experts.")
  if expert_width % tp:
    raise ValueError(f"the expert width {expert_width} (model.moe.expert_dim, or the MLP width) "
                     f"is not divisible by {tp_name}={tp}.")
  dp = sharding.data_parallel_size(mesh_sizes, rules)
  groups = batch_groups(moe_cfg, mesh_sizes, rules)
  dp_name = "*".join(sharding.mesh_axes("act_batch", rules))
  if groups % dp:
    raise ValueError(f"model.moe.groups={groups} is not a multiple of the data-parallel size "
                     f"{dp_name}={dp}; every device must hold whole dispatch groups.")
  for name, size in batch_sizes.items():
    if size % groups:
      raise ValueError(f"{name}={size} is not divisible by the {groups} MoE dispatch groups "
                       f"(model.moe.groups, default {dp_name}).")


def layout(moe_cfg: moe.Config, mesh_sizes: dict, mesh: Mesh | None, rules) -> moe.Layout:
  """The dispatch layout the families pass to nets.moe.MoE; runs experts in shard_map on a mesh.

  Sequence chunks are the mesh axes of "act_seq": their size 1 in ``mesh_sizes`` on a mesh where
  they are larger (the sampler's model) keeps whole sequences on every device.
  """
  groups = batch_groups(moe_cfg, mesh_sizes, rules)
  seq_groups = sharding.axes_size(sharding.spec(TOKEN_NAMES, rules)[1], mesh_sizes)
  if mesh is None or mesh.size == 1:
    return moe.Layout(groups, seq_groups)
  ep_axes, tp_axes = sharding.spec(DOWN_NAMES, rules)[:2]
  return moe.Layout(groups, seq_groups, functools.partial(
      _sharded, mesh=mesh, rules=rules, ep=sharding.axes_size(ep_axes, mesh_sizes),
      tp=sharding.axes_size(tp_axes, mesh_sizes), seq=seq_groups > 1))


def _sharded(x, idx, gates, weights, *, cfg, capacity, dtype, mesh, rules, ep, tp, seq):
  batch_axes, seq_axes = sharding.spec(TOKEN_NAMES, rules)[:2]
  seq_axes = seq_axes if seq else None
  token_spec = P(batch_axes, seq_axes, None, None)
  weight_specs = {name: sharding.spec(DOWN_NAMES if name == "down" else UP_NAMES, rules)
                  for name in weights}
  ep_axis, tp_axis = sharding.spec(DOWN_NAMES, rules)[:2]
  token_axes = sharding.entry_axes(batch_axes) + sharding.entry_axes(seq_axes)

  def body(x, idx, gates, weights):
    y, dropped = moe.run_experts(x, idx, gates, weights, cfg=cfg, capacity=capacity, dtype=dtype,
                                 ep_axis=ep_axis if ep > 1 else None, ep=ep,
                                 tp_axis=tp_axis if tp > 1 else None)
    # The dropped count comes from the routing alone, so its all-reduce would be independent of
    # the experts' all-to-alls, and XLA:CPU may then start the two in different orders on
    # different devices, each waiting for the other (as the LM loss's token count did: see
    # train/tasks/lm.py token_loss). Tied to the experts' output, it is reduced after them.
    y, dropped = jax.lax.optimization_barrier((y, dropped))
    return y, jax.lax.psum(dropped, token_axes)

  return jax.shard_map(body, mesh=mesh, in_specs=(token_spec,) * 3 + (weight_specs,),
                       out_specs=(token_spec, P()), check_vma=False)(x, idx, gates, weights)
