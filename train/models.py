"""Model selection by name: ``config.model.name`` is the module under nets/ that defines it."""

import dataclasses
import importlib
import pkgutil

import nets
from parallel import attention
from parallel import moe as parallel_moe
from parallel import sharding


def families() -> list[str]:
  """Names of the nets/ modules that define a model family (a ``Config`` and a ``Model``)."""
  names = []
  for info in pkgutil.iter_modules(nets.__path__):
    module = importlib.import_module(f"nets.{info.name}")
    if hasattr(module, "Model") and hasattr(module, "Config"):
      names.append(info.name)
  return sorted(names)


def family(name: str):
  """The nets module for ``name``, or a sentence listing the known names."""
  known = families()
  if name not in known:
    raise ValueError(f"config.model.name={name!r} is not a known model; known models: {known}.")
  return importlib.import_module(f"nets.{name}")


def model_config(config):
  """The family's frozen hyperparameter dataclass, built from config.model (+ train.remat)."""
  return family(config.model.name).Config.from_config(config.model, remat=config.train.remat)


def attention_length(config, model_cfg) -> int:
  """The (shortest) sequence attention sees: what mesh.seq must split evenly."""
  if config.task == "lm":
    return config.train.seq_len
  side = getattr(model_cfg, "input_size", None) or model_cfg.image_size
  tokens = (side // model_cfg.patch_size) ** 2
  if getattr(model_cfg, "pool", "") == "token":
    tokens += 1  # the class token
  if hasattr(model_cfg, "depths"):  # U-DiT: deepest level, attention within 2x2 sub-maps
    tokens //= 4 ** (model_cfg.num_levels + 1)
  return tokens


def sequence_parallel(name: str) -> bool:
  """Whether the family runs with mesh.seq > 1 (its module's SEQUENCE_PARALLEL, default True)."""
  return getattr(family(name), "SEQUENCE_PARALLEL", True)


def attention_plan(config, mesh_sizes: dict, model_cfg) -> attention.Plan:
  """The attention kernel and sequence-parallel strategy for this config (validated).

  Families without sequence parallelism (Mamba, MEGABYTE) get the local kernel; validation has
  already refused mesh.seq > 1 for them.
  """
  if not sequence_parallel(config.model.name):
    local = sharding.unsplit(mesh_sizes, sharding.rules_from_config(config.parallel), "act_seq",
                             "act_heads")
    return attention.make_plan(config.parallel, local, num_heads=1, num_kv_heads=1,
                               seq_len=config.train.seq_len)
  return attention.make_plan(config.parallel, mesh_sizes, num_heads=model_cfg.num_heads,
                             num_kv_heads=getattr(model_cfg, "num_kv_heads", model_cfg.num_heads),
                             seq_len=attention_length(config, model_cfg))


def build(config, mesh, *, seq_parallel: bool = True):
  """Returns (Model, its Config, attention Plan) with attention chosen by config.parallel.

  ``seq_parallel=False`` gives the same model with the local kernel only (for sampling, whose
  sequence lengths need not divide the seq axis).
  """
  module = family(config.model.name)
  cfg = model_config(config)
  rules = sharding.rules_from_config(config.parallel)
  sizes = dict(mesh.shape) if seq_parallel else sharding.unsplit(dict(mesh.shape), rules, "act_seq")
  plan = attention_plan(config, sizes, cfg)
  kwargs = {}
  moe_cfg = getattr(cfg, "moe", None)
  if moe_cfg is not None and moe_cfg.enabled:
    if not seq_parallel:  # sampling batches are padded to the data-parallel size only
      moe_cfg = dataclasses.replace(moe_cfg, groups=0)
    kwargs["moe_layout"] = parallel_moe.layout(moe_cfg, sizes, mesh, rules)
  return module.Model(cfg, attention_fn=attention.attention_fn(plan, mesh), **kwargs), cfg, plan
