"""Attention kernel selection per platform, the accelerator kernels' fallbacks, and the XLA flags.

What runs on CPU: the Splash kernel in the Pallas interpreter (``interpret=True``) against the
dense kernel, forward and gradients, causal/full, GQA, segment ids; the local Splash plan under a
mesh going through shard_map; cuDNN's static fallbacks (they decide before cuDNN is called). What
needs the accelerator and is not tested here: the compiled Mosaic Splash kernel on a TPU, cuDNN
flash attention on an NVIDIA GPU, and the effect of the GPU/TPU flags.
"""

import functools
import importlib.util
import os
import shlex
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import attention, kernels, xla_flags
from parallel import mesh as parallel_mesh
from tests import FAST_COMPILE_FLAGS, REPO

TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(B, S, H, K, D, *, T=None, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  T = S if T is None else T
  shapes = [(B, S, H, D), (B, T, K, D), (B, T, K, D), (B, S, H, D)]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _uses_pallas(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("platform, kernel", [("cuda", "cudnn"), ("tpu", "splash"),
                                              ("cpu", "blockwise"), ("rocm", "blockwise")])
def test_auto_picks_the_platform_kernel(platform, kernel):
  assert kernels.pick_kernel("auto", platform) == kernel


@pytest.mark.parametrize("backend, version, platform", [
    ("tpu", "TFRT TPU v5p", "tpu"), ("gpu", "PJRT C API\ncuda 12080", "cuda"),
    ("gpu", "PJRT C API\nrocm 60300", "rocm"), ("cpu", "cpu", "cpu")])
def test_platform_is_read_from_the_backend(monkeypatch, backend, version, platform):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax.extend.backend, "get_backend",
                      lambda *a: types.SimpleNamespace(platform_version=version))
  assert kernels.platform() == platform
  assert kernels.pick_kernel("auto") == {"tpu": "splash", "cuda": "cudnn"}.get(platform,
                                                                                "blockwise")


def test_explicit_kernel_the_platform_cannot_run_is_one_sentence():
  cfg = ml_collections.ConfigDict(dict(attention="splash", seq_strategy="auto", usp_ulysses=0,
                                       block_size=128, rules=()))
  sizes = dict(data=8, fsdp=1, tensor=1, seq=1, expert=1)
  plan = functools.partial(attention.make_plan, cfg, sizes, num_heads=4, num_kv_heads=4,
                           seq_len=256)
  with pytest.raises(ValueError, match=r"^parallel.attention='splash' needs a TPU; this is cpu\."):
    plan()
  cfg.attention = "cudnn"
  with pytest.raises(ValueError, match=r"needs an NVIDIA GPU; this is cpu\."):
    plan()
  cfg.attention = "auto"
  assert plan().kernel == "blockwise"
  for name in ("dense", "blockwise"):  # run everywhere
    assert kernels.pick_kernel(name, "tpu") == kernels.pick_kernel(name, "cuda") == name


def test_kernels_module_imports_without_pallas_tpu(monkeypatch):
  """A fresh copy of parallel/kernels.py with the Splash import failing still imports."""
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.tpu.splash_attention", None)
  spec = importlib.util.spec_from_file_location("kernels_without_pallas",
                                                os.path.join(REPO, "parallel", "kernels.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.SPLASH_IMPORT_ERROR and "splash" in module.KERNELS
  assert module.pick_kernel("auto", "tpu") == "blockwise"
  with pytest.raises(ValueError, match="failed to import"):
    module.pick_kernel("splash", "tpu")
  q, k, v, _ = _inputs(1, 128, 2, 1, 8)
  mask = module.make_mask(128, batch=1)  # and falls back to blockwise
  fn = jax.jit(lambda q, k, v: module.splash_attention(q, k, v, causal=True, mask=mask))
  np.testing.assert_allclose(fn(q, k, v), module.dense_attention(q, k, v, causal=True, mask=mask),
                             **TOL)


# ----------------------------------------------------------------------------- Splash kernel


def _check_against_dense(kernel, q, k, v, w, *, causal, mask):
  """Output and gradients (with the random cotangent w) of ``kernel`` vs the dense kernel."""
  def loss(fn):
    def f(q, k, v):
      o = fn(q, k, v, causal=causal, mask=mask)
      return jnp.sum(o * w), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, got), got_grads = loss(kernel)(q, k, v)
  (_, want), want_grads = loss(kernels.dense_attention)(q, k, v)
  np.testing.assert_allclose(got, want, **TOL)
  for name, g, r in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)


SPLASH = functools.partial(kernels.splash_attention, block_q=128, block_kv=128, interpret=True)


@pytest.mark.parametrize("causal, padded", [(True, True), (False, False)])
def test_splash_matches_dense_in_interpret_mode(causal, padded):
  """Two 128-blocks per axis (so causal block skipping runs), GQA 4 query heads on 2 KV heads."""
  B, S = 2, 256
  q, k, v, w = _inputs(B, S, 4, 2, 16)
  seg = None
  if padded:  # the tail of the first sequence is padding, its own segment
    seg = np.ones((B, S), np.int32)
    seg[0, 200:] = 2
  mask = kernels.make_mask(S, batch=B, q_segments=seg)
  assert _uses_pallas(lambda q, k, v: SPLASH(q, k, v, causal=causal, mask=mask), q, k, v)
  _check_against_dense(SPLASH, q, k, v, w, causal=causal, mask=mask)


@pytest.mark.parametrize("S, T, causal", [(96, 96, True), (128, 256, True)])
def test_splash_falls_back_to_blockwise_where_it_cannot_express_the_call(S, T, causal):
  """No multiple of 128 divides 96; causal queries over a longer key sequence (all-gather's local
  queries) have positions Splash's index-based causal mask cannot express."""
  q, k, v, _ = _inputs(1, S, 2, 1, 8, T=T)
  mask = kernels.make_mask(S, T, batch=1, q_positions=jnp.broadcast_to(jnp.arange(T - S, T),
                                                                       (1, S)))
  fn = lambda q, k, v: SPLASH(q, k, v, causal=causal, mask=mask, block_q=32, block_kv=32)
  assert not _uses_pallas(fn, q, k, v)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v),
                             kernels.dense_attention(q, k, v, causal=causal, mask=mask), **TOL)


