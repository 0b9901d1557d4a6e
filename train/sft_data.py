"""Supervised fine-tuning data (``data.name="sft"``): jsonl rows whose loss covers the completion.

``data.path`` is a ``.jsonl`` file, whose rows go to train or val by a CRC32 of ``"FILE:ROW"``
(``data.val_fraction``; FILE is the file's name, ROW counts non-blank lines from 0: the split rule
of train/text_sources.py), or a folder holding ``train.jsonl`` and ``val.jsonl``. A row is

  * ``{"prompt": str, "completion": str}``: the ids are ``encode_prompt(prompt)`` (the prompt as
    train.generate frames it: a Llama tokenizer.json's post-processor adds BOS; bytes get none),
    ``encode(completion)`` and EOS; the completion and the EOS are learned.
  * ``{"messages": [{"role": str, "content": str}, ...]}``: the conversation rendered with the
    tokenizer's chat template (``Tokenizer.chat_template``) the way transformers'
    ``apply_chat_template`` renders it, then encoded; the tokens of the assistant messages are
    learned. Assistant message i spans, in the rendered text, from the end of the rendering of
    messages[:i] with ``add_generation_prompt=True`` to the end of the rendering of
    messages[:i + 1]: its content and whatever the template closes it with (an end-of-turn or
    EOS token), but not the role header. A token is learned when its characters overlap a span
    (the rule of transformers' ``return_assistant_tokens_mask``).

An example of n ids becomes n - 1 (input, target) positions; a target the loss must skip is the
tokenizer's PAD (-1 when it has none), which ``token_loss`` of the LM task leaves out. Each example
fills one row of ``train.seq_len`` (cut when longer; padded with PAD, or 0, as inputs and skipped
targets), or with ``data.packing="documents"`` rows hold several examples, packed greedily in file
order, with the ``segment_ids`` and ``positions`` of packed LM batches (train/data.py
``document_fields``): examples numbered 1, 2, ... within a row, padding segment 0.
Every fault is one sentence naming the file and line, raised before anything compiles.
"""

import functools
import json
import os

import numpy as np

from train import tokenizer as tokenizer_lib
from train.text_sources import SPLITS, jsonl_lines, split_of

FORMATS = ('{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, '
           '...]}')
WHAT = ('a .jsonl file of ' + FORMATS + ' rows, or a folder holding train.jsonl and val.jsonl')


class Example:
  """One row's ``ids`` (int32) and ``learn`` (bool, per id: the loss predicts it); ``where`` names
  the file and line."""

  def __init__(self, where: str, ids, learn):
    self.where = where
    self.ids = np.asarray(ids, np.int32)
    self.learn = np.asarray(learn, bool)


# ----------------------------------------------------------------------------- rows


def check_path(data_cfg, field: str = "data.path") -> None:
  """data.path (``field``: how the config names it) is a .jsonl file or a folder holding
  train.jsonl and val.jsonl."""
  path = data_cfg.path
  if not path:
    raise ValueError(f"data.name='sft' needs {field} set to {WHAT}.")
  if os.path.isdir(path):
    missing = [f"{s}.jsonl" for s in SPLITS if not os.path.isfile(os.path.join(path, f"{s}.jsonl"))]
    if missing:
      raise ValueError(f"{field}={path!r} is a folder without {' and '.join(missing)}; give "
                       f"{WHAT}.")
  elif not os.path.isfile(path):
    raise ValueError(f"{field}={path!r} does not exist; give {WHAT}.")
  elif not path.endswith(".jsonl"):
    raise ValueError(f"{field}={path!r} is not a .jsonl file; give {WHAT}.")


def split_rows(path: str, split: str, val_fraction: float) -> list[tuple[str, object]]:
  """[("FILE line N", row)] of ``split``: its own file in a folder, else the file's rows whose
  "NAME:ROW" key falls in ``split``."""
  if os.path.isdir(path):
    name = os.path.join(path, f"{split}.jsonl")
    return [(f"{name} line {number}", row) for number, row in jsonl_lines(name)]
  base = os.path.basename(path)
  return [(f"{path} line {number}", row) for i, (number, row) in enumerate(jsonl_lines(path))
          if split_of(f"{base}:{i}", val_fraction) == split]


# ----------------------------------------------------------------------------- examples


