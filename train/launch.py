"""Runs a multi-process training job on this machine, as a pod would run it across hosts.

  python -m train.launch --num_processes=2 --devices_per_process=4 -- \\
      --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR [--config.a.b=v ...]

Starts ``num_processes`` copies of ``python -m train`` (``--module=train.generate``: of the
sharded generation, over the same kind of mesh) with the given flags, each with
``--cpu_devices=devices_per_process`` and the coordinator on a free loopback port, so the mesh
spans every process's devices and the processes talk through JAX's gloo CPU collectives. Their
output is streamed with a ``[pI]`` prefix. If any process fails, the others are stopped (SIGTERM,
then SIGKILL after ``--grace_s``: a process blocked in a collective with a dead peer cannot finish
its step) and the launcher exits with the failed process's status; the checkpoints on disk stay
valid, because Orbax only ever renames complete ones into place, so rerunning the same command
resumes. SIGTERM or SIGINT to the launcher is passed on to every process, which checkpoint and exit.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices per process.")
_GRACE = flags.DEFINE_float("grace_s", 20.0, "Seconds a process has to exit after SIGTERM.")
_MODULE = flags.DEFINE_enum("module", "train", ["train", "train.generate"],
                            "The program every process runs: training, or sharded generation.")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it next)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock):
  for line in proc.stdout:
    if "peer ranks" in line:  # gloo's per-collective connection chatter
      continue
    with lock:
      sys.stdout.write(f"{prefix} {line}")
      sys.stdout.flush()


def _describe(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def launch(train_args: list[str], num_processes: int, devices_per_process: int,
           grace_s: float = 20.0, module: str = "train") -> int:
  """Runs the job; returns 0 when every process succeeded, else the first failure's status."""
  port = free_port()
  lock = threading.Lock()
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-u", "-m", module, *train_args,
           f"--cpu_devices={devices_per_process}", f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, env={**os.environ, "JAX_PLATFORMS": "cpu"}))
  print(f"[launch] {num_processes} processes x {devices_per_process} CPU devices, coordinator "
        f"127.0.0.1:{port}, pids {[p.pid for p in procs]}", flush=True)
  threads = [threading.Thread(target=_stream, args=(p, f"[p{i}]", lock), daemon=True)
             for i, p in enumerate(procs)]
  for t in threads:
    t.start()

  def forward(signum, _):
    print(f"[launch] {signal.Signals(signum).name}: passing it on to every process", flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      time.sleep(0.1)
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
      code = procs[failed].returncode
      print(f"[launch] process {failed} {_describe(code)}; stopping the others. Checkpoints on "
            "disk are complete ones only: rerun the same command to resume.", flush=True)
      _stop(procs, grace_s)
    for t in threads:
      t.join(timeout=5)
    if failed is None:
      print(f"[launch] all {num_processes} processes finished.", flush=True)
      return 0
    code = procs[failed].returncode
    return code if code > 0 else 128 - code
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _stop(procs, grace_s: float):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      print(f"[launch] process pid {p.pid} did not exit within {grace_s:.0f} s of SIGTERM "
            "(blocked in a collective with the failed process); killing it.", flush=True)
      p.kill()
      p.wait()


def main(argv):
  train_args = argv[1:]
  if not train_args:
    raise app.UsageError("give the train flags after --, e.g. -- --config=... --workdir=...")
  if _NUM_PROCESSES.value < 1 or _DEVICES.value < 1:
    raise app.UsageError("--num_processes and --devices_per_process must be positive.")
  sys.exit(launch(train_args, _NUM_PROCESSES.value, _DEVICES.value, _GRACE.value, _MODULE.value))


if __name__ == "__main__":
  app.run(main)
