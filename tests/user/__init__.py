"""The user tier: every command the README and docs/*.md show, run as a subprocess exactly as
written, in the user's environment.

Unlike the unit tiers, these subprocesses do not inherit the suite's XLA_FLAGS (tests/conftest.py
adds the 8-device count and the -O0 / older-fusion-emitter compile flags that no user has): the
environment is built here, with XLA_FLAGS removed, so XLA compiles with its defaults and the
device count comes from the command's own --cpu_devices. A test may only lower step counts and
sizes, through the documented ``--config.<path>=<value>`` overrides (or ``make run ARGS=...``),
and says which it adds and why. Placeholders of the docs (DIR, WORKDIR, HF_DIR, ...) become tmp
paths. tests/user/commands.py maps each documented command to the test that runs it.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)


def user_env() -> dict:
  """The environment a user's shell gives a command: the suite's XLA_FLAGS dropped (no -O0, no
  device count), the virtualenv's ``python`` first on PATH (as after ``source .venv/bin/activate``),
  and JAX_PLATFORMS=cpu, which ``make run`` sets and which is what JAX picks on this CPU machine
  anyway (the docs' commands simulate CPU devices)."""
  # MAKELEVEL/MAKEFLAGS/MFLAGS: under `make test` a documented `make ...` would otherwise run as a
  # sub-make ("make[1]: Entering directory ..."), which no user's shell does.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAKELEVEL", "MAKEFLAGS",
                                                         "MFLAGS") and not k.startswith("PYTEST_")}
  env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTHONPATH", None)  # the commands run from the repository root, as the docs say
  return env


def substitute(command: str, **paths) -> str:
  """The documented ``command`` with each placeholder (a keyword's name, e.g. DIR, HF_DIR, or a
  literal path given as ``{"workdirs/lm_stdlib": tmp}``) replaced by a path, shell-quoted."""
  for name, value in paths.items():
    command = re.sub(rf"(?<![A-Za-z0-9_./-]){re.escape(name)}(?![A-Za-z0-9_])",
                     lambda _: shlex.quote(str(value)), command)
  return command


def optional_dropped(command: str) -> str:
  """A synopsis without its ``[optional]`` parts, e.g. the generate synopsis's required flags."""
  return " ".join(re.sub(r"\s*\[[^\]]*\]", "", command).split())


def run(command: str, log, timeout: int, ok: bool = True) -> subprocess.CompletedProcess:
  """Runs ``command`` with bash from the repository root in :func:`user_env`; its output (stdout
  and stderr together) is ``.stdout`` and stays in the file ``log``. ``ok`` asserts exit status 0.

  The command gets its own process group, killed whole at ``timeout`` (``make`` and the launcher
  start children that a plain kill of the shell would leave running), and the test then fails
  with the output's tail: a hang fails fast.
  """
  with open(log, "w") as out:
    out.write(f"$ {command}\n")
    out.flush()
    proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=user_env(), text=True,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise AssertionError(f"timed out after {timeout} s: {command}\n{tail(log)}") from None
  if ok:
    assert proc.returncode == 0, f"exit status {proc.returncode}: {command}\n{tail(log)}"
  with open(log) as f:
    return subprocess.CompletedProcess(command, proc.returncode, f.read())


def tail(log, chars: int = 4000) -> str:
  with open(log) as f:
    return f.read()[-chars:]


def metrics(workdir, split: str) -> list[dict]:
  """The ``split`` lines of ``workdir/metrics.jsonl``, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return [m for m in lines if m["split"] == split]


def experiment_config(spec: str):
  """The config of the experiment ``FILE[:ARG]``, as ``--config=FILE[:ARG]`` loads it."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def experiment_mesh(spec: str) -> dict:
  """The mesh the experiment ``FILE[:ARG]`` asks for, as the start-up line prints it."""
  return dict(experiment_config(spec).mesh.items())


def started_mesh(out: str) -> dict:
  """The mesh the run's start-up line reports."""
  import ast
  found = re.search(r"mesh (\{[^}]*\}) on (\d+) cpu devices", out)
  assert found, out[-3000:]
  return ast.literal_eval(found.group(1))


def check_run(workdir, out: str, steps: int, mesh: dict | str) -> list[dict]:
  """What every experiment's run must show: it finished, on ``mesh`` (or the mesh of the
  experiment ``FILE[:ARG]`` that ``mesh`` names), evaluated at step 0 and at the end with a lower
  validation loss, and checkpointed the final step. Returns the val lines."""
  assert f"done: step {steps}." in out, out[-3000:]
  expected = experiment_mesh(mesh) if isinstance(mesh, str) else mesh
  started = started_mesh(out)
  for axis, size in expected.items():
    if axis in started and size != -1:
      assert started[axis] == size, (axis, started, expected)
  val = metrics(workdir, "val")
  assert [m["step"] for m in val] == [0, steps], val
  assert val[-1]["loss"] < val[0]["loss"], val
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
  assert [f for f in os.listdir(os.path.join(workdir, "tb")) if f.startswith("events.out")]
  return val


def check_lm_run(workdir, out: str, steps: int, mesh: dict | str) -> None:
  """:func:`check_run`, falling bits/byte, and the end-of-run sample printed and saved."""
  val = check_run(workdir, out, steps, mesh)
  assert val[-1]["bits_per_byte"] < val[0]["bits_per_byte"], val
  printed = out.split("sample:\n", 1)[1].split("\n" + "-" * 40, 1)[0]
  assert printed.strip() and len(printed) > len("def "), out[-3000:]
  with open(os.path.join(workdir, "samples.txt")) as f:
    assert printed in f.read()
