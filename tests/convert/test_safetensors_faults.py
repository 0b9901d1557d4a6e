"""Safetensors files and indexes that lie: every fault is one sentence naming the file (and the
tensor), raised before any of the file is trusted. The files are written byte by byte here."""

import json
import os
import struct

import numpy as np
import pytest

from nets import convert
from tests import run_module

# A Llama small enough to build in a second; its embedding [16, 8] is the first tensor taken.
LLAMA = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=16, max_position_embeddings=32)


def safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
  """A safetensors file: little-endian u64 header length, the JSON header, the data section."""
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str, shape, begin: int, end: int) -> dict:
  return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def good_file(path, names=("a", "b")) -> dict:
  """Writes float32 tensors [2, 3] named ``names`` back to back; returns their values."""
  values = {n: np.arange(6, dtype="<f4").reshape(2, 3) + 10 * i for i, n in enumerate(names)}
  header = {"__metadata__": {"format": "pt"}}
  data = b""
  for n, a in values.items():
    header[n] = entry("F32", a.shape, len(data), len(data) + a.nbytes)
    data += a.tobytes()
  path.write_bytes(safetensors_bytes(header, data))
  return values


def read_error(path) -> str:
  with pytest.raises(ValueError) as info:
    convert.read_safetensors(str(path))
  return str(info.value)


def test_a_well_formed_file_reads_as_written(tmp_path):
  """The baseline the faults below break: the hand-made file reads back exactly, and agrees with
  the safetensors library."""
  import safetensors.numpy
  path = tmp_path / "ok.safetensors"
  values = good_file(path)
  arrays, stored = convert.read_safetensors(str(path))
  assert stored == {"a": "F32", "b": "F32"}
  for name, want in values.items():
    np.testing.assert_array_equal(arrays[name], want)
    np.testing.assert_array_equal(safetensors.numpy.load_file(str(path))[name], want)


def test_truncated_file_names_file_and_tensor(tmp_path):
  path = tmp_path / "cut.safetensors"
  good_file(path)
  path.write_bytes(path.read_bytes()[:-10])
  message = read_error(path)
  assert message == (f"tensor 'b' in {path} has data_offsets [24, 48] outside the file's "
                     "38-byte data section (the file is truncated or its header is wrong).")


def test_data_offsets_past_the_end(tmp_path):
  path = tmp_path / "far.safetensors"
  path.write_bytes(safetensors_bytes({"w": entry("F32", [4], 1 << 40, (1 << 40) + 16)},
                                     bytes(16)))
  assert read_error(path).startswith(f"tensor 'w' in {path} has data_offsets "
                                     f"[{1 << 40}, {(1 << 40) + 16}] outside")


@pytest.mark.parametrize("content, expected", [
    (b"", "it has 0 bytes, fewer than the 8-byte header length"),
    (b"\x01\x02\x03", "it has 3 bytes, fewer than the 8-byte header length"),
    (struct.pack("<Q", 1 << 62) + b"{}", f"its first 8 bytes give a header of {1 << 62:,} bytes, "
     "but only 2 bytes follow"),
    (b"hello world, I am a text file", "is truncated or not a safetensors file"),
])
def test_header_length_that_does_not_fit(tmp_path, content, expected):
  path = tmp_path / "model.safetensors"
  path.write_bytes(content)
  message = read_error(path)
  assert message.startswith(str(path)) and expected in message, message


def test_header_longer_than_safetensors_allows(tmp_path, monkeypatch):
  # Writing 100 MB here would be slow; the limit is the same check at any size.
  monkeypatch.setattr(convert, "MAX_HEADER_BYTES", 10)
  path = tmp_path / "big.safetensors"
  good_file(path)
  assert "exceeds the 10 bytes safetensors allows" in read_error(path)


@pytest.mark.parametrize("raw, expected", [
    (b"{not json", "is not a valid safetensors file: its 9-byte header is not UTF-8 JSON"),
    (b"\xff\xfe{}", "header is not UTF-8 JSON"),
    (b"[1, 2]", "its header is a JSON list, not an object of tensors"),
])
def test_header_that_is_not_a_json_object(tmp_path, raw, expected):
  path = tmp_path / "m.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw)
  message = read_error(path)
  assert message.startswith(str(path)) and expected in message, message


