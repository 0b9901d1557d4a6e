"""The dense reference attention: a pure function of arrays that every other kernel must match."""

import jax
import jax.numpy as jnp


def dot_product_attention(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, *, causal: bool,
                          positions_BxS=None, segment_ids_BxS=None, segment_ids_BxT=None,
                          bias_HxSxT=None):
  """Softmax attention with grouped-query heads (H % K == 0); logits and softmax in float32.

  Masks: ``causal`` keeps keys whose position is <= the query's (positions default to 0..S-1 and
  are shared by queries and keys, S == T); segment ids, when given, keep only pairs in the same
  segment (packed documents; give padding its own id). ``bias_HxSxT`` is added to the scaled
  logits of every batch row (Swin's relative position bias).
  """
  B, S, H, D = q_BxSxHxD.shape
  T, K = k_BxTxKxD.shape[1], k_BxTxKxD.shape[2]
  if H % K:
    raise ValueError(f"num_heads={H} is not a multiple of num_kv_heads={K}.")
  G = H // K
  # Grouping queries per KV head avoids materialising repeated K/V (GQA without jnp.repeat).
  q_BxSxKxGxD = q_BxSxHxD.reshape(B, S, K, G, D)
  logits_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k_BxTxKxD,
                                preferred_element_type=jnp.float32) * (D ** -0.5)
  if bias_HxSxT is not None:
    logits_BxKxGxSxT = logits_BxKxGxSxT + bias_HxSxT.astype(jnp.float32).reshape(K, G, S, T)
  mask = jnp.ones((1, 1, 1, S, T), dtype=bool)
  if causal:
    if positions_BxS is None:
      mask = mask & (jnp.arange(S)[:, None] >= jnp.arange(T)[None, :])[None, None, None]
    else:
      later_BxSxT = positions_BxS[:, :, None] >= positions_BxS[:, None, :]
      mask = mask & later_BxSxT[:, None, None]
  if segment_ids_BxS is not None:
    seg_k = segment_ids_BxS if segment_ids_BxT is None else segment_ids_BxT
    same_BxSxT = segment_ids_BxS[:, :, None] == seg_k[:, None, :]
    mask = mask & same_BxSxT[:, None, None]
  logits_BxKxGxSxT = jnp.where(mask, logits_BxKxGxSxT, jnp.finfo(jnp.float32).min)
  probs_BxKxGxSxT = jax.nn.softmax(logits_BxKxGxSxT, axis=-1)
  o_BxSxKxGxD = jnp.einsum("bkgst,btkd->bskgd", probs_BxKxGxSxT.astype(v_BxTxKxD.dtype),
                           v_BxTxKxD)
  return o_BxSxKxGxD.reshape(B, S, H, D)
