"""The autoencoder's documented path, as written: experiments/vae_digits.py through
`python -m train` on its own mesh (8 simulated CPU devices) with its evaluation and PNGs,
`python -m train.encode` of the digits into latent shards, a latent DiT on those shards whose
in-training samples and `python -m train.sample` decode to PNGs; and encode's refusals.

Overrides, only of step counts and sizes: the autoencoder trains --config.train.steps=6 (of
1,000) with --config.eval.every=3 and --config.opt.warmup_steps=2 (a step count: after 6 of 50
warmup steps the learning rate has not moved the loss); the latent DiT 2 steps (batch 16, DDIM
2 steps, 1 sample per class).
"""

import json

import numpy as np
import pytest
from PIL import Image

from tests.user import metrics, run, substitute
from tests.user.commands import doc

TRAIN = "python -m train --config=experiments/vae_digits.py --workdir=DIR --cpu_devices=8"
ENCODE = "python -m train.encode --workdir=DIR --out=LATENTS"
DIT = doc("python -m train --config=experiments/dit_digits.py --workdir=DIT --cpu_devices=8 "
       "--config.data.name=arrayrecord --config.data.path=LATENTS --config.model.input_size=8 "
       "--config.model.in_channels=4")
SAMPLE = doc("python -m train.sample --workdir=DIT --classes=0,3,7 --cfg=4.0 --steps=50")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  root = tmp_path_factory.mktemp("vae")
  workdir = root / "vae"
  out = run(substitute(doc(TRAIN), DIR=workdir) + " --config.train.steps=6 --config.eval.every=3"
            " --config.opt.warmup_steps=2", root / "train.log", timeout=600).stdout
  return root, workdir, out


def test_vae_digits_trains_evaluates_and_writes_reconstructions(vae):
  _, workdir, out = vae
  val = metrics(workdir, "val")
  assert [m["step"] for m in val] == [0, 3, 6], out
  assert val[-1]["rec_loss"] < val[0]["rec_loss"] and val[-1]["psnr"] > val[0]["psnr"], val
  assert all({"loss", "rec_loss", "kl", "psnr"} <= set(m) for m in metrics(workdir, "train"))
  with Image.open(workdir / "samples" / "step_000006.png") as png:  # 2 rows of 32 px digits
    assert png.size[1] == 2 * 32 + 3 * 2


@pytest.fixture(scope="module")
def encoded(vae):
  root, workdir, _ = vae
  latents = root / "latents"
  out = run(substitute(doc(ENCODE), DIR=workdir, LATENTS=latents), root / "encode.log",
            timeout=300).stdout
  return root, workdir, latents, out


def test_encode_writes_unit_variance_latents_the_arrayrecord_source_reads(encoded):
  import ml_collections

  from train import image_data, latents as latents_lib
  _, workdir, latents, out = encoded
  meta = json.loads((latents / "metadata.json").read_text())
  assert meta["shape"] == [8, 8, 4] and meta["num_classes"] == 10, meta
  assert meta["autoencoder"] == str(workdir) and meta["autoencoder_step"] == 6, meta
  assert meta["counts"] == {"train": 1437, "val": 360}, meta
  data = ml_collections.ConfigDict(dict(name="arrayrecord", path=str(latents), image_size=0))
  train = image_data.source(data, "train")
  z = np.stack([train[i]["images"] for i in range(len(train))])
  assert z.shape == (1437, 8, 8, 4)
  assert abs(float(np.std(z)) - 1.0) < 1e-2  # 1 / std of the train latents, computed
  assert latents_lib.recorded(data)["scaling_factor"] == meta["scaling_factor"] > 0
  assert "scaling factor" in out


def test_encode_refuses_with_one_sentence(encoded, tmp_path):
  root, workdir, latents, _ = encoded
  cases = {f"--workdir={workdir} --out={latents}": "never overwrites",
           f"--workdir={latents} --out={tmp_path / 'a'}": "no config.json",
           f"--workdir={workdir} --out={tmp_path / 'b'} --data={tmp_path / 'none'}":
               "does not exist"}
  for flags, message in cases.items():
    res = run(f"python -m train.encode {flags}", tmp_path / "refused.log", timeout=120, ok=False)
    assert res.returncode != 0 and message in res.stdout, res.stdout
    assert "Traceback" not in res.stdout, res.stdout
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_latent_dit_samples_decode_to_pngs(encoded):
  root, _, latents, _ = encoded
  dit = root / "dit"
  out = run(substitute(DIT, DIT=dit, LATENTS=latents) + " --config.train.steps=2"
            " --config.train.batch_size=16 --config.diffusion.sample_steps=2"
            " --config.diffusion.samples_per_class=1", root / "dit.log", timeout=600).stdout
  with Image.open(dit / "samples" / "step_000002.png") as png:  # decoded: 10 rows of 32 px
    assert png.size[1] == 10 * 32 + 11 * 2, out
  out = run(substitute(SAMPLE, DIT=dit) + " --steps=2 --per_class=2", root / "sample.log",
            timeout=300).stdout
  assert "2 images of shape (32, 32, 1)" in out or "images of shape (32, 32, 1)" in out, out
  assert list((dit / "samples").glob("sample_0-3-7_*.png")), out
