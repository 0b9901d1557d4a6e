"""Hugging Face safetensors <-> odyssey checkpoints.

Import (a transformers / diffusers model folder -> an odyssey workdir)::

  python -m train.convert --from=hf --family=llama --src=HF_DIR --dst=WORKDIR [--dtype=bfloat16]

writes WORKDIR/config.json (an odyssey config whose ``model`` group describes the imported
weights), an Orbax checkpoint of the parameters at WORKDIR/checkpoints/0 and ``converted.json``;
tokenizer files next to the weights are copied along. Fine-tune with
``python -m train --config=... --config.init.from=WORKDIR --workdir=NEW``, generate with
``python -m train.generate --workdir=WORKDIR``, sample DiT images with ``python -m train.sample``.

Export (an odyssey workdir, trained or imported -> a Hugging Face folder)::

  python -m train.convert --from=odyssey --family=llama --src=WORKDIR --dst=HF_DIR [--step=N]

writes config.json and model.safetensors (diffusion_pytorch_model.safetensors for DiT), sharded
with an index past --max_shard_gb. Families: llama (LlamaForCausalLM), vit
(ViTForImageClassification), mamba (MambaForCausalLM), dit (diffusers DiTTransformer2DModel),
linear_rnn (Mamba2ForCausalLM, dense Qwen3NextForCausalLM).
Weights are read with safetensors only; pickle files are never opened, and every header and index
is checked before it is trusted (docs/convert.md). ``--dtype`` converts every floating tensor
explicitly; by default the stored dtype is kept. Nothing is written into a
destination that already holds files.
"""

import json
import os
import shutil
import sys

from absl import app, flags, logging


# The odyssey config an imported model's config.json starts from (its model group is replaced):
# by family, or by "family/model_type" for a family that reads several Hugging Face architectures.
BASE_CONFIGS = {"llama": ("configs.lm", "size=tiny"), "mamba": ("experiments.mamba_stdlib", None),
                "vit": ("configs.vit", None), "swin": ("configs.swin", None),
                "dit": ("configs.diffusion", "model=dit"),
                "autoencoder": ("configs.autoencoder", None),
                "linear_rnn/mamba2": ("experiments.mamba2_stdlib", None),
                "linear_rnn/qwen3_next": ("experiments.hybrid_stdlib", None)}
# Files of a Hugging Face folder that travel with imported weights (generation uses tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json", "generation_config.json")


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(workdir: str, config) -> dict:
  """The special token ids an exported LM's config.json names: those of the Hugging Face model
  it was imported from, else those of the tokenizer the run kept (train/tokenizer.py; bytes
  when it kept none)."""
  from train import checkpoint, tokenizer
  marker = os.path.join(workdir, checkpoint.CONVERTED_MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f).get("token_ids", {})
  del config  # the workdir's own copy is what the model was trained with
  tok = tokenizer.from_workdir(workdir)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  return {k: v for k, v in ids.items() if v is not None}


def _check_empty(dst: str) -> None:
  if os.path.isdir(dst) and os.listdir(dst):
    raise ValueError(f"--dst={dst} already holds files; converting never overwrites, so give a "
                     "new or empty folder.")


def _dtype_name(name: str) -> str | None:
  from nets import convert
  if name == "auto":
    return None
  convert.dtype(name)  # a sentence for an unknown name
  return name


def base_config(family: str, model_type: str | None = None):
  """The odyssey config (an ml_collections ConfigDict) an imported model's workdir starts from;
  ``model_type`` (config.json's) picks it for a family with several architectures."""
  import importlib
  name, arg = BASE_CONFIGS.get(family) or BASE_CONFIGS[f"{family}/{model_type}"]
  return importlib.import_module(name).get_config(arg)


