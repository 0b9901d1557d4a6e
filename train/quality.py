"""Sample quality with odyssey's own trained digit reader: a Fréchet distance in its feature space
and caption faithfulness.

The reader is a trained ``experiments/digit_reader.py`` workdir: a ViT over 16x16 cells with 11
classes (the digits, and EMPTY = 10; train/caption_data.py). Its features are the pooled vector
its linear head reads (pre-logits, ``model.width`` numbers).

  * ``frechet_distance``: the FID formula (Heusel et al. 2017) on any two feature sets,
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), in float64. A canvas's feature is its 9
    cells' features concatenated (``canvas_features``, 9 x width numbers); a single digit's is its
    own (``digit_features``).
  * ``faithfulness``: the share of canvases whose every cell the reader reads as the layout says
    (the digit, or empty; sizes are not read); ``cell_scores`` splits its failures into places
    (occupied or empty) and digits (which one, in the filled cells).
  * ``agreement``: the share of single digits the reader reads as their label (class-conditional
    models on the digits, 8x8 or 16x16, upscaled to 16x16 as the reader's large cells are).

Chance level of ``faithfulness``: a generator that draws valid canvases of the right distribution
but ignores the caption is faithful when its layout happens to equal the asked one, with
probability sum_layout p(layout)^2. For "val" (ONE_DIGIT = q = 1/4 of canvases hold one of 90
(digit, cell) layouts, the rest one of the 3,253 allowed pairs) that is q^2/90 + (1-q)^2/3253
= 0.087%; for "heldout" (uniform over its 347 pairs) 1/347 = 0.29%. A reader's own errors lower
both. (tests/train/test_quality.py recomputes these from train/caption_data.py.)
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import scipy.linalg
from PIL import Image

from train import caption_data

CHUNK = 512  # cells per reader call (the last one padded), so one compile serves every count


@dataclasses.dataclass(frozen=True)
class Reader:
  """A trained cell classifier: ``run(cells [CHUNK, 16, 16, 1]) -> (features, logits)``."""
  config: Any
  run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  width: int


def reader_fn(model, params) -> Callable:
  """Jitted (pooled pre-logit features, logits) of ``model``: the input of its "head"."""

  def apply(params, x):
    seen = {}

    def grab(next_fun, args, kwargs, context):
      if context.module.name == "head" and context.method_name == "__call__":
        seen["features"] = args[0]
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(grab):
      logits = model.apply({"params": params}, x)
    if "features" not in seen:
      raise ValueError("the reader's model has no submodule named 'head' whose input is the "
                       "pooled feature vector; use a ViT workdir (experiments/digit_reader.py).")
    return seen["features"].astype(np.float32), logits

  jitted = jax.jit(apply)
  return lambda x: tuple(np.asarray(a) for a in jitted(params, x))


def load_reader(workdir: str) -> Reader:
  """The trained reader of ``workdir`` (an experiments/digit_reader.py run), on one device."""
  from train import checkpoint
  config, model, _, params = checkpoint.load_trained(workdir)
  m = model.cfg
  if (m.image_size, m.channels, m.num_classes) != (caption_data.CELL, 1, caption_data.EMPTY + 1):
    raise ValueError(f"{workdir} holds a model of {m.image_size}x{m.image_size}x{m.channels} "
                     f"images and {m.num_classes} classes; a reader reads {caption_data.CELL}x"
                     f"{caption_data.CELL}x1 cells into {caption_data.EMPTY + 1} classes "
                     "(train it with experiments/digit_reader.py).")
  return Reader(config, reader_fn(model, params), m.width)


def _read(reader: Reader, cells_Mx16x16x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(features [M, F], logits [M, 11]) of cells, CHUNK at a time."""
  x = np.asarray(cells_Mx16x16x1, np.float32)
  feats, logits = [], []
  for start in range(0, len(x), CHUNK):
    part = x[start:start + CHUNK]
    padded = np.concatenate([part, np.full((CHUNK - len(part),) + part.shape[1:], -1.0,
                                           np.float32)])
    f, lg = reader.run(padded)
    feats.append(f[:len(part)])
    logits.append(lg[:len(part)])
  if not feats:
    return np.zeros((0, reader.width), np.float32), np.zeros((0, caption_data.EMPTY + 1))
  return np.concatenate(feats), np.concatenate(logits)


def cell_features(reader: Reader, canvases_Nx48x48x1) -> np.ndarray:
  """The reader's features of each cell of each canvas: [N, 9, F]."""
  c = caption_data.cells(canvases_Nx48x48x1)
  return _read(reader, c.reshape((-1,) + c.shape[2:]))[0].reshape(len(c), 9, -1)


