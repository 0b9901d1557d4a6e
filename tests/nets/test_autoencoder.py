"""nets/autoencoder.py: shapes of the posterior and reconstruction, the KL against a float64
reference, and the posterior sample drawn from the "latent" rng."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import autoencoder


@pytest.fixture(scope="module")
def built():
  cfg = autoencoder.Config.from_config(ml_collections.ConfigDict(dict(
      name="autoencoder", variant="digits", block_out_channels=(16, 32), image_size=16)))
  model = autoencoder.Model(cfg)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return cfg, model, params, x


def test_shapes_and_parameter_count(built):
  cfg, model, params, x = built
  rec, mean, logvar = model.apply({"params": params}, x)
  assert rec.shape == x.shape and mean.shape == logvar.shape == (2, 8, 8, 4)
  assert cfg.downscale == 2 and cfg.max_len == 64
  assert autoencoder.num_params(cfg) == sum(a.size for a in jax.tree.leaves(params))
  z = model.apply({"params": params}, mean, method=model.decode)
  np.testing.assert_allclose(z, rec, atol=1e-6)  # the forward decodes the posterior mean


def test_kl_matches_a_float64_reference():
  rng = np.random.default_rng(1)
  mean, logvar = rng.standard_normal((3, 4, 4, 2)), rng.uniform(-3, 2, (3, 4, 4, 2))
  want = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  got = autoencoder.kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(autoencoder.kl(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))[0]) == 0.0


def test_posterior_sample_uses_the_latent_rng(built):
  _, model, params, x = built
  run = lambda seed: model.apply({"params": params}, x, sample_posterior=True,
                                 rngs={"latent": jax.random.PRNGKey(seed)})[0]
  mean_rec = model.apply({"params": params}, x)[0]
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1)) and not np.allclose(run(0), mean_rec)


def test_bad_hyperparameters_are_one_sentence():
  with pytest.raises(ValueError, match="not divisible by model.norm_num_groups"):
    autoencoder.Config.from_config(dict(name="autoencoder", variant="digits",
                                        block_out_channels=(12, 32)))
  with pytest.raises(ValueError, match="downsampling factor 4"):
    autoencoder.Config.from_config(dict(name="autoencoder", variant="digits", image_size=30))
