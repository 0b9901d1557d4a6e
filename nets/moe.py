"""Mixture-of-Experts feed-forward layer: token-choice top-k routing, usable in any family's MLP slot.

Router: logits = x · W_r in float32 -> softmax scores (or sigmoid scores, DeepSeek-V3 style) -> the
top-k experts of each token; the gates are the chosen scores, renormalised over the k when
``normalize_gates`` (sigmoid scores are always renormalised). Experts are SwiGLU or GELU MLPs
without biases, stacked on a leading expert axis ([X, E, M], logical name "expert", so the
``expert`` mesh axis shards them). Optional shared experts (DeepSeekMoE / DiT-MoE): a dense MLP of
width ``shared_experts · M`` that every token passes through, added to the routed output.

Two ways to run the routed experts (``capacity_factor``):
  0 (dropless)  the token-expert assignments are sorted by expert and multiplied with grouped
                matmuls (``jax.lax.ragged_dot``; block-padded batched matmuls on CPU, see
                ``grouped_mlp``); no assignment is ever dropped.
  > 0           each expert takes at most C = ceil(capacity_factor · T·k / X) assignments per
                dispatch group of T tokens; the rest are dropped (that choice contributes zero,
                the remaining gates are not renormalised). Priority (GShard): every token's first
                choice before any second choice, and within a choice, token order.

Dispatch groups: the batch is cut into ``Layout.batch_groups`` contiguous groups of sequences and
each sequence into ``Layout.seq_groups`` chunks; capacity is per (batch group, chunk). The train
loop sets one batch group per data-parallel shard and one chunk per seq shard, so a group is what
one device holds; because the groups are fixed by the config and not by placement, an
expert-parallel run and a single-device run with the same groups compute the same function.

Auxiliary losses, sown into the "aux" collection and read back by ``apply_with_aux``:
  balance  N_E · Σ_i f_i · p_i, f_i = fraction of the T·k assignments routed to expert i (before
           any dropping), p_i = mean router probability of expert i (sigmoid scores normalised per
           token); equals 1 when routing is uniform. ``balance="global"``: f and p over the whole
           global batch, i.e. f synchronised across data-parallel devices ("Demons in the Detail");
           ``"micro"``: per batch group (each data-parallel rank's micro-batch), then averaged.
  z        mean over tokens of logsumexp(logits)² (ST-MoE router z-loss).
The loss adds ``aux_loss_coef · balance + z_loss_coef · z`` (the mean over MoE layers); the
per-expert load fractions and the dropped fraction are logged with them.

``run_experts`` is the per-device computation. Without a mesh it runs on the whole batch; with one,
parallel/moe.py runs it inside ``shard_map`` with ``ep_axis`` set, and the assignments travel to
the devices holding their experts by ``all_to_all`` and come back the same way.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

ROUTERS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu")
BALANCE = ("global", "micro")
# The expert matmul outputs are batched over experts (or are ragged_dot), which the dot-based
# remat policies skip; this name lets train.remat='selective' keep them (nets.layers.remat).
EXPERT_MATMUL = "moe_expert_matmul"


@dataclasses.dataclass(frozen=True)
class Config:
  """``config.model.moe``; ``num_experts=0`` means a dense MLP (no MoE)."""
  num_experts: int = 0
  top_k: int = 2
  expert_dim: int = 0  # hidden width of one expert (0: the family's MLP width)
  shared_experts: int = 0  # dense experts every token uses (hidden width shared_experts·expert_dim)
  every: int = 1  # MoE replaces the MLP of every k-th layer (the last layer of each k)
  router: str = "softmax"  # one of ROUTERS
  normalize_gates: bool = True  # renormalise the top-k gates to sum to 1
  activation: str = "swiglu"  # one of ACTIVATIONS
  capacity_factor: float = 0.0  # 0: dropless
  balance: str = "global"  # one of BALANCE
  groups: int = 0  # batch groups for capacity and "micro" balance (0: the data-parallel size)
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 0.001

  @classmethod
  def from_config(cls, moe_cfg) -> "Config":
    """From ``config.model.moe`` (a ConfigDict, dict, None or a Config)."""
    if isinstance(moe_cfg, cls):
      return moe_cfg
    if moe_cfg is None:
      moe_cfg = {}
    given = dict(moe_cfg.to_dict() if hasattr(moe_cfg, "to_dict") else moe_cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ValueError(f"config.model.moe has unknown field(s) {unknown}; known fields: "
                       f"{sorted(fields)}.")
    cfg = cls(**given)
    cfg.validate()
    return cfg

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0

  def validate(self):
    if self.num_experts < 0:
      raise ValueError(f"model.moe.num_experts={self.num_experts} must be >= 0 (0 = dense MLP).")
    if not self.enabled:
      return
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"model.moe.top_k={self.top_k} must be between 1 and "
                       f"model.moe.num_experts={self.num_experts}.")
    for name, allowed in (("router", ROUTERS), ("activation", ACTIVATIONS),
                          ("balance", BALANCE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.moe.{name}={getattr(self, name)!r} is not one of {allowed}.")
    for name in ("expert_dim", "shared_experts", "groups"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.moe.{name}={getattr(self, name)} must be >= 0.")
    if self.every < 1:
      raise ValueError(f"model.moe.every={self.every} must be >= 1.")
    if self.capacity_factor < 0:
      raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be >= 0 "
                       "(0 = dropless).")

  def hidden(self, mlp_dim: int) -> int:
    return self.expert_dim or mlp_dim

  def capacity(self, tokens: int) -> int:
    """Slots per expert for a dispatch group of ``tokens`` tokens (0 when dropless)."""
    if not self.capacity_factor:
      return 0
    return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

  def num_params(self, d_model: int, mlp_dim: int) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer: router + routed + shared experts."""
    per_expert = (3 if self.activation == "swiglu" else 2) * d_model * self.hidden(mlp_dim)
    router, shared = d_model * self.num_experts, self.shared_experts * per_expert
    return (router + self.num_experts * per_expert + shared,
            router + self.top_k * per_expert + shared)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the batch is grouped for dispatch, and who runs the experts (set by parallel/moe.py)."""
  batch_groups: int = 1
  seq_groups: int = 1
  # fn(x_GxCxTxE, idx_GxCxTxK, gates_GxCxTxK, weights, *, cfg, capacity, activation, dtype)
  #   -> (y_GxCxTxE, dropped assignments); None: ``run_experts`` on the whole batch.
  experts_fn: Callable | None = None


# ---------------------------------------------------------------------------------------------
# Per-device expert computation (no mesh names; collectives only through the axis arguments).


def _mlp(x, weights, activation: str, matmul):
  """The expert MLP given a matmul(x, w) that knows which expert each row belongs to."""
  named = lambda a, w: checkpoint_name(matmul(a, w), EXPERT_MATMUL)
  if activation == "swiglu":
    h = nn.silu(named(x, weights["gate"])) * named(x, weights["up"])
  else:
    h = nn.gelu(named(x, weights["up"]), approximate=True)
  return named(h, weights["down"])


def grouped_mlp(rows_RxE, expert_R, weights: dict, num_experts: int, activation: str):
  """Expert MLP of rows sorted by expert (ids >= num_experts: padding, output zero).

  On GPU/TPU: ``jax.lax.ragged_dot`` (grouped matmul kernels). On CPU, where ragged_dot lowers
  to a dense loop over all groups (about num_experts times the work, slower still backwards),
  each expert's rows are padded to whole blocks of ``block`` rows and every block is multiplied
  by its expert's weights: the same result with at most num_experts extra blocks of work.
  """
  R = rows_RxE.shape[0]
  sizes_X = jnp.bincount(expert_R, length=num_experts + 1)[:num_experts]
  if jax.default_backend() != "cpu":
    return _mlp(rows_RxE, weights, activation, lambda a, b: jax.lax.ragged_dot(a, b, sizes_X))
  block = int(min(128, max(8, 2 ** round(math.log2(max(R / (4 * num_experts), 1))))))
  num_blocks = -(-R // block) + num_experts
  padded_X = -(-sizes_X // block) * block
  padded_start_X = jnp.cumsum(padded_X) - padded_X
  start_X = jnp.cumsum(sizes_X) - sizes_X
  valid_R = expert_R < num_experts
  e_R = jnp.minimum(expert_R, num_experts - 1)
  slot_R = jnp.where(valid_R, padded_start_X[e_R] + jnp.arange(R) - start_X[e_R],
                     num_blocks * block)  # padding rows go nowhere
  x_NxBxE = jnp.zeros((num_blocks * block, rows_RxE.shape[1]), rows_RxE.dtype).at[slot_R].set(
      rows_RxE, mode="drop").reshape(num_blocks, block, -1)
  block_expert_N = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(padded_X), jnp.arange(num_blocks) * block, side="right"),
      num_experts - 1)
  per_block = {n: v[block_expert_N] for n, v in weights.items()}
  y = _mlp(x_NxBxE, per_block, activation, lambda a, b: jnp.einsum("nbd,ndf->nbf", a, b))
  return y.reshape(num_blocks * block, -1).at[slot_R].get(mode="fill", fill_value=0)


def capacity_slots(idx_TxK, num_experts: int, capacity: int):
  """Position of each (token, choice) in its expert's buffer, and whether it fits.

  Priority: choice-major (all first choices, then all second choices, ...), token order within.
  """
  T, K = idx_TxK.shape
  onehot_AxX = jax.nn.one_hot(idx_TxK.T.reshape(K * T), num_experts, dtype=jnp.int32)
  position_A = jnp.sum((jnp.cumsum(onehot_AxX, axis=0) - 1) * onehot_AxX, axis=1)
  position_TxK = position_A.reshape(K, T).T
  return position_TxK, position_TxK < capacity


def _all_to_all(x, axis_name):
  return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0, tiled=True)


def run_experts(x_GxCxTxE, idx_GxCxTxK, gates_GxCxTxK, weights: dict, *, cfg: Config,
                capacity: int, dtype, ep_axis: str | None = None, ep: int = 1,
                tp_axis: str | None = None):
  """Routed-expert output for tokens already assigned, and the number of dropped assignments.

  ``weights`` hold this device's experts: [X/ep, E, M/tp] ("gate", "up") and [X/ep, M/tp, E]
  ("down"). With ``ep`` > 1, expert block j lives on position j of ``ep_axis`` and assignments
  are exchanged by all_to_all; with ``tp_axis``, partial outputs over the M shards are summed.
  """
  X, E = cfg.num_experts, x_GxCxTxE.shape[-1]
  X_l = X // ep
  dtype = jnp.dtype(dtype)
  w = {k: v.astype(dtype) for k, v in weights.items()}
  reduce_tp = (lambda y: jax.lax.psum(y, tp_axis)) if tp_axis else (lambda y: y)
  lead, (T, K) = x_GxCxTxE.shape[:-2], idx_GxCxTxK.shape[-2:]
  x_GxTxE = x_GxCxTxE.reshape(-1, T, E).astype(dtype)
  idx_GxTxK = idx_GxCxTxK.reshape(-1, T, K)
  gates_GxTxK = gates_GxCxTxK.reshape(-1, T, K)
  G = x_GxTxE.shape[0]

  if capacity:
    pos_GxTxK, keep_GxTxK = jax.vmap(capacity_slots, (0, None, None))(idx_GxTxK, X, capacity)
    slot_GxTxK = jnp.where(keep_GxTxK, pos_GxTxK, capacity)  # out of range: dropped
    buf_GxXxCxE = jax.vmap(lambda x, i, s: jnp.zeros((X, capacity, E), dtype).at[i, s].add(
        jnp.broadcast_to(x[:, None], (T, K, E)), mode="drop"))(x_GxTxE, idx_GxTxK, slot_GxTxK)
    R = G * capacity
    buf_XxRxE = buf_GxXxCxE.transpose(1, 0, 2, 3).reshape(X, R, E)
    if ep > 1:  # send expert block j to device j; receive [source, local expert, R, E]
      buf_XxRxE = _all_to_all(buf_XxRxE.reshape(ep, X_l, R, E), ep_axis)
      buf_XxRxE = buf_XxRxE.transpose(1, 0, 2, 3).reshape(X_l, ep * R, E)
    batched = lambda a, b: jnp.einsum("xrd,xdf->xrf", a, b)
    out_XxRxE = reduce_tp(_mlp(buf_XxRxE, w, cfg.activation, batched))
    if ep > 1:  # back to the sources, in expert-block order
      out_XxRxE = out_XxRxE.reshape(X_l, ep, R, E).transpose(1, 0, 2, 3)
      out_XxRxE = _all_to_all(out_XxRxE, ep_axis).reshape(X, R, E)
    out_GxXxCxE = out_XxRxE.reshape(X, G, capacity, E).transpose(1, 0, 2, 3)
    out_GxTxKxE = jax.vmap(lambda o, i, s: o.at[i, s].get(mode="fill", fill_value=0))(
        out_GxXxCxE, idx_GxTxK, slot_GxTxK)
    dropped = jnp.sum(~keep_GxTxK)
  else:
    A = G * T * K
    expert_A = idx_GxTxK.reshape(A)
    token_A = jnp.arange(A) // K
    rows_AxE = x_GxTxE.reshape(G * T, E)[token_A]
    if ep == 1:
      order_A = jnp.argsort(expert_A, stable=True)
      out_sorted = reduce_tp(grouped_mlp(rows_AxE[order_A], expert_A[order_A], w, X,
                                         cfg.activation))
      out_AxE = jnp.zeros_like(out_sorted).at[order_A].set(out_sorted)
    else:
      # Static shapes for all_to_all: device d gets a buffer of A rows (the worst case, all
      # assignments to its experts), filled in expert order, padded with a sentinel expert X_l.
      dest_A = expert_A // X_l
      order_A = jnp.argsort(expert_A, stable=True)
      counts = jnp.bincount(dest_A, length=ep)
      starts = jnp.cumsum(counts) - counts
      rank_A = jnp.zeros_like(order_A).at[order_A].set(
          jnp.arange(A) - starts[dest_A[order_A]])
      send = jnp.zeros((ep, A, E), dtype).at[dest_A, rank_A].set(rows_AxE)
      send_ids = jnp.full((ep, A), X_l, jnp.int32).at[dest_A, rank_A].set(expert_A % X_l)
      recv_rows, recv_ids = _all_to_all(send, ep_axis), _all_to_all(send_ids, ep_axis)
      ids = recv_ids.reshape(ep * A)
      order = jnp.argsort(ids, stable=True)  # padding rows (sentinel X_l) sort last
      out_sorted = reduce_tp(grouped_mlp(recv_rows.reshape(ep * A, E)[order], ids[order], w,
                                         X_l, cfg.activation))
      out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(ep, A, E)
      out_AxE = _all_to_all(out, ep_axis)[dest_A, rank_A]
    out_GxTxKxE = out_AxE.reshape(G, T, K, E)
    dropped = jnp.zeros((), jnp.int32)
  y_GxTxE = jnp.sum(out_GxTxKxE.astype(jnp.float32) * gates_GxTxK[..., None], axis=2)
  return y_GxTxE.astype(dtype).reshape(*lead, T, E), dropped


# ---------------------------------------------------------------------------------------------
# The layer.


def route(logits_NxX, cfg: Config):
  """(gates [N, k] float32, expert ids [N, k], router probabilities [N, X]) from router logits."""
  if cfg.router == "softmax":
    probs = scores = jax.nn.softmax(logits_NxX, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits_NxX)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  top, idx = jax.lax.top_k(scores, cfg.top_k)
  if cfg.normalize_gates or cfg.router == "sigmoid":
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return top, idx, probs


def balance_loss(probs_BxSxX, idx_BxSxK, num_experts: int, groups: int = 1):
  """N_E · Σ_i f_i · p_i averaged over ``groups`` equal batch groups (1 = the global batch)."""
  K = idx_BxSxK.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(idx_BxSxK, num_experts, dtype=jnp.float32), axis=-2)
  f_GxX = jnp.mean(counts.reshape(groups, -1, num_experts), axis=1) / K
  p_GxX = jnp.mean(probs_BxSxX.reshape(groups, -1, num_experts), axis=1)
  return num_experts * jnp.mean(jnp.sum(f_GxX * p_GxX, axis=-1))


def _group(x_BxSx_, layout: Layout):
  """[B, S, ...] -> [Gb, Gs, (B/Gb)·(S/Gs), ...]: contiguous sequences x contiguous chunks."""
  B, S, rest = x_BxSx_.shape[0], x_BxSx_.shape[1], x_BxSx_.shape[2:]
  gb, gs = layout.batch_groups, layout.seq_groups
  x = x_BxSx_.reshape(gb, B // gb, gs, S // gs, *rest)
  return jnp.swapaxes(x, 1, 2).reshape(gb, gs, (B // gb) * (S // gs), *rest)


def _ungroup(x_GxCxTx_, B: int, S: int, layout: Layout):
  gb, gs = layout.batch_groups, layout.seq_groups
  rest = x_GxCxTx_.shape[3:]
  x = x_GxCxTx_.reshape(gb, gs, B // gb, S // gs, *rest)
  return jnp.swapaxes(x, 1, 2).reshape(B, S, *rest)


class MoE(nn.Module):
  """x [B, S, E] -> [B, S, E]: router, routed experts, shared experts; sows the aux statistics."""
  cfg: Config
  mlp_dim: int  # the family's MLP width (the expert width unless cfg.expert_dim is set)
  dtype: Any
  param_dtype: Any
  kernel_init: Callable  # plain initializer for [in, out] kernels (router, shared experts)
  expert_init: Callable  # plain initializer for stacked [X, in, out] expert kernels
  layout: Layout = Layout()

  @nn.compact
  def __call__(self, x_BxSxE):
    cfg, layout = self.cfg, self.layout
    B, S, E = x_BxSxE.shape
    X, M = cfg.num_experts, cfg.hidden(self.mlp_dim)
    if B % layout.batch_groups or S % layout.seq_groups:
      raise ValueError(f"MoE dispatch groups ({layout.batch_groups} batch x {layout.seq_groups} "
                       f"sequence) do not divide the input batch {B} x length {S}.")
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(self.param_dtype))

    router_ExX = param("router", self.kernel_init, (E, X), ("embed", None))
    logits_BxSxX = jnp.einsum("bse,ex->bsx", x_BxSxE.astype(jnp.float32),
                              router_ExX.astype(jnp.float32))
    gates_BxSxK, idx_BxSxK, probs_BxSxX = route(logits_BxSxX, cfg)

    names = ("gate", "up", "down") if cfg.activation == "swiglu" else ("up", "down")
    weights = {n: param(f"experts_{n}", self.expert_init,
                        (X, M, E) if n == "down" else (X, E, M),
                        ("expert", "mlp", "embed") if n == "down" else ("expert", "embed", "mlp"))
               for n in names}
    experts_fn = layout.experts_fn or run_experts
    T = (B // layout.batch_groups) * (S // layout.seq_groups)
    y, dropped = experts_fn(_group(x_BxSxE, layout), _group(idx_BxSxK, layout),
                            _group(gates_BxSxK, layout), weights, cfg=cfg,
                            capacity=cfg.capacity(T), dtype=self.dtype)
    y_BxSxE = _ungroup(y, B, S, layout)

    if cfg.shared_experts:
      Ms = cfg.shared_experts * M
      shared = {n: param(f"shared_{n}", self.kernel_init, (Ms, E) if n == "down" else (E, Ms),
                         ("mlp", "embed") if n == "down" else ("embed", "mlp")) for n in names}
      dtype = jnp.dtype(self.dtype)
      dense = lambda a, b: jnp.einsum("bsd,df->bsf", a, b.astype(dtype))
      y_BxSxE = y_BxSxE + _mlp(x_BxSxE.astype(dtype), shared, cfg.activation, dense)

    groups = layout.batch_groups if cfg.balance == "micro" else 1
    self.sow("aux", "moe", {
        "balance": balance_loss(probs_BxSxX, idx_BxSxK, X, groups),
        "z": jnp.mean(jax.nn.logsumexp(logits_BxSxX, axis=-1) ** 2),
        "load": jnp.mean(jnp.sum(jax.nn.one_hot(idx_BxSxK, X), axis=-2), axis=(0, 1))
        / cfg.top_k,
        "dropped": dropped.astype(jnp.float32) / (B * S * cfg.top_k)})
    return y_BxSxE.astype(self.dtype)


class Periodic(nn.Module):
  """``every - 1`` dense blocks, then one MoE block: the scan unit when MoE is every k-th layer.

  ``block`` is a family's block class, built as ``block(*args, use_moe=...)`` and called as
  ``block(x, *rest) -> (x, None)``.
  """
  block: Any
  every: int
  args: tuple

  @nn.compact
  def __call__(self, x, *rest):
    for i in range(self.every):
      x, _ = self.block(*self.args, use_moe=i == self.every - 1, name=f"block_{i}")(x, *rest)
    return x, None


def stack(block, cfg_moe: Config, args: tuple, num_layers: int, scan):
  """The scanned layer stack of a family: ``scan(unit, length)`` is the family's nn.scan wrapper.

  Dense families stack ``block(*args)``; MoE every layer stacks ``block(*args, use_moe=True)``;
  every k-th layer stacks Periodic units of k blocks.
  """
  if not cfg_moe.enabled:
    return scan(block, num_layers)(*args, name="layers")
  if cfg_moe.every == 1:
    return scan(block, num_layers)(*args, True, name="layers")
  if num_layers % cfg_moe.every:
    raise ValueError(f"the {num_layers} layers are not a multiple of model.moe.every="
                     f"{cfg_moe.every}.")
  return scan(Periodic, num_layers // cfg_moe.every)(block, cfg_moe.every, args, name="layers")


def collect(aux: dict, cfg: Config):
  """(aux loss term, metrics) from the "aux" collection: means over all MoE layers."""
  entries = []

  def walk(node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        if key == "moe" and isinstance(value, tuple):
          entries.extend(value)
        else:
          walk(value)

  walk(aux)
  if not entries:
    return jnp.zeros((), jnp.float32), {}
  mean = lambda key: jnp.mean(jnp.concatenate([jnp.ravel(e[key]) for e in entries]))
  load_X = jnp.mean(jnp.concatenate([e["load"].reshape(-1, cfg.num_experts) for e in entries]),
                    axis=0)
  balance, z = mean("balance"), mean("z")
  metrics = {"moe_balance_loss": balance, "moe_z_loss": z, "moe_dropped_frac": mean("dropped"),
             "moe_load_max": jnp.max(load_X) * cfg.num_experts}
  metrics.update({f"moe_load/expert_{i}": load_X[i] for i in range(cfg.num_experts)})
  return cfg.aux_loss_coef * balance + cfg.z_loss_coef * z, metrics


def apply_with_aux(model, variables, *args, **kwargs):
  """model.apply that also returns (aux loss term, MoE metrics); (0, {}) for dense models."""
  moe_cfg = getattr(model.cfg, "moe", None)
  if moe_cfg is None or not moe_cfg.enabled:
    return model.apply(variables, *args, **kwargs), jnp.zeros((), jnp.float32), {}
  out, state = model.apply(variables, *args, mutable=["aux"], **kwargs)
  loss, metrics = collect(state.get("aux", {}), moe_cfg)
  return out, loss, metrics
