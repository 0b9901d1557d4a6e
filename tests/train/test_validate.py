"""Every invalid config named in the contract produces its one-sentence message before compiling."""

import pytest

from configs import lm
from tests import run_module
from train import loop, validate


def good():
  c = lm.get_config("size=test")
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(batch_size=8, seq_len=32)
  c.eval.update(batch_size=8)
  return c


def test_good_config_validates():
  plan = validate.validate(good())
  assert plan.mesh == dict(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  assert plan.model_cfg.num_heads == 4


def _set(c, dotted, value):
  group, field = dotted.split(".")
  c[group][field] = value


BAD = {
    "unknown model": ("model.name", "gpt9", r"model.name='gpt9' is not a known model; known models: "
                                            r"\[.*'llama'.*\]"),
    "batch vs data parallel": ("train.batch_size", 6, r"train.batch_size=6 is not divisible by "
                                                      r"the data-parallel size mesh.data\*mesh."
                                                      r"fsdp\*mesh.expert=4"),
    "mesh vs devices": ("mesh.tensor", 4, r"needs 16 devices but 8 are available"),
    "heads vs tensor": ("model.num_heads", 3, r"model.num_heads=3 is not divisible by "
                                              r"mesh.tensor=2"),
    "missing data path": ("data.path", "/nonexistent/corpus", r"data.path='/nonexistent/corpus' "
                                                              r"does not exist"),
    "kv heads vs tensor": ("model.num_kv_heads", 1, r"model.num_kv_heads=1 is not divisible by "
                                                    r"mesh.tensor=2"),
    "seq_len vs max_len": ("train.seq_len", 4096, r"exceeds model.max_len"),
    "unknown model field": ("model.dropout", 0.1, r"unknown field\(s\) \['dropout'\]"),
    "unknown data name": ("data.name", "c4", r"data.name='c4' is unknown"),
    "non-positive steps": ("train.steps", 0, r"train.steps=0 must be a positive integer"),
    "sampling knob": ("sample.top_p", 1.5, r"config.sample: top_p=1.5 must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_config_message(case, tmp_path):
  dotted, value, message = BAD[case]
  c = good()
  if dotted == "model.num_heads":
    # Keep head_dim integral and GQA valid so the tensor check is the one that fires.
    c.model.update(d_model=96, num_kv_heads=1)
  if dotted == "model.dropout":
    c.model.dropout = value
  else:
    _set(c, dotted, value)
  with pytest.raises(ValueError, match=message):
    validate.validate(c)
  # run() validates before it touches the workdir or compiles anything.
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    loop.run(c, str(workdir))
  assert not workdir.exists()


def test_cli_prints_one_sentence_and_no_traceback(tmp_path):
  proc = run_module("train", "--config=experiments/lm_stdlib.py:size=test",
                    f"--workdir={tmp_path}/w", "--cpu_devices=8", "--config.model.num_heads=3",
                    timeout=120, ok=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("odyssey: model.num_heads=3"), proc.stderr
  assert not (tmp_path / "w").exists()


def test_init_from_errors_are_sentences(tmp_path):
  c = good()
  c.init.from_ = str(tmp_path / "missing")
  with pytest.raises(ValueError, match=r"init.from=.*missing is not a directory"):
    validate.validate_workdir(c, str(tmp_path / "run"))
  c.init.from_ = str(tmp_path / "run")
  (tmp_path / "run").mkdir()
  with pytest.raises(ValueError, match=r"is the workdir itself"):
    validate.validate_workdir(c, str(tmp_path / "run"))
  c.init.from_ = str(tmp_path / "empty")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"has no checkpoint to take parameters from"):
    validate.validate_workdir(c, str(tmp_path / "run"))