def test_local_splash_plan_runs_per_device_under_a_mesh(monkeypatch):
  """Mosaic kernels cannot be auto-partitioned, so under a mesh the local Splash kernel runs in
  shard_map (whole sequences per device even on a mesh with seq > 1, as when sampling);
  without a mesh (pmap) it is called directly."""
  monkeypatch.setitem(kernels.KERNELS, "splash",
                      functools.partial(kernels.splash_attention, interpret=True))
  sizes = dict(data=2, fsdp=1, tensor=2, seq=2, expert=1)
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(sizes))
  plan = attention.Plan("local", "splash", 1, 1, 1, 128)
  fn = attention.attention_fn(plan, mesh)
  B, S = 2, 128
  q, k, v, w = _inputs(B, S, 2, 2, 8)
  seg = np.ones((B, S), np.int32)
  seg[1, 100:] = 2
  mask = kernels.make_mask(S, batch=B, q_segments=seg)

  def loss(q, k, v, seg):
    return jnp.sum(fn(q, k, v, causal=True, segment_ids_BxS=seg) * w)

  qkv = NamedSharding(mesh, P(("data", "fsdp"), "seq", "tensor", None))
  args = [jax.device_put(x, qkv) for x in (q, k, v)] + [
      jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), "seq")))]
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(loss)(*args))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
  want = jax.value_and_grad(
      lambda q, k, v: jnp.sum(kernels.dense_attention(q, k, v, causal=True, mask=mask) * w),
      argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for name, g, r in zip("qkv", got[1], want[1]):
    np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)
  assert "shard_map" not in str(jax.make_jaxpr(loss)(q, k, v, seg))  # no mesh: as under pmap


# ----------------------------------------------------------------------------- cuDNN fallbacks


CUDNN_CANNOT = {  # (head dim, key length, dtype, segments) that cuDNN flash attention cannot take
    # (Segment ids no longer fall back: they reach cuDNN as its mask, tests/nets/test_packing.py.)
    "float32": (16, 32, np.float32, False), "float32_segments": (16, 32, np.float32, True),
    "head_dim_12": (12, 32, jnp.bfloat16, False),
    "causal_longer_keys": (16, 64, jnp.bfloat16, False)}


