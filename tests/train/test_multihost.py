"""Real multi-process runs on CPU: 2 processes x 4 devices (gloo collectives over loopback) against
1 process x 8 devices, checkpoints across process counts, and a process killed mid-run."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests import module_command, run_module
from tests.train.test_faults import checkpoint_steps
from tests.train.test_loop import train_losses

FLAGS = ("--config=configs/lm.py:size=test", "--config.mesh.data=2", "--config.mesh.fsdp=2",
         "--config.mesh.tensor=2", "--config.train.batch_size=8", "--config.train.seq_len=32",
         "--config.log.every=1", "--config.log.progress=False", "--config.eval.every=1000",
         "--config.eval.steps=1", "--config.eval.batch_size=8", "--config.sample.max_new_tokens=0")
SHORT = FLAGS + ("--config.train.steps=10", "--config.ckpt.every=5")
TWO = ("--num_processes=2", "--devices_per_process=4", "--grace_s=5", "--")


def one_process(workdir, flags=SHORT):
  return run_module("train", *flags, f"--workdir={workdir}", "--cpu_devices=8")


def two_processes(workdir, flags=SHORT):
  return run_module("train.launch", *TWO, *flags, f"--workdir={workdir}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
  one_process(single)
  launched = two_processes(multi)
  return dict(single=str(single), multi=str(multi), log=launched.stdout)


def test_two_processes_follow_one_process(runs):
  assert "over 2 processes (axes spanning them: ['data'])" in runs["log"]
  assert "[launch] all 2 processes finished." in runs["log"]
  one, two = train_losses(runs["single"]), train_losses(runs["multi"])
  assert sorted(one) == sorted(two) == list(range(1, 11))
  # The same global batches on the same mesh shape; only reduction order may differ.
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-6)
  # Both processes wrote their data position into the collective checkpoint.
  data = os.path.join(runs["multi"], "checkpoints", "10", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data))


@pytest.mark.parametrize("first,then", [("multi", one_process), ("single", two_processes)])
def test_checkpoint_continues_on_the_other_process_count(runs, tmp_path, first, then):
  workdir = str(tmp_path / "w")
  shutil.copytree(runs[first], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "10"))
  proc = then(workdir)
  assert "resumed from step 5" in proc.stdout
  resumed, reference = train_losses(workdir), train_losses(runs["single"])
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [reference[s] for s in range(6, 11)], rtol=1e-6)


def test_a_killed_process_stops_the_job_and_the_rerun_resumes(tmp_path):
  flags = FLAGS + ("--config.train.steps=20", "--config.ckpt.every=4")
  launcher, workdir, log = start_launcher(tmp_path, flags)
  pids = _child_pids(launcher, log)
  _wait_for(lambda: _logged_steps(workdir) >= 9, launcher)
  os.kill(pids[1], signal.SIGKILL)
  assert launcher.wait(timeout=120) == 128 + signal.SIGKILL
  assert "[launch] process 1 was killed by SIGKILL; stopping the others." in _read(log)
  before = _complete_losses(workdir)  # what the killed job logged, past its checkpoint too
  complete = checkpoint_steps(workdir)
  assert complete and complete[-1] < 20
  rerun = two_processes(workdir, flags)
  assert f"resumed from step {complete[-1]}" in rerun.stdout
  after = train_losses(workdir)
  assert sorted(after) == list(range(1, 21))
  # The steps the killed job had already run come out the same again.
  assert all(after[s] == before[s] for s in before), {s: (before[s], after[s]) for s in before}


def start_launcher(tmp_path, flags):
  """The 2-process launcher in the background, its output in a log file (never a full pipe)."""
  workdir, log = str(tmp_path / "w"), str(tmp_path / "launch.log")
  with open(log, "w") as out:
    launcher = subprocess.Popen(**module_command("train.launch", *TWO, *flags,
                                                 f"--workdir={workdir}"),
                                stdout=out, stderr=subprocess.STDOUT)
  return launcher, workdir, log


def _child_pids(launcher, log) -> list[int]:
  """The pids of the launcher's processes, from its first line."""
  found = _wait_for(lambda: re.search(r"pids \[(\d+), (\d+)\]", _read(log)), launcher)
  return [int(found.group(1)), int(found.group(2))]


def _read(path):
  with open(path) as f:
    return f.read()


def _complete_losses(workdir) -> dict:
  lines = [json.loads(line) for line in _read(os.path.join(workdir, "metrics.jsonl")).splitlines()
           if line.endswith("}")]
  return {m["step"]: m["loss"] for m in lines if m["split"] == "train"}


def _logged_steps(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = [json.loads(line)["step"] for line in _read(path).splitlines()
           if line.endswith("}") and '"train"' in line]
  return max(steps, default=0)


def _wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = condition()
    if found:
      return found
    assert proc.poll() is None, "the launcher ended early"
    time.sleep(0.1)
  proc.kill()
  raise AssertionError("timed out")


def test_sigterm_to_the_launcher_stops_both_processes_at_one_checkpointed_step(tmp_path):
  flags = FLAGS + ("--config.train.steps=100", "--config.ckpt.every=50")
  launcher, workdir, log = start_launcher(tmp_path, flags)
  _wait_for(lambda: _logged_steps(workdir) >= 10, launcher)
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=120) == 0, _read(log)[-3000:]
  text = _read(log)
  stopped = re.findall(r"\[p0\] stopped by SIGTERM after step (\d+)", text)
  assert stopped and "[launch] all 2 processes finished." in text
  steps = checkpoint_steps(workdir)
  assert steps[-1] == int(stopped[0]) and steps[-1] < 100  # off the every-50 grid


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  # Preemption notices can reach one host first: the processes compare notes every log.every
  # steps, so both stop (and save collectively) at one step.
  flags = FLAGS + ("--config.train.steps=100", "--config.ckpt.every=50")
  launcher, workdir, log = start_launcher(tmp_path, flags)
  pids = _child_pids(launcher, log)
  _wait_for(lambda: _logged_steps(workdir) >= 10, launcher)
  os.kill(pids[1], signal.SIGTERM)
  assert launcher.wait(timeout=120) == 0, _read(log)[-3000:]
  text = _read(log)
  assert "[p1] odyssey: SIGTERM received" in text
  stopped = int(re.search(r"\[p0\] stopped by SIGTERM after step (\d+)", text).group(1))
  steps = checkpoint_steps(workdir)
  assert steps[-1] == stopped < 100
