"""Class-conditional diffusion (DiT, U-DiT): DDPM or flow-matching loss, sample grids per eval.

DiT also trains on a folder at native sizes (data.native_size=True): packed rows of images
(train/image_packing.py), a timestep and label per image slot, the loss averaged per image over
the slots that hold one. Samples stay square at model.input_size (the same parameters).

Text-conditioned families (Family.conditioning == "text": pixart, mmdit) take caption batches
{"images": [B, H, W, C], "text_ids": [B, L] int32, "text_mask": [B, L] bool} (byte tokens,
nets/text_encoder.py) instead of labels; the losses pass the caption (ids, mask) where labels go,
and guidance runs the model's own caption dropout (force_drop_ids_B) for the unconditional half.
Entry points: ``sample_text_images(model, params, text_ids, text_mask, seed)`` and
``text_batch(images, captions, text_len)``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nets import moe, registry
from train import caption_data, diffusion_process, image_data, latents, models, tokenizer
from train.tasks import images

OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("flow",)}
TIME_DISTS = ("uniform", "logit_normal")  # flow timesteps: U(0, 1) or sigmoid(N(0, 1)) (SD3)
TEXT_AXES = {"images": images.IMAGE_AXES, "text_ids": ("act_batch", None),
             "text_mask": ("act_batch", None)}
TEXT_EVAL = ("val", "heldout")  # train/caption_data.py's evaluation splits


def text_batch(images_BxHxWxC, captions: list[str], text_len: int, tokens: str = "byt5") -> dict:
  """A caption batch from images and strings (ids, EOS, padding), as the data yields: ByT5 byte
  ids (cut to fit, as byt5_ids), or whole captions in the "words" vocabulary
  (train/caption_data.py's data.caption_tokens)."""
  if tokens == "byt5":
    ids, mask = tokenizer.byt5_ids(list(captions), text_len)
  else:
    ids, mask = caption_data.caption_batch(list(captions), text_len, tokens)
  return {"images": np.asarray(images_BxHxWxC, np.float32), "text_ids": ids, "text_mask": mask}


class DiffusionTask(images.ImageTask):
  """Class-conditional generation: denoising loss, guided sample grids."""

  def __init__(self, config):
    super().__init__(config)
    d = config.diffusion
    self.schedule = (diffusion_process.make_schedule(d.schedule, d.num_steps)
                     if d.objective == "ddpm" else None)
    self._sample_fns = {}
    self.text = registry.get(config.model.name).conditioning == "text"
    if self.text:
      self.batch_axes = TEXT_AXES
    self._decoder = None  # latents -> images, loaded at the first samples() (train/latents.py)

  def check(self, model_cfg):
    d = self.config.diffusion
    if self.text:
      self._check_text(model_cfg)
    else:
      super().check(model_cfg)
    if d.objective not in OBJECTIVES:
      raise ValueError(f"diffusion.objective={d.objective!r} is not one of {OBJECTIVES}.")
    if d.sampler not in SAMPLERS[d.objective]:
      raise ValueError(f"diffusion.sampler={d.sampler!r} does not fit objective {d.objective!r}; "
                       f"use one of {SAMPLERS[d.objective]}.")
    if d.time_dist not in TIME_DISTS:
      raise ValueError(f"diffusion.time_dist={d.time_dist!r} is not one of {TIME_DISTS}.")
    if d.time_dist != "uniform" and (d.objective != "flow" or self.packed):
      raise ValueError(f"diffusion.time_dist={d.time_dist!r} shapes the flow objective's "
                       "timesteps on square images; use 'uniform' with objective 'ddpm' or "
                       "packed rows.")
    shift = d.get("time_shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) \
        or not (0 < shift < float("inf")):
      raise ValueError(f"diffusion.time_shift={shift!r} must be a finite number above 0 "
                       "(1: no shift).")
    if shift != 1.0 and (d.objective != "flow" or self.packed):
      raise ValueError(f"diffusion.time_shift={shift!r} shifts the flow objective's timesteps "
                       "on square images; leave it at 1.0 with objective 'ddpm' or packed rows.")
    if d.objective == "flow" and model_cfg.learn_sigma:
      raise ValueError("model.learn_sigma=True needs diffusion.objective='ddpm' (flow matching "
                       "predicts a velocity, not a variance).")

  def _check_text(self, model_cfg):
    """Caption batches: a caption dataset whose canvases and caption length match the model, and
    whose splits fill a batch (before the workdir is touched)."""
    data = self.config.data
    if self.packed:
      raise ValueError(f"data.native_size=True packs class-labelled images; model "
                       f"'{self.config.model.name}' takes captions, so set data.native_size=False.")
    if data.name != "digit_captions":
      raise ValueError(f"model '{self.config.model.name}' is trained on captions; data.name="
                       f"{data.name!r} has none (use 'digit_captions').")
    image_data.check_image_config(data)
    side = image_data.image_shape(data)[0]
    if side != model_cfg.image_size:
      raise ValueError(f"data.image_size={data.image_size} gives {side}x{side} canvases but "
                       f"model.input_size={model_cfg.image_size}; the model denoises the data's "
                       "canvases.")
    if data.text_len != model_cfg.text_len:
      raise ValueError(f"data.text_len={data.text_len} but model.text_len={model_cfg.text_len}; "
                       "the model reads captions of the data's length.")
    tokens = caption_data.tokens_of(data)
    if tokens != "byt5" and model_cfg.text_encoder == "t5":
      raise ValueError(f"model.text_encoder='t5' reads ByT5 byte ids but data.caption_tokens="
                       f"{tokens!r}; set data.caption_tokens='byt5' with a T5 encoder.")
    for prompt in self.config.diffusion.prompts:
      try:
        caption_data.caption_ids(prompt, model_cfg.text_len, tokens)
      except ValueError as e:
        raise ValueError(f"diffusion.prompts: {e}") from None
    image_data.check_splits(data, {
        "train": (self.config.train.batch_size, "train.batch_size"),
        **{split: (self.config.eval.batch_size, "eval.batch_size") for split in TEXT_EVAL}})

  def check_packed(self, model_cfg):
    if self.config.model.name != "dit":
      raise ValueError(f"data.native_size=True trains model 'dit' (packed rows), not "
                       f"{self.config.model.name!r}; set data.native_size=False.")
    image_data.check_native(self.config.data, model_cfg, {
        "train": (self.config.train.batch_size, "train.batch_size"),
        "val": (self.config.eval.batch_size, "eval.batch_size")}, self.config.seed)

  def datasets(self):
    """Text families: canvases with captions; validation on both the "val" captions (the
    training distribution) and the "heldout" ones (combinations never trained on)."""
    if not self.text:
      return super().datasets()
    c = self.config
    keep = lambda batch: {k: batch[k] for k in TEXT_AXES}  # layout/sizes are for the metrics
    make = lambda split, batch, shuffle, epochs: image_data.make_dataset(
        c.data, split=split, global_batch_size=batch, seed=c.seed, shuffle=shuffle,
        num_epochs=epochs).map(keep)
    return (make("train", c.train.batch_size, True, None),
            {split: make(split, c.eval.batch_size, False, 1) for split in TEXT_EVAL})

  def source_headline(self, by_source: dict[str, dict]) -> str:
    """Each caption split's validation loss, for the line after ``headline``."""
    return ", ".join(f"{key} {m['loss']:.4f}" for key, m in by_source.items())

  def example_batch(self, batch_size: int) -> dict:
    if self.text:
      return self.model_example_batch(batch_size, models.model_config(self.config))
    return super().example_batch(batch_size)

  def model_example_batch(self, batch_size: int, model_cfg) -> dict:
    if not self.text:
      return super().model_example_batch(batch_size, model_cfg)
    side, ch, L = model_cfg.image_size, model_cfg.channels, model_cfg.text_len
    return {"images": np.zeros((batch_size, side, side, ch), np.float32),
            "text_ids": np.zeros((batch_size, L), np.int32),
            "text_mask": np.ones((batch_size, L), bool)}

  def condition(self, batch):
    """What the losses and samplers pass where labels go: labels, or (caption ids, mask)."""
    return (batch["text_ids"], batch["text_mask"]) if self.text else batch["labels"]

  def init_args(self, batch):
    if self.text:
      return (batch["images"], jnp.zeros(batch["images"].shape[:1], jnp.float32),
              batch["text_ids"], batch["text_mask"])
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
      cond = y if self.text else (y,)  # captions: (ids, mask)
      out, aux_loss, aux_metrics = moe.apply_with_aux(model, {"params": params}, x, t, *cond,
                                                      train=train, rngs={"dropout": drop_rng},
                                                      **packed)
      aux.append((aux_loss, aux_metrics))
      return out

    if self.packed:  # the images count weighs grad_accum micro-batches (train/steps.py)
      loss, metrics = self._packed_loss(model, model_fn, batch, noise_rng)
      metrics = {**metrics, "images": jnp.sum(batch["image_mask"].astype(jnp.float32))}
    elif self.config.diffusion.objective == "ddpm":
      loss, metrics = diffusion_process.ddpm_loss(model_fn, self.schedule, batch["images"],
                                          self.condition(batch), noise_rng,
                                          learn_sigma=model.cfg.learn_sigma)
    else:
      loss, metrics = diffusion_process.flow_loss(model_fn, batch["images"],
                                                  self.condition(batch), noise_rng,
                                                  time_dist=self.config.diffusion.time_dist,
                                                  shift=self.config.diffusion.get("time_shift", 1.0))
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
           else jnp.float32(batch["images"].shape[0]))
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

  def sample_text_images(self, model, params, text_ids, text_mask, seed: int):
    """Caption-conditioned samples [B, H, W, C] in [-1, 1] from byte-token ids and mask [B, L]
    (``tokenizer.byt5_ids``), with guidance at diffusion.cfg_scale."""
    key = (id(model), tuple(np.asarray(text_ids).shape))
    if key not in self._sample_fns:
      self._sample_fns[key] = jax.jit(functools.partial(self._sample, model))
    return self._sample_fns[key](params, (jnp.asarray(text_ids), jnp.asarray(text_mask, bool)),
                                 jax.random.PRNGKey(seed))

  def _sample(self, model, params, labels, rng):
    """``labels``: class labels [B], or (caption ids, mask) for a text family."""
    d = self.config.diffusion
    side = model.cfg.image_size  # the model's input, which check() matched to the data
    B = jax.tree.leaves(labels)[0].shape[0]
    shape = (B, side, side, model.cfg.channels)
    if self.text:
      apply = lambda x, t, y, drop=None: model.apply({"params": params}, x, t, *y,
                                                     force_drop_ids_B=drop)
      model_fn = (apply if d.cfg_scale == 1.0
                  else diffusion_process.cfg_drop_model_fn(apply, d.cfg_scale))
    else:
      model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if not self.text and d.cfg_scale != 1.0:
      model_fn = diffusion_process.cfg_model_fn(model_fn, d.cfg_scale, null_label=model.cfg.num_classes)
    # Pixels lie in [-1, 1], so DDPM/DDIM clip each x0 prediction there; arrays ("arrayrecord",
    # e.g. VAE latents, which reach past 3) are left alone, as DiT samples its latents.
    clip = self.config.data.name != "arrayrecord"
    if d.sampler == "ddpm":
      return diffusion_process.ddpm_sample(model_fn, self.schedule, shape, labels, rng,
                                   learn_sigma=model.cfg.learn_sigma, steps=d.sample_steps,
                                   clip=clip)
    if d.sampler == "ddim":
      return diffusion_process.ddim_sample(model_fn, self.schedule, shape, labels, rng,
                                   steps=d.sample_steps, eta=d.ddim_eta,
                                   learn_sigma=model.cfg.learn_sigma, clip=clip)
    return diffusion_process.flow_sample(model_fn, shape, labels, rng, steps=d.sample_steps,
                                         shift=d.get("time_shift", 1.0))

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> str | None:
    """A PNG grid, one row per class (per diffusion.prompts caption for a text family), written
    to workdir/samples/step_NNNNNN.png at every eval; latents are decoded by their autoencoder
    first, or saved as .npy when they have none."""
    del final
    d = self.config.diffusion
    if self.text:
      return self._text_samples(model, params, step=step, workdir=workdir,
                                data_parallel=data_parallel, sharding=sharding)
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

  def _text_samples(self, model, params, *, step, workdir, data_parallel, sharding) -> str:
    d = self.config.diffusion
    prompts = list(d.prompts)
    n = len(prompts) * d.samples_per_class
    padded = -(-n // data_parallel) * data_parallel
    captions = [c for c in prompts for _ in range(d.samples_per_class)]
    batch = text_batch(np.zeros((padded, 1, 1, 1)), captions + [""] * (padded - n),
                       model.cfg.text_len, caption_data.tokens_of(self.config.data))
    ids = jax.device_put(batch["text_ids"], sharding["text_ids"])
    mask = jax.device_put(batch["text_mask"], sharding["text_mask"])
    images = np.asarray(multihost_utils.process_allgather(
        self.sample_text_images(model, params, ids, mask, self.config.seed), tiled=True))
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      diffusion_process.save_grid(images[:n], path, rows=len(prompts))
    return path
