"""Multiple-choice log-likelihood evaluation of a language model, as lm-eval scores such tasks.

A task is a jsonl file, one question a line: ``{"context": str, "choices": [str, ...], "gold":
int}`` (lm-eval's names ``query`` for the context and ``label`` for the gold index are accepted
too), or a built-in name (``BUILTIN``: ``stdlib_next_line``). Each choice is scored by the sum of
the log-probabilities of its tokens given the context: the context is encoded as the tokenizer
frames a prompt (``encode_prompt``: e.g. a Llama tokenizer.json's leading BOS; a context that
encodes to nothing becomes the EOS that precedes every document), the choice separately with
``encode`` and appended, so every choice of a question shares the same context ids. ``acc`` takes
the choice with the highest sum, ``acc_norm`` the highest sum per UTF-8 byte of the choice's text
(lm-eval's acc_norm divides by characters; bytes keep it independent of the tokenizer and the
script alike).

Scoring runs in fixed shapes: rows (question, choice) are grouped into length buckets (powers of
two from 32, up to the model's max_len) and padded to ``batch_size`` rows, so the forward pass
compiles once per bucket used. A row longer than the caller's limit (the length the model was
trained at) loses its context's oldest tokens.
"""

import dataclasses
import functools
import os

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np

from nets import registry
from train import text_sources, watchdog

# lm-eval's other names for the fields, accepted as they are: (field, names in order of preference).
FIELDS = (("context", ("context", "query")), ("choices", ("choices",)), ("gold", ("gold", "label")))
MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Question:
  context: str
  choices: tuple[str, ...]
  gold: int


# ----------------------------------------------------------------------------- reading tasks


