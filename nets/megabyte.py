"""MEGABYTE (Yu et al., "MEGABYTE: Predicting Million-byte Sequences with Multiscale Transformers",
2023) generalised to an N-stage hierarchy as in MBLM (Egli et al., "Multiscale Byte Language
Models", 2025): each stage is a stack of Transformer (nets/decoder.py) or Mamba (nets/ssm.py)
blocks chosen by ``blocks``.

``patch_sizes=(P1, ..., Pn-1)`` gives n stages. Stage 0 (global) runs over tokens of
G0 = P1·…·Pn-1 bytes; stage s > 0 runs, separately for every stage-(s-1) token, over its Ps
sub-tokens of Gs = Ps+1·…·Pn-1 bytes; the last stage runs over single bytes. (8,) is classic
two-stage MEGABYTE: a global model over 8-byte patches and a local model within each patch.

A stage's token embedding concatenates the embeddings of its Gs bytes (a table of width
E_b = d_model[-1] per stage) and projects them to d_model[s]. Positions: the concatenation's slots
already tell the projection each byte's offset in its patch, and Transformer stages add RoPE over
their own sequence; Mamba stages need none. Stage s > 0 adds to the input of sub-token j a
projection of its parent's output, one projection per j (MEGABYTE's w^GL).

Causality, with this codebase's LM convention that logits[t] predicts inputs[t+1]: every stage
but the last shifts its token inputs right by one (a learned start token first), so a token's
output sees only bytes before the token begins; the last stage gets each byte itself, which is
the "previous byte" of the byte it predicts (MEGABYTE's learned start byte stands in for the byte
that, in its convention of predicting byte t from bytes < t, lies in the previous patch). So
logits[t] depends exactly on inputs[<= t], across patch boundaries too.
Extra legend: N flattened parent tokens (batch × earlier stages), P a stage's sequence length,
G bytes per token of a stage.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nets import attention, counting, decoder, ssm
from nets.layers import (Embed, Proj, RMSNorm, build_config, check_positive_floats,
                         check_remat_and_dtypes, scanned)
from nets.registry import Family

BLOCKS = ("transformer", "mamba")
_PER_STAGE = ("d_model", "num_layers", "num_heads", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; built only by ``Config.from_config(config.model)``.

  Per-stage tuples are ordered global first and have len(patch_sizes) + 1 entries; num_heads and
  mlp_dim are ignored for Mamba stages.
  """
  vocab_size: int
  patch_sizes: tuple[int, ...]
  d_model: tuple[int, ...]
  num_layers: tuple[int, ...]
  num_heads: tuple[int, ...]
  mlp_dim: tuple[int, ...]
  blocks: tuple[str, ...] = ()  # one of BLOCKS per stage; () means all "transformer"
  max_len: int = 2048
  rope_theta: float = 10000.0
  d_state: int = 16  # Mamba stages: see nets/ssm.py
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0
  scan_chunk: int = 0
  scan: str = "auto"  # Mamba stages: see nets.ssm.Config.scan
  norm_eps: float = 1e-5
  tie_embeddings: bool = False  # the head reuses the last stage's byte table
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of nets.layers.REMAT_POLICIES

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> "Config":
    """Builds from ``config.model`` (its ``name`` is the family, not a hyperparameter)."""
    # ConfigDict/CLI lists become tuples: the dataclass must be hashable.
    tuples = {name: tuple(value) for name in ("patch_sizes", "blocks") + _PER_STAGE
              if isinstance(value := {**model_cfg, **overrides}.get(name), (list, tuple))}
    return build_config(cls, "megabyte", {}, model_cfg, {**overrides, **tuples})

  def validate(self):
    """Raises ValueError with one sentence for inconsistent hyperparameters."""
    if (not isinstance(self.patch_sizes, tuple) or not self.patch_sizes
        or any(p < 1 for p in self.patch_sizes)):
      raise ValueError(f"model.patch_sizes={self.patch_sizes} must be a non-empty tuple of "
                       "positive sizes, one per stage after the global one.")
    n = self.num_stages
    for name in _PER_STAGE + (("blocks",) if self.blocks else ()):
      value = getattr(self, name)
      if not isinstance(value, tuple) or len(value) != n:
        raise ValueError(f"model.{name}={value!r} must be a tuple of {n} entries, one per stage "
                         f"(global first), since model.patch_sizes={self.patch_sizes}.")
    for s, kind in enumerate(self.stage_blocks):
      if kind not in BLOCKS:
        raise ValueError(f"model.blocks[{s}]={kind!r} is not one of {BLOCKS}.")
      sizes = ("d_model", "num_layers") + (("num_heads", "mlp_dim") if kind == "transformer"
                                           else ())
      for name in sizes:
        if getattr(self, name)[s] < 1:
          raise ValueError(f"model.{name}[{s}]={getattr(self, name)[s]} must be positive.")
      d, h = self.d_model[s], self.num_heads[s]
      if kind == "transformer" and (d % h or (d // h) % 2):
        raise ValueError(f"model.d_model[{s}]={d} must be model.num_heads[{s}]={h} times an even "
                         "head size (rotary embeddings).")
    check_remat_and_dtypes(self)
    check_positive_floats(self, ("rope_theta", "norm_eps"))
    for s in range(n):
      stage_config(self, s).validate()

  @property
  def num_stages(self) -> int:
    return len(self.patch_sizes) + 1

  @property
  def stage_blocks(self) -> tuple[str, ...]:
    return self.blocks or ("transformer",) * self.num_stages

  @property
  def group_sizes(self) -> tuple[int, ...]:
    """Bytes per token of each stage: (P1·…·Pn-1, …, Pn-1, 1)."""
    return tuple(math.prod(self.patch_sizes[s:]) for s in range(self.num_stages))

  @property
  def length_multiple(self) -> int:
    """Input lengths must be multiples of this (the bytes in one global token)."""
    return self.group_sizes[0]

  # The names every family's Config shares (nets/registry.py), of the global stage; num_heads
  # (a config.model field) stays per stage.
  width = property(lambda self: self.d_model[0])
  depth = property(lambda self: self.num_layers[0])
  mlp_width = property(lambda self: self.mlp_dim[0])


def stage_config(cfg: Config, s: int):
  """The nets.decoder or nets.ssm Config of stage ``s``'s blocks."""
  common = dict(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers[s], d_model=cfg.d_model[s],
                max_len=cfg.max_len, norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings,
                init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                remat=cfg.remat)
  if cfg.stage_blocks[s] == "mamba":
    return ssm.Config(**common, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                        dt_rank=cfg.dt_rank, scan_chunk=cfg.scan_chunk, scan=cfg.scan)
  return decoder.Config(**common, num_heads=cfg.num_heads[s], num_kv_heads=cfg.num_heads[s],
                      mlp_dim=cfg.mlp_dim[s], rope_theta=cfg.rope_theta)


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  V, Eb, n = cfg.vocab_size, cfg.d_model[-1], cfg.num_stages
  total = 0 if cfg.tie_embeddings else Eb * V  # head
  for s in range(n):
    d, sub = cfg.d_model[s], stage_config(cfg, s)
    if cfg.stage_blocks[s] == "mamba":
      per_layer = ssm.block_params(sub)
    else:  # decoder.Block with num_kv_heads = num_heads, so heads × head size = d
      per_layer = 2 * d + 4 * d * d + 3 * d * cfg.mlp_dim[s]
    total += V * Eb + cfg.num_layers[s] * per_layer + d  # byte table, blocks, output norm
    if s < n - 1:
      total += cfg.group_sizes[s] * Eb * d + d  # patch projection, start token
    if s > 0:
      total += cfg.d_model[s - 1] * cfg.patch_sizes[s - 1] * d  # from the parent token
  return total


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per byte: Σ_s (per stage-s token) / G_s + 2·E_b·V (the head).

  Stage s runs tokens of G_s bytes in sequences of P_s (P_0 = seq_len / G_0, then the patch
  sizes); per stage-s token: 2·G_s·E_b·d_s (patch projection of the concatenated byte
  embeddings; not the last stage) + 2·d_{s-1}·d_s (the parent's output projected to its P_s
  children; not the global stage) + L_s blocks: decoder blocks (heads × head_dim = d_s, MLP
  3·2·d_s·M_s) with causal attention over P_s, or Mamba blocks.
  """
  n, Eb = cfg.num_stages, cfg.d_model[-1]
  lengths = (step.seq_len // cfg.group_sizes[0],) + cfg.patch_sizes
  total = 2 * Eb * cfg.vocab_size
  for s in range(n):
    sub, d, G = stage_config(cfg, s), cfg.d_model[s], cfg.group_sizes[s]
    per_token = 2 * G * Eb * d if s < n - 1 else 0
    if s > 0:
      per_token += 2 * cfg.d_model[s - 1] * d
    if cfg.stage_blocks[s] == "mamba":
      per_token += sub.num_layers * ssm.block_flops(sub)
    else:
      per_token += sub.num_layers * (decoder.layer_flops(sub, lengths[s], step)
                                     + 3 * 2 * d * sub.mlp_dim)
    total += per_token / G
  return total


def segment_positions(segment_ids_NxP):
  """Each token's index within its run of equal segment ids (contiguous documents)."""
  P = segment_ids_NxP.shape[1]
  index_NxP = jnp.broadcast_to(jnp.arange(P), segment_ids_NxP.shape)
  starts_NxP = jnp.concatenate([jnp.ones_like(segment_ids_NxP[:, :1], bool),
                                segment_ids_NxP[:, 1:] != segment_ids_NxP[:, :-1]], axis=1)
  return index_NxP - jax.lax.cummax(jnp.where(starts_NxP, index_NxP, 0), axis=1)


def _shifted_patches(e_NxPxGxE, seg_NxPxG):
  """The previous token's byte embeddings at every token, and where the start token goes.

  Without segments: token j gets token j-1's bytes, token 0 the start token. With them, only the
  bytes of token j's own document (the segment of its first byte) are kept, the others zeroed;
  a token with none of them (its document starts at its first byte) gets the start token.
  """
  zeros = jnp.zeros_like(e_NxPxGxE[:, :1])
  prev_NxPxGxE = jnp.concatenate([zeros, e_NxPxGxE[:, :-1]], axis=1)
  first_NxP = jnp.arange(e_NxPxGxE.shape[1])[None, :] == 0
  if seg_NxPxG is None:
    return prev_NxPxGxE, first_NxP
  prev_seg_NxPxG = jnp.concatenate([jnp.full_like(seg_NxPxG[:, :1], -1), seg_NxPxG[:, :-1]],
                                   axis=1)
  keep_NxPxG = prev_seg_NxPxG == seg_NxPxG[:, :, :1]
  prev_NxPxGxE = jnp.where(keep_NxPxG[..., None], prev_NxPxGxE, 0)
  return prev_NxPxGxE, first_NxP | ~jnp.any(keep_NxPxG, axis=-1)


class Model(nn.Module):
  """Byte LM: tokens [B, S] int32 -> logits [B, S, V] float32; S must divide into global tokens.

  Same call signature as nets.llama.Model; positions are ignored (each stage numbers its own
  sequence). Segment ids (packed documents, contiguous) keep every document to itself at every
  stage: a stage token belongs to the document of its first byte; its input (the previous token's
  bytes) keeps only that document's bytes, or is the start token where the document starts at
  the token; its parent's output is added only when the parent belongs to the same document;
  attention is masked by these token segments, RoPE counts from each document's first token, and
  Mamba stages restart there. So no byte's logits depend on another document's bytes, and a
  document starting at a global-patch boundary gets exactly the logits it gets alone
  (docs/models.md).
  """
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
    del positions_BxS
    cfg = self.cfg
    B, S = tokens_BxS.shape
    G0 = cfg.group_sizes[0]
    if S % G0:
      raise ValueError(f"sequence length {S} is not divisible by {G0}, the product of "
                       f"model.patch_sizes={cfg.patch_sizes}; change train.seq_len or the patches.")
    n, Eb = cfg.num_stages, cfg.d_model[-1]
    byte_cfg = stage_config(cfg, n - 1)  # width Eb: every stage's byte table has it
    lengths = (S // G0,) + cfg.patch_sizes  # each stage's sequence length
    parent_NxPxD, parent_seg_N = None, None
    for s in range(n):
      sub, d, P, G = stage_config(cfg, s), cfg.d_model[s], lengths[s], cfg.group_sizes[s]
      embed = Embed(byte_cfg, name=f"embed_{s}")
      e_NxPxGxE = embed(tokens_BxS.reshape(-1, P, G))
      seg_NxPxG = None if segment_ids_BxS is None else segment_ids_BxS.reshape(-1, P, G)
      seg_NxP = None if seg_NxPxG is None else seg_NxPxG[:, :, 0]  # a token's first byte's
      if s < n - 1:
        prev_NxPxGxE, use_start_NxP = _shifted_patches(e_NxPxGxE, seg_NxPxG)
        x_NxPxD = Proj(sub, (d,), (None, None, "embed"), n_in=2, name=f"patch_{s}")(prev_NxPxGxE)
        start_D = self.param(f"start_{s}", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("embed",)), (d,), jnp.dtype(cfg.param_dtype))
        x_NxPxD = jnp.where(use_start_NxP[..., None], start_D.astype(x_NxPxD.dtype), x_NxPxD)
      else:
        x_NxPxD = e_NxPxGxE[:, :, 0]  # G == 1 and d == Eb
      if parent_NxPxD is not None:
        parent_NxD = parent_NxPxD.reshape(-1, parent_NxPxD.shape[-1])
        from_parent_NxPxD = Proj(sub, (P, d), ("embed", None, None),
                                 name=f"from_parent_{s}")(parent_NxD)
        if seg_NxP is not None:  # only where the parent token is of the same document
          same_NxP = seg_NxP == parent_seg_N[:, None]
          from_parent_NxPxD = jnp.where(same_NxP[..., None], from_parent_NxPxD, 0)
        x_NxPxD = x_NxPxD + from_parent_NxPxD
      x_NxPxD = nn.with_logical_constraint(x_NxPxD, ("act_batch", "act_seq", "act_embed"))
      x_NxPxD = self._stage(sub, s, x_NxPxD, seg_NxP)
      parent_NxPxD = RMSNorm(sub, name=f"norm_{s}")(x_NxPxD)
      parent_seg_N = None if seg_NxP is None else seg_NxP.reshape(-1)

    x_BxSxE = parent_NxPxD.reshape(B, S, Eb)
    if cfg.tie_embeddings:  # ``embed`` is the last stage's byte table
      logits_BxSxV = embed.attend(x_BxSxE)
    else:
      logits_BxSxV = Proj(byte_cfg, (cfg.vocab_size,), ("embed", "vocab"),
                          out_dtype=jnp.float32, name="lm_head")(x_BxSxE)
    logits_BxSxV = nn.with_logical_constraint(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
    return logits_BxSxV.astype(jnp.float32)

  def _stage(self, sub, s: int, x_NxPxD, seg_NxP):
    """Stage ``s``'s block stack over its sequences, within each document when segmented."""
    if self.cfg.stage_blocks[s] == "mamba":
      stack = scanned(ssm.Block, sub.remat, sub.num_layers)
      return stack(sub, name=f"stage_{s}")(x_NxPxD, seg_NxP, None)[0]
    if seg_NxP is None:
      positions_NxP = jnp.broadcast_to(jnp.arange(x_NxPxD.shape[1]), x_NxPxD.shape[:2])
    else:
      positions_NxP = segment_positions(seg_NxP)
    stack = scanned(decoder.Block, sub.remat, sub.num_layers)
    return stack(sub, self.attention_fn, name=f"stage_{s}")(x_NxPxD, positions_NxP, seg_NxP)[0]


FAMILY = Family(
    name="megabyte", Config=Config, Model=Model, task="lm",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: seq_len,
    # Its stages attend within patches, not across a seq-sharded sequence.
    sequence_parallel=False, length_multiple=lambda cfg: cfg.length_multiple,
    test_config=dict(vocab_size=256, patch_sizes=(4,), d_model=(256, 256), num_layers=(1, 1),
                     num_heads=(4, 4), mlp_dim=(512, 512), max_len=64))