@pytest.mark.parametrize("bad, expected", [
    (entry("F128", [2], 0, 16), "has dtype 'F128', which is not a safetensors dtype odyssey knows"),
    (entry("F32", [3], 0, 8), "has shape (3,) of F32 (12 bytes), but its data_offsets [0, 8] "
     "span 8 bytes"),
    (entry("F32", [2], 8, 0), "has data_offsets [8, 0] outside"),
    (entry("F32", [-2], 0, 8), "has a malformed header entry"),
    ({"dtype": "F32", "shape": [2]}, "has a malformed header entry"),
    (entry("F32", [2], "0", 8), "has a malformed header entry"),
    ("F32", "has a malformed header entry"),
])
def test_tensor_entry_that_lies(tmp_path, bad, expected):
  path = tmp_path / "m.safetensors"
  path.write_bytes(safetensors_bytes({"w": bad}, bytes(16)))
  message = read_error(path)
  assert message.startswith(f"tensor 'w' in {path} ") and expected in message, message


def test_overlapping_tensors(tmp_path):
  path = tmp_path / "m.safetensors"
  path.write_bytes(safetensors_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
                                     bytes(12)))
  assert read_error(path) == (f"tensors 'a' and 'b' in {path} overlap in the data section; "
                              "the header is wrong.")


def hf_folder(path, tensors: dict, stored: dict | None = None) -> str:
  """A Llama folder: config.json + model.safetensors of ``tensors`` ({name: array}), each stored
  under the safetensors dtype ``stored[name]`` (default F32) whatever the array holds."""
  path.mkdir()
  (path / "config.json").write_text(json.dumps(LLAMA))
  header, data = {}, b""
  for name, a in tensors.items():
    raw = np.ascontiguousarray(a).tobytes()
    header[name] = entry((stored or {}).get(name, "F32"), a.shape, len(data), len(data) + len(raw))
    data += raw
  (path / "model.safetensors").write_bytes(safetensors_bytes(header, data))
  return str(path)


def llama_tensors() -> dict:
  """Every tensor of the LLAMA config above, float32 (a complete, importable checkpoint)."""
  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
            "lm_head.weight": (16, 8)}
  layer = {"input_layernorm.weight": (8,), "self_attn.q_proj.weight": (8, 8),
           "self_attn.k_proj.weight": (8, 8), "self_attn.v_proj.weight": (8, 8),
           "self_attn.o_proj.weight": (8, 8), "post_attention_layernorm.weight": (8,),
           "mlp.gate_proj.weight": (16, 8), "mlp.up_proj.weight": (16, 8),
           "mlp.down_proj.weight": (8, 16)}
  shapes.update({f"model.layers.0.{k}": s for k, s in layer.items()})
  return {k: rng.standard_normal(s).astype("<f4") for k, s in shapes.items()}


def test_integer_weight_is_refused_by_the_cli(tmp_path):
  """Reproduced: a complete checkpoint whose float32 embedding is labelled I32 imported with
  exit 0 (embedding values up to 1.2e9)."""
  src = hf_folder(tmp_path / "hf", llama_tensors(), {"model.embed_tokens.weight": "I32"})
  dst = tmp_path / "conv"
  proc = run_module("train.convert", "--from=hf", "--family=llama", f"--src={src}",
                    f"--dst={dst}", ok=False, timeout=120)
  weights = os.path.join(src, "model.safetensors")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"odyssey: model.embed_tokens.weight in {weights} is stored as I32, but a weight must be "
      "a float type (F32/F16/BF16/F64)."], proc.stderr[-2000:]
  assert not dst.exists()


def test_truncated_weights_are_refused_by_the_cli(tmp_path):
  embed = np.zeros((16, 8), "<f4")
  src = hf_folder(tmp_path / "hf", {"model.embed_tokens.weight": embed})
  weights = os.path.join(src, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)
  proc = run_module("train.convert", "--from=hf", "--family=llama", f"--src={src}",
                    f"--dst={tmp_path / 'conv'}", ok=False, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"odyssey: tensor 'model.embed_tokens.weight' in {weights} has data_offsets [0, 512] "
      "outside the file's 412-byte data section (the file is truncated or its header is wrong)."]
  assert not (tmp_path / "conv").exists()


