"""A frozen text encoder imported from Hugging Face (a T5 / ByT5 folder) inside a trained model.

With ``model.text_encoder="t5"`` and ``model.text_encoder_path=<folder>`` a text-conditioned
family builds ``nets.t5.Encoder`` as its ``text_encoder`` submodule (params under ``prefix``,
default "text_encoder") and stops the gradient at its output; here

  config:     model_fields(config.model)                       the folder's Config, read by
              (train/models.py model_config)                   check from config.json only
  init state: cfg, loaded = text_encoders.load(path)           (train/program.py, fresh runs)
              params = text_encoders.place(params, loaded)     the fresh init replaced, sharded
  optimizer:  tx, lr = optimizer.make(config.opt, steps, frozen=text_encoders.frozen_mask)

so the imported weights are what the model computes with and the optimizer never changes them
(zero updates, no Adam moments, no weight decay, and the gradient-norm clip sees only the trained
parameters). A resumed run restores the encoder from its own checkpoint, like every parameter.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np

PREFIX = ("text_encoder",)
KEY = "model.text_encoder_path"


def _folder(path, key: str) -> str:
  if not isinstance(path, str) or not path:
    raise ValueError(f"{key}={path!r} must name a Hugging Face T5 folder (config.json + "
                     "model.safetensors).")
  if not os.path.isdir(path):
    raise ValueError(f"{key}={path} is not a directory; it must be a Hugging Face T5 folder "
                     "(config.json + model.safetensors).")
  return path


def check(path, key: str = KEY):
  """The nets.t5 Config of the T5 folder ``path`` from its config.json alone (for validation
  before anything compiles); every problem is one ValueError sentence naming ``key`` or the file."""
  import json

  from nets.convert import t5 as convert_t5
  config_path = os.path.join(_folder(path, key), "config.json")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{key}={path} has no config.json.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_path} is not a JSON object of model settings.")
  return convert_t5.config_from_hf(hf, config_path)


def model_fields(model_cfg) -> dict:
  """The fields ``model.text_encoder="t5"`` adds to a text family's Config: the folder's nets.t5
  Config (``t5``) and ``text_width`` = its d_model; {} for any other encoder. A sentence for a
  missing or malformed folder, or a model.text_width that contradicts the folder."""
  if model_cfg.get("text_encoder") != "t5":
    return {}
  t5_cfg = check(model_cfg.get("text_encoder_path"))
  width = model_cfg.get("text_width")
  if width is not None and width != t5_cfg.d_model:
    raise ValueError(f"model.text_width={width} differs from the T5 encoder's d_model="
                     f"{t5_cfg.d_model} ({KEY}={model_cfg.text_encoder_path}); leave "
                     "model.text_width unset, it follows the encoder.")
  return {"t5": t5_cfg, "text_width": t5_cfg.d_model}


def load(path, key: str = KEY, dtype: str | None = None, param_dtype: str | None = None):
  """(nets.t5 Config, numpy params) of the T5 folder ``path``. ``dtype``: the encoder's compute
  dtype; ``param_dtype``: the weights' dtype (converted explicitly); None keeps the stored dtype
  for both. Every problem is one ValueError sentence naming ``key`` or the file."""
  from nets.convert import t5 as convert_t5
  check(path, key)  # the same sentences for the folder and its config.json as at validation
  try:
    cfg, params = convert_t5.load_pretrained(path, param_dtype)
  except (FileNotFoundError, KeyError) as e:  # a missing file or tensor: already a sentence
    raise ValueError(str(e)) from None
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
    cfg.validate()
  return cfg, params


def _path_names(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def frozen_mask(params, prefix: tuple[str, ...] = PREFIX):
  """True at every leaf under ``prefix`` (the frozen encoder), False elsewhere; for
  ``optimizer.make(..., frozen=...)``. Boxed (logically partitioned) leaves count as leaves."""
  n = len(prefix)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[:n] == tuple(prefix),
                                          params, is_leaf=is_box)


def place(params, loaded, prefix: tuple[str, ...] = PREFIX):
  """``params`` with the subtree at ``prefix`` replaced by ``loaded``, each leaf cast to the
  fresh leaf's dtype and put in its sharding (where it has one); a sentence when the trees'
  names or shapes differ (the model's encoder config is not the loaded folder's)."""
  fresh = params
  for i, name in enumerate(prefix):
    if not isinstance(fresh, dict) or name not in fresh:
      raise ValueError(f"the model has no parameters at {'/'.join(prefix[:i + 1])} to hold the "
                       "imported text encoder.")
    fresh = fresh[name]
  where = "/".join(prefix)
  fresh_leaves = dict(jax.tree_util.tree_leaves_with_path(fresh))
  loaded_leaves = dict(jax.tree_util.tree_leaves_with_path(loaded))
  if set(fresh_leaves) != set(loaded_leaves):
    names = lambda keys: sorted(jax.tree_util.keystr(k) for k in keys)
    missing, extra = names(set(fresh_leaves) - set(loaded_leaves)), names(
        set(loaded_leaves) - set(fresh_leaves))
    raise ValueError(f"the imported text encoder's parameters do not match the model's {where}: "
                     f"missing {missing[:3]}, unexpected {extra[:3]}.")
  for key, leaf in fresh_leaves.items():
    if tuple(np.shape(loaded_leaves[key])) != tuple(leaf.shape):
      raise ValueError(f"the imported text encoder's {where}{jax.tree_util.keystr(key)} has shape "
                       f"{tuple(np.shape(loaded_leaves[key]))}, but the model's has "
                       f"{tuple(leaf.shape)}; build the encoder from the folder's config.")

  def put(new, old):
    new = np.asarray(new, old.dtype)
    sharding = getattr(old, "sharding", None)
    return new if sharding is None else jax.device_put(new, sharding)

  replaced = jax.tree.map(put, loaded, fresh)

  def rebuilt(tree, names):
    return replaced if not names else {**tree, names[0]: rebuilt(tree[names[0]], names[1:])}
  return rebuilt(params, tuple(prefix))
