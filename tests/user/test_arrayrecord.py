"""The README's own-corpus path: `python -m train.make_arrayrecord` on a folder of text files,
then `python -m train` on its output, as written.

my_texts/ is a folder of 300 of the standard library's .py files renamed .txt (so some land in
the validation split by their path hash), and /data/my_corpus a tmp folder.
"""

import json
import os
import shutil
import sysconfig

import pytest

from tests.user import check_lm_run, run, substitute
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
  """Override: --config.train.steps=5 (of 500)."""
  command = substitute(TRAIN, DIR=tmp_path / "run", **{"/data/my_corpus": corpus["corpus"]})
  out = run(command + f" --config.train.steps={STEPS}", tmp_path / "run.log", timeout=600).stdout
  assert "arrayrecord" in (tmp_path / "run" / "config.json").read_text()
  check_lm_run(tmp_path / "run", out, STEPS, "experiments/lm_stdlib.py:size=small")
