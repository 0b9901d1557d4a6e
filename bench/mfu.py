"""Model FLOPs utilisation of odyssey's train step, against the machine's measured matmul peak.

  .venv/bin/python -m bench.mfu [--quick] [--out=bench/results] [--steps=N] [--cases=a,b]

For the Llama, DiT, ViT, Swin, Mamba, Gated DeltaNet and Mamba-2 train steps on ONE device of the
current backend: model FLOPs per step (train/flops.py), the median step time (state donated, after
two warm-up steps), the matmul peak (the best rate of large square matmuls, sampled before, between
rounds and after) and MFU = model FLOP/s / peak. For the Llama also, timed round-robin with
odyssey's step: a plain-JAX baseline of the same shapes and other attention settings; on CPU a
per-op-kind profile of one step, and every matmul of the step timed alone (the matmul-only
ceiling). For Gated DeltaNet and Mamba-2, timed round-robin with the step: other chunk lengths
and the steps of the cases their MFU targets compare them with (the Expectations table); on CPU
the profile of the step. Writes mfu.{json,md,png}; docs/performance.md explains the figures.
--quick only shows every figure is produced.
"""

import collections
import functools
import glob
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bench import harness
from configs import diffusion, lm, swin, vit
from train import flops, image_data, models
from train import program as program_lib

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


@functools.cache
def imagenet_shaped_data() -> str:
  """An 'arrayrecord' image dataset of ImageNet's shape (224x224x3, 1,000 classes), 8 random
  images per split, in a temporary folder: the full-size classifier cases validate against it
  (the timed batches are random arrays of the same shape)."""
  path = tempfile.mkdtemp(prefix="odyssey_mfu_images_")
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    image_data.write_arrayrecord(path, split, rng.standard_normal((8, 224, 224, 3)),
                                 rng.integers(0, 1000, 8), num_classes=1000)
  return path


def _full_size_classifier(c):
  c.model.update(image_size=224, channels=3, num_classes=1000)
  c.data.update(name="arrayrecord", path=imagenet_shaped_data(), image_size=0)
  c.eval.batch_size = 8


def vit_config(quick: bool):
  c = vit.get_config("variant=digits" if quick else "variant=S/16")
  if not quick:  # ViT-S/16 at 224x224x3: 196 tokens
    _full_size_classifier(c)
  c.train.update(batch_size=2 if quick else 8)
  return c


def swin_config(quick: bool):
  c = swin.get_config("variant=digits" if quick else "variant=T")
  if not quick:  # Swin-T at 224x224x3: 56x56 patches in 7x7 windows, 3 mergings
    _full_size_classifier(c)
  c.train.update(batch_size=2 if quick else 8)
  return c


# The linear-recurrent LMs (nets/linear_rnn.py) at the Llama's shape: d_model 512, seq 512,
# batch 8, 4 layers. Gated DeltaNet: 8 heads with K = V = 64 and the Llama's SwiGLU 1408;
# Mamba-2: 16 heads of 64 (inner width 2 x d_model), one B/C group with state 128, no MLP.
GDN = dict(mixer="gated_deltanet", num_layers=4, d_model=512, linear_heads=8, linear_k_heads=8,
           linear_k_dim=64, linear_v_dim=64, mlp_dim=1408, chunk=64)
GDN_QUICK = dict(mixer="gated_deltanet", num_layers=2, d_model=64, linear_heads=4,
                 linear_k_heads=4, linear_k_dim=16, linear_v_dim=16, mlp_dim=128, chunk=16)
MAMBA2 = dict(mixer="mamba2", num_layers=4, d_model=512, linear_heads=16, linear_k_heads=1,
              linear_k_dim=128, linear_v_dim=64, mlp_dim=0, chunk=64, norm_eps=1e-5,
              residual_in_fp32=True)
MAMBA2_QUICK = dict(MAMBA2, num_layers=2, d_model=64, linear_heads=4, linear_k_dim=16,
                    linear_v_dim=32, chunk=16)


def linear_rnn_config(model: dict, quick: bool):
  c = lm.get_config("size=test")
  c.model = ml_collections.ConfigDict(dict(
      name="linear_rnn", vocab_size=384, conv_size=4, max_len=512, tie_embeddings=False,
      dtype="float32", param_dtype="float32", **model))
  c.train.update(batch_size=2 if quick else 8, seq_len=64 if quick else 512)
  return c


CASES = {"llama": llama_config, "dit": dit_config, "vit": vit_config, "swin": swin_config,
         "mamba": mamba_config,
         "gated_deltanet": lambda quick: linear_rnn_config(GDN_QUICK if quick else GDN, quick),
         "mamba2": lambda quick: linear_rnn_config(MAMBA2_QUICK if quick else MAMBA2, quick)}


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


# Odyssey's Llama step with other attention settings, timed round-robin with the default one: a
# blockwise kernel with blocks smaller than the sequence, and the dense masked kernel.
LLAMA_VARIANTS = {"blockwise, block 256": dict(attention="blockwise", block_size=256),
                  "blockwise, block 128": dict(attention="blockwise", block_size=128),
                  "dense": dict(attention="dense")}
