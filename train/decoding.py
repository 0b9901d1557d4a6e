"""Autoregressive sampling from a decoder LM: with a KV cache (llama) or the recurrent state
(mamba) where the family has one, otherwise by rerunning the whole buffer per token (MEGABYTE).

Cached decoding is one jitted prefill of the prompts' shortest common length, then one jitted
decode step per position, reused for every position and every row: the position is a traced
array in the step's state, so a whole generation compiles the step once. Rows whose prompt is
longer have their remaining prompt tokens forced by the step instead of sampled, so prompts of
different lengths share one batch and one cache, all rows at the same position.

Token choice (``choose``): temperature 0 is greedy; otherwise softmax(logits / temperature)
restricted to the top_k most likely tokens (0: all) and to the nucleus, the most likely tokens
whose probability before each reaches top_p (1: all), as Hugging Face applies them.
"""

from functools import partial

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np

from nets import registry
from train import watchdog

# The host waits for the device every _IN_FLIGHT decode steps (and then, with an end id, checks
# whether every row has ended). Waiting every step would serialise host and device; never waiting
# let hundreds of launches of the same sharded program queue up, and with them queued jaxlib
# 0.10's XLA:CPU deadlocked: a device that ran ahead into a later launch blocked a thread of the
# shared host pool in a collective of that launch, while the devices it waited for still needed a
# thread to finish the earlier one ("Termination timeout for all gather ... only 1 of them
# arrived", devices stuck in different collectives of one program). Training never queued more
# than two steps (the loop reads each step's bad-step count one step late), so only the sample
# hung. A bounded queue cures it on every jaxlib; each wait is also a beat for train/watchdog.py.
_IN_FLIGHT = 8


def has_cache(model) -> bool:
  """Whether ``model``'s family decodes with a cache (else the cache-free loop is used)."""
  return registry.of_model(model).decodes_with_cache


def choose(logits_BxV, rng, temperature, top_k, top_p):
  """Next token per row; every knob is a traced scalar, so changing one never recompiles."""
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  rank_V = jnp.arange(sorted_BxV.shape[-1])
  in_top_k_BxV = jnp.broadcast_to((top_k <= 0) | (rank_V < top_k), sorted_BxV.shape)
  sorted_BxV = jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  # Both masks keep a prefix of the sorted order, never empty (rank 0 has 0 mass before it), so
  # the kept set is everything at least as likely as its last member.
  keep_BxV = in_top_k_BxV & ((before_BxV < top_p) | (top_p >= 1.0))
  last_Bx1 = jnp.sum(keep_BxV, axis=-1, keepdims=True) - 1
  cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, last_Bx1, axis=-1)
  sampled_B = jax.random.categorical(
      rng, jnp.where(scaled_BxV >= cutoff_Bx1, scaled_BxV, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _allowed(logits_BxV, valid_vocab, end_id):
  """Logits with ids >= valid_vocab (a padded vocabulary's unused rows) made impossible, except
  the end id."""
  ids_V = jnp.arange(logits_BxV.shape[-1])
  return jnp.where((ids_V < valid_vocab) | (ids_V == end_id), logits_BxV, -jnp.inf)


@partial(jax.jit, static_argnames=("model", "length"))
def prefill(model, params, tokens_BxP, *, length: int):
  """(logits [B, V] for position P, cache holding positions 0..P-1) of a fresh cache of
  ``length`` positions."""
  cache = registry.of_model(model).init_cache(model.cfg, tokens_BxP.shape[0], length)
  logits_BxPxV, cache = model.apply({"params": params}, tokens_BxP, None, None, cache)
  return logits_BxPxV[:, -1], cache


@partial(jax.jit, static_argnames=("model", "layout"), donate_argnames="state")
def decode_step(model, params, state: dict, prompt_lens_B, limits_B, knobs: dict, layout=None):
  """Picks the token at position ``state["t"]`` (forced while inside the row's prompt, the pad
  once the row has ended) and feeds it, leaving the logits for the next position in ``state``.

  ``layout`` (the state's tree structure and the sharding of each leaf) pins the new state to the
  shardings of the old one, so the second call does not compile the step again."""
  t, B = state["t"], prompt_lens_B.shape[0]
  rng, step_rng = jax.random.split(state["rng"])
  logits_BxV = _allowed(state["logits"], knobs["valid_vocab"], knobs["end_id"])
  chosen_B = choose(logits_BxV, step_rng, knobs["temperature"], knobs["top_k"], knobs["top_p"])
  forced_B = t < prompt_lens_B
  prompt_B = jax.lax.dynamic_index_in_dim(state["tokens"], t, axis=1, keepdims=False)
  token_B = jnp.where(forced_B, prompt_B, chosen_B)
  token_B = jnp.where(state["done"], knobs["pad_id"], token_B).astype(state["tokens"].dtype)
  done_B = state["done"] | (t + 1 >= limits_B) | (~forced_B & (token_B == knobs["end_id"]))
  tokens_BxN = jax.lax.dynamic_update_slice(state["tokens"], token_B[:, None], (0, t))
  logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None],
                                    jnp.full((B, 1), t, jnp.int32), None, state["cache"])
  new = {"tokens": tokens_BxN, "cache": cache, "logits": logits_Bx1xV[:, 0], "t": t + 1,
         "rng": rng, "done": done_B}
  if layout is not None:
    treedef, shardings = layout
    new = jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, s)
                                       for x, s in zip(jax.tree.leaves(new), shardings)])
  return new


