"""Class-conditional diffusion (DiT, U-DiT): DDPM or flow-matching loss, sample grids per eval.

DiT also trains on a folder at native sizes (data.native_size=True): packed rows of images
(train/image_packing.py), a timestep and label per image slot, the loss averaged per image over
the slots that hold one. Samples stay square at model.input_size (the same parameters).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nets import moe
from train import diffusion_process, image_data, latents
from train.tasks import images

OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("flow",)}


class DiffusionTask(images.ImageTask):
  """Class-conditional generation: denoising loss, guided sample grids."""

  def __init__(self, config):
    super().__init__(config)
    d = config.diffusion
    self.schedule = (diffusion_process.make_schedule(d.schedule, d.num_steps)
                     if d.objective == "ddpm" else None)
    self._sample_fns = {}
    self._decoder = None  # latents -> images, loaded at the first samples() (train/latents.py)

  def check(self, model_cfg):
    d = self.config.diffusion
    super().check(model_cfg)
    if d.objective not in OBJECTIVES:
      raise ValueError(f"diffusion.objective={d.objective!r} is not one of {OBJECTIVES}.")
    if d.sampler not in SAMPLERS[d.objective]:
      raise ValueError(f"diffusion.sampler={d.sampler!r} does not fit objective {d.objective!r}; "
                       f"use one of {SAMPLERS[d.objective]}.")
    if d.objective == "flow" and model_cfg.learn_sigma:
      raise ValueError("model.learn_sigma=True needs diffusion.objective='ddpm' (flow matching "
                       "predicts a velocity, not a variance).")

  def check_packed(self, model_cfg):
    if self.config.model.name != "dit":
      raise ValueError(f"data.native_size=True trains model 'dit' (packed rows), not "
                       f"{self.config.model.name!r}; set data.native_size=False.")
    image_data.check_native(self.config.data, model_cfg, {
        "train": (self.config.train.batch_size, "train.batch_size"),
        "val": (self.config.eval.batch_size, "eval.batch_size")}, self.config.seed)

  def init_args(self, batch):
    if self.packed:
      t = jnp.zeros(batch["labels"].shape, jnp.float32)
      return (batch["patches"], t, batch["labels"], False, None, batch["segment_ids"],
              batch["positions"])
    return (batch["images"], jnp.zeros(batch["labels"].shape, jnp.float32), batch["labels"])

  def _loss(self, model, params, batch, rng, train: bool):
    drop_rng, noise_rng = jax.random.split(rng)
    aux = []  # the MoE auxiliary loss and metrics of the one model call

    packed = ({"segment_ids_BxS": batch["segment_ids"], "positions_BxSx2": batch["positions"]}
              if self.packed else {})

    def model_fn(x, t, y, _rng=None):
      out, aux_loss, aux_metrics = moe.apply_with_aux(model, {"params": params}, x, t, y,
                                                      train=train, rngs={"dropout": drop_rng},
                                                      **packed)
      aux.append((aux_loss, aux_metrics))
      return out

    if self.packed:  # the images count weighs grad_accum micro-batches (train/steps.py)
      loss, metrics = self._packed_loss(model, model_fn, batch, noise_rng)
      metrics = {**metrics, "images": jnp.sum(batch["image_mask"].astype(jnp.float32))}
    elif self.config.diffusion.objective == "ddpm":
      loss, metrics = diffusion_process.ddpm_loss(model_fn, self.schedule, batch["images"],
                                          batch["labels"], noise_rng,
                                          learn_sigma=model.cfg.learn_sigma)
    else:
      loss, metrics = diffusion_process.flow_loss(model_fn, batch["images"], batch["labels"], noise_rng)
    (aux_loss, aux_metrics), = aux
    if aux_metrics:
      metrics = {**metrics, "denoise_loss": loss, **aux_metrics}
    return loss + aux_loss, metrics

  def _packed_loss(self, model, model_fn, batch, rng):
    args = (batch["patches"], batch["segment_ids"], batch["image_mask"], batch["labels"], rng)
    if self.config.diffusion.objective == "ddpm":
      return diffusion_process.packed_ddpm_loss(model_fn, self.schedule, *args,
                                                channels=model.cfg.in_channels,
                                                learn_sigma=model.cfg.learn_sigma)
    return diffusion_process.packed_flow_loss(model_fn, *args)

  def loss_fn(self, model, permutation=None):
    del permutation  # bidirectional attention: no causal balancing needed
    return lambda params, batch, rng: self._loss(model, params, batch, rng, train=True)

  def eval_fn(self, model, permutation=None):
    del permutation

    def eval_fn(params, batch):
      # A fixed noise draw, so successive evaluations compare the same (x0, t, noise) triples.
      loss, metrics = self._loss(model, params, batch, jax.random.PRNGKey(self.config.seed),
                                 False)
      loss = metrics.get("denoise_loss", loss)  # without the MoE auxiliary terms
      n = (jnp.sum(batch["image_mask"].astype(jnp.float32)) if self.packed
           else jnp.float32(batch["labels"].shape[0]))
      return {"loss_sum": loss * n, "count": n}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    return {"loss": float(sums["loss_sum"]) / max(float(sums["count"]), 1.0)}

  def headline(self, metrics: dict) -> str:
    return f"val loss {metrics['loss']:.4f}"

  def sample_images(self, model, params, labels, seed: int):
    """Class-conditional samples [len(labels), H, W, C] in [-1, 1], with guidance."""
    key = (id(model), tuple(np.asarray(labels).shape))
    if key not in self._sample_fns:
      self._sample_fns[key] = jax.jit(functools.partial(self._sample, model))
    return self._sample_fns[key](params, jnp.asarray(labels), jax.random.PRNGKey(seed))

  def _sample(self, model, params, labels, rng):
    d = self.config.diffusion
    side = model.cfg.image_size  # the model's input, which check() matched to the data
    shape = (labels.shape[0], side, side, model.cfg.channels)
    model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if d.cfg_scale != 1.0:
      model_fn = diffusion_process.cfg_model_fn(model_fn, d.cfg_scale, null_label=model.cfg.num_classes)
    if d.sampler == "ddpm":
      return diffusion_process.ddpm_sample(model_fn, self.schedule, shape, labels, rng,
                                   learn_sigma=model.cfg.learn_sigma, steps=d.sample_steps)
    if d.sampler == "ddim":
      return diffusion_process.ddim_sample(model_fn, self.schedule, shape, labels, rng,
                                   steps=d.sample_steps, eta=d.ddim_eta,
                                   learn_sigma=model.cfg.learn_sigma)
    return diffusion_process.flow_sample(model_fn, shape, labels, rng, steps=d.sample_steps)

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> str | None:
    """A PNG grid, one row per class, written to workdir/samples/step_NNNNNN.png at every eval;
    latents are decoded by their autoencoder first, or saved as .npy when they have none."""
    del final
    d = self.config.diffusion
    classes = min(model.cfg.num_classes, d.sample_classes or model.cfg.num_classes)
    per_class = d.samples_per_class
    n = classes * per_class
    padded = -(-n // data_parallel) * data_parallel
    labels = np.concatenate([np.repeat(np.arange(classes), per_class),
                             np.zeros(padded - n, np.int64)]).astype(np.int32)
    labels_sharding = sharding["labels"]
    if self.packed:  # packed batches hold labels per slot [B, K]; samples are one per row
      labels_sharding = jax.sharding.NamedSharding(labels_sharding.mesh,
                                                   jax.sharding.PartitionSpec(
                                                       labels_sharding.spec[0]))
    labels = jax.device_put(labels, labels_sharding)
    images = np.asarray(multihost_utils.process_allgather(
        self.sample_images(model, params, labels, self.config.seed), tiled=True))
    if images.shape[-1] not in (1, 3):
      if self._decoder is None:
        self._decoder = latents.load_decoder(self.config) or False
      images = self._decoder(images) if self._decoder else images
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if images.shape[-1] not in (1, 3):
      path = path[:-len(".png")] + ".npy"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if path.endswith(".npy"):
        np.save(path, images[:n])
      else:
        diffusion_process.save_grid(images[:n], path, rows=classes)
    return path