LLAMA_VARIANTS_QUICK = {"blockwise, block 32": dict(attention="blockwise", block_size=32)}


# The linear-recurrent steps with other settings, timed round-robin with the default one: other
# chunk lengths.
LINEAR_VARIANTS = {
    "gated_deltanet": {"chunk 32": dict(chunk=32), "chunk 128": dict(chunk=128)},
    "mamba2": {"chunk 32": dict(chunk=32), "chunk 128": dict(chunk=128)}}
LINEAR_VARIANTS_QUICK = {"gated_deltanet": {"chunk 32": dict(chunk=32)}, "mamba2": {}}


def time_round_robin(runs: dict, batch, steps_timed: int, between=None) -> dict:
  """name: (median seconds, step times, state) of each ``name: (step, state)``, timed one step
  of each in turn after two warm-up steps each; ``between()`` runs after every round."""
  calls = {name: harness.stepper(step, state, batch) for name, (step, state) in runs.items()}
  times = harness.round_robin(calls, steps_timed, warmup=2, rotate=True, between=between)
  return {name: (statistics.median(t), t, calls[name].state) for name, t in times.items()}


def odyssey_step(config):
  """odyssey's compiled train step on one device, its initial state and a batch."""
  program = program_lib.build(config, devices=jax.devices()[:1])
  batch = random_batch(config, program.plan.model_cfg, np.random.default_rng(0))
  state = program.init()
  compiled = program.train_step.lower(state, batch).compile()
  return compiled, state, batch, program.attention


@functools.lru_cache(maxsize=None)
def _case_step(name: str, quick: bool, chunk: int | None) -> tuple:
  config = CASES[name](quick)
  if chunk is not None:
    config.model.chunk = chunk
  return odyssey_step(config)  # its state is never stepped: ``case_step`` hands out copies


def case_step(name: str, quick: bool, chunk: int | None = None):
  """``odyssey_step`` of a case (at another chunk length), compiled once per process: a case
  timed again, as another case's reference or variant, reuses the executable and gets a copy of
  the initial state (the step donates it)."""
  compiled, state, batch, plan = _case_step(name, quick, chunk)
  return compiled, jax.tree.map(jnp.copy, state), batch, plan


# ----------------------------------------------------------------------------- plain-JAX baseline


