"""nets/megabyte.py: causality across patch boundaries, parameter count, sharding, validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import megabyte
from tests.nets import assert_causal_by_jacobian
from tests.nets.test_mamba import assert_same_loss_and_grads, sharded_and_reference

B, S = 4, 16  # B = data × fsdp of the test mesh


def make_cfg(**kw):
  """Three stages: global Transformer over 4-byte tokens, Mamba over 2-byte pairs, Transformer
  over bytes; every size divides the test mesh axes."""
  base = dict(vocab_size=32, patch_sizes=(2, 2), d_model=(32, 16, 16), num_layers=(1, 1, 1),
              num_heads=(2, 2, 2), mlp_dim=(32, 32, 32),
              blocks=("transformer", "mamba", "transformer"), d_state=4, tie_embeddings=True)
  return megabyte.Config(**{**base, **kw})


def test_sharded_loss_and_gradients_equal_single_device():
  """Global Transformer, local Mamba; random parameters placed in their shardings."""
  cfg = make_cfg(patch_sizes=(4,), d_model=(32, 16), num_layers=(1, 1), num_heads=(2, 2),
                 mlp_dim=(32, 32), blocks=("transformer", "mamba"))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, S + 1), 0, 32)
  run = sharded_and_reference(megabyte.Model(cfg), megabyte.Model(cfg), tokens, host_init=True)
  P = jax.sharding.PartitionSpec
  assert run["specs"]["stage_0"]["q"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert run["specs"]["stage_1"]["in_proj"]["kernel"] == P(None, "fsdp", None, "tensor")
  assert run["specs"]["embed_1"]["embedding"] == P("tensor", "fsdp")
  assert "lm_head" not in run["specs"]  # tied to the last stage's byte table
  assert_same_loss_and_grads(run)


def test_causal_by_gradient_across_patch_boundaries():
  """d logits[t] / d byte-embedding[t'] is exactly zero for t' > t and non-zero for t' <= t.

  Three stages (Transformer over 4-byte tokens, Mamba over 2-byte pairs, Transformer over
  bytes), S = 16. The same offset is added to byte t's embedding in every stage's table, so the
  Jacobian sums the paths through all stages. Random parameters: causality holds for any.
  """
  cfg = make_cfg()
  model = megabyte.Model(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, S), 0, 32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0.0, 0.3, a.shape).astype(a.dtype), nn.unbox(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]))

  assert_causal_by_jacobian(model, params, tokens, cfg.d_model[-1])


@pytest.mark.parametrize("kw", [
    dict(patch_sizes=(8,), d_model=(32, 16), num_layers=(2, 1), num_heads=(4, 2),
         mlp_dim=(48, 32), blocks=(), tie_embeddings=False),  # classic two-stage MEGABYTE
    dict(),  # three stages, Mamba in the middle, tied head
    dict(patch_sizes=(4,), d_model=(24, 16), num_layers=(2, 3), num_heads=(0, 2),
         mlp_dim=(0, 32), blocks=("mamba", "transformer"), dt_rank=2, expand=3),
])
def test_param_count_matches_formula_and_logits_shape(kw):
  cfg = make_cfg(**kw)
  model = megabyte.Model(cfg)
  tokens = jnp.zeros((2, 2 * cfg.group_sizes[0]), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  assert sum(x.value.size for x in leaves) == megabyte.num_params(cfg)
  logits = jax.eval_shape(model.apply, {"params": nn.unbox(boxed)}, tokens)
  assert logits.shape == tokens.shape + (cfg.vocab_size,) and logits.dtype == jnp.float32


def test_sequence_length_must_divide_into_global_tokens():
  model = megabyte.Model(make_cfg())
  with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 4, the product "
                                       r"of model.patch_sizes=\(2, 2\)"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32))


# Segment ids (packed documents) are taken since issue 18.4: tests/nets/test_packing.py.


@pytest.mark.parametrize("bad, message", [
    (dict(patch_sizes=()), "must be a non-empty tuple of positive sizes"),
    (dict(d_model=(32, 16)), r"model.d_model=\(32, 16\) must be a tuple of 3 entries"),
    (dict(num_layers=2), "model.num_layers=2 must be a tuple of 3 entries, one per stage"),
    (dict(blocks=("transformer", "rnn", "mamba")), "model.blocks\\[1\\]='rnn' is not one of"),
    (dict(num_heads=(3, 2, 2)), "must be model.num_heads\\[0\\]=3 times an even head size"),
    (dict(num_layers=(1, 0, 1)), "model.num_layers\\[1\\]=0 must be positive"),
    (dict(d_state=0), "model.d_state=0 must be positive"),
    (dict(remat="sometimes"), "is not one of"),
])
def test_invalid_hyperparameters_raise_a_sentence(bad, message):
  with pytest.raises(ValueError, match=message):
    make_cfg(**bad).validate()


def test_from_config_takes_lists_and_rejects_unknown_fields():
  fields = dict(name="megabyte", vocab_size=32, patch_sizes=[4], d_model=[32, 16],
                num_layers=[1, 1], num_heads=[2, 2], mlp_dim=[32, 32], blocks=["mamba", "mamba"])
  cfg = megabyte.Config.from_config(ml_collections.ConfigDict(fields), remat="full")
  assert cfg.patch_sizes == (4,) and cfg.blocks == ("mamba", "mamba") and cfg.remat == "full"
  hash(cfg)  # flax modules need a hashable config
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_kv_heads'\]"):
    megabyte.Config.from_config(ml_collections.ConfigDict({**fields, "num_kv_heads": [1, 1]}))
