"""Compositional captions made from the embedded digits, and the cells a reader classifies.

A canvas is 48x48x1 in [-1, 1] (background -1): a 3x3 grid of 16x16 cells (``PLACES``, reading
order) holding one or two digits in distinct cells. Each digit is "small" (its 8x8 original,
centred in the cell) or "large" (resized to 16x16, filling the cell). Its caption names the digits
in reading order: "a small 3 at the top left and a large 7 at the bottom right". The layout is the
ground truth; nothing parses captions.

  * ``data.name="digit_captions"``: records {"images": f32 [48, 48, 1], "labels": i32 (the first
    digit, for class-conditional code), "text_ids": i32 [data.text_len], "text_mask": bool
    [data.text_len], "layout": i32 [9] (per cell the digit, EMPTY = 10 if none), "sizes": i32 [9]
    (0 empty, 1 small, 2 large)}. ``data.caption_tokens`` chooses the ids: "byt5" (utf-8 byte + 3,
    EOS 1, then PAD 0; up to 63 ids) or "words" (the captions' 23 words through a `tokenizers`
    WordLevel model, ``word_tokenizer``: PAD 0, EOS 1, UNK 2, then the words in sorted order; up
    to 16 ids, so a text encoder and MMDiT's joint sequence see a quarter of the tokens). Record i of a
    split is a pure function of (split, i, seed=DATA_SEED), made when read; "train" has
    SPLIT_SIZES["train"] records (a fresh set of canvases for as long as a run lasts), "val" and
    "heldout" a few thousand.
  * ``data.name="digit_cells"``: 16x16x1 cells with 11 classes (the digit, small or large, or
    EMPTY), the inputs of the reader that train/quality.py scores canvases with.

Digit images never cross splits: "train" canvases and cells take the digits' train split,
"val"/"heldout" canvases and "val" cells its test split (train/image_data.py: index % 5 == 0).

Held-out rule. A two-digit canvas's *pair* is the unordered pair of its (digit, cell) elements,
sizes aside. A pair is held out when crc32 of its text (``pair_key``) % 100 < HELDOUT_PERCENT:
10% of the 3,600 pairs, a fixed set on every machine. "train" and "val" never draw a held-out pair;
"heldout" draws only held-out pairs. Every single (digit, cell, size) element is still seen in
training (one-digit canvases hold each of the 180 with equal chance, and two-digit canvases hold
every (digit, cell) in other company), so "heldout" asks for a new *combination* of known parts.

Sampling: one digit with probability ONE_DIGIT (layouts uniform over the 90 (digit, cell)), else
two: uniform over the allowed pairs; sizes uniform and independent.
"""

import functools
import zlib

import numpy as np
from PIL import Image

from train import tokenizer

KNOWN = ("digit_captions", "digit_cells")
PLACES = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
          "on the right", "at the bottom left", "at the bottom", "at the bottom right")
SIZE_NAMES = ("", "small", "large")  # sizes[c]: 0 empty, 1 small, 2 large
EMPTY = 10  # layout[c] of an empty cell, and the reader's 11th class
CELL, GRID = 16, 3
CANVAS = CELL * GRID
SPLITS = ("train", "val", "heldout")
SPLIT_SIZES = {"train": 100_000, "val": 2_000, "heldout": 2_000}
DATA_SEED = 0
ONE_DIGIT = 0.25
HELDOUT_PERCENT = 10
CAPTION_TOKENS = ("byt5", "words")  # data.caption_tokens
# The "words" vocabulary: ByT5's special ids, then every word a caption can hold, sorted.
WORD_SPECIALS = ("<pad>", "</s>", "<unk>")
WORDS = tuple(sorted({w for place in PLACES for w in place.split()}
                     | {"a", "and", *SIZE_NAMES[1:], *"0123456789"}))
WORD_VOCAB = len(WORD_SPECIALS) + len(WORDS)


def tokens_of(data_cfg) -> str:
  """data.caption_tokens ("byt5" when a config predates the field)."""
  return data_cfg.get("caption_tokens", "byt5")


