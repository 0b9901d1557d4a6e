"""train/flops.py: each family's FLOP formula against XLA's cost analysis; peak table; MFU.

XLA's cost analysis counts a while loop's body once, whatever its trip count
(``test_cost_analysis_counts_a_loop_body_once``), and nn.scan stacks every family's layers in a
while loop. So the comparisons unroll every nn.scan (``nn.scan`` patched with ``unroll=True``:
the same computation as straight-line code) and assert that no model loop is left. The loops that
remain are XLA:CPU's expansion of scatter-add (embedding gradients) and the threefry PRNG rounds,
which do integer or elementwise work only.

Each step is value_and_grad of the task's loss, jitted on one device with no sharding, so the
cost analysis is of the whole step. The configs are tiny but matmul-dominated (widths >= 256,
head_dim 64), so elementwise work (norms, softmax, activations, the loss), which the formulas
leave out, stays within a few percent. Attention uses the dense kernel, whose executed count is
the full S^2 that ``StepFlops.executed`` counts.
"""

import math
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import diffusion, lm, vit
from nets import llama, ssm
from parallel import mesh as parallel_mesh
from parallel import sharding
from train import flops, models, tasks

# XLA also counts the elementwise work that the formulas leave out, so it may only count more, by
# at most this fraction (measured: 0.4% to 1.4% per family).
TOLERANCE = 0.02
_scan = nn.scan


def _unrolled_scan(*args, **kwargs):
  return _scan(*args, **{**kwargs, "unroll": True})


_lax_scan = jax.lax.scan


def unroll_scans(monkeypatch):
  """Every nn.scan and lax.scan unrolled (the linear recurrences carry states between chunks
  in a lax.scan)."""
  monkeypatch.setattr(nn, "scan", _unrolled_scan)
  monkeypatch.setattr(jax.lax, "scan",
                      lambda *args, **kwargs: _lax_scan(*args, **{**kwargs, "unroll": True}))


def _lm(**model):
  c = lm.get_config("size=test")
  c.model.update(num_layers=2, d_model=512, num_heads=8, num_kv_heads=4, mlp_dim=1536,
                 vocab_size=512)
  c.model.update(**model)
  c.train.update(seq_len=256, batch_size=4)
  return c


def _byte_model(**model):
  c = _lm()
  c.model = ml_collections.ConfigDict(dict(vocab_size=512, **model))
  return c


def _vit():
  c = vit.get_config("variant=digits")
  c.model.update(width=512, depth=2, mlp_dim=2048, num_heads=8, image_size=32, patch_size=4,
                 channels=3)
  c.train.batch_size = 4
  return c


def _dit(model="dit", **moe):
  c = diffusion.get_config(f"model={model},variant=digits")
  if model == "dit":
    c.model.update(hidden_size=512, depth=2, num_heads=8, input_size=16, patch_size=2,
                   in_channels=4)
    c.model.moe.update(**moe)
  elif model == "udit":
    c.model.update(hidden_size=256, num_heads=4, depths=(1, 1, 1), input_size=16, in_channels=4)
  else:  # uvit
    c.model.update(hidden_size=256, depth=3, num_heads=4, input_size=16, patch_size=2,
                   in_channels=4)
  c.train.batch_size = 4
  return c


# Capacity factor 1.0 with T = 4 x 256 tokens, top-2 of 4 experts: C = T·k/X = 512 slots exactly,
# so the experts execute exactly the active (top_k) FLOPs.
CONFIGS = {
    "llama": lambda: _lm(),
    "llama_moe": lambda: _lm(moe=dict(num_experts=4, top_k=2, expert_dim=768,
                                      capacity_factor=1.0)),
    "megabyte": lambda: _byte_model(name="megabyte", patch_sizes=(4,), d_model=(256, 256),
                                    num_layers=(2, 2), num_heads=(4, 4), mlp_dim=(768, 768)),
    "vit": _vit,
    "dit": _dit,
    "dit_moe": lambda: _dit(num_experts=4, top_k=2, shared_experts=1, expert_dim=512,
                            capacity_factor=1.0),
    "udit": lambda: _dit("udit"),
    "uvit": lambda: _dit("uvit"),
}


def _example_batch(config, cfg):
  B = config.train.batch_size
  if config.task == "lm":
    tokens = np.zeros((B, config.train.seq_len), np.int32)
    return {"inputs": tokens, "targets": tokens}
  return {"images": np.zeros((B, cfg.image_size, cfg.image_size, cfg.channels), np.float32),
          "labels": np.zeros((B,), np.int32)}


