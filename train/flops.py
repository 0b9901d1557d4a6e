"""Model FLOPs per training step, peak FLOP/s of the devices, and model FLOPs utilisation (MFU).

Counting convention (PaLM, Chowdhery et al. 2022, appendix B; MaxText's MFU): a matmul costs
2 FLOPs per multiply-add, and a training step costs 3x the forward pass's matmul FLOPs (the
backward pass runs two matmuls per forward one, for the input and the weight gradients): 6·N per
token for N dense matmul parameters, plus attention. Not counted: elementwise work (norms,
activations, softmax, the loss), gathers (embedding and label lookups), the optimizer, and
rematerialisation, so this is MFU, not hardware FLOPs utilisation.

Attention over S keys costs 2·S·H·D FLOPs per query for the scores and as much for the weighted
values. ``StepFlops.model`` counts causal attention as half of that (the work a causal kernel must
do; what MFU reports); ``StepFlops.executed`` counts the full S² that the dense masked kernel
(nets/attention.py) runs, and MoE experts on the capacity slots they are given, not on the
assignments: the number XLA's cost analysis sees (tests/train/test_flops.py checks it per family).
The per-family forward formulas live next to each family (its ``Family.flops``, nets/registry.py).
The blockwise kernel (``parallel.attention="blockwise"``, what "auto" picks off GPU) runs the same
forward and recomputes the scores in its backward: 7 S² matmuls per step where this counts 6.

Peak FLOP/s: ``PEAK_FLOPS`` (vendor datasheets) for TPUs and NVIDIA GPUs; on CPU the measured
matmul rate of the host (``measure_peak_flops``).
"""

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp

