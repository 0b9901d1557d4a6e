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
