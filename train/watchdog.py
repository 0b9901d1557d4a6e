"""A hang watchdog: a run whose device work stops making progress ends with one sentence.

A collective that never completes (a process that died or stalled, devices that entered different
collectives) blocks the host forever on GPU/TPU, and on CPU XLA aborts the process after
``--xla_cpu_collective_call_terminate_timeout_seconds`` with a C++ stack dump. Instead, the loop
and the samplers name a *phase* ("train step", "eval", "sample", "checkpoint save") and *beat*
each time the host has seen the device finish a unit of work (a step's metrics, an eval batch, a
chunk of decode steps). A daemon thread ends the process when the current phase has not beaten
for ``timeout_s`` seconds, after printing one sentence that names the phase.

The first unit of a phase includes compiling it, so until a phase's first beat the limit is
``FIRST_UNIT_FACTOR`` times longer. ``xla_cpu_flags`` sets XLA:CPU's own collective termination
timeout above that, so the sentence comes first.
"""

import contextlib
import os
import sys
import threading
import time

# Until a phase's first beat (its compile), the limit is this many times the timeout.
FIRST_UNIT_FACTOR = 3
EXIT_CODE = 75  # EX_TEMPFAIL: rerunning the command resumes from the newest checkpoint

_lock = threading.Lock()
_state = {"phase": None, "since": 0.0, "beats": 0, "timeout": None, "note": None, "thread": None}


def start(timeout_s: float, note=None) -> None:
  """Arms the watchdog for this process (idempotent; a later call replaces timeout and note).

  ``note()``, if given, returns text appended to the sentence (e.g. the newest checkpoint).
  """
  with _lock:
    _state.update(timeout=float(timeout_s), note=note)
    if _state["thread"] is None:
      thread = threading.Thread(target=_watch, name="odyssey-watchdog", daemon=True)
      _state["thread"] = thread
      thread.start()


def stop() -> None:
  """Disarms the watchdog (the thread stays, idle)."""
  with _lock:
    _state.update(timeout=None, phase=None, note=None)


def beat() -> None:
  """The device finished a unit of the current phase."""
  with _lock:
    _state["since"] = time.monotonic()
    _state["beats"] += 1


@contextlib.contextmanager
def phase(name: str):
  """Work inside is ``name`` for the watchdog's sentence; phases nest (the inner one counts)."""
  with _lock:
    outer = (_state["phase"], _state["since"], _state["beats"])
    _state.update(phase=name, since=time.monotonic(), beats=0)
  try:
    yield
  finally:
    with _lock:
      _state.update(phase=outer[0], since=time.monotonic(), beats=outer[2])


def xla_cpu_flags(timeout_s: float) -> tuple[str, ...]:
  """XLA:CPU collective timeouts that leave the watchdog time to speak first."""
  terminate = int(FIRST_UNIT_FACTOR * timeout_s + 60)
  return (f"--xla_cpu_collective_call_terminate_timeout_seconds={terminate}",)


def _limit() -> float | None:
  if _state["timeout"] is None or _state["phase"] is None:
    return None
  return _state["timeout"] * (1 if _state["beats"] else FIRST_UNIT_FACTOR)


def _watch() -> None:
  while True:
    with _lock:
      limit = _limit()
      waited = time.monotonic() - _state["since"]
      name, note = _state["phase"], _state["note"]
    if limit is not None and waited > limit:
      extra = ""
      if note is not None:
        try:
          extra = note()
        except Exception:  # the sentence matters more than the note
          extra = ""
      sys.stdout.flush()
      sys.stderr.write(
          f"odyssey: the {name} made no progress for {waited:.0f} s (train.hang_timeout_s="
          f"{_state['timeout']:g}), so a collective is presumably stuck: another process died or "
          f"stalled, or devices disagree on what runs next; stopping this process.{extra}\n")
      sys.stderr.flush()
      os._exit(EXIT_CODE)
    time.sleep(0.5 if limit is None else min(1.0, max(0.05, limit / 20)))
