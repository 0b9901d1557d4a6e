"""Sharded decoding: every mesh that training accepts decodes what one device decodes, from the
sampler and from ``python -m train.generate``; a stalled collective ends the run with a sentence
naming the phase (train/watchdog.py) instead of hanging."""

import os
import re
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from bench.compile import CompileCounter
from configs import lm
from parallel import mesh as parallel_mesh
from parallel import sharding
from tests import REPO, module_command, run_module
from tests.parallel import step_parity
from tests.train.test_multihost import FLAGS as TWO_PROCESS_FLAGS
from tests.train.test_multihost import _child_pids, _logged_steps, _read, _wait_for, start_launcher
from train import decoding, models, tasks
from train import state as state_lib
from train import optimizer, watchdog

# Prompts of different lengths share one batch; 3 x decoding._IN_FLIGHT + 5 new tokens cross
# several host waits of the bounded decode queue.
PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5], [200]]
NEW = 3 * decoding._IN_FLIGHT + 5


def _config(family: str):
  c = lm.get_config("size=test")
  c.train.seq_len = 32
  if family == "moe":
    c.model.moe.update(num_experts=4, top_k=2, capacity_factor=0.0)  # dropless: no group effects
  if family == "mamba":
    c.model = ml_collections.ConfigDict(dict(
        name="mamba", vocab_size=384, num_layers=2, d_model=64, d_state=8, d_conv=4, expand=2,
        dt_rank=0, scan_chunk=0, max_len=256, tie_embeddings=False, dtype="float32",
        param_dtype="float32"))
  if family == "linear_rnn":
    c.model = ml_collections.ConfigDict(step_parity.BYTE_MODELS["gdn"])
  return c


