"""train/multiple_choice.py and train/evaluate.py: batched choice log-likelihoods against a naive
one-row-at-a-time computation, the acc/acc_norm arithmetic, the task files' checks, the built-in
stdlib task; and the LM task's bytes (bits per byte comparable across tokenizers)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from nets import llama
from tests.train.test_generate import write_random_llama_workdir
from train import data, evaluate, generate, models
from train import multiple_choice as mc
from train import tokenizer as tokenizer_lib
from train.tasks import lm as lm_task

MAX_LEN = 128


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A byte-level Llama workdir (random parameters, saved as train.convert saves them) whose
  config asks for the mesh data=2 x fsdp=2 x tensor=2."""
  path = tmp_path_factory.mktemp("evaluate")
  config = lm.get_config("size=test")
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_len=MAX_LEN, init_std=0.3)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.train.seq_len = MAX_LEN  # the length train.evaluate cuts rows to
  return str(write_random_llama_workdir(path, config, step=3))


QUESTIONS = [
    mc.Question("def add(a, b):\n    return", (" a + b", "\n", " add(a, b) * 2"), 0),
    mc.Question("", ("import os", "x"), 1),  # an empty context: the choices follow EOS
    mc.Question("# " + "many words of a comment " * 10, (" end", " é ✓"), 1),  # > MAX_LEN: cut
    mc.Question("class Point:\n", ("    x: int = 0", "pass", "    y = 1"), 2),
]


def naive_loglikelihood(model, params, ids: list[int], scored: int) -> float:
  """model.apply on one row alone, float64 log-softmax, summed over its last ``scored`` targets."""
  inputs = jnp.asarray([ids[:-1]], jnp.int32)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs)[0], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - scored, len(ids) - 1)))


def test_batched_loglikelihoods_equal_a_naive_row_by_row_computation(workdir):
  """The sharded, bucketed, padded batches (3 buckets, batch rows split over data x fsdp) give
  each choice the log-likelihood model.apply gives it alone; a too-long context loses its
  oldest tokens, an empty one becomes EOS."""
  config = generate.lm_workdir_config(workdir, purpose="evaluation", verb="evaluate")
  loaded = generate.load(workdir, config)
  assert loaded.step == 3 and loaded.data_parallel == 4
  tok = tokenizer_lib.from_workdir(workdir)
  rows = mc.encode(QUESTIONS, tok, max_len=mc.input_limit(loaded.model))
  with loaded.context():
    batched = mc.loglikelihoods(loaded.model, loaded.params, rows, batch_size=8, pad_id=256,
                                sharding=loaded.rows_sharding())
  assert sorted({mc.bucket_of(len(r) - 1, MAX_LEN) for r in rows.ids}) == [32, 64, 128]
  model = llama.Model(models.model_config(config))  # one device, no mesh
  params = jax.tree.map(np.asarray, loaded.params)
  naive = []
  for q in QUESTIONS:
    context = list(tok.encode_prompt(q.context)) or [tokenizer_lib.EOS_ID]
    for choice in q.choices:
      choice_ids = tok.encode(choice).tolist()
      ids = (context + choice_ids)[-(MAX_LEN + 1):]
      naive.append(naive_loglikelihood(model, params, ids, len(choice_ids)))
  assert len(rows.ids[5]) == len(rows.ids[6]) == MAX_LEN + 1  # question 2: cut to max_len
  np.testing.assert_allclose(batched, naive, rtol=1e-5)
  assert np.all(np.asarray(naive) < 0)
  # The same numbers through the command's run(), which also appends to evals.jsonl.
  path = os.path.join(workdir, "tasks.jsonl")
  with open(path, "w") as f:
    for q in QUESTIONS:
      f.write(json.dumps({"context": q.context, "choices": list(q.choices), "gold": q.gold}) + "\n")
  with open(os.path.join(workdir, evaluate.RESULTS), "w") as f:
    f.write('{"earlier": "result"}\n')
  (result,) = evaluate.run(workdir, [path], batch_size=6)
  want = mc.score(QUESTIONS, mc.per_question(rows, np.asarray(naive)))
  assert result == {"step": 3, "task": path, **want}
  with open(os.path.join(workdir, evaluate.RESULTS)) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0] == {"earlier": "result"} and len(lines) == 2
  assert {k: lines[1][k] for k in result} == result and "time" in lines[1]
  assert evaluate.line(result) == (f"{path}: 4 questions, acc {want['acc']:.4f}, acc_norm "
                                   f"{want['acc_norm']:.4f}")


def test_rows_are_cut_to_the_length_the_model_was_trained_at(workdir, tmp_path):
  """train.seq_len for a trained run (RoPE positions past it were never trained), the model's
  max_len for an imported one, or --max_len."""
  config = generate.lm_workdir_config(workdir)
  model = llama.Model(models.model_config(config))
  config.train.seq_len = 64
  assert evaluate.trained_length(workdir, config, model, None) == 64
  assert evaluate.trained_length(workdir, config, model, 100) == 100
  with pytest.raises(ValueError, match=r"--max_len=129 must be in \[1, 128\]"):
    evaluate.trained_length(workdir, config, model, 129)
  (tmp_path / "converted.json").write_text("{}")
  assert evaluate.trained_length(str(tmp_path), config, model, None) == MAX_LEN