def read_jsonl(path: str, limit: int | None = None) -> list[Question]:
  """The questions of ``path`` (the first ``limit``), or one sentence naming the file and line of
  the first one that is not a question."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} does not exist; give a jsonl file of "
                     '{"context": ..., "choices": [...], "gold": i} lines or a built-in task '
                     f"({', '.join(BUILTIN)}).")
  questions = []
  for number, row in text_sources.jsonl_lines(path):
    if limit is not None and len(questions) >= limit:
      break
    questions.append(_question(row, f"{path} line {number}"))
  if not questions:
    raise ValueError(f"task file {path} holds no questions.")
  return questions


def _question(row, where: str) -> Question:
  if not isinstance(row, dict):
    raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object with "
                     '"context", "choices" and "gold".')
  values = {}
  for field, names in FIELDS:
    name = next((n for n in names if n in row), None)
    if name is None:
      raise ValueError(f"{where} has no {field!r} field (it has {sorted(row)}).")
    values[field] = row[name]
  context, choices, gold = values["context"], values["choices"], values["gold"]
  if not isinstance(context, str):
    raise ValueError(f"{where}: the context is a {type(context).__name__}, not a string.")
  if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"{where}: choices must be a list of strings.")
  if not choices:
    raise ValueError(f"{where} has no choices.")
  if not all(choices):
    raise ValueError(f"{where}: choice {choices.index('')} is empty; every choice needs text.")
  if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
    raise ValueError(f"{where}: gold={gold!r} is not the index of one of its {len(choices)} "
                     f"choices (0..{len(choices) - 1}).")
  return Question(context, tuple(choices), gold)


def stdlib_next_line(data_cfg, num_questions: int = 200, context_lines: int = 8,
                     seed: int = 0) -> list[Question]:
  """Python next-line prediction on the validation files of the stdlib corpus: the context is
  ``context_lines`` lines of a file, the choices the line that follows and 3 lines of other
  files (each line at least 8 characters without its indentation, the 4 distinct), the gold's
  place drawn at random. Deterministic: the same files give the same questions.

  The files are the "val" split of ``data_cfg`` when it is the stdlib corpus (so a model
  trained on it never saw them), else of the running Python's standard library at
  val_fraction 0.05 (the LM config's default).
  """
  from train import data
  stdlib = data_cfg is not None and data_cfg.name == "stdlib"
  root = os.path.realpath(data_cfg.path) if stdlib and data_cfg.path else data.default_stdlib_root()
  fraction = float(data_cfg.val_fraction) if stdlib else 0.05
  files = []
  for rel in data.split_files(root, "val", fraction):
    try:
      with open(os.path.join(root, rel), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    except OSError:
      continue
    lines = [line.rstrip("\r") for line in text.split("\n")]
    usable = [i for i, line in enumerate(lines) if len(line.strip()) >= 8]
    if usable:
      files.append((lines, usable))
  targets = [f for f, (_, usable) in enumerate(files) if usable[-1] >= context_lines]
  if len(files) < 2 or not targets:
    raise ValueError(f"the stdlib task needs Python files in the val split of {root} "
                     f"(val_fraction={fraction}); it found {len(files)} usable ones.")
  rng = np.random.default_rng(seed)
  questions = []
  while len(questions) < num_questions:
    f = targets[rng.integers(len(targets))]
    lines, usable = files[f]
    i = int(rng.choice([i for i in usable if i >= context_lines]))
    choices = [lines[i]]
    for _ in range(1000):  # draws of other files' lines until 3 differ from the others
      g = int(rng.integers(len(files)))
      other_lines, other_usable = files[g]
      line = other_lines[other_usable[rng.integers(len(other_usable))]]
      if g != f and line.strip() not in {c.strip() for c in choices}:
        choices.append(line)
      if len(choices) == 4:
        break
    else:
      raise ValueError(f"the stdlib task found too few distinct lines in the val split of {root} "
                       f"(val_fraction={fraction}) to draw 3 wrong choices.")
    gold = int(rng.integers(4))
    choices[0], choices[gold] = choices[gold], choices[0]
    context = "\n".join(lines[i - context_lines:i]) + "\n"
    questions.append(Question(context, tuple(choices), gold))
  return questions


BUILTIN = {"stdlib_next_line": stdlib_next_line}


def task_list(text: str) -> list[str]:
  """``eval.tasks``' comma-separated files and built-in names."""
  return [part.strip() for part in str(text).split(",") if part.strip()]


def tasks_of(eval_cfg) -> list[str]:
  """``eval.tasks`` of a config; none for a config.json written before the field existed."""
  return task_list(eval_cfg.get("tasks", ""))


def task_name(spec: str) -> str:
  """A task's name in metrics: the built-in name, else the file's name without .jsonl."""
  return spec if spec in BUILTIN else os.path.basename(spec).removesuffix(".jsonl")


def load_task(spec: str, data_cfg=None, limit: int | None = None) -> list[Question]:
  """The questions of a built-in task name or a jsonl file (the first ``limit``)."""
  if spec in BUILTIN:
    questions = BUILTIN[spec](data_cfg)
    return questions[:limit] if limit is not None else questions
  return read_jsonl(spec, limit)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Rows:
  """The questions encoded: one row per (question, choice), the context's ids then the choice's."""
  ids: list[np.ndarray]  # context + choice ids of each row
  scored: list[int]  # how many of the row's last ids are the choice's (the scored targets)
  question: np.ndarray  # the question index of each row


def encode(questions: list[Question], tok, *, max_len: int, where: str = "") -> Rows:
  """Rows of ``questions`` (see the module docstring) of at most ``max_len`` model inputs: a
  longer context loses its oldest tokens, a longer choice is one sentence."""
  start = tok.eos_id if tok.eos_id is not None else tok.bos_id
  ids, scored, question = [], [], []
  for q_index, q in enumerate(questions):
    context = [int(i) for i in tok.encode_prompt(q.context)]
    if not context and start is None:
      raise ValueError(f"{where}question {q_index}'s context encodes to no tokens and the "
                       "tokenizer has no EOS or BOS to start it with; give it some text.")
    context = context or [start]
    for c_index, choice in enumerate(q.choices):
      choice_ids = [int(i) for i in tok.encode(choice)]
      if not choice_ids:
        raise ValueError(f"{where}question {q_index} choice {c_index} encodes to no tokens.")
      if len(choice_ids) > max_len:
        raise ValueError(f"{where}question {q_index} choice {c_index} has {len(choice_ids)} "
                         f"tokens; with one context token that is more than the model's "
                         f"{max_len} input positions.")
      keep = max_len + 1 - len(choice_ids)  # inputs are all ids but the last
      ids.append(np.asarray(context[-keep:] + choice_ids, np.int32))
      scored.append(len(choice_ids))
      question.append(q_index)
  return Rows(ids, scored, np.asarray(question))


def bucket_of(length: int, max_len: int, multiple: int = 1) -> int:
  """The padded input length of a row of ``length`` inputs: the next power of two from
  MIN_BUCKET (a multiple of ``multiple``, the family's length unit), at most max_len's."""
  top = max_len // multiple * multiple
  bucket = max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())
  return min(-(-bucket // multiple) * multiple, top)


@functools.partial(jax.jit, static_argnames="model")
def _scored_logprobs(model, params, inputs_BxL, targets_BxL, mask_BxL):
  """Per row, the summed float32 log-probabilities of the masked targets."""
  logits_BxLxV = model.apply({"params": params}, inputs_BxL).astype(jnp.float32)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  picked_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.sum(picked_BxL * mask_BxL, axis=-1)


def input_limit(model) -> int:
  """The longest input the model takes: max_len, in whole units of the family's length multiple
  (MEGABYTE's patches)."""
  multiple = registry.of_model(model).length_multiple(model.cfg)
  return model.cfg.max_len // multiple * multiple


def loglikelihoods(model, params, rows: Rows, *, batch_size: int, pad_id: int = 0,
                   sharding=None) -> np.ndarray:
  """float64[rows]: each row's summed log-probability of its choice's tokens, batched
  ``batch_size`` rows at a time in length buckets. ``sharding``: where the [rows, length] batch
  lives (rows split over the batch axes only; ``batch_size`` must divide over them); called
  inside the mesh and logical-rule context the model needs."""
  if sharding is not None:
    sharding = jax.sharding.NamedSharding(sharding.mesh,
                                          jax.sharding.PartitionSpec(*sharding.spec[:1]))
  multiple = registry.of_model(model).length_multiple(model.cfg)
  lengths = [len(r) - 1 for r in rows.ids]
  buckets = np.array([bucket_of(n, model.cfg.max_len, multiple) for n in lengths])
  out = np.zeros(len(rows.ids), np.float64)
  for bucket in sorted(set(buckets.tolist())):
    members = np.flatnonzero(buckets == bucket)
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      inputs = np.full((batch_size, bucket), pad_id, np.int32)
      targets = np.zeros((batch_size, bucket), np.int32)
      mask = np.zeros((batch_size, bucket), np.float32)
      for b, r in enumerate(chunk):
        row, n = rows.ids[r], lengths[r]
        inputs[b, :n], targets[b, :n] = row[:-1], row[1:]
        mask[b, n - rows.scored[r]:n] = 1.0
      put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
      sums = _scored_logprobs(model, params, put(inputs), put(targets), put(mask))
      sums = np.asarray(jax.experimental.multihost_utils.process_allgather(sums, tiled=True))
      out[chunk] = sums[:len(chunk)]
      watchdog.beat()
  return out


def per_question(rows: Rows, values: np.ndarray) -> list[np.ndarray]:
  """``values`` of the rows, one array of its choices' values per question."""
  return np.split(values, np.flatnonzero(np.diff(rows.question)) + 1)


def score(questions: list[Question], choice_loglikelihoods: list[np.ndarray]) -> dict:
  """{"questions", "acc", "acc_norm"}: how often the gold choice has the highest log-likelihood,
  and the highest log-likelihood per UTF-8 byte of its text (ties go to the first choice)."""
  right = right_norm = 0
  for q, lls in zip(questions, choice_loglikelihoods, strict=True):
    lls = np.asarray(lls, np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in q.choices], np.float64)
    right += int(np.argmax(lls)) == q.gold
    right_norm += int(np.argmax(lls / nbytes)) == q.gold
  n = len(questions)
  return {"questions": n, "acc": right / max(n, 1), "acc_norm": right_norm / max(n, 1)}


def evaluate(model, params, tok, questions: list[Question], *, batch_size: int, max_len: int,
             sharding=None, where: str = "") -> dict:
  """``score`` of ``questions`` under ``model``, rows of at most ``max_len`` inputs (``encode``;
  see ``loglikelihoods`` for the other arguments)."""
  rows = encode(questions, tok, max_len=max_len, where=where)
  pad_id = tok.pad_id if tok.pad_id is not None else 0
  values = loglikelihoods(model, params, rows, batch_size=batch_size, pad_id=pad_id,
                          sharding=sharding)
  return score(questions, per_question(rows, values))
