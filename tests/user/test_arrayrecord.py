"""The README's own-corpus path: `python -m train.make_arrayrecord` on a folder of text files,
then `python -m train` on its output, alone and mixed with the stdlib corpus (docs/data.md,
Mixtures), as written.

my_texts/ is a folder of 300 of the standard library's .py files renamed .txt (so some land in
the validation split by their path hash), and /data/my_corpus a tmp folder.
"""

import json
import os
import shutil
import sysconfig

import pytest

from tests.user import check_lm_run, metrics, run, substitute
from tests.user.commands import doc

STEPS = 5
MAKE = doc("python -m train.make_arrayrecord --src=my_texts/ --dst=/data/my_corpus "
           "--glob='**/*.txt'")
TRAIN = doc("python -m train --config=experiments/lm_stdlib.py:size=small --workdir=DIR "
            "--cpu_devices=8 --config.data.name=arrayrecord --config.data.path=/data/my_corpus")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("arrayrecord")
  texts = root / "my_texts"
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:300]
  for sub, name in enumerate(files):  # in sub-folders, as the '**' glob allows
    os.makedirs(texts / f"part{sub % 3}", exist_ok=True)
    shutil.copy(os.path.join(stdlib, name), texts / f"part{sub % 3}" / (name[:-3] + ".txt"))
  out = run(substitute(MAKE, **{"my_texts/": f"{texts}/", "/data/my_corpus": root / "corpus"}),
            root / "make.log", timeout=300).stdout
  return dict(root=root, corpus=root / "corpus", out=out)


def test_make_arrayrecord_writes_shards(corpus):
  metadata = json.loads((corpus["corpus"] / "metadata.json").read_text())
  shards = [f for f in os.listdir(corpus["corpus"]) if f.endswith(".array_record")]
  assert any(f.startswith("train-") for f in shards) and any(f.startswith("val-") for f in shards)
  assert metadata, corpus["out"][-2000:]


def test_train_on_the_arrayrecord_output_as_written(corpus, tmp_path):
  """Overrides: --config.train.steps=5 (of 500), --config.eval.steps=2 (of 8 batches of the
  5M-parameter model, at step 0 and 5) and --config.sample.max_new_tokens=48 (of 200), as the
  other byte-LM user tests."""
  command = substitute(TRAIN, DIR=tmp_path / "run", **{"/data/my_corpus": corpus["corpus"]})
  out = run(command + f" --config.train.steps={STEPS} --config.eval.steps=2"
            " --config.sample.max_new_tokens=48", tmp_path / "run.log", timeout=600).stdout
  assert "arrayrecord" in (tmp_path / "run" / "config.json").read_text()
  check_lm_run(tmp_path / "run", out, STEPS, "experiments/lm_stdlib.py:size=small")


TOKENIZE = doc("python -m train.tokenizer --src=my_texts/ --vocab_size=8192 "
               "--out=/data/tok/tokenizer.json")
CONVERT_JSONL = doc("python -m train.make_arrayrecord --src=my_docs.jsonl --text_field=text "
                    "--tokenizer=/data/tok/tokenizer.json --dst=/data/my_bpe_corpus")


def test_train_a_tokenizer_then_convert_jsonl_with_it_as_written(tmp_path):
  """docs/data.md's tokenizer commands on 40 small stdlib files (a few hundred merges, not 8192)."""
  from train import tokenizer
  texts = tmp_path / "my_texts"
  texts.mkdir()
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:40]
  for name in files:
    shutil.copy(os.path.join(stdlib, name), texts / (name[:-3] + ".txt"))
  tok_path = tmp_path / "tok" / "tokenizer.json"
  out = run(substitute(TOKENIZE, **{"my_texts/": f"{texts}/", "/data/tok/tokenizer.json": tok_path}),
            tmp_path / "tokenize.log", timeout=300).stdout
  tok = tokenizer.load(str(tok_path))
  assert 259 < tok.vocab_size <= 8192 and tok.eos_id == 2, out[-2000:]
  docs = [(texts / (n[:-3] + ".txt")).read_text(errors="replace") for n in files]
  with open(tmp_path / "my_docs.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  out = run(substitute(CONVERT_JSONL, **{"my_docs.jsonl": tmp_path / "my_docs.jsonl",
                                         "/data/tok/tokenizer.json": tok_path,
                                         "/data/my_bpe_corpus": tmp_path / "corpus"}),
            tmp_path / "convert.log", timeout=300).stdout
  meta = json.loads((tmp_path / "corpus" / "metadata.json").read_text())
  assert meta["vocab"] == tok.name and sum(
      s["num_docs"] for s in meta["splits"].values()) == len(docs), out[-2000:]


MIXTURE = doc("python -m train --config=experiments/lm_mixture.py --workdir=DIR --cpu_devices=8 "
              "--config.data.sources.prose.path=/data/my_corpus")


def test_train_on_a_mixture_as_written(corpus, tmp_path):
  """docs/data.md's mixture: the stdlib's code (70%) and the converted corpus above (30%).
  Overrides: --config.train.steps=5 (of 500), --config.opt.warmup_steps=2 (of 50: the loss must
  move in 5 steps), --config.train.batch_size=8 (of 16), --config.eval.steps=1 (of 8 batches
  per source) and --config.sample.max_new_tokens=16 (of 200)."""
  workdir = tmp_path / "run"
  command = substitute(MIXTURE, DIR=workdir, **{"/data/my_corpus": corpus["corpus"]})
  out = run(command + " --config.train.steps=5 --config.opt.warmup_steps=2 "
            "--config.train.batch_size=8 --config.eval.steps=1 --config.sample.max_new_tokens=16",
            tmp_path / "run.log", timeout=600).stdout
  check_lm_run(workdir, out, 5, "experiments/lm_mixture.py")
  pooled = metrics(workdir, "val")
  by_source = {key: metrics(workdir, f"val/{key}") for key in ("code", "prose")}
  for key, lines in by_source.items():
    assert [m["step"] for m in lines] == [0, 5], lines
    assert lines[-1]["bits_per_byte"] < lines[0]["bits_per_byte"], lines
  # The pooled line sums the sources' token counts; the headline names each source.
  for i, line in enumerate(pooled):
    assert line["tokens"] == sum(lines[i]["tokens"] for lines in by_source.values()), line
  last = {key: lines[-1]["bits_per_byte"] for key, lines in by_source.items()}
  assert (f"(code {last['code']:.3f}, prose {last['prose']:.3f} bits/byte)" in out), out[-3000:]
  saved = json.loads((workdir / "config.json").read_text())["data"]
  assert saved["sources"]["prose"]["path"] == str(corpus["corpus"])
  assert saved["sources"]["code"]["weight"] == 0.7
  assert saved["packing"] == "documents"  # the experiment packs documents: on the user's path
