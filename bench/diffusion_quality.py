"""Sample quality and sampling time of trained diffusion and VAR runs, read by odyssey's own digit
reader (train/quality.py).

  python -m bench.diffusion_quality --reader=DIR --runs=NAME=DIR[,NAME=DIR...]
      [--cfg_scales=1,2,4] [--weights=raw,ema] [--n=250] [--steps=0] [--seed=1]

For every run, weights ("raw" parameters or their "ema") and guidance scale, draws ``--n`` samples
with the run's own sampler (``--steps`` sampling steps, 0 = the run's diffusion.sample_steps),
decodes latents through the run's autoencoder (train/latents.py), and scores them:
  * class-conditional runs (dit, udit, uvit on digits, pixels or latents): n / 10 samples per
    digit; the reader's agreement with the asked class, and the Fréchet distance between the
    samples' reader features and those of the 360 real val digits;
  * text-conditioned runs (pixart, mmdit on digit_captions): the captions of the first n
    canvases of the "heldout" split (digit pairs never trained on) and of the "val" split; the
    share of samples whose every cell the reader reads as the caption says (faithfulness), and
    the Fréchet distance to the n real canvases of those captions;
  * VAR runs (task "var", nets/var.py): as class-conditional runs, drawn scale by scale with the
    KV cache at each guidance scale and decoded by their tokenizer (weights: raw only).
Every row also times its sampling: the seconds per image of a second, already compiled draw of
the same batch (latent decoding included), so runs in one bench share the machine's load.
Writes diffusion_quality.{json,md,png} to --out.
"""

import time

import numpy as np

from bench import harness

NAME = "diffusion_quality"


def _runs(spec: str) -> dict:
  runs = {}
  for item in spec.split(","):
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise SystemExit(f"odyssey: --runs item {item!r} is not NAME=WORKDIR.")
    runs[name] = path
  return runs


def _real_digits() -> np.ndarray:
  import ml_collections

  from train import image_data
  src = image_data.source(ml_collections.ConfigDict(dict(name="digits", image_size=16)), "val")
  return np.stack([src[i]["images"] for i in range(len(src))])


def _caption_split(split: str, n: int, text_len: int, tokens: str = "byt5"):
  """(canvases, layouts, ids, masks) of the first n records of a digit_captions split, the
  captions in the run's data.caption_tokens, padded to its data.text_len."""
  from train import caption_data
  src = caption_data.CaptionSource(split, text_len, tokens=tokens)
  records = [src[i] for i in range(min(n, len(src)))]
  stack = lambda k: np.stack([r[k] for r in records])
  return stack("images"), stack("layout"), stack("text_ids"), stack("text_mask")


