"""Config validation: every check runs before anything is traced or compiled, one sentence each."""

import dataclasses
import os

import jax

from nets import moe as moe_lib
from nets import registry
from parallel import devices as parallel_devices
from parallel import mesh as parallel_mesh
from parallel import moe as parallel_moe
from parallel import sharding
from train import models, optimizer, tasks

GROUPS = ("task", "model", "data", "mesh", "parallel", "train", "opt", "ckpt", "log", "eval",
          "seed")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What validation resolved: the mesh sizes, the task, the model hyperparameters and the
  attention plan (train/program.py builds the run from it)."""
  mesh: dict[str, int]
  task: object  # train.tasks' object for config.task
  model_cfg: object
  attention: object  # parallel.attention.Plan


def validate(config, num_devices: int | None = None, process_count: int | None = None) -> Plan:
  """Raises ValueError with one clear sentence for the first problem found in ``config``."""
  missing = [g for g in GROUPS if g not in config]
  if missing:
    raise ValueError(f"config is missing the group(s) {missing}; see configs/lm.py for a "
                     "complete config.")
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  _check_seed(config.seed)
  optimizer.check(config.opt)
  task = tasks.get(config)
  family = registry.get(config.model.name)
  model_cfg = models.model_config(config)
  task.check(model_cfg)
  sizes = parallel_mesh.mesh_shape(config.mesh, num_devices)
  hosts = parallel_mesh.granules(jax.devices()) if num_devices == jax.device_count() else 1
  if hosts > 1:
    parallel_mesh.dcn_shape(config.mesh, sizes, hosts)

  t = config.train
  _positive(t.steps, "train.steps")
  _positive(t.batch_size, "train.batch_size")
  _positive(t.grad_accum, "train.grad_accum")
  _positive(t.max_bad_steps, "train.max_bad_steps")
  hang = t.get("hang_timeout_s", 600.0)
  if isinstance(hang, bool) or not isinstance(hang, (int, float)) or not 0 < hang < float("inf"):
    raise ValueError(f"config.train.hang_timeout_s={hang!r} must be a positive number of seconds "
                     "(how long a train step, eval or sample may make no progress).")
  _check_profile_steps(config.log.profile_steps)
  check_ema(t.ema, config.eval.weights)
  parallel_devices.check_remat_supported(t.remat, jax.devices())
  for name in ("log.every", "ckpt.every", "ckpt.keep", "eval.every", "eval.steps"):
    group, field = name.split(".")
    _positive(config[group][field], name)
  rules = sharding.rules_from_config(config.parallel)
  dp = sharding.data_parallel_size(sizes, rules)
  dp_name = sharding.axes_name(sharding.mesh_axes("act_batch", rules))
  if t.batch_size % dp:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                     f"{dp_name}={dp}; use a multiple of {dp}.")
  if t.batch_size % (dp * t.grad_accum):
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
                     f"{t.grad_accum} x the data-parallel size {dp}, so the micro-batches would "
                     f"not split evenly; use a multiple of {dp * t.grad_accum}.")
  if t.batch_size % process_count:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the {process_count} "
                     "processes, so the per-process batch would be uneven.")
  if config.eval.batch_size % dp:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                     f"data-parallel size {dp_name}={dp}; use a multiple of {dp}.")
  if sizes["seq"] > 1 and not family.sequence_parallel:
    raise ValueError(f"model '{config.model.name}' has no sequence-parallel implementation; use "
                     f"mesh.seq=1 (got {sizes['seq']}) and put those devices on mesh.data.")
  _divisible_by_axis(model_cfg, sizes, rules)
  if family.conditioning == "text" and model_cfg.text_encoder == "t5":  # its weights shard too
    _divisible_by_axis(model_cfg.t5, sizes, rules, "the T5 encoder's ",
                       (("d_ff", "mlp"),))
  moe_cfg = family.moe_config(model_cfg)
  _check_loop(config.parallel.loop, sizes, moe_cfg)
  if moe_cfg is not None or sizes["expert"] > 1:
    width = moe_cfg.hidden(model_cfg.mlp_width) if moe_cfg is not None else 0
    parallel_moe.check(moe_cfg or moe_lib.Config(), sizes, expert_width=width, rules=rules,
                       batch_sizes={"train.batch_size": t.batch_size,
                                    "eval.batch_size": config.eval.batch_size})
  attention = models.attention_plan(config, sizes, model_cfg)
  models.recurrence_plan(config, sizes, model_cfg)  # raises what state passing cannot split
  return Plan(mesh=sizes, task=task, model_cfg=model_cfg, attention=attention)


EMA_WARMUPS = ("none", "ratio", "power")
WEIGHTS = ("auto", "raw", "ema")


def check_ema(ema, weights):
  """train.ema (decay, warmup, power) and eval.weights, one sentence each."""
  decay = ema.decay
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
    raise ValueError(f"config.train.ema.decay={decay!r} must be a number in [0, 1) (0: no EMA of "
                     "the parameters; e.g. 0.999 averages over about the last 1000 updates).")
  if ema.warmup not in EMA_WARMUPS:
    raise ValueError(f"config.train.ema.warmup={ema.warmup!r} is not one of {EMA_WARMUPS}.")
  power = ema.power
  if (isinstance(power, bool) or not isinstance(power, (int, float))
      or not 0 < power < float("inf")):
    raise ValueError(f"config.train.ema.power={power!r} must be a positive number (the exponent "
                     "of the 'power' warm-up, e.g. 2/3 or 3/4).")
  if weights not in WEIGHTS:
    raise ValueError(f"config.eval.weights={weights!r} is not one of {WEIGHTS}.")
  if weights == "ema" and decay == 0:
    raise ValueError("config.eval.weights='ema' needs an EMA of the parameters, but "
                     "train.ema.decay is 0; set train.ema.decay (e.g. 0.999) or use "
                     "eval.weights='auto' or 'raw'.")


def use_ema(config) -> bool:
  """Whether evaluation and samples use the EMA (eval.weights, with "auto": diffusion with an
  EMA); the config is validated."""
  weights = config.eval.weights
  if weights == "auto":
    return config.task == "diffusion" and config.train.ema.decay > 0
  return weights == "ema"


LOOPS = ("mesh", "pmap")


def _check_loop(loop, sizes, moe_cfg):
  """parallel.loop: the pmap loop is pure data parallelism over every device."""
  if loop not in LOOPS:
    raise ValueError(f"config.parallel.loop={loop!r} is not one of {LOOPS}.")
  if loop != "pmap":
    return
  others = {a: n for a, n in sizes.items() if a != "data" and n > 1}
  if others:
    raise ValueError(f"parallel.loop='pmap' is data parallelism only, but config.mesh has "
                     f"{others}; set those axes to 1 (mesh.data=-1) or use parallel.loop='mesh'.")
  if moe_cfg is not None and moe_cfg.enabled:
    raise ValueError("parallel.loop='pmap' does not run MoE layers (their dispatch groups and "
                     "global balance loss need the mesh); use parallel.loop='mesh'.")


def _check_profile_steps(spec):
  """log.profile_steps: "" or "a:b" with 1 <= a <= b."""
  if spec in ("", None):
    return
  parts = str(spec).split(":")
  ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
  if not ok or not 1 <= int(parts[0]) <= int(parts[1]):
    raise ValueError(f"config.log.profile_steps={spec!r} must be 'a:b' with 1 <= a <= b "
                     "(the first and last step to trace), or '' for no profile.")


SEED_LIMIT = 2**32  # jax.random.PRNGKey keeps 32 bits: seed 2**32 would repeat seed 0


def _check_seed(seed):
  """config.seed: an integer PRNGKey and grain take as it is."""
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
    raise ValueError(f"config.seed={seed!r} must be an integer in [0, 2**32 - 1] (it seeds the "
                     "parameters, the data order and the step's PRNG stream).")


def _positive(value, name):
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{name}={value!r} must be a positive integer.")


# Model fields and the logical axis of the parameter dimension each one sizes.
DIVISIBLE_FIELDS = (("num_heads", "heads"), ("num_kv_heads", "kv_heads"), ("mlp_dim", "mlp"),
                    ("vocab_size", "vocab"), ("d_model", "embed"), ("linear_heads", "heads"),
                    ("linear_k_heads", "heads"))


def _divisible_by_axis(model_cfg, sizes, rules, what: str = "model.", extra: tuple = ()):
  """Model widths that the rule table splits over mesh axes must divide evenly (``what`` names
  the config in the sentence; ``extra`` adds (field, logical axis) pairs of its own)."""
  for field, logical in DIVISIBLE_FIELDS + extra:
    axes = sharding.mesh_axes(logical, rules)
    n, name = sharding.axes_size(axes, sizes), sharding.axes_name(axes)
    value = getattr(model_cfg, field, None)
    if isinstance(value, tuple):  # per-stage sizes (MEGABYTE): the first that does not divide
      value = next((v for v in value if v % n), value[0])
    if value is not None and value % n:
      hint = (f" (grouped-query KV heads are sharded over {'*'.join(axes)} like the query heads)"
              if field == "num_kv_heads" else "")
      raise ValueError(f"{what}{field}={value} is not divisible by {name}={n}{hint}; use a "
                       f"{name} that divides {value} or change the model.")


def validate_workdir(config, workdir: str) -> None:
  """Checks the run's folders before anything compiles or is written: the workdir is not a
  converted one, its checkpoints can be continued by this config (train/workdir.py; raises
  WorkdirError naming the fields that differ), and ``init.from`` (fine-tuning from another
  workdir's parameters) names a readable workdir."""
  from train import checkpoint  # train.checkpoint imports models/tasks; keep validate light
  from train import workdir as workdir_lib
  if os.path.exists(os.path.join(workdir, checkpoint.CONVERTED_MARKER)):
    raise ValueError(f"{workdir} holds weights converted by train.convert (parameters only); "
                     f"train from them with --config.init.from={workdir} and another --workdir.")
  workdir_lib.check_resumable(config, workdir)
  source, step = init_from(config)
  if not source:
    return
  if os.path.abspath(source) == os.path.abspath(workdir):
    raise ValueError(f"init.from={source} is the workdir itself; rerunning a workdir resumes it "
                     "without init.from.")
  if not os.path.isdir(source):
    raise ValueError(f"init.from={source} is not a directory.")
  steps = checkpoint.steps_in(source)
  if not steps:
    raise ValueError(f"init.from={source} has no checkpoint to take parameters from.")
  if step is not None and step not in steps:
    raise ValueError(f"init.step={step} is not a checkpoint of init.from={source}; it has "
                     f"steps {steps}.")
  checkpoint.check_params_fit(source, checkpoint.model_param_shapes(config), step=step)


def init_from(config) -> tuple[str, int | None]:
  """(init.from, its step or None for the newest); ("", None) when the run starts from seed."""
  init = config.get("init")
  if init is None or not init.get("from_", ""):
    return "", None
  step = init.get("step", -1)
  return init.from_, (None if step < 0 else step)
