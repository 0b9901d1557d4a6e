"""Mamba LM: token embedding, a scanned stack of nets/ssm.py selective state-space blocks with
RMSNorm pre-norm residuals, final norm and the LM head; no attention and no positions.

The same blocks run step by step for generation: ``Model.decode_step`` carries each layer's last
d_conv - 1 conv inputs and its SSM state (``init_cache``, nets/ssm.py).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nets import counting
from nets.layers import Embed, Proj, RMSNorm, scanned
from nets.registry import Family
from nets.ssm import Block, Config, block_flops, block_params, init_cache


def num_params(cfg: Config) -> int:
  """Closed-form parameter count (tests check it against the initialised model)."""
  E, V = cfg.d_model, cfg.vocab_size
  return V * E + cfg.num_layers * block_params(cfg) + E + (0 if cfg.tie_embeddings else E * V)


def flops(cfg: Config, step: counting.Step) -> float:
  """Forward FLOPs per token: L·(Mamba block) + 2·E·V (the head)."""
  del step
  return cfg.num_layers * block_flops(cfg) + 2 * cfg.d_model * cfg.vocab_size


class Model(nn.Module):
  """Mamba LM: tokens [B, S] int32 -> logits [B, S, V] float32.

  Same call signature as nets.llama.Model; ``attention_fn`` and positions are accepted and
  ignored (the recurrence is causal by construction). Segment ids, when given, restart the state
  and the conv window at each new segment. With ``cache`` (from ``init_cache``) the call also
  returns the updated cache, so a prompt can be prefilled in one call before ``decode_step``.
  """
  cfg: Config
  attention_fn: Any = None

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, cache=None):
    del positions_BxS
    cfg = self.cfg
    embed = Embed(cfg, name="embed")
    x_BxSxE = embed(tokens_BxS)
    if cfg.residual_in_fp32:
      x_BxSxE = x_BxSxE.astype(jnp.float32)  # each block adds its output to a float32 stream
    blocks = scanned(Block, cfg.remat, cfg.num_layers, in_axes=(nn.broadcast, 0))
    x_BxSxE, cache = blocks(cfg, name="layers")(x_BxSxE, segment_ids_BxS, cache)
    x_BxSxE = RMSNorm(cfg, name="final_norm")(x_BxSxE)
    if cfg.tie_embeddings:
      logits_BxSxV = embed.attend(x_BxSxE)
    else:
      logits_BxSxV = Proj(cfg, (cfg.vocab_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                          name="lm_head")(x_BxSxE)
    logits_BxSxV = nn.with_logical_constraint(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    return logits_BxSxV if cache is None else (logits_BxSxV, cache)

  def init_cache(self, batch_size: int) -> dict:
    """Empty generation state (needs no parameters)."""
    return init_cache(self.cfg, batch_size)

  def decode_step(self, token_B, cache):
    """One generation step: (logits [B, V] for the next token, updated cache).

    Call as ``model.apply(variables, token_B, cache, method=Model.decode_step)``.
    """
    logits_Bx1xV, cache = self(token_B[:, None], cache=cache)
    return logits_Bx1xV[:, 0], cache


FAMILY = Family(
    name="mamba", Config=Config, Model=Model, task="lm",
    num_params=lambda cfg, active=False: num_params(cfg), flops=flops,
    attention_length=lambda cfg, seq_len: seq_len,
    # The scan carry does not yet cross seq shards.
    sequence_parallel=False,
    init_cache=lambda cfg, batch, max_len: init_cache(cfg, batch), converter="mamba",
    # d_state 1: XLA counts the associative scan at about 6x the 9·I·N convention (test_flops.py).
    test_config=dict(vocab_size=1024, num_layers=1, d_model=1024, d_state=1, max_len=64,
                     scan="associative"))