@partial(jax.jit, static_argnames=("model", "prompt_len", "end"))
def _sample_uncached(model, params, buf_BxN, rng, knobs, *, prompt_len: int, end: int):
  """The cache-free loop: every step reruns the model over the whole buffer (one compile)."""
  def body(t, carry):
    buf_BxN, rng = carry
    rng, step_rng = jax.random.split(rng)
    # Positions after t hold placeholders; the causal mask keeps them out of logits[:, t - 1].
    logits_BxV = model.apply({"params": params}, buf_BxN)[:, t - 1]
    logits_BxV = _allowed(logits_BxV, knobs["valid_vocab"], knobs["end_id"])
    token_B = choose(logits_BxV, step_rng, knobs["temperature"], knobs["top_k"], knobs["top_p"])
    return buf_BxN.at[:, t].set(token_B.astype(buf_BxN.dtype)), rng

  buf_BxN, _ = jax.lax.fori_loop(prompt_len, end, body, (buf_BxN, rng))
  return buf_BxN


def _gather(x) -> np.ndarray:
  return np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))


def check_knobs(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Raises one sentence for sampling settings that mean nothing."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding).")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps every token).")


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, valid_vocab: int | None = None,
             end_id: int | None = None, pad_id: int = 0, sharding=None) -> list[np.ndarray]:
  """Continues each prompt (a sequence of token ids, any lengths) by up to ``max_new_tokens``.

  Returns one int32 array of new ids per prompt, ending before ``end_id`` where one was sampled.
  ``valid_vocab``: only ids below it (and ``end_id``) are sampled (default: the whole vocabulary).
  ``sharding``: where the [rows, length] token buffer lives (the training mesh's batch sharding);
  the number of prompts must then split over its batch axes.
  """
  check_knobs(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  if sharding is not None:  # rows only: the buffer's length need not divide a seq axis
    sharding = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:1]))
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts or min(len(p) for p in prompts) < 1:
    raise ValueError("every prompt needs at least one token to continue from.")
  vocab = model.cfg.vocab_size
  knobs = {"temperature": np.float32(temperature), "top_k": np.int32(top_k),
           "top_p": np.float32(top_p), "valid_vocab": np.int32(valid_vocab or vocab),
           "end_id": np.int32(-1 if end_id is None else end_id), "pad_id": np.int32(pad_id)}
  lens_B = np.array([len(p) for p in prompts], np.int32)
  N = int(lens_B.max()) + max_new_tokens
  rng = jax.random.PRNGKey(seed)
  if has_cache(model):
    tokens_BxN = _decode(model, params, prompts, lens_B, N, max_new_tokens, rng, knobs, end_id,
                         pad_id, sharding)
  else:
    tokens_BxN = _uncached(model, params, prompts, max_new_tokens, rng, knobs, pad_id, sharding)
  outs = []
  for row_N, P in zip(tokens_BxN, lens_B):
    new = row_N[P:P + max_new_tokens]
    if end_id is not None and np.any(new == end_id):
      new = new[:int(np.argmax(new == end_id))]
    outs.append(new.astype(np.int32))
  return outs


