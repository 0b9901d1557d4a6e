"""The text-to-image path of docs/models.md, as written: experiments/t2i_digits.py (MMDiT on the
digit caption canvases) through `python -m train` on its own mesh with its evaluation on the
"val" and "heldout" captions and the prompt grid; `python -m train.sample --prompt=...`; and
`python -m bench.diffusion_quality` scoring it with a trained experiments/digit_reader.py.

Overrides, only of step counts and sizes: MMDiT --config.train.steps=10 (of 9,000),
--config.train.batch_size=16 (of 64), --config.opt.warmup_steps=2 (a step count: at step 10 of a
100-step warm-up the loss has not moved), --config.diffusion.sample_steps=4 (of 50) and
--config.diffusion.samples_per_class=1 (of 8 columns); the reader 40 steps (of 1,500); the sample
command --steps=4 --per_class=2; the bench --n=10 (of 250) --steps=4 --cfg_scales=1,4 (of 1,2,4)
--out=tmp.
"""

import json

import pytest
from PIL import Image

from tests.user import check_run, metrics, run, substitute
from tests.user.commands import doc
from tests.user.test_image_experiments import T2I_MODULE, check_image_experiment, experiment_runs

T2I = "python -m train --config=experiments/t2i_digits.py --workdir=DIR --cpu_devices=8"
SAMPLE = ('python -m train.sample --workdir=DIR --prompt="a large 1 at the top left and a large 7 '
          'at the top right" --prompt="a large 3 in the center"')
QUALITY = "python -m bench.diffusion_quality --reader=READER --runs=t2i=DIR"
STEPS = 10


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  workdir = root / "run"
  out = run(substitute(doc(T2I), DIR=workdir) + f" --config.train.steps={STEPS}"
            " --config.train.batch_size=16 --config.opt.warmup_steps=2"
            " --config.diffusion.sample_steps=4 --config.diffusion.samples_per_class=1",
            root / "run.log", timeout=600).stdout
  return root, workdir, out


def test_t2i_digits_trains_evaluates_both_caption_splits_and_draws_prompts(t2i):
  from configs import diffusion
  _, workdir, out = t2i
  val = check_run(workdir, out, STEPS, "experiments/t2i_digits.py")
  assert all(m["weights"] == "ema" for m in val), val  # diffusion evaluates its EMA
  for split in ("val/val", "val/heldout"):  # each caption split on its own line
    lines = metrics(workdir, split)
    assert [m["step"] for m in lines] == [0, STEPS] and lines[-1]["loss"] < lines[0]["loss"]
  assert "heldout" in out
  prompts = diffusion.SEEN_PROMPTS + diffusion.HELDOUT_PROMPTS
  for step in (0, STEPS):  # one grid row per prompt, one 48 px canvas each
    with Image.open(workdir / "samples" / f"step_{step:06d}.png") as grid:
      assert grid.size[1] == len(prompts) * 48 + (len(prompts) + 1) * 2, grid.size


def test_the_sample_grid_prompts_are_seen_then_held_out():
  from configs import diffusion
  from train import caption_data
  assert not any(map(caption_data.heldout_caption, diffusion.SEEN_PROMPTS))
  assert all(map(caption_data.heldout_caption, diffusion.HELDOUT_PROMPTS))


def test_train_sample_draws_prompts_and_refuses_classes(t2i, tmp_path):
  _, workdir, _ = t2i
  command = substitute(doc(SAMPLE), DIR=workdir)
  out = run(command + " --steps=4 --per_class=2", tmp_path / "a.log", timeout=300).stdout
  assert "wrote 4 images of shape (48, 48, 1) (2 prompts x 2)" in out, out[-2000:]
  written = out.rsplit(" to ", 1)[1].strip()
  with Image.open(written) as grid:
    assert grid.size[1] > grid.size[0] / 2  # 2 rows of 2
  cases = {"--classes=3": "conditioned on captions; give --prompt",
           # the experiment's captions are word ids (data.caption_tokens="words", text_len 16)
           "--prompt=" + "x" * 80: "has words outside the 'words' caption vocabulary ('xxx",
           '--prompt="a large 1 at the top left and a large 7 at the top right and"':
               "takes 17 word ids with its EOS, more than 16",
           '--prompt="a large 3 in the center" --weights=best': "--weights=best is not one of"}
  for flags, message in cases.items():
    bad = run(f"python -m train.sample --workdir={workdir} {flags}", tmp_path / "b.log",
              timeout=120, ok=False)
    assert bad.returncode == 1 and message in bad.stdout, bad.stdout[-2000:]
    assert "Traceback" not in bad.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """experiments/digit_reader.py's run, made as tests/user/test_image_experiments.py makes the
  other image experiments (the same command and overrides) and checked here as they are there."""
  return experiment_runs(tmp_path_factory)


@pytest.mark.parametrize("name", T2I_MODULE)
def test_digit_reader_experiment_trains_and_evaluates(name, trained):
  check_image_experiment(name, trained)


def test_quality_bench_scores_raw_and_ema_at_each_guidance_scale(t2i, trained, tmp_path):
  _, workdir, _ = t2i
  reader, _ = trained("digit_reader")
  out = run(substitute(doc(QUALITY), READER=reader, DIR=workdir) +
            f" --n=10 --steps=4 --cfg_scales=1,4 --out={tmp_path}", tmp_path / "bench.log",
            timeout=600).stdout
  doc_json = json.loads((tmp_path / "diffusion_quality.json").read_text())
  rows = doc_json["rows"]
  # heldout and val captions x raw and EMA weights x guidance 1 and 4 (of the default 1, 2, 4)
  assert len(rows) == 2 * 2 * 2, rows
  assert {(r["split"], r["weights"], r["cfg_scale"]) for r in rows} == {
      (s, w, c) for s in ("heldout", "val") for w in ("raw", "ema") for c in (1.0, 4.0)}
  for r in rows:
    assert 0.0 <= r["faithfulness"] <= 1.0 and r["frechet"] > 0 and r["samples"] == 10, r
  assert "| t2i | mmdit | heldout |" in out, out[-2000:]
  assert (tmp_path / "diffusion_quality.md").exists()