@functools.lru_cache(maxsize=1)
def word_tokenizer():
  """The "words" tokenizer: a `tokenizers` WordLevel model over WORD_SPECIALS + WORDS, split on
  whitespace; a word outside the vocabulary becomes <unk> (caption_ids refuses it)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(WORD_SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


def caption_ids(text: str, length: int, tokens: str = "byt5") -> np.ndarray:
  """The ids of one caption or prompt (int32 [length]: the tokens, EOS, then PAD 0), in ByT5's
  byte vocabulary or the "words" one (``tokens``); one sentence when it does not fit whole
  (train/tokenizer.py's byt5_ids would cut it) or, for "words", holds a word outside the
  vocabulary."""
  if tokens not in CAPTION_TOKENS:
    raise ValueError(f"data.caption_tokens={tokens!r} is not one of {CAPTION_TOKENS}.")
  if tokens == "byt5":
    need = len(text.encode("utf-8")) + 1
    if need > length:
      raise ValueError(f"the text {text!r} takes {need} ByT5 ids with its EOS, more than "
                       f"{length}.")
    return tokenizer.byt5_ids([text], length)[0][0]
  enc = word_tokenizer().encode(text)
  unknown = [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids)
             if i == WORD_SPECIALS.index("<unk>")]
  if unknown:
    raise ValueError(f"the text {text!r} has words outside the 'words' caption vocabulary "
                     f"({', '.join(map(repr, unknown))}); it holds {', '.join(WORDS)}.")
  if len(enc.ids) + 1 > length:
    raise ValueError(f"the text {text!r} takes {len(enc.ids) + 1} word ids with its EOS, more "
                     f"than {length}.")
  ids = np.zeros((length,), np.int32)
  ids[:len(enc.ids)] = enc.ids
  ids[len(enc.ids)] = tokenizer.BYT5_EOS
  return ids


def caption_batch(texts, length: int, tokens: str = "byt5") -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, length] int32, mask [N, length] bool) of whole captions or prompts."""
  ids = np.stack([caption_ids(t, length, tokens) for t in texts]) if len(texts) else (
      np.zeros((0, length), np.int32))
  return ids, ids != tokenizer.BYT5_PAD


def caption_for(layout, sizes) -> str:
  """The caption of a layout: its digits in reading order with their sizes and places."""
  parts = [f"a {SIZE_NAMES[int(sizes[c])]} {int(layout[c])} {PLACES[c]}"
           for c in range(GRID * GRID) if layout[c] != EMPTY]
  if not parts or any(not sizes[c] for c in range(GRID * GRID) if layout[c] != EMPTY):
    raise ValueError(f"layout {list(layout)} with sizes {list(sizes)} is not a canvas of one or "
                     "more sized digits.")
  return " and ".join(parts)


def layout_of_caption(text: str) -> tuple[np.ndarray, np.ndarray]:
  """(layout [9], sizes [9]) of a caption in the dataset's words (caption_for's inverse), so a
  prompt's samples can be read back and scored; one sentence for any other text."""
  layout, sizes = np.full((GRID * GRID,), EMPTY, np.int32), np.zeros((GRID * GRID,), np.int32)
  parts = text.split(" and ")
  for part in parts:
    words = part.split(" ", 3)
    ok = (len(words) == 4 and words[0] == "a" and words[1] in SIZE_NAMES[1:]
          and words[2] in tuple("0123456789") and words[3] in PLACES)
    if not ok or layout[PLACES.index(words[3])] != EMPTY or len(parts) > 2:
      raise ValueError(f"the caption {text!r} is not in the words of 'digit_captions' (one or "
                       "two parts 'a small|large D <place>' joined by ' and ', distinct places, "
                       "e.g. 'a large 3 at the top left and a small 7 in the center').")
    cell = PLACES.index(words[3])
    layout[cell], sizes[cell] = int(words[2]), SIZE_NAMES.index(words[1])
  return layout, sizes


def heldout_caption(text: str) -> bool:
  """Whether a caption's two digits form a held-out pair (never drawn for training)."""
  layout, _ = layout_of_caption(text)
  cells = [c for c in range(GRID * GRID) if layout[c] != EMPTY]
  return len(cells) == 2 and is_heldout(tuple((int(layout[c]), c) for c in cells))


def _all_pairs():
  """Every unordered pair ((d1, c1), (d2, c2)) with c1 < c2."""
  return [((d1, c1), (d2, c2)) for c1 in range(9) for c2 in range(c1 + 1, 9)
          for d1 in range(10) for d2 in range(10)]


def pair_key(pair) -> str:
  """The text whose crc32 decides whether a pair is held out (cells in ascending order)."""
  (d1, c1), (d2, c2) = sorted(pair, key=lambda e: e[1])
  return f"{d1}@{c1}+{d2}@{c2}"


def is_heldout(pair) -> bool:
  return zlib.crc32(pair_key(pair).encode()) % 100 < HELDOUT_PERCENT


@functools.lru_cache(maxsize=1)
def pairs() -> dict[bool, tuple]:
  """{held out: its pairs}, each ((d1, c1), (d2, c2)) with c1 < c2."""
  out = {True: [], False: []}
  for p in _all_pairs():
    out[is_heldout(p)].append(p)
  return {k: tuple(v) for k, v in out.items()}


@functools.lru_cache(maxsize=2)
def max_text_ids(tokens: str = "byt5") -> int:
  """The most ids (EOS included) any caption takes: the lower bound of data.text_len. The
  longest caption names the two longest places."""
  size = (lambda text: len(text.split())) if tokens == "words" else (lambda text: len(text))
  second, longest = sorted(PLACES, key=size)[-2:]
  return size(f"a large 0 {longest} and a large 0 {second}") + 1


def layout_of(split: str, index: int, seed: int = DATA_SEED):
  """(layout i32 [9], sizes i32 [9], rng) of record ``index`` of ``split``; the rng then picks
  the digit images."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}.")
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  layout = np.full((9,), EMPTY, np.int32)
  sizes = np.zeros((9,), np.int32)
  if split != "heldout" and rng.random() < ONE_DIGIT:
    elements = [(int(rng.integers(10)), int(rng.integers(9)))]
  else:
    allowed = pairs()[split == "heldout"]
    elements = list(allowed[int(rng.integers(len(allowed)))])
  for d, c in elements:
    layout[c], sizes[c] = d, 1 + int(rng.integers(2))
  return layout, sizes, rng


@functools.lru_cache(maxsize=2)
def _digit_split(split: str):
  """(8x8 images, 16x16 images, labels, indices of each class) of the digits' ``split``."""
  import ml_collections

  from train import image_data  # imports this module: here, not at the top
  cfg = lambda size: ml_collections.ConfigDict(dict(name="digits", image_size=size, path=""))
  small, large = image_data.source(cfg(8), split), image_data.source(cfg(16), split)
  by_class = tuple(np.flatnonzero(small.labels == d) for d in range(10))
  return small.images[..., 0], large.images[..., 0], small.labels, by_class


def _digits_of(split: str) -> str:
  return "train" if split == "train" else "val"


def paint(cell_16x16: np.ndarray, small_8x8: np.ndarray | None, large_16x16: np.ndarray | None,
          shift=(0, 0)):
  """Draws a small digit (centred, moved by ``shift`` pixels) or a large one into a cell."""
  if large_16x16 is not None:
    cell_16x16[:] = large_16x16
  else:
    r, c = 4 + shift[0], 4 + shift[1]
    cell_16x16[r:r + 8, c:c + 8] = small_8x8


def canvas(split: str, index: int, seed: int = DATA_SEED):
  """(image f32 [48, 48, 1], layout, sizes) of record ``index`` of ``split``."""
  layout, sizes, rng = layout_of(split, index, seed)
  small, large, _, by_class = _digit_split(_digits_of(split))
  image = np.full((CANVAS, CANVAS), -1.0, np.float32)
  for c in range(9):
    if layout[c] == EMPTY:
      continue
    j = int(rng.choice(by_class[layout[c]]))
    r, col = divmod(c, GRID)
    view = image[r * CELL:(r + 1) * CELL, col * CELL:(col + 1) * CELL]
    paint(view, small[j], large[j] if sizes[c] == 2 else None)
  return image[..., None], layout, sizes


def cells(canvases_Nx48x48x1: np.ndarray) -> np.ndarray:
  """The 9 cells of each canvas in reading order: [N, 9, 16, 16, C]."""
  x = np.asarray(canvases_Nx48x48x1)
  n, h, w, ch = x.shape
  if (h, w) != (CANVAS, CANVAS):
    raise ValueError(f"canvases are {h}x{w}, not {CANVAS}x{CANVAS}.")
  x = x.reshape(n, GRID, CELL, GRID, CELL, ch).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, GRID * GRID, CELL, CELL, ch)