def import_hf(family: str, src: str, dst: str, dtype_name: str | None = None) -> dict:
  """Hugging Face folder ``src`` -> odyssey workdir ``dst``; returns what was written."""
  import jax
  import ml_collections
  import numpy as np
  import orbax.checkpoint as ocp

  from nets import convert
  from parallel import mesh as parallel_mesh
  from parallel import sharding
  from train import checkpoint, models, tokenizer

  module = convert.family(family)
  _check_empty(dst)
  hf_config, tensors = convert.read_hf(src, module.WEIGHTS, dtype_name)
  fields = module.model_fields(hf_config)
  stored = dtype_name or tensors.stored_dtype()
  fields.update(param_dtype=stored, dtype=stored)
  config = base_config(family, hf_config.get("model_type"))
  model_group = ml_collections.ConfigDict(fields)
  if "moe" in config.model and "moe" not in model_group:
    model_group.moe = config.model.moe
  config.model = model_group
  side = fields.get("image_size") or fields.get("input_size")
  if side and "image_size" in config.data:  # the placeholder data group matches the model
    config.data.image_size = side
  cfg = models.model_config(config)  # a sentence for fields odyssey's model rejects
  params = module.from_hf(tensors, cfg)
  # The converted tree must be exactly what the model initialises (names, shapes, dtypes).
  mesh = parallel_mesh.make_mesh(ml_collections.ConfigDict(
      dict(data=1, fsdp=1, tensor=1, seq=1, expert=1)), jax.devices()[:1])
  model, _, _ = models.build(config, mesh, seq_parallel=False)
  abstract = checkpoint.abstract_params(config, model, mesh,
                                        sharding.rules_from_config(config.parallel))
  checkpoint.check_same_shapes(params, abstract, f"the {family} converter's output")
  params = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), params, abstract)
  os.makedirs(dst, exist_ok=True)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(dst), "checkpoints"),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
  manager.wait_until_finished()
  manager.close()
  copied = _copy_tokenizer_files(src, dst)
  kept = tokenizer.workdir_file(dst)
  if "tokenizer" in config.data and kept:
    config.data.tokenizer = os.path.abspath(kept)  # what a fine-tune names
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  info = {"from": "hf", "family": family, "src": os.path.abspath(src), "dtype": stored,
          "params": count, "tensors": len(tensors.names()), "copied": copied,
          # carried to an export of this workdir (odyssey's own runs use its byte vocabulary)
          "token_ids": {k: hf_config[k] for k in TOKEN_ID_KEYS if k in hf_config}}
  with open(os.path.join(dst, checkpoint.CONVERTED_MARKER), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return info


def export_hf(family: str, src: str, dst: str, dtype_name: str | None = None,
              step: int | None = None, max_shard_bytes: int | None = None) -> dict:
  """odyssey workdir ``src`` -> Hugging Face folder ``dst``; returns what was written."""
  import jax
  import numpy as np

  from nets import convert
  from train import checkpoint, models

  module = convert.family(family)
  config = checkpoint.load_config(src)
  if config.model.name != family:
    raise ValueError(f"{src} holds a {config.model.name!r} model, not --family={family}.")
  _check_empty(dst)
  cfg = models.model_config(config)
  hf_config = module.hf_config(cfg)  # a sentence for configs with no Hugging Face layout
  _, _, _, params = checkpoint.load_trained(src, step=step)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  tensors = module.to_hf(params, cfg)
  if config.get("task") == "lm":
    hf_config.update(_token_ids(src, config))
  if dtype_name is not None:
    for key in ("torch_dtype", "dtype"):
      if key in hf_config:
        hf_config[key] = dtype_name
  written = convert.write_hf(dst, hf_config, tensors, module.WEIGHTS, dtype_name=dtype_name,
                             **({} if max_shard_bytes is None else
                                {"max_shard_bytes": max_shard_bytes}))
  copied = _copy_tokenizer_files(src, dst) if config.get("task") == "lm" else []
  return {"from": "odyssey", "family": family,
          "files": [os.path.basename(w) for w in written] + copied, "tensors": len(tensors)}


def _copy_tokenizer_files(src: str, dst: str) -> list[str]:
  """Copies the tokenizer files (TOKENIZER_FILES) of folder ``src`` into ``dst``; their names."""
  copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  for name in copied:
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  return copied


def define_flags():
  """The CLI's flags, defined only when run as a program (other modules import this one)."""
  global _FROM, _FAMILY, _SRC, _DST, _DTYPE, _STEP, _MAX_SHARD_GB
  _FROM = flags.DEFINE_enum("from", None, ["hf", "odyssey"],
                            "hf: import a Hugging Face folder; odyssey: export a workdir.")
  _FAMILY = flags.DEFINE_string("family", None,
                                "Model family: llama | vit | mamba | dit | linear_rnn.")
  _SRC = flags.DEFINE_string("src", None, "The Hugging Face folder (import) or workdir (export).")
  _DST = flags.DEFINE_string("dst", None, "The workdir (import) or Hugging Face folder (export) "
                             "to create; it must not hold files yet.")
  _DTYPE = flags.DEFINE_string("dtype", "auto", "auto (keep the stored dtype) | float32 | "
                               "bfloat16 | float16: converts every floating tensor explicitly.")
  _STEP = flags.DEFINE_integer("step", None, "Export: the checkpoint step (default: the newest).")
  _MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Export: safetensors shards stay under "
                                     "this many GiB (an index file names them).")
  flags.mark_flags_as_required(["from", "family", "src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO/WARNING
  try:
    dtype_name = _dtype_name(_DTYPE.value)
    if _FROM.value == "hf":
      info = import_hf(_FAMILY.value, _SRC.value, _DST.value, dtype_name)
      print(f"odyssey: imported {info['params']:,} {info['dtype']} parameters "
            f"({info['tensors']} tensors) of a Hugging Face {_FAMILY.value} model into "
            f"{_DST.value}; fine-tune with --config.init.from={_DST.value}", flush=True)
    else:
      info = export_hf(_FAMILY.value, _SRC.value, _DST.value, dtype_name, _STEP.value,
                       int(_MAX_SHARD_GB.value * 1024 ** 3))
      print(f"odyssey: exported {info['tensors']} tensors to {_DST.value}: "
            f"{', '.join(info['files'])}", flush=True)
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f"odyssey: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
