"""A train step on packed native-size ViT rows (data.native_size=True) sharded over
data=2 x fsdp=2 x tensor=2, and over data=2 x seq=4 with Ulysses and ring attention, equals the
single-device step: loss and gradients. Packed rows shard over the data axes
like images."""


import functools

import jax
import numpy as np
import pytest

from configs import diffusion, vit
from parallel import mesh as parallel_mesh
from tests.parallel.step_parity import assert_matches_reference, axes
from tests.train.test_image_packing import make_folder
from train import image_data
from train import program as program_lib
from train import models
from train.validate import validate

B = 8  # packed rows per batch


def config(root, sizes, kind="vit", grad_accum=1, **parallel):
  if kind == "vit":
    c = vit.get_config("variant=digits")
    c.model.update(image_size=32, channels=3, patch_size=4, posemb="factorized", num_classes=3)
  else:  # pixel-space DiT on the same folder, learned variance (the hybrid DDPM loss)
    c = diffusion.get_config("model=dit,variant=digits")
    c.model.update(input_size=32, in_channels=3, patch_size=4, num_classes=3)
  c.data.update(name="folder", path=root, native_size=True, max_size=32, seq_len=128,
                max_images=8, val_fraction=0.2)
  c.train.update(batch_size=B, steps=10, grad_accum=grad_accum)
  c.eval.update(batch_size=B)
  c.mesh.update(**sizes)
  c.parallel.update(**parallel)
  return c


def build(root, sizes, devices, kind="vit", grad_accum=1, **parallel):
  c = config(root, sizes, kind, grad_accum, **parallel)
  mesh = parallel_mesh.make_mesh(c.mesh, devices)
  return program_lib.build(c, validate(c, num_devices=mesh.devices.size), mesh=mesh)


def one_step(root, sizes, devices, kind="vit", grad_accum=1, **parallel):
  program = build(root, sizes, devices, kind, grad_accum, **parallel)
  src = image_data.packed_source(program.config.data, "train", program.plan.model_cfg, seed=0)
  rows = [src[i] for i in range(B)]
  batch = program.eval_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  # One launch at a time: queued sharded launches can deadlock XLA:CPU (train/decoding.py), so
  # every launch here is waited for before the next. Every mesh starts from the single-device
  # initial state (test_family_parity tests the sharded initialisation's numbers).
  state = jax.block_until_ready(jax.device_put(initial_state(root, kind),
                                               program.state_shardings))
  # The zero-initialised head would leave every body gradient zero: perturb every parameter
  # alike in both runs (same numbers, kept in the state's shardings).
  rng = np.random.default_rng(0)
  noise = jax.tree.map(lambda p: 0.1 * rng.standard_normal(p.shape).astype(p.dtype),
                       jax.device_get(state.params))
  with program.context():
    params = jax.jit(lambda p, n: jax.tree.map(lambda a, b: a + b, p, n),
                     out_shardings=program.state_shardings.params)(state.params, noise)
  state = jax.block_until_ready(state.replace(params=params))
  init_params = jax.device_get(state.params)
  # The step's loss and gradients (the update is the same for every mesh: step_parity.run_one_step).
  with program.context():
    step = jax.jit(program.step_gradients, in_shardings=(program.state_shardings,
                                                         program.batch_shardings))
    loss, _, grads = jax.block_until_ready(step(state, batch))
  return dict(loss=float(loss), step_loss=float(loss), grads=grads, init_params=init_params,
              new_state=None)


MESHES = {"data2_fsdp2_tensor2": (axes(data=2, fsdp=2, tensor=2), {}),
          "data2_seq4_ulysses": (axes(data=2, seq=4), dict(seq_strategy="ulysses")),
          "data2_seq4_ring": (axes(data=2, seq=4), dict(seq_strategy="ring"))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("images"))


@functools.lru_cache(maxsize=None)
def initial_state(root, kind):
  """The single-device initial state of ``kind`` on the host: one initialisation compile."""
  return jax.device_get(build(root, axes(), jax.devices()[:1], kind).init())


@functools.lru_cache(maxsize=None)
def reference(root, kind="vit"):
  return one_step(root, axes(), jax.devices()[:1], kind)


def test_packed_dit_step_sharded_equals_single_device(folder):
  """DiT on packed rows (data.native_size=True, the diffusion task's packed DDPM loss with
  learned variance): data=2 x fsdp=2 x tensor=2 equals one device."""
  ref = reference(folder, "dit")
  got = one_step(folder, axes(data=2, fsdp=2, tensor=2), None, "dit")
  print(f"dit: loss {ref['loss']:.6f} vs {got['loss']:.6f}")
  assert np.isfinite(ref["loss"]) and ref["loss"] > 0
  assert_matches_reference(got, ref)


@pytest.mark.parametrize("name", list(MESHES))
def test_packed_step_sharded_equals_single_device(folder, name):
  """The packed rows' segment ids travel with their tokens through Ulysses' all-to-all and
  the ring's key/value blocks, so attention stays within each image on every mesh."""
  sizes, parallel = MESHES[name]
  ref, got = reference(folder), one_step(folder, sizes, None, **parallel)
  print(f"{name}: loss {ref['loss']:.6f} vs {got['loss']:.6f}")
  assert np.isfinite(ref["loss"]) and ref["loss"] > 0
  assert_matches_reference(got, ref)


def test_packed_grad_accum_weighs_micro_batches_by_their_images(folder):
  """Two micro-batches of packed rows hold different numbers of images; weighted by those
  counts, their averaged gradients equal the whole batch's (the loss is a mean over images)."""
  c = config(folder, axes())
  src = image_data.packed_source(c.data, "train", models.model_config(c), seed=c.seed)
  counts = [sum(len(src.rows[r]) for r in range(a, B, 2)) for a in (0, 1)]  # rows a, a+2, ...
  assert counts[0] != counts[1], counts  # else equal weights would pass too
  ref = reference(folder)
  got = one_step(folder, axes(), jax.devices()[:1], grad_accum=2)
  assert_matches_reference(got, ref)
