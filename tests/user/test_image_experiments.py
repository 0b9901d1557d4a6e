"""The README's launch commands of the vision and diffusion experiments (ViT, Swin, DiT, U-DiT,
U-ViT, DiT-MoE on the embedded digits) through `python -m train`, as written: the experiment's own
mesh on 8 simulated CPU devices, its evaluation at step 0 and at the end, and, for the diffusion
models, the PNG grid of guided samples (DDIM 50 steps, every class) at each evaluation. Then
`python -m train.sample` on the DiT workdir and `python -m bench.digits_agreement` on the ViT
and DiT workdirs.

Overrides, only of step counts and sizes. ViT, Swin and the digit reader (experiments/
digit_reader.py, of 1,500 steps): ``--config.train.steps=40`` (of 600),
nothing else: the ViT's loss sits at ln 10 for ~20 steps, then falls (2.16 and 32% accuracy at
step 40); Swin's falls from the start (1.54 at step 40).
Diffusion: ``--config.train.steps=10`` (of 1,500-3,000), ``--config.train.batch_size=16`` (of 128
images: a step of the 128-image U-DiT takes ~8 s on 2 loaded cores) and
``--config.opt.warmup_steps=2`` (a step count too: at step 10 of a 100-step warmup the learning
rate is still too small for the validation loss to move). The grids keep their sampler (DDIM,
every class, guided) with ``--config.diffusion.sample_steps=10`` (of 50 denoising steps) and
``--config.diffusion.samples_per_class=2`` (of 8 columns). DiT-MoE also logs its auxiliary
losses and dropped fraction (0: dropless by default) on every train line.
"""

import os

import pytest
from PIL import Image

from tests.user import check_run, run, substitute
from tests.user.commands import doc

STEPS = {"vit_digits": 40, "swin_digits": 40, "dit_digits": 10, "udit_digits": 10,
         "uvit_digits": 10, "dit_moe_digits": 10, "digit_reader": 40}
CLASSIFIERS = ("vit_digits", "swin_digits", "digit_reader")
DIFFUSION = (" --config.train.batch_size=16 --config.opt.warmup_steps=2"
             " --config.diffusion.sample_steps=10 --config.diffusion.samples_per_class=2")


# Run by tests/user/test_vision_experiments.py: whole files go to one pytest worker, so these
# runs go to a module of their own and the two workers share the image experiments.
OWN_MODULE = ("swin_digits", "uvit_digits")
# Run by tests/user/test_t2i.py, whose quality bench reads that same reader run (one training of
# the reader instead of two identical ones).
T2I_MODULE = ("digit_reader",)


