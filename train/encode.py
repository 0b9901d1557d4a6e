"""Encodes an image source into latent (or token) ArrayRecord shards with a trained autoencoder
(or VQ tokenizer).

  python -m train.encode --workdir=VAE_WORKDIR --out=DIR [--data=digits|FOLDER]
      [--scaling_factor=0] [--step=N] [--batch_size=64] [--dtype=float16|float32]

Every train and val image of the source (default: the autoencoder's own data group; --data=digits
or a folder of class subfolders, read at the model's image size) is encoded to the posterior
MEAN (no sampling), multiplied by the scaling factor, and written in the "arrayrecord" layout
(train/image_data.py) with the labels. The scaling factor is --scaling_factor when positive, else
the autoencoder's model.scaling_factor when positive, else 1 / std of the train latents (LDM's
rule, so the latents a diffusion model sees have unit variance). DIR/metadata.json records
"scaling_factor", "autoencoder" (the workdir's absolute path) and "autoencoder_step"
(train/latents.py), so a diffusion run on DIR decodes its samples to PNGs. DIR must be new or
empty; the shards are written to DIR.partial and renamed when complete.

A VQ tokenizer workdir (task "vqvae", nets/vqvae.py; e.g. experiments/vqvae_digits.py) writes
each image's token maps instead: the ids of every scale, coarse to fine and row-major, as one
int16 array of sum(s_k^2) entries (int32 past 32,767 codes), with the label. DIR/metadata.json
records "tokenizer" (the workdir's absolute path), "tokenizer_step", "scales" and
"codebook_size", which a VAR run on DIR reads (nets/var.py). --scaling_factor and --dtype do
not apply to tokens.
"""

import json
import math
import os
import shutil
import sys

from absl import app, flags, logging


def data_config(vae_config, model_cfg, data: str | None):
  """The image data group to encode: the autoencoder's own, or --data (digits | a folder),
  read at the model's image size."""
  d = vae_config.data.copy_and_resolve_references()
  if data:
    d.name, d.path = ("digits", "") if data == "digits" else ("folder", data)
  d.image_size = model_cfg.image_size
  return d


def check(workdir: str, out: str, data: str | None, scaling_factor: float, batch_size: int):
  """(autoencoder config, data group); one sentence for the first thing that cannot work,
  before any weights load."""
  from train import checkpoint, image_data, models
  config = checkpoint.load_config(workdir)
  if config.get("task") not in ("autoencoder", "vqvae"):
    raise ValueError(f"{workdir} holds a {config.get('task')!r} model; train.encode needs an "
                     "autoencoder workdir (task 'autoencoder', e.g. experiments/vae_digits.py) "
                     "or a VQ tokenizer's (task 'vqvae', e.g. experiments/vqvae_digits.py).")
  if config.get("task") == "vqvae" and scaling_factor:
    raise ValueError(f"--scaling_factor={scaling_factor} does not apply to the token maps of a "
                     "VQ tokenizer; leave it out.")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out={out} already exists and is not an empty folder; train.encode never "
                     "overwrites, so give a new one.")
  if not (math.isfinite(scaling_factor) and scaling_factor >= 0):
    raise ValueError(f"--scaling_factor={scaling_factor} must be a finite number >= 0 (0: the "
                     "model's, else 1 / std of the train latents).")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be at least 1.")
  model_cfg = models.model_config(config)
  d = data_config(config, model_cfg, data)
  image_data.check_image_config(d)
  shape = tuple(image_data.image_shape(d))
  want = (model_cfg.image_size, model_cfg.image_size, model_cfg.in_channels)
  if shape != want:
    raise ValueError(f"--data images are {'x'.join(map(str, shape))} but the autoencoder takes "
                     f"{'x'.join(map(str, want))}.")
  if not len(image_data.source(d, "train")):
    raise ValueError(f"the 'train' split of {data or d.name} has no images to encode.")
  return config, d


def encode(workdir: str, out: str, *, data: str | None = None, scaling_factor: float = 0.0,
           step: int | None = None, batch_size: int = 64, dtype: str = "float16") -> dict:
  """Writes the latent shards and metadata.json into ``out``; returns the metadata."""
  import jax
  import numpy as np

  from train import checkpoint, image_data

  config, d = check(workdir, out, data, scaling_factor, batch_size)
  if step is None:
    step = checkpoint.steps_in(workdir)[-1] if checkpoint.steps_in(workdir) else None
  _, model, _, params = checkpoint.load_trained(workdir, step=step)
  if config.get("task") == "vqvae":
    return _tokenize(workdir, out, config, d, model, params, step, batch_size, data)
  mean_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])
  encoded = _map_splits(d, batch_size, lambda x: np.asarray(mean_fn(params, x)))
  scale = scaling_factor or float(config.model.get("scaling_factor") or 0.0)
  if not scale:
    scale = 1.0 / float(np.std(encoded["train"][0]))
  partial = _fresh_partial(out)
  classes = image_data.num_classes(d)
  for split, (z, labels) in encoded.items():
    if z is not None:
      image_data.write_arrayrecord(partial, split, z * scale, labels, classes, dtype=dtype)
  return _finish(partial, out, dict(
      scaling_factor=scale, autoencoder=os.path.abspath(workdir), autoencoder_step=step,
      source=data or d.name, counts={s: len(labels) for s, (_, labels) in encoded.items()}))


