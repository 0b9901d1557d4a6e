"""nets/linear_recurrence.py and nets/linear_rnn.py: chunkwise = token-by-token (float64, forward
and gradients, resets, initial states), decoding = the parallel forward, packing, causality,
parameter counts, FLOPs against XLA, and a sharded step against one device."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import counting, linear_recurrence, linear_rnn
from tests.nets import assert_causal_by_jacobian
from tests.nets.test_mamba import assert_same_loss_and_grads, sharded_and_reference
from tests.train.test_flops import TOLERANCE, loop_free_flops, unroll_scans

KINDS = ("delta", "scalar", "per_key")  # Gated DeltaNet, Mamba-2 (SSD), GLA


def recurrence_inputs(kind, B=2, S=23, H=3, K=5, V=4, seed=0):
  """float64 (q, k, v, log_decay, beta, initial state, resets): k unit-norm as GDN's, decays in
  (e^-1.5, 1), resets in both rows (one at step 0, two in a row)."""
  rng = np.random.default_rng(seed)
  q, k = rng.standard_normal((2, B, S, H, K))
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((B, S, H, V))
  g = -rng.uniform(0.01, 1.5, (B, S, H, K) if kind == "per_key" else (B, S, H))
  beta = rng.uniform(0.0, 1.0, (B, S, H)) if kind == "delta" else None
  s0 = rng.standard_normal((B, H, K, V))
  reset = np.zeros((B, S), bool)
  reset[0, [0, 9]] = True
  reset[1, [S - 8, S - 7]] = True
  return q, k, v, g, beta, s0, reset


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_and_steps_equal_naive_float64(kind):
  """Chunks that divide S and do not (padding), one whole chunk, and ``step`` token by token."""
  with jax.enable_x64(True):
    q, k, v, g, beta, s0, reset = recurrence_inputs(kind)
    want_o, want_s = jax.jit(linear_recurrence.naive)(q, k, v, g, beta, initial_state=s0,
                                                      reset_BxS=reset)
    assert want_o.dtype == jnp.float64
    for chunk in (1, 4, 8, 64):
      o, s = jax.jit(linear_recurrence.chunked, static_argnames="chunk")(
          q, k, v, g, beta, initial_state=s0, reset_BxS=reset, chunk=chunk)
      np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-10, err_msg=f"chunk {chunk}")
      np.testing.assert_allclose(s, want_s, rtol=1e-10, atol=1e-10, err_msg=f"chunk {chunk}")
    state, outs = s0[:1], []  # row 0 one token at a time, zeroing the state at its resets
    for t in range(q.shape[1]):
      if reset[0, t]:
        state = jnp.zeros_like(state)
      o_t, state = jax.jit(linear_recurrence.step)(q[:1, t], k[:1, t], v[:1, t], g[:1, t],
                                          None if beta is None else beta[:1, t], state)
      outs.append(o_t)
    np.testing.assert_allclose(np.stack(outs, 1), want_o[:1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradients_equal_naive_float64(kind):
  with jax.enable_x64(True):
    q, k, v, g, beta, s0, reset = recurrence_inputs(kind, S=13)
    w = np.random.default_rng(1).standard_normal((2, 13, 3, 4))

    def loss(fn, args):
      o, s = fn(*args[:4], args[4], initial_state=args[5], reset_BxS=reset)
      return jnp.sum(jnp.sin(o) * w) + jnp.sum(s ** 2)

    args = (q, k, v, g, beta, s0)
    want = jax.jit(jax.grad(functools.partial(loss, linear_recurrence.naive)))(args)
    got = jax.jit(jax.grad(functools.partial(loss, functools.partial(linear_recurrence.chunked,
                                                                     chunk=4))))(args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_keys_equal_keys_repeated_per_head_float64(kind):
  """q and k with G = 2 heads for v's H = 4 (Mamba-2's B/C groups, GDN's key heads): chunked
  (SSD computes per group) equals naive on q, k repeated to every head, forward and gradients
  (the grouped q, k receive the sum of their heads' gradients)."""
  with jax.enable_x64(True):
    q, k, v, g, beta, s0, reset = recurrence_inputs(kind, S=19, H=4)
    q, k = q[:, :, ::2], k[:, :, ::2]  # [B, S, 2, K]
    w = np.random.default_rng(2).standard_normal(v.shape)

    def loss(fn, repeat, args):
      q, k, v, g, beta, s0 = args
      if repeat:
        q, k = jnp.repeat(q, 2, axis=2), jnp.repeat(k, 2, axis=2)
      o, s = fn(q, k, v, g, beta, initial_state=s0, reset_BxS=reset)
      return jnp.sum(jnp.sin(o) * w) + jnp.sum(s ** 2), (o, s)

    args = (q, k, v, g, beta, s0)
    want = jax.jit(jax.grad(functools.partial(loss, linear_recurrence.naive, True),
                            has_aux=True))(args)
    for chunk in (4, 8):
      got = jax.jit(jax.grad(functools.partial(loss, functools.partial(
          linear_recurrence.chunked, chunk=chunk), False), has_aux=True))(args)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10, err_msg=f"chunk {chunk}")


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 33, 48, 64, 128])
def test_unit_lower_inverse_equals_numpy_float64(n):
  """The delta rule's chunk solve: (I + m)⁻¹ by matmuls, through halves of equal and unequal size
  (17 → 8 + 9, 33 → 16 + 17) down to the doubling at 16."""
  with jax.enable_x64(True):
    m = np.tril(np.random.default_rng(n).uniform(-1, 1, (3, 2, n, n)), -1)
    got = jax.jit(linear_recurrence._unit_lower_inverse)(m)
    want = np.linalg.inv(np.eye(n) + m)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # Its closed-form gradient equals autodiff through the matmuls, on the strict lower triangle.
    w = np.random.default_rng(n + 1).standard_normal(m.shape)
    strict = np.tril(np.ones((n, n), bool), -1)
    loss = lambda fn: lambda m: jnp.sum(jnp.sin(fn(jnp.where(strict, m, 0))) * w)
    got = jax.jit(jax.grad(loss(linear_recurrence._unit_lower_inverse)))(m)
    want = jax.jit(jax.grad(loss(linear_recurrence._inverse)))(m)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_long_chunks_compile_with_the_users_xla_flags():
  """Chunks of 128 and 256 at XLA:CPU's default optimisation (the suite compiles with -O0): the
  inverse's recursion once stacked its halves into new leading axes, and a rank-8 matmul aborted
  the process in XLA:CPU's YNNPACK emitter."""
  code = """
import jax, jax.numpy as jnp, numpy as np
from nets import linear_recurrence
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((2, 256, 2, 8)), jnp.float32)
k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
g = jnp.full((2, 256, 2), -0.05, jnp.float32)
beta = jnp.full((2, 256, 2), 0.5, jnp.float32)
for chunk in (128, 256):
  loss = lambda q, k: jnp.sum(linear_recurrence.chunked(q, k, q, g, beta, chunk=chunk)[0] ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
  assert all(bool(jnp.isfinite(x).all()) for x in grads)
print("ok")
"""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, cwd=pathlib.Path(__file__).parents[2])
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bad_shapes_raise_a_sentence():
  q = jnp.zeros((1, 4, 2, 3))
  with pytest.raises(ValueError, match="scalar decay per head"):
    linear_recurrence.chunked(q, q, q, jnp.zeros((1, 4, 2, 3)), jnp.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match=r"log_decay \(1, 4, 3\) must be"):
    linear_recurrence.chunked(q, q, q, jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match="key heads G dividing the value heads H"):
    linear_recurrence.chunked(q, q, jnp.zeros((1, 4, 3, 3)), jnp.zeros((1, 4, 3)))


