"""Parity tests against the Hugging Face libraries (PyTorch on CPU), which `make test` installs
through the `parity` extra; where one is missing the module skips and says so."""

import pytest


def parity_import(name: str):
  """``import name`` for a parity test module, or a skip of the whole module saying why."""
  return pytest.importorskip(name, reason=f"{name} is not installed (make test installs the "
                             "parity extra: pip install -e '.[parity]')")


def classifier_logits(model, images_BxHxWxC):
  """A transformers image classifier's logits (numpy) for NHWC float32 images."""
  torch = parity_import("torch")
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images_BxHxWxC.transpose(0, 3, 1, 2))
                 ).logits.numpy()
