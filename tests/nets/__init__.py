"""Shared checks for the model-family tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nets import layers


def assert_causal_by_jacobian(model, params, tokens_1xS, width: int):
  """d logits[t] / d embedding[t'] is exactly zero for t' > t and non-zero for t' <= t.

  The same offset is added to token t's embedding in every ``layers.Embed`` table the model uses
  (MEGABYTE has one per stage; the bytes stay in sequence order in each), so the Jacobian sums
  every path from input t' to output t. Forward mode: the same Jacobian as jacrev, and quicker
  to compile.
  """
  S = tokens_1xS.shape[1]

  def logits_from(delta_SxE):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, layers.Embed) and context.method_name == "__call__":
        out = out + delta_SxE.reshape(out.shape)
      return out
    with nn.intercept_methods(interceptor):
      return model.apply({"params": params}, tokens_1xS)

  jac_SxSxE = jax.jit(jax.jacfwd(lambda d: logits_from(d)[0].sum(-1)))(jnp.zeros((S, width)))
  dep_SxS = np.abs(np.asarray(jac_SxSxE)).sum(-1)  # [output t, input t']
  future = np.triu(np.ones((S, S), bool), k=1)
  assert np.all(dep_SxS[future] == 0.0), f"outputs depend on future inputs:\n{dep_SxS}"
  assert np.all(dep_SxS[~future] > 0.0), f"outputs ignore part of their past:\n{dep_SxS}"