def _decode(config, sizes: dict):
  """Greedy continuations of PROMPTS on a mesh of ``sizes`` (same seed -> same parameters)."""
  config.mesh.update(data=1, fsdp=1, tensor=1, seq=1, expert=1)
  config.mesh.update(sizes)
  n = int(np.prod(list(sizes.values()) or [1]))
  mesh = parallel_mesh.make_mesh(config.mesh, jax.devices()[:n])
  rules = sharding.rules_from_config(config.parallel)
  task = tasks.get(config)
  model, _, _ = models.build(config, mesh, seq_parallel=False)
  tx, _ = optimizer.make(config.opt, config.train.steps)
  example = task.example_batch(8)
  init = lambda: state_lib.create(model, tx, task.init_args(example), config.seed)
  _, shardings = sharding.abstract_and_shardings(init, mesh, rules)
  params = sharding.init_sharded(init, shardings, mesh, rules).params
  dp = sharding.data_parallel_size(dict(mesh.shape), rules)
  rows = PROMPTS * (max(dp, len(PROMPTS)) // len(PROMPTS))
  rows_sharding = sharding.logical_sharding(mesh, rules, ("act_batch", "act_seq"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return decoding.generate(model, params, rows, max_new_tokens=NEW, sharding=rows_sharding)[:4]


# Pure data and pure FSDP parallelism; tensor parallelism with both (which covers data x tensor)
# and with a seq axis.
CASES = [
    ("llama", dict(data=8)), ("llama", dict(fsdp=8)),
    ("llama", dict(data=2, fsdp=2, tensor=2)), ("llama", dict(data=2, seq=2, tensor=2)),
    ("moe", dict(data=2, expert=4)), ("moe", dict(fsdp=2, tensor=2, expert=2)),
    ("mamba", dict(data=2, fsdp=2, tensor=2)), ("mamba", dict(fsdp=8)),
    ("linear_rnn", dict(data=2, fsdp=2, tensor=2)),
]


@pytest.fixture(scope="module")
def one_device():
  return {family: _decode(_config(family), {})
          for family in ("llama", "moe", "mamba", "linear_rnn")}


@pytest.mark.parametrize("family,sizes", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_sharded_decoding_equals_one_device(one_device, family, sizes):
  got = _decode(_config(family), sizes)
  for want_row, got_row in zip(one_device[family], got):
    assert len(got_row) == NEW
    np.testing.assert_array_equal(got_row, want_row)


def test_a_sharded_generation_compiles_the_decode_step_once():
  decoding.decode_step.clear_cache()  # other tests of this process compiled the same shapes
  with CompileCounter() as counter:
    _decode(_config("llama"), dict(data=2, fsdp=2, tensor=2))
  assert counter.count("decode_step") == 1, counter.functions


def test_the_decode_queue_is_bounded():
  # The jaxlib 0.10 deadlock came from hundreds of queued launches; the bound must stay small.
  assert 1 < decoding._IN_FLIGHT <= 16


# --- python -m train.generate on the training mesh -------------------------------------------

TRAIN = ("--config=configs/lm.py:size=test", "--cpu_devices=8", "--config.mesh.data=2",
         "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.steps=3",
         "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.log.every=1",
         "--config.log.progress=False", "--config.eval.steps=1", "--config.eval.batch_size=8",
         "--config.sample.max_new_tokens=20")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sharded"))
  proc = run_module("train", *TRAIN, f"--workdir={workdir}")
  assert "sample:" in proc.stdout  # the end-of-run sample decoded on data=2 x fsdp=2 x tensor=2
  return workdir


def _generate(workdir, *flags, ok=True):
  return run_module("train.generate", f"--workdir={workdir}", "--prompt=def ",
                    "--prompt=class Foo", "--max_new_tokens=20", *flags, ok=ok)


@pytest.fixture(scope="module")
def default_generation(trained):
  """train.generate on the trained workdir with no mesh flags (no --cpu_devices either: the 8
  devices the training mesh needs), run once for the two tests that compare with it."""
  return _generate(trained)


def test_generate_uses_the_training_mesh_and_any_other(trained, default_generation):
  # Another 8-device mesh (--mesh=fsdp=4,tensor=2) is compared with the training mesh by
  # tests/user/test_make_run.py (docs/decoding.md's commands); here, one device.
  default = default_generation
  assert "mesh (data=2, fsdp=2, tensor=2, seq=1, expert=1)" in default.stderr
  one = _generate(trained, "--mesh=data=1", "--cpu_devices=1")
  assert "mesh (data=1, fsdp=1, tensor=1, seq=1, expert=1)" in one.stderr, one.stderr[-2000:]
  assert default.stdout == one.stdout
  assert default.stdout.count("=== prompt") == 2


def test_generate_over_two_processes_prints_what_one_process_prints(trained, default_generation):
  one = default_generation
  two = run_module("train.launch", "--module=train.generate", "--num_processes=2",
                   "--devices_per_process=4", "--grace_s=5", "--", f"--workdir={trained}",
                   "--prompt=def ", "--prompt=class Foo", "--max_new_tokens=20")
  assert "[launch] all 2 processes finished." in two.stdout
  printed = "".join(line[len("[p0] "):] + "\n" for line in two.stdout.splitlines()
                    if line.startswith("[p0] ") and "odyssey:" not in line)
  # gloo's connection chatter can reach the stream as stray fragments before the samples.
  assert printed[printed.index("=== prompt 0"):] == one.stdout
  assert not [line for line in two.stdout.splitlines() if line.startswith("[p1] ===")]


def test_generate_refuses_a_mesh_that_does_not_fit_in_one_sentence(trained):
  proc = _generate(trained, "--mesh=data=3", "--cpu_devices=8", ok=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("odyssey: config.mesh (data=3")
  assert "Traceback" not in proc.stderr
  proc = _generate(trained, "--mesh=dta=2", ok=False)
  assert proc.stderr.strip().startswith("odyssey: --mesh='dta=2' must be")


# --- the hang watchdog -----------------------------------------------------------------------

def test_the_watchdog_ends_a_stalled_phase_with_one_sentence():
  code = ("import time; from train import watchdog\n"
          "watchdog.start(0.5)\n"
          "with watchdog.phase('train step'):\n"
          "  watchdog.beat()\n"
          "  with watchdog.phase('sample'):\n"
          "    watchdog.beat(); time.sleep(0.2); watchdog.beat()\n"
          "    time.sleep(30)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == watchdog.EXIT_CODE
  assert re.match(r"odyssey: the sample made no progress for \d+ s \(train.hang_timeout_s=0.5\)", proc.stderr)
  assert len(proc.stderr.strip().splitlines()) == 1


def test_the_watchdog_allows_the_first_unit_its_compile_and_stays_quiet_when_stopped():
  code = ("import time; from train import watchdog\n"
          "watchdog.start(0.4)\n"
          "with watchdog.phase('eval'):\n"
          "  time.sleep(0.8)\n"  # < 3 x 0.4: the first unit compiles
          "  watchdog.beat()\n"
          "watchdog.stop()\n"
          "with watchdog.phase('eval'):\n"
          "  time.sleep(1.5)\n"
          "print('finished')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "finished\n"


def test_a_stalled_process_ends_the_job_with_a_sentence_naming_the_phase(tmp_path):
  # A real stuck collective: process 1 is stopped (SIGSTOP) mid-run, so process 0 waits in the
  # next train step's gloo collective forever; its watchdog ends it with the sentence.
  flags = TWO_PROCESS_FLAGS + ("--config.train.steps=200", "--config.ckpt.every=100",
                               "--config.train.hang_timeout_s=8")
  launcher, workdir, log = start_launcher(tmp_path, flags)
  pids = _child_pids(launcher, log)
  _wait_for(lambda: _logged_steps(workdir) >= 5, launcher)
  os.kill(pids[1], signal.SIGSTOP)
  try:
    assert launcher.wait(timeout=180) == watchdog.EXIT_CODE, _read(log)[-3000:]
  finally:
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  text = _read(log)
  assert "[p0] odyssey: the train step made no progress for" in text, text[-3000:]
  assert "Termination timeout" not in text and "Check failure" not in text
