"""Mamba's selective state-space block (Gu & Dao, "Linear-Time Sequence Modeling with Selective
State Spaces", 2023) with its hyperparameters and generation state: what nets/mamba.py stacks into
an LM and nets/megabyte.py into its Mamba stages.

Block: in_proj to (x, z) of width I = expand·E; x -> causal depthwise conv1d -> SiLU; Δ, B, C from
x (Δ through a rank-R projection + softplus); A = -exp(A_log), diagonal [I, N]. Discretised
Ā_t = exp(Δ_t A), B̄_t x_t = Δ_t B_t x_t; h_t = Ā_t ⊙ h_{t-1} + B̄_t x_t; y_t = C_t·h_t + D ⊙ x_t;
out_proj(y ⊙ SiLU(z)). The recurrence runs as ``jax.lax.associative_scan`` in float32, over the
whole sequence or (``scan_chunk`` > 0) within chunks whose boundary states a ``lax.scan`` carries,
so the [B, S, I, N] tensors only ever exist one chunk at a time.

The same blocks run step by step for generation: the cache (``init_cache``) carries each layer's
last d_conv - 1 conv inputs and its SSM state. Inner channels are logically "mlp", so tensor
parallelism splits I; the state dimension N is replicated.
Extra legend: I inner width, N state size, R rank of Δ, C conv kernel width (d_conv).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets.layers import Proj, RMSNorm, build_config, check_positive_floats, check_remat_and_dtypes

_ACT = ("act_batch", "act_seq", "act_embed")
_ACT_INNER = ("act_batch", "act_seq", "act_mlp")
# Forward FLOPs of the selective scan per token, per inner channel and state entry: the count of
# the Mamba authors (state-spaces/mamba issue #110), also used by VMamba's fvcore FLOP counts.
SCAN_FLOPS = 9


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the mamba family (nets/mamba.py) and of MEGABYTE's Mamba stages; built
  only by ``Config.from_config(config.model)`` (or megabyte.stage_config)."""
  vocab_size: int
  num_layers: int
  d_model: int
  d_state: int = 16  # N
  d_conv: int = 4
  expand: int = 2  # I = expand * d_model
  dt_rank: int = 0  # R; 0 means ceil(d_model / 16)
  dt_min: float = 1e-3  # Δ is initialised log-uniform in [dt_min, dt_max]
  dt_max: float = 1e-1
  scan_chunk: int = 0  # 0: one scan over the sequence; > 0: chunks of this many steps
  scan: str = "auto"  # one of SCANS: associative | sequential | auto (sequential on CPU only)
  max_len: int = 2048  # read only by the LM task's length check: Mamba has no position table
  norm_eps: float = 1e-5
  # True keeps the residual stream (the scan carry between blocks) in float32 whatever ``dtype``
  # is, as the Mamba reference and Hugging Face Mamba (residual_in_fp32) do, so low-precision
  # compute does not round the sum of every block's output; only differs from False below fp32.
  residual_in_fp32: bool = False
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; the scan itself always runs in float32
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    return build_config(cls, "mamba", {}, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    for name in ("vocab_size", "num_layers", "d_model", "d_state", "d_conv", "expand"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    for name in ("dt_rank", "scan_chunk"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 picks the default).")
    if self.scan not in SCANS:
      raise ValueError(f"model.scan={self.scan!r} is not one of {SCANS}.")
    if not 0.0 < self.dt_min <= self.dt_max:
      raise ValueError(f"model.dt_min={self.dt_min} and model.dt_max={self.dt_max} must satisfy "
                       "0 < dt_min <= dt_max.")
    check_remat_and_dtypes(self)
    check_positive_floats(self, ("norm_eps",))

  @property
  def inner_dim(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)

  # The names every family's Config shares (nets/registry.py): no attention heads, and the inner
  # channels play the MLP's part (logically "mlp").
  width = property(lambda self: self.d_model)
  depth = property(lambda self: self.num_layers)
  num_heads = property(lambda self: 0)
  mlp_width = property(lambda self: self.inner_dim)


def block_params(cfg: Config) -> int:
  """Parameters of one Block (norm, in_proj, conv, x_proj, dt_proj, A_log, D, out_proj)."""
  E, I, N, R, C = cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv
  return E + E * 2 * I + (C * I + I) + I * (R + 2 * N) + (R * I + I) + I * N + I + I * E


def block_flops(cfg: Config) -> float:
  """One Mamba block, per token.

  2·E·2I (in_proj) + 2·C·I (depthwise causal conv, C taps) + 2·I·(R + 2N) (x_proj: Δ rank, B, C)
  + 2·R·I (dt_proj) + SCAN_FLOPS·I·N (selective scan) + 2·I·E (out_proj).
  """
  E, I, N, R, C = cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv
  return (2 * E * 2 * I + 2 * C * I + 2 * I * (R + 2 * N) + 2 * R * I + SCAN_FLOPS * I * N
          + 2 * I * E)


def init_cache(cfg: Config, batch_size: int) -> dict:
  """Empty generation state: per layer the last d_conv - 1 conv inputs and the SSM state."""
  L, B, I = cfg.num_layers, batch_size, cfg.inner_dim
  return {"conv": jnp.zeros((L, B, cfg.d_conv - 1, I), jnp.dtype(cfg.dtype)),
          "ssm": jnp.zeros((L, B, I, cfg.d_state), jnp.float32)}


def _combine(left, right):
  """(a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2): composing h -> a·h + b maps, earlier first."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


SCANS = ("auto", "associative", "sequential")


def scan_impl(name: str) -> str:
  """"auto": the associative scan on accelerators; on CPU the sequential ``lax.scan``, which
  does O(S) work instead of the parallel scan's extra passes and measured 2.6x faster forward +
  backward for [16, 128, 256, 16] on a 2-core CPU."""
  if name == "auto":
    return "sequential" if jax.default_backend() == "cpu" else "associative"
  return name


def _sequential(a_BxSxIxN, b_BxSxIxN):
  """The recurrence h_t = a_t·h_{t-1} + b_t from h = 0, one step at a time; returns (Π a, h)."""
  def step(carry, ab):
    (prod, h), (a, b) = carry, ab
    prod, h = prod * a, a * h + b
    return (prod, h), (prod, h)

  zeros = jnp.zeros_like(a_BxSxIxN[:, 0])
  _, (prod, h) = jax.lax.scan(step, (jnp.ones_like(zeros), zeros),
                              (jnp.moveaxis(a_BxSxIxN, 1, 0), jnp.moveaxis(b_BxSxIxN, 1, 0)))
  return jnp.moveaxis(prod, 0, 1), jnp.moveaxis(h, 0, 1)


def _scan_span(u_BxSxI, dt_BxSxI, A_IxN, B_BxSxN, C_BxSxN, h0_BxIxN, keep_BxS,
               impl: str = "associative"):
  """One scan over S steps from state h0 (None: zeros); returns (C·h [B,S,I], h_S)."""
  a_BxSxIxN = jnp.exp(dt_BxSxI[..., None] * A_IxN)
  if keep_BxS is not None:
    a_BxSxIxN = a_BxSxIxN * keep_BxS[:, :, None, None]  # a = 0 drops the state (new segment)
  b_BxSxIxN = (dt_BxSxI * u_BxSxI)[..., None] * B_BxSxN[:, :, None, :]
  if impl == "sequential":
    a_BxSxIxN, h_BxSxIxN = _sequential(a_BxSxIxN, b_BxSxIxN)
  else:
    a_BxSxIxN, h_BxSxIxN = jax.lax.associative_scan(_combine, (a_BxSxIxN, b_BxSxIxN), axis=1)
  if h0_BxIxN is not None:
    h_BxSxIxN = h_BxSxIxN + a_BxSxIxN * h0_BxIxN[:, None]
  y_BxSxI = jnp.einsum("bsin,bsn->bsi", h_BxSxIxN, C_BxSxN)
  return y_BxSxI, h_BxSxIxN[:, -1]


def selective_scan(u_BxSxI, dt_BxSxI, A_IxN, B_BxSxN, C_BxSxN, D_I, *, h0_BxIxN=None,
                   keep_BxS=None, chunk: int = 0, impl: str = "associative"):
  """y_t = C_t·h_t + D ⊙ u_t, h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t, all in float32.

  ``h0_BxIxN`` is the state before step 0 (zeros if None); ``keep_BxS`` (0/1) multiplies the
  decay, so 0 starts a fresh state at that step. ``chunk`` > 0 scans chunks of that many steps in
  a ``lax.scan`` with a rematerialised body, so the [B, chunk, I, N] tensors are the largest held
  and the backward pass keeps only one [B, I, N] state per chunk. A sequence that the chunk does
  not divide is padded with identity steps (Δ = 0, so a = 1, b = 0). ``impl``: "associative"
  (``jax.lax.associative_scan``) or "sequential" (``lax.scan``, step by step; same values).
  Returns (y [B, S, I], h_S).
  """
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  u, dt, A, Bm, Cm, h0, keep = map(f32, (u_BxSxI, dt_BxSxI, A_IxN, B_BxSxN, C_BxSxN, h0_BxIxN,
                                         keep_BxS))
  Bsz, S, I = u.shape
  if chunk <= 0 or chunk >= S:
    y, h_last = _scan_span(u, dt, A, Bm, Cm, h0, keep, impl)
  else:
    n = -(-S // chunk)
    pad = n * chunk - S
    if keep is None:
      keep = jnp.ones((Bsz, S), jnp.float32)
    if h0 is None:
      h0 = jnp.zeros((Bsz, I, A.shape[1]), jnp.float32)

    def chunks(x, fill=0.0):  # [B, S, ...] -> [n, B, chunk, ...]
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
      return jnp.moveaxis(x.reshape((Bsz, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(h_BxIxN, xs):
      u_c, dt_c, B_c, C_c, keep_c = xs
      y_c, h_BxIxN = _scan_span(u_c, dt_c, A, B_c, C_c, h_BxIxN, keep_c, impl)
      return h_BxIxN, y_c

    h_last, y_nxBxcxI = jax.lax.scan(body, h0, (chunks(u), chunks(dt), chunks(Bm), chunks(Cm),
                                                chunks(keep, 1.0)))
    y = jnp.moveaxis(y_nxBxcxI, 0, 1).reshape(Bsz, n * chunk, I)[:, :S]
  return y + u * f32(D_I), h_last


def causal_conv(u_BxSxI, w_CxI, b_I, prev_BxC1xI, segment_ids_BxS=None, prev_segment_ids=None):
  """Depthwise causal conv: out_t = b + Σ_k w_k ⊙ u_{t-C+1+k}, the C - 1 steps before 0 from prev.

  With segment ids, inputs from another segment count as zero; the C - 1 steps of prev belong to
  ``prev_segment_ids`` [B, C - 1] (default: the first token's segment, as in decoding).
  Returns (out, last C - 1 inputs).
  """
  C, S = w_CxI.shape[0], u_BxSxI.shape[1]
  full_BxTxI = jnp.concatenate([prev_BxC1xI.astype(u_BxSxI.dtype), u_BxSxI], axis=1)
  if segment_ids_BxS is not None:
    if prev_segment_ids is None:
      prev_segment_ids = jnp.repeat(segment_ids_BxS[:, :1], C - 1, axis=1)
    seg_BxT = jnp.concatenate([prev_segment_ids.astype(segment_ids_BxS.dtype), segment_ids_BxS],
                              axis=1)
  out_BxSxI = jnp.broadcast_to(b_I.astype(u_BxSxI.dtype), u_BxSxI.shape)
  for k in range(C):
    tap_BxSxI = full_BxTxI[:, k:k + S] * w_CxI[k].astype(u_BxSxI.dtype)
    if segment_ids_BxS is not None:
      same_BxS = seg_BxT[:, k:k + S] == segment_ids_BxS
      tap_BxSxI = jnp.where(same_BxS[..., None], tap_BxSxI, 0)
    out_BxSxI = out_BxSxI + tap_BxSxI
  return out_BxSxI, full_BxTxI[:, S:]


def _dt_bias_init(cfg: Config):
  """Inverse softplus of Δ drawn log-uniform in [dt_min, dt_max] (as the Mamba reference does)."""
  def init(key, shape, dtype):
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi))
    dt = jnp.maximum(dt, 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _uniform(bound: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _a_log_init(key, shape, dtype):
  """S4D-real: A = -(1, 2, ..., N) for every channel."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


class Block(nn.Module):
  """Pre-norm residual block x + Mamba(RMSNorm(x)); ``cache`` carries state across calls."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    E, I, N, R, C = cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv
    pdt = jnp.dtype(cfg.param_dtype)
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, pdt)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    B = x_BxSxE.shape[0]

    h_BxSxE = RMSNorm(cfg, name="norm")(x_BxSxE)
    xz_BxSx2xI = Proj(cfg, (2, I), ("embed", None, "mlp"), name="in_proj")(h_BxSxE)
    u_BxSxI = nn.with_logical_constraint(xz_BxSx2xI[:, :, 0], _ACT_INNER)
    z_BxSxI = nn.with_logical_constraint(xz_BxSx2xI[:, :, 1], _ACT_INNER)

    conv_w_CxI = param("conv_kernel", _uniform(C ** -0.5), (C, I), (None, "mlp"))
    conv_b_I = param("conv_bias", _uniform(C ** -0.5), (I,), ("mlp",))
    prev_BxC1xI = (jnp.zeros((B, C - 1, I), u_BxSxI.dtype) if cache is None else cache["conv"])
    u_BxSxI, conv_state_BxC1xI = causal_conv(u_BxSxI, conv_w_CxI, conv_b_I, prev_BxC1xI,
                                             segment_ids_BxS)
    u_BxSxI = nn.with_logical_constraint(nn.silu(u_BxSxI), _ACT_INNER)

    dbc_BxSxF = Proj(cfg, (R + 2 * N,), ("mlp", None), name="x_proj")(u_BxSxI)
    dtr_BxSxR, B_BxSxN, C_BxSxN = jnp.split(dbc_BxSxF, [R, R + N], axis=-1)
    dt_w_RxI = param("dt_kernel", _uniform(R ** -0.5), (R, I), (None, "mlp"))
    dt_b_I = param("dt_bias", _dt_bias_init(cfg), (I,), ("mlp",))
    dt_BxSxI = jnp.einsum("bsr,ri->bsi", dtr_BxSxR, dt_w_RxI.astype(cfg.dtype))
    dt_BxSxI = jax.nn.softplus(dt_BxSxI.astype(jnp.float32) + dt_b_I.astype(jnp.float32))
    dt_BxSxI = nn.with_logical_constraint(dt_BxSxI, _ACT_INNER)

    A_log_IxN = param("A_log", _a_log_init, (I, N), ("mlp", None))
    D_I = param("D", nn.initializers.ones, (I,), ("mlp",))
    keep_BxS = None
    if segment_ids_BxS is not None:
      keep_BxS = jnp.concatenate([jnp.ones_like(segment_ids_BxS[:, :1], bool),
                                  segment_ids_BxS[:, 1:] == segment_ids_BxS[:, :-1]], axis=1)
    y_BxSxI, h_BxIxN = selective_scan(
        u_BxSxI, dt_BxSxI, -jnp.exp(A_log_IxN.astype(jnp.float32)), B_BxSxN, C_BxSxN, D_I,
        h0_BxIxN=None if cache is None else cache["ssm"], keep_BxS=keep_BxS,
        chunk=cfg.scan_chunk, impl=scan_impl(cfg.scan))
    y_BxSxI = nn.with_logical_constraint(y_BxSxI.astype(cfg.dtype) * nn.silu(z_BxSxI),
                                         _ACT_INNER)
    x_BxSxE = x_BxSxE + Proj(cfg, (E,), ("mlp", "embed"), name="out_proj")(y_BxSxI)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    new_cache = None if cache is None else {"conv": conv_state_BxC1xI, "ssm": h_BxIxN}
    return x_BxSxE, new_cache
