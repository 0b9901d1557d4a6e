"""Local (one-device) attention kernels and the block primitives the parallel strategies share.

Every kernel has the signature of ``attention(q, k, v, *, causal, mask, bias=None)`` below, where a
``Mask`` carries the positions and segment ids that decide which (query, key) pairs may attend
(and ``bias`` [H, S, T], shared by the batch rows, is added to the scaled logits: Swin's relative
position bias, its windows being the batch rows):
  * causal: key position <= query position (positions, not indices, so permuted layouts such as
    ring attention's zigzag order stay correct);
  * segments: query and key in the same segment (packed documents; padding is its own segment).

Block primitives (flash-attention style, float32 statistics):
  block_forward  -> (o, lse) for one (query block, key block) pair, o normalised within the block;
  merge          -> combines two partial results over disjoint key sets;
  block_backward -> (dq, dk, dv) for one pair given the final lse and delta = sum(do * o).
``blockwise_attention`` runs them over query/key blocks with a custom VJP, so memory is
O(N * block) instead of O(N^2) in both passes; ring attention reuses them across devices.

Accelerator kernels: ``cudnn_attention`` (cuDNN flash attention, NVIDIA GPUs) and
``splash_attention`` (Pallas Splash attention, TPUs). Each falls back to ``blockwise_attention``
for inputs it cannot take; the choice is static, made at trace time from shapes and dtypes.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

# Pallas's TPU kernels import on any platform, but a broken or absent build must not stop CPU runs.
try:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _splash_mask
  SPLASH_IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001  (any failure means "no splash", reported at validation)
  _splash = _splash_mask = None
  SPLASH_IMPORT_ERROR = f"{type(e).__name__}: {e}"

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


def _grouped_bias(bias_HxSxT, K):
  """An additive logits bias [H, S, T] (shared by the batch) as [1, K, G, S, T]."""
  H, S, T = bias_HxSxT.shape
  return bias_HxSxT.astype(jnp.float32).reshape(1, K, H // K, S, T)


def block_forward(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, allowed_BxSxT, bias_HxSxT=None):
  """Attention of a query block over one key block: (o normalised, lse [B, S, H]) in float32.

  ``bias_HxSxT``, when given, is added to the scaled logits of every batch row (Swin's relative
  position bias)."""
  B, S, H, D = q_BxSxHxD.shape
  K = k_BxTxKxD.shape[2]
  q = _group(q_BxSxHxD, K)
  s_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q, k_BxTxKxD,
                           preferred_element_type=jnp.float32) * (D ** -0.5)
  if bias_HxSxT is not None:
    s_BxKxGxSxT = s_BxKxGxSxT + _grouped_bias(bias_HxSxT, K)
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
                   delta_BxSxH, bias_HxSxT=None):
  """Gradient contributions of one (query block, key block) pair, recomputing probabilities.

  ``lse`` is the final log-sum-exp of each query row over ALL keys and ``delta = sum(do * o)``
  with the final output, so p = exp(s - lse) are the true probabilities restricted to this block.
  With a ``bias_HxSxT`` the result is (dq, dk, dv, dbias [H, S, T]), dbias summed over the batch.
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
  if bias_HxSxT is not None:
    s = s + _grouped_bias(bias_HxSxT, K)
  p = jnp.where(allowed_BxSxT[:, None, None], jnp.exp(s - lse), 0.0)
  dv = jnp.einsum("bkgst,bskgd->btkd", p, do)
  dp = jnp.einsum("bskgd,btkd->bkgst", do, v)
  dlogits = p * (dp - delta)  # d(loss)/d(scaled logits + bias)
  ds = dlogits * scale
  dq = jnp.einsum("bkgst,btkd->bskgd", ds, k).reshape(B, S, H, D)
  dk = jnp.einsum("bkgst,bskgd->btkd", ds, q)
  if bias_HxSxT is None:
    return dq, dk, dv
  return dq, dk, dv, jnp.sum(dlogits, axis=0).reshape(bias_HxSxT.shape)


