"""What every bench script shares: devices and XLA flags, the command line, timing, the results.

A script defines its cases and three functions, ``run(args) -> doc`` (measure),
``markdown(doc) -> str`` and optionally ``plot(doc, plt) -> figure``, and calls ``main``. It writes
NAME.json, NAME.md and NAME.png to --out; ``--render_only`` re-renders NAME.md and NAME.png from
an existing NAME.json without measuring anything.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

from parallel import xla_flags

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def setup(devices: int | None) -> None:
  """Flags a bench needs before JAX starts a backend.

  The CPU backend unless JAX_PLATFORMS says otherwise; ``devices`` simulated CPU devices unless
  XLA_FLAGS sets a count (a count the user chose is respected); and parallel/xla_flags.py's
  recommended flags for the platform, as ``python -m train`` adds them.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  if devices and _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"], _ = xla_flags.merge(os.environ.get("XLA_FLAGS", ""),
                                                 [f"{_COUNT_FLAG}={devices}"])
  xla_flags.apply()  # (importing parallel has added its CPU flags already)


def main(name: str, doc: str, run, markdown, plot=None, flags=(), devices: int | None = 8,
         argv=None) -> dict:
  """Parses the command line, measures (``run(args)``) or reloads, and writes the results.

  ``flags``: (name, argparse keyword arguments) beyond --quick, --out and --render_only.
  """
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes: shows everything runs")
  parser.add_argument("--out", default="bench/results", help="folder for json, md and png")
  parser.add_argument("--render_only", "--render-only", action="store_true",
                      help=f"re-render {name}.md and {name}.png from {name}.json in --out")
  for flag, kwargs in flags:
    parser.add_argument(flag, **kwargs)
  args = parser.parse_args(argv)
  json_path = os.path.join(args.out, f"{name}.json")
  if args.render_only:
    with open(json_path) as f:
      result = json.load(f)
  else:
    setup(devices)
    start, env = time.perf_counter(), environment()
    result = run(args)
    env["load_average"].append(os.getloadavg()[0])
    result["environment"] = env
    result.setdefault("wall_time_s", time.perf_counter() - start)
    os.makedirs(args.out, exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(result, f, indent=1, default=float)
  wall = result.get("wall_time_s")
  wall = wall["total_s"] if isinstance(wall, dict) else wall
  md = markdown(result) + (f"\nWall time: {wall:.0f} s; JSON: {json_path}\n" if wall else "")
  with open(os.path.join(args.out, f"{name}.md"), "w") as f:
    f.write(md)
  if plot is not None:
    write_plot(plot, result, os.path.join(args.out, f"{name}.png"))
  print(md)
  return result


def write_plot(plot, doc: dict, path: str) -> None:
  """Draws ``plot(doc, pyplot)`` into ``path``; says so on stderr when matplotlib is missing."""
  try:
    import matplotlib
  except ImportError:
    print(f"matplotlib is not installed: no {path} (pip install -e '.[bench]').", file=sys.stderr)
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plot(doc, plt)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def log(message: str) -> None:
  """Progress on stderr, so that stdout holds only the results."""
  print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing


def stepper(step, state, batch):
  """A call that runs ``state, metrics = step(state, batch)`` to completion; keeps both."""
  def call():
    call.state, call.metrics = step(call.state, batch)
    jax.block_until_ready((call.state, call.metrics))
  call.state, call.metrics = state, None
  return call


def timed(call) -> float:
  """Wall seconds of ``call()``, which returns once its work is done on the device."""
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def round_robin(calls: dict, rounds: int, warmup: int = 0, settle: int = 0, repeats: int = 1,
                rotate: bool = False, between=None) -> dict[str, list[float]]:
  """Seconds of every timed call of each ``name: call``, the cases timed in turn.

  ``warmup`` untimed calls each first; then ``rounds`` rounds, each giving every case ``settle``
  untimed calls and ``repeats`` timed ones. Interleaving puts load from other processes on every
  case alike, so their ratios hold when the absolute times drift; with ``rotate`` the order
  shifts every round, so no case always follows the same one. ``between()`` runs after each
  round.
  """
  for call in calls.values():
    for _ in range(warmup):
      call()
  times, names = {name: [] for name in calls}, list(calls)
  for i in range(rounds):
    shift = i % len(names) if rotate else 0
    for name in names[shift:] + names[:shift]:
      for _ in range(settle):
        calls[name]()
      times[name] += [timed(calls[name]) for _ in range(repeats)]
    if between is not None:
      between()
  return times


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
  """Median over rounds of a/b for calls timed in the same round (see round_robin)."""
  return statistics.median(a / b for a, b in zip(numerators, denominators))


# ----------------------------------------------------------------------------- markdown


def environment() -> dict:
  """The host and JAX a benchmark ran on; ``main`` appends the load average at the end."""
  return dict(jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
              xla_flags=os.environ.get("XLA_FLAGS", ""), host_cores=os.cpu_count(),
              load_average=[os.getloadavg()[0]], machine=platform.machine(),
              python=platform.python_version())


def machine_line(doc: dict) -> str:
  """One sentence on the machine of ``doc["environment"]``, and how far its times compare."""
  env = doc["environment"]
  load = " / ".join(f"{x:.1f}" for x in env.get("load_average", []))
  return (f"Machine: {env['host_cores']} CPU cores ({env.get('machine', '?')}), "
          f"{env.get('devices', doc.get('devices'))} JAX devices on backend `{env['backend']}`, "
          f"jax {env['jax']}, python {env['python']}"
          + (f"; 1-minute load average {load} (start / end)" if load else "")
          + ". Simulated devices share the host's cores, so absolute CPU times are only relative "
          "figures: compare rows of one run, not runs or an accelerator.")


def heading(title: str, doc: dict) -> str:
  """The title with the run's mode, and the machine line."""
  return f"# {title} ({doc['mode']})\n\n{machine_line(doc)}\n"


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def expectations(checks: list[dict]) -> str:
  """The "## Expectations" section: each check's name, whether it holds, what was measured."""
  rows = [[c["name"], "yes" if c["holds"] else "**NO**", c["detail"]] for c in checks]
  return "\n".join(["## Expectations", "", table(["expectation", "holds", "measured"], rows), ""])


MiB = 2 ** 20


def mib(x, digits: int = 2) -> str:
  return "-" if x is None else f"{x / MiB:.{digits}f}"


def pct(x, digits: int = 1) -> str:
  return "-" if x is None else f"{100 * x:.{digits}f}"
