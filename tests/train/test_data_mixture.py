"""Data mixtures (data.sources, train/data.py ``mixed``): the share of windows per source follows
the weights, the checkpointed iterator resumes the mixture exactly, packing works per source,
each source keeps its own val split, the checks name the source; and the loop's evaluation
reports each source and the pooled sums (train/loop.py ``_Loop.evaluate``)."""

import contextlib
import json
import math
import types

import jax
import ml_collections
import numpy as np
import pytest

from tests import restore_data_position
from absl import flags
from ml_collections import config_flags

from parallel import sharding
from train import data, loop, make_arrayrecord, metrics

A, B = ord("a"), ord("b")  # the only letters of the "code" and of the "prose" documents


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """"code": a folder of .py files of a's (a stdlib source); "prose": b's written from a jsonl by
  train.make_arrayrecord (an arrayrecord source). Every window of either holds its letter."""
  root = tmp_path_factory.mktemp("mixture")
  (root / "code").mkdir()
  for i in range(40):
    (root / "code" / f"m{i}.py").write_bytes(b"a" * (200 + 7 * i))
  with open(root / "prose.jsonl", "w") as f:
    f.writelines(json.dumps({"text": "b" * (150 + 5 * i)}) + "\n" for i in range(60))
  make_arrayrecord.convert(str(root / "prose.jsonl"), str(root / "prose"), chunk_len=64,
                           num_shards=2, val_fraction=0.2)
  return root


def mixture_cfg(folders, code=0.7, prose=0.3, packing="none", **top):
  cfg = ml_collections.ConfigDict(dict(
      name="stdlib", path="", val_fraction=0.2, tokenizer="byte", packing=packing, num_threads=0,
      prefetch=1, sources=dict(
          code=dict(name="stdlib", path=str(folders / "code"), weight=code),
          prose=dict(name="arrayrecord", path=str(folders / "prose"), weight=prose))))
  cfg.update(top)
  return cfg


def train_iter(cfg, seed=0):
  return iter(data.make_dataset(cfg, split="train", seq_len=16, global_batch_size=8, seed=seed,
                                shuffle=True, num_epochs=None))


def take(it, n):
  return [next(it) for _ in range(n)]


def source_of_rows(batches):
  """"code" or "prose" for every window of ``batches``, from the letter it holds."""
  rows = np.concatenate([b["inputs"] for b in batches])
  has_a, has_b = (rows == A).any(axis=1), (rows == B).any(axis=1)
  assert not (has_a & has_b).any() and (has_a | has_b).all()
  return np.where(has_a, "code", "prose")


def test_shares_follow_the_weights_and_resume_is_exact(folders, tmp_path):
  cfg = mixture_cfg(folders)
  data.check_splits(cfg, seq_len=16, batch_sizes={"train": (8, "train.batch_size"),
                                                   "val": (8, "eval.batch_size")})
  it = train_iter(cfg)
  batches = take(it, 125)  # 1,000 windows
  share = np.mean(source_of_rows(batches) == "code")
  assert abs(share - 0.7) < 0.02, share
  # Every global batch mixes both (grain interleaves), and the weights are normalised.
  assert all(len(set(source_of_rows([b]))) == 2 for b in batches)
  for want, got in zip(batches[:3], take(train_iter(mixture_cfg(folders, code=7, prose=3)), 3)):
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
  flipped = source_of_rows(take(train_iter(mixture_cfg(folders, code=1, prose=4)), 50))
  assert abs(np.mean(flipped == "code") - 0.2) < 0.03

  # The mixture's position is the data iterator's checkpoint: save after 3 batches, restore into
  # a fresh iterator, and the next batches are the same.
  it = train_iter(cfg)
  take(it, 3)
  fresh = restore_data_position(tmp_path, it, train_iter(cfg), step=3)
  for want, got in zip(batches[3:8], take(fresh, 5)):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(got[key], want[key])
  # Another seed shuffles each source differently.
  assert not np.array_equal(next(train_iter(cfg, seed=1))["inputs"], batches[0]["inputs"])


def test_each_process_reads_its_rows_of_the_mixed_batch(folders, monkeypatch):
  whole = next(train_iter(mixture_cfg(folders)))
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    part = next(train_iter(mixture_cfg(folders)))
    np.testing.assert_array_equal(part["inputs"], whole["inputs"][index::2])