def delta_of(o_BxSxHxD, do_BxSxHxD):
  return jnp.sum(o_BxSxHxD.astype(jnp.float32) * do_BxSxHxD.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- kernels


def dense_attention(q, k, v, *, causal: bool, mask: Mask, bias=None):
  """The dense reference: one block covering everything (O(N^2) memory)."""
  o, _ = block_forward(q, k, v, mask.block(causal), bias)
  return o.astype(q.dtype)


def _blocks(n: int, size: int) -> int:
  size = min(size, n)
  if n % size:
    raise ValueError(f"sequence length {n} is not divisible by the attention block size {size}; "
                     "set config.parallel.block_size to a divisor.")
  return size


def blockwise_attention(q, k, v, *, causal: bool, mask: Mask, bias=None, block_q: int = 512,
                        block_kv: int = 512):
  """Online-softmax attention over blocks; memory O(N * block) in forward and backward.

  ``bias`` [H, S, T], when given, is added to every row's scaled logits and gets its gradient
  (summed over the batch) like q, k and v."""
  bq = _blocks(q.shape[1], block_q)
  bk = _blocks(k.shape[1], block_kv)
  # Tie the mask to q: otherwise, under reverse-mode autodiff of a layer scan, the masks (which
  # depend only on loop-invariant positions) are hoisted out of the loop and every block pair's
  # mask is materialised at once, O(N^2) memory (bench/seq_parallel.py measured it).
  q, mask = jax.lax.optimization_barrier((q, mask))
  return _blockwise(q, k, v, mask, bias, causal, bq, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, mask, bias, causal, bq, bk):
  o, _ = _blockwise_fwd_stats(q, k, v, mask, bias, causal, bq, bk)
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


def _bias_rows(bias, bq):
  """[H, S, T] -> [S // bq, H, bq, T] (None stays None: scans carry no leaf for it)."""
  return None if bias is None else _split(bias, bq)


def _bias_cols(bias_q, bk):
  """[H, bq, T] -> [T // bk, H, bq, bk]."""
  return None if bias_q is None else _split(bias_q, bk, axis=2)


def _allowed(causal, qp, kp, qs, ks):
  return Mask(qp, kp, qs, ks).block(causal)


def _blockwise_fwd_stats(q, k, v, mask, bias, causal, bq, bk):
  B, S, H, D = q.shape
  qp, kp, qs, ks = _mask_blocks(mask, bq, bk)
  k_blocks, v_blocks = _split(k, bk), _split(v, bk)

  def per_q_block(args):
    q_blk, qp_blk, qs_blk, bias_q = args

    def over_kv(carry, kv):
      o, lse = carry
      k_blk, v_blk, kp_blk, ks_blk, bias_blk = kv
      o2, lse2 = block_forward(q_blk, k_blk, v_blk, _allowed(causal, qp_blk, kp_blk, qs_blk,
                                                             ks_blk), bias_blk)
      return merge(o, lse, o2, lse2), None

    init = (jnp.zeros((B, bq, H, D), jnp.float32), jnp.full((B, bq, H), EMPTY_LSE, jnp.float32))
    (o, lse), _ = jax.lax.scan(over_kv, init, (k_blocks, v_blocks, kp, ks, _bias_cols(bias_q, bk)))
    return o, lse

  o, lse = jax.lax.map(per_q_block, (_split(q, bq), qp, qs, _bias_rows(bias, bq)))
  return _unsplit(o), _unsplit(lse)


def _blockwise_fwd(q, k, v, mask, bias, causal, bq, bk):
  o, lse = _blockwise_fwd_stats(q, k, v, mask, bias, causal, bq, bk)
  return o.astype(q.dtype), (q, k, v, mask, bias, o, lse)


def _blockwise_bwd(causal, bq, bk, res, do):
  q, k, v, mask, bias, o, lse = res
  delta = delta_of(o, do)
  qp, kp, qs, ks = _mask_blocks(mask, bq, bk)
  k_blocks, v_blocks = _split(k, bk), _split(v, bk)

  def over_q(carry, xs):
    dk_acc, dv_acc = carry
    q_blk, do_blk, lse_blk, delta_blk, qp_blk, qs_blk, bias_q = xs

    def over_kv(dq, kv):
      k_blk, v_blk, kp_blk, ks_blk, bias_blk = kv
      grads = block_backward(q_blk, k_blk, v_blk, _allowed(causal, qp_blk, kp_blk, qs_blk, ks_blk),
                             do_blk, lse_blk, delta_blk, bias_blk)
      return dq + grads[0], grads[1:]  # (dk, dv) or (dk, dv, dbias) of this block pair

    dq, kv_grads = jax.lax.scan(over_kv, jnp.zeros(q_blk.shape, jnp.float32),
                                (k_blocks, v_blocks, kp, ks, _bias_cols(bias_q, bk)))
    dk_c, dv_c = kv_grads[:2]
    return (dk_acc + dk_c, dv_acc + dv_c), (dq, kv_grads[2:])

  zeros_k = jnp.zeros(k_blocks.shape, jnp.float32)
  (dk, dv), (dq, dbias) = jax.lax.scan(
      over_q, (zeros_k, zeros_k), (_split(q, bq), _split(do, bq), _split(lse, bq),
                                   _split(delta, bq), qp, qs, _bias_rows(bias, bq)))
  if bias is None:
    dbias = None
  else:  # [S/bq, T/bk, H, bq, bk] -> [H, S, T]
    dbias = dbias[0].transpose(2, 0, 3, 1, 4).reshape(bias.shape).astype(bias.dtype)
  mask_ct = jax.tree.map(_int_cotangent, mask)  # None fields stay None (empty subtrees)
  return (_unsplit(dq).astype(q.dtype), _unsplit(dk).astype(k.dtype),
          _unsplit(dv).astype(v.dtype), mask_ct, dbias)


def _int_cotangent(x):
  return np.zeros(x.shape, jax.dtypes.float0)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def cudnn_attention(q, k, v, *, causal: bool, mask: Mask, bias=None, block_q: int = 512,
                    block_kv: int = 512, implementation: str = "cudnn"):
  """cuDNN flash attention through jax.nn.dot_product_attention (NVIDIA GPUs).

  cuDNN takes bf16/fp16 and head dims that are multiples of 8 up to 128 (256 from Hopper on), and
  masks causally by index. Segment ids (packed documents, padding) go in as its boolean ``mask``
  argument, [B, 1, S, T] "same segment" (``cudnn_segment_mask``), which cuDNN applies as a bias.
  Everything else goes to the blockwise kernel, a static decision made at trace time: float32,
  other head dims, and causal attention of a query block over a longer key sequence (the
  all-gather strategy's local queries, whose positions start mid-sequence). Positions must
  otherwise be 0..N-1 in order, or restart at each segment start (packed documents): with
  contiguous segments, index order and position order agree within a segment. That holds
  wherever a local kernel runs (only ring/USP reorder the sequence, and they use their own block
  primitives). ``implementation="xla"`` computes the same call with XLA (tests on CPU).
  An additive ``bias`` [H, S, T] (Swin's relative positions) goes in as cuDNN's bias, [1, H, S, T],
  in the compute dtype.
  """
  D, S, T = q.shape[-1], q.shape[1], k.shape[1]
  if (q.dtype not in (jnp.bfloat16, jnp.float16) or (causal and S != T) or D % 8
      or D > _cudnn_max_head_dim()):
    return blockwise_attention(q, k, v, causal=causal, mask=mask, bias=bias, block_q=block_q,
                               block_kv=block_kv)
  bias = None if bias is None else bias[None].astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=cudnn_segment_mask(mask),
                                      is_causal=causal, implementation=implementation)