def _normal(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> jax.Array:
  """Standard-normal values drawn on the host: ``jax.random.normal`` compiles a program per
  shape (16 of them cost the quick bench about 6 s of compile time)."""
  return jnp.asarray((scale * rng.standard_normal(shape, np.float32)).astype(jnp.dtype(dtype)))


def baseline_params(c, rng: np.random.Generator):
  """Llama weights as a dict of plain arrays, layers stacked on axis 0 (scanned like odyssey)."""
  L, E, M, V = c["num_layers"], c["d_model"], c["mlp_dim"], 384
  w = lambda shape: _normal(rng, shape, jnp.float32, 0.02)
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
  params = baseline_params(c, np.random.default_rng(0))
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

KINDS = ("matmul", "layout copies", "elementwise / reduction fusions",
         "scan slicing (dynamic-slice / update-slice)", "triangular solves (LAPACK custom calls)",
         "other (broadcasts, iota, waits in ops)")


def op_kind(name: str) -> str:
  """XLA:CPU thunk names -> what they do (matmuls are XNNPACK "ynn" fusions or dot thunks)."""
  if name.startswith("ynn_fusion") or name.startswith("dot") or "_dot" in name:
    return KINDS[0]
  if name.startswith(("copy", "transpose")) or "transpose" in name:
    return KINDS[1]
  if "dynamic-slice" in name or "dynamic-update-slice" in name:
    return KINDS[3]
  if "fusion" in name:
    return KINDS[2]
  if name.startswith(("triangular_solve", "custom-call", "custom_call")):
    return KINDS[4]
  return KINDS[5]


def profile(step, state, batch, workdir: str) -> dict:
  """Exclusive thread time per op kind over one step, from a jax.profiler trace.

  XLA:CPU records one event per thunk execution on the thread that runs it (a matmul's helper
  threads record none), and nests events: a ``while`` thunk's event contains its body's ops and
  ``ThunkExecutor::Execute`` wraps whole sequences, so each event is counted less the events
  nested in it on the same thread (exclusive time) and executor wrappers are left out. Also
  returns the wall time of the traced step and how much of it some op was running (the union of
  op intervals over threads): the rest is time between ops.
  """
  jax.profiler.start_trace(workdir)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True),
                key=os.path.getmtime)[-1]
  exclusive, intervals = collections.Counter(), []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      events = sorted((e.start_ns, -e.duration_ns, e.name) for e in line.events
                      if not e.name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor")))
      stack = []  # open events: [end_ns, name, duration_ns, nested_ns]
      for start_ns, minus_duration, name in events:
        while stack and stack[-1][0] <= start_ns:
          end_ns, done, duration, nested = stack.pop()
          exclusive[done] += (duration - nested) / 1e9
        if stack:
          stack[-1][3] += -minus_duration
        stack.append([start_ns - minus_duration, name, -minus_duration, 0])
        intervals.append((start_ns, start_ns - minus_duration))
      for end_ns, done, duration, nested in stack:
        exclusive[done] += (duration - nested) / 1e9
  busy, reach = 0, None
  for lo, hi in sorted(intervals):  # union of the op intervals over threads
    if reach is None or lo > reach:
      busy, reach = busy + hi - lo, hi
    elif hi > reach:
      busy, reach = busy + hi - reach, hi
  seconds = collections.Counter({kind: 0.0 for kind in KINDS})
  for name, s in exclusive.items():
    seconds[op_kind(name)] += s
  total = sum(seconds.values())
  return {"thread_s": total, "step_wall_s": wall, "ops_running_s": busy / 1e9,
          "kinds_s": dict(seconds), "kinds": {k: v / total for k, v in seconds.items()},
          "top_non_matmul": [(n, s) for n, s in exclusive.most_common(60)
                             if op_kind(n) != KINDS[0]][:8]}


# ----------------------------------------------------------------------------- matmul ceiling


def llama_matmuls(cfg, batch: int, seq: int, recompute_scores: bool) -> list[dict]:
  """Every matmul of one Llama train step, with the operand layouts its backward uses.

  Per layer, for the q, k, v, o, gate, up and down projections and attention's scores (q·kᵀ)
  and weighted values (p·v, at the full S² of a masked kernel): the forward matmul and its two
  backward ones, the input gradient and the weight (or other operand's) gradient, as JAX's
  transpose rules write them (dW = einsum("bsi,bso->io")). The head runs once. The blockwise
  kernel's backward recomputes the scores (``recompute_scores``), a seventh S² matmul.
  """
  L, E, H, K, D, M = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_size, cfg.mlp_dim)
  B, S = batch, seq
  out = []

  def add(name, spec, a, b, times):
    out.append({"name": name, "einsum": spec, "lhs": a, "rhs": b, "times": times})

  def projection(name, n_in, n_out, times):
    add(f"{name}", "bsi,io->bso", (B, S, n_in), (n_in, n_out), times)
    add(f"{name}: input grad", "bso,io->bsi", (B, S, n_out), (n_in, n_out), times)
    add(f"{name}: weight grad", "bsi,bso->io", (B, S, n_in), (B, S, n_out), times)

  for name, n_in, n_out in (("q", E, H * D), ("k", E, K * D), ("v", E, K * D), ("o", H * D, E),
                            ("gate", E, M), ("up", E, M), ("down", M, E)):
    projection(name, n_in, n_out, L)
  qkv, probs = (B, S, H, D), (B, H, S, S)  # queries' heads; GQA's shared K/V cost the same
  add("scores q·kᵀ", "bshd,bthd->bhst", qkv, qkv, L)
  add("scores: dq", "bhst,bthd->bshd", probs, qkv, L)
  add("scores: dk", "bhst,bshd->bthd", probs, qkv, L)
  add("values p·v", "bhst,bthd->bshd", probs, qkv, L)
  add("values: dp", "bshd,bthd->bhst", qkv, qkv, L)
  add("values: dv", "bhst,bshd->bthd", probs, qkv, L)
  if recompute_scores:
    add("scores recomputed (blockwise backward)", "bshd,bthd->bhst", qkv, qkv, L)
  projection("head", E, cfg.vocab_size, 1)
  return out


def _dims(spec: str, a, b):
  lhs, rest = spec.split(",")
  rhs, res = rest.split("->")
  size = dict(zip(lhs, a)) | dict(zip(rhs, b))
  prod = lambda letters: math.prod(size[c] for c in letters)
  batch = prod(c for c in lhs if c in rhs and c in res)
  contract = prod(c for c in lhs if c in rhs and c not in res)
  return batch, prod(c for c in lhs if c not in rhs), contract, prod(c for c in rhs if c not in lhs)


def _einsum_run(spec: str, a_shape, b_shape, dtype):
  """A compiled, warmed-up einsum on operands laid out as given: call it to run it once."""
  rng = np.random.default_rng(0)
  a, b = _normal(rng, a_shape, dtype), _normal(rng, b_shape, dtype)
  fn = jax.jit(functools.partial(jnp.einsum, spec))
  fn(a, b).block_until_ready()
  return lambda: fn(a, b).block_until_ready()


