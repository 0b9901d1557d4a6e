"""Two lm_stdlib commands of the README beyond `make run`: the local multi-process launcher
(`python -m train.launch`, 2 processes x 4 simulated CPU devices, gloo collectives) and the
Ulysses sequence-parallel run, each as written with the end-of-run sample on.

Overrides, only of step counts and sizes: ``--config.train.steps=STEPS`` (of 500; the step-0 and
final evaluations bracket them), ``--config.eval.steps=2`` (of 8 batches) and
``--config.sample.max_new_tokens=48`` (of 200; the run still ends with the sample, decoded on the
training mesh past the decoder's bounded queue of in-flight steps).
"""

import os

from tests.user import check_lm_run, run, started_mesh, substitute
from tests.user.commands import doc

STEPS = 6
OVERRIDES = f" --config.train.steps={STEPS} --config.eval.steps=2 --config.sample.max_new_tokens=48"


def test_launch_two_processes_trains_and_samples(tmp_path):
  command = doc("python -m train.launch --num_processes=2 --devices_per_process=4 -- "
                "--config=experiments/lm_stdlib.py:size=tiny --workdir=/tmp/odyssey/lm2")
  workdir = tmp_path / "lm2"
  command = substitute(command, **{"/tmp/odyssey/lm2": workdir})
  out = run(command + OVERRIDES, tmp_path / "launch.log",
            timeout=600).stdout
  assert "[launch] all 2 processes finished." in out, out[-3000:]
  assert "over 2 processes (axes spanning them: ['data'])" in out, out[-3000:]
  # Process 0 writes the metrics, the sample and its line; the launcher prefixes it [p0].
  check_lm_run(workdir, out.replace("[p0] ", ""), STEPS, "experiments/lm_stdlib.py:size=tiny")
  data = os.listdir(workdir / "checkpoints" / str(STEPS) / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data), data


def test_ulysses_sequence_parallel_command(tmp_path):
  command = doc("python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR "
                "--cpu_devices=8 --config.mesh.data=2 --config.mesh.fsdp=1 --config.mesh.tensor=1 "
                "--config.mesh.seq=4 --config.parallel.seq_strategy=ulysses")
  out = run(substitute(command, DIR=tmp_path / "run") + OVERRIDES,
            tmp_path / "run.log", timeout=600).stdout
  mesh = {"data": 2, "fsdp": 1, "tensor": 1, "seq": 4, "expert": 1}
  assert started_mesh(out) == mesh
  assert "ulysses" in out.split("attention:", 1)[1].split("\n", 1)[0].lower(), out[-3000:]
  check_lm_run(tmp_path / "run", out, STEPS, mesh)
