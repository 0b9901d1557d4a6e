"""How often the trained ViT classifies DiT's class-conditional samples as their class.

  python -m bench.digits_agreement --vit_workdir=DIR --dit_workdir=DIR [--per_class=50]

Loads both runs from their workdirs (config.json + newest checkpoint), draws ``per_class``
guided samples per digit with the DiT run's own sampler settings (or --cfg_scale), classifies them
with the ViT and prints the agreement overall and per class as JSON and a markdown table. Also
writes the first 10 samples of each class as a PNG grid (one row per class).
"""

import json
import os

from absl import app, flags

_VIT = flags.DEFINE_string("vit_workdir", None, "Workdir of a trained experiments/vit_digits run.")
_DIT = flags.DEFINE_string("dit_workdir", None, "Workdir of a trained dit_digits/udit_digits/uvit_digits run.")
_PER_CLASS = flags.DEFINE_integer("per_class", 50, "Samples per class.")
_CFG = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "bench/results", "Folder for the JSON, markdown and PNG.")
flags.mark_flags_as_required(["vit_workdir", "dit_workdir"])


def main(argv):
  del argv
  import jax
  import numpy as np

  from train import checkpoint, diffusion_process, tasks

  vit_cfg, vit, _, vit_params = checkpoint.load_trained(_VIT.value)
  dit_cfg, dit, _, dit_params = checkpoint.load_trained(_DIT.value)
  if _CFG.value is not None:
    dit_cfg.diffusion.cfg_scale = _CFG.value
  classes = dit.cfg.num_classes
  labels = np.repeat(np.arange(classes), _PER_CLASS.value).astype(np.int32)
  task = tasks.get(dit_cfg)
  images = np.asarray(task.sample_images(dit, dit_params, labels, _SEED.value))
  logits = jax.jit(lambda p, x: vit.apply({"params": p}, x))(vit_params, images)
  predicted = np.asarray(np.argmax(logits, -1))
  per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in range(classes)}
  result = {
      "agreement": float(np.mean(predicted == labels)), "per_class": per_class,
      "samples": int(len(labels)), "dit_workdir": _DIT.value, "vit_workdir": _VIT.value,
      "dit_model": dit_cfg.model.name, "sampler": dit_cfg.diffusion.sampler,
      "sample_steps": dit_cfg.diffusion.sample_steps, "cfg_scale": dit_cfg.diffusion.cfg_scale,
  }
  os.makedirs(_OUT.value, exist_ok=True)
  name = f"{dit_cfg.model.name}_digits"
  with open(os.path.join(_OUT.value, f"{name}_agreement.json"), "w") as f:
    json.dump(result, f, indent=2)
  rows = [f"| {c} | {per_class[c]:.0%} |" for c in range(classes)]
  table = "\n".join([f"| class | ViT agrees ({dit_cfg.model.name}, {result['sampler']} "
                     f"{result['sample_steps']} steps, cfg {result['cfg_scale']}) |",
                     "| --- | --- |", *rows, f"| **all** | **{result['agreement']:.1%}** |"])
  with open(os.path.join(_OUT.value, f"{name}_agreement.md"), "w") as f:
    f.write(table + "\n")
  first = np.concatenate([images[labels == c][:10] for c in range(classes)])
  diffusion_process.save_grid(first, os.path.join(_OUT.value, f"{name}_samples.png"), rows=classes)
  print(json.dumps(result, indent=2))
  print(table)


if __name__ == "__main__":
  app.run(main)