def experiment_runs(tmp_path_factory):
  """``get(name)``: the experiment's run (workdir, stdout), made on first use."""
  runs = {}

  def get(name):
    if name not in runs:
      root = tmp_path_factory.mktemp(name)
      command = doc(f"python -m train --config=experiments/{name}.py --workdir=DIR "
                    "--cpu_devices=8")
      extra = f" --config.train.steps={STEPS[name]}" + ("" if name in CLASSIFIERS else DIFFUSION)
      out = run(substitute(command, DIR=root / "run") + extra, root / "run.log",
                timeout=600).stdout
      runs[name] = (root / "run", out)
    return runs[name]
  return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One run per experiment, on first use; the DiT and ViT workdirs also feed train.sample and
  the agreement bench."""
  return experiment_runs(tmp_path_factory)


@pytest.mark.parametrize("name", [n for n in STEPS if n not in OWN_MODULE + T2I_MODULE])
def test_image_experiment_trains_evaluates_and_samples(name, trained):
  check_image_experiment(name, trained)


def check_image_experiment(name, trained):
  """Trains, evaluates at step 0 and at the end; classifiers learn, diffusion models draw grids."""
  workdir, out = trained(name)
  val = check_run(workdir, out, STEPS[name], f"experiments/{name}.py")
  if name in CLASSIFIERS:
    assert val[-1]["accuracy"] > val[0]["accuracy"] + 0.1, val
    return
  if name == "dit_moe_digits":  # the MoE's terms on every train line; dropless drops nothing
    from tests.user import metrics
    train = metrics(workdir, "train")
    assert train and all(m["loss"] > m["denoise_loss"] and m["moe_dropped_frac"] == 0.0
                         for m in train), train
    assert "'expert': 4" in out
  for step in (0, STEPS[name]):  # a grid at every evaluation: one row per class
    with Image.open(workdir / "samples" / f"step_{step:06d}.png") as grid:
      width, height = grid.size
    assert height > width, (width, height)


def test_train_sample_on_the_dit_digits_workdir(trained, tmp_path):
  workdir, _ = trained("dit_digits")
  readme = doc("python -m train.sample --workdir=workdirs/dit_digits --classes=0,3,7 --cfg=4.0 "
               "--steps=50 [--per_class=4] [--sampler=ddim|ddpm|flow] [--seed=0] "
               "[--out=grid.png]")
  plain = readme.split(" [")[0]
  out = run(substitute(plain, **{"workdirs/dit_digits": workdir}), tmp_path / "a.log",
            timeout=300).stdout
  assert "wrote 12 images of shape (8, 8, 1) (3 classes x 4)" in out, out[-2000:]
  written = out.rsplit(" to ", 1)[1].strip()
  assert os.path.exists(written if os.path.isabs(written) else os.path.join(workdir, written))
  options = readme.replace("[--per_class=4]", "--per_class=2").replace(
      "[--sampler=ddim|ddpm|flow]", "--sampler=ddpm").replace("[--seed=0]", "--seed=3").replace(
      "[--out=grid.png]", "--out=grid.png").replace("grid.png", str(tmp_path / "grid.png"))
  out = run(substitute(options, **{"workdirs/dit_digits": workdir}), tmp_path / "b.log",
            timeout=300).stdout
  assert "wrote 6 images of shape (8, 8, 1) (3 classes x 2)" in out, out[-2000:]
  with Image.open(tmp_path / "grid.png") as grid:
    assert grid.size[1] > grid.size[0]  # 3 rows of 2
  # The short form of the CLI section.
  short = doc("python -m train.sample --workdir=DIR --classes=0,3,7 --cfg=4 --steps=50")
  out = run(substitute(short, DIR=workdir), tmp_path / "c.log", timeout=300).stdout
  assert "(3 classes x 4)" in out, out[-2000:]
  # A class the model does not have: one sentence and exit status 1, before anything compiles.
  bad = run(substitute(short, DIR=workdir).replace("--classes=0,3,7", "--classes=2,12"),
            tmp_path / "d.log", timeout=120, ok=False)
  assert bad.returncode == 1, bad.stdout[-2000:]
  assert "odyssey: --classes [12] are outside the model's 10 classes" in bad.stdout


def test_digits_agreement_bench_on_the_trained_workdirs(trained, tmp_path):
  """Overrides: --per_class=5 (of 50 samples per class) and --out=tmp (the default is
  bench/results, the committed figures)."""
  vit, _ = trained("vit_digits")
  dit, _ = trained("dit_digits")
  command = doc("python -m bench.digits_agreement --vit_workdir=VIT_DIR --dit_workdir=DIT_DIR")
  out = run(substitute(command, VIT_DIR=vit, DIT_DIR=dit) +
            f" --per_class=5 --out={tmp_path}", tmp_path / "bench.log", timeout=300).stdout
  assert "| **all** |" in out, out[-2000:]
  for name in ("dit_digits_agreement.json", "dit_digits_agreement.md", "dit_digits_samples.png"):
    assert (tmp_path / name).exists(), name


def test_native_folder_experiment_trains_and_evaluates(tmp_path):
  """docs/data.md's native-size command on a folder of 3 classes of PNGs of random sizes and
  aspect ratios (6 to 47 pixels a side), with the experiment's own mesh (data=8), packing and
  evaluation. Override: ``--config.train.steps=20`` (of 300), a step count; the classes differ
  in brightness, so the validation loss falls within those steps."""
  from tests.train.test_image_packing import make_folder
  images = make_folder(tmp_path / "images")
  command = doc("python -m train --config=experiments/vit_native_folder.py --workdir=DIR "
                "--cpu_devices=8 --config.data.path=IMAGES --config.model.num_classes=3")
  out = run(substitute(command, DIR=tmp_path / "run", IMAGES=images) + " --config.train.steps=20",
            tmp_path / "run.log", timeout=600).stdout
  val = check_run(tmp_path / "run", out, 20, "experiments/vit_native_folder.py")
  assert val[-1]["loss"] < val[0]["loss"], val
  assert val[-1]["images"] > 8, val  # several images per packed row were evaluated
  from tests.user import metrics
  assert all("rows_per_s" in m for m in metrics(tmp_path / "run", "train"))
  assert "per row);" in out  # the FLOPs line counts packed rows
