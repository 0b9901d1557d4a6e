"""Base config for class-conditional diffusion with DiT, U-DiT or U-ViT on the embedded digits.

Config argument: ``model=dit|udit|uvit|pixart|mmdit,variant=NAME`` (a key of the family's
VARIANTS). pixart and mmdit are text-to-image: 48×48 captioned digit canvases (data.name
"digit_captions"), caption dropout for guidance, MMDiT on rectified flow as SD3.
"""

import ml_collections

from configs import base, moe_group, parse_arg

TEXT_MODELS = ("pixart", "mmdit")  # caption-conditioned (nets/text_encoder.py)
# The sample grid's rows: captions of the training distribution, then captions whose pair of
# digits and places train/caption_data.py holds out of training (tests/train/test_t2i.py checks).
SEEN_PROMPTS = ("a large 3 in the center", "a small 7 at the top left",
                "a large 1 on the left and a large 9 on the right",
                "a small 2 at the top and a large 5 at the bottom")
HELDOUT_PROMPTS = ("a large 1 at the top left and a large 7 at the top right",
                   "a large 3 at the top left and a large 0 at the top right",
                   "a large 6 at the top left and a large 9 at the top right",
                   "a large 0 at the top left and a large 3 in the center")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, {"model": "dit", "variant": "digits"})
  c = base.shared(steps=3000, batch_size=128, lr=1e-3, warmup_steps=100)
  c.task = "diffusion"
  c.model = ml_collections.ConfigDict(dict(
      name=args["model"], variant=args["variant"], input_size=8, in_channels=1, num_classes=10,
      learn_sigma=True, class_dropout_prob=0.1, dtype="float32", param_dtype="float32"))
  if args["model"] == "dit":  # DiT-MoE: set model.moe.num_experts
    c.model.moe = moe_group(activation="gelu")
  c.data = ml_collections.ConfigDict(dict(
      name="digits", path="", val_fraction=0.1, image_size=8, num_threads=0, prefetch=2,
      # native_size (DiT on data.name="folder"): packed rows of images at their own sizes, as
      # configs/vit.py; samples stay square at model.input_size (docs/data.md).
      native_size=False, max_size=0, seq_len=256, max_images=16))
  if args["model"] in TEXT_MODELS:  # captions (byte tokens) instead of labels
    c.model = ml_collections.ConfigDict(dict(
        # text_encoder="t5": a frozen imported ByT5 encoder, text_encoder_path its Hugging Face
        # folder (config.json + model.safetensors; docs/convert.md)
        name=args["model"], variant=args["variant"], text_encoder="trained", text_encoder_path="",
        caption_dropout_prob=0.1, learn_sigma=args["model"] == "pixart", dtype="float32",
        param_dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(
        name="digit_captions", path="", val_fraction=0.1, image_size=48, text_len=64,
        # caption ids: "byt5" (bytes, as a T5 encoder reads) or "words" (train/caption_data.py)
        caption_tokens="byt5", num_threads=0, prefetch=2, native_size=False))
  c.diffusion = ml_collections.ConfigDict(dict(
      objective="ddpm",  # ddpm (epsilon prediction, + learned variance) | flow (rectified flow)
      schedule="cosine", num_steps=1000,  # DDPM noise schedule: linear | cosine
      sampler="ddim",  # ddpm | ddim (objective ddpm), flow (objective flow)
      time_dist="uniform",  # flow timesteps: uniform | logit_normal (SD3)
      time_shift=1.0,  # flow: SD3's shift s, t -> s t / (1 + (s - 1) t), in training and sampling
      sample_steps=50, ddim_eta=0.0, cfg_scale=2.0, samples_per_class=8,
      sample_classes=0,  # grid rows: the first N classes (0 = all)
      prompts=(),  # text families: grid rows, one caption each
      # latents' decoder: an autoencoder workdir; "" = the one the data's metadata.json names
      # (train.encode), if any (train/latents.py)
      autoencoder=""))
  if args["model"] in TEXT_MODELS:
    c.diffusion.update(objective="flow" if args["model"] == "mmdit" else "ddpm",
                       sampler="flow" if args["model"] == "mmdit" else "ddim",
                       prompts=SEEN_PROMPTS + HELDOUT_PROMPTS)
  c.opt.update(weight_decay=0.0, b2=0.999)
  # Samples and evaluation use the EMA weights (eval.weights="auto"). DiT's 0.9999 averages over
  # ~10k updates, more than this 3000-step run has; 0.999 with the ratio warm-up averages over the
  # last ~1000 and follows the fast early updates.
  c.train.ema.update(decay=0.999, warmup="ratio")
  c.ckpt.update(every=500, keep=2)
  c.eval.update(every=500, steps=2, batch_size=128)
  return c
