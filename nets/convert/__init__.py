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

A safetensors header is checked before any of it is trusted (``read_safetensors``): the 8-byte
header length must fit in the file, the header must be a JSON object, every tensor must have a
known dtype, a shape, and data offsets inside the data section spanning exactly shape x dtype
bytes, with no two tensors overlapping. An index must name plain files of the folder.
"""

import importlib
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.flax

from nets import registry

# Shards written by ``write_hf`` stay under this many bytes (as transformers' save_pretrained).
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The dtype names a safetensors header may use, as numpy dtypes (all little-endian on disk).
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype(np.bool_)}
# Weights odyssey imports must be stored in one of these (FP8 needs scales no converter reads).
FLOAT_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
# The safetensors library refuses headers above 100 MB; a larger length is a damaged file.
MAX_HEADER_BYTES = 100 * 1000 * 1000


def family(name: str):
  """The converter module for ``name`` (its nets.registry.Family names it), or a sentence listing
  the families that have one."""
  converters = {f.name: f.converter for f in registry.families().values() if f.converter}
  if name not in converters:
    raise ValueError(f"--family={name!r} has no Hugging Face converter; known families: "
                     f"{list(converters)}.")
  return importlib.import_module(f"nets.convert.{converters[name]}")


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

  def __init__(self, tensors: dict, source: str, dtype_name: str | None = None,
               files: dict[str, str] | None = None, stored: dict[str, str] | None = None):
    """``files``/``stored``: each tensor's file and safetensors dtype name (default: ``source``
    and the name of the array's dtype)."""
    self._tensors = dict(tensors)
    self._taken = set()
    self.source = source
    self._files = dict(files or {})
    self._stored = dict(stored or {})
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

  def take(self, name: str, shape: tuple | None = None, weight: bool = True) -> np.ndarray:
    """The tensor ``name`` (a numpy array), checked against ``shape`` and converted to the
    requested dtype; a missing tensor or another shape raises one sentence naming it.
    ``weight=False`` takes a stored buffer (e.g. an integer index) as it is stored."""
    if name not in self._tensors:
      raise MissingTensorError(f"{self.source} has no tensor {name!r}, which this model needs "
                     f"({len(self._tensors)} tensors present).")
    a = self._tensors[name]
    source = self._files.get(name, self.source)
    stored = self._stored.get(name) or _safetensors_name(np.asarray(a).dtype)
    if weight and stored not in FLOAT_WEIGHT_DTYPES:
      raise ValueError(f"{name} in {source} is stored as {stored}, but a weight must be a float "
                       f"type ({'/'.join(FLOAT_WEIGHT_DTYPES)}).")
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} in {source} has shape {tuple(a.shape)}, but the "
                       f"config needs {tuple(shape)}.")
    self._taken.add(name)
    a = np.asarray(a)
    if weight and self.dtype is not None and a.dtype != self.dtype and (
        np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
      a = a.astype(self.dtype)
    return a

  def check_all_used(self, ignore: tuple[str, ...] = (),
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raises one sentence naming tensors the model has no place for (a config mismatch).

    ``ignore``: name suffixes that are derived buffers, not weights (e.g. rotary inv_freq);
    ``ignore_prefixes``: name prefixes of modules transformers itself skips on load (e.g.
    Qwen3-Next's multi-token-prediction head ``mtp.``).
    """
    left = sorted(n for n in self._tensors
                  if n not in self._taken and not any(n.endswith(s) for s in ignore)
                  and not n.startswith(tuple(ignore_prefixes)))
    if left:
      shown = ", ".join(repr(n) for n in left[:5]) + (" ..." if len(left) > 5 else "")
      raise ValueError(f"{self.source} has {len(left)} tensor(s) this model config has no place "
                       f"for: {shown}; the config.json does not describe these weights.")


def _safetensors_name(dt: np.dtype) -> str:
  """The safetensors name of numpy dtype ``dt`` (its numpy name when safetensors has none)."""
  for name, known in SAFETENSORS_DTYPES.items():
    if known == dt:
      return name
  return str(dt)


def _read_exact(f, n: int, path: str, what: str) -> bytes:
  buf = f.read(n)
  if len(buf) != n:
    raise ValueError(f"{path} is truncated: {what} needs {n:,} bytes but only {len(buf):,} are "
                     "left in the file.")
  return buf


def safetensors_header(path: str) -> tuple[dict[str, tuple[str, tuple, int, int]], int]:
  """({tensor name: (dtype name, shape, begin, end)}, offset of the data section) of the
  safetensors file ``path``, after checking that the header describes the file; any lie is one
  sentence naming the file (and the tensor)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      if size < 8:
        raise ValueError(f"{path} is not a safetensors file: it has {size} bytes, fewer than "
                         "the 8-byte header length that starts one.")
      n = int.from_bytes(f.read(8), "little")
      if n > size - 8:
        raise ValueError(f"{path} is truncated or not a safetensors file: its first 8 bytes give "
                         f"a header of {n:,} bytes, but only {size - 8:,} bytes follow.")
      if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a valid safetensors file: its header length {n:,} bytes "
                         f"exceeds the {MAX_HEADER_BYTES:,} bytes safetensors allows.")
      raw = _read_exact(f, n, path, "the header")
  except OSError as e:
    raise ValueError(f"{path} could not be read: {e.strerror or e}.") from None
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a valid safetensors file: its {n:,}-byte header is not "
                     f"UTF-8 JSON ({e}).") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a valid safetensors file: its header is a JSON "
                     f"{type(header).__name__}, not an object of tensors.")
  data_len = size - 8 - n
  entries = {}
  for name, entry in header.items():
    if name == "__metadata__":
      if not isinstance(entry, dict):
        raise ValueError(f"{path} has a __metadata__ header entry that is not a JSON object.")
      continue
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])):
      raise ValueError(f"tensor {name!r} in {path} has a malformed header entry "
                       f"{json.dumps(entry)[:120]}; safetensors needs a dtype name, a shape of "
                       "non-negative integers and data_offsets [begin, end].")
    dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype_name not in SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has dtype {dtype_name!r}, which is not a "
                       f"safetensors dtype odyssey knows ({', '.join(SAFETENSORS_DTYPES)}).")
    if not 0 <= begin <= end <= data_len:
      raise ValueError(f"tensor {name!r} in {path} has data_offsets [{begin}, {end}] outside "
                       f"the file's {data_len:,}-byte data section (the file is truncated or "
                       "its header is wrong).")
    nbytes = int(np.prod(shape, dtype=object)) * SAFETENSORS_DTYPES[dtype_name].itemsize
    if end - begin != nbytes:
      raise ValueError(f"tensor {name!r} in {path} has shape {shape} of {dtype_name} "
                       f"({nbytes:,} bytes), but its data_offsets [{begin}, {end}] span "
                       f"{end - begin:,} bytes.")
    entries[name] = (dtype_name, shape, begin, end)
  spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
  for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
    if begin < prev_end:
      raise ValueError(f"tensors {prev!r} and {name!r} in {path} overlap in the data section; "
                       "the header is wrong.")
  return entries, 8 + n


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: numpy array}, {name: stored dtype name}) of the safetensors file ``path``, read only
  after ``safetensors_header`` has checked its header against the file."""
  entries, start = safetensors_header(path)
  arrays = {}
  try:
    with open(path, "rb") as f:
      for name, (dtype_name, shape, begin, end) in entries.items():
        f.seek(start + begin)
        buf = bytearray(_read_exact(f, end - begin, path, f"tensor {name!r}"))
        arrays[name] = np.frombuffer(buf, SAFETENSORS_DTYPES[dtype_name]).reshape(shape)
  except OSError as e:
    raise ValueError(f"{path} could not be read: {e.strerror or e}.") from None
  return arrays, {name: entry[0] for name, entry in entries.items()}


def _index_files(directory: str, index: str) -> dict[str, str]:
  """{tensor name: shard file name} of a safetensors index, checked: valid JSON, a weight_map of
  names to plain file names of ``directory`` that exist there."""
  try:
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
    detail = "it is not a JSON object" if isinstance(e, AttributeError) else str(e)
    raise ValueError(f"{index} is not a valid safetensors index ({detail}).") from None
  except OSError as e:
    raise ValueError(f"{index} could not be read: {e.strerror or e}.") from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index} has no weight_map (an object of tensor name -> shard file name).")
  for name, file_name in weight_map.items():
    if not isinstance(file_name, str):
      raise ValueError(f"{index} maps tensor {name!r} to {file_name!r}, not a file name.")
    # A shard is a file of this folder: no path, so an index cannot reach outside it. (A shard
    # that is itself a symlink is the folder's own choice, as in the Hugging Face cache.)
    if (not file_name or file_name in (".", "..") or os.path.isabs(file_name)
        or "/" in file_name or "\\" in file_name or os.sep in file_name):
      raise ValueError(f"{index} maps tensor {name!r} to {file_name!r}, which is not a plain file "
                       f"name inside {directory}; shards must lie in the folder itself.")
  for file_name in sorted(set(weight_map.values())):
    path = os.path.join(directory, file_name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{index} names shard {file_name!r}, which is not in {directory}.")
    if not os.path.isfile(path):
      raise ValueError(f"{index} names shard {file_name!r}, but {path} is not a file.")
  return weight_map


def _weight_files(directory: str, weights: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of ``directory`` (the single file or the shards its index names) and
  the index's {tensor name: file name}, or None for a single file."""
  single = os.path.join(directory, weights)
  index = single + ".index.json"
  if os.path.exists(index):
    weight_map = _index_files(directory, index)
    return [os.path.join(directory, n) for n in sorted(set(weight_map.values()))], weight_map
  if os.path.exists(single):
    return [single], None
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
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}).") from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_path} is not a JSON object of model settings.")
  tensors, files, stored = {}, {}, {}
  paths, weight_map = _weight_files(directory, weights)
  for path in paths:
    arrays, dtypes = read_safetensors(path)
    for name in arrays:
      if name in files:
        raise ValueError(f"tensor {name!r} is stored twice, in {files[name]} and {path}.")
      files[name] = path
    tensors.update(arrays)
    stored.update(dtypes)
  for name, file_name in (weight_map or {}).items():
    if files.get(name) != os.path.join(directory, file_name):
      raise ValueError(f"{directory}/{weights}.index.json places tensor {name!r} in "
                       f"{file_name}, which has no such tensor.")
  return config, Tensors(tensors, os.path.join(directory, weights), dtype_name, files, stored)


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


def dtype_name(hf_config: dict) -> str:
  """A transformers checkpoint's parameter dtype: "dtype" (transformers 5) or "torch_dtype"
  (4.x), "auto" read as float32; others than float32/float16/bfloat16 give a sentence."""
  name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
  name = name.removeprefix("torch.")
  if name == "auto":
    return "float32"
  if name not in ("float32", "float16", "bfloat16"):
    raise ValueError(f"config.json dtype {name!r} is not one of float32, float16, bfloat16.")
  return name