def cudnn_segment_mask(mask: Mask):
  """bool [B, 1, S, T]: query and key in the same segment; None without segment ids."""
  if mask.q_segments is None:
    return None
  return (mask.q_segments[:, :, None] == mask.kv_segments[:, None, :])[:, None]


def _cudnn_max_head_dim() -> int:
  """cuDNN's flash attention takes head dims up to 256 on Hopper (sm90) and later, else 128."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return 256 if capability is not None and float(capability) >= 9.0 else 128


def splash_attention(q, k, v, *, causal: bool, mask: Mask, bias=None, block_q: int = 512,
                     block_kv: int = 512, interpret: bool = False):
  """Pallas Splash attention (TPUs): flash attention that skips fully masked blocks.

  The kernel runs per example (vmapped over the batch) on [H, S, D] with K <= H KV heads (GQA),
  a static causal or full mask, and segment ids for packed/padded sequences, in bf16 or float32.
  Its blocks are multiples of 128: ``block_q``/``block_kv`` are rounded down to one that divides
  the sequence. It falls back to the blockwise kernel, statically at trace time, where Splash
  cannot express the call: the Pallas TPU kernels failed to import, no multiple of 128 divides
  the query or key length, or causal attention of a query block over a longer key sequence (the
  all-gather strategy's local queries, whose positions start mid-sequence). Splash masks causally
  by index, so positions must otherwise be 0..N-1 in order, as they are wherever a local kernel
  runs (ring/USP's zigzag order never reaches a local kernel). Mosaic kernels cannot be
  partitioned by the compiler: on several devices this runs inside shard_map
  (parallel/attention.py) or pmap. ``interpret=True`` runs the kernel in the Pallas interpreter
  (on CPU, for tests). Splash takes no additive bias: a call with ``bias`` (Swin's windows, whose
  49 or 144 tokens no multiple of 128 divides anyway) runs blockwise.
  """
  B, S, H, D = q.shape
  T = k.shape[1]
  bq, bk = _splash_block(S, block_q), _splash_block(T, block_kv)
  if _splash is None or bq is None or bk is None or (causal and S != T) or bias is not None:
    return blockwise_attention(q, k, v, causal=causal, mask=mask, bias=bias, block_q=block_q,
                               block_kv=block_kv)
  kernel = _splash_kernel(H, S, T, causal, bq, bk, interpret)
  to_heads = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, N, heads, D] -> [B, heads, N, D]
  q_BxHxSxD = to_heads(q * jnp.asarray(D ** -0.5, q.dtype))  # the kernel does not scale
  k_BxKxTxD, v_BxKxTxD = to_heads(k), to_heads(v)
  if mask.q_segments is None:
    o_BxHxSxD = jax.vmap(kernel)(q_BxHxSxD, k_BxKxTxD, v_BxKxTxD)
  else:
    segments = _splash.SegmentIds(mask.q_segments.astype(jnp.int32),
                                  mask.kv_segments.astype(jnp.int32))
    o_BxHxSxD = jax.vmap(kernel)(q_BxHxSxD, k_BxKxTxD, v_BxKxTxD, segments)
  return to_heads(o_BxHxSxD).astype(q.dtype)


def _splash_block(n: int, size: int) -> int | None:
  """The largest multiple of 128 that is <= max(size, 128) and divides n, or None."""
  for block in range(max(size, 128) // 128 * 128, 0, -128):
    if n % block == 0:
      return block
  return None


def _splash_kernel(H, S, T, causal, bq, bk, interpret):
  """A Splash kernel for H query heads over [S, T] (its mask tables are cached by Pallas)."""
  one = _splash_mask.CausalMask((S, T)) if causal else _splash_mask.FullMask((S, T))
  sizes = _splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                             block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                             block_q_dq=bq, block_kv_dq=bk)
  return _splash.make_splash_mha(_splash_mask.MultiHeadMask([one] * H), block_sizes=sizes,
                                 head_shards=1, q_seq_shards=1, interpret=interpret)


KERNELS = {"dense": dense_attention, "blockwise": blockwise_attention, "cudnn": cudnn_attention,
           "splash": splash_attention}
_NEEDS = {"cudnn": ("cuda", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}


def platform() -> str:
  """The default backend as the kernels see it: "cuda", "rocm", "tpu", "cpu", ..."""
  backend = jax.default_backend()
  if backend == "gpu":  # CUDA and ROCm both report "gpu"; cuDNN exists only on CUDA
    version = jax.extend.backend.get_backend().platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def pick_kernel(name: str, platform_name: str | None = None) -> str:
  """Resolves "auto" (cuDNN on NVIDIA GPUs, Splash on TPUs, blockwise elsewhere) and checks that
  an explicitly named kernel can run here; raises one sentence naming the fix."""
  if name != "auto" and name not in KERNELS:
    raise ValueError(f"config.parallel.attention={name!r} is not one of "
                     f"{sorted(KERNELS) + ['auto']}.")
  here = platform_name or platform()
  if name == "auto":
    if here == "cuda":
      return "cudnn"
    return "splash" if here == "tpu" and SPLASH_IMPORT_ERROR is None else "blockwise"
  if name in _NEEDS and here != _NEEDS[name][0]:
    raise ValueError(f"parallel.attention={name!r} needs {_NEEDS[name][1]}; this is {here}. Use "
                     "'auto' (it picks the fastest kernel this platform has) or 'blockwise'.")
  if name == "splash" and SPLASH_IMPORT_ERROR is not None:
    raise ValueError("parallel.attention='splash' needs Pallas's Splash attention kernel, which "
                     f"failed to import ({SPLASH_IMPORT_ERROR}); use 'blockwise'.")
  return name