def matmul_ceiling(matmuls: list[dict], dtype: str, repeats: int) -> dict:
  """Times every matmul alone, twice: in the step's operand layouts, and as the plain
  [G,] M×K · K×N product of the same sizes (no layout to fix). Their sums, each weighted by how
  often the step runs it, are the step's matmul-only time. Best of ``repeats`` runs, as for the
  peak (the median is kept too); the runs are spread out, one pass over all of them per repeat,
  so a burst of load from another process does not hit every run of one matmul."""
  keys = []  # the same einsum on the same shapes (q, k and v; gate and up) is timed once
  for m in matmuls:
    G, Mm, Kk, N = _dims(m["einsum"], m["lhs"], m["rhs"])
    plain = (("mk,kn->mn", (Mm, Kk), (Kk, N)) if G == 1 else
             ("gmk,gkn->gmn", (G, Mm, Kk), (G, Kk, N)))
    keys.append(((m["einsum"], m["lhs"], m["rhs"]), plain, 2 * G * Mm * Kk * N))
  runs = {}
  for key in [k for layout, plain, _ in keys for k in (layout, plain)]:
    if key not in runs:
      runs[key] = _einsum_run(*key, dtype)
  times = {key: [] for key in runs}
  for _ in range(repeats):
    for key, run in runs.items():
      start = time.perf_counter()
      run()
      times[key].append(time.perf_counter() - start)
  rows = [dict(m, flops=flops_, s=min(times[layout]), median_s=statistics.median(times[layout]),
               plain_s=min(times[plain])) for m, (layout, plain, flops_) in zip(matmuls, keys)]
  total = lambda key: sum(r[key] * r["times"] for r in rows)
  attention = [r for r in rows if r["name"].startswith(("scores", "values"))]
  return {"matmuls": rows, "flops": total("flops"), "matmul_only_s": total("s"),
          "matmul_only_median_s": total("median_s"), "plain_layout_s": total("plain_s"),
          "attention_s": sum(r["s"] * r["times"] for r in attention)}


def ceiling_figures(ceiling: dict, model_flops: float, peak_flops: float,
                    target: float = 0.6) -> dict:
  """The MFU the step would have if it ran only its matmuls, as timed alone; and the time the
  ``target`` MFU leaves for everything else."""
  t, half_attention = ceiling["matmul_only_s"], ceiling["matmul_only_s"] - ceiling[
      "attention_s"] / 2
  step_at_target = model_flops / (target * peak_flops)
  return {"ceiling_mfu": flops.mfu(model_flops, t, peak_flops),
          "ceiling_mfu_plain_layout": flops.mfu(model_flops, ceiling["plain_layout_s"], peak_flops),
          "ceiling_mfu_causal_skip": flops.mfu(model_flops, half_attention, peak_flops),
          "matmul_rate_of_peak": ceiling["flops"] / t / peak_flops,
          "target_mfu": target, "step_s_at_target": step_at_target,
          "non_matmul_s_at_target": step_at_target - t}


def fastest_matmul(rows: list[dict]) -> float:
  """The best FLOP/s of any matmul timed alone for a ceiling (0 if none was)."""
  return max((m["flops"] / m["s"] for r in rows if "ceiling" in r
              for m in r["ceiling"]["matmuls"]), default=0.0)


# ----------------------------------------------------------------------------- the run


def peak(dtype: str, quick: bool, repeats: int | None = None) -> float:
  """The best rate of square matmuls of a few sizes in ``dtype``, measured now (``_measure``
  caches per process; its undecorated function is called so that every sample is new)."""
  best = 0.0
  for size in ((256, 512) if quick else (1024, 2048)):
    best = max(best, flops._measure.__wrapped__(dtype, size, jax.devices()[0],
                                                repeats=repeats or (3 if quick else 5)))
  return best


# The linear-recurrent families' MFU targets: (case, reference case, factor): MFU(case) >=
# factor x MFU(reference).
TARGETS = (("gated_deltanet", "llama", 1.0), ("mamba2", "llama", 1.0), ("mamba2", "mamba", 3.0))


def run_case(name: str, quick: bool, steps_timed: int, profile_dir: str, between=None,
             cases: tuple = ()) -> dict:
  """One case's figures; the MFUs are filled in by ``set_mfus`` once the peak is known.
  ``cases``: every case of the run (a linear-recurrent case is timed with its targets'
  references among them)."""
  if name == "llama":
    return run_llama(quick, steps_timed, profile_dir, between)
  if name in LINEAR_VARIANTS:
    references = [ref for case, ref, _ in TARGETS if case == name and ref in cases]
    return run_linear(name, quick, steps_timed, profile_dir, between, references)
  config = CASES[name](quick)
  step_flops = flops.model_flops_per_step(config)
  compiled, state, batch, plan = case_step(name, quick)
  median, times, _ = time_round_robin({name: (compiled, state)}, batch, steps_timed,
                                      between)[name]
  return {"case": name, "dtype": config.model.dtype, "model_flops_per_step": step_flops.model,
          f"{step_flops.unit}_per_step": step_flops.units, "attention": plan.describe(),
          "step_s": median, "step_times_s": times, "model_flops_per_s": step_flops.model / median}


