"""Token mixers of the linear-recurrent LMs (nets/linear_rnn.py), each a gated linear recurrence
of nets/linear_recurrence.py between projections:

  gated_deltanet  Gated DeltaNet as in Qwen3-Next (Yang, Kautz & Hatamizadeh 2024): q, k, v
                  through short causal convolutions and SiLU, q and k L2-normalised (q also scaled
                  by K^-1/2), a scalar decay per head g = −exp(A_log)·softplus(a + dt_bias), write
                  strength β = sigmoid(b), the delta rule, RMSNorm(o)·SiLU(z) per head, out.
                  Fewer key than value heads share each key head among consecutive value heads.
  gla             Gated Linear Attention (Yang et al. 2023, as flash-linear-attention's layer): a
                  per-key-channel decay log α = logsigmoid(low-rank(x)) / gate_normalizer, q
                  scaled by K^-1/2, RMSNorm(o)·SiLU(g) per head, out.
  mamba2          Mamba-2's SSD (Dao & Gu 2024, as Hugging Face Mamba2Mixer): z, x, B, C, Δ from
                  the input; x, B, C through a short convolution (with bias) and SiLU;
                  Δ = softplus(dt + dt_bias), decay Δ·A with A = −exp(A_log) per head; the
                  recurrence with q = C, k = B, v = Δ·x (B and C shared by groups of consecutive
                  heads); + D·x; RMSNorm(y·SiLU(z)) over each group's channels; out.

Each mixer is called as mixer(x [B, S, E], segment_ids [B, S] | None, cache | None) and returns
(out [B, S, E], new cache | None). Training runs the chunkwise form through ``recurrence_fn``
(parallel/state_passing.py splits it over the seq mesh axis); with a cache (generation) the chunk
form runs locally from the cached state, one token or a whole prompt at a time.
Extra legend: K key width (state rows), V value width, N key heads (GDN) or groups (Mamba-2),
C conv taps.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import linear_recurrence
from nets.layers import Proj
from nets.ssm import causal_conv

_HEADS = ("act_batch", "act_seq", "act_heads", "head_dim")


def local_recurrence(q, k, v, log_decay, beta, *, reset_BxS, chunk):
  """The default ``recurrence_fn``: the chunkwise form on whole sequences."""
  return linear_recurrence.chunked(q, k, v, log_decay, beta, reset_BxS=reset_BxS, chunk=chunk)[0]


def head_conv(x_BxSxHxD, w_CxHxD, b_HxD, prev_BxC1xHxD, segment_ids_BxS=None,
              prev_segment_ids=None):
  """nets/ssm.py's ``causal_conv`` over [B, S, H, D] channels: (out, last C − 1 inputs)."""
  B, S, H, D = x_BxSxHxD.shape
  C = w_CxHxD.shape[0]
  out, window = causal_conv(x_BxSxHxD.reshape(B, S, H * D), w_CxHxD.reshape(C, H * D),
                            b_HxD.reshape(H * D), prev_BxC1xHxD.reshape(B, C - 1, H * D),
                            segment_ids_BxS, prev_segment_ids)
  return out.reshape(B, S, H, D), window.reshape(B, C - 1, H, D)


def local_conv(x_BxSxHxD, w_CxHxD, b_HxD, segment_ids_BxS=None):
  """The default ``conv_fn``: the depthwise causal convolution of whole sequences from zeros
  (before SiLU); parallel/state_passing.py's version passes each shard the tail of the previous."""
  B, _, H, D = x_BxSxHxD.shape
  zeros = jnp.zeros((B, w_CxHxD.shape[0] - 1, H, D), x_BxSxHxD.dtype)
  return head_conv(x_BxSxHxD, w_CxHxD, b_HxD, zeros, segment_ids_BxS)[0]


def resets(segment_ids_BxS):
  """True where a new segment starts (the state is zeroed before that token), or None."""
  if segment_ids_BxS is None:
    return None
  return jnp.concatenate([jnp.zeros_like(segment_ids_BxS[:, :1], bool),
                          segment_ids_BxS[:, 1:] != segment_ids_BxS[:, :-1]], axis=1)


def conv_cache(cfg, batch: int, heads: int, width: int):
  return jnp.zeros((batch, cfg.conv_size - 1, heads, width), jnp.dtype(cfg.dtype))


class ShortConv(nn.Module):
  """Depthwise causal convolution over [B, S, H, D] channels, then SiLU (nets/ssm.py's conv):
  through ``conv_fn`` when training, from the cached window when decoding."""
  cfg: Any
  bias: bool = False
  conv_fn: Callable[..., Any] = local_conv

  @nn.compact
  def __call__(self, x_BxSxHxD, segment_ids_BxS, prev_BxC1xHxD):
    _, _, H, D = x_BxSxHxD.shape
    C, pdt = self.cfg.conv_size, jnp.dtype(self.cfg.param_dtype)
    bound = C ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    w = self.param("kernel", nn.with_logical_partitioning(uniform, (None, "heads", "head_dim")),
                   (C, H, D), pdt)
    b = (self.param("bias", nn.with_logical_partitioning(uniform, ("heads", "head_dim")), (H, D),
                    pdt) if self.bias else jnp.zeros((H, D), pdt))
    if prev_BxC1xHxD is None:
      out = self.conv_fn(x_BxSxHxD, w, b, segment_ids_BxS)
      return nn.with_logical_constraint(nn.silu(out), _HEADS), None
    out, prev = head_conv(x_BxSxHxD, w, b, prev_BxC1xHxD, segment_ids_BxS)
    return nn.with_logical_constraint(nn.silu(out), _HEADS), prev


