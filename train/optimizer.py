"""optax AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask,
wrapped in ``skip_nonfinite`` so no non-finite gradient, parameter or optimizer-state value ever
reaches the train state."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Leaf names of parameters that never take weight decay (norm scales, biases).
NO_DECAY = ("scale", "bias")

NAMES = ("adamw",)  # supported values of config.opt.name

# config.opt's numeric fields: (low, high, interval as written in the message, what it is).
# Every one must also be finite: a NaN or infinite setting trains NaN parameters.
RANGES = {
    "lr": (0.0, math.inf, "[0, inf)", "the peak learning rate"),
    "final_lr_frac": (0.0, 1.0, "[0, 1]", "the final learning rate as a fraction of opt.lr"),
    "b1": (0.0, 1.0, "[0, 1)", "Adam's first-moment decay"),
    "b2": (0.0, 1.0, "[0, 1)", "Adam's second-moment decay"),
    "eps": (0.0, math.inf, "(0, inf)", "Adam's denominator epsilon"),
    "weight_decay": (0.0, math.inf, "[0, inf)", "the decoupled weight decay"),
    "clip_norm": (0.0, math.inf, "(0, inf)", "the global gradient-norm clip"),
}
FIELDS = ("name", "warmup_steps", "decay_embeddings", *RANGES)


def check(opt_cfg) -> None:
  """Raises ValueError with one sentence for the first field of ``config.opt`` out of range."""
  unknown = sorted(set(opt_cfg) - set(FIELDS))
  if unknown:
    raise ValueError(f"config.opt has unknown field(s) {unknown}; its fields are {sorted(FIELDS)}.")
  missing = [f for f in FIELDS if f not in opt_cfg]
  if missing:
    raise ValueError(f"config.opt is missing the field(s) {missing}; see configs/base.py.")
  if opt_cfg.name not in NAMES:
    raise ValueError(f"config.opt.name={opt_cfg.name!r} is not a supported optimizer; "
                     f"supported: {list(NAMES)}.")
  for field, (low, high, interval, what) in RANGES.items():
    value = opt_cfg[field]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and _inside(value, low, high, interval)):
      raise ValueError(f"config.opt.{field}={value!r} must be a finite number in {interval} "
                       f"({what}).")
  steps = opt_cfg.warmup_steps
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"config.opt.warmup_steps={steps!r} must be an integer >= 0 (steps of linear "
                     "warmup from 0 to opt.lr).")
  if not isinstance(opt_cfg.decay_embeddings, bool):
    raise ValueError(f"config.opt.decay_embeddings={opt_cfg.decay_embeddings!r} must be True or "
                     "False.")


def _inside(value, low, high, interval: str) -> bool:
  """Whether ``value`` lies in ``interval``, whose brackets say which ends are included."""
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[-1] == "]" else value < high
  return above and below


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate: 0 -> opt.lr over opt.warmup_steps, then cosine to opt.lr * opt.final_lr_frac."""
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.final_lr_frac)


def decay_mask(params, decay_embeddings: bool):
  """True where weight decay applies: not norms/biases, embeddings only if configured."""
  def leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""

  def decays(path, _):
    name = leaf_name(path)
    return name not in NO_DECAY and (decay_embeddings or name != "embedding")

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map_with_path(decays, params, is_leaf=is_box)


