"""Base ml_collections configs, one per model family: ``get_config(arg) -> ConfigDict``."""


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """Parses 'key=value,key=value' (the part after ':' in --config=FILE:ARG) over ``defaults``."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r} is not key=value with key in {sorted(defaults)}.")
    out[key] = type(defaults[key])(value)
  return out


def moe_group(**overrides):
  """``config.model.moe`` with every field of nets.moe.Config (num_experts=0: dense MLPs)."""
  import dataclasses

  import ml_collections

  from nets import moe
  return ml_collections.ConfigDict({**dataclasses.asdict(moe.Config()), **overrides})
