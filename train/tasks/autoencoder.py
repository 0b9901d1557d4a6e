"""The KL autoencoder of latent diffusion: reconstruction + KL loss on any image source, PSNR,
and a PNG of originals over reconstructions per eval.

Training decodes a posterior sample (mean + std · noise, the step's rng); evaluation and the PNG
decode the posterior mean. Loss = reconstruction (``autoencoder.loss``: l1 or l2, the mean over
pixels) + ``autoencoder.kl_weight`` x KL(posterior || N(0, I)) summed over the latent elements
and averaged over the batch (diffusers' DiagonalGaussianDistribution.kl). PSNR is per image on
[-1, 1] (peak-to-peak 2), reconstructions clipped to that range, averaged over images.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nets import autoencoder
from train import diffusion_process, image_data
from train.tasks import images

LOSSES = ("l1", "l2")


def psnr(rec_BxHxWxC, x_BxHxWxC):
  """Per-image PSNR [B] in dB of images in [-1, 1]."""
  err = jnp.clip(rec_BxHxWxC, -1.0, 1.0) - x_BxHxWxC
  mse_B = jnp.mean(jnp.square(err), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_B, 1e-10))


def check_reconstruction(task, model_cfg, group: str) -> None:
  """What the image-reconstruction tasks share (this one and the VQ tokenizer's): the data config,
  ``config.<group>``'s loss and sample_images, images the model's size, splits that fill a batch."""
  c = task.config
  g = c[group]
  image_data.check_image_config(c.data)
  if task.packed:
    task.check_packed(model_cfg)
  if g.loss not in LOSSES:
    raise ValueError(f"{group}.loss={g.loss!r} is not one of {LOSSES}.")
  if isinstance(g.sample_images, bool) or not isinstance(g.sample_images, int) \
      or g.sample_images < 1:
    raise ValueError(f"{group}.sample_images={g.sample_images!r} must be a positive integer.")
  shape = tuple(image_data.image_shape(c.data))
  want = (model_cfg.image_size, model_cfg.image_size, model_cfg.in_channels)
  if shape != want:
    raise ValueError(f"data images are {shape[0]}x{shape[1]}x{shape[2]} but the model expects "
                     f"{want[0]}x{want[1]}x{want[2]} (model.image_size, model.in_channels); "
                     "set data.image_size or the model's.")
  image_data.check_splits(c.data, {
      "train": (c.train.batch_size, "train.batch_size"),
      "val": (c.eval.batch_size, "eval.batch_size")})


class AutoencoderTask(images.ImageTask):
  """Images in, the same images out through a KL-regularised latent."""

  def __init__(self, config):
    super().__init__(config)
    self._reconstruct = {}

  def check(self, model_cfg):
    a = self.config.autoencoder
    if not (isinstance(a.kl_weight, (int, float)) and 0 <= a.kl_weight < float("inf")):
      raise ValueError(f"autoencoder.kl_weight={a.kl_weight!r} must be a finite number >= 0.")
    check_reconstruction(self, model_cfg, "autoencoder")

  def init_args(self, batch):
    return (batch["images"],)

  def _terms(self, model, params, images_BxHxWxC, rng):
    """(loss, metrics) of one batch; ``rng`` None decodes the posterior mean."""
    a = self.config.autoencoder
    kwargs = ({} if rng is None else
              dict(train=True, sample_posterior=True, rngs={"latent": rng}))
    rec, mean, logvar = model.apply({"params": params}, images_BxHxWxC, **kwargs)
    err = rec - images_BxHxWxC
    rec_B = jnp.mean(jnp.abs(err) if a.loss == "l1" else jnp.square(err), axis=(1, 2, 3))
    kl_B = autoencoder.kl(mean, logvar)
    loss_B = rec_B + a.kl_weight * kl_B
    return loss_B, {"rec_loss": rec_B, "kl": kl_B, "psnr": psnr(rec, images_BxHxWxC)}

  def loss_fn(self, model, permutation=None):
    del permutation

    def loss_fn(params, batch, rng):
      loss_B, terms = self._terms(model, params, batch["images"], rng)
      return jnp.mean(loss_B), {k: jnp.mean(v) for k, v in terms.items()}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    del permutation

    def eval_fn(params, batch):
      loss_B, terms = self._terms(model, params, batch["images"], None)
      sums = {f"{k}_sum": jnp.sum(v) for k, v in terms.items()}
      return {"loss_sum": jnp.sum(loss_B), **sums,
              "count": jnp.float32(batch["images"].shape[0])}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {k: float(sums[f"{k}_sum"]) / n for k in ("loss", "rec_loss", "kl", "psnr")}

  def headline(self, metrics: dict) -> str:
    return (f"val loss {metrics['loss']:.4f}, rec_loss {metrics['rec_loss']:.4f}, "
            f"PSNR {metrics['psnr']:.2f} dB")

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> str:
    """workdir/samples/step_NNNNNN.png: the first val images (top row) over their
    reconstructions from the posterior mean (bottom row)."""
    del final
    src = image_data.source(self.config.data, "val")
    n = min(self.config.autoencoder.sample_images, len(src))
    originals = np.stack([src[i]["images"] for i in range(n)])
    padded = -(-n // data_parallel) * data_parallel
    batch = np.concatenate([originals, np.repeat(originals[:1], padded - n, axis=0)])
    batch = jax.device_put(batch, sharding["images"])
    if id(model) not in self._reconstruct:  # compiled once per model, not once per eval
      self._reconstruct[id(model)] = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    rec = self._reconstruct[id(model)](params, batch)
    rec = np.asarray(multihost_utils.process_allgather(rec, tiled=True))[:n]
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if jax.process_index() == 0:
      diffusion_process.save_grid(np.concatenate([originals, np.clip(rec, -1, 1)]), path, rows=2)
    return path