def run_llama(quick: bool, steps_timed: int, profile_dir: str, between=None) -> dict:
  """The Llama step, round-robin with its attention variants and the plain-JAX baseline; then
  (CPU) the profiles of odyssey's and the baseline's steps and the matmul-only ceiling."""
  config = llama_config(quick)
  step_flops = flops.model_flops_per_step(config)
  compiled, state, batch, plan = case_step("llama", quick)
  runs, plans = {"odyssey": (compiled, state)}, {}
  for variant, overrides in (LLAMA_VARIANTS_QUICK if quick else LLAMA_VARIANTS).items():
    variant_config = llama_config(quick)
    variant_config.parallel.update(**overrides)
    variant_step, variant_state, _, plans[variant] = odyssey_step(variant_config)
    runs[variant] = (variant_step, variant_state)
  runs["baseline"] = baseline_step(config, batch)
  timed = time_round_robin(runs, batch, steps_timed, between)
  median, times, state = timed["odyssey"]
  row = {"case": "llama", "dtype": config.model.dtype, "model_flops_per_step": step_flops.model,
         "executed_flops_per_step": step_flops.executed,
         f"{step_flops.unit}_per_step": step_flops.units, "attention": plan.describe(),
         "kernel": plan.kernel, "block_size": plan.block_size, "step_s": median,
         "step_times_s": times,
         "model_flops_per_s": step_flops.model / median,
         "baseline_step_s": timed["baseline"][0], "baseline_step_times_s": timed["baseline"][1],
         "speed_vs_baseline": harness.paired_ratio(timed["baseline"][1], times),
         "variants": [{"variant": v, "attention": plans[v].describe(),
                       "kernel": plans[v].kernel, "block_size": plans[v].block_size,
                       "step_s": timed[v][0], "step_times_s": timed[v][1],
                       "speed_vs_default": harness.paired_ratio(times, timed[v][1])}
                      for v in plans]}
  if jax.devices()[0].platform == "cpu":
    row["profile"] = profile(compiled, state, batch, tempfile.mkdtemp(dir=profile_dir))
    row["baseline_profile"] = profile(runs["baseline"][0], timed["baseline"][2], batch,
                                      tempfile.mkdtemp(dir=profile_dir))
  del runs, timed, state
  matmuls = llama_matmuls(models.model_config(config), config.train.batch_size,
                          config.train.seq_len, recompute_scores=plan.kernel == "blockwise")
  ceiling = matmul_ceiling(matmuls, config.model.dtype, repeats=2 if quick else 7)
  recomputed = [m for m in ceiling["matmuls"] if m["name"].startswith("scores recomputed")]
  # Matmul FLOPs each step executes: the dense masked set (the baseline), + the recompute.
  ceiling["odyssey_matmul_flops"] = ceiling["flops"]
  ceiling["baseline_matmul_flops"] = ceiling["flops"] - sum(m["flops"] * m["times"]
                                                            for m in recomputed)
  ceiling["baseline_matmul_only_s"] = ceiling["matmul_only_s"] - sum(m["s"] * m["times"]
                                                                     for m in recomputed)
  row["ceiling"] = ceiling
  return row


def run_linear(name: str, quick: bool, steps_timed: int, profile_dir: str, between=None,
               references: list[str] = ()) -> dict:
  """A linear-recurrent step, round-robin with its variants (other chunk lengths) and with the
  ``references`` its targets compare it with (their steps again, so that the ratio of MFUs is
  paired round by round: cases timed one after the other see different loads from other
  processes); on CPU the profile of the step."""
  config = CASES[name](quick)
  step_flops = flops.model_flops_per_step(config)
  compiled, state, batch, plan = case_step(name, quick)
  runs, variants = {"default": (compiled, state)}, []
  for variant, overrides in (LINEAR_VARIANTS_QUICK if quick else LINEAR_VARIANTS)[name].items():
    variant_config = CASES[name](quick)
    variant_config.model.chunk = overrides.get("chunk", config.model.chunk)
    variant_step, variant_state, _, _ = case_step(name, quick, overrides.get("chunk"))
    runs[variant] = (variant_step, variant_state)
    variants.append({"variant": variant, "chunk": variant_config.model.chunk,
                     "model_flops_per_step": flops.model_flops_per_step(variant_config).model})
  refs = []
  for ref in references:  # the same batch shapes: B x S tokens
    ref_config = CASES[ref](quick)
    ref_step, ref_state, _, _ = case_step(ref, quick)
    runs[f"reference: {ref}"] = (ref_step, ref_state)
    refs.append({"case": ref, "model_flops_per_step": flops.model_flops_per_step(ref_config).model})
  timed = time_round_robin(runs, batch, steps_timed, between)
  median, times, state = timed["default"]
  for v in variants:
    v.update(step_s=timed[v["variant"]][0], step_times_s=timed[v["variant"]][1],
             speed_vs_default=harness.paired_ratio(times, timed[v["variant"]][1]))
  for r in refs:
    ref_median, ref_times, _ = timed[f"reference: {r['case']}"]
    # MFU(case) / MFU(reference) = (F_case / F_ref) x (t_ref / t_case), paired by round.
    r.update(step_s=ref_median, step_times_s=ref_times,
             mfu_ratio=step_flops.model / r["model_flops_per_step"]
             * harness.paired_ratio(ref_times, times))
  row = {"case": name, "dtype": config.model.dtype, "model_flops_per_step": step_flops.model,
         "executed_flops_per_step": step_flops.executed,
         f"{step_flops.unit}_per_step": step_flops.units, "attention": plan.describe(),
         "chunk": config.model.chunk, "step_s": median,
         "step_times_s": times, "model_flops_per_s": step_flops.model / median,
         "variants": variants, "references": refs}
  if jax.devices()[0].platform == "cpu":
    row["profile"] = profile(compiled, state, batch, tempfile.mkdtemp(dir=profile_dir))
  return row


