"""Image samples from a diffusion workdir: class-conditional (DiT, U-DiT, U-ViT; trained or
imported) or text-conditioned (PixArt, MMDiT); or from a VAR workdir (nets/var.py).

  python -m train.sample --workdir=DIR --classes=0,3,7 --cfg=4.0 --steps=50 [--per_class=4]
      [--sampler=ddim|ddpm|flow] [--seed=0] [--step=N] [--out=FILE.png] [--weights=auto|raw|ema]
  python -m train.sample --workdir=DIR --prompt="a large 3 in the center" [--prompt=...] ...

One row per class (or per --prompt, repeatable) in a PNG grid (default
DIR/samples/sample_<classes>_cfg<cfg>_<steps>steps.png, or prompt_<hash>_... for prompts).
The sampler, noise schedule and objective are the workdir's ``config.diffusion``; --cfg and --steps
override the guidance scale and the number of sampling steps. Models of latents decode them with
the autoencoder their data's metadata.json names (``train.encode``; or ``diffusion.autoencoder``)
into a PNG (train/latents.py); latents with no decoder (e.g. a diffusers DiT-XL/2 import) are
written as ``.npy``.

  python -m train.sample --workdir=VAR --classes=0,3,7 --cfg=3 [--top_k=0] [--top_p=1.0] ...

A VAR workdir draws scale by scale with its KV cache and decodes with the tokenizer its tokens
name (default DIR/samples/sample_<classes>_cfg<cfg>_topk<k>_topp<p>.png); --cfg, --top_k and
--top_p default to its ``config.var``; --steps, --sampler and --prompt do not apply.
"""

import hashlib
import math
import os
import sys

from absl import app, flags, logging



SEED_LIMIT = 2**32  # jax.random.PRNGKey keeps 32 bits


def _check_classes(classes: list[int], num_classes: int) -> None:
  if not classes:
    raise ValueError("--classes is empty; give at least one class id.")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"--classes {bad} are outside the model's {num_classes} classes "
                     f"(0..{num_classes - 1}).")


def _check_cfg(cfg_scale: float) -> None:
  if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
    raise ValueError(f"--cfg={cfg_scale} must be a finite number >= 0 (the classifier-free "
                     "guidance scale: 1 = no guidance, 0 = unconditional).")


def _check_common(per_class: int, seed: int, step: int | None) -> None:
  if per_class < 1:
    raise ValueError(f"--per_class={per_class} must be at least 1.")
  if not 0 <= seed < SEED_LIMIT:
    raise ValueError(f"--seed={seed} must be in [0, 2**32 - 1].")
  if step is not None and step < 0:
    raise ValueError(f"--step={step} must be a checkpoint step >= 0 (leave it out for the "
                     "newest).")


def check_task(workdir: str, config) -> None:
  """One sentence when ``workdir`` holds no diffusion model (read from its config.json alone)."""
  task = config.get("task")
  if task not in ("diffusion", "var"):
    hint = "; use python -m train.generate for language models" if task == "lm" else ""
    raise ValueError(f"{workdir} holds a {task!r} model; train.sample needs a diffusion model "
                     f"(task 'diffusion') or a VAR model (task 'var'){hint}.")


def check_var_flags(config, model_cfg, classes, cfg_scale, top_k, top_p, per_class, seed, step,
                    *, steps=None, sampler=None, prompts=None) -> None:
  """One sentence for the first flag a VAR workdir cannot sample with (before compiling)."""
  for name, value in (("--steps", steps), ("--sampler", sampler), ("--prompt", prompts)):
    if value:
      raise ValueError(f"{name} does not apply to a VAR model, which draws scale by scale; "
                       "leave it out.")
  _check_classes(classes, model_cfg.num_classes)
  _check_cfg(cfg_scale)
  if cfg_scale != 1.0 and model_cfg.class_dropout_prob <= 0:
    raise ValueError(f"--cfg={cfg_scale} needs a model trained with label dropout (it has no "
                     "unconditional mode); use --cfg=1.")
  if top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"--top_k={top_k} must be >= 0 (0: all codes) and --top_p={top_p} in "
                     "(0, 1].")
  _check_common(per_class, seed, step)


