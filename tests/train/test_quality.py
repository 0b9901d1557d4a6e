"""Tests for train/quality.py: the Fréchet distance, and faithfulness and agreement scored by an
exact oracle reader and by a reader trained here through `python -m train`'s loop."""

import math

import numpy as np
import pytest

from train import caption_data as cd
from tests.user import run
from train import quality


def test_frechet_distance_closed_form_symmetry_and_shift():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((20_000, 4)) * [1.0, 2.0, 0.5, 1.0]
  assert abs(quality.frechet_distance(a, a)) < 1e-6
  # Two Gaussians with diagonal covariances: |mu_a - mu_b|^2 + sum (s_a - s_b)^2 (standard devs).
  sd_a, sd_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([3.0, 1.0, 0.5, 2.0])
  mu_b = np.array([1.0, -2.0, 0.0, 0.5])
  b = rng.standard_normal((20_000, 4)) * sd_b + mu_b
  exact = mu_b @ mu_b + np.sum((sd_a - sd_b) ** 2)
  fd = quality.frechet_distance(a, b)
  assert fd == pytest.approx(exact, rel=0.05), (fd, exact)
  assert quality.frechet_distance(b, a) == pytest.approx(fd, rel=1e-9)
  # Exactly the formula on sample moments: a shift of the mean by v adds |v|^2.
  v = np.array([0.3, 0.0, -1.0, 2.0])
  assert quality.frechet_distance(a, a + v) == pytest.approx(v @ v, rel=1e-6)
  assert quality.frechet_distance(a, a + 2 * v) > quality.frechet_distance(a, a + v)
  # Non-diagonal covariances: against the eigenvalue form Tr sqrtm(S_a S_b) = sum sqrt(eig).
  m = rng.standard_normal((3, 3))
  c = rng.standard_normal((5000, 3)) @ m
  d = rng.standard_normal((5000, 3)) @ m.T + 1.0
  s_c, s_d = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
  dm = c.mean(0) - d.mean(0)
  tr = np.sum(np.sqrt(np.linalg.eigvals(s_c @ s_d).real))
  want = dm @ dm + np.trace(s_c) + np.trace(s_d) - 2 * tr
  assert quality.frechet_distance(c, d) == pytest.approx(want, rel=1e-8)
  # Fewer samples than dimensions: singular covariances still give a finite distance.
  assert math.isfinite(quality.frechet_distance(rng.standard_normal((5, 8)),
                                                rng.standard_normal((6, 8))))
  with pytest.raises(ValueError, match="same D"):
    quality.frechet_distance(a, b[:, :3])


def oracle_reader():
  """A stand-in reader that knows every digit image of the test split exactly (a lookup), with
  one-hot features: deterministic, so the metric's bookkeeping is tested apart from training."""
  small, large, labels, _ = cd._digit_split("val")
  table = {}
  for s, lg, y in zip(small, large, labels):
    cell = np.full((16, 16), -1.0, np.float32)
    cell[4:12, 4:12] = s
    table[cell.tobytes()] = int(y)
    table[lg.astype(np.float32).tobytes()] = int(y)

  def run(x):
    classes = [cd.EMPTY if (c == -1).all() else table.get(c[..., 0].tobytes(), 0) for c in x]
    onehot = np.eye(11, dtype=np.float32)[classes]
    return onehot, onehot * 10.0
  return quality.Reader(None, run, 11)


def val_canvases(split="val", n=200):
  src = cd.CaptionSource(split, 64)
  records = [src[i] for i in range(n)]
  return (np.stack([r["images"] for r in records]), np.stack([r["layout"] for r in records]))


