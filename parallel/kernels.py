"""Local (one-device) attention kernels and the block primitives the parallel strategies share.

Every kernel has the signature of ``attention(q, k, v, *, causal, mask)`` below, where a ``Mask``
carries the positions and segment ids that decide which (query, key) pairs may attend:
  * causal: key position <= query position (positions, not indices, so permuted layouts such as
    ring attention's zigzag order stay correct);
  * segments: query and key in the same segment (packed documents; padding is its own segment).

Block primitives (flash-attention style, float32 statistics):
  block_forward  -> (o, lse) for one (query block, key block) pair, o normalised within the block;
  merge          -> combines two partial results over disjoint key sets;
  block_backward -> (dq, dk, dv) for one pair given the final lse and delta = sum(do * o).
``blockwise_attention`` runs them over query/key blocks with a custom VJP, so memory is
O(N * block) instead of O(N^2) in both passes; ring attention reuses them across devices.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# log-sum-exp of a row with no visible key. Finite (not -inf) so that merges and their gradients
# never meet inf - inf: exp(EMPTY - finite) underflows to exactly 0.
EMPTY_LSE = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mask:
  """Who may attend to whom: positions [B, S] / [B, T] and optional segment ids."""
  q_positions: jax.Array
  kv_positions: jax.Array
  q_segments: Any = None
  kv_segments: Any = None

  def block(self, causal: bool, q_slice=slice(None), kv_slice=slice(None)):
    """Boolean [B, S', T'] for the given query/key ranges."""
    qp, kp = self.q_positions[:, q_slice], self.kv_positions[:, kv_slice]
    allowed = jnp.ones((qp.shape[0], qp.shape[1], kp.shape[1]), bool)
    if causal:
      allowed &= qp[:, :, None] >= kp[:, None, :]
    if self.q_segments is not None:
      allowed &= (self.q_segments[:, q_slice][:, :, None] ==
                  self.kv_segments[:, kv_slice][:, None, :])
    return allowed


def make_mask(S: int, T: int | None = None, *, batch: int, q_positions=None, kv_positions=None,
              q_segments=None, kv_segments=None) -> Mask:
  """A Mask with default positions arange(S) / arange(T) and kv segments defaulting to q's."""
  T = S if T is None else T
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (batch, S))
  if kv_positions is None:
    kv_positions = q_positions if T == S else jnp.broadcast_to(
        jnp.arange(T, dtype=jnp.int32), (batch, T))
  if q_segments is not None and kv_segments is None:
    if T != S:
      raise ValueError("make_mask needs kv_segments when the key length differs from the query's.")
    kv_segments = q_segments
  return Mask(q_positions, kv_positions, q_segments, kv_segments)


def _group(q_BxSxHxD, K):
  B, S, H, D = q_BxSxHxD.shape
  return q_BxSxHxD.reshape(B, S, K, H // K, D)


def block_forward(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, allowed_BxSxT):
  """Attention of a query block over one key block: (o normalised, lse [B, S, H]) in float32."""
  B, S, H, D = q_BxSxHxD.shape
  K = k_BxTxKxD.shape[2]
  q = _group(q_BxSxHxD, K)
  s_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q, k_BxTxKxD,
                           preferred_element_type=jnp.float32) * (D ** -0.5)
  allowed = allowed_BxSxT[:, None, None]
  s_BxKxGxSxT = jnp.where(allowed, s_BxKxGxSxT, -jnp.inf)
  m = jnp.max(s_BxKxGxSxT, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s_BxKxGxSxT - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o_BxKxGxSxD = jnp.einsum("bkgst,btkd->bkgsd", p, v_BxTxKxD.astype(jnp.float32))
  o_BxKxGxSxD = o_BxKxGxSxD / jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)[..., 0]
  o_BxSxHxD = jnp.transpose(o_BxKxGxSxD, (0, 3, 1, 2, 4)).reshape(B, S, H, D)
  lse_BxSxH = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, S, H)
  return o_BxSxHxD, lse_BxSxH


def merge(o1, lse1, o2, lse2):
  """Combines two partial results whose key sets are disjoint (all float32)."""
  lse = jnp.logaddexp(lse1, lse2)
  w1 = jnp.exp(lse1 - lse)[..., None]
  w2 = jnp.exp(lse2 - lse)[..., None]
  return o1 * w1 + o2 * w2, lse


