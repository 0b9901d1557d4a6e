"""Faults a pod run survives: kill -9, SIGTERM, a corrupt newest checkpoint, NaN batches, and
coming back on another mesh or device count. Each is checked against an uninterrupted run."""

import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import lm, vit
from tests import module_command, run_module
from tests.train.test_loop import data_position, read_metrics, train_losses
from train import checkpoint, loop
from train import program as program_lib

STEPS = 60
# The CLI run the signal tests interrupt: the test Llama, a checkpoint every 5 steps.
CLI_FLAGS = ("--config=configs/lm.py:size=test", "--cpu_devices=8",
             f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
             "--config.train.seq_len=32", "--config.ckpt.every=5", "--config.log.every=1",
             "--config.log.progress=False", "--config.eval.every=1000", "--config.eval.steps=1",
             "--config.eval.batch_size=8", "--config.sample.max_new_tokens=0")


def checkpoint_steps(workdir) -> list[int]:
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_module("train", *CLI_FLAGS, f"--workdir={workdir}")
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def start_and_wait(workdir, min_step: int) -> subprocess.Popen:
  """Starts the CLI run and returns once it has logged ``min_step`` (still running)."""
  proc = subprocess.Popen(**module_command("train", *CLI_FLAGS, f"--workdir={workdir}"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    assert proc.poll() is None, f"the run ended before step {min_step}: {proc.stderr.read()}"
    if os.path.exists(path):
      with open(path) as f:
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f if '"train"' in line]
      if steps and max(steps) >= min_step:
        return proc
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no step {min_step} within 300 s")


def test_kill_9_then_rerun_continues_exactly(uninterrupted, tmp_path):
  proc = start_and_wait(tmp_path, min_step=12)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  complete = checkpoint_steps(tmp_path)
  assert complete and complete[-1] < STEPS, complete
  rerun = run_module("train", *CLI_FLAGS, f"--workdir={tmp_path}")
  assert f"resumed from step {complete[-1]}" in rerun.stdout
  # Every step, including those the killed run had logged past its last checkpoint, is logged
  # once, with exactly the loss of the uninterrupted run; the killed run's lines past the
  # checkpoint are kept, marked "superseded" (docs/workdir.md).
  assert train_losses(tmp_path) == uninterrupted
  lines = [m for m in read_metrics(tmp_path) if m["split"] == "train"]
  assert [m["step"] for m in lines if not m.get("superseded")] == list(range(1, STEPS + 1))
  lost = [m["step"] for m in lines if m.get("superseded")]
  assert all(step > complete[-1] for step in lost), lost


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(uninterrupted, tmp_path):
  proc = start_and_wait(tmp_path, min_step=12)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM received; finishing the current step" in out
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert 12 <= stopped < STEPS
  assert checkpoint_steps(tmp_path)[-1] == stopped  # written although not a multiple of 5
  assert data_position(tmp_path, stopped)["next_index"] == stopped
  rerun = run_module("train", *CLI_FLAGS, f"--workdir={tmp_path}")
  assert f"resumed from step {stopped}" in rerun.stdout
  assert train_losses(tmp_path) == uninterrupted


# ------------------------------------------------------------------ in-process: corrupt, NaN


def lm_config(steps=6, mesh=(2, 2, 2)):
  c = lm.get_config("size=test")
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], seq=1, expert=1)
  c.train.update(steps=steps, batch_size=8, seq_len=32)
  c.opt.update(warmup_steps=2)
  c.ckpt.update(every=2, keep=10, async_save=False)
  c.log.update(every=1, progress=False)
  c.eval.update(every=1000, steps=1, batch_size=8)
  c.sample.update(max_new_tokens=0)
  return c


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm_run"))
  loop.run(lm_config(), workdir)
  return workdir


def _truncate_files(folder):
  for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated", "missing_item"])
def test_corrupt_newest_checkpoint_is_reported_and_skipped(lm_run, tmp_path, capsys, damage):
  workdir = str(tmp_path / "w")
  shutil.copytree(lm_run, workdir)
  newest = os.path.join(workdir, "checkpoints", "6")
  if damage == "truncated":
    _truncate_files(os.path.join(newest, "state"))
  else:
    shutil.rmtree(os.path.join(newest, "data"))
  summary = loop.run(lm_config(), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 6 is unreadable" in out and "resumed from step 4" in out
  assert summary["start_step"] == 4 and summary["final_step"] == 6
  # Steps 5 and 6 are retrained exactly; the damaged step is kept aside, nothing is deleted.
  assert train_losses(workdir) == train_losses(lm_run)
  assert checkpoint_steps(workdir) == [2, 4, 6]
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "6"))


