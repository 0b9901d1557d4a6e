"""Seconds per test file from a ``make test`` run, read by tests/conftest.py to hand pytest-xdist
the slowest files first (not a test file).

``--dist loadfile`` gives a worker one whole file at a time, in collection order; collected
alphabetically, the end-to-end files under tests/user (one of ~250 s) came last, so one worker
could still be in one while the other had nothing left. Slowest first, the run ends on small
files. Refresh after a suite's files change much (new files count as 0 s: they go last):

  .venv/bin/python -m tests.durations workdirs/tests.xml
"""

import collections
import json
import os
import sys
import xml.etree.ElementTree as ET

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def load() -> dict:
  """{"tests/user/test_lm_experiments.py": seconds, ...}; empty if the file is missing."""
  try:
    with open(PATH) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def from_junit(path: str) -> dict:
  totals = collections.Counter()
  for case in ET.parse(path).getroot().iter("testcase"):
    module = case.get("classname", "").split(".")
    if len(module) >= 2:
      totals["/".join(module[:3]) + ".py"] += float(case.get("time", 0))
  return {name: round(seconds, 1) for name, seconds in sorted(totals.items())}


if __name__ == "__main__":
  durations = from_junit(sys.argv[1] if len(sys.argv) > 1 else "workdirs/tests.xml")
  with open(PATH, "w") as f:
    json.dump(durations, f, indent=1)
    f.write("\n")
  print(f"{len(durations)} files, {sum(durations.values()):.0f} s in all -> {PATH}")
