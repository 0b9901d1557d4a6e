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
"""

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from nets import moe

TOKEN_AXES = ("data", "fsdp", "expert")  # the batch axes (parallel/sharding.py "act_batch")


def data_parallel(mesh_sizes: dict) -> int:
  """How many ways the batch is split: data · fsdp · expert."""
  return mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes["expert"]


def batch_groups(moe_cfg: moe.Config, mesh_sizes: dict) -> int:
  return moe_cfg.groups or data_parallel(mesh_sizes)


def check(moe_cfg: moe.Config, mesh_sizes: dict, *, batch_sizes: dict, expert_width: int):
  """One sentence for a MoE config that cannot run on this mesh (before anything compiles)."""
  ep = mesh_sizes["expert"]
  if not moe_cfg.enabled:
    if ep > 1:
      raise ValueError(f"mesh.expert={ep} needs MoE layers, but model.moe.num_experts=0; set "
                       "model.moe.num_experts or use mesh.data for data parallelism.")
    return
  if moe_cfg.num_experts % ep:
    raise ValueError(f"model.moe.num_experts={moe_cfg.num_experts} is not divisible by "
                     f"mesh.expert={ep}; each expert-parallel device holds num_experts/{ep} "
                     "experts.")
  if expert_width % mesh_sizes["tensor"]:
    raise ValueError(f"the expert width {expert_width} (model.moe.expert_dim, or the MLP width) "
                     f"is not divisible by mesh.tensor={mesh_sizes['tensor']}.")
  dp, groups = data_parallel(mesh_sizes), batch_groups(moe_cfg, mesh_sizes)
  if groups % dp:
    raise ValueError(f"model.moe.groups={groups} is not a multiple of the data-parallel size "
                     f"data*fsdp*expert={dp}; every device must hold whole dispatch groups.")
  for name, size in batch_sizes.items():
    if size % groups:
      raise ValueError(f"{name}={size} is not divisible by the {groups} MoE dispatch groups "
                       "(model.moe.groups, default data*fsdp*expert).")


def layout(moe_cfg: moe.Config, mesh_sizes: dict, mesh: Mesh | None) -> moe.Layout:
  """The dispatch layout the families pass to nets.moe.MoE; runs experts in shard_map on a mesh.

  ``mesh_sizes["seq"] == 1`` on a mesh whose seq axis is larger (the sampler's model) keeps
  whole sequences on every seq device.
  """
  groups = batch_groups(moe_cfg, mesh_sizes)
  if mesh is None or mesh.size == 1:
    return moe.Layout(groups, mesh_sizes["seq"])
  return moe.Layout(groups, mesh_sizes["seq"],
                    functools.partial(_sharded, mesh=mesh, ep=mesh_sizes["expert"],
                                      tp=mesh_sizes["tensor"], seq=mesh_sizes["seq"] > 1))


def _sharded(x, idx, gates, weights, *, cfg, capacity, dtype, mesh, ep, tp, seq):
  seq_axes = ("seq",) if seq else ()
  token_spec = P(TOKEN_AXES, seq_axes or None, None, None)  # [batch groups, seq chunks, T, ...]
  weight_specs = {name: P("expert", "tensor", None) if name == "down"
                  else P("expert", None, "tensor") for name in weights}

  def body(x, idx, gates, weights):
    y, dropped = moe.run_experts(x, idx, gates, weights, cfg=cfg, capacity=capacity, dtype=dtype,
                                 ep_axis="expert" if ep > 1 else None, ep=ep,
                                 tp_axis="tensor" if tp > 1 else None)
    return y, jax.lax.psum(dropped, TOKEN_AXES + seq_axes)

  return jax.shard_map(body, mesh=mesh, in_specs=(token_spec,) * 3 + (weight_specs,),
                       out_specs=(token_spec, P()), check_vma=False)(x, idx, gates, weights)