def sample_var(workdir: str, config, classes: list[int], *, cfg_scale, top_k, top_p, per_class,
               seed, step, out, steps=None, sampler=None, prompts=None,
               weights: str = "auto") -> tuple[str, object]:
  """``sample`` for a VAR workdir: one row per class, decoded by the tokens' tokenizer."""
  import numpy as np

  from train import checkpoint, diffusion_process, models, tasks
  v = config.var
  cfg_scale = v.cfg_scale if cfg_scale is None else cfg_scale
  top_k = v.top_k if top_k is None else top_k
  top_p = v.top_p if top_p is None else top_p
  check_var_flags(config, models.model_config(config), classes, cfg_scale, top_k, top_p,
                  per_class, seed, step, steps=steps, sampler=sampler, prompts=prompts)
  config, model, _, params = checkpoint.load_trained(workdir, step=step, weights=weights)
  config.var.update(cfg_scale=float(cfg_scale), top_k=int(top_k), top_p=float(top_p))
  task = tasks.get(config)
  task.check(model.cfg)  # the tokens and their tokenizer are still there, and still match
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  images = np.asarray(task.sample_images(model, params, labels, seed))
  tag = f"sample_{'-'.join(map(str, classes))}_cfg{cfg_scale:g}_topk{top_k}_topp{top_p:g}"
  path = out or os.path.join(workdir, "samples", tag + ".png")
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  diffusion_process.save_grid(images, path, rows=len(classes))
  return path, images


def check_flags(config, model_cfg, classes: list[int], cfg_scale: float, steps: int,
                per_class: int, seed: int = 0, step: int | None = None,
                prompts: list[str] | None = None) -> None:
  """One sentence for the first flag this workdir cannot sample with (before compiling)."""
  from nets import registry
  from train import caption_data
  text = registry.get(config.model.name).conditioning == "text"
  if text:
    if classes:
      raise ValueError(f"model '{config.model.name}' is conditioned on captions; give "
                       "--prompt=TEXT (repeatable) instead of --classes.")
    if not prompts:
      raise ValueError(f"model '{config.model.name}' is conditioned on captions; give at least "
                       "one --prompt=TEXT.")
    tokens = caption_data.tokens_of(config.data)
    for prompt in prompts:
      try:
        caption_data.caption_ids(prompt, model_cfg.text_len, tokens)
      except ValueError as e:
        raise ValueError(f"--prompt: {str(e).rstrip('.')} (this model reads {tokens!r} ids, "
                         f"model.text_len={model_cfg.text_len}).") from None
  else:
    if prompts:
      raise ValueError(f"model '{config.model.name}' is class-conditional; give --classes, not "
                       "--prompt.")
    _check_classes(classes, model_cfg.num_classes)
  _check_cfg(cfg_scale)
  dropout = model_cfg.caption_dropout_prob if text else model_cfg.class_dropout_prob
  if cfg_scale != 1.0 and dropout <= 0:
    what = "caption" if text else "label"
    raise ValueError(f"--cfg={cfg_scale} needs a model trained with {what} dropout (it has no "
                     "unconditional mode); use --cfg=1.")
  d = config.diffusion
  limit = d.num_steps if d.objective == "ddpm" else None  # DDPM/DDIM respace the schedule
  if steps < 1 or (limit is not None and steps > limit):
    upper = f"{limit} (the training schedule's diffusion.num_steps)" if limit else "no limit"
    raise ValueError(f"--steps={steps} must be at least 1 and at most {upper}.")
  _check_common(per_class, seed, step)


