"""Tests for nets/msvq.py: VAR's multi-scale residual quantiser against a naive float64 reference,
its decode of ids, the straight-through gradient, codebook usage and the dead-code restart."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import msvq

CFG = msvq.QuantizerConfig(codebook_size=16, embed_dim=3, scales=(1, 2, 3, 5), beta=0.25)


def init(cfg=CFG, batch=2, seed=0):
  f = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, cfg.scales[-1], cfg.scales[-1],
                                                       cfg.embed_dim))
  q = msvq.Quantizer(cfg)
  params = nn.meta.unbox(q.init(jax.random.PRNGKey(seed), f)["params"])
  # a codebook on the features' scale, so the nearest codes differ from scale to scale
  params = {**params, "codebook": jax.random.normal(jax.random.PRNGKey(9), (cfg.codebook_size,
                                                                           cfg.embed_dim))}
  return q, params, f


def naive_conv3x3(x_HxWxC, kernel, bias):
  H, W, _ = x_HxWxC.shape
  pad = np.pad(x_HxWxC, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((H, W, kernel.shape[-1]))
  for i in range(H):
    for j in range(W):
      out[i, j] = np.einsum("abc,abcd->d", pad[i:i + 3, j:j + 3], kernel) + bias
  return out


def naive(cfg, params, f):
  """The quantisation in float64 loops: (ids per scale, f̂)."""
  f = np.asarray(f, np.float64)
  E = np.asarray(params["codebook"], np.float64)
  B, h = f.shape[0], f.shape[1]
  f_hat = np.zeros_like(f)
  ids = []
  for k, s in enumerate(cfg.scales):
    ids_k = np.zeros((B, s, s), np.int64)
    phi = params[f"phi_{k}"]["conv"]
    for b in range(B):
      rest = f[b] - f_hat[b]
      r = np.zeros((s, s, cfg.embed_dim))
      for i in range(s):  # adaptive average pooling, by its definition
        r0, r1 = (i * h) // s, -(-((i + 1) * h) // s)
        for j in range(s):
          c0, c1 = (j * h) // s, -(-((j + 1) * h) // s)
          r[i, j] = rest[r0:r1, c0:c1].mean((0, 1))
      d = ((r[:, :, None, :] - E[None, None]) ** 2).sum(-1)
      ids_k[b] = d.argmin(-1)
      up_m = np.asarray(msvq.cubic_matrix(h, s), np.float64)
      z_up = np.einsum("ih,hwc,jw->ijc", up_m, E[ids_k[b]], up_m)
      conv = naive_conv3x3(z_up, np.asarray(phi["kernel"], np.float64),
                           np.asarray(phi["bias"], np.float64))
      f_hat[b] += (1 - cfg.quant_resi) * z_up + cfg.quant_resi * conv
    ids.append(ids_k)
  return ids, f_hat


def test_matches_a_naive_float64_reference_and_decodes_its_ids():
  q, params, f = init()
  f_st, ids, loss, counts = q.apply({"params": params}, f)
  ref_ids, ref_hat = naive(CFG, params, f)
  assert [i.shape for i in ids] == [(2, s, s) for s in CFG.scales]
  for got, want in zip(ids, ref_ids):
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_allclose(np.asarray(f_st), ref_hat, atol=2e-5)  # forward value of f̂
  decoded = q.apply({"params": params}, ids, method=msvq.Quantizer.decode_ids)
  np.testing.assert_allclose(np.asarray(decoded), ref_hat, atol=2e-5)
  assert float(jnp.sum(counts)) == 2 * CFG.tokens  # every id of every scale counted once
  # the residual shrinks as scales are added: f̂ explains more of f than the first scale alone
  assert np.mean((ref_hat - np.asarray(f)) ** 2) < np.mean(np.asarray(f) ** 2)
  assert np.isfinite(float(loss)) and float(loss) > 0


def test_resampling_matrices():
  np.testing.assert_allclose(msvq.area_matrix(2, 4), [[.5, .5, 0, 0], [0, 0, .5, .5]])
  a = msvq.area_matrix(3, 8)  # overlapping bins, as adaptive pooling: 0-2, 2-5, 5-7
  np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
  assert [tuple(np.flatnonzero(r)) for r in a] == [(0, 1, 2), (2, 3, 4, 5), (5, 6, 7)]
  np.testing.assert_allclose(msvq.area_matrix(5, 5), np.eye(5))
  np.testing.assert_allclose(msvq.cubic_matrix(5, 5), np.eye(5), atol=1e-6)
  np.testing.assert_allclose(msvq.cubic_matrix(4, 1), np.ones((4, 1)), atol=1e-6)
  for n_out, n_in in ((8, 2), (8, 3), (8, 6), (16, 13), (16, 10), (3, 8)):  # jax's own, in numpy
    want = jax.image.resize(jnp.eye(n_in, dtype=jnp.float32), (n_out, n_in), "cubic")
    np.testing.assert_allclose(msvq.cubic_matrix(n_out, n_in), want, atol=1e-6)


def test_straight_through_gradient_and_the_codebook_loss():
  q, params, f = init()
  w = jax.random.normal(jax.random.PRNGKey(3), f.shape)
  # The decoder's gradient reaches the features unchanged.
  g = jax.grad(lambda f: jnp.sum(q.apply({"params": params}, f)[0] * w))(f)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
  # The VQ loss moves the codebook rows that were chosen, and only those.
  _, _, _, counts = q.apply({"params": params}, f)
  gp = jax.grad(lambda p: q.apply({"params": p}, f)[2])(params)
  rows = np.abs(np.asarray(gp["codebook"])).sum(-1)
  np.testing.assert_array_equal(rows > 0, np.asarray(counts) > 0)
  assert np.abs(np.asarray(gp["phi_0"]["conv"]["kernel"])).sum() > 0
  # ... and its commitment term pulls f toward f̂ with weight beta.
  gf = jax.grad(lambda f: q.apply({"params": params}, f)[2])(f)
  assert np.abs(np.asarray(gf)).sum() > 0


def test_usage_perplexity_and_dead_code_restart():
  np.testing.assert_allclose(float(msvq.perplexity(jnp.ones(8))), 8.0, rtol=1e-6)
  np.testing.assert_allclose(float(msvq.perplexity(jnp.array([0., 5., 0., 0.]))), 1.0)
  codebook = jnp.arange(12.0).reshape(4, 3)
  usage = jnp.array([3.0, 0.0, 0.5, 0.001])
  candidates = 100.0 + jnp.arange(15.0).reshape(5, 3)
  new, dead = msvq.restart_dead_codes(codebook, usage, candidates, jax.random.PRNGKey(0), 0.01)
  np.testing.assert_array_equal(np.asarray(dead), [False, True, False, True])
  np.testing.assert_array_equal(np.asarray(new)[[0, 2]], np.asarray(codebook)[[0, 2]])
  cand = {tuple(r) for r in np.asarray(candidates).tolist()}
  assert all(tuple(r) in cand for r in np.asarray(new)[[1, 3]].tolist())


@pytest.mark.parametrize("field, value, message", [
    ("scales", (1, 3, 2), r"must be positive token-map sides in increasing order"),
    ("codebook_size", 0, r"model.codebook_size=0 must be a positive integer"),
    ("beta", -1.0, r"model.beta=-1.0 must be a finite number >= 0"),
    ("quant_resi", 2.0, r"model.quant_resi=2.0 must be in \[0, 1\]"),
])
def test_config_errors(field, value, message):
  import dataclasses
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **{field: value}).validate()
  q, params, _ = init()
  with pytest.raises(ValueError, match=r"features are 4x4x3 but the quantiser expects 5x5x3"):
    q.apply({"params": params}, jnp.zeros((1, 4, 4, 3)))


def test_runs_under_jit():
  """The resize matrices are constants under jit too (a traced jnp.eye once broke this)."""
  q, params, f = init()
  eager = q.apply({"params": params}, f)
  jitted = jax.jit(lambda p, f: q.apply({"params": p}, f))(params, f)
  for a, b in zip(eager[1], jitted[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(eager[0]), atol=1e-6)