def set_mfus(row: dict, peak_flops: float) -> None:
  """Every MFU and rate of ``row`` against ``peak_flops`` (in place)."""
  model = row["model_flops_per_step"]
  row["mfu"] = flops.mfu(model, row["step_s"], peak_flops)
  if "baseline_step_s" in row:
    row["baseline_mfu"] = flops.mfu(model, row["baseline_step_s"], peak_flops)
  for variant in row.get("variants", []):  # a chunk length changes the FLOPs counted
    variant["mfu"] = flops.mfu(variant.get("model_flops_per_step", model), variant["step_s"],
                               peak_flops)
  for ref in row.get("references", []):
    ref["mfu"] = flops.mfu(ref["model_flops_per_step"], ref["step_s"], peak_flops)
  if "ceiling" in row:
    ceiling = row["ceiling"]
    ceiling.update(ceiling_figures(ceiling, model, peak_flops))
    for which, key in (("profile", "odyssey_matmul_flops"),
                       ("baseline_profile", "baseline_matmul_flops")):
      if which in row:  # the matmuls' rate inside the traced step
        matmul_s = row[which]["kinds_s"][KINDS[0]]
        row[which]["matmul_flops_per_s"] = ceiling[key] / matmul_s
        row[which]["matmul_rate_of_peak"] = ceiling[key] / matmul_s / peak_flops


def run(args) -> dict:
  if jax.devices()[0].platform == "cpu" and jax.device_count() != 1:
    sys.exit("bench.mfu measures one device: run it without "
             "--xla_force_host_platform_device_count in XLA_FLAGS.")
  steps_timed = args.steps or (2 if args.quick else 7)
  device = jax.devices()[0]
  dtype = "float32"
  load_before = os.getloadavg()[0]  # other processes' load: how noisy the absolute times are
  before = peak(dtype, args.quick)
  during = []
  sample = lambda: during.append(peak(dtype, args.quick, repeats=1))
  cases = tuple(args.cases.split(","))
  # The profiler traces (tens of MB per run) are read into the rows, then removed.
  with tempfile.TemporaryDirectory(prefix="odyssey_mfu_profile_") as profile_dir:
    rows = [run_case(name, args.quick, steps_timed, profile_dir, sample, cases) for name in cases]
  after = peak(dtype, args.quick)
  best = max(before, after, *during, fastest_matmul(rows))
  for row in rows:  # every MFU against the best of the peak measurements
    set_mfus(row, best)
  return {"bench": "mfu", "quick": args.quick, "backend": device.platform,
          "device_kind": device.device_kind, "machine": platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "dtype": dtype,
          "peak_flops": best, "peak_flops_before": before, "peak_flops_after": after,
          "peak_flops_during": during, "fastest_step_matmul_flops": fastest_matmul(rows),
          "load_average_1min": [load_before, os.getloadavg()[0]], "rows": rows,
          "checks": targets(rows)}



def targets(rows: list[dict]) -> list[dict]:
  """Each target whose two cases ran, judged on the MFU ratio paired round by round with the
  reference's step; the MFUs of the cases' own runs and the best variant's are given too."""
  by_case, out = {r["case"]: r for r in rows}, []
  for case, reference, factor in TARGETS:
    if case not in by_case or reference not in by_case:
      continue
    row = by_case[case]
    paired = next(r for r in row["references"] if r["case"] == reference)
    best = max(row["variants"], key=lambda v: v["mfu"], default=None)
    detail = (f"MFU ratio {paired['mfu_ratio']:.2f} (paired, same rounds); on their own runs "
              f"{row['mfu']:.3f} vs {by_case[reference]['mfu']:.3f}")
    if best is not None:
      detail += f"; best variant ({best['variant']}) {best['mfu']:.3f}"
    out.append(dict(name=f"{case} MFU ≥ {'' if factor == 1 else f'{factor:g} x '}{reference} MFU",
                    holds=paired["mfu_ratio"] >= factor, detail=detail))
  return out


def _header(doc: dict) -> str:
  during, load = doc["peak_flops_during"], doc["load_average_1min"]
  return (f"MFU on {doc['device_kind']} ({doc['backend']}, {doc['cpu_count']} cores), peak "
          f"{doc['peak_flops'] / 1e9:.1f} GFLOP/s ({doc.get('dtype', 'float32')} matmul: the best "
          f"of {doc['peak_flops_before'] / 1e9:.1f} before, {len(during)} samples during the "
          f"cases from {min(during, default=0) / 1e9:.1f} to {max(during, default=0) / 1e9:.1f}, "
          f"{doc['peak_flops_after'] / 1e9:.1f} after"
          + (f", and {doc['fastest_step_matmul_flops'] / 1e9:.1f} for the fastest of the Llama's "
             "matmuls timed alone" if doc["fastest_step_matmul_flops"] else "")
          + f"); 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after")