def sample(workdir: str, classes: list[int], *, cfg_scale: float | None = None,
           steps: int | None = None, sampler: str | None = None, per_class: int = 4,
           seed: int = 0, step: int | None = None, out: str | None = None,
           prompts: list[str] | None = None, weights: str = "auto", top_k: int | None = None,
           top_p: float | None = None) -> tuple[str, object]:
  """Writes the grid (or latents) and returns (path, samples [N, H, W, C] in [-1, 1]): one row
  per class, or per prompt for a text-conditioned model, ``per_class`` samples each."""
  import numpy as np

  from train import checkpoint, diffusion_process, latents as latents_lib, models, tasks

  config = checkpoint.load_config(workdir)
  check_task(workdir, config)
  if config.task == "var":
    return sample_var(workdir, config, classes, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                      per_class=per_class, seed=seed, step=step, out=out, steps=steps,
                      sampler=sampler, prompts=prompts, weights=weights)
  if top_k is not None or top_p is not None:
    raise ValueError("--top_k and --top_p apply to VAR models; a diffusion model has none.")
  d = config.diffusion
  d.cfg_scale = d.cfg_scale if cfg_scale is None else cfg_scale
  d.sample_steps = d.sample_steps if steps is None else steps
  d.sampler = d.sampler if sampler is None else sampler
  check_flags(config, models.model_config(config), classes, d.cfg_scale, d.sample_steps,
              per_class, seed, step, prompts)
  from train.tasks.diffusion import SAMPLERS
  if d.sampler not in SAMPLERS[d.objective]:
    raise ValueError(f"--sampler={d.sampler} does not fit this model's objective {d.objective!r}; "
                     f"use one of {SAMPLERS[d.objective]}.")
  config, model, _, params = checkpoint.load_trained(workdir, step=step, weights=weights)
  config.diffusion.update(cfg_scale=d.cfg_scale, sample_steps=d.sample_steps, sampler=d.sampler)
  task = tasks.get(config)
  if prompts:
    from train import caption_data
    ids, mask = caption_data.caption_batch([p for p in prompts for _ in range(per_class)],
                                           model.cfg.text_len, caption_data.tokens_of(config.data))
    images = np.asarray(task.sample_text_images(model, params, ids, mask, seed))
    rows = len(prompts)
    digest = hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:8]
    tag = f"prompt_{digest}_cfg{d.cfg_scale:g}_{d.sample_steps}steps"
  else:
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    images = np.asarray(task.sample_images(model, params, labels, seed))
    rows = len(classes)
    tag = f"sample_{'-'.join(map(str, classes))}_cfg{d.cfg_scale:g}_{d.sample_steps}steps"
  latents = images.shape[-1] not in (1, 3)
  decode = latents_lib.load_decoder(config) if latents else None
  if decode is not None:
    images, latents = decode(images), False
  path = out or os.path.join(workdir, "samples", tag + (".npy" if latents else ".png"))
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  if latents:
    np.save(path, images)
  else:
    diffusion_process.save_grid(images, path, rows=rows)
  return path, images


def define_flags():
  """The CLI's flags, defined only when run as a program (other modules import this one)."""
  global _WORKDIR, _CLASSES, _PROMPTS, _CFG, _STEPS, _SAMPLER, _PER_CLASS, _SEED, _STEP, _OUT
  global _WEIGHTS, _TOP_K, _TOP_P
  _WORKDIR = flags.DEFINE_string("workdir", None, "A diffusion or VAR workdir (python -m train "
                                 "or train.convert).")
  _CLASSES = flags.DEFINE_list("classes", None, "Class ids to sample, one grid row each "
                               "(class-conditional models).")
  _PROMPTS = flags.DEFINE_multi_string("prompt", None, "A caption to sample, one grid row each; "
                                       "repeat the flag for more rows (text-conditioned models).")
  _CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (1 = no guidance); "
                            "default: the workdir's diffusion.cfg_scale.")
  _STEPS = flags.DEFINE_integer("steps", None, "Sampling steps; default: diffusion.sample_steps.")
  _SAMPLER = flags.DEFINE_string("sampler", None, "ddpm | ddim (objective ddpm) or flow; default: "
                                 "diffusion.sampler.")
  _PER_CLASS = flags.DEFINE_integer("per_class", 4, "Samples per class or prompt (grid "
                                    "columns).")
  _SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the starting noise and the sampler.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  _OUT = flags.DEFINE_string("out", None, "Output PNG (or .npy for latents) path.")
  _WEIGHTS = flags.DEFINE_string("weights", "auto", "raw (the trained parameters) | ema (their "
                                 "EMA, train.ema) | auto (the EMA when the run kept one).")
  _TOP_K = flags.DEFINE_integer("top_k", None, "VAR: sample among the k most likely codes (0: "
                                "all); default: the workdir's var.top_k.")
  _TOP_P = flags.DEFINE_float("top_p", None, "VAR: nucleus sampling mass in (0, 1]; default: "
                              "var.top_p.")
  flags.mark_flags_as_required(["workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag as one sentence instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"odyssey: {str(e).strip().rstrip('.')}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  try:
    classes = [int(c) for c in _CLASSES.value or []]
  except ValueError:
    sys.exit(f"odyssey: --classes={','.join(_CLASSES.value)} must be integers.")
  try:
    path, images = sample(_WORKDIR.value, classes, cfg_scale=_CFG.value, steps=_STEPS.value,
                          sampler=_SAMPLER.value, per_class=_PER_CLASS.value, seed=_SEED.value,
                          step=_STEP.value, out=_OUT.value, prompts=_PROMPTS.value,
                          weights=_WEIGHTS.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  kind = "latents" if images.shape[-1] not in (1, 3) else "images"
  rows = f"{len(_PROMPTS.value)} prompts" if _PROMPTS.value else f"{len(classes)} classes"
  print(f"odyssey: wrote {images.shape[0]} {kind} of shape {images.shape[1:]} "
        f"({rows} x {_PER_CLASS.value}) to {path}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