class GatedNorm(nn.Module):
  """RMSNorm over groups of the last axis (each group its own statistics) with a SiLU gate:
  norm(x)·w·SiLU(z) (``gate_first=False``, GDN and GLA) or norm(x·SiLU(z))·w (Mamba-2).
  The scale w is one [D] shared by the heads (GDN, GLA), or one per channel [H, D] with
  ``per_channel`` (Mamba-2, whose norm weight spans all H·D channels)."""
  cfg: Any
  gate_first: bool = False
  groups: int = 1
  per_channel: bool = False

  @nn.compact
  def __call__(self, x_BxSxHxD, z_BxSxHxD):
    B, S, H, D = x_BxSxHxD.shape
    shape, axes = ((H, D), ("heads", "head_dim")) if self.per_channel else ((D,), ("head_dim",))
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes), shape,
                   jnp.dtype(self.cfg.param_dtype))
    x = x_BxSxHxD.astype(jnp.float32)
    gate = nn.silu(z_BxSxHxD.astype(jnp.float32))
    if self.gate_first:
      x = x * gate
    g = x.reshape(B, S, self.groups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.cfg.norm_eps)
    x = g.reshape(B, S, H, D) * w.astype(jnp.float32)
    if not self.gate_first:
      x = x * gate
    return x.astype(self.cfg.dtype)


def _l2norm(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _log_uniform_dt_bias(cfg):
  """Inverse softplus of Δ drawn log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
  def init(key, shape, dtype):
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _short_convs(module, inputs: dict, segment_ids_BxS, cache, bias: bool = False):
  """ShortConv of each named input (modules "conv_<name>", created in the calling mixer's scope).

  Returns (the convolved inputs in order, {"conv_<name>": window} for the cache)."""
  outs, windows = [], {}
  for name, x in inputs.items():
    key = f"conv_{name}"
    x, windows[key] = ShortConv(module.cfg, bias=bias, conv_fn=module.conv_fn, name=key)(
        x, segment_ids_BxS, None if cache is None else cache[key])
    outs.append(x)
  return outs, windows


def _recur(module, q, k, v, log_decay, beta, segment_ids_BxS, cache):
  """Runs the recurrence: through ``recurrence_fn`` when training, from the cache when decoding.
  Returns (o [B, S, H, V] float32, new state or None)."""
  cfg = module.cfg
  if cache is None:
    o = module.recurrence_fn(q, k, v, log_decay, beta, reset_BxS=resets(segment_ids_BxS),
                             chunk=cfg.chunk)
    return o, None
  return linear_recurrence.chunked(q, k, v, log_decay, beta, initial_state=cache["state"],
                                   chunk=cfg.chunk)


class GatedDeltaNet(nn.Module):
  """Qwen3-Next's linear-attention layer (see the module docstring)."""
  cfg: Any
  recurrence_fn: Callable[..., Any] = local_recurrence
  conv_fn: Callable[..., Any] = local_conv

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    N, H, K, V = cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim, cfg.linear_v_dim
    pdt = jnp.dtype(cfg.param_dtype)
    proj = lambda shape, axes, name: Proj(cfg, shape, axes, name=name)(x_BxSxE)
    q = proj((N, K), ("embed", "heads", "head_dim"), "q")
    k = proj((N, K), ("embed", "heads", "head_dim"), "k")
    v = proj((H, V), ("embed", "heads", "head_dim"), "v")
    z = nn.with_logical_constraint(proj((H, V), ("embed", "heads", "head_dim"), "z"), _HEADS)
    b = proj((H,), ("embed", "heads"), "b")
    a = proj((H,), ("embed", "heads"), "a")
    (q, k, v), new = _short_convs(self, {"q": q, "k": k, "v": v}, segment_ids_BxS, cache)
    a_log = self.param("A_log", nn.with_logical_partitioning(
        lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0)),
        ("heads",)), (H,), pdt)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_log_uniform_dt_bias(cfg),
                                                                 ("heads",)), (H,), pdt)
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
        a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    beta = jax.nn.sigmoid(b.astype(jnp.float32))
    q, k = _l2norm(q) * K ** -0.5, _l2norm(k)  # value head h reads key head h // (H/N)
    o, state = _recur(self, q, k, v, g, beta, segment_ids_BxS, cache)
    o = GatedNorm(cfg, groups=H, name="norm")(nn.with_logical_constraint(o, _HEADS), z)
    out = Proj(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), 2, name="out")(o)
    if cache is None:
      return out, None
    return out, {**new, "state": state}