def block_backward(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, allowed_BxSxT, do_BxSxHxD, lse_BxSxH,
                   delta_BxSxH):
  """Gradient contributions of one (query block, key block) pair, recomputing probabilities.

  ``lse`` is the final log-sum-exp of each query row over ALL keys and ``delta = sum(do * o)``
  with the final output, so p = exp(s - lse) are the true probabilities restricted to this block.
  """
  B, S, H, D = q_BxSxHxD.shape
  K = k_BxTxKxD.shape[2]
  G = H // K
  scale = D ** -0.5
  q = _group(q_BxSxHxD, K).astype(jnp.float32)
  k, v = k_BxTxKxD.astype(jnp.float32), v_BxTxKxD.astype(jnp.float32)
  do = _group(do_BxSxHxD, K).astype(jnp.float32)
  lse = jnp.transpose(lse_BxSxH.reshape(B, S, K, G), (0, 2, 3, 1))[..., None]
  delta = jnp.transpose(delta_BxSxH.reshape(B, S, K, G), (0, 2, 3, 1))[..., None]
  s = jnp.einsum("bskgd,btkd->bkgst", q, k) * scale
  p = jnp.where(allowed_BxSxT[:, None, None], jnp.exp(s - lse), 0.0)
  dv = jnp.einsum("bkgst,bskgd->btkd", p, do)
  dp = jnp.einsum("bskgd,btkd->bkgst", do, v)
  ds = p * (dp - delta) * scale
  dq = jnp.einsum("bkgst,btkd->bskgd", ds, k).reshape(B, S, H, D)
  dk = jnp.einsum("bkgst,bskgd->btkd", ds, q)
  return dq, dk, dv


