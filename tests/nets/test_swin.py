"""nets/swin.py: window geometry (partition/reverse, the relative position index, the cyclic
shift's regions); (shifted-)window attention through the local attention kernels against dense
attention over the whole map with the equivalent mask and bias, computed in float64 by a loop
written from the paper's definition; the paper's parameter counts; configs refused with a
sentence; the FLOPs formula against XLA. (Hugging Face parity: tests/convert/test_swin_hf.py;
the sharded step: tests/parallel/test_family_parity.py.)"""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from nets import attention, swin
from parallel import kernels


def test_partition_and_reverse_are_inverse_and_row_major():
  x = np.arange(2 * 8 * 12 * 3).reshape(2, 8, 12, 3)
  w = np.asarray(swin.window_partition(x, 4))
  assert w.shape == (2 * 2 * 3, 16, 3)
  np.testing.assert_array_equal(w[1], x[0, 0:4, 4:8].reshape(16, 3))  # window (0, 1)
  np.testing.assert_array_equal(w[3], x[0, 4:8, 0:4].reshape(16, 3))  # window (1, 0)
  np.testing.assert_array_equal(swin.window_reverse(w, 4, 8, 12), x)


def test_relative_position_index_matches_the_offsets():
  M = 3
  idx = swin.relative_position_index(M)
  for i in range(M * M):
    for j in range(M * M):
      dy, dx = i // M - j // M, i % M - j % M
      assert idx[i, j] == (dy + M - 1) * (2 * M - 1) + dx + M - 1
  assert idx.min() == 0 and idx.max() == (2 * M - 1) ** 2 - 1


def _reference(q, k, v, table, M, shift):
  """Dense attention over all H·W tokens of each image: token a attends to b iff, on the map
  rolled by −shift, they share a window and (for shift > 0) the region of Swin's image mask."""
  B, H, W, Hh, D = q.shape
  regions = np.zeros((H, W), int)
  if shift:
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
      for ws in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
        regions[hs, ws] = cnt
        cnt += 1
  pos = [(y, x) for y in range(H) for x in range(W)]
  rolled = [((y - shift) % H, (x - shift) % W) for y, x in pos]
  out = np.zeros_like(q)
  for b in range(B):
    qs, ks, vs = (t[b].reshape(H * W, Hh, D) for t in (q, k, v))
    for a, (ya, xa) in enumerate(rolled):
      keys = [c for c, (yc, xc) in enumerate(rolled)
              if (ya // M, xa // M) == (yc // M, xc // M) and regions[ya, xa] == regions[yc, xc]]
      for h in range(Hh):
        logits = np.array([qs[a, h] @ ks[c, h] / np.sqrt(D)
                           + table[(ya % M - rolled[c][0] % M + M - 1) * (2 * M - 1)
                                   + xa % M - rolled[c][1] % M + M - 1, h] for c in keys])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, pos[a][0], pos[a][1], h] = p @ vs[keys, h]
  return out


def _kernel(name, **kw):
  """A parallel/kernels.py kernel behind the attention function signature nets call."""
  def fn(q, k, v, *, causal, positions_BxS=None, segment_ids_BxS=None, bias_HxSxT=None):
    mask = kernels.make_mask(q.shape[1], batch=q.shape[0], q_segments=segment_ids_BxS)
    return kernels.KERNELS[name](q, k, v, causal=causal, mask=mask, bias=bias_HxSxT, **kw)
  return fn


# By window size M: the blockwise kernel cuts each window into M blocks of M tokens.
KERNELS = {"nets reference": lambda M: attention.dot_product_attention,
           "dense": lambda M: _kernel("dense"),
           "blockwise (M blocks per window)": lambda M: _kernel("blockwise", block_q=M, block_kv=M)}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("H,W,M,shift", [(8, 8, 4, 0), (8, 8, 4, 2), (8, 12, 4, 2), (6, 6, 3, 1)])
def test_shifted_window_attention_equals_dense_attention_with_the_mask(H, W, M, shift, kernel):
  """Kernels compute logits in float32: float32 inputs against the float64 loop."""
  rng = np.random.default_rng(H * W + shift)
  q, k, v = rng.standard_normal((3, 2, H, W, 2, 8))
  table = rng.standard_normal(((2 * M - 1) ** 2, 2))
  fn = jax.jit(functools.partial(swin.shifted_window_attention, M=M, shift=shift,
                                 attention_fn=KERNELS[kernel](M)))
  got = fn(*(x.astype(np.float32) for x in (q, k, v, table)))
  np.testing.assert_allclose(got, _reference(q, k, v, table, M, shift), atol=2e-5)


def test_the_shift_mask_and_the_bias_matter():
  """Negative controls: without the region mask, or without the bias, the shifted attention is
  far from the reference."""
  rng = np.random.default_rng(0)
  q, k, v = rng.standard_normal((3, 1, 8, 8, 2, 8)).astype(np.float32)
  table = rng.standard_normal((49, 2)).astype(np.float32)
  want = _reference(q, k, v, table, 4, 2)

  def no_mask(q, k, v, *, segment_ids_BxS, **kw):
    return attention.dot_product_attention(q, k, v, **kw)

  unmasked = swin.shifted_window_attention(q, k, v, table, 4, 2, no_mask)
  assert np.abs(unmasked - want).max() > 1e-2
  unbiased = swin.shifted_window_attention(q, k, v, 0 * table, 4, 2)
  assert np.abs(unbiased - want).max() > 1e-2


def _cfg(**fields):
  return swin.Config.from_config(ml_collections.ConfigDict(dict(name="swin", **fields)))


def swin_cfg(**fields):
  """A tiny Swin (16 px, an 8 x 8 grid of shifted 4 x 4 windows, then one window) for the
  cross-family tests (tests/nets/test_remat_precision.py)."""
  return _cfg(**{**dict(image_size=16, channels=1, num_classes=5, patch_size=2, window_size=4,
                        embed_dim=16, depths=(2, 2), num_heads=(2, 4)), **fields})


# The paper's Table 1 / the reference implementation's counts at 224 with 1000 classes.
PAPER = {"T": 28_288_354, "S": 49_606_258, "B": 87_768_224}


@pytest.mark.parametrize("variant", list(PAPER))
def test_parameter_counts_match_the_paper(variant):
  cfg = _cfg(variant=variant)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: swin.Model(cfg).init(jax.random.PRNGKey(0), x), images)
  counted = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert counted == swin.num_params(cfg)
  assert abs(counted / PAPER[variant] - 1) < 0.01, (counted, PAPER[variant])