def test_float_dtypes_are_taken_and_integers_refused(tmp_path):
  src = hf_folder(tmp_path / "hf", {"f16": np.ones((2,), "<f2"), "bf": np.ones((2,), "<u2"),
                                    "mask": np.ones((2,), np.bool_)},
                  {"f16": "F16", "bf": "BF16", "mask": "BOOL"})
  _, tensors = convert.read_hf(src, "model.safetensors")
  assert tensors.take("f16", (2,)).dtype == np.float16
  assert str(tensors.take("bf", (2,)).dtype) == "bfloat16"
  with pytest.raises(ValueError, match=r"^mask in .*model.safetensors is stored as BOOL, but a "
                     r"weight must be a float type \(F32/F16/BF16/F64\)\.$"):
    tensors.take("mask", (2,))


def sharded_folder(path, weight_map) -> str:
  """A folder with config.json, a real shard ``model-00001-of-00001.safetensors`` holding 'a' and
  'b', and an index whose weight_map is ``weight_map`` (written as given)."""
  path.mkdir()
  (path / "config.json").write_text(json.dumps(LLAMA))
  good_file(path / "model-00001-of-00001.safetensors")
  raw = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
  (path / "model.safetensors.index.json").write_text(raw)
  return str(path)


SHARD = "model-00001-of-00001.safetensors"


def test_a_valid_index_reads_its_shard(tmp_path):
  src = sharded_folder(tmp_path / "hf", {"a": SHARD, "b": SHARD})
  _, tensors = convert.read_hf(src, "model.safetensors")
  assert tensors.names() == ["a", "b"]
  np.testing.assert_array_equal(tensors.take("b"), np.arange(6).reshape(2, 3) + 10)


@pytest.mark.parametrize("weight_map, expected", [
    ("{garbage", "is not a valid safetensors index (Expecting property name"),
    ("[1, 2]", "is not a valid safetensors index (it is not a JSON object)"),
    ({}, "has no weight_map (an object of tensor name -> shard file name)"),
    ('{"weight_map": ["a"]}', "has no weight_map"),
    ({"a": 3}, "maps tensor 'a' to 3, not a file name"),
    ({"a": "../other/model.safetensors"}, "maps tensor 'a' to '../other/model.safetensors', "
     "which is not a plain file name inside"),
    ({"a": "/etc/passwd"}, "maps tensor 'a' to '/etc/passwd', which is not a plain file name"),
    ({"a": ".."}, "which is not a plain file name"),
    ({"a": SHARD, "b": "model-00002-of-00002.safetensors"},
     "names shard 'model-00002-of-00002.safetensors', which is not in"),
    ({"a": SHARD, "b": SHARD, "c": SHARD}, "places tensor 'c' in " + SHARD + ", which has no such"),
])
def test_index_that_lies(tmp_path, weight_map, expected):
  src = sharded_folder(tmp_path / "hf", weight_map)
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    convert.read_hf(src, "model.safetensors")
  message = str(info.value)
  assert os.path.join(src, "model.safetensors.index.json") in message and expected in message, \
      message


def test_index_shard_that_is_a_folder(tmp_path):
  src = sharded_folder(tmp_path / "hf", {"a": "sub"})
  os.mkdir(os.path.join(src, "sub"))
  with pytest.raises(ValueError, match="names shard 'sub', but .*/sub is not a file"):
    convert.read_hf(src, "model.safetensors")


def test_tensor_stored_in_two_shards(tmp_path):
  src = sharded_folder(tmp_path / "hf", {"a": SHARD, "b": "second.safetensors"})
  good_file(tmp_path / "hf" / "second.safetensors", names=("b",))
  with pytest.raises(ValueError, match=r"tensor 'b' is stored twice, in .*model-00001-of-00001"
                     r"\.safetensors and .*second\.safetensors\."):
    convert.read_hf(src, "model.safetensors")


def test_garbage_config_json_is_named(tmp_path):
  src = hf_folder(tmp_path / "hf", {"w": np.zeros(2, "<f4")})
  (tmp_path / "hf" / "config.json").write_text("{oops")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON \(Expecting property"):
    convert.read_hf(src, "model.safetensors")
