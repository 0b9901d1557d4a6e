"""An additive logits bias (Swin's relative positions) through every local kernel: forward and
gradients (q, k, v and the bias) against a float64 reference of softmax(qkᵀ/√D + bias + mask)·v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import attention as nets_attention
from parallel import kernels

B, S, H, K, D = 3, 32, 4, 2, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, S, H, D))
  k, v = rng.standard_normal((2, B, S, K, D))
  bias = rng.standard_normal((H, S, S))
  segments = np.repeat(np.arange(4)[None], B, 0).repeat(S // 4, 1)  # four windows' regions
  segments[1] = 0  # one row without a mask
  return q, k, v, bias, segments.astype(np.int32)


def _reference(q, k, v, bias, segments):
  """float64 numpy: every (row, head) one softmax over its allowed keys."""
  G = H // K
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      logits = q[b, :, h] @ k[b, :, h // G].T / np.sqrt(D) + bias[h]
      logits = np.where(segments[b][:, None] == segments[b][None], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // G]
  return out


def _loss(fn):
  def loss(q, k, v, bias, segments):
    o = fn(q, k, v, bias, segments)
    return jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape)))
  return jax.grad(loss, argnums=(0, 1, 2, 3))


def _kernel(name, **kw):
  def fn(q, k, v, bias, segments):
    mask = kernels.make_mask(S, batch=B, q_segments=jnp.asarray(segments))
    return kernels.KERNELS[name](q, k, v, causal=False, mask=mask, bias=bias, **kw)
  return fn


CASES = {
    "dense": _kernel("dense"),
    "blockwise (4 x 4 blocks)": _kernel("blockwise", block_q=8, block_kv=8),
    "blockwise (one block)": _kernel("blockwise"),
    "cudnn (its XLA path)": _kernel("cudnn", implementation="xla"),
    "nets reference": lambda q, k, v, bias, seg: nets_attention.dot_product_attention(
        q, k, v, causal=False, segment_ids_BxS=jnp.asarray(seg), bias_HxSxT=bias),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bias_forward_and_gradients_match_float64(name):
  q, k, v, bias, seg = _inputs()
  f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, bias)]
  fn = CASES[name]
  np.testing.assert_allclose(fn(*f32, seg), _reference(q, k, v, bias, seg), atol=2e-5)
  with jax.enable_x64():
    f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, bias)]
    want = _loss(CASES["dense"])(*f64, seg)  # autodiff of the dense kernel (no custom VJP)
  got = _loss(fn)(*f32, seg)
  for g, w, what in zip(got, want, ("dq", "dk", "dv", "dbias")):
    np.testing.assert_allclose(g, w, atol=5e-5, err_msg=f"{name}: {what}")
  # The bias matters: without it the output moves far beyond the tolerance (negative control).
  zero = jnp.zeros_like(f32[3])
  assert np.max(np.abs(fn(*f32[:3], zero, seg) - fn(*f32, seg))) > 0.1


def test_cudnn_bf16_call_passes_the_bias():
  """In bf16 the cuDNN kernel calls jax.nn.dot_product_attention with the bias (its XLA path here,
  the same call cuDNN gets on an NVIDIA GPU); it agrees with float32 to bf16 precision."""
  q, k, v, bias, seg = _inputs(1)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  got = _kernel("cudnn", implementation="xla")(*bf, jnp.asarray(bias, jnp.float32), seg)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), _reference(q, k, v, bias, seg),
                             atol=0.05)
