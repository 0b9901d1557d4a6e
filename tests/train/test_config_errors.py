"""Command-line mistakes are one sentence (``odyssey: ...``, nonzero exit, no traceback) before
anything compiles or the workdir is touched: config overrides naming no field or holding the
wrong type (train/__main__.py), non-finite optimizer settings, running out of device memory, and
train.sample's flags and workdir kind (train/sample.py)."""

import re
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from configs import diffusion, lm
from tests import module_command, run_module
from train import __main__ as cli
from train import checkpoint, sample

CONFIG = "--config=experiments/lm_stdlib.py:size=test"


def _one_sentence(proc, start: str) -> str:
  """Asserts a failed run whose stderr ends with one line starting ``start``; returns it."""
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(start), proc.stderr[-2000:]
  return last


def test_unknown_field_on_the_command_line_is_one_sentence_with_the_closest_name(tmp_path):
  proc = run_module("train", CONFIG, f"--workdir={tmp_path}/w", "--cpu_devices=8",
                    "--config.train.stepz=3", timeout=120, ok=False)
  last = _one_sentence(proc, "odyssey: ")
  assert last == ("odyssey: --config.train.stepz names no config field: config.train has no "
                  "'stepz'; did you mean --config.train.steps?")
  assert not (tmp_path / "w").exists()


def test_nan_learning_rate_is_refused_before_anything_runs(tmp_path):
  proc = run_module("train", CONFIG, f"--workdir={tmp_path}/w", "--cpu_devices=8",
                    "--config.opt.lr=nan", timeout=120, ok=False)
  last = _one_sentence(proc, "odyssey: ")
  assert last == ("odyssey: config.opt.lr=nan must be a finite number in [0, inf) (the peak "
                  "learning rate).")
  assert not (tmp_path / "w").exists()


def _parse_error(*overrides: str, spec: str = "experiments/lm_stdlib.py:size=test") -> str:
  """The sentence for ``overrides`` after ml_collections/absl really failed to parse them."""
  argv = ["train", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv, lock_config=True)
  with pytest.raises(Exception) as raised:  # noqa: PT011  whatever the libraries raise
    values(argv)
  return cli.command_line_error(argv, raised.value)


PARSE_ERRORS = {
    "unknown group": (["--config.foo.bar=1"], r"--config.foo.bar names no config field: the "
                      r"config has no 'foo'; it has \['ckpt', 'data', .*'train'\]\.$"),
    "group typo": (["--config.trian.steps=3"], r"--config.trian.steps names no config field: "
                   r"the config has no 'trian'; did you mean --config.train.steps\?$"),
    "field typo after a good one": (["--config.train.steps=2", "--config.train.batchsize=4"],
                                    r"--config.train.batchsize names no config field: "
                                    r"config.train has no 'batchsize'; did you mean "
                                    r"--config.train.batch_size\?$"),
    "init.from spelled as on the command line": (
        ["--config.init.frm=x"], r"config.init has no 'frm'; did you mean --config.init.from\?$"),
    "below a value": (["--config.train.steps.x=1"], r"--config.train.steps.x names no config "
                      r"field: config.train.steps is a value, not a group\.$"),
    "integer": (["--config.train.steps=abc"], r"--config.train.steps=abc is not valid: "
                r"config.train.steps takes an integer \(the config has 500\)\.$"),
    "float": (["--config.opt.lr=fast"], r"--config.opt.lr=fast is not valid: config.opt.lr "
              r"takes a number \(the config has 0.003\)\.$"),
    "bool": (["--config.opt.decay_embeddings=maybe"], r"config.opt.decay_embeddings takes true "
             r"or false \(the config has False\)\.$"),
    "missing value": (["--config.train.steps"], r"Missing value for flag --config.train.steps"),
}


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_command_line_parse_errors_are_one_sentence(case):
  overrides, message = PARSE_ERRORS[case]
  sentence = _parse_error(*overrides)
  assert "\n" not in sentence
  assert re.search(message, sentence), sentence


def test_config_file_that_does_not_load_is_one_sentence():
  assert _parse_error("--config.train.steps=1", spec="experiments/nope.py") == (
      "--config=experiments/nope.py could not be loaded: there is no file experiments/nope.py.")
  assert _parse_error("--config.train.steps=1", spec="experiments/lm_stdlib.py:size=huge") == (
      "--config=experiments/lm_stdlib.py:size=huge could not be loaded: size='huge' is not one "
      "of ['base', 'small', 'test', 'tiny'].")


# --- out of device memory ----------------------------------------------------------------------


class JaxRuntimeError(RuntimeError):
  """Stands in for jax.errors.JaxRuntimeError (a RuntimeError) raised by a failed allocation."""


def evaluate(message):  # named like train/loop.py's evaluation, which the phase is read from
  raise JaxRuntimeError(message)


def init_sharded(message):  # named like parallel/sharding.py's state initialisation
  raise JaxRuntimeError(message)


def run(inner, message):  # named like train/loop.py's run
  if inner is None:
    raise JaxRuntimeError(message)
  inner(message)