def _tokenize(workdir, out, config, d, model, params, step, batch_size, data) -> dict:
  """The VQ tokenizer's side of ``encode``: token maps of every image, flattened."""
  import jax
  import numpy as np

  from train import image_data

  cfg = model.cfg
  dtype = "int16" if cfg.codebook_size <= 32767 else "int32"

  def flat_ids(p, x):
    ids, _ = model.apply({"params": p}, x, method=model.tokenize)
    return jax.numpy.concatenate([i.reshape(i.shape[0], -1) for i in ids], axis=1)

  tokens_fn = jax.jit(flat_ids)
  encoded = _map_splits(d, batch_size, lambda x: np.asarray(tokens_fn(params, x)))
  partial = _fresh_partial(out)
  classes = image_data.num_classes(d)
  for split, (tokens, labels) in encoded.items():
    if tokens is not None:
      image_data.write_arrayrecord(partial, split, tokens, labels, classes, dtype=dtype)
  return _finish(partial, out, dict(
      tokenizer=os.path.abspath(workdir), tokenizer_step=step, scales=list(cfg.scales),
      codebook_size=cfg.codebook_size, source=data or d.name,
      counts={s: len(labels) for s, (_, labels) in encoded.items()}))


def _map_splits(d, batch_size: int, fn) -> dict:
  """{split: (fn's outputs of every image stacked, or None when empty; labels int32)} for the
  train and val splits, in batches of ``batch_size`` (the last one padded: one compiled shape)."""
  import numpy as np

  from train import image_data
  encoded = {}
  for split in ("train", "val"):
    src = image_data.source(d, split)
    outs, labels = [], []
    for start in range(0, len(src), batch_size):
      items = [src[i] for i in range(start, min(start + batch_size, len(src)))]
      x = np.stack([it["images"] for it in items])
      x = np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])
      outs.append(fn(x)[:len(items)])
      labels += [int(it["labels"]) for it in items]
    encoded[split] = (np.concatenate(outs) if outs else None, np.asarray(labels, np.int32))
  return encoded


def _fresh_partial(out: str) -> str:
  partial = os.path.abspath(out) + ".partial"
  shutil.rmtree(partial, ignore_errors=True)  # an earlier interrupted run's leftovers
  return partial


def _finish(partial: str, out: str, extra: dict) -> dict:
  """Adds ``extra`` to the partial folder's metadata.json and renames it to ``out``."""
  meta_path = os.path.join(partial, "metadata.json")
  with open(meta_path) as f:
    meta = json.load(f)
  meta.update(extra)
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  if os.path.isdir(out):
    os.rmdir(out)  # empty (checked above)
  os.rename(partial, out)
  return meta


def define_flags():
  """The CLI's flags, defined only when run as a program (other modules import this one)."""
  global _WORKDIR, _OUT, _DATA, _SCALING, _STEP, _BATCH, _DTYPE
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained autoencoder or VQ tokenizer "
                                 "workdir.")
  _OUT = flags.DEFINE_string("out", None, "New (or empty) folder for the latent or token "
                             "shards.")
  _DATA = flags.DEFINE_string("data", None, "digits, or a folder of class subfolders of images "
                              "(default: the autoencoder's own data group).")
  _SCALING = flags.DEFINE_float("scaling_factor", 0.0, "Latents are multiplied by it; 0: the "
                                "model's, else 1 / std of the train latents.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
  _DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Latent storage type.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  try:
    meta = encode(_WORKDIR.value, _OUT.value, data=_DATA.value, scaling_factor=_SCALING.value,
                  step=_STEP.value, batch_size=_BATCH.value, dtype=_DTYPE.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  if "tokenizer" in meta:
    print(f"odyssey: tokenized {meta['counts']} images into {meta['dtype']} token maps of "
          f"scales {meta['scales']} ({meta['shape'][0]} tokens each) in {_OUT.value}; train VAR "
          f"with --config.data.path={_OUT.value}", flush=True)
    return
  print(f"odyssey: encoded {meta['counts']} images to {meta['dtype']} latents of shape "
        f"{meta['shape']} (scaling factor {meta['scaling_factor']:.5g}) in {_OUT.value}; train "
        f"a latent DiT with --config.data.name=arrayrecord --config.data.path={_OUT.value}",
        flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