@pytest.mark.parametrize("case", list(CUDNN_CANNOT))
def test_cudnn_falls_back_to_blockwise_before_calling_cudnn(case):
  """On CPU cuDNN itself would fail, so passing proves the fallback decision was made."""
  D, T, dtype, segments = CUDNN_CANNOT[case]
  q, k, v, _ = _inputs(2, 32, 2, 1, D, T=T, dtype=dtype)
  seg = np.ones((2, 32), np.int32) if segments else None
  mask = kernels.make_mask(32, T, batch=2, q_segments=seg, kv_segments=seg,
                           q_positions=jnp.broadcast_to(jnp.arange(T - 32, T), (2, 32)))
  got = kernels.cudnn_attention(q, k, v, causal=True, mask=mask, block_q=16, block_kv=16)
  want = kernels.blockwise_attention(q, k, v, causal=True, mask=mask, block_q=16, block_kv=16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ----------------------------------------------------------------------------- XLA flags


def test_user_set_flags_win_and_the_result_is_well_formed():
  user = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true " \
         "--noxla_gpu_enable_pipelined_all_gather --xla_dump_to='/tmp/a b'"
  merged, added = xla_flags.merge(user, xla_flags.GPU_FLAGS)
  assert merged.startswith(user + " ")  # the user's string is kept verbatim
  tokens = shlex.split(merged)
  assert all(t.startswith("--") for t in tokens)
  names = [xla_flags._name(t) for t in tokens]
  assert len(names) == len(set(names)), "a flag appears twice"
  assert "--xla_gpu_enable_triton_gemm=true" in tokens
  assert not any(f.startswith(("--xla_gpu_enable_triton_gemm", "--xla_gpu_enable_pipelined_all_g"))
                 for f in added)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in added
  assert xla_flags.merge(merged, xla_flags.GPU_FLAGS) == (merged, [])  # idempotent
  assert xla_flags.merge("", ["--xla_a=1"]) == ("--xla_a=1", ["--xla_a=1"])


@pytest.mark.parametrize("env, installed, found", [
    ("cpu", {"jax_cuda12_plugin", "libtpu"}, set()), ("cuda", set(), {"gpu"}),
    ("tpu,cpu", set(), {"tpu"}), (None, {"jax_cuda12_plugin"}, {"gpu"}),
    (None, {"libtpu"}, {"tpu"}), (None, set(), set())])
def test_platform_detection_without_a_backend(monkeypatch, env, installed, found):
  if env is None:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  else:
    monkeypatch.setenv("JAX_PLATFORMS", env)
  monkeypatch.setattr(xla_flags, "_installed", lambda name: name in installed)
  assert xla_flags.platforms() == found


def test_apply_touches_only_the_found_platform_variables(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
  monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
  assert xla_flags.apply(set()) == [] and "LIBTPU_INIT_ARGS" not in os.environ
  added = xla_flags.apply({"gpu", "tpu"})  # no TPU flags are recommended
  assert "LIBTPU_INIT_ARGS" not in os.environ
  assert os.environ["XLA_FLAGS"].startswith("--xla_gpu_enable_latency_hiding_scheduler=false ")
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in added
  monkeypatch.setattr(xla_flags, "TPU_FLAGS", ("--xla_tpu_x=1", "--xla_tpu_y=2"))
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_y=3")
  assert xla_flags.apply({"tpu"}) == ["--xla_tpu_x=1"]
  assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_tpu_y=3 --xla_tpu_x=1"


def _jax_with_flags(flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{FAST_COMPILE_FLAGS} {flags}"}
  code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())"
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)


def test_every_gpu_flag_exists_in_this_jaxlib():
  """XLA aborts on an unknown XLA_FLAGS name even on CPU; known GPU flags are ignored there."""
  ok = _jax_with_flags(" ".join(xla_flags.GPU_FLAGS))
  assert ok.returncode == 0 and ok.stdout.strip() == "4.0", ok.stderr[-2000:]
  bad = _jax_with_flags("--xla_gpu_no_such_flag=true")
  assert bad.returncode != 0 and "Unknown flag in XLA_FLAGS" in bad.stderr


@pytest.mark.parametrize("fast", ["cudnn", "splash"])
def test_position_masked_models_never_get_an_index_causal_kernel(fast, monkeypatch):
  """VAR's block-causal mask lives in its positions: where "auto" would pick cuDNN or Splash
  (which mask by token index) it gets blockwise, and naming either is one sentence."""
  import ml_collections

  from parallel import attention as attention_lib, kernels
  monkeypatch.setattr(kernels, "pick_kernel", lambda name, platform_name=None: fast)
  cfg = lambda name: ml_collections.ConfigDict(dict(
      seq_strategy="auto", attention=name, block_size=512, rules=()))
  sizes = dict(data=1, fsdp=1, tensor=1, seq=1, expert=1)
  plan = attention_lib.make_plan(cfg("auto"), sizes, num_heads=4, num_kv_heads=4, seq_len=130,
                                 position_masks=True)
  assert plan.kernel == "blockwise"
  assert attention_lib.make_plan(cfg("auto"), sizes, num_heads=4, num_kv_heads=4, seq_len=130
                                 ).kernel == fast
  with pytest.raises(ValueError, match="masks causally by token order"):
    attention_lib.make_plan(cfg(fast), sizes, num_heads=4, num_kv_heads=4, seq_len=130,
                            position_masks=True)
