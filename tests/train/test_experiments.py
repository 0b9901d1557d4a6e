"""Experiment configs: the pod-scale DiT-XL/2 builds and shards abstractly; image sources read
what they should. (Every experiment's launch command runs in tests/user.)"""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from parallel import sharding
from tests import REPO
from train import flops, image_data, models, optimizer, tasks, validate
from train import program as program_lib
from train import state as state_lib


def experiment(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_dit_xl2_imagenet256_builds_and_shards_abstractly(tmp_path):
  c = experiment("dit_xl2_imagenet256")
  latents = np.random.default_rng(0).standard_normal((8, 32, 32, 4)).astype(np.float16)
  for split in ("train", "val"):  # validation checks that each split fills one batch
    image_data.write_arrayrecord(str(tmp_path), split, latents, np.arange(8), num_classes=1000)
  c.data.path = str(tmp_path)
  c.mesh.update(data=2, fsdp=4)
  c.train.batch_size = c.eval.batch_size = 8
  plan = validate.validate(c)
  assert plan.mesh["fsdp"] == 4 and plan.model_cfg.hidden_size == 1152
  program = program_lib.build(c, plan)
  model, mesh, rules = program.model, program.mesh, program.rules
  abstract, shardings = program.abstract_state, program.state_shardings  # no allocation
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  assert abs(count - 674_834_720) / 674_834_720 < 1e-6  # + 294,912 fixed positions = 675.13M
  # FSDP really shards the big kernels: a block's MLP kernel is split 4 ways over fsdp.
  fc1 = jax.tree_util.tree_leaves_with_path(shardings.params)
  big = [(jax.tree_util.keystr(p), s) for p, s in fc1 if "fsdp" in str(s.spec)]
  assert len(big) >= 4, big
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.eval_shape(lambda p, x, t, y: model.apply({"params": p}, x, t, y), abstract.params,
                         jnp.zeros((8, 32, 32, 4)), jnp.zeros((8,)), jnp.zeros((8,), jnp.int32))
  assert out.shape == (8, 32, 32, 8)  # learned sigma doubles the channels


def test_arrayrecord_images_round_trip(tmp_path):
  images = np.random.default_rng(1).standard_normal((5, 4, 4, 3)).astype(np.float16)
  image_data.write_arrayrecord(str(tmp_path), "train", images, np.arange(5) % 3, num_classes=3)
  cfg = experiment("dit_digits").data
  cfg.update(name="arrayrecord", path=str(tmp_path))
  src = image_data.source(cfg, "train")
  assert len(src) == 5 and image_data.image_shape(cfg) == (4, 4, 3)
  np.testing.assert_array_equal(src[3]["images"], images[3].astype(np.float32))
  assert int(src[4]["labels"]) == 1 and image_data.num_classes(cfg) == 3


def test_digits_split_is_fixed_and_scaled():
  cfg = experiment("vit_digits").data
  train, val = image_data.source(cfg, "train"), image_data.source(cfg, "val")
  assert (len(train), len(val)) == (1437, 360)
  x = train.images
  assert x.shape[1:] == (8, 8, 1) and x.min() == -1.0 and x.max() == 1.0


def test_digits_are_scikit_learns_without_importing_it():
  """The digits file is read directly (scikit-learn's import costs most of a run's start-up); the
  pixels and labels are exactly ``load_digits``'s, scaled to [-1, 1]."""
  from sklearn.datasets import load_digits
  image_data._digits.cache_clear()
  images, labels = image_data._digits(0)
  want = load_digits()
  np.testing.assert_array_equal(images[..., 0], want.images.astype(np.float32) / 8.0 - 1.0)
  np.testing.assert_array_equal(labels, want.target)
  assert images.dtype == np.float32 and labels.dtype == np.int32
  proc = subprocess.run([sys.executable, "-c", "import sys; from train import image_data; "
                         "image_data._digits(8); print('sklearn' in sys.modules)"],
                        capture_output=True, text=True, cwd=REPO, check=True)
  assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_image_folder_source(tmp_path):
  for label in ("cat", "dog"):
    os.makedirs(tmp_path / label)
    for i in range(6):
      Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
  cfg = experiment("vit_digits").data
  cfg.update(name="folder", path=str(tmp_path), image_size=8, val_fraction=0.3)
  train, val = image_data.source(cfg, "train"), image_data.source(cfg, "val")
  assert len(train) + len(val) == 12 and len(val) > 0
  assert train[0]["images"].shape == (8, 8, 3) and image_data.num_classes(cfg) == 2


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.sampler", "flow", r"does not fit objective 'ddpm'"),
    ("model.num_classes", 7, r"model.num_classes=7 but data 'digits' has 10 classes"),
    ("data.name", "imagenet", r"data.name='imagenet' is not an image dataset"),
    ("diffusion.time_shift", 3.0, r"time_shift=3.0 shifts the flow objective's timesteps"),
    ("diffusion.time_shift", 0.0, r"time_shift=0.0 must be a finite number above 0"),
    ("diffusion.time_shift", float("nan"), r"time_shift=nan must be a finite number above 0"),
])
def test_vision_config_errors(field, value, message):
  c = experiment("dit_digits")
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(ValueError, match=message):
    validate.validate(c)


@pytest.mark.parametrize("name,devices,chip,mesh", [
    ("llama_7b_pod", 64, "tpu_v5p", {}),  # v5p-128: one slice, FSDP over all 64 chips
    ("llama_7b_pod", 64, "h100_sxm", {"fsdp": 8}),  # 8 nodes x 8 GPUs: FSDP within a node
    ("dit_xl2_imagenet256", 64, "tpu_v5p", {}),
])
def test_pod_configs_fit_the_chip_memory(tmp_path, name, devices, chip, mesh):
  c = experiment(name)
  c.mesh.update(**mesh)
  if c.task == "lm":
    c.data.update(name="stdlib", path="")  # the corpus is not shipped; validation reads it
  else:
    # One batch per split: validation checks that each split fills one.
    latents = np.zeros((c.train.batch_size, 32, 32, 4), np.float16)
    for split in ("train", "val"):
      image_data.write_arrayrecord(str(tmp_path), split, latents, np.arange(len(latents)),
                                   num_classes=1000)
    c.data.path = str(tmp_path)
  plan = validate.validate(c, num_devices=devices, process_count=devices // 8)
  sizes = plan.mesh
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  rules = sharding.rules_from_config(c.parallel)
  model, _, _ = models.build(c, mesh)
  task = tasks.get(c)
  tx, _ = optimizer.make(c.opt, c.train.steps)
  example = task.example_batch(c.train.batch_size)
  with nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: state_lib.create(model, tx, task.init_args(example), c.seed))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract.params)))
  per_device = sharding.bytes_per_device(abstract, sizes, rules)
  # float32 parameters + AdamW mu and nu = 12 bytes per parameter, split over the FSDP axis
  # (the small replicated norms add a little), and a quarter of the chip at most: the rest is
  # for gradients, activations and XLA's buffers.
  fsdp = sizes["fsdp"]
  assert 12 * params / fsdp <= per_device < 1.05 * 12 * params / fsdp + 2**20
  assert per_device < flops.HBM_BYTES[chip] / 4, (per_device / 2**30, chip)
  print(f"{name} on {devices} x {chip} {sizes}: {params:,} params, "
        f"{per_device / 2**30:.2f} GiB of state per chip")
