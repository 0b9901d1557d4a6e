"""train/optimizer.py: schedule shape, weight-decay mask, clipping, field ranges; and the train
step's guard against non-finite new state (train/steps.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lm
from train import optimizer, steps
from train.state import TrainState


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


def _one_step_twice(tx, lr, start: float, loss):
  """Two train steps from a one-parameter state; returns (state, [state1, state2], [metrics])."""
  params = {"w": {"kernel": jnp.full((1,), start, jnp.float32)}}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  step = jax.jit(steps.make_train_step(lambda p, batch, rng: (loss(p["w"]["kernel"]), {}), tx, lr))
  first, m1 = step(state, {})
  second, m2 = step(first, {})
  return state, [first, second], [m1, m2]


def _assert_skipped(state, new_states, metrics):
  for n, (new, m) in enumerate(zip(new_states, metrics), 1):
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(m["bad_steps"]) == n and int(m["skipped_steps"]) == n
    assert int(new.step) == n
    # Nothing non-finite reached the state: the parameters and optimizer state are the old ones.
    for got, old in zip(jax.tree.leaves((new.params, new.opt_state.inner_state)),
                        jax.tree.leaves((state.params, state.opt_state.inner_state))):
      np.testing.assert_array_equal(got, old)


def test_step_whose_new_parameters_overflow_is_skipped_and_counted():
  # A finite (if absurd) learning rate: finite loss and gradient, an update past float32's range.
  opt = lm.get_config("size=test").opt
  opt.update(lr=2e38, warmup_steps=0, final_lr_frac=1.0, weight_decay=0.0)
  tx, lr = optimizer.make(opt, total_steps=10)
  _assert_skipped(*_one_step_twice(tx, lr, 2e38, lambda w: -jnp.sum(w)))


# The accumulator as a scalar; as a tree mirroring the parameters, leaf for leaf (as Adam's moments:
# checked together with the new parameter); mirroring them with another shape (a factored moment).
ACCUMULATORS = {"scalar": lambda params: jnp.full((), 1e10, jnp.float32),
                "like_params": lambda params: jax.tree.map(lambda p: jnp.full_like(p, 1e10), params),
                "other_shape": lambda params: jax.tree.map(lambda p: jnp.full(p.shape + (2,), 1e10),
                                                          params)}


@pytest.mark.parametrize("accumulator", list(ACCUMULATORS))
def test_step_whose_new_optimizer_state_overflows_is_skipped_and_counted(accumulator):
  # Finite gradients and zero updates, but an accumulator in the optimizer state overflows.
  def update(grads, acc, params=None):
    return jax.tree.map(jnp.zeros_like, grads), jax.tree.map(lambda a: a * 1e30, acc)

  inner = optax.GradientTransformation(ACCUMULATORS[accumulator], update)
  tx = optimizer.skip_nonfinite(inner)
  _assert_skipped(*_one_step_twice(tx, optax.constant_schedule(1.0), 1.0, jnp.sum))


def test_skip_nonfinite_keeps_optax_apply_if_finite_state_and_rejects_without_params():
  # The state is optax.apply_if_finite's, leaf for leaf: checkpoints written before this guard
  # (or by a run using optax's) restore into it.
  inner = optax.adam(0.1)
  params = {"w": jnp.ones(3)}
  ours, theirs = optimizer.skip_nonfinite(inner).init(params), optax.apply_if_finite(
      inner, max_consecutive_errors=2**30).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  # A NaN gradient (no params given): zero updates, Adam's moments kept, counted.
  tx = optimizer.skip_nonfinite(inner)
  bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
  updates, state = jax.jit(tx.update)(bad, ours)
  np.testing.assert_array_equal(updates["w"], np.zeros(3))
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, ours.inner_state)
  assert (int(state.notfinite_count), int(state.total_notfinite), bool(state.last_finite)) == (
      1, 1, False)
  # Then a finite one: applied, the consecutive count resets, the total stays.
  updates, state = jax.jit(tx.update)({"w": jnp.ones(3)}, state)
  assert np.all(np.asarray(updates["w"]) < 0)
  assert (int(state.notfinite_count), int(state.total_notfinite), bool(state.last_finite)) == (
      0, 1, True)