# --- the family --------------------------------------------------------------------------------

BASE = dict(vocab_size=48, num_layers=4, d_model=32, linear_heads=4, linear_k_dim=8,
            linear_v_dim=8, chunk=4, max_len=32)
MODELS = {
    "gated_deltanet": dict(mixer="gated_deltanet", linear_k_heads=2, mlp_dim=48),
    "gla": dict(mixer="gla", conv_size=0, gate_rank=4, mlp_dim=48),
    "gla_conv": dict(mixer="gla", conv_size=3, gate_rank=4, mlp_dim=48),
    "mamba2": dict(mixer="mamba2", linear_k_heads=2, residual_in_fp32=True, norm_eps=1e-5),
    "hybrid": dict(mixer="gated_deltanet", linear_k_heads=2, mlp_dim=48, attention_every=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rotary_fraction=0.5, qk_norm=True,
                   attn_output_gate=True),
    "mamba2_hybrid": dict(mixer="mamba2", attention_every=4, num_heads=2, num_kv_heads=1),
}


def make_cfg(name, **kw):
  return linear_rnn.Config.from_config(ml_collections.ConfigDict({**BASE, **MODELS[name], **kw}))


@functools.cache
def built(name):
  cfg = make_cfg(name)
  model = linear_rnn.Model(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, cfg.vocab_size)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])()
  # Random norm scales and biases too, so a misplaced (1 + w) or a dropped bias shows.
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(2)
  params = jax.tree.unflatten(tree, [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
                                     for x in leaves])
  return cfg, model, params, tokens


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_prefill_and_packing_equal_the_parallel_forward(name):
  """Prefill 5 tokens, decode 6 one at a time: the logits of the one parallel call. Two
  documents packed in a row: each as if alone. Parameter count: the closed form."""
  cfg, model, params, tokens = built(name)
  apply = jax.jit(model.apply)
  want = apply({"params": params}, tokens)
  cache = linear_rnn.init_cache(cfg, 2, 16)
  logits, cache = apply({"params": params}, tokens[:, :5], None, None, cache)
  got = [logits]
  for t in range(5, 11):
    logits, cache = apply({"params": params}, tokens[:, t:t + 1], jnp.full((2, 1), t), None,
                          cache)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), want, rtol=2e-5, atol=2e-5)
  segments = jnp.asarray([[0] * 6 + [1] * 5] * 2)
  positions = jnp.asarray([list(range(6)) + list(range(5))] * 2)
  packed = apply({"params": params}, tokens, positions, segments)
  np.testing.assert_allclose(packed[:, :6], want[:, :6], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(packed[:, 6:], apply({"params": params}, tokens[:, 6:]),
                             rtol=2e-5, atol=2e-5)
  assert sum(x.size for x in jax.tree.leaves(params)) == linear_rnn.num_params(cfg)


@pytest.mark.parametrize("name", ["gated_deltanet", "gla_conv", "mamba2_hybrid"])
def test_causal_by_jacobian(name):
  cfg, model, params, tokens = built(name)
  assert_causal_by_jacobian(model, params, tokens[:1], cfg.d_model)


@pytest.mark.parametrize("mixer", ["gla", "mamba2"])
def test_forward_flops_match_xla(mixer, monkeypatch):
  """The other two mixers at widths where matmuls dominate (the contract test runs the Gated
  DeltaNet hybrid), three chunks of 32 tokens."""
  unroll_scans(monkeypatch)
  # Mamba-2 has no MLP, so its elementwise work (gates, norms, D skip) weighs more: wider.
  cfg = linear_rnn.Config(vocab_size=512, num_layers=2, d_model=512 if mixer == "mamba2" else 256,
                          mixer=mixer, linear_heads=4, linear_k_heads=1 if mixer == "mamba2" else 0,
                          linear_k_dim=64, linear_v_dim=64, chunk=32,
                          conv_size=4 if mixer == "mamba2" else 0,
                          mlp_dim=512 if mixer == "gla" else 0)
  model = linear_rnn.Model(cfg)
  tokens = jnp.zeros((2, 96), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
  got = loop_free_flops(jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(
      params, tokens).compile())
  counted = linear_rnn.flops(cfg, counting.Step(2, 96, executed=True)) * 2 * 96
  assert 1.0 <= got / counted < 1.0 + TOLERANCE, f"XLA {got:.4g} vs formula {counted:.4g}"


@pytest.mark.parametrize("name", ["hybrid", "mamba2"])
def test_sharded_step_equals_one_device(name):
  """data=2 x fsdp=2 x tensor=2 (tensor splits the heads of every mixer), full remat, against
  one device without remat: loss and every gradient."""
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 13), 0, 48)
  run = sharded_and_reference(linear_rnn.Model(make_cfg(name, remat="full")),
                              linear_rnn.Model(make_cfg(name)), tokens)
  assert_same_loss_and_grads(run)


def test_config_errors_are_sentences():
  for bad, match in ((dict(mixer="rwkv"), "model.mixer='rwkv' is not one of"),
                     (dict(linear_k_heads=3), "must be a multiple of model.linear_k_heads=3"),
                     (dict(attention_every=3), "not a multiple of model.attention_every=3"),
                     (dict(attention_every=2), "num_heads=0 must be a positive multiple"),
                     (dict(conv_size=1), "conv_size=1"),
                     (dict(unknown=1), r"unknown field\(s\) \['unknown'\]")):
    with pytest.raises(ValueError, match=match):
      make_cfg("gated_deltanet", **bad)