def test_digits_variant_shapes_and_stages():
  cfg = _cfg(variant="digits")
  assert [cfg.stage(i) for i in range(2)] == [(48, 8, 4, 2), (96, 4, 4, 0)]
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  params = swin.Model(cfg).init(jax.random.PRNGKey(0), x)
  logits = swin.Model(cfg).apply(params, x)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
  assert sum(p.size for p in jax.tree.leaves(params)) == swin.num_params(cfg)


@pytest.mark.parametrize("fields,match", [
    (dict(depths=(2, 2, 2), num_heads=(2, 4)), "the same number"),
    (dict(image_size=30), "not divisible by model.patch_size"),
    (dict(image_size=24, patch_size=4, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1)),
     "cannot be halved 3 times"),
    (dict(num_heads=(5, 4)), r"not divisible by model.num_heads\[0\]=5"),
    (dict(window_size=3), "not divisible into model.window_size=3 windows"),
    (dict(depths=(2, 0)), "must be positive"),
])
def test_bad_configs_get_one_sentence(fields, match):
  with pytest.raises(ValueError, match=match):
    _cfg(variant="digits", **fields)


def test_forward_flops_match_xla():
  """At widths where matmuls dominate (the norms, GELU and softmax are left out of the formula),
  with 16 x 16 windows, so the window attention is about a twelfth of each block's FLOPs."""
  from tests.train.test_flops import TOLERANCE, loop_free_flops
  cfg = _cfg(image_size=64, channels=3, num_classes=100, patch_size=2, window_size=16,
             embed_dim=512, depths=(2, 2), num_heads=(8, 16))
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
  params = jax.eval_shape(lambda x: swin.Model(cfg).init(jax.random.PRNGKey(0), x)["params"],
                          images)
  got = loop_free_flops(jax.jit(lambda p, x: swin.Model(cfg).apply({"params": p}, x)).lower(
      params, images).compile())
  counted = swin.flops(cfg) * 2
  assert 1.0 <= got / counted < 1.0 + TOLERANCE, f"XLA {got:.4g} vs formula {counted:.4g}"
