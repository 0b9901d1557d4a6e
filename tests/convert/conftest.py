"""Fixtures every parity test module shares."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """torch's OpenMP workers spin against XLA's on a 2-core machine (a tiny forward took 0.5 s
  instead of 5 ms); one thread is plenty for these models. Restored for other test modules."""
  try:
    import torch
  except ImportError:  # the module skips itself
    yield
    return
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
