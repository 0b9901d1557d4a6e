"""VAR ("Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction",
Tian et al. 2024): a class-conditioned Transformer that predicts an image's token maps coarse to
fine, every token of scale k at once from all tokens of the coarser scales.

Tokens: nets/msvq.py's K square token maps s_1 < ... < s_K flattened coarse to fine (row-major
within a map), L = sum s_k^2 tokens over one codebook of V codes with C-dim features. The model
reads the teacher-forcing inputs x [B, L - s_1^2, C]: for k >= 2 the accumulated map f̂_{k-1}
(quantised features of scales < k, ``teacher_inputs``) area-pooled to s_k x s_k. The first
s_1^2 tokens are the class embedding plus a learned start position; the others a linear map of x.
Every token gets a learned absolute position and a learned embedding of its scale ("level").

Blocks are adaLN-Zero pre-norm attention + GELU MLP conditioned on the class embedding
(nets/conditioning.py's AdaLN and modulate), and the head is an adaLN-modulated LayerNorm before a
linear map to the V logits. The block-causal mask (a token sees every token of its own and of
coarser scales) is the causal mask of the attention kernels over positions = each token's scale
index, so every kernel of parallel/attention.py applies it.

Sampling runs scale by scale (``sample``): the KV cache (``init_cache``) holds the keys and
values of all tokens so far, so scale k runs only its s_k^2 new tokens; its ids, through the
quantiser, extend f̂, whose pooled map is the next scale's input. Classifier-free guidance runs
the batch with the null label too (the label table's extra row; train=True drops labels to it
with class_dropout_prob) and combines uncond + w (cond - uncond); the reference ramps w over the
scales, here it is one constant. The initialisation is odyssey's DiT one (Xavier linears, N(0,
0.02) tables, zero adaLN), not the reference's scaled truncated normals.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nets import attention, counting, msvq
from nets.conditioning import AdaLN, LabelEmbedder, drop_labels, modulate
from nets.layers import (Dense, LayerNorm, Mlp, build_config, check_basics, check_positive_floats,
                         scanned)
from nets.registry import Family

_ACT = ("act_batch", "act_seq", "act_embed")
_QKV = ("act_batch", "act_seq", "act_heads", "head_dim")

VARIANTS = {
    # VAR-d16 .. d30: width 64·depth, heads = depth, 256 px scales (msvq's default).
    **{f"d{d}": dict(depth=d, hidden_size=64 * d, num_heads=d) for d in (16, 20, 24, 30)},
    # sklearn digits (8×8 grey, 10 classes) through experiments/vqvae_digits.py's tokenizer:
    # 0.35M parameters, as the digits DiT, U-DiT and U-ViT (width 128, 1.31M, overfits the 1,437
    # training digits after ~500 steps: bench/results/runs.md).
    "digits": dict(depth=4, hidden_size=64, num_heads=4, num_classes=10, codebook_size=512,
                   vae_dim=16, scales=(1, 2, 3, 4, 6, 8)),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``."""
  variant: str = ""  # a key of VARIANTS; presets every field config.model leaves unset
  depth: int = 0
  hidden_size: int = 0
  num_heads: int = 0
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  codebook_size: int = 4096  # V, the tokenizer's
  vae_dim: int = 32  # C, the tokenizer's code features (msvq embed_dim)
  scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the tokenizer's token-map sides
  class_dropout_prob: float = 0.1
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    if model_cfg.get("scales") is not None:  # a ConfigDict holds a list or tuple
      overrides = {"scales": tuple(model_cfg["scales"]), **overrides}
    return build_config(cls, "var", VARIANTS, model_cfg, overrides)

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    check_basics(self, "var", ("depth", "hidden_size", "num_heads", "num_classes",
                               "codebook_size", "vae_dim"))
    s = tuple(self.scales)
    if not s or s[0] < 1 or any(b <= a for a, b in zip(s, s[1:])):
      raise ValueError(f"model.scales={s} must be positive token-map sides in increasing order "
                       "(e.g. (1, 2, 3, 4, 6, 8)).")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}.")
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"model.class_dropout_prob={self.class_dropout_prob} must be in [0, 1].")
    check_positive_floats(self, ("mlp_ratio", "norm_eps"))

  @property
  def offsets(self) -> tuple[int, ...]:
    """Where each scale's tokens start in the sequence, and L at the end."""
    return tuple(int(x) for x in np.cumsum([0] + [s * s for s in self.scales]))

  @property
  def first_len(self) -> int:
    """Start tokens (the class embedding): s_1^2."""
    return self.scales[0] ** 2

  @property
  def levels(self) -> np.ndarray:
    """[L] int32: the scale index of every token (the attention positions)."""
    return np.repeat(np.arange(len(self.scales)), [s * s for s in self.scales]).astype(np.int32)

  @property
  def null_label(self) -> int:
    return self.num_classes

  # The names every family's Config shares (nets/registry.py). The "image" is the finest token
  # map: image_size = s_K and channels = C.
  max_len = property(lambda self: sum(s * s for s in self.scales))
  width = property(lambda self: self.hidden_size)
  num_kv_heads = property(lambda self: self.num_heads)
  mlp_width = property(lambda self: int(self.hidden_size * self.mlp_ratio))
  image_size = property(lambda self: self.scales[-1])
  channels = property(lambda self: self.vae_dim)


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  del active  # no experts
  E, M, V, C = cfg.width, cfg.mlp_width, cfg.codebook_size, cfg.vae_dim
  block = (6 * E * E + 6 * E) + (3 * E * E + 3 * E) + (E * E + E) + (E * M + M) + (M * E + E)
  rows = cfg.num_classes + (cfg.class_dropout_prob > 0)
  embeddings = rows * E + cfg.first_len * E + (C * E + E) + cfg.max_len * E + len(cfg.scales) * E
  return embeddings + cfg.depth * block + (2 * E * E + 2 * E) + (E * V + V)


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per image: 2·C·E per input token, depth blocks (modulation 2·E·6E per image;
  per token 2·4·E² (qkv, out), attention, 2·2·E·M MLP), head 2·E·2E + 2·E·V per token.

  Attention, model count: scale k's s_k^2 queries see the ``offsets[k + 1]`` keys up to their
  own scale, 4·E per pair; executed, the dense masked kernel runs all L^2 pairs.
  """
  E, M, V, C, L = cfg.width, cfg.mlp_width, cfg.codebook_size, cfg.vae_dim, cfg.max_len
  if step.executed:
    pairs = L * L
  else:
    pairs = sum(s * s * end for s, end in zip(cfg.scales, cfg.offsets[1:]))
  block = 2 * E * 6 * E + L * (2 * 4 * E * E + 2 * 2 * E * M) + 4 * E * pairs
  return (2 * C * E * (L - cfg.first_len) + cfg.depth * block + 2 * E * 2 * E
          + L * 2 * E * V)


def init_cache(cfg: Config, batch_size: int, max_len: int | None = None, dtype=None) -> dict:
  """Empty KV cache of every layer for one image's L tokens: k, v [depth, B, L, H, D] in
  ``dtype`` (default the compute dtype). ``max_len`` must be None or L (an image is L tokens)."""
  if max_len not in (None, cfg.max_len):
    raise ValueError(f"a VAR cache holds one image's {cfg.max_len} tokens, not max_len={max_len}.")
  H = cfg.num_heads
  shape = (cfg.depth, batch_size, cfg.max_len, H, cfg.width // H)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _attend_cached(cache: dict, layer, q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, end: int):
  """Writes the new tokens' keys/values at slots [end - S, end) of ``layer`` and attends the new
  queries over slots [0, end): their own scale and every coarser one, all visible."""
  start = end - q_BxSxHxD.shape[1]
  write = lambda c, new: jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype),
                                                      (layer, 0, start, 0, 0))
  k_all, v_all = write(cache["k"], k_BxSxHxD), write(cache["v"], v_BxSxHxD)
  seen = lambda c: jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)[:, :end]
  dtype = q_BxSxHxD.dtype
  o_BxSxHxD = attention.dot_product_attention(q_BxSxHxD, seen(k_all).astype(dtype),
                                              seen(v_all).astype(dtype), causal=False)
  return {"k": k_all, "v": v_all}, o_BxSxHxD


class Block(nn.Module):
  """adaLN-Zero block: x + gate·Attn(LN(x)·(1+scale)+shift), the same for the GELU MLP; attention
  block-causal over the tokens' scale indices.

  ``cached_end`` > 0: decoding one scale, whose tokens end at ``cached_end``; the scan carry is
  then (activations, KV cache, this layer's index).
  """
  cfg: Config
  attention_fn: Callable[..., Any]
  cached_end: int = 0

  @nn.compact
  def __call__(self, carry, c_BxE, levels_BxS):
    cfg = self.cfg
    cache = None
    if self.cached_end:
      x_BxSxE, cache, layer = carry
    else:
      x_BxSxE = carry
    E, H = cfg.width, cfg.num_heads
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    mod_Bx6xE = AdaLN(cfg, 6, name="adaLN")(c_BxE)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod_Bx6xE[:, i] for i in range(6))

    h_BxSxE = modulate(LayerNorm(cfg, affine=False, eps=cfg.norm_eps)(x_BxSxE), shift_msa,
                       scale_msa)
    qkv_BxSx3xHxD = Dense(cfg, (3, H, E // H), ("embed", None, "heads", "head_dim"),
                          name="qkv")(h_BxSxE)
    q_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 0], _QKV)
    k_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 1], _QKV)
    v_BxSxHxD = nn.with_logical_constraint(qkv_BxSx3xHxD[:, :, 2], _QKV)
    if cache is None:
      o_BxSxHxD = self.attention_fn(q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, causal=True,
                                    positions_BxS=levels_BxS)
    else:
      cache, o_BxSxHxD = _attend_cached(cache, layer, q_BxSxHxD, k_BxSxHxD, v_BxSxHxD,
                                        self.cached_end)
    o_BxSxHxD = nn.with_logical_constraint(o_BxSxHxD, _QKV)
    h_BxSxE = Dense(cfg, (E,), ("heads", "head_dim", "embed"), n_in=2, name="out")(o_BxSxHxD)
    x_BxSxE = x_BxSxE + gate_msa[:, None] * h_BxSxE

    h_BxSxE = modulate(LayerNorm(cfg, affine=False, eps=cfg.norm_eps)(x_BxSxE), shift_mlp,
                       scale_mlp)
    x_BxSxE = x_BxSxE + gate_mlp[:, None] * Mlp(cfg, cfg.mlp_width, name="mlp")(h_BxSxE)
    x_BxSxE = nn.with_logical_constraint(x_BxSxE, _ACT)
    return (x_BxSxE if cache is None else (x_BxSxE, cache, layer + 1)), None


class Model(nn.Module):
  """VAR: teacher-forcing inputs x [B, L - s_1^2, C], labels y [B] -> logits [B, L, V] float32.

  With ``cache`` (``init_cache``) and ``scale`` k, x holds scale k's inputs only [B, s_k^2, C]
  (ignored for k = 0) and the call returns (scale k's logits [B, s_k^2, V], the updated cache);
  ``decode_scale`` is that call.
  """
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, x_BxTxC, y_B, *, train: bool = False, force_drop_ids_B=None, cache=None,
               scale: int | None = None):
    cfg = self.cfg
    E, first, L = cfg.width, cfg.first_len, cfg.max_len
    if (cache is None) != (scale is None):
      raise ValueError("decoding a scale needs both the cache and the scale index.")
    start, end = (0, L) if scale is None else cfg.offsets[scale:scale + 2]
    if (scale is None or scale > 0) and x_BxTxC.shape[1:] != (end - max(start, first),
                                                             cfg.vae_dim):
      raise ValueError(f"inputs are {tuple(x_BxTxC.shape[1:])} per image but the model expects "
                       f"({end - max(start, first)}, {cfg.vae_dim}): the tokens after the first "
                       f"scale (model.scales={cfg.scales}) by model.vae_dim.")
    param = lambda name, shape: self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), shape, jnp.dtype(cfg.param_dtype))

    y_B = drop_labels(self, cfg, y_B, train, force_drop_ids_B)
    c_BxE = LabelEmbedder(cfg, E, name="class_embed")(y_B)
    c_BxE = nn.with_logical_constraint(c_BxE, ("act_batch", "act_embed"))
    start_BxFxE = c_BxE[:, None] + param("pos_start", (first, E)).astype(cfg.dtype)
    word_embed = Dense(cfg, (E,), (None, "embed"), name="word_embed")
    if scale is None:
      x_BxSxE = jnp.concatenate([start_BxFxE, word_embed(x_BxTxC)], axis=1)
    else:
      x_BxSxE = start_BxFxE if scale == 0 else word_embed(x_BxTxC)
    levels_S = cfg.levels[start:end]
    pos_SxE = (param("pos_embed", (L, E))[start:end]
               + jnp.take(param("level_embed", (len(cfg.scales), E)), levels_S, axis=0))
    x_BxSxE = nn.with_logical_constraint(x_BxSxE + pos_SxE.astype(cfg.dtype), _ACT)

    B = x_BxSxE.shape[0]
    levels_BxS = jnp.broadcast_to(jnp.asarray(levels_S), (B, end - start))
    blocks = scanned(Block, cfg.remat, cfg.depth)(cfg, self.attention_fn,
                                                  0 if cache is None else end, name="layers")
    if cache is None:
      x_BxSxE, _ = blocks(x_BxSxE, c_BxE, levels_BxS)
    else:
      (x_BxSxE, cache, _), _ = blocks((x_BxSxE, cache, jnp.zeros((), jnp.int32)), c_BxE,
                                      levels_BxS)

    mod_Bx2xE = AdaLN(cfg, 2, name="head_adaLN")(c_BxE)
    h_BxSxE = modulate(LayerNorm(cfg, affine=False, eps=cfg.norm_eps)(x_BxSxE), mod_Bx2xE[:, 0],
                       mod_Bx2xE[:, 1])
    logits_BxSxV = Dense(cfg, (cfg.codebook_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                         name="head")(h_BxSxE)
    logits_BxSxV = nn.with_logical_constraint(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    return logits_BxSxV if cache is None else (logits_BxSxV, cache)

  def decode_scale(self, x_BxSxC, y_B, cache, k: int):
    """(scale k's logits [B, s_k^2, V], the cache with its keys/values); x: scale k's inputs
    [B, s_k^2, C], None for k = 0. The cache must hold scales 0..k-1 of the same batch."""
    if x_BxSxC is None:
      x_BxSxC = jnp.zeros((y_B.shape[0], 0, self.cfg.vae_dim), jnp.float32)
    return self(x_BxSxC, y_B, cache=cache, scale=k)


# --- Teacher forcing and sampling --------------------------------------------------------------

def _features(quantizer, qparams, k: int, ids_BxSxS):
  """h_k [B, h, h, C]: scale k's codes through the quantiser, at the finest side h."""
  return quantizer.apply({"params": qparams}, k, ids_BxSxS, quantizer.cfg.scales[-1],
                         method=msvq.Quantizer.scale_features)


def _pooled(f_BxHxHxC, side: int):
  """f̂ area-pooled to side x side, flattened row-major: [B, side^2, C]."""
  down = jnp.asarray(msvq.area_matrix(side, f_BxHxHxC.shape[1]))
  out = msvq.resize(f_BxHxHxC, down, down)
  return out.reshape(out.shape[0], side * side, out.shape[-1])


def teacher_inputs(quantizer, qparams, ids):
  """The model's inputs x [B, L - s_1^2, C] from the ids of every scale (a sequence of
  [B, s_k, s_k]): for k >= 2, f̂_{k-1} = sum of the quantiser's h_j for j < k, pooled to s_k."""
  scales = quantizer.cfg.scales
  if len(ids) != len(scales):
    raise ValueError(f"got token maps of {len(ids)} scales; the quantiser has {len(scales)} "
                     f"(model.scales={scales}).")
  f_hat, xs = 0.0, []
  for k, side in enumerate(scales[1:]):
    f_hat = f_hat + _features(quantizer, qparams, k, ids[k])
    xs.append(_pooled(f_hat, side))
  return jnp.concatenate(xs, axis=1)


def guide(cond_logits, uncond_logits, w):
  """Classifier-free guidance uncond + w (cond - uncond), written cond + (w - 1)(cond - uncond)
  so that w = 1 returns the conditional logits bit for bit."""
  return cond_logits + (w - 1.0) * (cond_logits - uncond_logits)


def choose(logits_NxV, rng, *, temperature: float, top_k: int, top_p: float):
  """One id per row [N] int32: greedy at temperature 0, else a draw from softmax(logits / T)
  restricted to the top_k most likely ids (0: all) and then to the smallest most-likely set whose
  probability reaches top_p (1: all); ties at a cut-off are kept."""
  if temperature == 0:
    return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  scaled = logits_NxV.astype(jnp.float32) / temperature
  if 0 < top_k < scaled.shape[-1]:
    kth_Nx1 = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled >= kth_Nx1, scaled, -jnp.inf)
  if top_p < 1.0:
    sorted_NxV = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_NxV, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # a prefix, never empty
    cutoff_Nx1 = jnp.take_along_axis(sorted_NxV, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
    scaled = jnp.where(scaled >= cutoff_Nx1, scaled, -jnp.inf)
  return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def sample(model, params, quantizer, qparams, labels_B, rng, *, cfg_scale: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, cache: bool = True,
           guidance: bool | None = None):
  """Ids of every scale (a tuple of [B, s_k, s_k] int32) for the class labels [B], scale by scale.

  After scale k: f̂ += quantiser h_k(ids_k) and the next scale's input is f̂ pooled to s_{k+1}.
  ``guidance`` (default: cfg_scale != 1) runs the null label beside every row and samples from
  ``guide``'s logits; at cfg_scale 1 those are the conditional ones. ``cache=False`` reruns the
  whole sequence for every scale (the cache's reference). The knobs are static: a new value
  compiles again. ``quantizer.decode_ids`` of the ids gives the features for the decoder.
  """
  cfg = model.cfg
  guidance = cfg_scale != 1.0 if guidance is None else guidance
  if guidance and cfg.class_dropout_prob <= 0:
    raise ValueError("classifier-free guidance needs the null label, which the model has only "
                     "with model.class_dropout_prob > 0; use cfg_scale=1.")
  if tuple(quantizer.cfg.scales) != tuple(cfg.scales) or (
      quantizer.cfg.embed_dim, quantizer.cfg.codebook_size) != (cfg.vae_dim, cfg.codebook_size):
    raise ValueError(f"the quantiser's scales {quantizer.cfg.scales}, embed_dim and codebook_size "
                     f"differ from the model's model.scales={cfg.scales}, vae_dim={cfg.vae_dim} "
                     f"and codebook_size={cfg.codebook_size}.")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature} must be >= 0, top_k={top_k} >= 0 and "
                     f"top_p={top_p} in (0, 1].")
  return _sample(model, params, quantizer, qparams, labels_B, rng, cfg_scale=float(cfg_scale),
                 top_k=int(top_k), top_p=float(top_p), temperature=float(temperature),
                 cache=cache, guidance=guidance)


@functools.partial(jax.jit, static_argnames=("model", "quantizer", "cfg_scale", "top_k", "top_p",
                                             "temperature", "cache", "guidance"))
def _sample(model, params, quantizer, qparams, labels_B, rng, *, cfg_scale, top_k, top_p,
            temperature, cache, guidance):
  cfg = model.cfg
  B, V, C, first = labels_B.shape[0], cfg.codebook_size, cfg.vae_dim, cfg.first_len
  both = lambda a: jnp.concatenate([a, a]) if guidance else a
  y = both(labels_B.astype(jnp.int32))
  if guidance:
    y = y.at[B:].set(cfg.null_label)
  variables = {"params": params}
  kv = init_cache(cfg, y.shape[0]) if cache else None
  x_all = jnp.zeros((y.shape[0], cfg.max_len - first, C), jnp.float32)  # cache=False's buffer
  x_k, f_hat, ids = None, 0.0, []
  for k, side in enumerate(cfg.scales):
    start, end = cfg.offsets[k:k + 2]
    if cache:
      logits, kv = model.apply(variables, x_k, y, kv, k, method=Model.decode_scale)
    else:  # tokens after scale k hold zeros, which the block-causal mask hides
      logits = model.apply(variables, x_all, y)[:, start:end]
    if guidance:
      logits = guide(logits[:B], logits[B:], cfg_scale)
    rng, step_rng = jax.random.split(rng)
    ids_k = choose(logits.reshape(B * side * side, V), step_rng, temperature=temperature,
                   top_k=top_k, top_p=top_p).reshape(B, side, side)
    ids.append(ids_k)
    if k + 1 < len(cfg.scales):
      f_hat = f_hat + _features(quantizer, qparams, k, ids_k)
      x_k = both(_pooled(f_hat, cfg.scales[k + 1]))
      x_all = jax.lax.dynamic_update_slice(x_all, x_k, (0, end - first, 0))
  return tuple(ids)


FAMILY = Family(
    name="var", Config=Config, Model=Model, task="var", num_params=num_params, flops=flops,
    attention_length=lambda cfg, seq_len: cfg.max_len, init_cache=init_cache,
    position_masks=True,
    test_config=dict(variant="digits", hidden_size=256, depth=2, num_heads=4, codebook_size=512,
                     vae_dim=16))