def make(opt_cfg, total_steps: int, frozen=None):
  """Returns (tx, lr_schedule).

  ``frozen``: None, or a function params -> bool tree (e.g. train.text_encoders.frozen_mask)
  marking parameters the optimizer must never change: they get zero updates, no Adam moments and
  no weight decay, and the gradient clip sees only the others.

  The outer ``skip_nonfinite`` rejects (zero update, optimizer state kept) every step whose
  gradients, new parameters or new optimizer state are not finite and counts them in its state
  (``notfinite_count`` consecutive, ``total_notfinite`` in all), which is checkpointed with the
  rest; the loop stops the run at ``train.max_bad_steps`` consecutive rejections.
  """
  check(opt_cfg)
  lr = schedule(opt_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm),
      optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay,
                  mask=lambda p: decay_mask(p, opt_cfg.decay_embeddings)))
  if frozen is not None:
    labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "trained", frozen(p))
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return skip_nonfinite(tx), lr


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner``, whose update is rejected (zero updates, ``inner``'s state kept) when it would let a
  non-finite value into the train state: a non-finite gradient (seen as a non-finite global norm,
  which also rejects finite gradients whose squares overflow float32), or, given ``params``, a
  non-finite new parameter ``params + updates`` or new ``inner`` state value (finite gradients can
  still overflow: an absurd learning rate, a second moment past float32's range). Rejections are
  counted in the state, an ``optax.ApplyIfFiniteState`` (as ``optax.apply_if_finite`` keeps it,
  so checkpoints of either read alike): ``notfinite_count`` in a row, ``total_notfinite`` in all,
  ``last_finite`` for the last update. Unlike ``optax.apply_if_finite`` it never gives up and
  accepts, and it checks the result of the update, not only the gradients.

  Compile time (XLA:CPU, measured on the digits autoencoder's and U-DiT's train steps): the inner
  update runs unconditionally (no ``lax.cond``, whose branches copy the whole state), and its
  results are materialised before the per-leaf checks read them (the first barrier): fused, every
  check recomputes the leaf's whole Adam update and the step compiles in up to 4x the time. The
  rejection zeroes the updates rather than selecting old parameters, so the caller still updates
  the parameters in place (no second copy of them at the peak)."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(grads, state, params=None, **extra_args):
    updates, new_inner = inner.update(grads, state.inner_state, params, **extra_args)
    updates, new_inner = jax.lax.optimization_barrier((updates, new_inner))
    checks = [jnp.isfinite(optax.tree.norm(grads)), *_finite_flags(params, updates, new_inner)]
    finite = jnp.all(jnp.stack(checks))
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    # The second barrier keeps XLA from fusing the inner update's arithmetic into the state's
    # select: fused, XLA:CPU compiles a conv model's step (the KL autoencoder's) several times
    # slower, and runs it slower.
    new_inner, finite = jax.lax.optimization_barrier((new_inner, finite))
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner,
                               state.inner_state)
    count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
    total = jnp.where(finite, state.total_notfinite,
                      optax.safe_increment(state.total_notfinite))
    return updates, optax.ApplyIfFiniteState(notfinite_count=count, last_finite=finite,
                                             total_notfinite=total, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _finite_flags(params, updates, state) -> list:
  """Scalar all-finite flags that together cover every new parameter ``params + updates`` (when
  ``params`` is given) and every inexact leaf of the new optimizer ``state``.

  One flag (one reduction) per parameter leaf covers its new value and the state leaves of the
  same shape at its place in each state subtree that mirrors the parameter tree (Adam's ``mu``
  and ``nu``): they share the parameter's sharding, so combining them moves no data, and XLA
  compiles one reduction instead of three (the U-DiT and VQ-VAE train steps compile seconds
  faster). Any other state leaf gets a flag of its own."""
  inexact = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  template = jax.tree.leaves(updates)
  treedef = jax.tree.structure(updates)
  groups = [[] for _ in template]
  if params is not None:
    for i, (p, u) in enumerate(zip(jax.tree.leaves(params), template)):
      if inexact(p):
        groups[i].append(p + u.astype(p.dtype))
  rest = []
  mirrors = lambda x: jax.tree.structure(x) == treedef
  for sub in jax.tree.leaves(state, is_leaf=mirrors):
    if not mirrors(sub):  # a leaf of a subtree that does not mirror the parameters
      if inexact(sub):
        rest.append(sub)
      continue
    for i, (x, t) in enumerate(zip(jax.tree.leaves(sub), template)):
      if inexact(x):
        (groups[i] if jnp.shape(x) == jnp.shape(t) else rest).append(x)
  flags = [jnp.all(functools.reduce(jnp.logical_and, map(jnp.isfinite, g))) for g in groups if g]
  return flags + [jnp.all(jnp.isfinite(x)) for x in rest]