def xla_step_flops(config, monkeypatch) -> float:
  """XLA's FLOP count of value_and_grad(loss) on one device, with every nn.scan unrolled."""
  config.mesh.update(data=1, fsdp=1, tensor=1, seq=1, expert=1)
  config.parallel.attention = "dense"
  mesh = parallel_mesh.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.rules_from_config(config.parallel)
  task = tasks.get(config)
  unroll_scans(monkeypatch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, cfg, _ = models.build(config, mesh)
    batch = _example_batch(config, cfg)
    params = jax.eval_shape(lambda: nn.unbox(
        model.init(jax.random.PRNGKey(0), *task.init_args(batch))["params"]))
    grad_fn = jax.value_and_grad(task.loss_fn(model), has_aux=True)
    compiled = jax.jit(grad_fn).lower(params, batch, jax.random.PRNGKey(0)).compile()
  monkeypatch.setattr(nn, "scan", _scan)
  return loop_free_flops(compiled)


def loop_free_flops(compiled) -> float:
  """XLA's FLOP count of ``compiled``, after checking that no model loop is left in it."""
  loops = re.findall(r" while\(.*op_name=\"([^\"]*)\"", compiled.as_text())
  model_loops = [name for name in loops if not re.search(r"scatter|threefry|_uniform|_randint|"
                                                         r"_normal", name)]
  assert not model_loops, f"loops left in the step, counted once by XLA: {model_loops}"
  return compiled.cost_analysis()["flops"]


def test_cost_analysis_counts_a_loop_body_once():
  """Why the comparisons unroll: a 4-step scan of matmuls costs what a 2-step one does."""
  def f(w_LxNxN, x_BxN):
    return jax.lax.scan(lambda x, w: (x @ w, None), x_BxN, w_LxNxN)[0]

  x = jnp.ones((64, 128))
  cost = {L: jax.jit(f).lower(jnp.ones((L, 128, 128)), x).compile().cost_analysis()["flops"]
          for L in (2, 4)}
  one_matmul = 2 * 64 * 128 * 128
  assert cost[2] == cost[4], "XLA now counts loop trips: the unrolling below may be dropped"
  assert one_matmul <= cost[4] < 1.1 * one_matmul


@pytest.mark.parametrize("name", list(CONFIGS))
def test_executed_flops_match_xla(name, monkeypatch):
  config = CONFIGS[name]()
  counted = flops.model_flops_per_step(config)
  got = xla_step_flops(config, monkeypatch)
  assert 1.0 <= got / counted.executed < 1.0 + TOLERANCE, (
      f"{name}: XLA {got:.4g} vs formula {counted.executed:.4g} "
      f"({100 * (got / counted.executed - 1):+.2f}%)")


def _scan_xla_flops(cfg, B: int, S: int) -> float:
  """XLA's count of one selective scan, forward + backward to every input.

  The cotangent is an input, not the ones of a sum: XLA would simplify multiplications by ones.
  """
  I, N = cfg.inner_dim, cfg.d_state
  shapes = [(B, S, I), (B, S, I), (I, N), (B, S, N), (B, S, N), (I,), (B, S, I)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

  def forward_and_backward(u, dt, A, Bm, Cm, D, dy_BxSxI):
    scan = lambda *xs: ssm.selective_scan(*xs, impl=cfg.scan)[0]
    y_BxSxI, pullback = jax.vjp(scan, u, dt, A, Bm, Cm, D)
    return y_BxSxI, pullback(dy_BxSxI)

  return jax.jit(forward_and_backward).lower(*args).compile().cost_analysis()["flops"]


def test_mamba_flops_match_xla_outside_the_scan(monkeypatch):
  """The projections and conv match XLA; the scan's 9·I·N forward per token is a convention.

  The sequential scan is a lax.scan over time (its body counted once), so the step runs the
  associative scan, which XLA counts at about 6x the convention (155 vs 27 FLOPs per token,
  channel and state entry, forward + backward: the parallel prefix's extra passes). The test
  takes XLA's count of the scan alone out of the step and the formula's scan term out of the
  formula, and compares the rest.
  """
  config = _byte_model(name="mamba", num_layers=2, d_model=256, d_state=16, d_conv=4, expand=2,
                       scan="associative")
  cfg = models.model_config(config)
  B, S = config.train.batch_size, config.train.seq_len
  counted = flops.model_flops_per_step(config)
  formula_scan = 3 * B * S * cfg.num_layers * ssm.SCAN_FLOPS * cfg.inner_dim * cfg.d_state
  got = xla_step_flops(config, monkeypatch)
  xla_scan = cfg.num_layers * _scan_xla_flops(cfg, B, S)
  assert 1.0 <= (got - xla_scan) / (counted.executed - formula_scan) < 1.0 + TOLERANCE


def test_llama_is_6n_plus_causal_attention():
  """The PaLM convention: 6 x matmul parameters per token, plus causal attention at half S^2."""
  for config in (CONFIGS["llama"](), CONFIGS["llama_moe"]()):
    cfg = models.model_config(config)
    B, S = config.train.batch_size, config.train.seq_len
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    matmul_params = llama.num_params(cfg, active=True) - cfg.vocab_size * cfg.d_model - norms
    attention = 3 * cfg.num_layers * 2 * S * cfg.num_heads * cfg.head_size  # per token
    counted = flops.model_flops_per_step(config)
    assert counted.units == B * S and counted.unit == "tokens"
    assert counted.model == 6 * matmul_params * B * S + attention * B * S
    assert counted.executed == counted.model + attention * B * S  # full S^2 as executed


def test_moe_capacity_slots_are_executed():
  """Capacity factor 1.25 runs ceil(1.25·T·k/X) slots per expert, all counted as executed."""
  config = CONFIGS["dit_moe"]()
  base = flops.model_flops_per_step(config)
  assert base.executed == base.model  # bidirectional attention, capacity = T·k/X exactly
  config.model.moe.capacity_factor = 1.25
  padded = flops.model_flops_per_step(config)
  cfg = models.model_config(config)
  T = config.train.batch_size * (cfg.input_size // cfg.patch_size) ** 2  # one dispatch group
  extra_slots = cfg.moe.num_experts * cfg.moe.capacity(T) - T * cfg.moe.top_k
  expert = 2 * 2 * cfg.hidden_size * cfg.moe.hidden(int(cfg.hidden_size * cfg.mlp_ratio))
  assert padded.model == base.model
  assert padded.executed - base.executed == pytest.approx(3 * cfg.depth * extra_slots * expert)
  # On a mesh with 4 data-parallel shards, each of the 4 dispatch groups rounds up on its own.
  sizes = dict(data=4, fsdp=1, tensor=1, seq=1, expert=1)
  sharded = flops.model_flops_per_step(config, mesh_sizes=sizes)
  extra_slots = 4 * cfg.moe.num_experts * cfg.moe.capacity(T // 4) - T * cfg.moe.top_k
  assert sharded.executed - base.executed == pytest.approx(3 * cfg.depth * extra_slots * expert)


def test_units():
  assert flops.model_flops_per_step(_vit()).units == 4
  assert flops.model_flops_per_step(_vit()).unit == "images"
  counted = flops.model_flops_per_step(_lm())
  assert counted.model_per_unit == counted.model / (4 * 256)


@pytest.mark.parametrize("kind, dtype, peak", [
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", jnp.bfloat16, 197e12),
    ("TPU v5e", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),  # JAX's name for v5p
    ("TPU v5p", "float32", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v6e", "bfloat16", 918e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),  # TF32, JAX's default f32 precision
    ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
    ("NVIDIA H100 NVL", "float16", 835.5e12),
    ("NVIDIA H200", "bfloat16", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "float32", 156e12),
    ("TPU v4 lite", "bfloat16", None),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
    ("cpu", "float32", None),
    ("NVIDIA H100 80GB HBM3", "int8", None),
])
def test_device_peak_flops(kind, dtype, peak):
  assert flops.device_peak_flops(types.SimpleNamespace(device_kind=kind), dtype) == peak


def test_cpu_peak_is_measured_once_for_the_host():
  measured = flops.measure_peak_flops("float32")
  assert math.isfinite(measured) and measured > 0
  assert flops.measure_peak_flops("float32") == measured  # cached per process
  # Simulated CPU devices share the host's cores: the peak is not multiplied by the 8 devices.
  assert flops.peak_flops("float32") == measured


def test_mfu():
  assert flops.mfu(3e12, 0.5, 12e12) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="positive step time"):
    flops.mfu(3e12, 0.0, 12e12)