def _variants(r: dict) -> list[str]:
  rows = [[f"{r['kernel']} (default)", r["block_size"], f"{r['step_s']:.3f}", f"{r['mfu']:.3f}",
           "1.00x"]]
  rows += [[v["kernel"], v["block_size"] if v["kernel"] != "dense" else "", f"{v['step_s']:.3f}",
            f"{v['mfu']:.3f}", f"{v['speed_vs_default']:.2f}x"] for v in r["variants"]]
  return ["", f"The {r['case']} step with other attention settings, timed round-robin (speed: "
          "median over rounds of default time / variant time):", "",
          harness.table(["attention kernel", "block", "step (s)", "MFU", "speed vs default"],
                        rows)]


def _linear_variants(r: dict) -> list[str]:
  rows = [[f"default (chunk {r['chunk']})", r["chunk"], f"{r['step_s']:.3f}", f"{r['mfu']:.3f}",
           "1.00x"]]
  rows += [[v["variant"], v["chunk"], f"{v['step_s']:.3f}", f"{v['mfu']:.3f}",
            f"{v['speed_vs_default']:.2f}x"] for v in r["variants"]]
  out = ["", f"The {r['case']} step with other chunk lengths, timed round-robin (speed: median "
         "over rounds of default time / variant time; each MFU against the FLOPs its chunk "
         "length counts):", "",
         harness.table(["variant", "chunk", "step (s)", "MFU", "speed vs default"], rows)]
  if r.get("references"):
    rows = [[ref["case"], f"{ref['step_s']:.3f}", f"{ref['mfu']:.3f}",
             f"{ref['mfu_ratio']:.2f}"] for ref in r["references"]]
    out += ["", f"The reference steps timed in the same rounds as the {r['case']} step (ratio: "
            "median over rounds of the two MFUs' ratio):", "",
            harness.table(["reference", "step (s)", "MFU in these rounds",
                           f"MFU {r['case']} / reference"], rows)]
  return out


def _linear_profiles(r: dict) -> list[str]:
  profiles = [("default", r["profile"])]
  rows = [[k] + [f"{p['kinds'][k]:.1%} ({p['kinds_s'][k]:.2f} s)" for _, p in profiles]
          for k in KINDS]
  rows += [["op time / traced step wall time"] + [f"{p['thread_s']:.2f} s / "
                                                  f"{p['step_wall_s']:.2f} s"
                                                  for _, p in profiles],
           ["wall time with an op running"] + [f"{p['ops_running_s'] / p['step_wall_s']:.1%}"
                                               for _, p in profiles]]
  out = ["", f"Where the {r['case']} step's time goes: one traced step each (jax.profiler, "
         "XLA:CPU thunks, exclusive time):", "",
         harness.table(["op kind"] + [who for who, _ in profiles], rows)]
  for who, p in profiles:
    out += ["", f"Largest non-matmul ops ({who}): "
            + ", ".join(f"{n} {s:.2f} s" for n, s in p["top_non_matmul"])]
  return out


def _ceiling(r: dict, peak_flops: float) -> list[str]:
  c = r["ceiling"]
  rows = [[m["name"], f"`{m['einsum']}`", "×".join(map(str, _dims(m["einsum"], m["lhs"],
                                                                  m["rhs"]))),
           m["times"], f"{m['flops'] * m['times'] / 1e9:.2f}", f"{m['s'] * m['times']:.3f}",
           f"{m['flops'] / m['s'] / 1e9:.1f}", f"{m['flops'] / m['s'] / peak_flops:.2f}",
           f"{m['flops'] / m['plain_s'] / 1e9:.1f}"] for m in c["matmuls"]]
  figures = [
      ["matmul FLOPs per step (executed)", f"{c['flops'] / 1e9:.1f} GFLOP (baseline: "
       f"{c['baseline_matmul_flops'] / 1e9:.1f}; model: {r['model_flops_per_step'] / 1e9:.1f}, "
       "causal attention counted as half)"],
      ["matmul-only time (step layouts)", f"{c['matmul_only_s']:.3f} s (median of runs: "
       f"{c['matmul_only_median_s']:.3f} s)"],
      ["matmul-only time (plain layouts)", f"{c['plain_layout_s']:.3f} s"],
      ["matmul rate at these shapes", f"{c['matmul_rate_of_peak']:.2f} of peak"],
      ["ceiling MFU (model FLOPs / matmul-only time / peak)", f"{c['ceiling_mfu']:.3f}"],
      ["ceiling MFU, plain layouts", f"{c['ceiling_mfu_plain_layout']:.3f}"],
      ["ceiling MFU, causal blocks skipped (S² matmuls halved)",
       f"{c['ceiling_mfu_causal_skip']:.3f}"],
      [f"step time at MFU {c['target_mfu']}", f"{c['step_s_at_target']:.3f} s, which leaves "
       f"{c['non_matmul_s_at_target']:.3f} s for everything but the matmuls"],
      ["measured MFU: odyssey / baseline", f"{r['mfu']:.3f} / {r['baseline_mfu']:.3f}"]]
  return ["", f"Every matmul of the {r['case']} step timed alone (best of the timed runs), in the "
          "step's operand layouts and as a plain [G,] M×K·K×N product; per step (× times run):",
          "", harness.table(["matmul", "einsum", "G×M×K×N", "× per step", "GFLOP", "s",
                             "GFLOP/s", "of peak", "plain-layout GFLOP/s"], rows),
          "", harness.table(["matmul-only figure", "value"], figures)]