def run(args) -> dict:
  import jax

  from nets import registry
  from train import caption_data, checkpoint, latents, quality, tasks

  if not args.reader or not args.runs:
    raise SystemExit("odyssey: bench.diffusion_quality needs --reader=READER_WORKDIR and "
                     "--runs=NAME=WORKDIR[,...] (or --render_only to redraw from the JSON).")
  reader = quality.load_reader(args.reader)
  cfg_scales = [float(x) for x in args.cfg_scales.split(",")]
  weights_list = args.weights.split(",")
  rows, grids = [], {}
  real_digit_feats = quality.digit_features(reader, _real_digits())
  splits = {}
  for name, workdir in _runs(args.runs).items():
    is_var = checkpoint.load_config(workdir).get("task") == "var"
    for weights in (["raw"] if is_var else weights_list):
      config, model, _, params = checkpoint.load_trained(workdir, weights=weights)
      weights_used = checkpoint.resolve_weights(workdir, weights)
      text = registry.get(config.model.name).conditioning == "text"
      decode = None if is_var else latents.load_decoder(config)  # VAR's task decodes itself
      for scale in cfg_scales:
        if is_var:
          config.var.cfg_scale = scale
        else:
          config.diffusion.cfg_scale = scale
          if args.steps:
            config.diffusion.sample_steps = args.steps
        task = tasks.get(config)
        harness.log(f"{name}: {weights_used} weights, cfg {scale:g}")
        if text:
          for split in ("heldout", "val"):
            key = (split, int(config.data.text_len), caption_data.tokens_of(config.data))
            if key not in splits:
              splits[key] = _caption_split(split, args.n, *key[1:])
            real, layouts, ids, mask = splits[key]
            images = np.asarray(task.sample_text_images(model, params, ids, mask, args.seed))
            rows.append(dict(
                run=name, model=config.model.name, conditioning="text", split=split,
                weights=weights_used, cfg_scale=scale, samples=len(images),
                faithfulness=quality.faithfulness(reader, images, layouts),
                **quality.cell_scores(reader, images, layouts),
                real_faithfulness=quality.faithfulness(reader, real, layouts),
                frechet=quality.frechet_distance(quality.canvas_features(reader, images),
                                                 quality.canvas_features(reader, real))))
            grids.setdefault(name, images[:16])
        else:
          labels = np.repeat(np.arange(10), max(1, args.n // 10)).astype(np.int32)

          def draw():
            images = np.asarray(task.sample_images(model, params, labels, args.seed))
            return np.asarray(decode(images)) if decode is not None else images
          draw()  # compiles
          start = time.perf_counter()
          images = draw()
          seconds = (time.perf_counter() - start) / len(images)
          rows.append(dict(
              run=name, model=config.model.name, conditioning="class", split="val",
              weights=weights_used, cfg_scale=scale, samples=len(images),
              latent=decode is not None, seconds_per_image=seconds,
              params=int(sum(x.size for x in jax.tree.leaves(params))),
              sampler=("var: scale by scale, KV cache" if is_var else
                       f"{config.diffusion.sampler} {config.diffusion.sample_steps} steps"),
              agreement=quality.agreement(reader, images, labels),
              frechet=quality.frechet_distance(quality.digit_features(reader, images),
                                               real_digit_feats)))
        harness.log(f"  {rows[-1]}")
  return dict(mode="quick" if args.quick else "full", reader=args.reader, runs=_runs(args.runs),
              n=args.n, steps=args.steps, seed=args.seed, rows=rows)


def _pct(x) -> str:
  return "-" if x is None else harness.pct(x) + "%"


def markdown(doc: dict) -> str:
  out = [f"# Diffusion sample quality ({doc['mode']})", "",
         harness.machine_line(doc), "",
         f"Reader: `{doc['reader']}` (experiments/digit_reader.py); {doc['n']} samples per row, "
         f"seed {doc['seed']}. Fréchet distance: the FID formula on the reader's features "
         "(lower is better; two halves of the real val canvases give about 13). Faithfulness: "
         "the share of canvases whose every cell the reader reads as the caption says (chance: "
         "0.29% on heldout, 0.087% on val; the real canvases' own score is the ceiling); places: "
         "the share of cells read as filled or empty as the caption says; digits: of the filled "
         "cells, the share read as the asked digit (10% is chance). "
         "Agreement: the share of class-conditional samples read as their class.", ""]
  text = [r for r in doc["rows"] if r["conditioning"] == "text"]
  if text:
    out += ["## Text-conditioned (captions)", "", harness.table(
        ["run", "model", "captions", "weights", "cfg", "faithfulness", "real canvases",
         "places", "digits", "Fréchet"],
        [[r["run"], r["model"], r["split"], r["weights"], f"{r['cfg_scale']:g}",
          harness.pct(r["faithfulness"]) + "%", harness.pct(r["real_faithfulness"]) + "%",
          _pct(r.get("places")), _pct(r.get("digits")), f"{r['frechet']:.1f}"]
         for r in text]), ""]
  cls = [r for r in doc["rows"] if r["conditioning"] == "class"]
  if cls:
    fastest = min((r["seconds_per_image"] for r in cls if r.get("seconds_per_image")),
                  default=None)
    out += ["## Class-conditional (digits)", "",
            "Sampling time: seconds per image of a compiled draw of the row's whole batch; "
            "x fastest: its ratio to the fastest row of this bench (same machine, same load).",
            "", harness.table(
        ["run", "model", "params", "sampler", "space", "weights", "cfg", "agreement", "Fréchet",
         "ms / image", "x fastest"],
        [[r["run"], r["model"], f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-",
          r.get("sampler", "-"), "latent" if r["latent"] else "pixel", r["weights"],
          f"{r['cfg_scale']:g}", harness.pct(r["agreement"]) + "%", f"{r['frechet']:.1f}",
          f"{1e3 * r['seconds_per_image']:.2f}" if r.get("seconds_per_image") else "-",
          f"{r['seconds_per_image'] / fastest:.1f}" if r.get("seconds_per_image") else "-"]
         for r in cls]), ""]
  return "\n".join(out)


def plot(doc: dict, plt):
  rows = doc["rows"]
  timed = any(r.get("seconds_per_image") for r in rows)
  fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(16 if timed else 11, 4))
  labels = [f"{r['run']} {r['weights']} cfg{r['cfg_scale']:g}"
            + (f" {r['split']}" if r["conditioning"] == "text" else "") for r in rows]
  score = [100 * r.get("faithfulness", r.get("agreement", 0.0)) for r in rows]
  axes[0].barh(labels, score)
  axes[0].set_xlabel("faithfulness (text) / agreement (class), %")
  axes[1].barh(labels, [r["frechet"] for r in rows])
  axes[1].set_xlabel("Fréchet distance in the reader's features (lower is better)")
  axes[1].set_yticks([])
  if timed:
    axes[2].barh(labels, [1e3 * (r.get("seconds_per_image") or 0.0) for r in rows])
    axes[2].set_xscale("log")
    axes[2].set_xlabel("sampling time, ms per image (log)")
    axes[2].set_yticks([])
  return fig


FLAGS = (
    ("--reader", dict(default="", help="workdir of a trained experiments/digit_reader.py")),
    ("--runs", dict(default="", help="NAME=WORKDIR[,NAME=WORKDIR...] diffusion runs")),
    ("--cfg_scales", dict(default="1,2,4", help="guidance scales, comma-separated")),
    ("--weights", dict(default="raw,ema", help="raw,ema or one of them")),
    ("--n", dict(type=int, default=250, help="samples per row")),
    ("--steps", dict(type=int, default=0, help="sampling steps (0: each run's own)")),
    ("--seed", dict(type=int, default=1, help="sampling seed")),
)

if __name__ == "__main__":
  harness.main(NAME, __doc__, run, markdown, plot, flags=FLAGS)