def _decode(model, params, prompts, lens_B, N, max_new_tokens, rng, knobs, end_id, pad_id,
            sharding):
  """Cached decoding of all rows in lockstep; returns the [B, N] token buffer."""
  P = int(lens_B.min())
  buf_BxN = np.full((len(prompts), N), pad_id, np.int32)
  for row, prompt in zip(buf_BxN, prompts):
    row[:len(prompt)] = prompt
  buf_BxN = jax.device_put(buf_BxN, sharding) if sharding is not None else jnp.asarray(buf_BxN)
  logits_BxV, cache = prefill(model, params, buf_BxN[:, :P], length=N)
  jax.block_until_ready(logits_BxV)
  watchdog.beat()
  state = {"tokens": buf_BxN, "cache": cache, "logits": logits_BxV, "t": jnp.int32(P),
           "rng": rng, "done": jnp.zeros(len(prompts), bool)}
  layout = None
  if sharding is not None:  # every leaf committed to a sharding the step then keeps
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    state.update(t=jax.device_put(state["t"], replicated),
                 rng=jax.device_put(state["rng"], replicated),
                 done=jax.device_put(state["done"], sharding.update(
                     spec=jax.sharding.PartitionSpec(*sharding.spec[:1]))))
    leaves, treedef = jax.tree.flatten(state)
    layout = (treedef, tuple(x.sharding for x in leaves))
  limits_B = lens_B + max_new_tokens
  for i in range(N - P):
    state = decode_step(model, params, state, lens_B, limits_B, knobs, layout)
    if (i + 1) % _IN_FLIGHT == 0:  # see _IN_FLIGHT: never let the queue grow unbounded
      jax.block_until_ready(state)
      watchdog.beat()
      if end_id is not None and _gather(state["done"]).all():
        break
  return _gather(state["tokens"])


def _uncached(model, params, prompts, max_new_tokens, rng, knobs, pad_id, sharding):
  """The cache-free loop, one batch per distinct prompt; returns the [B, N] token buffer."""
  multiple = registry.of_model(model).length_multiple(model.cfg)  # MEGABYTE: whole patches
  out_BxN = np.full((len(prompts), max(map(len, prompts)) + max_new_tokens), pad_id, np.int32)
  groups = {}
  for b, prompt in enumerate(prompts):
    groups.setdefault(prompt.tobytes(), []).append(b)
  for g, rows in enumerate(groups.values()):
    prompt = prompts[rows[0]]
    end = len(prompt) + max_new_tokens
    buf = np.full((len(rows), -(-end // multiple) * multiple), pad_id, np.int32)
    buf[:, :len(prompt)] = prompt
    buf = jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf)
    out = _sample_uncached(model, params, buf, jax.random.fold_in(rng, g), knobs,
                           prompt_len=len(prompt), end=end)
    out_BxN[rows, :end] = _gather(out)[:, :end]
    watchdog.beat()
  return out_BxN


def sample(model, params, prompt_ids: np.ndarray, *, num_samples: int, max_new_tokens: int,
           temperature: float, seed: int, valid_vocab: int, pad_id: int,
           sharding=None, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
  """Returns [num_samples, prompt + max_new_tokens] token ids continuing ``prompt_ids`` (the LM
  task's end-of-run samples)."""
  prompt_ids = np.asarray(prompt_ids, np.int32)
  rows = generate(model, params, [prompt_ids] * num_samples, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  valid_vocab=valid_vocab, pad_id=pad_id, sharding=sharding)
  return np.stack([np.concatenate([prompt_ids, row]) for row in rows])
