"""Packed native-resolution ViT (NaViT, nets/vit.py): the logits of several images of different
shapes packed into rows, with padding at the end of each row, equal each image run alone, for
every position embedding; a square image of model.image_size gives the fixed-size path's logits.

Every parameter is drawn at random (no zero-initialised head hides the body), float32.
Run with ``-s`` to see the largest difference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import layers, vit
from train import image_packing

P = 2  # patch size
# (height, width) in pixels: square, tall, wide, tiny, and the full 8x8 grid; >= 3 shapes.
SHAPES = ((8, 8), (4, 8), (6, 2), (2, 2), (2, 6), (8, 4))
SEQ, K = 28, 4  # tokens and image slots per row: [16, 8, (pad 4)] and [3, 1, 3, 8, (pad 13)]
ROWS = ((0, 1), (2, 3, 4, 5))


def cfg(posemb):
  return vit.Config.from_config(dict(
      name="vit", image_size=8, channels=3, num_classes=5, patch_size=P, width=16, depth=2,
      mlp_dim=32, num_heads=2, pool="gap", posemb=posemb))


def images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.uniform(-1, 1, (h, w, 3)).astype(np.float32) for h, w in SHAPES]


def packed(rows, imgs, seq_len=SEQ, slots=K):
  out = [image_packing.assemble([imgs[i] for i in row], list(row), seq_len, slots, P, 3)
         for row in rows]
  return {k: jnp.asarray(np.stack([o[k] for o in out])) for k in out[0]}


def random_params(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), params)


def apply(model, params, batch):
  return model.apply({"params": params}, batch["patches"], segment_ids_BxS=batch["segment_ids"],
                     positions_BxSx2=batch["positions"], num_images=batch["labels"].shape[1])


@pytest.mark.parametrize("posemb", vit.POSEMBS)
def test_packed_logits_equal_each_image_alone(posemb):
  c = cfg(posemb)
  model = vit.Model(c)
  imgs = images()
  batch = packed(ROWS, imgs)
  assert (np.asarray(batch["segment_ids"])[:, -4:] == 0).all()  # padding ends every row
  params = random_params(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])
  logits_BxKxC = jax.jit(lambda p, b: apply(model, p, b))(params, batch)
  assert logits_BxKxC.shape == (2, K, 5)
  worst = 0.0
  for r, row in enumerate(ROWS):
    for k, i in enumerate(row):
      n = (SHAPES[i][0] // P) * (SHAPES[i][1] // P)
      alone = apply(model, params, packed([(i,)], imgs, seq_len=n, slots=1))[0, 0]
      worst = max(worst, float(jnp.max(jnp.abs(logits_BxKxC[r, k] - alone))))
  print(f"{posemb}: max |packed - alone| = {worst:.2e}")
  assert worst < 1e-5, worst
  # The 8x8 image is the fixed-size path's special case.
  fixed = model.apply({"params": params}, jnp.asarray(imgs[0])[None])
  np.testing.assert_allclose(logits_BxKxC[0, 0], fixed[0], atol=1e-5, rtol=0)


def test_packed_patches_are_the_fixed_paths_patches():
  image = images()[1]
  row = image_packing.assemble([image], [0], 8, 1, P, 3)
  np.testing.assert_array_equal(row["patches"], layers.patchify(image[None], P)[0])
  np.testing.assert_array_equal(row["positions"][:, 0], np.repeat(np.arange(2), 4))


def test_factorized_and_learned_tables_are_parameters_of_the_counted_size():
  for posemb in vit.POSEMBS:
    c = cfg(posemb)
    params = vit.Model(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == vit.num_params(c), posemb


def test_packed_input_needs_mean_pooling():
  c = cfg("factorized").__class__.from_config(dict(
      name="vit", image_size=8, channels=3, num_classes=5, patch_size=P, width=16, depth=1,
      mlp_dim=32, num_heads=2, pool="token", posemb="factorized"))
  batch = packed([(0,)], images(), seq_len=16, slots=1)
  with pytest.raises(ValueError, match="pool='gap'"):
    vit.Model(c).init(jax.random.PRNGKey(0), batch["patches"], False, batch["segment_ids"],
                      batch["positions"], 1)