def _profiles(r: dict) -> list[str]:
  profiles = [("odyssey", r["profile"]), ("baseline", r["baseline_profile"])]
  alone = [r["ceiling"]["matmul_only_s"], r["ceiling"]["baseline_matmul_only_s"]]
  rows = [[k] + [f"{p['kinds'][k]:.1%} ({p['kinds_s'][k]:.2f} s)" for _, p in profiles]
          for k in KINDS]
  rows += [
      ["matmul time in the step / timed alone"] + [
          f"{p['kinds_s'][KINDS[0]]:.2f} s / {t:.2f} s" for (_, p), t in zip(profiles, alone)],
      ["matmul rate inside the step"] + [f"{p['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
                                         f"({p['matmul_rate_of_peak']:.2f} of peak)"
                                         for _, p in profiles],
      ["op time / traced step wall time"] + [f"{p['thread_s']:.2f} s / {p['step_wall_s']:.2f} s"
                                             for _, p in profiles],
      ["wall time with an op running"] + [f"{p['ops_running_s'] / p['step_wall_s']:.1%}"
                                          for _, p in profiles]]
  out = ["", f"Where the {r['case']} step's time goes: one traced step each (jax.profiler, "
         "XLA:CPU thunks, exclusive time):", "",
         harness.table(["op kind", "odyssey", "plain-JAX baseline"], rows)]
  for who, p in profiles:
    out += ["", f"Largest non-matmul ops ({who}): "
            + ", ".join(f"{n} {s:.2f} s" for n, s in p["top_non_matmul"])]
  return out


def markdown(doc: dict) -> str:
  rows = [[r["case"], f"{r['model_flops_per_step'] / 1e9:.2f}", f"{r['step_s']:.3f}",
           f"{r['model_flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.3f}",
           f"{r['baseline_step_s']:.3f}" if "baseline_step_s" in r else "",
           f"{r['baseline_mfu']:.3f}" if "baseline_mfu" in r else "",
           f"{r['speed_vs_baseline']:.2f}x" if "speed_vs_baseline" in r else ""]
          for r in doc["rows"]]
  out = [_header(doc), "", harness.table(
      ["case", "model GFLOP/step", "step (s)", "model GFLOP/s", "MFU", "baseline step (s)",
       "baseline MFU", "odyssey / baseline speed"], rows)]
  for r in doc["rows"]:
    if "ceiling" in r:
      out += _variants(r) + _ceiling(r, doc["peak_flops"])
    elif "variants" in r:
      out += _linear_variants(r)
    if "baseline_profile" in r:
      out += _profiles(r)
    elif "profile" in r:
      out += _linear_profiles(r)
  if doc.get("checks"):
    out += ["", harness.expectations(doc["checks"]).rstrip()]
  return "\n".join(out) + "\n"


def plot(doc: dict, plt):
  """MFU per case, with the Llama's baseline and matmul-only ceiling and the linear-recurrent
  steps' variants."""
  rows = doc["rows"]
  fig, ax = plt.subplots(figsize=(7.5, 3.4))
  ax.bar([r["case"] for r in rows], [r["mfu"] for r in rows], color="tab:blue", label="odyssey")
  for i, r in enumerate(rows):
    if "baseline_mfu" in r:
      ax.bar([i + 0.3], [r["baseline_mfu"]], width=0.3, color="tab:gray", label="plain-JAX baseline")
    if "ceiling" not in r and r.get("variants"):
      ax.plot([i + 0.25] * len(r["variants"]), [v["mfu"] for v in r["variants"]], "o",
              color="tab:orange", markersize=3, label="other chunk lengths")
    if "ceiling" in r:
      ax.hlines(r["ceiling"]["ceiling_mfu"], i - 0.4, i + 0.45, color="tab:red",
                label="matmul-only ceiling (Llama)")
  ax.axhline(0.6, color="black", linestyle=":", linewidth=1, label="CPU target (Llama)")
  ax.set_ylabel("MFU")
  ax.set_ylim(0, 1)
  ax.set_title(f"MFU on {doc['backend']} ({doc['cpu_count']} cores), peak "
               f"{doc['peak_flops'] / 1e9:.1f} GFLOP/s ({doc.get('dtype', 'float32')} matmul)",
               fontsize=7)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))  # one legend entry per label
  ax.legend(unique.values(), unique.keys(), fontsize=7)
  ax.tick_params(axis="x", labelsize=7)
  return fig


def main(argv=None) -> dict:
  return harness.main("mfu", __doc__, run, markdown, plot, devices=None, argv=argv, flags=[
      ("--steps", dict(type=int, default=None, help="timed steps per case")),
      ("--cases", dict(default=",".join(CASES)))])


if __name__ == "__main__":
  main()