def delta_of(o_BxSxHxD, do_BxSxHxD):
  return jnp.sum(o_BxSxHxD.astype(jnp.float32) * do_BxSxHxD.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- kernels


def dense_attention(q, k, v, *, causal: bool, mask: Mask):
  """The dense reference: one block covering everything (O(N^2) memory)."""
  o, _ = block_forward(q, k, v, mask.block(causal))
  return o.astype(q.dtype)


def _blocks(n: int, size: int) -> int:
  size = min(size, n)
  if n % size:
    raise ValueError(f"sequence length {n} is not divisible by the attention block size {size}; "
                     "set config.parallel.block_size to a divisor.")
  return size


def blockwise_attention(q, k, v, *, causal: bool, mask: Mask, block_q: int = 512,
                        block_kv: int = 512):
  """Online-softmax attention over blocks; memory O(N * block) in forward and backward."""
  bq = _blocks(q.shape[1], block_q)
  bk = _blocks(k.shape[1], block_kv)
  # Tie the mask to q: otherwise, under reverse-mode autodiff of a layer scan, the masks (which
  # depend only on loop-invariant positions) are hoisted out of the loop and every block pair's
  # mask is materialised at once, O(N^2) memory (bench/seq_parallel.py measured it).
  q, mask = jax.lax.optimization_barrier((q, mask))
  return _blockwise(q, k, v, mask, causal, bq, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, mask, causal, bq, bk):
  o, _ = _blockwise_fwd_stats(q, k, v, mask, causal, bq, bk)
  return o.astype(q.dtype)


def _split(x, size, axis=1):
  """[B, N, ...] -> [N // size, B, size, ...] for scanning over blocks."""
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (n // size, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unsplit(x):
  """[N // size, B, size, ...] -> [B, N, ...] (inverse of _split on axis 1)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _mask_blocks(mask: Mask, bq, bk):
  seg = mask.q_segments is not None
  return (_split(mask.q_positions, bq), _split(mask.kv_positions, bk),
          _split(mask.q_segments, bq) if seg else None,
          _split(mask.kv_segments, bk) if seg else None)


def _allowed(causal, qp, kp, qs, ks):
  return Mask(qp, kp, qs, ks).block(causal)


def _blockwise_fwd_stats(q, k, v, mask, causal, bq, bk):
  B, S, H, D = q.shape
  qp, kp, qs, ks = _mask_blocks(mask, bq, bk)
  k_blocks, v_blocks = _split(k, bk), _split(v, bk)

  def per_q_block(args):
    q_blk, qp_blk, qs_blk = args

    def over_kv(carry, kv):
      o, lse = carry
      k_blk, v_blk, kp_blk, ks_blk = kv
      o2, lse2 = block_forward(q_blk, k_blk, v_blk, _allowed(causal, qp_blk, kp_blk, qs_blk,
                                                             ks_blk))
      return merge(o, lse, o2, lse2), None

    init = (jnp.zeros((B, bq, H, D), jnp.float32), jnp.full((B, bq, H), EMPTY_LSE, jnp.float32))
    (o, lse), _ = jax.lax.scan(over_kv, init, (k_blocks, v_blocks, kp, ks))
    return o, lse

  o, lse = jax.lax.map(per_q_block, (_split(q, bq), qp, qs))
  return _unsplit(o), _unsplit(lse)


def _blockwise_fwd(q, k, v, mask, causal, bq, bk):
  o, lse = _blockwise_fwd_stats(q, k, v, mask, causal, bq, bk)
  return o.astype(q.dtype), (q, k, v, mask, o, lse)


def _blockwise_bwd(causal, bq, bk, res, do):
  q, k, v, mask, o, lse = res
  delta = delta_of(o, do)
  qp, kp, qs, ks = _mask_blocks(mask, bq, bk)
  k_blocks, v_blocks = _split(k, bk), _split(v, bk)

  def over_q(carry, xs):
    dk_acc, dv_acc = carry
    q_blk, do_blk, lse_blk, delta_blk, qp_blk, qs_blk = xs

    def over_kv(dq, kv):
      k_blk, v_blk, kp_blk, ks_blk = kv
      dq_c, dk_c, dv_c = block_backward(q_blk, k_blk, v_blk,
                                        _allowed(causal, qp_blk, kp_blk, qs_blk, ks_blk),
                                        do_blk, lse_blk, delta_blk)
      return dq + dq_c, (dk_c, dv_c)

    dq, (dk_c, dv_c) = jax.lax.scan(over_kv, jnp.zeros(q_blk.shape, jnp.float32),
                                    (k_blocks, v_blocks, kp, ks))
    return (dk_acc + dk_c, dv_acc + dv_c), dq

  zeros_k = jnp.zeros(k_blocks.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(over_q, (zeros_k, zeros_k),
                              (_split(q, bq), _split(do, bq), _split(lse, bq), _split(delta, bq),
                               qp, qs))
  mask_ct = jax.tree.map(_int_cotangent, mask)  # None fields stay None (empty subtrees)
  return (_unsplit(dq).astype(q.dtype), _unsplit(dk).astype(k.dtype),
          _unsplit(dv).astype(v.dtype), mask_ct)


def _int_cotangent(x):
  return np.zeros(x.shape, jax.dtypes.float0)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def cudnn_attention(q, k, v, *, causal: bool, mask: Mask, block_q: int = 512,
                    block_kv: int = 512):
  """cuDNN flash attention through jax.nn.dot_product_attention (NVIDIA GPUs).

  cuDNN takes bf16/fp16 and masks causally by index, without segment ids. Inputs it cannot take
  (float32, segment masks) go to the blockwise kernel instead; the decision is static, at trace
  time. Positions must be 0..N-1 in order, which holds wherever a local kernel is used (only
  ring/USP reorder the sequence, and they use their own block primitives).
  """
  if q.dtype not in (jnp.bfloat16, jnp.float16) or mask.q_segments is not None:
    return blockwise_attention(q, k, v, causal=causal, mask=mask, block_q=block_q,
                               block_kv=block_kv)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


KERNELS = {"dense": dense_attention, "blockwise": blockwise_attention, "cudnn": cudnn_attention}


def pick_kernel(name: str) -> str:
  """Resolves "auto": cuDNN on NVIDIA GPUs, blockwise elsewhere."""
  if name != "auto":
    if name not in KERNELS:
      raise ValueError(f"config.parallel.attention={name!r} is not one of "
                       f"{sorted(KERNELS) + ['auto']}.")
    return name
  return "cudnn" if jax.default_backend() == "gpu" else "blockwise"
