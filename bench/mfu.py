"""Model FLOPs utilisation of odyssey's train step, against the machine's measured matmul peak.

  .venv/bin/python -m bench.mfu [--quick] [--out=bench/results] [--steps=N] [--cases=a,b]

For each case (the Llama, DiT, ViT and Mamba train steps on ONE device of the current backend)
it reports, all in this one process so the figures are ratios of the same machine state:
  * model FLOPs per step (train/flops.py, the formulas checked against XLA's cost analysis);
  * step time: the median of ``--steps`` timed steps (dispatch to block_until_ready) after two
    warm-up steps, with the state donated as train/loop.py runs it;
  * the achievable matmul peak: the best rate of large square ``jnp.dot``s in the compute dtype,
    measured before and after the cases (the larger is used; both are printed);
  * MFU = model FLOP/s / peak.
For the Llama it also runs a plain-JAX baseline: the same layer shapes written with jnp only (no
Flax, no sharding layer, no odyssey code), forward and backward by jax.value_and_grad, with the
same optax AdamW update, and reports its MFU on the same FLOP count.

Prints a JSON document and a markdown table and writes mfu.{json,md,png} to --out. On CPU the
simulated device count is forced to 1 (a benchmark of one device's step; XLA:CPU's thread pool
then has all cores). --quick runs tiny shapes with two timed steps: it only shows that every
figure is produced (the test suite runs it).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

if jax.devices()[0].platform == "cpu" and jax.device_count() != 1:
  sys.exit("bench.mfu measures one device: run it without "
           "--xla_force_host_platform_device_count in XLA_FLAGS.")

from bench import report  # noqa: E402
from bench.seq_parallel import _table  # noqa: E402
from configs import diffusion, lm, vit  # noqa: E402
from parallel import mesh as parallel_mesh  # noqa: E402
from parallel import sharding  # noqa: E402
from train import flops, models, optimizer, steps, tasks  # noqa: E402
from train import state as state_lib  # noqa: E402

# The cases: config factory (full, quick). The Llama is the shape the issue names: d_model 512,
# seq 512, batch 8, 4 layers (8 heads of 64, SwiGLU 1408 = 2.75 x d_model).
LLAMA = dict(num_layers=4, d_model=512, num_heads=8, num_kv_heads=8, mlp_dim=1408, max_len=512)
LLAMA_QUICK = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=128, max_len=64)


def llama_config(quick: bool):
  c = lm.get_config("size=test")
  c.model.update(**(LLAMA_QUICK if quick else LLAMA))
  c.train.update(batch_size=2 if quick else 8, seq_len=64 if quick else 512)
  return c


def mamba_config(quick: bool):
  c = lm.get_config("size=test")
  c.model = ml_collections.ConfigDict(dict(
      name="mamba", vocab_size=384, num_layers=2 if quick else 4, d_model=64 if quick else 512,
      d_state=16, d_conv=4, expand=2, dt_rank=0, scan_chunk=0, max_len=512,
      tie_embeddings=False, dtype="float32", param_dtype="float32"))
  c.train.update(batch_size=2 if quick else 8, seq_len=64 if quick else 512)
  return c


def dit_config(quick: bool):
  c = diffusion.get_config("model=dit,variant=digits" if quick else "model=dit,variant=S/2")
  if not quick:  # DiT-S/2 on 32x32x4 latents (ImageNet-256's latent shape): 256 tokens
    c.model.update(input_size=32, in_channels=4, num_classes=1000)
  c.train.update(batch_size=2 if quick else 8)
  return c


def vit_config(quick: bool):
  c = vit.get_config("variant=digits" if quick else "variant=S/16")
  if not quick:  # ViT-S/16 at 224x224x3: 196 tokens
    c.model.update(image_size=224, channels=3, num_classes=1000)
  c.train.update(batch_size=2 if quick else 8)
  return c


CASES = {"llama": llama_config, "dit": dit_config, "vit": vit_config, "mamba": mamba_config}


def random_batch(config, model_cfg, rng: np.random.Generator) -> dict:
  """One fixed batch with the model's input shapes (no dataset needed at these sizes)."""
  B = config.train.batch_size
  if config.task == "lm":
    tokens = rng.integers(0, 256, (B, config.train.seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if config.task == "classification":
    shape = (B, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
  else:
    shape = (B, model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  return {"images": rng.standard_normal(shape).astype(np.float32),
          "labels": rng.integers(0, model_cfg.num_classes, (B,)).astype(np.int32)}


def time_steps(step, state, batch, steps_timed: int):
  """Median seconds per step after two warm-up steps; the state is donated and threaded through."""
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps_timed):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def odyssey_step(config):
  """odyssey's compiled train step on one device, its initial state and a batch."""
  mesh = parallel_mesh.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.rules_from_config(config.parallel)
  model, model_cfg, plan = models.build(config, mesh)
  task = tasks.get(config)
  tx, lr = optimizer.make(config.opt, config.train.steps)
  batch = random_batch(config, model_cfg, np.random.default_rng(0))
  init = lambda: state_lib.create(model, tx, task.init_args(batch), config.seed)
  _, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  state = sharding.init_sharded(init, shardings, mesh, rules)
  body = steps.make_train_step(task.loss_fn(model, None), tx, lr)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(body, donate_argnums=0).lower(state, batch).compile()
  return compiled, state, batch, plan


# ----------------------------------------------------------------------------- plain-JAX baseline


def baseline_params(c, rng):
  """Llama weights as a dict of plain arrays, layers stacked on axis 0 (scanned like odyssey)."""
  L, E, M, V = c["num_layers"], c["d_model"], c["mlp_dim"], 384
  k = iter(jax.random.split(rng, 16))
  w = lambda shape: 0.02 * jax.random.normal(next(k), shape, jnp.float32)
  return {"embed": w((V, E)), "out": w((E, V)), "norm": jnp.ones((E,)),
          "layers": {"wq": w((L, E, E)), "wk": w((L, E, E)), "wv": w((L, E, E)),
                     "wo": w((L, E, E)), "gate": w((L, E, M)), "up": w((L, E, M)),
                     "down": w((L, M, E)), "n1": jnp.ones((L, E)), "n2": jnp.ones((L, E))}}


def baseline_loss(params, tokens, targets, num_heads: int):
  """The Llama forward in jnp: RMSNorm, RoPE, causal softmax attention, SwiGLU, cross-entropy."""
  B, S = tokens.shape
  E = params["embed"].shape[1]
  D = E // num_heads

  def norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * scale

  inv = 1.0 / (10000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  ang = jnp.arange(S, dtype=jnp.float32)[:, None] * inv[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]

  def rope(x):
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  causal = jnp.tril(jnp.ones((S, S), bool))

  def layer(x, p):
    h = norm(x, p["n1"])
    q = rope((h @ p["wq"]).reshape(B, S, num_heads, D))
    k = rope((h @ p["wk"]).reshape(B, S, num_heads, D))
    v = (h @ p["wv"]).reshape(B, S, num_heads, D)
    logits = jnp.einsum("bshd,bthd->bhst", q, k) * D ** -0.5
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), -1)
    o = jnp.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, E)
    x = x + o @ p["wo"]
    h = norm(x, p["n2"])
    x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
    return x, None

  x = params["embed"][tokens]
  x, _ = jax.lax.scan(layer, x, params["layers"])
  logits = norm(x, params["norm"]) @ params["out"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def baseline_step(config, batch):
  c = dict(config.model)
  params = baseline_params(c, jax.random.PRNGKey(0))
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(baseline_loss)(params, batch["inputs"], batch["targets"],
                                                     c["num_heads"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  state = (params, tx.init(params))
  return jax.jit(step, donate_argnums=0).lower(state, batch).compile(), state


# ----------------------------------------------------------------------------- profile


def op_kind(name: str) -> str:
  """XLA:CPU thunk names -> what they do (matmuls are XNNPACK "ynn" fusions or dot thunks)."""
  if name.startswith("ynn_fusion") or name.startswith("dot") or "_dot" in name:
    return "matmul"
  if name.startswith(("copy", "transpose")) or "transpose" in name:
    return "layout copies (transposes for the next matmul)"
  if "fusion" in name:
    return "elementwise / reduction fusions"
  if name.startswith("while"):
    return "loop bookkeeping"
  return "other (broadcasts, waits)"


def profile(step, state, batch, workdir: str) -> dict:
  """Thread-time per op kind over one step, from a jax.profiler trace (XLA:CPU thunk events).

  The events are summed over the XLA thread pool's threads, so the total exceeds the wall time
  by up to the thread count; the shares are what matters.
  """
  import collections
  import glob
  jax.profiler.start_trace(workdir)
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True))[-1]
  per_op = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if not event.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ")):
          per_op[event.name] += event.duration_ns / 1e9
  kinds = collections.Counter()
  for name, seconds in per_op.items():
    kinds[op_kind(name)] += seconds
  total = sum(kinds.values())
  return {"thread_s": total, "kinds": {k: v / total for k, v in kinds.most_common()},
          "top_non_matmul": [(n, s) for n, s in per_op.most_common(60)
                             if op_kind(n) != "matmul"][:8]}


# ----------------------------------------------------------------------------- the run


def peak(dtype: str, quick: bool) -> float:
  """The best rate of square matmuls of a few sizes in ``dtype`` (not cached: measured now)."""
  best = 0.0
  for size in ((256, 512) if quick else (1024, 2048)):
    best = max(best, flops._measure(dtype, size, jax.devices()[0], repeats=3 if quick else 5))
  return best


def run_case(name: str, quick: bool, steps_timed: int, peak_flops: float,
             profile_dir: str | None = None) -> dict:
  config = CASES[name](quick)
  step_flops = flops.model_flops_per_step(config)
  compiled, state, batch, plan = odyssey_step(config)
  median, times = time_steps(compiled, state, batch, steps_timed)
  row = {"case": name, "dtype": config.model.dtype, "model_flops_per_step": step_flops.model,
         f"{step_flops.unit}_per_step": step_flops.units, "attention": plan.describe(),
         "step_s": median, "step_times_s": times,
         "model_flops_per_s": step_flops.model / median,
         "mfu": flops.mfu(step_flops.model, median, peak_flops)}
  if name == "llama" and profile_dir is not None and jax.devices()[0].platform == "cpu":
    compiled, state, batch, _ = odyssey_step(config)
    row["profile"] = profile(compiled, state, batch, profile_dir)
  if name == "llama":
    base, base_state = baseline_step(config, batch)
    base_median, base_times = time_steps(base, base_state, batch, steps_timed)
    row.update(baseline_step_s=base_median, baseline_step_times_s=base_times,
               baseline_mfu=flops.mfu(step_flops.model, base_median, peak_flops),
               speed_vs_baseline=base_median / median)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="bench/results")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
  parser.add_argument("--cases", default=",".join(CASES))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  steps_timed = args.steps or (2 if args.quick else 7)
  device = jax.devices()[0]
  dtype = "float32"
  before = peak(dtype, args.quick)
  import tempfile
  profile_dir = tempfile.mkdtemp(prefix="odyssey_mfu_profile_")
  rows = [run_case(name, args.quick, steps_timed, before, profile_dir)
          for name in args.cases.split(",")]
  after = peak(dtype, args.quick)
  best = max(before, after)
  for row in rows:  # MFU against the better of the two peak measurements
    row["mfu"] = flops.mfu(row["model_flops_per_step"], row["step_s"], best)
    if "baseline_step_s" in row:
      row["baseline_mfu"] = flops.mfu(row["model_flops_per_step"], row["baseline_step_s"], best)
  result = {"bench": "mfu", "quick": args.quick, "backend": device.platform,
            "device_kind": device.device_kind, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "peak_flops": best, "peak_flops_before": before, "peak_flops_after": after,
            "rows": rows}
  table = _table(
      ["case", "model GFLOP/step", "step (s)", "model GFLOP/s", "MFU", "baseline step (s)",
       "baseline MFU", "odyssey / baseline speed"],
      [[r["case"], f"{r['model_flops_per_step'] / 1e9:.2f}", f"{r['step_s']:.3f}",
        f"{r['model_flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.3f}",
        f"{r['baseline_step_s']:.3f}" if "baseline_step_s" in r else "",
        f"{r['baseline_mfu']:.3f}" if "baseline_mfu" in r else "",
        f"{r['speed_vs_baseline']:.2f}x" if "speed_vs_baseline" in r else ""] for r in rows])
  header = (f"MFU on {device.device_kind} ({device.platform}, {os.cpu_count()} cores), peak "
            f"{best / 1e9:.1f} GFLOP/s ({dtype} matmul, measured before {before / 1e9:.1f} and "
            f"after {after / 1e9:.1f})")
  markdown = f"{header}\n\n{table}\n"
  for r in rows:
    if "profile" in r:
      p = r["profile"]
      markdown += (f"\nWhere the {r['case']} step's time goes (jax.profiler trace of one step, "
                   f"XLA:CPU thunks, {p['thread_s']:.2f} thread-seconds over the thread pool):\n\n"
                   + _table(["op kind", "share of thread time"],
                            [[k, f"{v:.1%}"] for k, v in p["kinds"].items()])
                   + "\n\nLargest non-matmul ops: "
                   + ", ".join(f"{n} {s:.2f} s" for n, s in p["top_non_matmul"]) + "\n")
  print(json.dumps(result, indent=2))
  print(report.write(args.out, "mfu", result, markdown, time.perf_counter() - start,
                     lambda doc, path: _plot(doc["rows"], path, header)))


def _plot(rows, path, title):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib is not installed: no mfu.png (pip install -e '.[bench]')."
  names = [r["case"] for r in rows]
  values = [r["mfu"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.bar(names, values, color="tab:blue", label="odyssey")
  for i, r in enumerate(rows):
    if "baseline_mfu" in r:
      ax.bar([i + 0.3], [r["baseline_mfu"]], width=0.3, color="tab:gray", label="plain-JAX baseline")
  ax.set_ylabel("MFU")
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=7)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