class CaptionSource:
  """Random-access canvases with their captions, made when read; ``size`` other than 48 (0)
  resizes each canvas (bilinear), e.g. for tiny test models."""

  def __init__(self, split: str, text_len: int, seed: int = DATA_SEED, size: int = 0,
               tokens: str = "byt5"):
    if split not in SPLITS:
      raise ValueError(f"split {split!r} of 'digit_captions' is not one of {SPLITS}.")
    self.split, self.text_len, self.seed, self.tokens = split, text_len, seed, tokens
    self.size = size or CANVAS

  def __len__(self) -> int:
    return SPLIT_SIZES[self.split]

  def __getitem__(self, i):
    image, layout, sizes = canvas(self.split, i.__index__(), self.seed)
    if self.size != CANVAS:
      pil = Image.fromarray(image[..., 0], mode="F").resize((self.size, self.size),
                                                           Image.BILINEAR)
      image = np.asarray(pil, np.float32)[..., None]
    ids = caption_ids(caption_for(layout, sizes), self.text_len, self.tokens)
    return {"images": image, "labels": np.int32(layout[layout != EMPTY][0]), "text_ids": ids,
            "text_mask": ids != tokenizer.BYT5_PAD, "layout": layout, "sizes": sizes}


class CellSource:
  """Random-access 16x16 cells: each digit image small and large, and one empty cell (faint
  noise, so a sample's not quite flat background still reads as empty) per five digit images."""

  def __init__(self, split: str, seed: int = DATA_SEED):
    if split not in ("train", "val"):
      raise ValueError(f"split {split!r} of 'digit_cells' is not 'train' or 'val'.")
    self.split, self.seed = split, seed
    self.small, self.large, self.labels, _ = _digit_split(split)
    self.n = len(self.labels)

  def __len__(self) -> int:
    return 2 * self.n + self.n // 5

  def __getitem__(self, i):
    i = i.__index__()
    rng = np.random.default_rng([self.seed, 7 + (self.split == "val"), i])
    cell = np.full((CELL, CELL), -1.0, np.float32)
    if i >= 2 * self.n:
      cell += rng.uniform(0.0, 0.2) * np.abs(rng.standard_normal((CELL, CELL))).astype(np.float32)
      return {"images": np.minimum(cell, 1.0)[..., None], "labels": np.int32(EMPTY)}
    j, size = divmod(i, 2)
    paint(cell, self.small[j], self.large[j] if size else None)
    return {"images": cell[..., None], "labels": np.int32(self.labels[j])}