def test_packing_per_source_and_each_source_keeps_its_val_split(folders):
  cfg = mixture_cfg(folders, packing="documents")
  batches = take(train_iter(cfg), 10)
  assert set(batches[0]) == {"inputs", "targets", "segment_ids", "positions"}
  boundaries = 0
  for b in batches:
    for row in range(len(b["inputs"])):
      want = data.document_fields(b["inputs"][row], b["targets"][row])
      for key, value in want.items():
        np.testing.assert_array_equal(b[key][row], value, err_msg=key)
      boundaries += int(b["segment_ids"][row].max() > 1)
  assert boundaries  # some windows do cross a document end
  assert set(source_of_rows(batches)) == {"code", "prose"}

  for key, letter in (("code", A), ("prose", B)):
    source = data.source_config(cfg, key)
    val = data.make_dataset(source, split="val", seq_len=16, global_batch_size=8, seed=0,
                            shuffle=False, num_epochs=1)
    rows = np.concatenate([b["inputs"] for b in val])
    assert (rows == letter).any(axis=1).all()
    # Its own split, in order: window j is the source's val stream at j * seq_len.
    stream = data.token_stream(source, "val")
    assert len(rows) == (len(stream) - 1) // 16 // 8 * 8 < len(data.token_stream(source, "train"))
    for j, row in enumerate(rows):
      np.testing.assert_array_equal(row, stream.read(16 * j, 16))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.sources.code.update(name="parquet"),
     r"^data.sources.code.name='parquet' is unknown; use one of \('stdlib', 'arrayrecord', 'sft'\)\.$"),
    (lambda c: c.sources.code.update(weight=math.nan),
     r"^data.sources.code.weight=nan must be a finite number above 0 \(the weights are "
     r"normalised to sum to 1\)\.$"),
    (lambda c: c.sources.prose.update(weight=0.0), r"^data.sources.prose.weight=0.0 must be"),
    (lambda c: c.sources.prose.update(weight=-1.0), r"^data.sources.prose.weight=-1.0 must be"),
    (lambda c: c.sources.prose.__delitem__("weight"), r"^data.sources.prose has no 'weight'"),
    (lambda c: c.sources.code.update(wieght=1.0), r"has unknown field\(s\) \['wieght'\]"),
    (lambda c: c.update(path="/data/x"), r"^data.path='/data/x' names one dataset, but "
     r"data.sources names the datasets of a mixture; set data.path=''"),
    (lambda c: c.sources.prose.update(val_fraction=0.1), r"^data.sources.prose.val_fraction is "
     r"unused by an 'arrayrecord' source"),
    (lambda c: c.sources.code.update(val_fraction=1.0), r"^data.sources.code.val_fraction=1.0 "
     r"must lie strictly between 0 and 1\.$"),
    (lambda c: c.sources.prose.update(path=""), r"^data.sources.prose.name='arrayrecord' needs "
     r"data.sources.prose.path set to a shard folder"),
])
def test_mixture_checks_are_one_sentence(folders, change, message):
  cfg = mixture_cfg(folders)
  change(cfg)
  with pytest.raises(ValueError, match=message):
    data.check_data_config(cfg)