def vit_config(**train):
  c = vit.get_config("variant=digits")
  c.mesh.update(data=8)
  c.train.update(steps=8, batch_size=16, **train)
  c.opt.update(warmup_steps=1)
  c.ckpt.update(every=2, keep=10, async_save=False)
  c.log.update(every=1, progress=False)
  c.eval.update(every=1000, steps=1, batch_size=40)
  return c


def poison(monkeypatch, bad_steps):
  """Makes the images of the batches of ``bad_steps`` NaN (1-based step numbers)."""
  real = loop.next_batch
  calls = {"n": 0}

  def next_batch(train_iter, to_device):
    calls["n"] += 1
    batch = real(train_iter, to_device)
    if calls["n"] in bad_steps:
      batch = {**batch, "images": batch["images"] * np.nan}
    return batch

  monkeypatch.setattr(loop, "next_batch", next_batch)


def test_nan_batches_are_skipped_and_counted(monkeypatch, tmp_path):
  poison(monkeypatch, {3, 4})
  loop.run(vit_config(), str(tmp_path))
  train = {m["step"]: m for m in read_metrics(tmp_path) if m["split"] == "train"}
  assert [train[s]["bad_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 0, 0, 0, 0]
  assert [train[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 2, 2, 2]
  assert not np.isfinite(train[3]["loss"]) and np.isfinite(train[5]["loss"])
  # The skipped steps changed neither the parameters nor the AdamW state.
  _, _, _, params2 = checkpoint.load_trained(str(tmp_path), step=2)
  _, _, _, params4 = checkpoint.load_trained(str(tmp_path), step=4)
  jax.tree.map(np.testing.assert_array_equal, params2, params4)
  # Training then goes on from them with finite values.
  _, _, _, params6 = checkpoint.load_trained(str(tmp_path), step=6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params6))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params4, params6)
  assert all(jax.tree.leaves(changed))


def test_too_many_bad_steps_stop_the_run_without_saving_them(monkeypatch, tmp_path):
  poison(monkeypatch, set(range(3, 9)))
  with pytest.raises(loop.BadStepsError, match=r"3 consecutive training steps up to step 5 "
                     r"had a non-finite loss or gradients and were skipped"):
    loop.run(vit_config(max_bad_steps=3), str(tmp_path))
  # Step 4's checkpoint holds step 2's (finite) parameters; nothing after the stop is saved.
  assert checkpoint_steps(tmp_path) == [2, 4]


# ------------------------------------------------------------------ elastic restore


def restore_params(workdir, step, mesh_sizes, devices):
  config = lm_config(mesh=mesh_sizes)
  program = program_lib.build(config, devices=devices)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  state = ckpt.restore(step, program.abstract_state, iter(program.task.datasets()[0]))
  ckpt.close()
  return state


def test_checkpoint_restores_onto_other_meshes_with_identical_values(lm_run):
  on8 = restore_params(lm_run, 4, (2, 2, 2), jax.devices())
  for sizes, devices in (((1, 4, 1), jax.devices()[:4]), ((1, 1, 1), jax.devices()[:1])):
    other = restore_params(lm_run, 4, sizes, devices)
    leaf = other.params["layers"]["gate"]["kernel"]
    assert len(leaf.sharding.device_set) == len(devices)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(on8), jax.device_get(other))


@pytest.mark.parametrize("devices,mesh_flags", [
    (4, ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=1")),
    (1, ("--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"))])
def test_training_continues_on_another_device_count(lm_run, tmp_path, devices, mesh_flags):
  workdir = str(tmp_path / "w")
  shutil.copytree(lm_run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  proc = run_module(
      "train", "--config=configs/lm.py:size=test", f"--workdir={workdir}",
      f"--cpu_devices={devices}", *mesh_flags, "--config.train.steps=6",
      "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.opt.warmup_steps=2",
      "--config.ckpt.every=2", "--config.ckpt.keep=10", "--config.log.every=1",
      "--config.eval.every=1000", "--config.eval.steps=1", "--config.eval.batch_size=8",
      "--config.sample.max_new_tokens=0")
  assert "resumed from step 4" in proc.stdout
  straight, resumed = train_losses(lm_run), train_losses(workdir)
  assert sorted(resumed) == list(range(1, 7))
  # Steps 5 and 6 see the same batches (the data position came with the checkpoint) and the same
  # parameters; only the order of floating-point reductions differs between meshes.
  for step in (5, 6):
    np.testing.assert_allclose(resumed[step], straight[step], rtol=2e-5)
  assert data_position(workdir, 6) == data_position(lm_run, 6)
