"""Model selection by name: ``config.model.name`` is the module under nets/ that defines it."""

import importlib
import pkgutil

import nets
from parallel.attention import get_attention_fn


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


def build(config, mesh=None):
  """Returns (Model instance, its Config) with the attention function chosen by config."""
  module = family(config.model.name)
  cfg = model_config(config)
  return module.Model(cfg, attention_fn=get_attention_fn(config.parallel.attention, mesh)), cfg
