"""Saved work is sacred (issue 16): a run that cannot continue a workdir says why and touches
nothing; one run at a time holds a workdir; a failed save stops the run with one sentence and
leaves the previous checkpoints intact; metric history is never deleted (docs/workdir.md)."""

import concurrent.futures
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import module_command, run_module
from tests.train.test_faults import CLI_FLAGS, checkpoint_steps, lm_config
from tests.train.test_loop import read_metrics
from train import checkpoint, loop, metrics, tasks
from train import workdir as workdir_lib

STEPS = 4  # the trained fixture: checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.run(lm_config(steps=STEPS), workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released on return
  return workdir


def copy_of(workdir, tmp_path) -> str:
  target = str(tmp_path / "w")
  shutil.copytree(workdir, target)
  return target


def snapshot(workdir) -> dict:
  """Every file under ``workdir`` with a hash of its bytes (folders by their presence)."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), workdir)] = "dir"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), workdir)] = hashlib.sha1(f.read()).hexdigest()
  return out


# ------------------------------------------------------------------ 1. what may continue a workdir


def test_changed_model_shape_is_refused_before_anything_is_written(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  config = lm_config(steps=8)
  config.model.d_model = 128
  with pytest.raises(workdir_lib.WorkdirError) as refused:
    loop.run(config, workdir)
  sentence = refused.value.sentence
  assert f"{workdir} holds checkpoints (newest step 4) of a run whose config differs in " \
         "model.d_model (64 -> 128), which a resumed run cannot change" in sentence
  assert f"--config.init.from={workdir}" in sentence and "new --workdir" in sentence
  # Nothing moved, deleted or rewritten: checkpoints, metrics.jsonl, config.json; no lock left.
  assert snapshot(workdir) == before


def test_cli_refusal_is_one_sentence(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  proc = run_module("train", *CLI_FLAGS, f"--workdir={workdir}", "--config.model.d_model=128",
                    "--config.model.num_layers=3", timeout=300, ok=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"odyssey: {workdir} holds checkpoints (newest step 4) of a run "
                             "whose config differs in model.d_model (64 -> 128), "
                             "model.num_layers (2 -> 3)")
  assert snapshot(workdir) == before


def test_incompatible_fields_name_structure_and_allow_run_settings():
  saved = lm_config(steps=STEPS)
  allowed = lm_config(steps=100, mesh=(8, 1, 1))
  allowed.train.update(batch_size=16, remat="full", grad_accum=2)
  allowed.model.update(dtype="bfloat16", param_dtype="bfloat16")
  allowed.opt.update(lr=1e-4, warmup_steps=7)
  allowed.ckpt.update(every=3, keep=2)
  allowed.log.update(every=5)
  allowed.eval.update(every=9)
  assert workdir_lib.incompatible_fields(saved, allowed) == []
  other = lm_config(steps=STEPS)
  other.model.update(num_kv_heads=4, rope_theta=500000.0)
  other.model.moe.num_experts = 4
  assert workdir_lib.incompatible_fields(saved, other) == [
      "model.moe.num_experts (0 -> 4)", "model.num_kv_heads (2 -> 4)",
      "model.rope_theta (10000.0 -> 500000.0)"]
  family = lm_config(steps=STEPS)
  family.model.name = "mamba"
  assert workdir_lib.incompatible_fields(saved, family) == ["model.name ('llama' -> 'mamba')"]


def test_state_of_another_shape_is_refused_not_quarantined(trained, tmp_path):
  # Without config.json to compare with, the restore itself finds the other shape: intact files,
  # so a refusal naming the array, never a move to checkpoints_corrupt/.
  workdir = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  before = snapshot(workdir)
  config = lm_config(steps=8)
  config.model.d_model = 128
  with pytest.raises(workdir_lib.WorkdirError, match=r"checkpoint step 4 in .* holds a state "
                     r"this config cannot continue \(.*embedding has shape \(384, 64\) there, "
                     r"this config needs \(384, 128\)\); its files are intact and were left in "
                     r"place"):
    loop.run(config, workdir)
  assert snapshot(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


def test_allowed_changes_resume_and_keep_the_previous_config(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  with open(os.path.join(workdir, "config.json")) as f:
    first_config = f.read()
  history = read_metrics(workdir)
  config = lm_config(steps=6, mesh=(4, 2, 1))
  config.train.remat = "full"
  config.log.every = 2
  summary = loop.run(config, workdir)
  assert summary["start_step"] == STEPS and summary["final_step"] == 6
  (kept,) = glob.glob(os.path.join(workdir, "config.*.json"))
  with open(kept) as f:
    assert f.read() == first_config  # the earlier run's config, byte for byte
  with open(os.path.join(workdir, "config.json")) as f:
    now = json.load(f)
  assert now["train"]["steps"] == 6 and now["mesh"]["data"] == 4
  assert f"previous run's, which is kept as {os.path.basename(kept)}" in capsys.readouterr().out
  lines = read_metrics(workdir)
  assert lines[:len(history)] == history  # appended to, nothing rewritten
  assert [m["step"] for m in lines[len(history):] if m["split"] == "train"] == [6]


# ------------------------------------------------------------------ metric history


def test_resume_after_a_crash_marks_lost_steps_and_deletes_no_line(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if killed before saving step 4
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "split": "train", "lo')  # a writer killed mid-line
  history = read_metrics(copy_of(trained, tmp_path / "x"))
  summary = loop.run(lm_config(steps=STEPS), workdir)
  assert summary["start_step"] == 2
  assert ('metrics.jsonl: 3 line(s) past step 2, whose state no checkpoint holds, marked '
          '"superseded" (kept; those steps are logged again); 1 incomplete line(s) moved to '
          'metrics.jsonl.partial.' in capsys.readouterr().out)
  lines = read_metrics(workdir)
  old = lines[:len(history)]
  # Every earlier line is still there with its values; those past step 2 carry the mark.
  assert [{k: v for k, v in m.items() if k != "superseded"} for m in old] == history
  assert [(m["step"], m["split"]) for m in old if m.get("superseded")] == [
      (3, "train"), (4, "train"), (4, "val")]
  current = [m["step"] for m in lines if m["split"] == "train" and not m.get("superseded")]
  assert current == [1, 2, 3, 4]
  with open(os.path.join(workdir, metrics.PARTIAL)) as f:
    assert f.read() == '{"step": 5, "split": "train", "lo\n'


def test_fresh_start_marks_the_whole_history(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  lines = [{"step": 0, "split": "val", "loss": 5.5}, {"step": 1, "split": "train", "loss": 5.0},
           {"step": 1, "split": "train", "loss": 4.9, "superseded": True}]
  with open(path, "w") as f:
    f.writelines(json.dumps(m) + "\n" for m in lines)
  assert metrics.mark_superseded(path, 0) == (2, 0)
  with open(path) as f:
    assert [json.loads(line) for line in f] == [{**m, "superseded": True} for m in lines]
  assert metrics.mark_superseded(path, 0) == (0, 0)  # nothing new to mark: file left alone


# ------------------------------------------------------------------ 2. the lock


def _holder(pid: int) -> dict:
  return {"host": socket.gethostname(), "pid": pid, "started": "2024-01-02T03:04:05+00:00",
          "process_start": workdir_lib._process_start(pid), "argv": ["python", "-m", "train"]}


def test_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  lock = os.path.join(workdir, workdir_lib.LOCK)
  alive = subprocess.Popen(["sleep", "60"])
  try:
    with open(lock, "w") as f:
      json.dump(_holder(alive.pid), f)
    with pytest.raises(workdir_lib.WorkdirError) as refused:
      with workdir_lib.locked(workdir):
        raise AssertionError("entered a workdir another live run holds")
    assert (f"{workdir} is in use by another run (host {socket.gethostname()}, pid {alive.pid}, "
            "since 2024-01-02T03:04:05+00:00: python -m train); nothing in it was touched"
            in refused.value.sentence)
    assert os.listdir(workdir) == [workdir_lib.LOCK]
  finally:
    alive.kill()
    alive.wait()
  with open(lock, "w") as f:
    json.dump(_holder(alive.pid), f)  # its pid no longer exists: stale
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lib.locked(workdir):
      with open(lock) as f:
        assert json.load(f)["pid"] == os.getpid()
      raise RuntimeError("boom")
  assert f"took over the stale lock {lock}" in capsys.readouterr().out
  assert not os.path.exists(lock)  # released by the exception too


def test_reused_pid_counts_as_dead(tmp_path):
  lock = os.path.join(tmp_path, workdir_lib.LOCK)
  holder = {**_holder(os.getpid()), "process_start": workdir_lib._process_start() - 1}
  with open(lock, "w") as f:
    json.dump(holder, f)
  with workdir_lib.locked(str(tmp_path), report=lambda m: None):
    with open(lock) as f:
      assert json.load(f)["process_start"] == workdir_lib._process_start()


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def test_second_cli_run_is_refused_while_the_first_runs(tmp_path):
  workdir = str(tmp_path)
  first = subprocess.Popen(**module_command("train", *CLI_FLAGS, f"--workdir={workdir}",
                                            "--config.train.steps=100000"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(path) and '"train"' in _read(path)):
      assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
      time.sleep(0.2)
    second = run_module("train", *CLI_FLAGS, f"--workdir={workdir}", timeout=300, ok=False)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    assert (f"odyssey: {workdir} is in use by another run (host {socket.gethostname()}, pid "
            f"{first.pid}, since ") in second.stderr
    assert first.poll() is None  # the holder runs on
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  steps = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
  assert steps == list(range(1, stopped + 1))  # only the holder wrote, each step once
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released on SIGTERM


# ------------------------------------------------------------------ 6. a failed save


def fill_disk_at(step: int):
  """Makes Orbax's asynchronous write of checkpoint ``step`` fail as a full disk does: the
  handler's commit futures gain one that raises OSError(ENOSPC) in the background thread.
  Returns the original method (to undo)."""
  real = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = list(await real(self, directory, *args, **kwargs) or [])
    if f"{os.sep}{step}{checkpoint.TMP_MARK}" in str(getattr(directory, "path", directory)):
      failed = concurrent.futures.Future()
      failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
      futures.append(failed)
    return futures

  ocp.StandardCheckpointHandler.async_save = async_save
  return real


def test_failed_async_save_stops_at_its_step_and_keeps_the_previous(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  config = lm_config(steps=8)
  config.ckpt.async_save = True
  real = fill_disk_at(4)
  try:
    with pytest.raises(checkpoint.CheckpointSaveError) as failed:
      loop.run(config, workdir)
  finally:
    ocp.StandardCheckpointHandler.async_save = real
  directory = os.path.join(workdir, "checkpoints")
  assert failed.value.sentence == (
      f"saving checkpoint step 4 to {directory} failed (OSError: [Errno 28] No space left on "
      "device); the previous checkpoints (steps [2]) are intact. Free space and rerun to resume "
      "from step 2.")
  assert checkpoint_steps(workdir) == [2]
  # It surfaced at the latest before the next save: no later checkpoint, no step past 6.
  assert max(m["step"] for m in read_metrics(workdir)) <= 6
  assert glob.glob(os.path.join(directory, f"4{checkpoint.TMP_MARK}*"))  # what Orbax left
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))
  capsys.readouterr()
  summary = loop.run(config, workdir)
  out = capsys.readouterr().out
  assert "removed 1 incomplete checkpoint save(s)" in out and "resumed from step 2" in out
  assert summary["final_step"] == 8 and checkpoint_steps(workdir) == [2, 4, 6, 8]
  assert not glob.glob(os.path.join(directory, f"*{checkpoint.TMP_MARK}*"))


def test_cli_failed_save_is_one_sentence(tmp_path):
  workdir = str(tmp_path)
  script = ("import sys, runpy; from tests.train import test_workdir as t; t.fill_disk_at(10); "
            "sys.argv = ['train', *sys.argv[1:]]; runpy.run_module('train', run_name='__main__')")
  command = module_command("train", *CLI_FLAGS, f"--workdir={workdir}",
                           "--config.train.steps=20")
  command["args"] = [sys.executable, "-c", script, *command["args"][3:]]
  proc = subprocess.run(**command, capture_output=True, timeout=400)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-5000:]
  assert lines[0] == (
      f"odyssey: saving checkpoint step 10 to {os.path.join(workdir, 'checkpoints')} failed "
      "(OSError: [Errno 28] No space left on device); the previous checkpoints (steps [5]) are "
      "intact. Free space and rerun to resume from step 5.")
  assert checkpoint_steps(workdir) == [5]


def test_failed_synchronous_save_raises_at_once(tmp_path, monkeypatch):
  config = lm_config()  # ckpt.async_save=False: the whole save happens inside save()
  data_iter = iter(tasks.get(config).datasets()[0])
  ckpt = checkpoint.Checkpointer(str(tmp_path), config.ckpt)
  state = {"w": np.arange(4, dtype=np.float32)}
  assert ckpt.save(2, state, data_iter, force=True)

  async def full_disk(self, directory, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
  with pytest.raises(checkpoint.CheckpointSaveError) as failed:
    ckpt.save(4, state, data_iter, force=True)
  ckpt.close()  # nothing left to report: the failure was raised once
  assert failed.value.sentence == (
      f"saving checkpoint step 4 to {tmp_path}/checkpoints failed (OSError: [Errno 28] No space "
      "left on device); the previous checkpoints (steps [2]) are intact. Free space and rerun "
      "to resume from step 2.")
  assert checkpoint_steps(tmp_path) == [2]
  assert checkpoint.remove_interrupted_saves(str(tmp_path)) == [f"4{checkpoint.TMP_MARK}"]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
