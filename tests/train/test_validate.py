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


NAN, INF = float("nan"), float("inf")

# Optimizer, seed and model numbers: (field, value, the sentence's start). Every numeric field of
# config.opt, NaN and infinity as well as out-of-range values; each names field, value and range.
BAD_NUMBERS = [
    ("opt.lr", NAN, r"config.opt.lr=nan must be a finite number in \[0, inf\) \(the peak "),
    ("opt.lr", INF, r"config.opt.lr=inf must be a finite number in \[0, inf\)"),
    ("opt.lr", -1e-3, r"config.opt.lr=-0.001 must be a finite number in \[0, inf\)"),
    ("opt.weight_decay", NAN, r"config.opt.weight_decay=nan must be a finite number in \[0, inf\)"),
    ("opt.weight_decay", -0.1, r"config.opt.weight_decay=-0.1 must be a finite number in \[0, "),
    ("opt.eps", -1e-8, r"config.opt.eps=-1e-08 must be a finite number in \(0, inf\)"),
    ("opt.eps", 0.0, r"config.opt.eps=0.0 must be a finite number in \(0, inf\)"),
    ("opt.eps", INF, r"config.opt.eps=inf must be a finite number in \(0, inf\)"),
    ("opt.clip_norm", -1.0, r"config.opt.clip_norm=-1.0 must be a finite number in \(0, inf\)"),
    ("opt.clip_norm", NAN, r"config.opt.clip_norm=nan must be a finite number in \(0, inf\)"),
    ("opt.clip_norm", INF, r"config.opt.clip_norm=inf must be a finite number in \(0, inf\)"),
    ("opt.b1", 1.0, r"config.opt.b1=1.0 must be a finite number in \[0, 1\) \(Adam's first"),
    ("opt.b1", -0.1, r"config.opt.b1=-0.1 must be a finite number in \[0, 1\)"),
    ("opt.b1", NAN, r"config.opt.b1=nan must be a finite number in \[0, 1\)"),
    ("opt.b2", 1.0, r"config.opt.b2=1.0 must be a finite number in \[0, 1\) \(Adam's second"),
    ("opt.b2", 1.5, r"config.opt.b2=1.5 must be a finite number in \[0, 1\)"),
    ("opt.final_lr_frac", 1.5, r"config.opt.final_lr_frac=1.5 must be a finite number in \[0, 1\]"),
    ("opt.final_lr_frac", -0.1, r"config.opt.final_lr_frac=-0.1 must be a finite number in \[0, "),
    ("opt.final_lr_frac", NAN, r"config.opt.final_lr_frac=nan must be a finite number in \[0, 1\]"),
    ("opt.warmup_steps", -1, r"config.opt.warmup_steps=-1 must be an integer >= 0"),
    ("opt.name", "sgd", r"config.opt.name='sgd' is not a supported optimizer; supported: "
                        r"\['adamw'\]\.$"),
    ("seed", -1, r"config.seed=-1 must be an integer in \[0, 2\*\*32 - 1\]"),
    ("seed", 2**32, r"config.seed=4294967296 must be an integer in \[0, 2\*\*32 - 1\]"),
    ("model.rope_theta", 0.0, r"model.rope_theta=0.0 must be a finite number in \(0, inf\)\.$"),
    ("model.rope_theta", NAN, r"model.rope_theta=nan must be a finite number in \(0, inf\)"),
    ("model.rope_theta", -1.0, r"model.rope_theta=-1.0 must be a finite number in \(0, inf\)"),
    ("model.norm_eps", 0.0, r"model.norm_eps=0.0 must be a finite number in \(0, inf\)"),
    ("model.norm_eps", INF, r"model.norm_eps=inf must be a finite number in \(0, inf\)"),
    ("train.hang_timeout_s", 0.0, r"config.train.hang_timeout_s=0.0 must be a positive number"),
    ("train.hang_timeout_s", NAN, r"config.train.hang_timeout_s=nan must be a positive number"),
]


@pytest.mark.parametrize("dotted,value,message", BAD_NUMBERS,
                         ids=[f"{d}={v}" for d, v, _ in BAD_NUMBERS])
def test_bad_optimizer_seed_and_model_numbers_are_one_sentence(dotted, value, message):
  c = good()
  if dotted == "seed":
    c.seed = value
  else:
    _set(c, dotted, value)
  with pytest.raises(ValueError, match="^" + message):
    validate.validate(c)


def test_optimizer_range_edges_are_accepted():
  # The closed ends of each range: a frozen run (lr 0), no momentum, no decay, no warmup.
  c = good()
  c.opt.update(lr=0.0, b1=0.0, b2=0.0, weight_decay=0.0, warmup_steps=0, final_lr_frac=0.0)
  validate.validate(c)
  c.opt.update(final_lr_frac=1.0, lr=1, eps=1e-30, clip_norm=1e-6)
  validate.validate(c)
  c.seed = 2**32 - 1
  validate.validate(c)


def test_unknown_optimizer_field_is_one_sentence():
  c = good()
  c.opt.momentum = 0.9
  with pytest.raises(ValueError, match=r"config.opt has unknown field\(s\) \['momentum'\]; its "
                                       r"fields are \["):
    validate.validate(c)
