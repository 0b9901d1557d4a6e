"""train/optimizer.py: schedule shape, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import lm
from train import optimizer


def test_warmup_then_cosine_to_final_fraction():
  opt = lm.get_config("size=test").opt
  opt.update(lr=1e-3, warmup_steps=10, final_lr_frac=0.1)
  lr = optimizer.schedule(opt, total_steps=100)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
  assert float(lr(5)) < float(lr(10)) and float(lr(50)) < float(lr(10))


def test_decay_mask_skips_norms_biases_and_optionally_embeddings():
  params = {"embed": {"embedding": 1}, "layers": {"q": {"kernel": 1}, "attn_norm": {"scale": 1}},
            "head": {"bias": 1}}
  mask = optimizer.decay_mask(params, decay_embeddings=False)
  assert mask == {"embed": {"embedding": False}, "layers": {"q": {"kernel": True},
                  "attn_norm": {"scale": False}}, "head": {"bias": False}}
  assert optimizer.decay_mask(params, decay_embeddings=True)["embed"]["embedding"] is True


def test_weight_decay_applies_only_where_masked_in_and_grads_are_clipped():
  opt = lm.get_config("size=test").opt
  opt.update(lr=1.0, warmup_steps=0, weight_decay=0.5, clip_norm=1.0, final_lr_frac=1.0)
  tx, _ = optimizer.make(opt, total_steps=10)
  params = {"w": {"kernel": jnp.ones(3)}, "n": {"scale": jnp.ones(3)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"]["kernel"], -0.5 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(updates["n"]["scale"], np.zeros(3))
  clip = optax.clip_by_global_norm(1.0)
  big = {"g": jnp.full(4, 10.0)}
  clipped, _ = clip.update(big, clip.init(big))
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