def encode_row(tok, row, where: str) -> Example:
  """The ids and learned positions of one row, or one sentence saying what is wrong with it."""
  if not isinstance(row, dict):
    raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object; SFT rows are "
                     f"{FORMATS}.")
  if "messages" in row:
    if "prompt" in row or "completion" in row:
      raise ValueError(f"{where} has both \"messages\" and \"prompt\"/\"completion\"; give one "
                       "format per row.")
    return chat_example(tok, row["messages"], where)
  missing = [k for k in ("prompt", "completion") if k not in row]
  if missing:
    fields = ", ".join(map(repr, row)) or "none"
    raise ValueError(f"{where} has no {' and no '.join(map(repr, missing))} field (it has "
                     f"{fields}); SFT rows are {FORMATS}.")
  for key in ("prompt", "completion"):
    if not isinstance(row[key], str):
      raise ValueError(f"{where}: field {key!r} holds {type(row[key]).__name__}, not text.")
  return prompt_completion_example(tok, row["prompt"], row["completion"], where)


def prompt_completion_example(tok, prompt: str, completion: str, where: str = "") -> Example:
  """The prompt as generation frames it (``encode_prompt``: e.g. Llama's leading BOS from its
  tokenizer.json's post-processor; nothing added for bytes), the completion, EOS; the completion
  and the EOS are learned. Framed as train.generate frames a prompt, so the fine-tuned model is
  asked at generation time exactly as it was taught."""
  prompt_ids, completion_ids = tok.encode_prompt(prompt), tok.encode(completion)
  ids = np.concatenate([prompt_ids, completion_ids, [tok.eos_id]]).astype(np.int32)
  learn = np.arange(len(ids)) >= len(prompt_ids)
  return Example(where, ids, learn)


@functools.lru_cache(maxsize=4)
def compiled_template(source: str):
  """A chat template compiled in the environment transformers renders templates in: a sandbox,
  trim_blocks and lstrip_blocks, loop controls, ``raise_exception`` and its ``tojson``."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


def render_chat(tok, messages: list, add_generation_prompt: bool) -> str:
  """``messages`` as the tokenizer's chat template writes them, with its bos/eos/pad token texts."""
  specials = {f"{kind}_token": tok.token_text(i) for kind, i in
              (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)) if i is not None}
  return compiled_template(tok.chat_template).render(
      messages=messages, add_generation_prompt=add_generation_prompt, **specials)


def _check_messages(messages, where: str) -> None:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: \"messages\" holds {type(messages).__name__}"
                     f"{' (empty)' if messages == [] else ''}, not a list of {{\"role\": ..., "
                     "\"content\": ...}} objects.")
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or not all(isinstance(m.get(f), str) for f in ("role", "content")):
      raise ValueError(f"{where}: message {k} of \"messages\" is not an object with a string "
                       "\"role\" and a string \"content\".")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: \"messages\" has no \"assistant\" message, so nothing of it "
                     "would be trained on.")


def chat_example(tok, messages, where: str = "") -> Example:
  """The conversation through the chat template; the assistant messages' tokens are learned."""
  _check_messages(messages, where)
  if tok.chat_template is None:
    spec = tok.path or "byte"
    raise ValueError(f"{where} has \"messages\", but the tokenizer {spec} has no chat template "
                     "(tokenizer_config.json's \"chat_template\"); give prompt/completion rows, "
                     "or a tokenizer.json whose tokenizer_config.json has one.")
  import jinja2
  try:
    text = render_chat(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before, through = render_chat(tok, messages[:i], True), render_chat(tok, messages[:i + 1],
                                                                           False)
      if not (through.startswith(before) and text.startswith(through)):
        raise ValueError(f"{where}: the chat template of {tok.path} does not render the "
                         f"conversation up to message {i} as the start of the whole one, so the "
                         "assistant tokens cannot be found; give prompt/completion rows, or a "
                         "template whose renderings of a conversation's prefixes are prefixes "
                         "of it.")
      spans.append((len(before), len(through)))
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"{where}: the chat template of {tok.path} failed ({type(e).__name__}: "
                     f"{e}).") from None
  ids, offsets = tok.encode_with_offsets(text)
  learn = [any(end > a and start < b for a, b in spans) for start, end in offsets]
  return Example(where, ids, learn)


@functools.lru_cache(maxsize=8)
def _examples(path: str, stamp: tuple, split: str, val_fraction: float,
              tokenizer_spec: str) -> tuple[Example, ...]:
  del stamp  # the files' (size, mtime): part of the cache key only
  tok = tokenizer_lib.load(tokenizer_spec)
  return tuple(encode_row(tok, row, where) for where, row in split_rows(path, split, val_fraction))


def examples(data_cfg, split: str) -> tuple[Example, ...]:
  """The encoded examples of ``split`` (read and tokenized once per process)."""
  path = os.path.abspath(data_cfg.path)
  files = ([os.path.join(path, f"{s}.jsonl") for s in SPLITS] if os.path.isdir(path) else [path])
  stamp = tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
  spec = tokenizer_lib.spec_of(data_cfg)
  spec = spec if spec == tokenizer_lib.BYTE_SPEC else os.path.abspath(spec)
  return _examples(path, stamp, split, float(data_cfg.val_fraction), spec)