from nets import counting, registry
from parallel import moe as parallel_moe
from parallel import sharding
from train import models


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step (forward + backward) on the global batch."""
  model: float  # the MFU numerator: causal attention counted as half of its S² matmuls
  executed: float  # what the dense kernels run: causal attention as full S², MoE capacity slots
  units: int  # tokens (LM), images or packed image rows per step
  unit: str  # "tokens", "images" or "rows"

  @property
  def model_per_unit(self) -> float:
    """Model FLOPs per token (LM) or per image."""
    return self.model / self.units


def model_flops_per_step(config, mesh_sizes: dict | None = None) -> StepFlops:
  """Model and executed FLOPs of one training step of ``config`` on its global batch.

  ``mesh_sizes`` (resolved mesh axis sizes) only matters for the executed count of MoE layers in
  capacity mode, whose dispatch groups default to one per data-parallel shard; None means one
  device (``model.moe.groups`` batch groups, or one).
  """
  family = registry.get(config.model.name)
  cfg = models.model_config(config)
  lm = config.task == "lm"
  batch = config.train.batch_size
  units = batch * config.train.seq_len if lm else batch
  # Packed image rows (data.native_size): a unit is a row of data.seq_len patch tokens.
  seq_len = models.seq_len(config)
  rules = sharding.rules_from_config(config.parallel)
  layout = None
  if mesh_sizes is not None:
    layout = lambda moe_cfg: parallel_moe.layout(moe_cfg, mesh_sizes, None, rules)
  counts = [3 * units * family.flops(cfg, counting.Step(batch, seq_len, executed,
                                                        moe_layout=layout))
            for executed in (False, True)]
  return StepFlops(model=counts[0], executed=counts[1], units=units,
                   unit="tokens" if lm else ("rows" if seq_len else "images"))


# --- Peak FLOP/s -----------------------------------------------------------------------------

# Dense (no sparsity) peak FLOP/s of one chip (one JAX device), by compute dtype. "float32" is the
# rate at which JAX's DEFAULT matmul precision runs float32 inputs (jax.lax.Precision): TF32
# tensor cores on A100/H100/H200, one bfloat16 pass on TPU MXUs. Precision HIGHEST runs 3-6x
# slower, so MFU against these numbers reads that much lower. float16 uses the bfloat16 row.
# Sources: Google Cloud TPU docs (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): bf16 per chip.
# NVIDIA datasheets, whose headline tensor-core numbers assume 2:4 sparsity; dense is half:
# A100 (SXM and PCIe): BF16 312, TF32 156 TFLOP/s. H100 SXM (and H200 SXM, the same compute):
# BF16 1,979 / TF32 989 sparse -> 989.5 / 494.5 dense. H100 PCIe: 1,513 / 756 -> 756.5 / 378.
# H100 NVL and H200 NVL: 1,671 / 835 -> 835.5 / 417.5.
PEAK_FLOPS = {
    "tpu_v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu_v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu_v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu_v6e": {"bfloat16": 918e12, "float32": 918e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12},
    "h100_sxm": {"bfloat16": 989.5e12, "float32": 494.5e12},
    "h100_pcie": {"bfloat16": 756.5e12, "float32": 378e12},
    "h100_nvl": {"bfloat16": 835.5e12, "float32": 417.5e12},
    "h200": {"bfloat16": 989.5e12, "float32": 494.5e12},
    "h200_nvl": {"bfloat16": 835.5e12, "float32": 417.5e12},
}

# (regex searched in the lowercased ``device.device_kind``, PEAK_FLOPS key); the first match wins.
# JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"; NVIDIA kinds are the product
# names, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB".
_KINDS = (
    (r"v6 ?(lite|e)\b|trillium", "tpu_v6e"),
    (r"v5 ?(lite|e)\b", "tpu_v5e"),
    (r"tpu v5p?$", "tpu_v5p"),
    (r"tpu v4$", "tpu_v4"),
    (r"h200.*nvl", "h200_nvl"),
    (r"h200", "h200"),
    (r"h100.*nvl", "h100_nvl"),
    (r"h100.*pcie", "h100_pcie"),
    (r"h100", "h100_sxm"),
    (r"a100", "a100"),
)


def _dtype_row(dtype) -> str | None:
  name = jnp.dtype(dtype).name
  return {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}.get(name)


# High-bandwidth memory per chip (bytes), from the same datasheets: what a config's per-device
# state must fit (tests/train/test_experiments.py checks the pod configs against it).
HBM_BYTES = {
    "tpu_v4": 32 * 2**30, "tpu_v5e": 16 * 2**30, "tpu_v5p": 95 * 2**30, "tpu_v6e": 32 * 2**30,
    "a100": 80e9, "h100_sxm": 80e9, "h200": 141e9,
}


def device_peak_flops(device, dtype) -> float | None:
  """Dense peak FLOP/s of one ``device`` for matmuls in ``dtype``; None if not in PEAK_FLOPS."""
  kind, row = device.device_kind.lower().strip(), _dtype_row(dtype)
  for pattern, key in _KINDS:
    if re.search(pattern, kind):
      return PEAK_FLOPS[key].get(row) if row else None
  return None


def measure_peak_flops(dtype="float32", size: int | None = None, device=None) -> float:
  """FLOP/s of a large jitted ``jnp.dot`` on one device: the best of a few timed runs.

  Measured once per (dtype, size, device) and process. ``size`` (the square matrices' side)
  defaults to 1024 on CPU (about 0.2 s on 2 cores) and 8192 on accelerators.
  """
  device = device or jax.devices()[0]
  if size is None:
    size = 1024 if device.platform == "cpu" else 8192
  return _measure(jnp.dtype(dtype).name, size, device)


@functools.lru_cache(maxsize=None)
def _measure(dtype: str, size: int, device, repeats: int = 5) -> float:
  x = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(jnp.dot)
  matmul(x, x).block_until_ready()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops(dtype) -> float:
  """Peak FLOP/s of the whole run for matmuls in ``dtype`` (the model's compute dtype).

  GPU/TPU: the PEAK_FLOPS value of the device kind × ``jax.device_count()``; for a kind not in
  the table, the measured matmul rate of one device × the device count instead (what the chip
  reaches, not its datasheet peak). CPU: the measured matmul rate of the host, not multiplied:
  simulated CPU devices (--xla_force_host_platform_device_count) share the same cores, and one
  device's matmul already uses all of them.
  """
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measure_peak_flops(dtype, device=device)
  per_device = device_peak_flops(device, dtype)
  if per_device is None:
    per_device = measure_peak_flops(dtype, device=device)
  return per_device * jax.device_count()


def mfu(model_flops_per_step: float, step_time_s: float, peak: float) -> float:
  """Model FLOPs utilisation: model FLOPs per second over the peak FLOP/s."""
  if step_time_s <= 0 or peak <= 0:
    raise ValueError(f"mfu needs a positive step time and peak, got {step_time_s} s and {peak}.")
  return model_flops_per_step / step_time_s / peak
