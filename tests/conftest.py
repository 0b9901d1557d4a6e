"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
_FAST = "--xla_backend_optimization_level=0"  # tests/__init__
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _FAST
# Two pytest workers share two cores, so a device thread of an in-process collective can wait
# on the other worker's compile past XLA:CPU's default terminate timeout, which aborts the whole
# worker (and xdist's loadfile scheduler then waits forever). pytest-timeout (900 s) bounds a
# real hang instead.
_TERMINATE = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _TERMINATE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The folders this process makes below (the pytest controller's, which xdist's workers and every
# subprocess inherit) are removed when it exits: each run's XLA cache holds ~160 MB.
_MADE = []
# Tokenizers and token streams built on first use (train/data.py cache_dir) go to a folder of this
# test process, not the user's ~/.cache/odyssey; subprocesses inherit it. A test of the first use
# itself sets its own empty one.
if "ODYSSEY_CACHE" not in os.environ:
  os.environ["ODYSSEY_CACHE"] = tempfile.mkdtemp(prefix="odyssey-test-cache-")
  _MADE.append(os.environ["ODYSSEY_CACHE"])
# One persistent XLA compilation cache for the whole run, shared by both pytest workers and every
# subprocess they start (set here, in the controller, before the workers spawn): the suite compiles
# the same programs many times (a run and its resume, make run and generate on its workdir, each
# process of a multi-process job), and a cache hit skips the compile. Programs and results are
# unchanged; XLA flags are part of the key, so the user tier's flags still get their own compiles.
# Programs that took at least 0.2 s to compile are stored. Storing every small jit made
# tests/nets/test_contract.py 16% slower (61.9 s against 53.2 s without a cache), as writes cost
# more than the rare hits save; JAX's default of 1 s missed the most repeated compiles: a probe of
# a whole run found 811 compiles of a program already compiled, 104 s in all, 65 s of them in
# 0.2-1 s compiles (a test module's model rebuilt per test). At 0.2 s, tests/nets/
# test_native_packing.py, test_text_dit.py, test_uvit.py and tests/train/test_ema.py together ran
# in 90-102 s against 111-116 s; test_contract.py and test_linear_rnn.py stayed within noise.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="odyssey-test-xla-cache-")
  _MADE.append(os.environ["JAX_COMPILATION_CACHE_DIR"])
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
atexit.register(lambda: [shutil.rmtree(path, ignore_errors=True) for path in _MADE])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402,F401  (adds parallel/xla_flags.py's CPU_FLAGS before JAX starts)

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

from tests import durations  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, (
      f"the tests need 8 simulated CPU devices, found {jax.device_count()}; XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS')!r} must set --xla_force_host_platform_device_count=8")


def pytest_collection_modifyitems(session, config, items):
  """Slowest files first (tests/durations.py), each file's tests in their own order: with
  ``--dist loadfile`` the two workers then finish on small files, not one on a 250-s file while
  the other waits."""
  seconds = durations.load()
  file_of = lambda item: item.nodeid.split("::")[0]
  order = {}
  for item in items:
    order.setdefault(file_of(item), len(order))
  items.sort(key=lambda item: (-seconds.get(file_of(item), 0.0), order[file_of(item)]))
