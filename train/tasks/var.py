"""VAR next-scale prediction (nets/var.py) on the token maps of a multi-scale VQ tokenizer.

Data: the "arrayrecord" shards ``python -m train.encode`` writes from a tokenizer workdir (task
"vqvae", nets/vqvae.py): per image the ids of every scale, coarse to fine, and the label; their
metadata.json names the tokenizer, its scales and codebook size. The tokenizer's quantiser
(codebook and phi convolutions, frozen) turns the ids into VAR's teacher-forcing inputs
(``nets.var.teacher_inputs``); its decoder turns sampled ids into images.

Loss: cross-entropy of every token of every scale, averaged over tokens (class labels dropped to
the null class with model.class_dropout_prob, for guidance). Validation: loss and token accuracy.
Samples per eval: ``var.samples_per_class`` images of each class drawn scale by scale with the
KV cache, guidance ``var.cfg_scale`` and ``var.top_k`` / ``var.top_p``, decoded by the tokenizer,
as a PNG grid (one row per class).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nets import msvq
from nets import var as var_net
from train import diffusion_process, image_data

TOKENS_HOW = ("VAR trains on token maps: write them with python -m train.encode --workdir=VQ "
              "--out=TOKENS from a VQ tokenizer workdir (experiments/vqvae_digits.py) and set "
              "--config.data.path=TOKENS")


def tokenizer_of(data_cfg) -> dict:
  """The tokens' metadata.json (its "tokenizer" workdir, "tokenizer_step", "scales",
  "codebook_size"); one sentence when the data are not token maps."""
  if data_cfg.name != "arrayrecord" or not data_cfg.path or not os.path.isfile(
      os.path.join(data_cfg.path, "metadata.json")):
    raise ValueError(f"data.name={data_cfg.name!r}, data.path={data_cfg.path!r}: {TOKENS_HOW}.")
  image_data.check_image_config(data_cfg)
  meta = image_data._metadata(data_cfg)
  if not meta.get("tokenizer"):
    raise ValueError(f"data.path={data_cfg.path!r} holds no token maps (its metadata.json names "
                     f"no tokenizer); {TOKENS_HOW}.")
  return meta


class VARTask:
  """Token maps and labels in, next-scale logits out."""
  batch_axes = {"tokens": ("act_batch", None), "labels": ("act_batch",)}

  def __init__(self, config):
    self.config = config
    self._tokenizer = None  # (model, params) of the tokenizer, loaded on first use
    self._sample_fn = {}

  # --- the frozen tokenizer ------------------------------------------------------------------

  def tokenizer(self):
    """(tokenizer Model, its params), loaded once on one device (outside any mesh)."""
    if self._tokenizer is None:
      from train import checkpoint
      meta = tokenizer_of(self.config.data)
      no_mesh = jax.sharding.Mesh(np.empty((), dtype=object), ())
      with jax.set_mesh(no_mesh):
        _, model, _, params = checkpoint.load_trained(meta["tokenizer"],
                                                      step=meta.get("tokenizer_step"))
      self._tokenizer = (model, jax.device_get(params))
    return self._tokenizer

  def quantizer(self):
    """(msvq.Quantizer, its params as host arrays)."""
    model, params = self.tokenizer()
    return msvq.Quantizer(model.cfg.quantizer), params["quantizer"]

  # --- checks and data ---------------------------------------------------------------------

  def check(self, model_cfg):
    from train import checkpoint
    c = self.config
    meta = tokenizer_of(c.data)
    workdir = meta["tokenizer"]
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      raise ValueError(f"the tokens' tokenizer {workdir} (data.path's metadata.json) has no "
                       "config.json; it was moved or deleted.")
    tok = checkpoint.load_config(workdir)
    if tok.get("task") != "vqvae":
      raise ValueError(f"the tokens' tokenizer {workdir} holds a {tok.get('task')!r} model, not a "
                       "VQ tokenizer.")
    step = meta.get("tokenizer_step")
    if step is not None and step not in checkpoint.steps_in(workdir):
      raise ValueError(f"the tokens were written by step {step} of the tokenizer {workdir}, which "
                       f"no longer holds that checkpoint (it has steps "
                       f"{checkpoint.steps_in(workdir)}); tokenize again with train.encode.")
    from train import models
    tok_cfg = models.model_config(tok)
    want = dict(scales=tuple(meta["scales"]), codebook_size=int(meta["codebook_size"]),
                vae_dim=tok_cfg.embed_dim, num_classes=image_data.num_classes(c.data))
    got = dict(scales=tuple(model_cfg.scales), codebook_size=model_cfg.codebook_size,
               vae_dim=model_cfg.vae_dim, num_classes=model_cfg.num_classes)
    wrong = [f"model.{k}={got[k]} (the tokens have {want[k]})" for k in want if got[k] != want[k]]
    if wrong:
      raise ValueError(f"{', '.join(wrong)}: the model must match its tokens and tokenizer "
                       f"{workdir}.")
    v = c.var
    if not (isinstance(v.cfg_scale, (int, float)) and v.cfg_scale >= 1):
      raise ValueError(f"var.cfg_scale={v.cfg_scale!r} must be a number >= 1 (1: no guidance).")
    if v.cfg_scale != 1 and model_cfg.class_dropout_prob <= 0:
      raise ValueError(f"var.cfg_scale={v.cfg_scale} needs the null class, which the model learns "
                       "only with model.class_dropout_prob > 0.")
    if not (isinstance(v.top_k, int) and v.top_k >= 0) or not 0 < v.top_p <= 1:
      raise ValueError(f"var.top_k={v.top_k!r} must be an integer >= 0 (0: all) and "
                       f"var.top_p={v.top_p!r} in (0, 1].")
    if not (isinstance(v.samples_per_class, int) and v.samples_per_class >= 1):
      raise ValueError(f"var.samples_per_class={v.samples_per_class!r} must be a positive "
                       "integer.")
    image_data.check_splits(c.data, {
        "train": (c.train.batch_size, "train.batch_size"),
        "val": (c.eval.batch_size, "eval.batch_size")})

  def datasets(self):
    c = self.config

    def make(split, batch, shuffle, epochs):
      ds = image_data.make_dataset(c.data, split=split, global_batch_size=batch, seed=c.seed,
                                   shuffle=shuffle, num_epochs=epochs)
      return ds.map(lambda b: {"tokens": np.asarray(b["images"], np.int32),
                               "labels": np.asarray(b["labels"], np.int32)})
    return make("train", c.train.batch_size, True, None), make("val", c.eval.batch_size, False, 1)

  def example_batch(self, batch_size: int) -> dict:
    L = sum(s * s for s in tokenizer_of(self.config.data)["scales"])
    return {"tokens": np.zeros((batch_size, L), np.int32),
            "labels": np.zeros((batch_size,), np.int32)}

  def model_example_batch(self, batch_size: int, model_cfg) -> dict:
    return {"tokens": np.zeros((batch_size, model_cfg.max_len), np.int32),
            "labels": np.zeros((batch_size,), np.int32)}

  def init_args(self, batch):
    B, L = batch["tokens"].shape
    from train import models
    cfg = models.model_config(self.config)
    return (jnp.zeros((B, L - cfg.first_len, cfg.vae_dim), jnp.float32), batch["labels"])

  def throughput_unit(self) -> tuple[str, int]:
    return "images", self.config.train.batch_size

  def extra_metrics(self, model, params, *, sharding) -> dict:
    del model, params, sharding
    return {}

  # --- loss and evaluation -------------------------------------------------------------------

  def _logits(self, model, params, batch, rng, quantizer, qparams):
    """(logits [B, L, V], ids [B, L]) of one batch; ``rng`` None: no label dropout."""
    cfg = model.cfg
    ids_BxL = batch["tokens"]
    maps = [ids_BxL[:, a:b].reshape(-1, s, s)
            for s, a, b in zip(cfg.scales, cfg.offsets, cfg.offsets[1:])]
    x = var_net.teacher_inputs(quantizer, jax.tree.map(jnp.asarray, qparams), maps)
    if rng is None:
      logits = model.apply({"params": params}, x, batch["labels"])
    else:
      logits = model.apply({"params": params}, x, batch["labels"], train=True,
                           rngs={"dropout": rng})
    return logits, ids_BxL

  def loss_fn(self, model, permutation=None):
    del permutation

    quantizer, qparams = self.quantizer()  # loaded here, outside the traced step

    def loss_fn(params, batch, rng):
      logits, ids = self._logits(model, params, batch, rng, quantizer, qparams)
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
      acc = jnp.mean((jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32))
      return jnp.mean(nll), {"accuracy": acc}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    del permutation

    quantizer, qparams = self.quantizer()

    def eval_fn(params, batch):
      logits, ids = self._logits(model, params, batch, None, quantizer, qparams)
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
      correct = (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
      return {"loss_sum": jnp.sum(nll), "correct": jnp.sum(correct),
              "count": jnp.float32(ids.size)}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}

  def headline(self, metrics: dict) -> str:
    return f"val loss {metrics['loss']:.4f}, token accuracy {metrics['accuracy']:.2%}"

  # --- samples -------------------------------------------------------------------------------

  def sample_images(self, model, params, labels_B, seed: int, *, cfg_scale=None, top_k=None,
                    top_p=None):
    """Images [B, H, W, C] in [-1, 1] for the labels, drawn scale by scale and decoded."""
    v = self.config.var
    quantizer, qparams = self.quantizer()
    ids = var_net.sample(model, params, quantizer, jax.tree.map(jnp.asarray, qparams),
                         jnp.asarray(labels_B), jax.random.PRNGKey(seed),
                         cfg_scale=v.cfg_scale if cfg_scale is None else cfg_scale,
                         top_k=v.top_k if top_k is None else top_k,
                         top_p=v.top_p if top_p is None else top_p)
    return self.decode(ids)

  def decode(self, ids):
    """Images [B, H, W, C] float32 from the ids of every scale, by the tokenizer (one device)."""
    tok_model, tok_params = self.tokenizer()
    if "decode" not in self._sample_fn:
      self._sample_fn["decode"] = jax.jit(
          lambda p, ids: tok_model.apply({"params": p}, ids, method=tok_model.decode_ids))
    no_mesh = jax.sharding.Mesh(np.empty((), dtype=object), ())
    host_ids = [np.asarray(multihost_utils.process_allgather(i, tiled=True)) for i in ids]
    with jax.set_mesh(no_mesh):
      return np.clip(np.asarray(self._sample_fn["decode"](tok_params, host_ids)), -1, 1)

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> str:
    """workdir/samples/step_NNNNNN.png: var.samples_per_class images of every class, one row
    per class."""
    del final, data_parallel, sharding
    classes, per = model.cfg.num_classes, self.config.var.samples_per_class
    labels = np.repeat(np.arange(classes), per).astype(np.int32)
    images = self.sample_images(model, params, labels, self.config.seed)
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if jax.process_index() == 0:
      diffusion_process.save_grid(images, path, rows=classes)
    return path