def test_a_source_that_cannot_fill_a_batch_is_named(folders):
  cfg = mixture_cfg(folders)
  val_tokens = {key: data.split_tokens(data.source_config(cfg, key), "val")
                for key in ("code", "prose")}
  windows = {key: (n - 1) // 16 for key, n in val_tokens.items()}
  assert windows["code"] < windows["prose"]
  with pytest.raises(ValueError, match=(
      rf"^the 'val' split of data.sources.code \('{folders / 'code'}'\) has "
      rf"{val_tokens['code']:,} tokens, {windows['code']} windows of train.seq_len=16, fewer than "
      rf"one batch of eval.batch_size={windows['code'] + 1}; change "
      r"data.sources.code.val_fraction or add files, or lower eval.batch_size\.$")):
    data.check_splits(cfg, seq_len=16, batch_sizes={"val": (windows["code"] + 1,
                                                            "eval.batch_size")})
  cfg.sources.code.val_fraction = 0.9  # now prose is the one that falls short
  with pytest.raises(ValueError, match=(
      rf"^the 'val' split of data.sources.prose \('{folders / 'prose'}'\) has "
      rf"{val_tokens['prose']:,} tokens, .* eval.batch_size={windows['prose'] + 1}; rewrite the "
      r"dataset with another --val_fraction")):
    data.check_splits(cfg, seq_len=16, batch_sizes={"val": (windows["prose"] + 1,
                                                            "eval.batch_size")})


class _MeanTask:
  """A stand-in task whose eval sums are (total, count) and whose metric is their ratio."""

  def summarize(self, sums):
    return {"mean": float(sums["total"]) / float(sums["count"]), "count": float(sums["count"])}

  def headline(self, m):
    return f"mean {m['mean']:.2f}"

  def source_headline(self, by_source):
    return ", ".join(f"{k} {m['mean']:.2f}" for k, m in by_source.items())

  def extra_metrics(self, model, params, *, sharding):
    return {}

  def samples(self, *args, **kwargs):
    return None


def _evaluate(workdir, val_ds):
  """``_Loop.evaluate`` at step 7 with a stand-in program; (metrics.jsonl lines, messages,
  summary)."""
  program = types.SimpleNamespace(
      task=_MeanTask(), eval_batch=lambda local: local,
      eval_step=lambda params, b: {"total": b["x"].sum(), "count": np.float32(b["x"].size)},
      context=contextlib.nullcontext, sample_model=None, batch_shardings=None,
      plan=types.SimpleNamespace(mesh={"data": 1, "fsdp": 1, "expert": 1}),
      rules=sharding.RULES)
  writer = metrics.Writer(str(workdir), total_steps=1, start_step=0, progress=False)
  messages = []
  writer.message = messages.append
  run = loop._Loop.__new__(loop._Loop)
  run.program, run.config, run.workdir, run.writer, run.val_ds = (
      program, ml_collections.ConfigDict({"eval": {"steps": 3}}), str(workdir), writer, val_ds)
  run.summary, run.weights = {"start_step": 0}, "raw"
  run.evaluate(7, params=None)
  writer.close()
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return lines, messages, run.summary


def test_evaluate_writes_each_source_and_the_pooled_sums(tmp_path):
  """Each source's batches go through eval_step; "val/<source>" lines hold its own metrics and
  the "val" line those of the sums added over sources (not the mean of the sources' means)."""
  code, prose = [{"x": np.full((2,), 1.0)}] * 5, [{"x": np.full((6,), 4.0)}] * 5
  (tmp_path / "mix").mkdir()
  lines, messages, summary = _evaluate(tmp_path / "mix", {"code": code, "prose": prose})
  by_split = {m["split"]: m for m in lines}
  assert set(by_split) == {"val/code", "val/prose", "val"} and {m["step"] for m in lines} == {7}
  assert by_split["val/code"]["mean"] == 1.0 and by_split["val/code"]["count"] == 6
  assert by_split["val/prose"]["count"] == 18
  # Pooled: (3 batches x 2 x 1 + 3 x 6 x 4) / (6 + 18) = 78 / 24.
  assert by_split["val"]["mean"] == pytest.approx(78 / 24) and by_split["val"]["count"] == 24
  assert summary["last_val"]["mean"] == pytest.approx(78 / 24)
  assert summary["last_val_sources"]["prose"]["mean"] == 4.0
  assert messages == ["step 7: mean 3.25 (code 1.00, prose 4.00)"]

  # One dataset: one "val" line, as before mixtures.
  (tmp_path / "one").mkdir()
  lines, messages, summary = _evaluate(tmp_path / "one", prose)
  assert [(m["split"], m["count"], m["mean"]) for m in lines] == [("val", 18, 4.0)]
  assert messages == ["step 7: mean 4.00"] and "last_val_sources" not in summary


def test_the_experiment_takes_source_overrides_and_names_a_missing_path():
  """experiments/lm_mixture.py on the command line: a source's fields are overridable; without
  the prose path the check says which field to set."""
  argv = ["train", "--config=experiments/lm_mixture.py", "--config.data.sources.code.weight=0.5",
          "--config.data.sources.prose.weight=2"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv, lock_config=True)
  values(argv)
  config = values.config
  assert data.source_keys(config.data) == ("code", "prose")
  assert (config.data.sources.code.weight, config.data.sources.prose.weight) == (0.5, 2.0)
  with pytest.raises(ValueError, match=r"^data.sources.prose.name='arrayrecord' needs "
                     r"data.sources.prose.path set to a shard folder; write one with "):
    data.check_data_config(config.data)
