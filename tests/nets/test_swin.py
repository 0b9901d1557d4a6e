"""nets/swin.py's window geometry: partition/reverse, the relative position index, the cyclic
shift's regions, and (shifted-)window attention against dense attention over the whole map with
the equivalent mask and bias, computed in float64 by a loop written from the paper's definition."""

import jax
import numpy as np
import pytest

from nets import swin


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


@pytest.mark.parametrize("H,W,M,shift", [(8, 8, 4, 0), (8, 8, 4, 2), (8, 12, 4, 2), (6, 6, 3, 1)])
def test_shifted_window_attention_equals_dense_attention_with_the_mask(H, W, M, shift):
  with jax.enable_x64(True):
    rng = np.random.default_rng(H * W + shift)
    q, k, v = rng.standard_normal((3, 2, H, W, 2, 4))
    table = rng.standard_normal(((2 * M - 1) ** 2, 2))
    got = jax.jit(swin.shifted_window_attention, static_argnums=(4, 5))(q, k, v, table, M, shift)
    np.testing.assert_allclose(got, _reference(q, k, v, table, M, shift), rtol=1e-10, atol=1e-12)


def test_the_shift_mask_matters():
  """Negative control: without the region mask the shifted attention differs from the reference."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 8, 8, 1, 4))
    table = np.zeros((49, 1))
    bias = table[swin.relative_position_index(4)].transpose(2, 0, 1)
    part = lambda x: swin.window_partition(np.roll(x, (-2, -2), (1, 2)).reshape(1, 8, 8, 4),
                                           4).reshape(-1, 16, 1, 4)
    o = swin.window_attention(part(q), part(k), part(v), bias)
    o = np.roll(swin.window_reverse(o.reshape(-1, 16, 4), 4, 8, 8).reshape(1, 8, 8, 1, 4),
                (2, 2), (1, 2))
    assert np.abs(o - _reference(q, k, v, table, 4, 2)).max() > 1e-3


# The paper's Table 1 / the reference implementation's counts at 224 with 1000 classes.
PAPER = {"T": 28_288_354, "S": 49_606_258, "B": 87_768_224}


@pytest.mark.parametrize("variant", list(PAPER))
def test_parameter_counts_match_the_paper(variant):
  cfg = swin.Config(**swin.VARIANTS[variant])
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: swin.Model(cfg).init(jax.random.PRNGKey(0), x), images)
  counted = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert counted == swin.num_params(cfg)
  assert abs(counted / PAPER[variant] - 1) < 0.01, (counted, PAPER[variant])


def test_a_tiny_swin_runs_at_32px():
  cfg = swin.Config(image_size=32, channels=1, num_classes=10, patch_size=2, window_size=4,
                    embed_dim=16, depths=(2, 2), num_heads=(2, 4))
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  params = swin.Model(cfg).init(jax.random.PRNGKey(0), x)
  logits = swin.Model(cfg).apply(params, x)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


def test_logits_equal_transformers_swin():
  """A tiny random SwinForImageClassification (three stages: shifted windows in the first two,
  a map no larger than the window in the last) imported into odyssey gives the same logits."""
  torch = pytest.importorskip("torch", reason="the parity extra (torch, transformers) is absent")
  transformers = pytest.importorskip("transformers", reason="the parity extra is absent")
  hf_cfg = transformers.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16,
                                   depths=[2, 2, 2], num_heads=[2, 4, 4], window_size=4, num_labels=10,
                                   hidden_act="gelu", layer_norm_eps=1e-5)
  torch.manual_seed(0)
  hf = transformers.SwinForImageClassification(hf_cfg).eval()
  with torch.no_grad():  # the bias tables start at zero: make them matter
    for name, w in hf.named_parameters():
      if "relative_position_bias_table" in name:
        w.normal_(0, 0.5)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  cfg = swin.Config(image_size=32, channels=3, num_classes=10, patch_size=2, window_size=4,
                    embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 4))
  assert [cfg.stage(i)[3] for i in range(3)] == [2, 2, 0]  # the 4x4 last map is not shifted
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  got = swin.Model(cfg).apply({"params": swin.params_from_hf(sd, cfg)}, images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_forward_flops_match_xla():
  """At widths where matmuls dominate (the norms, GELU and softmax are left out of the formula),
  with 16 x 16 windows, so the window attention is about a twelfth of each block's FLOPs."""
  from tests.train.test_flops import TOLERANCE, loop_free_flops
  cfg = swin.Config(image_size=64, channels=3, num_classes=100, patch_size=2, window_size=16,
                    embed_dim=512, depths=(2, 2), num_heads=(8, 16))
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
  params = jax.eval_shape(lambda x: swin.Model(cfg).init(jax.random.PRNGKey(0), x)["params"],
                          images)
  got = loop_free_flops(jax.jit(lambda p, x: swin.Model(cfg).apply({"params": p}, x)).lower(
      params, images).compile())
  counted = swin.flops(cfg) * 2
  assert 1.0 <= got / counted < 1.0 + TOLERANCE, f"XLA {got:.4g} vs formula {counted:.4g}"
