"""Parity tests against the Hugging Face libraries (PyTorch on CPU), which `make test` installs
through the `parity` extra; where one is missing, each test that uses it skips and says so."""

import pytest


def parity_import(name: str):
  """``name`` for a parity test module, imported on first use (collecting the suite, which both
  pytest workers do, imports no PyTorch, transformers or diffusers); where it is not installed,
  each test that uses it skips saying why."""
  return _Lazy(name)


class _Lazy:
  """A module imported (``pytest.importorskip``) when one of its public attributes is first read.
  Private names are not forwarded: pytest reads some (``_pytestfixturefunction``, ``__test__``)
  from every module global while collecting."""

  def __init__(self, name: str):
    self._name, self._module = name, None

  def __getattr__(self, attr: str):
    if attr.startswith("_"):
      raise AttributeError(attr)
    if self._module is None:
      self._module = pytest.importorskip(
          self._name, reason=f"{self._name} is not installed (make test installs the parity "
          "extra: pip install -e '.[parity]')")
    return getattr(self._module, attr)


def classifier_logits(model, images_BxHxWxC):
  """A transformers image classifier's logits (numpy) for NHWC float32 images."""
  torch = parity_import("torch")
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images_BxHxWxC.transpose(0, 3, 1, 2))
                 ).logits.numpy()
