"""Parity tests against the Hugging Face libraries (PyTorch on CPU), which `make test` installs
through the `parity` extra; where one is missing the module skips and says so."""

import pytest


def parity_import(name: str):
  """``import name`` for a parity test module, or a skip of the whole module saying why."""
  return pytest.importorskip(name, reason=f"{name} is not installed (make test installs the "
                             "parity extra: pip install -e '.[parity]')")
