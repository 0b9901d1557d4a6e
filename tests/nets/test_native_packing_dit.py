"""Packed native-size DiT (nets/dit.py, model side): the per-token outputs of latents of six
shapes packed into two padded rows, each with its own timestep and label, equal each latent run
alone; the square input_size latent equals the fixed-size path. Random parameters (no
zero-initialised modulation or final layer hides the body), float32; ``-s`` prints the figure."""

import jax
import jax.numpy as jnp
import numpy as np

from nets import dit, layers
from tests.nets.test_native_packing import ROWS, SHAPES, random_params
from train import image_packing

P, C, SEQ, K = 2, 2, 28, 4


def cfg():
  return dit.Config.from_config(dict(name="dit", input_size=8, in_channels=C, num_classes=5,
                                     patch_size=P, hidden_size=16, depth=2, num_heads=2))


def latents(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((h, w, C)).astype(np.float32) for h, w in SHAPES]


def packed(rows, xs, seq_len=SEQ, slots=K):
  out = [image_packing.assemble([xs[i] for i in row], list(row), seq_len, slots, P, C)
         for row in rows]
  return {k: jnp.asarray(np.stack([o[k] for o in out])) for k in out[0]}


def test_packed_dit_equals_each_latent_alone():
  c = cfg()
  model = dit.Model(c)
  xs = latents()
  t_all = np.linspace(10, 900, len(SHAPES)).astype(np.float32)
  y_all = np.arange(len(SHAPES)) % c.num_classes
  apply = lambda params, b, t, y: model.apply(
      {"params": params}, b["patches"], jnp.asarray(t), jnp.asarray(y, jnp.int32),
      segment_ids_BxS=b["segment_ids"], positions_BxSx2=b["positions"])
  fixed_x = jnp.asarray(xs[0])[None]
  params = random_params(model.init(jax.random.PRNGKey(0), fixed_x, jnp.zeros((1,)),
                                    jnp.zeros((1,), jnp.int32))["params"])
  batch = packed(ROWS, xs)
  slot = lambda key: np.stack([np.pad(key[list(r)], (0, K - len(r))) for r in ROWS])
  out_BxSxP = jax.jit(apply)(params, batch, slot(t_all), slot(y_all))
  assert out_BxSxP.shape == (2, SEQ, P * P * 2 * C)
  worst = 0.0
  for r, row in enumerate(ROWS):
    seg = np.asarray(batch["segment_ids"][r])
    for k, i in enumerate(row):
      n = (SHAPES[i][0] // P) * (SHAPES[i][1] // P)
      alone = apply(params, packed([(i,)], xs, seq_len=n, slots=1), t_all[i:i + 1][None],
                    y_all[i:i + 1][None])[0]
      worst = max(worst, float(jnp.max(jnp.abs(out_BxSxP[r][seg == k + 1] - alone))))
  print(f"dit: max |packed - alone| = {worst:.2e}")
  assert worst < 1e-5, worst
  fixed = model.apply({"params": params}, fixed_x, jnp.asarray(t_all[:1]),
                      jnp.asarray(y_all[:1], jnp.int32))
  np.testing.assert_allclose(out_BxSxP[0][:16], layers.patchify(fixed, P)[0], atol=1e-5, rtol=0)
