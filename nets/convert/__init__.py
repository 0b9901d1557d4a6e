"""Hugging Face safetensors layouts <-> odyssey parameters, one module per family.

A family module (``nets/convert/<family>.py``) defines:
  WEIGHTS                     the weights file name ("model.safetensors" for transformers,
                              "diffusion_pytorch_model.safetensors" for diffusers)
  model_fields(hf_config)     -> dict of odyssey ``config.model`` fields (``name`` included)
  hf_config(cfg)              -> the Hugging Face ``config.json`` dict for a family Config
  from_hf(tensors, cfg)       -> the odyssey ``params`` tree (nested dicts of numpy arrays, the
                                 structure ``Model.init`` returns, unboxed), read with
                                 ``tensors.take`` so every missing or mis-shaped tensor is named
  to_hf(params, cfg)          -> {Hugging Face tensor name: numpy array}

This file holds what they share: reading and writing ``config.json`` plus safetensors (a single
file or shards with an index), explicit dtype conversion, and the sentences for missing,
mis-shaped and unexpected tensors. Pickle files (``*.bin``, ``*.pt``) are never opened.
"""

import importlib
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.flax

FAMILIES = ("llama", "vit", "mamba", "dit")
# Shards written by ``write_hf`` stay under this many bytes (as transformers' save_pretrained).
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def family(name: str):
  """The converter module for ``name``, or a sentence listing the families that have one."""
  if name not in FAMILIES:
    raise ValueError(f"--family={name!r} has no Hugging Face converter; known families: "
                     f"{list(FAMILIES)}.")
  return importlib.import_module(f"nets.convert.{name}")


def dtype(name: str) -> np.dtype:
  """The numpy dtype for a dtype name (float32 | float16 | bfloat16), or a sentence."""
  if name not in _DTYPES:
    raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


class MissingTensorError(KeyError):
  """A tensor the model needs is not in the checkpoint (str() is the plain sentence)."""

  def __str__(self):
    return str(self.args[0])


class Tensors:
  """Named tensors read from a checkpoint; ``take`` hands each out once, checked and converted."""

  def __init__(self, tensors: dict, source: str, dtype_name: str | None = None):
    self._tensors = dict(tensors)
    self._taken = set()
    self.source = source
    # None keeps each tensor's stored floating dtype; a name converts every floating tensor.
    self.dtype = None if dtype_name is None else dtype(dtype_name)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return sorted(self._tensors)

  def stored_dtype(self) -> str:
    """The name of the (most common) floating dtype the tensors are stored in."""
    counts = {}
    for a in self._tensors.values():
      if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
        counts[str(a.dtype)] = counts.get(str(a.dtype), 0) + a.size
    return max(counts, key=counts.get) if counts else "float32"

  def take(self, name: str, shape: tuple | None = None) -> np.ndarray:
    """The tensor ``name`` (a numpy array), checked against ``shape`` and converted to the
    requested dtype; a missing tensor or another shape raises one sentence naming it."""
    if name not in self._tensors:
      raise MissingTensorError(f"{self.source} has no tensor {name!r}, which this model needs "
                     f"({len(self._tensors)} tensors present).")
    a = self._tensors[name]
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} in {self.source} has shape {tuple(a.shape)}, but the "
                       f"config needs {tuple(shape)}.")
    self._taken.add(name)
    a = np.asarray(a)
    if self.dtype is not None and a.dtype != self.dtype and (
        np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
      a = a.astype(self.dtype)
    return a

  def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises one sentence naming tensors the model has no place for (a config mismatch).

    ``ignore``: name suffixes that are derived buffers, not weights (e.g. rotary inv_freq).
    """
    left = sorted(n for n in self._tensors
                  if n not in self._taken and not any(n.endswith(s) for s in ignore))
    if left:
      shown = ", ".join(repr(n) for n in left[:5]) + (" ..." if len(left) > 5 else "")
      raise ValueError(f"{self.source} has {len(left)} tensor(s) this model config has no place "
                       f"for: {shown}; the config.json does not describe these weights.")


def _weight_files(directory: str, weights: str) -> list[str]:
  """The safetensors files of ``directory``: the single file or the shards its index names."""
  single = os.path.join(directory, weights)
  index = single + ".index.json"
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no weight_map.")
    files = sorted(set(weight_map.values()))
    missing = [n for n in files if not os.path.exists(os.path.join(directory, n))]
    if missing:
      raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {directory}.")
    return [os.path.join(directory, n) for n in files]
  if os.path.exists(single):
    return [single]
  pickles = [n for n in sorted(os.listdir(directory)) if n.endswith((".bin", ".pt", ".pth"))]
  hint = (f"; it has {pickles}, which are pickle files that odyssey never loads (convert them to "
          "safetensors first)") if pickles else ""
  raise FileNotFoundError(f"{directory} has neither {weights} nor {weights}.index.json{hint}.")


def read_hf(directory: str, weights: str, dtype_name: str | None = None) -> tuple[dict, Tensors]:
  """(config.json as a dict, Tensors) of a Hugging Face model folder (safetensors only)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--src={directory} is not a directory.")
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{directory} has no config.json.")
  with open(config_path) as f:
    config = json.load(f)
  tensors = {}
  for path in _weight_files(directory, weights):
    with safetensors.safe_open(path, framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name))
  return config, Tensors(tensors, os.path.join(directory, weights), dtype_name)


def write_hf(directory: str, config: dict, tensors: dict, weights: str, *,
             dtype_name: str | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes ``config.json`` and the tensors as safetensors (sharded with an index past
  ``max_shard_bytes``, named as transformers names them); returns the weight files written.

  ``dtype_name`` converts every floating tensor explicitly; None keeps the parameters' dtype.
  """
  os.makedirs(directory, exist_ok=True)
  target = None if dtype_name is None else dtype(dtype_name)
  arrays = {}
  for name, a in tensors.items():
    a = np.asarray(a)
    if target is not None and (np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
      a = a.astype(target)
    arrays[name] = np.ascontiguousarray(a)
  shards, size = [[]], 0
  for name in arrays:  # insertion order: the converters list tensors layer by layer
    nbytes = arrays[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  stem, ext = os.path.splitext(weights)
  names = ([weights] if len(shards) == 1 else
           [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))])
  for file_name, shard in zip(names, shards):
    safetensors.flax.save_file({n: jnp.asarray(arrays[n]) for n in shard},
                               os.path.join(directory, file_name), metadata={"format": "pt"})
  index_path = os.path.join(directory, weights + ".index.json")
  if len(shards) > 1:
    weight_map = {n: file_name for file_name, shard in zip(names, shards) for n in shard}
    with open(index_path, "w") as f:
      json.dump({"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                 "weight_map": weight_map}, f, indent=2, sort_keys=True)
  elif os.path.exists(index_path):  # a stale index from an earlier sharded export
    os.remove(index_path)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return [os.path.join(directory, n) for n in names]
