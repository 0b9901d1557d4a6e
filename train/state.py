"""The train state: parameters, optimizer state, step and PRNG key, as one pytree."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of completed optimizer steps
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpoints hold plain arrays, not typed keys


def create(model, tx: optax.GradientTransformation, example_inputs: tuple, seed: int) -> TrainState:
  """A fresh state; parameters stay boxed (logically named) so their shardings can be read off."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_rng, *example_inputs)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)
