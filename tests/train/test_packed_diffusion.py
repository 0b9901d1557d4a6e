"""The packed diffusion losses (train/diffusion_process.py, data.native_size=True for DiT): on
square images one per row they equal the unpacked losses (DDPM with learned variance, and flow),
and rows of several images of six shapes with padding give the same loss as each image in a row
of its own (the same t and noise per image). Random DiT parameters, float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import dit, layers
from tests.nets.test_native_packing import ROWS, SHAPES, random_params
from train import diffusion_process as dp
from train import image_packing

P, C = 2, 2


@functools.lru_cache(maxsize=None)
def model_and_params(learn_sigma=True):
  cfg = dit.Config.from_config(dict(name="dit", input_size=8, in_channels=C, num_classes=5,
                                    patch_size=P, hidden_size=16, depth=2, num_heads=2,
                                    learn_sigma=learn_sigma))
  model = dit.Model(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, C)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))["params"]
  return model, random_params(params)


def fns(model, params):
  fixed = lambda x, t, y, rng=None: model.apply({"params": params}, x, t, y)
  def packed(batch):
    return lambda x, t, y, rng=None: model.apply(
        {"params": params}, x, t, y, segment_ids_BxS=batch["segment_ids"],
        positions_BxSx2=batch["positions"])
  return fixed, packed


def rows_of(rows, xs, seq_len, slots):
  out = [image_packing.assemble([xs[i] for i in row], list(row), seq_len, slots, P, C)
         for row in rows]
  return {k: jnp.asarray(np.stack([o[k] for o in out])) for k in out[0]}


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_one_square_image_per_row_equals_the_unpacked_loss(objective):
  model, params = model_and_params(learn_sigma=objective == "ddpm")
  fixed, packed = fns(model, params)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 8, 8, C)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  y = np.array([0, 3, 4], np.int32)
  batch = rows_of([(0,), (1,), (2,)], list(x0), 16, 1)
  args = (batch["patches"], batch["segment_ids"], batch["image_mask"], jnp.asarray(y)[:, None],
          jax.random.PRNGKey(1))
  packed_noise = layers.patchify(jnp.asarray(noise), P)
  if objective == "ddpm":
    schedule = dp.make_schedule("cosine", 1000)
    t = np.array([0, 10, 999], np.int32)  # t = 0 takes the decoder-likelihood branch
    want, want_m = dp.ddpm_loss(fixed, schedule, jnp.asarray(x0), jnp.asarray(y),
                                jax.random.PRNGKey(1), learn_sigma=True, t=jnp.asarray(t),
                                noise=jnp.asarray(noise))
    got, got_m = dp.packed_ddpm_loss(packed(batch), schedule, *args, channels=C,
                                     learn_sigma=True, t=jnp.asarray(t)[:, None],
                                     noise=packed_noise)
    np.testing.assert_allclose(got_m["vb"], want_m["vb"], rtol=1e-5)
  else:
    t = np.array([0.1, 0.5, 0.9], np.float32)
    want, _ = dp.flow_loss(fixed, jnp.asarray(x0), jnp.asarray(y), jax.random.PRNGKey(1),
                           t=jnp.asarray(t), noise=jnp.asarray(noise))
    got, _ = dp.packed_flow_loss(packed(batch), *args, t=jnp.asarray(t)[:, None],
                                 noise=packed_noise)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rows_of_mixed_shapes_equal_each_image_alone():
  model, params = model_and_params()
  _, packed = fns(model, params)
  rng = np.random.default_rng(2)
  xs = [rng.uniform(-1, 1, (h, w, C)).astype(np.float32) for h, w in SHAPES]
  noises = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
  t_all = np.array([5, 100, 0, 400, 800, 999], np.int32)
  y_all = np.arange(len(SHAPES)) % 5
  schedule = dp.make_schedule("cosine", 1000)

  def loss(rows, seq_len, slots):
    batch = rows_of(rows, xs, seq_len, slots)
    noise = rows_of(rows, noises, seq_len, slots)["patches"]
    slot = lambda v: jnp.asarray(np.stack([np.pad(v[list(r)], (0, slots - len(r)))
                                           for r in rows]))
    return dp.packed_ddpm_loss(packed(batch), schedule, batch["patches"], batch["segment_ids"],
                               batch["image_mask"], slot(y_all), jax.random.PRNGKey(0),
                               channels=C, learn_sigma=True, t=slot(t_all), noise=noise)[0]

  together = loss(ROWS, 28, 4)
  alone = loss([(i,) for i in range(len(SHAPES))], 16, 1)
  print(f"packed {float(together):.6f} vs one per row {float(alone):.6f}")
  np.testing.assert_allclose(together, alone, rtol=1e-5)
