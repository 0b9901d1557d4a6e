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

from nets import dit, megabyte
from parallel import moe as parallel_moe
from parallel import sharding
from train import models

# Forward FLOPs of the selective scan per token, per inner channel and state entry: the count of
# the Mamba authors (state-spaces/mamba issue #110), also used by VMamba's fvcore FLOP counts.
SCAN_FLOPS = 9


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step (forward + backward) on the global batch."""
  model: float  # the MFU numerator: causal attention counted as half of its S² matmuls
  executed: float  # what the dense kernels run: causal attention as full S², MoE capacity slots
  units: int  # tokens (LM) or images per step
  unit: str  # "tokens" or "images"

  @property
  def model_per_unit(self) -> float:
    """Model FLOPs per token (LM) or per image."""
    return self.model / self.units


@dataclasses.dataclass(frozen=True)
class _Step:
  """What a family's count needs besides its Config."""
  batch: int  # sequences or images
  seq_len: int  # LM tokens per sequence (0 for images)
  mesh_sizes: dict | None  # for MoE dispatch groups (capacity mode)
  executed: bool  # count what the kernels run, not the model convention
  rules: tuple  # the active rule table, which decides the dispatch groups on a mesh


def model_flops_per_step(config, mesh_sizes: dict | None = None) -> StepFlops:
  """Model and executed FLOPs of one training step of ``config`` on its global batch.

  ``mesh_sizes`` (resolved mesh axis sizes) only matters for the executed count of MoE layers in
  capacity mode, whose dispatch groups default to one per data-parallel shard; None means one
  device (``model.moe.groups`` batch groups, or one).
  """
  cfg = models.model_config(config)
  name = config.model.name
  if name not in _FORWARD:
    raise ValueError(f"no FLOP count for model {name!r}; known models: {sorted(_FORWARD)}.")
  lm = config.task == "lm"
  batch = config.train.batch_size
  units = batch * config.train.seq_len if lm else batch
  rules = sharding.rules_from_config(config.parallel)
  counts = [3 * units * _FORWARD[name](cfg, _Step(batch, config.train.seq_len if lm else 0,
                                                  mesh_sizes, executed, rules))
            for executed in (False, True)]
  return StepFlops(model=counts[0], executed=counts[1], units=units,
                   unit="tokens" if lm else "images")


# --- Per-family forward FLOPs per unit (token or image) -------------------------------------

def _attention(keys: int, width: int, causal: bool, executed: bool) -> float:
  """Forward FLOPs per query: scores q·k and the weighted values, 2·keys·width each.

  ``width`` is heads × head_dim. Causal attention is half of it in the model count.
  """
  full = 4 * keys * width
  return full if executed or not causal else full / 2


def _mlp_matrices(activation: str) -> int:
  return 3 if activation == "swiglu" else 2  # gate, up, down / up, down


