"""Latent datasets of an autoencoder (nets/autoencoder.py): what ``train.encode`` records in an
"arrayrecord" folder's metadata.json, and the decoder that turns a latent model's samples back
into images (``train.sample`` and the diffusion task's PNGs at every eval share it).

metadata.json of encoded latents adds to the "arrayrecord" layout (train/image_data.py):
  "scaling_factor": the latents are the posterior mean times this;
  "autoencoder": the absolute path of the autoencoder workdir; "autoencoder_step": its checkpoint.
"""

import json
import os
from typing import Callable

import numpy as np

KEYS = ("scaling_factor", "autoencoder", "autoencoder_step")


def recorded(data_cfg) -> dict | None:
  """{"scaling_factor", "autoencoder", "autoencoder_step"} of encoded latents, or None when the
  data is not an "arrayrecord" folder whose metadata.json names an autoencoder."""
  if data_cfg.name != "arrayrecord" or not data_cfg.path:
    return None
  try:
    with open(os.path.join(data_cfg.path, "metadata.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None  # the data checks name what is wrong with the folder
  if not isinstance(meta, dict) or not meta.get("autoencoder"):
    return None
  return {k: meta.get(k) for k in KEYS}


def load_decoder(config) -> Callable[[np.ndarray], np.ndarray] | None:
  """latents [N, h, w, L] (scaled, as the dataset holds them) -> images [N, H, W, C] in [-1, 1],
  for a diffusion ``config`` whose data are encoded latents (or whose ``diffusion.autoencoder``
  names an autoencoder workdir); None when there is no decoder to use.

  The autoencoder runs on one device, at the checkpoint step the metadata records (else its
  newest); the scaling factor is the metadata's, else the autoencoder config's.
  """
  import jax
  from train import checkpoint

  meta = recorded(config.data) or {}
  workdir = config.diffusion.get("autoencoder", "") or meta.get("autoencoder")
  if not workdir:
    return None
  vae_config = checkpoint.load_config(workdir)
  if vae_config.get("task") != "autoencoder":
    raise ValueError(f"{workdir} (the latents' decoder) holds a {vae_config.get('task')!r} model, "
                     "not an autoencoder.")
  scale = meta.get("scaling_factor") or vae_config.model.get("scaling_factor") or 0.0
  if not scale > 0:
    raise ValueError(f"no scaling factor for the latents of {workdir}: neither the data's "
                     "metadata.json nor the autoencoder's model.scaling_factor gives one.")
  step = meta.get("autoencoder_step") if meta.get("autoencoder") == workdir else None
  # Loaded and run on one device outside any mesh, as train.sample does, also when called inside
  # a training run's mesh context (the diffusion task's samples at every eval).
  no_mesh = jax.sharding.Mesh(np.empty((), dtype=object), ())
  with jax.set_mesh(no_mesh):
    _, model, _, params = checkpoint.load_trained(workdir, step=step)
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z / scale, method=model.decode))

  def decoded(latents):
    with jax.set_mesh(no_mesh):
      return np.asarray(decode(params, np.asarray(latents, np.float32)))
  return decoded