# ----------------------------------------------------------------------------- rows of a batch


def pack(lengths, seq_len: int, packed: bool) -> list[tuple[int, ...]]:
  """The examples of each row: one per row, or (``packed``) consecutive examples while their
  positions (``lengths``, each at most seq_len) fit."""
  if not packed:
    return [(i,) for i in range(len(lengths))]
  rows, row, used = [], [], 0
  for i, n in enumerate(lengths):
    if row and used + n > seq_len:
      rows.append(tuple(row))
      row, used = [], 0
    row.append(i)
    used += n
  return rows + [tuple(row)] if row else rows


class Source:
  """grain random-access source of SFT rows {"inputs", "targets"} (+ "segment_ids", "positions"
  when packed): a pure function of the row index, so the data iterator's checkpoint covers it."""

  def __init__(self, found, seq_len: int, packing: str, pad_id: int | None):
    self.examples, self.seq_len, self.packed = found, seq_len, packing == "documents"
    self.input_pad, self.masked = (0, -1) if pad_id is None else (pad_id, pad_id)
    self.lengths = [min(len(e.ids) - 1, seq_len) for e in found]
    self.rows = pack(self.lengths, seq_len, self.packed)
    self.num_cut = sum(len(e.ids) - 1 > seq_len for e in found)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range for {len(self)} rows")
    S = self.seq_len
    inputs_S = np.full((S,), self.input_pad, np.int32)
    targets_S = np.full((S,), self.masked, np.int32)
    segment_ids_S = np.zeros((S,), np.int32)
    positions_S = np.zeros((S,), np.int32)
    at = 0
    for k, i in enumerate(self.rows[index], 1):
      e, n = self.examples[i], self.lengths[i]
      inputs_S[at:at + n] = e.ids[:n]
      targets_S[at:at + n] = np.where(e.learn[1:n + 1], e.ids[1:n + 1], self.masked)
      segment_ids_S[at:at + n] = k
      positions_S[at:at + n] = np.arange(n)
      at += n
    positions_S[at:] = np.arange(S - at)  # padding: a segment (0) of its own
    if not self.packed:
      return {"inputs": inputs_S, "targets": targets_S}
    return {"inputs": inputs_S, "targets": targets_S, "segment_ids": segment_ids_S,
            "positions": positions_S}

  def __repr__(self) -> str:  # grain logs the source; keep the examples out of it.
    return f"sft_data.Source(rows={len(self)}, seq_len={self.seq_len}, packed={self.packed})"


def check_splits(data_cfg, packing: str, *, seq_len: int,
                 batch_sizes: dict[str, tuple[int, str]], where: str = "",
                 val_field: str = "data.val_fraction") -> None:
  """One sentence for a split that is empty or cannot fill one batch, and for an example with
  nothing to learn within ``seq_len``; ``batch_sizes``: {split: (global batch, config field)};
  ``where`` and ``val_field``: how the config names the dataset and its val_fraction."""
  path = data_cfg.path
  where = where or f"data.path={path!r}"
  for split, (batch, field) in batch_sizes.items():
    found = examples(data_cfg, split)
    if not found:
      if os.path.isdir(path):
        raise ValueError(f"the {split!r} split of {where} is empty: "
                         f"{os.path.join(path, split + '.jsonl')} has no rows; add rows to it.")
      raise ValueError(f"the {split!r} split of {where} is empty ({val_field}="
                       f"{data_cfg.val_fraction} of its rows go to val, by a CRC32 of "
                       f"FILE:ROW); {'raise' if split == 'val' else 'lower'} {val_field} or add "
                       "rows.")
    for e in found:
      if not e.learn[1:seq_len + 1].any():
        first = np.flatnonzero(e.learn[1:])
        why = (f"its prompt alone fills train.seq_len={seq_len} (the first token to learn is "
               f"token {first[0] + 1} of {len(e.ids)})" if len(first) else
               "it has no token to learn")
        raise ValueError(f"{e.where}: {why}, so nothing of it would be trained on; shorten the "
                         "prompt or raise train.seq_len.")
    rows = len(Source(found, seq_len, packing, None))
    if rows < batch:
      raise ValueError(f"the {split!r} split of {where} has {len(found)} SFT "
                       f"examples in {rows} rows of train.seq_len={seq_len}, fewer than one "
                       f"batch of {field}={batch}; add rows, or lower {field}.")