def test_faithfulness_with_an_oracle_reader_and_chance_level():
  reader = oracle_reader()
  x, layouts = val_canvases()
  np.testing.assert_array_equal(quality.read_layout(reader, x), layouts)
  assert quality.faithfulness(reader, x, layouts) == 1.0
  shuffled = np.roll(layouts, 1, axis=0)
  assert quality.faithfulness(reader, x, shuffled) < 0.02
  feats = quality.cell_features(reader, x)
  assert feats.shape == (200, 9, 11)
  np.testing.assert_array_equal(feats.argmax(-1), layouts)
  assert quality.canvas_features(reader, x).shape == (200, 99)
  with pytest.raises(ValueError, match="one row of 9 cells per canvas"):
    quality.faithfulness(reader, x, layouts[:10])
  assert quality.cell_scores(reader, x, layouts) == {"places": 1.0, "digits": 1.0}
  # Right places, other digits: every filled cell's digit moved by one.
  filled = layouts != cd.EMPTY
  wrong = np.where(filled, (layouts + 1) % 10, layouts)
  assert quality.cell_scores(reader, x, wrong) == {"places": 1.0, "digits": 0.0}
  # Other places: the layouts of other canvases.
  assert quality.cell_scores(reader, x, shuffled)["places"] < 0.95
  with pytest.raises(ValueError, match="one row of 9 cells per canvas"):
    quality.cell_scores(reader, x, layouts[:10])
  # The docstring's chance levels: sum over layouts of p(layout)^2.
  q, allowed, held = cd.ONE_DIGIT, len(cd.pairs()[False]), len(cd.pairs()[True])
  assert (allowed, held) == (3253, 347)
  assert q ** 2 / 90 + (1 - q) ** 2 / allowed == pytest.approx(0.00087, abs=5e-6)
  assert 1 / held == pytest.approx(0.0029, abs=5e-5)


@pytest.fixture(scope="module")
def trained_reader(tmp_path_factory):
  """experiments/digit_reader.py through `python -m train` on its own mesh, shortened to 300
  steps (of 1,500), evaluated once at the end. A subprocess with the user's XLA flags rather
  than this process's -O0: 300 steps run long enough that optimised code wins (measured: the
  file took 34 s in-process at -O0, 20 s at XLA's default level)."""
  root = tmp_path_factory.mktemp("reader")
  workdir = root / "run"
  run(f"python -m train --config=experiments/digit_reader.py --workdir={workdir} "
      "--cpu_devices=8 --config.train.steps=300 --config.log.every=100 "
      "--config.log.progress=False --config.ckpt.every=300 --config.ckpt.keep=1 "
      "--config.eval.every=300", root / "run.log", timeout=600)
  return quality.load_reader(str(workdir))


def test_a_trained_reader_reads_real_canvases_and_digits(trained_reader):
  reader = trained_reader
  x, layouts = val_canvases(n=150)
  faithful = quality.faithfulness(reader, x, layouts)
  assert faithful > 0.6, faithful
  assert quality.faithfulness(reader, x, np.roll(layouts, 1, axis=0)) < 0.03
  hx, hl = val_canvases("heldout", n=150)
  assert quality.faithfulness(reader, hx, hl) > 0.6
  # Fréchet distance, at equal sample counts: two halves of the real val canvases are closer
  # than one half and the other half with its digits blurred out of shape.
  y, _ = val_canvases(n=300)
  fa, fb = quality.canvas_features(reader, y[:150]), quality.canvas_features(reader, y[150:])
  z = y[150:]
  blurred = (z + np.roll(z, 3, axis=1) + np.roll(z, 3, axis=2)) / 3
  fc = quality.canvas_features(reader, blurred)
  assert quality.frechet_distance(fa, fb) < 0.8 * quality.frechet_distance(fa, fc)
  # Single 8x8 test digits, upscaled: the class-conditional agreement.
  small, _, labels, _ = cd._digit_split("val")
  assert quality.agreement(reader, small[..., None], labels) > 0.8
  assert quality.agreement(reader, small[..., None], (labels + 1) % 10) < 0.1
  assert quality.digit_features(reader, small[:5, ..., None]).shape == (5, reader.width)
