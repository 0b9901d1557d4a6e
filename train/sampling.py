"""Autoregressive sampling from a decoder LM without a cache (one jitted loop, one compile)."""

from functools import partial

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("model", "prompt_len", "valid_vocab", "end"))
def _sample(model, params, buf_BxN, rng, temperature, *, prompt_len: int, valid_vocab: int,
            end: int):
  N = end

  def body(t, carry):
    buf_BxN, rng = carry
    rng, step_rng = jax.random.split(rng)
    # Positions after t hold placeholders; the causal mask keeps them out of logits[:, t - 1].
    logits_BxV = model.apply({"params": params}, buf_BxN)[:, t - 1]
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < valid_vocab, logits_BxV, -jnp.inf)
    greedy = jnp.argmax(logits_BxV, axis=-1)
    sampled = jax.random.categorical(step_rng, logits_BxV / jnp.maximum(temperature, 1e-6))
    token_B = jnp.where(temperature > 0, sampled, greedy).astype(buf_BxN.dtype)
    return buf_BxN.at[:, t].set(token_B), rng

  buf_BxN, _ = jax.lax.fori_loop(prompt_len, N, body, (buf_BxN, rng))
  return buf_BxN


def sample(model, params, prompt_ids: np.ndarray, *, num_samples: int, max_new_tokens: int,
           temperature: float, seed: int, valid_vocab: int, pad_id: int,
           sharding=None, length_multiple: int = 1) -> np.ndarray:
  """Returns [num_samples, prompt + max_new_tokens] token ids continuing ``prompt_ids``.

  ``length_multiple``: the model's inputs must be a multiple of this long (MEGABYTE patches);
  the buffer is padded at the end, which a causal model never looks at.
  """
  P, end = len(prompt_ids), len(prompt_ids) + max_new_tokens
  buf = np.full((num_samples, -(-end // length_multiple) * length_multiple), pad_id, np.int32)
  buf[:, :P] = prompt_ids
  buf = jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf)
  out = _sample(model, params, buf, jax.random.PRNGKey(seed),
                jnp.float32(temperature), prompt_len=P, valid_vocab=valid_vocab, end=end)
  return np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))[:, :end]