class GLA(nn.Module):
  """Gated Linear Attention (see the module docstring); no convolution unless conv_size > 0."""
  cfg: Any
  recurrence_fn: Callable[..., Any] = local_recurrence
  conv_fn: Callable[..., Any] = local_conv

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    H, K, V = cfg.linear_heads, cfg.linear_k_dim, cfg.linear_v_dim
    proj = lambda shape, axes, name: Proj(cfg, shape, axes, name=name)(x_BxSxE)
    q = proj((H, K), ("embed", "heads", "head_dim"), "q")
    k = proj((H, K), ("embed", "heads", "head_dim"), "k")
    v = proj((H, V), ("embed", "heads", "head_dim"), "v")
    gate = nn.with_logical_constraint(proj((H, V), ("embed", "heads", "head_dim"), "g"), _HEADS)
    low = proj((cfg.gate_rank,), ("embed", None), "gk_down")
    gk = Proj(cfg, (H, K), (None, "heads", "head_dim"), name="gk_up")(low)
    gk_bias = self.param("gk_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ("heads", "head_dim")),
                         (H, K), jnp.dtype(cfg.param_dtype))
    log_decay = jax.nn.log_sigmoid(gk.astype(jnp.float32) + gk_bias.astype(jnp.float32))
    log_decay = log_decay / cfg.gate_normalizer
    new = {}
    if cfg.conv_size:
      (q, k, v), new = _short_convs(self, {"q": q, "k": k, "v": v}, segment_ids_BxS, cache)
    q = q.astype(jnp.float32) * K ** -0.5
    o, state = _recur(self, q, k, v, log_decay, None, segment_ids_BxS, cache)
    o = GatedNorm(cfg, groups=H, name="norm")(nn.with_logical_constraint(o, _HEADS), gate)
    out = Proj(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), 2, name="out")(o)
    return out, (None if cache is None else {**new, "state": state})


class Mamba2(nn.Module):
  """Mamba-2's SSD mixer (see the module docstring)."""
  cfg: Any
  recurrence_fn: Callable[..., Any] = local_recurrence
  conv_fn: Callable[..., Any] = local_conv

  @nn.compact
  def __call__(self, x_BxSxE, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    G, H, N, P = cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim, cfg.linear_v_dim
    pdt = jnp.dtype(cfg.param_dtype)
    proj = lambda shape, axes, name: Proj(cfg, shape, axes, name=name)(x_BxSxE)
    z = nn.with_logical_constraint(proj((H, P), ("embed", "heads", "head_dim"), "z"), _HEADS)
    x = proj((H, P), ("embed", "heads", "head_dim"), "x")
    # Groups are what tensor parallelism splits B and C by (as Mamba-2 intends them).
    Bm = proj((G, N), ("embed", "heads", "head_dim"), "B")
    Cm = proj((G, N), ("embed", "heads", "head_dim"), "C")
    dt = proj((H,), ("embed", "heads"), "dt")
    (x, Bm, Cm), new = _short_convs(self, {"x": x, "B": Bm, "C": Cm}, segment_ids_BxS, cache,
                                    bias=True)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_log_uniform_dt_bias(cfg),
                                                                 ("heads",)), (H,), pdt)
    a_log = self.param("A_log", nn.with_logical_partitioning(
        lambda key, shape, dtype: jnp.log(jnp.arange(1, shape[0] + 1, dtype=dtype)), ("heads",)),
        (H,), pdt)
    d = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)), (H,), pdt)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [B, S, H]
    log_decay = dt * -jnp.exp(a_log.astype(jnp.float32))
    xf = x.astype(jnp.float32)  # q = C, k = B: head h reads group h // (H/G)
    y, state = _recur(self, Cm, Bm, xf * dt[..., None], log_decay, None, segment_ids_BxS, cache)
    y = y + xf * d.astype(jnp.float32)[:, None]
    y = GatedNorm(cfg, gate_first=True, groups=G, per_channel=True, name="norm")(
        nn.with_logical_constraint(y, _HEADS), z)
    out = Proj(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), 2, name="out")(y)
    return out, (None if cache is None else {**new, "state": state})


MIXERS = {"gated_deltanet": GatedDeltaNet, "gla": GLA, "mamba2": Mamba2}


def init_cache(cfg, batch: int) -> dict:
  """One mixer's empty generation state (conv windows and the recurrent state)."""
  N, H, K, V = cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim, cfg.linear_v_dim
  state = jnp.zeros((batch, H, K, V), jnp.float32)
  if cfg.mixer == "gated_deltanet":
    return {"conv_q": conv_cache(cfg, batch, N, K), "conv_k": conv_cache(cfg, batch, N, K),
            "conv_v": conv_cache(cfg, batch, H, V), "state": state}
  if cfg.mixer == "mamba2":
    return {"conv_x": conv_cache(cfg, batch, H, V), "conv_B": conv_cache(cfg, batch, N, K),
            "conv_C": conv_cache(cfg, batch, N, K), "state": state}
  convs = ({"conv_q": conv_cache(cfg, batch, H, K), "conv_k": conv_cache(cfg, batch, H, K),
            "conv_v": conv_cache(cfg, batch, H, V)} if cfg.conv_size else {})
  return {**convs, "state": state}