OOM = {  # (where it is raised, XLA's message, the expected sentence)
    "cpu train step": (None, "RESOURCE_EXHAUSTED: Out of memory allocating 30251695096 bytes.",
                       "the train step ran out of device memory (one buffer of 28.2 GiB did not "
                       "fit on a device); lower train.batch_size or train.seq_len, or use "
                       "train.grad_accum, train.remat or a larger mesh.fsdp."),
    "gpu evaluation": (evaluate, "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                       "25769803776 bytes.", "the evaluation step ran out of device memory (one "
                       "buffer of 24.0 GiB did not fit on a device); lower eval.batch_size or "
                       "train.seq_len, or use a larger mesh.fsdp."),
    "tpu init": (init_sharded, "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                 "memory in memory space hbm. Used 40.5G of 15.48G hbm. Exceeded hbm capacity "
                 "by 25.0G.", "initialising the state ran out of device memory (it needs 40.5G "
                 "per device; hbm holds 15.48G); use a larger mesh.fsdp (or mesh.tensor) to "
                 "shard the parameters and optimizer state, or a smaller model."),
}


@pytest.mark.parametrize("case", list(OOM))
def test_out_of_memory_names_the_phase_and_the_size(case):
  inner, message, expected = OOM[case]
  with pytest.raises(JaxRuntimeError) as raised:
    run(inner, message)
  assert cli.out_of_memory(raised.value) == expected


def test_other_runtime_errors_are_not_called_out_of_memory():
  with pytest.raises(JaxRuntimeError) as raised:
    run(None, "INTERNAL: something else broke")
  assert cli.out_of_memory(raised.value) is None
  assert cli.out_of_memory(ValueError("Out of memory")) is None


def test_batch_too_large_for_memory_is_one_sentence(tmp_path):
  # Per device, the dense attention probabilities of 1024 rows x 2 heads x 2048^2 (28 GiB) are
  # one buffer: XLA:CPU's allocation fails at once, nothing is touched, and the run stops at the
  # first step. The 8 GiB address-space limit is a safety net: a machine with that much free RAM
  # fails the same way instead of filling it.
  command = module_command(
      "train", CONFIG, f"--workdir={tmp_path}/w", "--cpu_devices=8",
      "--config.train.batch_size=4096", "--config.train.seq_len=2048",
      "--config.eval.batch_size=4", "--config.eval.steps=1", "--config.train.steps=2",
      "--config.log.progress=false")
  command["args"] = ["bash", "-c", f'ulimit -v {8 * 2**20} && exec "$@"', "-", *command["args"]]
  proc = subprocess.run(**command, capture_output=True, timeout=400)
  last = _one_sentence(proc, "odyssey: the train step ran out of device memory (one buffer of ")
  assert "GiB did not fit on a device); lower train.batch_size or train.seq_len" in last
  assert checkpoint.steps_in(str(tmp_path / "w")) == []


# --- train.sample ----------------------------------------------------------------------------


def _workdir(path, config):
  """A workdir as train.sample first reads it: its config.json (checked before any checkpoint)."""
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  return str(path)


def test_sample_on_a_language_model_workdir_is_one_sentence(tmp_path):
  workdir = _workdir(tmp_path / "lm", lm.get_config("size=test"))
  proc = run_module("train.sample", f"--workdir={workdir}", "--classes=1", timeout=120, ok=False)
  last = _one_sentence(proc, "odyssey: ")
  assert last == (f"odyssey: {workdir} holds a 'lm' model; train.sample needs a diffusion model "
                  "(task 'diffusion') or a VAR model (task 'var'); use python -m train.generate "
                  "for language models.")


SAMPLE_FLAGS = {
    "cfg negative": (dict(cfg_scale=-1.0), r"--cfg=-1.0 must be a finite number >= 0"),
    "cfg nan": (dict(cfg_scale=float("nan")), r"--cfg=nan must be a finite number >= 0"),
    "steps zero": (dict(steps=0), r"--steps=0 must be at least 1 and at most 1000"),
    "steps past the schedule": (dict(steps=1001), r"--steps=1001 must be at least 1 and at most "
                                                  r"1000 \(the training schedule's"),
    "per_class": (dict(per_class=0), r"--per_class=0 must be at least 1\.$"),
    "seed": (dict(seed=-1), r"--seed=-1 must be in \[0, 2\*\*32 - 1\]\.$"),
    "step": (dict(step=-2), r"--step=-2 must be a checkpoint step >= 0"),
    "no classes": (dict(classes=[]), r"--classes is empty"),
    "class out of range": (dict(classes=[10]), r"--classes \[10\] are outside the model's 10"),
}


@pytest.mark.parametrize("case", list(SAMPLE_FLAGS))
def test_sample_flags_are_checked_before_loading(case, tmp_path):
  workdir = _workdir(tmp_path / "dit", diffusion.get_config())
  kwargs, message = SAMPLE_FLAGS[case]
  kwargs = {"classes": [1], **kwargs}
  with pytest.raises(ValueError, match=message):
    sample.sample(workdir, kwargs.pop("classes"), **kwargs)
