"""The train state: parameters, their EMA, optimizer state, step and PRNG key, as one pytree."""

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
  # The exponential moving average of ``params`` (train.ema), boxed and sharded like them; None
  # when train.ema.decay is 0, so a run without EMA holds and checkpoints nothing for it.
  ema_params: Any = None
  # A task's state outside the gradient (train/tasks/vqvae.py: each code's running usage),
  # replicated; None for the tasks without one, whose checkpoints then hold nothing for it.
  task_state: Any = None


def create(model, tx: optax.GradientTransformation, example_inputs: tuple, seed: int, *,
           ema: bool = False, task_state: Any = None) -> TrainState:
  """A fresh state; parameters stay boxed (logically named) so their shardings can be read off.
  With ``ema`` the EMA starts as a copy of the initial parameters, with the same logical names.
  ``task_state`` is the task's initial non-gradient state (None: none)."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_rng, *example_inputs)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, ema_params=params if ema else None, task_state=task_state)


def with_ema_of(state: TrainState, params) -> TrainState:
  """``state`` with ``params`` as both the parameters and a fresh EMA (when it holds one): the
  start of a fine-tune (init.from). The EMA gets its own buffers, as the step donates both."""
  ema = None if state.ema_params is None else jax.tree.map(lambda x: x.copy(), params)
  return state.replace(params=params, ema_params=ema)