def _moe(moe_cfg, width: int, mlp_dim: int, tokens_per_sequence: int, step: _Step) -> float:
  """Forward FLOPs per token of a MoE layer: router, routed and shared experts.

  2·E·X (router) + slots · m·2·E·M_e (routed) + shared · m·2·E·M_e, with m = 3 matrices for
  SwiGLU and 2 for GELU experts. The model count takes slots = top_k (active parameters).
  Executed, capacity mode: every expert runs its C = ceil(factor · T·k / X) slots per dispatch
  group of T tokens, filled or not, so slots = X·C / T; dropless: top_k (ragged_dot; the CPU
  block-padded fallback runs a little more).
  """
  M = moe_cfg.hidden(mlp_dim)
  expert = _mlp_matrices(moe_cfg.activation) * 2 * width * M
  slots = moe_cfg.top_k
  if step.executed and moe_cfg.capacity_factor:
    if step.mesh_sizes is None:
      batch_groups, seq_groups = moe_cfg.groups or 1, 1
    else:
      layout = parallel_moe.layout(moe_cfg, step.mesh_sizes, None, step.rules)
      batch_groups, seq_groups = layout.batch_groups, layout.seq_groups
    T = (step.batch // batch_groups) * (tokens_per_sequence // seq_groups)
    slots = moe_cfg.num_experts * moe_cfg.capacity(T) / T
  return 2 * width * moe_cfg.num_experts + (slots + moe_cfg.shared_experts) * expert


def _llama_layer(cfg, seq_len: int, step: _Step) -> float:
  """One Llama block without its MLP, per token.

  2·E·D·(2H + 2K) (q, k, v, o projections) + causal attention over seq_len keys.
  """
  E, H, K, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  return 2 * E * D * (2 * H + 2 * K) + _attention(seq_len, H * D, True, step.executed)


def _llama(cfg, step: _Step) -> float:
  """Llama, per token: L·(attention block + MLP) + 2·E·V (the head).

  MLP: 3·2·E·M (SwiGLU); every ``moe.every``-th layer a MoE layer instead (``_moe``).
  The embedding lookup is a gather (0 FLOPs); a tied head is the same matmul as an untied one.
  """
  L, E, M = cfg.num_layers, cfg.d_model, cfg.mlp_dim
  n_moe = L // cfg.moe.every if cfg.moe.enabled else 0
  total = L * _llama_layer(cfg, step.seq_len, step) + (L - n_moe) * 3 * 2 * E * M
  if n_moe:
    total += n_moe * _moe(cfg.moe, E, M, step.seq_len, step)
  return total + 2 * E * cfg.vocab_size


def _mamba_layer(cfg) -> float:
  """One Mamba block, per token.

  2·E·2I (in_proj) + 2·C·I (depthwise causal conv, C taps) + 2·I·(R + 2N) (x_proj: Δ rank, B, C)
  + 2·R·I (dt_proj) + SCAN_FLOPS·I·N (selective scan) + 2·I·E (out_proj).
  """
  E, I, N, R, C = cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv
  return (2 * E * 2 * I + 2 * C * I + 2 * I * (R + 2 * N) + 2 * R * I + SCAN_FLOPS * I * N
          + 2 * I * E)


def _mamba(cfg, step: _Step) -> float:
  """Mamba, per token: L·(Mamba block) + 2·E·V (the head)."""
  return cfg.num_layers * _mamba_layer(cfg) + 2 * cfg.d_model * cfg.vocab_size


def _megabyte(cfg, step: _Step) -> float:
  """MEGABYTE / MBLM, per byte: Σ_s (per stage-s token) / G_s + 2·E_b·V (the head).

  Stage s runs tokens of G_s bytes in sequences of P_s (P_0 = seq_len / G_0, then the patch
  sizes); per stage-s token: 2·G_s·E_b·d_s (patch projection of the concatenated byte
  embeddings; not the last stage) + 2·d_{s-1}·d_s (the parent's output projected to its P_s
  children; not the global stage) + L_s blocks: Llama blocks (heads × head_dim = d_s, MLP
  3·2·d_s·M_s) with causal attention over P_s, or Mamba blocks.
  """
  n, Eb = cfg.num_stages, cfg.d_model[-1]
  lengths = (step.seq_len // cfg.group_sizes[0],) + cfg.patch_sizes
  total = 2 * Eb * cfg.vocab_size
  for s in range(n):
    sub, d, G = megabyte.stage_config(cfg, s), cfg.d_model[s], cfg.group_sizes[s]
    per_token = 2 * G * Eb * d if s < n - 1 else 0
    if s > 0:
      per_token += 2 * cfg.d_model[s - 1] * d
    if cfg.stage_blocks[s] == "mamba":
      per_token += sub.num_layers * _mamba_layer(sub)
    else:
      per_token += sub.num_layers * (_llama_layer(sub, lengths[s], step) + 3 * 2 * d * sub.mlp_dim)
    total += per_token / G
  return total


def _vit(cfg, step: _Step) -> float:
  """ViT, per image: 2·p²·C·E·S_p (patch embedding) + L·S·(2·4·E² + 2·2·E·M + attention) + 2·E·K.

  S_p patches; S = S_p (+1 with a class token) tokens; non-causal attention over S keys, width E.
  """
  E, S_p = cfg.width, cfg.num_patches
  S = S_p + (cfg.pool == "token")
  layer = S * (2 * 4 * E * E + 2 * 2 * E * cfg.mlp_dim + _attention(S, E, False, step.executed))
  return (2 * cfg.patch_size ** 2 * cfg.channels * E * S_p + cfg.depth * layer
          + 2 * E * cfg.num_classes)


def _dit_block(width: int, tokens: int, keys: int, mlp: float, step: _Step) -> float:
  """One DiT adaLN-Zero block, per image: 2·W·6W (modulation from c) + S·(2·4·W² (qkv, out)
  + non-causal attention over ``keys`` + ``mlp`` per token)."""
  return 2 * width * 6 * width + tokens * (2 * 4 * width * width
                                           + _attention(keys, width, False, step.executed) + mlp)


def _conditioning(width: int) -> float:
  """Timestep MLP per image: 2·256·W + 2·W·W (the label embedding is a gather)."""
  return 2 * dit.FREQUENCY_EMBEDDING_SIZE * width + 2 * width * width


def _dit(cfg, step: _Step) -> float:
  """DiT, per image: patch embedding 2·p²·C_in·E·S + timestep MLP + depth adaLN-Zero blocks
  (``_dit_block``; MLP 2·2·E·M, M = mlp_ratio·E, or every ``moe.every``-th a MoE layer) + final
  layer 2·E·2E (modulation) + 2·E·p²·C_out·S."""
  E, p = cfg.hidden_size, cfg.patch_size
  S = (cfg.input_size // p) ** 2
  M = int(E * cfg.mlp_ratio)
  n_moe = cfg.depth // cfg.moe.every if cfg.moe.enabled else 0
  dense_mlp = 2 * 2 * E * M
  moe_mlp = _moe(cfg.moe, E, M, S, step) if n_moe else 0.0
  blocks = ((cfg.depth - n_moe) * _dit_block(E, S, S, dense_mlp, step)
            + n_moe * _dit_block(E, S, S, moe_mlp, step))
  return (2 * p * p * cfg.in_channels * E * S + _conditioning(E) + blocks
          + 2 * E * 2 * E + 2 * E * p * p * cfg.out_channels * S)


def _udit(cfg, step: _Step) -> float:
  """U-DiT, per image: stem 2·p²·C_in·C·g² + one timestep MLP per width C·2^j (j = 0..L)
  + stages of 2·depth DiT blocks (``_dit_block``; MLP 2·2·W·M, attention within 2×2 sub-maps:
  S/4 keys) + downsampling 2·4W·2W per merged token + upsampling 2·W_in·2W_in per token of the
  coarser grid + skip merge 2·(W_in/2 + W_skip)·W_out per token + final layer on width 2C.

  Grid side g = input_size / patch_size; encoder stage i runs on grid g/2^i at width C·2^i, the
  middle stage on g/2^L at C·2^L, decoder stage i on g/2^i at C·2^max(i, 1).
  """
  C, L, p = cfg.hidden_size, cfg.num_levels, cfg.patch_size
  g = cfg.input_size // p

  def stage(depth, grid, W):
    S = grid * grid
    return 2 * depth * _dit_block(W, S, S // 4, 2 * 2 * W * int(W * cfg.mlp_ratio), step)

  total = 2 * p * p * cfg.in_channels * C * g * g
  total += sum(_conditioning(C * 2 ** j) for j in range(L + 1))
  for i in range(L):
    W = C * 2 ** i
    total += stage(cfg.depths[i], g >> i, W) + (g >> (i + 1)) ** 2 * 2 * 4 * W * 2 * W
  total += stage(cfg.depths[L], g >> L, C * 2 ** L)
  for i in reversed(range(L)):
    W_in, W_out = C * 2 ** (i + 1), C * 2 ** max(i, 1)
    total += (g >> (i + 1)) ** 2 * 2 * W_in * 2 * W_in
    total += (g >> i) ** 2 * 2 * (W_in // 2 + C * 2 ** i) * W_out
    total += stage(cfg.depths[2 * L - i], g >> i, W_out)
  W = cfg.stage_widths()[-1]
  return total + 2 * W * 2 * W + 2 * W * p * p * cfg.out_channels * g * g


_FORWARD = {"llama": _llama, "mamba": _mamba, "megabyte": _megabyte, "vit": _vit, "dit": _dit,
            "udit": _udit}


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
