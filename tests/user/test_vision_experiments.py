"""The launch commands of the Swin and U-ViT digits experiments, as written, checked as
tests/user/test_image_experiments.py checks the others (the same overrides of step counts), in a
module of their own so that the two pytest workers share the image experiments."""

import pytest

from tests.user.test_image_experiments import OWN_MODULE, check_image_experiment, experiment_runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return experiment_runs(tmp_path_factory)


@pytest.mark.parametrize("name", OWN_MODULE)
def test_vision_experiment_trains_evaluates_and_samples(name, trained):
  check_image_experiment(name, trained)
