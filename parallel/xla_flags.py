"""Recommended XLA flags for GPUs and TPUs, in one place, added before JAX starts its backend.

``apply()`` appends the flags below to ``XLA_FLAGS`` (GPU) / ``LIBTPU_INIT_ARGS`` (TPU) unless the
user's environment already sets them: a flag the user set always wins, in either direction. The
platform is decided without starting a backend (``jax.devices()`` would, and flags are read only
once, at that start): ``JAX_PLATFORMS`` when set, else which plugins are installed (the CUDA PJRT
plugin, libtpu). On a CPU-only install nothing is added.

Every flag here was checked against this jaxlib (0.10.2): XLA aborts the process at start-up on an
unknown name in XLA_FLAGS, even on CPU ("Unknown flag in XLA_FLAGS"), so a flag removed by a later
jaxlib must be removed here too. Known --xla_gpu_* flags are parsed and ignored by the CPU backend.

Deliberately left at XLA's defaults: --xla_gpu_enable_highest_priority_async_stream (already true),
--xla_gpu_enable_pipelined_reduce_scatter (already true), the collective combine thresholds (the
right values depend on the device count and model size; XLA's defaults are sane), and
--xla_gpu_enable_command_buffer (CUDA graphs cut launch overhead for small kernels; some large-model
recipes turn them off, a trade-off to measure, not a default to impose).
"""

import importlib.util
import os
import shlex

GPU_FLAGS = (
    # Schedule asynchronous collectives (FSDP all-gathers and reduce-scatters, data-parallel
    # all-reduces, Ulysses all-to-alls, ring collective-permutes) to overlap with compute. The one
    # flag NVIDIA's JAX containers set; XLA's default is false.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # FSDP over the scanned layer stack: all-gather layer i+1's weights while layer i computes
    # (costs one layer of gathered weights).
    "--xla_gpu_enable_pipelined_all_gather=true",
    # The same for all-reduces inside the layer loop (e.g. gradient reductions of scanned layers).
    "--xla_gpu_enable_pipelined_all_reduce=true",
    # Unroll the layer scan by two so that the pipelined collectives above have a neighbouring
    # iteration to overlap with.
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # cuBLAS for matmuls instead of Triton GEMM fusions (XLA's default is Triton): shorter compiles
    # without Triton's GEMM autotuning, and what MaxText's and NVIDIA JAX-Toolbox's LLM recipes use.
    "--xla_gpu_enable_triton_gemm=false",
)

# No TPU flags by default: libtpu's flags are not in open-source XLA, so their names cannot be
# checked against the installed libtpu here, and an unknown one stops the TPU runtime. Put tuned
# ones (e.g. MaxText's --xla_tpu_enable_async_collective_fusion=true ...) in LIBTPU_INIT_ARGS.
TPU_FLAGS = ()

# XLA:CPU correctness, not tuning: set for every CPU run (parallel/__init__.py applies them when
# odyssey is imported, before JAX starts a backend), unless XLA_FLAGS sets them already.
# jaxlib 0.12's concurrency-optimised HLO scheduler (its default) lets one device of an SPMD
# program enter a collective inside the layer scan's while loop while the others enter an
# independent top-level collective first (seen: the expert=4 x data=2 MoE train step, one device in
# the loop's all-gather and seven in a scalar all-reduce, in every run, 5 of 5); each waits for the
# other forever. With the default scheduler the devices agreed in every run tried; the structural
# fix is in train/tasks/lm.py (the collective was independent of the scan), this is a second
# guard for programs with the same shape (docs/decoding.md).
CPU_FLAGS = (
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)

_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                 "jax_plugins.xla_cuda13")


def platforms() -> set[str]:
  """The accelerators JAX may start here, known without starting a backend: {"gpu", "tpu"}."""
  wanted = os.environ.get("JAX_PLATFORMS", "").lower()
  if wanted:
    names = {name.strip() for name in wanted.split(",")}
    return ({"gpu"} if names & {"cuda", "gpu"} else set()) | ({"tpu"} if "tpu" in names else set())
  found = set()
  if any(_installed(name) for name in _CUDA_PLUGINS):
    found.add("gpu")
  if _installed("libtpu"):
    found.add("tpu")
  return found


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package
    return False


def merge(existing: str, recommended) -> tuple[str, list[str]]:
  """``existing`` plus the ``recommended`` flags whose names it does not set; and those added."""
  try:
    tokens = shlex.split(existing)
  except ValueError:  # unbalanced quotes: XLA splits on whitespace then
    tokens = existing.split()
  user = {_name(token) for token in tokens if token.startswith("--")}
  added = [flag for flag in recommended if _name(flag) not in user]
  return " ".join(part for part in (existing.strip(), *added) if part), added


def _name(flag: str) -> str:
  """--xla_a=1 -> xla_a; --noxla_a (a boolean set false) -> xla_a."""
  name = flag.lstrip("-").split("=", 1)[0]
  return name[2:] if name.startswith("noxla_") else name


def apply(found: set[str] | None = None) -> list[str]:
  """Adds the recommended flags for ``found`` (default: ``platforms()``) to the environment.

  Must run before JAX starts a backend. Returns the flags added.
  """
  found = platforms() if found is None else found
  added = []
  for platform, variable, flags in (("gpu", "XLA_FLAGS", GPU_FLAGS),
                                    ("tpu", "LIBTPU_INIT_ARGS", TPU_FLAGS)):
    if platform in found and flags:
      os.environ[variable], new = merge(os.environ.get(variable, ""), flags)
      added += new
  return added


def apply_cpu() -> list[str]:
  """Adds CPU_FLAGS to XLA_FLAGS where it does not set them; returns those added. Only effective
  before JAX starts its CPU backend."""
  os.environ["XLA_FLAGS"], added = merge(os.environ.get("XLA_FLAGS", ""), CPU_FLAGS)
  return added