def check_config(data_cfg) -> None:
  """One sentence for a caption or cell data config that cannot work, before anything compiles."""
  if data_cfg.name == "digit_captions":
    tokens = tokens_of(data_cfg)
    if tokens not in CAPTION_TOKENS:
      raise ValueError(f"data.caption_tokens={tokens!r} is not one of {CAPTION_TOKENS}.")
    kind = "ByT5" if tokens == "byt5" else "word"
    if "text_len" not in data_cfg:
      raise ValueError("data.name='digit_captions' needs data.text_len (the caption length in "
                       f"{kind} ids, at least {max_text_ids(tokens)}).")
    if not 0 <= data_cfg.image_size <= CANVAS:
      raise ValueError(f"data.image_size={data_cfg.image_size} must be in [1, {CANVAS}] (the "
                       f"{CANVAS}x{CANVAS} canvas resized; 0 keeps {CANVAS}).")
    if data_cfg.text_len < max_text_ids(tokens):
      raise ValueError(f"data.text_len={data_cfg.text_len} is shorter than the longest caption "
                       f"of 'digit_captions' ({max_text_ids(tokens)} {kind} ids with its EOS).")


def source(data_cfg, split: str):
  """The random-access source of ``split`` of "digit_captions" or "digit_cells"."""
  check_config(data_cfg)
  if data_cfg.name == "digit_captions":
    return CaptionSource(split, data_cfg.text_len, size=data_cfg.image_size,
                         tokens=tokens_of(data_cfg))
  return CellSource(split)


def num_classes(data_cfg) -> int:
  """Labels: the first digit of a caption (10), or a cell's class (11, EMPTY included)."""
  return 10 if data_cfg.name == "digit_captions" else 11
