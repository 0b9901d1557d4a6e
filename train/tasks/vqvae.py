"""VAR's multi-scale VQ tokenizer (nets/vqvae.py): reconstruction + VQ loss on any image source,
PSNR and codebook usage, dead-code restarts inside the train step, and a PNG of the val images
over their reconstructions from the first 1, 2, ..., K scales per eval.

Loss = reconstruction (``vqvae.loss``: l1 or l2, the mean over pixels) + ``vqvae.vq_weight`` x
the quantiser's VQ loss (beta x commitment + codebook, averaged over the scales; nets/msvq.py).

Codebook usage. The train state holds each code's running usage (``TrainState.task_state``, an
EMA with decay ``vqvae.usage_decay`` of the ids per step that chose it, over all scales; it starts
at ``vqvae.restart_threshold`` so no code is dead before it had a chance). After every optimizer
update the step tokenizes the batch with the new parameters, updates the usage and moves every
code whose usage fell below the threshold onto a residual vector of the batch drawn at random
(Jukebox's restart; its usage starts again at the threshold). ``restart_threshold`` 0 turns
restarts off. Train metrics: ``perplexity`` of the batch's ids, ``dead_codes`` (below threshold
before this step's restarts). Validation: PSNR, losses, the val ids' ``perplexity`` and
``unused_codes`` (codes no val id chose).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nets import msvq
from train import diffusion_process, image_data
from train.tasks import images
from train.tasks.autoencoder import check_reconstruction, psnr


class VQVAETask(images.ImageTask):
  """Images in, the same images out through multi-scale token maps."""

  def __init__(self, config):
    super().__init__(config)
    self._reconstruct = {}

  def check(self, model_cfg):
    v = self.config.vqvae
    for name in ("vq_weight", "restart_threshold"):
      value = v[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)) \
          or not 0 <= value < float("inf"):
        raise ValueError(f"vqvae.{name}={value!r} must be a finite number >= 0.")
    if isinstance(v.usage_decay, bool) or not isinstance(v.usage_decay, (int, float)) \
        or not 0 <= v.usage_decay < 1:
      raise ValueError(f"vqvae.usage_decay={v.usage_decay!r} must be in [0, 1).")
    check_reconstruction(self, model_cfg, "vqvae")

  def init_args(self, batch):
    return (batch["images"],)

  # --- the usage slot of the train state and the restart -------------------------------------

  def init_task_state(self, model_cfg):
    """{"usage": [V] float32}, every code at the threshold."""
    return {"usage": jnp.full((model_cfg.codebook_size,),
                              float(self.config.vqvae.restart_threshold), jnp.float32)}

  def task_update(self, model):
    """fn(params, task_state, batch, rng, axis_name) -> (params, task_state, metrics): the usage
    update and dead-code restart that follow each optimizer update."""
    v = self.config.vqvae
    decay, threshold = float(v.usage_decay), float(v.restart_threshold)

    def update(params, task_state, batch, rng, axis_name=None):
      ids, residuals = model.apply({"params": params}, batch["images"], method=model.tokenize)
      V = task_state["usage"].shape[0]
      counts = jnp.zeros((V,), jnp.float32).at[
          jnp.concatenate([i.reshape(-1) for i in ids])].add(1.0)
      candidates = residuals.reshape(-1, residuals.shape[-1])
      if axis_name is not None:  # every device restarts alike, from the whole batch
        counts = jax.lax.psum(counts, axis_name)
        candidates = jax.lax.all_gather(candidates, axis_name, tiled=True)
      usage = decay * task_state["usage"] + (1.0 - decay) * counts
      metrics = {"dead_codes": jnp.sum(usage < threshold).astype(jnp.float32)}
      if threshold > 0:
        quantizer = dict(params["quantizer"])
        codebook, restarted = msvq.restart_dead_codes(quantizer["codebook"], usage, candidates,
                                                      rng, threshold)
        quantizer["codebook"] = codebook
        params = {**params, "quantizer": quantizer}
        usage = jnp.where(restarted, threshold, usage)
      return params, {"usage": usage}, metrics

    return update

  # --- loss and evaluation -------------------------------------------------------------------

  def _terms(self, model, params, images_BxHxWxC):
    """(loss [B], per-image terms, code counts [V]) of one batch."""
    v = self.config.vqvae
    rec, _, vq_loss, counts = model.apply({"params": params}, images_BxHxWxC)
    err = rec - images_BxHxWxC
    rec_B = jnp.mean(jnp.abs(err) if v.loss == "l1" else jnp.square(err), axis=(1, 2, 3))
    vq_B = jnp.broadcast_to(vq_loss, rec_B.shape)
    loss_B = rec_B + v.vq_weight * vq_B
    return loss_B, {"rec_loss": rec_B, "vq_loss": vq_B,
                    "psnr": psnr(rec, images_BxHxWxC)}, counts

  def loss_fn(self, model, permutation=None):
    del permutation

    def loss_fn(params, batch, rng):
      del rng  # deterministic: the quantiser takes the nearest code
      loss_B, terms, counts = self._terms(model, params, batch["images"])
      metrics = {k: jnp.mean(v) for k, v in terms.items()}
      return jnp.mean(loss_B), {**metrics, "perplexity": msvq.perplexity(counts)}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    del permutation

    def eval_fn(params, batch):
      loss_B, terms, counts = self._terms(model, params, batch["images"])
      sums = {f"{k}_sum": jnp.sum(v) for k, v in terms.items()}
      return {"loss_sum": jnp.sum(loss_B), **sums, "code_counts": counts,
              "count": jnp.float32(batch["images"].shape[0])}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    counts = np.asarray(sums["code_counts"], np.float64)
    out = {k: float(sums[f"{k}_sum"]) / n for k in ("loss", "rec_loss", "vq_loss", "psnr")}
    out["perplexity"] = float(msvq.perplexity(jnp.asarray(counts, jnp.float32)))
    out["unused_codes"] = float(np.sum(counts == 0))
    return out

  def headline(self, metrics: dict) -> str:
    return (f"val loss {metrics['loss']:.4f}, rec_loss {metrics['rec_loss']:.4f}, "
            f"PSNR {metrics['psnr']:.2f} dB, codebook perplexity {metrics['perplexity']:.1f}, "
            f"{metrics['unused_codes']:.0f} codes unused")

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> str:
    """workdir/samples/step_NNNNNN.png: the first val images (top row) over their
    reconstructions from the token maps of the first 1, 2, ..., K scales (one row each; the
    last row is the full reconstruction)."""
    del final
    src = image_data.source(self.config.data, "val")
    n = min(self.config.vqvae.sample_images, len(src))
    originals = np.stack([src[i]["images"] for i in range(n)])
    padded = -(-n // data_parallel) * data_parallel
    batch = np.concatenate([originals, np.repeat(originals[:1], padded - n, axis=0)])
    batch = jax.device_put(batch, sharding["images"])
    if id(model) not in self._reconstruct:  # compiled once per model, not once per eval
      def by_scales(p, x):
        ids, _ = model.apply({"params": p}, x, method=model.tokenize)
        return jnp.stack([model.apply({"params": p}, ids[:k], method=model.decode_ids)
                          for k in range(1, len(ids) + 1)])
      self._reconstruct[id(model)] = jax.jit(by_scales)
    rows = self._reconstruct[id(model)](params, batch)  # [K, B, H, W, C]
    rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))[:, :n]
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if jax.process_index() == 0:
      grid = np.concatenate([originals, *np.clip(rows, -1, 1)])
      diffusion_process.save_grid(grid, path, rows=1 + rows.shape[0])
    return path