def test_acc_and_acc_norm_on_planted_loglikelihoods(tmp_path):
  """acc: the highest sum; acc_norm: the highest sum per UTF-8 byte of the choice."""
  path = tmp_path / "hand.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"context": "a", "choices": ["x", "longer text"], "gold": 1},  # -2 vs -3: acc misses
      {"query": "b", "choices": ["é", "ab"], "label": 0},  # lm-eval's names; é is 2 bytes
      {"context": "c", "choices": ["one", "two", "six"], "gold": 2},
  ]) + "\n\n")
  questions = mc.read_jsonl(str(path))
  assert questions[1] == mc.Question("b", ("é", "ab"), 0)
  planted = [np.array([-2.0, -3.0]), np.array([-3.0, -4.0]), np.array([-9.0, -1.0, -1.0])]
  # q0: acc picks 0 (wrong); per byte -2/1 < -3/11, so acc_norm picks 1 (right).
  # q1: acc picks 0 (right); per byte -3/2 < -4/2, acc_norm picks 0 (right).
  # q2: a tie goes to the first: choice 1 (wrong) both ways.
  assert mc.score(questions, planted) == {"questions": 3, "acc": 1 / 3, "acc_norm": 2 / 3}
  assert mc.score(questions[:1], [np.array([-3.0, -2.0])]) == {
      "questions": 1, "acc": 1.0, "acc_norm": 1.0}
  assert len(mc.read_jsonl(str(path), limit=2)) == 2


@pytest.mark.parametrize("text, message", [
    (None, "task file {p} does not exist"),
    ('{"context": "a", "choices": ["x"], "gold": 0}\n{"context": ', "{p} line 2 is not valid JSON"),
    ('{"context": "a", "gold": 0}', "{p} line 1 has no 'choices' field"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}',
     r"{p} line 1: gold=2 is not the index of one of its 2 choices \(0..1\)"),
    ('{"context": "a", "choices": [], "gold": 0}', "{p} line 1 has no choices"),
    ('{"context": "a", "choices": ["x", ""], "gold": 0}', "{p} line 1: choice 1 is empty"),
    ('[1, 2]', "{p} line 1 is a JSON list, not an object"),
    ("\n", "task file {p} holds no questions"),
])
def test_a_bad_task_file_is_one_sentence_naming_file_and_line(tmp_path, text, message):
  path = tmp_path / "task.jsonl"
  if text is not None:
    path.write_text(text)
  with pytest.raises(ValueError, match=message.format(p=path)):
    mc.read_jsonl(str(path))


def test_a_workdir_that_is_not_a_language_model_is_one_sentence(workdir, tmp_path):
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["task"] = "diffusion"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=f"{tmp_path} holds a 'diffusion' model; evaluation needs "
                     r"a language model \(task 'lm'\)"):
    evaluate.prepare(str(tmp_path), ["stdlib_next_line"], limit=None, batch_size=8)
  with pytest.raises(ValueError, match="--limit=0 must be at least 1"):
    evaluate.prepare(workdir, ["stdlib_next_line"], limit=0, batch_size=8)


def test_stdlib_next_line_is_deterministic_held_out_and_well_formed():
  config = lm.get_config("size=test")
  questions = mc.load_task("stdlib_next_line", config.data)
  assert len(questions) == 200 and questions == mc.stdlib_next_line(config.data)
  assert mc.load_task("stdlib_next_line", config.data, limit=7) == questions[:7]
  assert {q.gold for q in questions} == {0, 1, 2, 3}
  root = data.default_stdlib_root()
  val = {}
  for rel in data.split_files(root, "val", config.data.val_fraction):
    with open(os.path.join(root, rel), "rb") as f:
      val[rel] = f.read().decode("utf-8", errors="replace").replace("\r", "")
  for q in questions[:20]:
    assert len(q.choices) == 4 and len({c.strip() for c in q.choices}) == 4
    assert q.context.count("\n") == 8
    # the context and its gold line come from a validation file, in that order
    assert any(q.context + q.choices[q.gold] + "\n" in text for text in val.values())


class _Logits:
  """A stand-in model whose apply returns fixed logits: the eval step's sums are what is tested."""

  def __init__(self, logits):
    self.logits = logits

  def apply(self, variables, inputs, positions=None, segment_ids=None):
    return self.logits


def test_the_lm_eval_step_counts_the_utf8_bytes_of_its_targets(tmp_path):
  """bits_per_byte = summed loss / ln 2 / the bytes of the targets' text, whatever the tokenizer:
  a BPE's targets count their text's bytes, the byte tokenizer's EOS counts none."""
  text = "def f(x):\n    return x  # héllo ✓ 🙂\n"
  bpe = tokenizer_lib.train_bpe([text * 4], 290, str(tmp_path / "tokenizer.json"))
  for tok in (bpe, tokenizer_lib.load("byte")):
    config = lm.get_config("size=test")
    config.data.tokenizer = tok.path or "byte"
    task = lm_task.LMTask(config)
    ids = np.concatenate([tok.encode(text), [tok.eos_id], tok.encode(text)]).astype(np.int32)
    batch = {"inputs": ids[None, :-1], "targets": ids[None, 1:]}
    logits = np.random.default_rng(0).normal(size=(1, len(ids) - 1, 384)).astype(np.float32)
    sums = jax.device_get(jax.jit(task.eval_fn(_Logits(logits)))({}, batch))
    # the text twice but its first token (an input only); the EOS between spells nothing
    assert sums["bytes"] == 2 * len(text.encode()) - len(tok.decode(ids[:1]).encode())
    assert sums["tokens"] == len(ids) - 1
    metrics = task.summarize(sums)
    assert metrics["bits_per_byte"] == pytest.approx(
        float(sums["loss_sum"]) / math.log(2) / float(sums["bytes"]), rel=1e-6)
    assert metrics["bits_per_token"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-6)
