"""Llama-style decoder-only LM: token embedding, a scanned stack of nets/decoder.py blocks
(RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE, pre-norm), final norm and the LM head.

Layers are stacked with ``nn.scan`` (nets.layers.scanned) so compile time does not grow with
depth. Generation passes a KV cache (``init_cache``, nets/decoder.py) to ``Model``.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nets import attention, counting, decoder, moe
from nets.decoder import Block, Config, init_cache
from nets.layers import Embed, Proj, RMSNorm, scanned
from nets.registry import Family


def num_params(cfg: Config, active: bool = False) -> int:
  """Closed-form parameter count (tests check it against the initialised model).

  ``active=True`` counts what one token uses: top_k routed experts per MoE layer, not all.
  """
  E, D, H, K, M, V = (cfg.d_model, cfg.head_size, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim,
                      cfg.vocab_size)
  attn = 2 * E + E * H * D + 2 * E * K * D + H * D * E
  n = V * E + cfg.num_layers * (attn + 3 * E * M) + E + (0 if cfg.tie_embeddings else E * V)
  if cfg.moe.enabled:
    total, used = cfg.moe.num_params(E, M)
    n += (cfg.num_layers // cfg.moe.every) * ((used if active else total) - 3 * E * M)
  return n


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per token: L·(attention block + MLP) + 2·E·V (the head).

  MLP: 3·2·E·M (SwiGLU); every ``moe.every``-th layer a MoE layer instead
  (``counting.moe_layer``). The embedding lookup is a gather (0 FLOPs); a tied head is the same
  matmul as an untied one.
  """
  L, E, M = cfg.num_layers, cfg.d_model, cfg.mlp_dim
  n_moe = L // cfg.moe.every if cfg.moe.enabled else 0
  total = L * decoder.layer_flops(cfg, step.seq_len, step) + (L - n_moe) * 3 * 2 * E * M
  if n_moe:
    total += n_moe * counting.moe_layer(cfg.moe, E, M, step.seq_len, step)
  return total + 2 * E * cfg.vocab_size


class Model(nn.Module):
  """Decoder LM: tokens [B, S] int32 -> logits [B, S, V] float32.

  With ``cache`` (from ``init_cache``) the tokens are the next ones at ``positions_BxS`` (default
  0..S-1, a prompt), attention runs over the cache with the dense math whatever ``attention_fn``
  is, and the call returns (logits, updated cache).
  """
  cfg: Config
  attention_fn: Callable[..., Any] = attention.dot_product_attention
  moe_layout: moe.Layout = moe.Layout()  # MoE dispatch groups and expert parallelism

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, cache=None):
    cfg = self.cfg
    if cache is not None and segment_ids_BxS is not None:
      raise ValueError("segment ids (packed documents) are not supported with a KV cache; give "
                       "each document its own batch row.")
    if positions_BxS is None:
      positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    embed = Embed(cfg, name="embed")
    x_BxSxE = embed(tokens_BxS)

    blocks = moe.stack(Block, cfg.moe, (cfg, self.attention_fn, self.moe_layout), cfg.num_layers,
                       lambda unit, length: scanned(unit, cfg.remat, length))
    if cache is None:
      x_BxSxE, _ = blocks(x_BxSxE, positions_BxS, segment_ids_BxS)
    else:
      positions_BxS = positions_BxS.astype(jnp.int32)
      b_Bx1 = jnp.arange(tokens_BxS.shape[0])[:, None]
      cache = {**cache, "pos": cache["pos"].at[b_Bx1, positions_BxS].set(positions_BxS)}
      (x_BxSxE, cache, _), _ = blocks((x_BxSxE, cache, jnp.zeros((), jnp.int32)), positions_BxS,
                                      None)
    x_BxSxE = RMSNorm(cfg, name="final_norm")(x_BxSxE)
    if cfg.tie_embeddings:
      logits_BxSxV = embed.attend(x_BxSxE)
    else:
      logits_BxSxV = Proj(cfg, (cfg.vocab_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                          name="lm_head")(x_BxSxE)
    logits_BxSxV = nn.with_logical_constraint(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    return logits_BxSxV if cache is None else (logits_BxSxV, cache)


FAMILY = Family(
    name="llama", Config=Config, Model=Model, task="lm", num_params=num_params, flops=flops,
    attention_length=lambda cfg, seq_len: seq_len, moe=lambda cfg: cfg.moe,
    init_cache=init_cache, converter="llama",
    test_config=dict(vocab_size=256, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2,
                     mlp_dim=512, max_len=64))