def canvas_features(reader: Reader, canvases_Nx48x48x1) -> np.ndarray:
  """A canvas's feature: its 9 cells' features concatenated, [N, 9F]."""
  f = cell_features(reader, canvases_Nx48x48x1)
  return f.reshape(len(f), -1)


def read_layout(reader: Reader, canvases_Nx48x48x1) -> np.ndarray:
  """The class the reader reads in each cell (a digit, or EMPTY): int32 [N, 9]."""
  c = caption_data.cells(canvases_Nx48x48x1)
  logits = _read(reader, c.reshape((-1,) + c.shape[2:]))[1]
  return np.argmax(logits, -1).astype(np.int32).reshape(len(c), 9)


def faithfulness(reader: Reader, canvases_Nx48x48x1, layouts_Nx9) -> float:
  """The share of canvases whose every cell is read as ``layouts`` says."""
  layouts = np.asarray(layouts_Nx9)
  if layouts.shape != (len(canvases_Nx48x48x1), 9):
    raise ValueError(f"layouts are {layouts.shape}, not one row of 9 cells per canvas "
                     f"({len(canvases_Nx48x48x1)}).")
  return float(np.mean(np.all(read_layout(reader, canvases_Nx48x48x1) == layouts, axis=1)))


def cell_scores(reader: Reader, canvases_Nx48x48x1, layouts_Nx9) -> dict[str, float]:
  """Where faithfulness fails, per cell: ``places`` (the share of cells read as occupied exactly
  where the layout puts a digit, and empty elsewhere) and ``digits`` (of the cells the layout
  fills, the share read as the asked digit). A model that draws the right places with random
  digits scores places near 1 and digits near 1/10."""
  layouts = np.asarray(layouts_Nx9)
  if layouts.shape != (len(canvases_Nx48x48x1), 9):
    raise ValueError(f"layouts are {layouts.shape}, not one row of 9 cells per canvas "
                     f"({len(canvases_Nx48x48x1)}).")
  got = read_layout(reader, canvases_Nx48x48x1)
  filled = layouts != caption_data.EMPTY
  return {"places": float(np.mean((got != caption_data.EMPTY) == filled)),
          "digits": float(np.mean(got[filled] == layouts[filled])) if filled.any() else 0.0}


def _as_cells(images_NxHxWx1) -> np.ndarray:
  """Single digits as 16x16 cells: bilinear resize (PIL, as train/image_data.py scales the
  digits, so a real 8x8 digit becomes exactly the reader's large cell of it)."""
  x = np.asarray(images_NxHxWx1, np.float32)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"images are {x.shape}, not [N, H, W, 1] grey digits.")
  if x.shape[1:3] == (caption_data.CELL, caption_data.CELL):
    return x
  size = (caption_data.CELL, caption_data.CELL)
  return np.stack([np.asarray(Image.fromarray(im[..., 0], mode="F").resize(size, Image.BILINEAR),
                              np.float32) for im in x])[..., None]


def digit_features(reader: Reader, images_NxHxWx1) -> np.ndarray:
  """The reader's features of single digits (resized to 16x16): [N, F]."""
  return _read(reader, _as_cells(images_NxHxWx1))[0]


def agreement(reader: Reader, images_NxHxWx1, labels_N) -> float:
  """The share of single digits the reader reads as their labels."""
  logits = _read(reader, _as_cells(images_NxHxWx1))[1]
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels_N)))


def frechet_distance(feats_a_NxD, feats_b_MxD, *, eps: float = 1e-6) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of two feature sets, in float64.

  As pytorch-fid: when the product is singular (sqrtm not finite) eps * I is added to both
  covariances; an imaginary part of the root's diagonal above 1e-3 is an error, below it is
  rounding and dropped.
  """
  a, b = np.asarray(feats_a_NxD, np.float64), np.asarray(feats_b_MxD, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"feature sets of shapes {a.shape} and {b.shape} are not two [N, D] sets "
                     "of the same D with at least 2 rows each.")
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
  root = scipy.linalg.sqrtm(s_a @ s_b)
  if not np.isfinite(root).all():
    offset = eps * np.eye(len(s_a))
    root = scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset))
  if np.iscomplexobj(root):
    if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm(S_a S_b) has an imaginary component of "
                       f"{np.max(np.abs(root.imag)):.3g}; the covariances are too ill-conditioned "
                       "(use more samples than feature dimensions).")
    root = root.real
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(root))
