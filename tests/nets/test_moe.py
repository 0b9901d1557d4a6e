"""nets/moe.py against dense references: every expert on every token, mixed by the gates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import moe

B, S, E, M = 4, 6, 16, 24


def make(layout=moe.Layout(), **fields):
  cfg = moe.Config(**{"num_experts": 4, "top_k": 2, **fields})
  cfg.validate()
  init = nn.initializers.normal(0.5)
  return moe.MoE(cfg, M, "float32", "float32", init, init, layout), cfg


def init_and_input(module, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, S, E))
  # jit: eager init would compile every small op of the dispatch on its own
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), x)["params"])
  return params, x


def np_mlp(x, w, activation, e=None):
  pick = (lambda n: np.asarray(w[n][e])) if e is not None else (lambda n: np.asarray(w[n]))
  if activation == "swiglu":
    g = x @ pick("gate")
    h = g / (1 + np.exp(-g)) * (x @ pick("up"))
  else:
    u = x @ pick("up")
    h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  return h @ pick("down")


def np_routing(params, x, cfg):
  """Gates [N, X] (zero where not chosen), chosen ids [N, k], probabilities [N, X], logits."""
  x = np.asarray(x, np.float64).reshape(-1, E)
  logits = x @ np.asarray(params["router"], np.float64)
  if cfg.router == "softmax":
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    probs = scores
  else:
    scores = 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
  idx = np.argsort(-scores, axis=-1, kind="stable")[:, :cfg.top_k]
  top = np.take_along_axis(scores, idx, -1)
  if cfg.normalize_gates or cfg.router == "sigmoid":
    top = top / top.sum(-1, keepdims=True)
  return top, idx, probs, logits


def np_keep(idx_NxK, cfg, capacity, groups_of_rows):
  """The capacity rule written as a loop: choice-major, token order, per dispatch group."""
  keep = np.zeros(idx_NxK.shape, bool)
  for rows in groups_of_rows:
    filled = np.zeros(cfg.num_experts, int)
    for k in range(cfg.top_k):
      for t in rows:
        e = idx_NxK[t, k]
        if filled[e] < capacity:
          keep[t, k] = True
          filled[e] += 1
  return keep


def dense_reference(params, x, cfg, keep=None):
  """Runs every expert on every token and mixes the outputs by the (kept) top-k gates."""
  xs = np.asarray(x, np.float64).reshape(-1, E)
  w = {n[len("experts_"):]: np.asarray(v, np.float64) for n, v in params.items()
       if n.startswith("experts_")}
  top, idx, _, _ = np_routing(params, x, cfg)
  if keep is not None:
    top = top * keep
  all_experts = np.stack([np_mlp(xs, w, cfg.activation, e) for e in range(cfg.num_experts)], 1)
  y = np.einsum("nk,nke->ne", top, np.take_along_axis(all_experts, idx[:, :, None], 1))
  if cfg.shared_experts:
    shared = {n[len("shared_"):]: np.asarray(v, np.float64) for n, v in params.items()
              if n.startswith("shared_")}
    y = y + np_mlp(xs, shared, cfg.activation)
  return y.reshape(B, S, E)


@pytest.mark.parametrize("fields,grads", [
    (dict(top_k=1), False), (dict(top_k=2), True), (dict(top_k=3, router="sigmoid"), False),
    (dict(top_k=2, activation="gelu", shared_experts=2, normalize_gates=False), True),
], ids=["top1", "top2", "top3-sigmoid", "top2-gelu-shared"])
def test_dropless_equals_dense_reference(fields, grads):
  module, cfg = make(**fields)
  params, x = init_and_input(module)
  y, state = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["aux"]))(params, x)
  np.testing.assert_allclose(y, dense_reference(params, x, cfg), rtol=1e-4, atol=1e-4)
  assert float(state["aux"]["moe"][0]["dropped"]) == 0.0
  if not grads:
    return

  # Gradients too: the grouped matmul path against the same dense computation in JAX.
  def dense_jax(params, x):
    logits = jnp.einsum("bse,ex->bsx", x, params["router"])
    gates, idx, _ = moe.route(logits, cfg)
    mix = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts) * gates[..., None], axis=-2)
    w = {n[len("experts_"):]: v for n, v in params.items() if n.startswith("experts_")}
    per_expert = jax.vmap(lambda *ws: moe._mlp(x, dict(zip(w, ws)), cfg.activation,
                                               lambda a, b: a @ b))(*w.values())
    y = jnp.einsum("bsx,xbse->bse", mix, per_expert)
    if cfg.shared_experts:
      shared = {n[len("shared_"):]: v for n, v in params.items() if n.startswith("shared_")}
      y = y + moe._mlp(x, shared, cfg.activation, lambda a, b: a @ b)
    return y

  probe = jax.random.normal(jax.random.PRNGKey(7), (B, S, E))
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * probe)
  got = jax.jit(jax.grad(loss(lambda p, x: module.apply({"params": p}, x)), argnums=(0, 1)))(
      params, x)
  want = jax.jit(jax.grad(loss(dense_jax), argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (2, 3)])
def test_capacity_drops_exactly_as_specified(groups):
  gb, gs = groups
  module, cfg = make(moe.Layout(gb, gs), capacity_factor=0.5, top_k=2)
  params, x = init_and_input(module, seed=3)
  y, state = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["aux"]))(params, x)
  T = (B // gb) * (S // gs)
  capacity = cfg.capacity(T)
  assert capacity == int(np.ceil(0.5 * T * 2 / 4))
  # Dispatch group (g, c) holds sequences g·B/gb.. and positions c·S/gs.. of each, in that order.
  rows = np.arange(B * S).reshape(gb, B // gb, gs, S // gs).transpose(0, 2, 1, 3)
  _, idx, _, _ = np_routing(params, x, cfg)
  keep = np_keep(idx, cfg, capacity, rows.reshape(gb * gs, -1))
  dropped = int((~keep).sum())
  assert dropped > 0, "the test needs a routing that overflows some expert"
  np.testing.assert_allclose(float(state["aux"]["moe"][0]["dropped"]), dropped / (B * S * 2),
                             rtol=1e-6)
  np.testing.assert_allclose(y, dense_reference(params, x, cfg, keep), rtol=1e-4, atol=1e-4)


def test_capacity_slots_priority():
  # Tokens 0..3, top-2, 2 experts, capacity 2: first choices fill first, in token order.
  idx = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
  pos, keep = moe.capacity_slots(idx, 2, 2)
  np.testing.assert_array_equal(pos, [[0, 1], [1, 2], [2, 3], [0, 3]])
  np.testing.assert_array_equal(keep, [[True, True], [True, False], [False, False],
                                       [True, False]])


def test_large_capacity_equals_dropless():
  module, cfg = make(capacity_factor=4.0 / 2)  # C = T: no expert can overflow
  params, x = init_and_input(module)
  dropless, _ = make()
  run = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x))(params, x)
  np.testing.assert_allclose(run(module), run(dropless), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("balance,router", [("global", "softmax"), ("micro", "softmax"),
                                            ("micro", "sigmoid")])
def test_balance_and_z_loss_match_numpy(balance, router):
  gb = 2
  module, cfg = make(moe.Layout(gb, 1), balance=balance, router=router, top_k=2)
  params, x = init_and_input(module, seed=5)
  _, state = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["aux"]))(params, x)
  aux = state["aux"]["moe"][0]
  _, idx, probs, logits = np_routing(params, x, cfg)
  X, K = cfg.num_experts, cfg.top_k
  groups = gb if balance == "micro" else 1
  losses = []
  for g in np.split(np.arange(B * S), groups):  # contiguous sequences per micro-batch
    f = np.array([(idx[g] == i).sum() for i in range(X)]) / (len(g) * K)
    p = probs[g].mean(0)
    losses.append(X * np.sum(f * p))
  np.testing.assert_allclose(float(aux["balance"]), np.mean(losses), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(aux["z"]), np.mean(lse ** 2), rtol=1e-5)
  load = np.array([(idx == i).sum() for i in range(X)]) / (B * S * K)
  np.testing.assert_allclose(np.asarray(aux["load"]), load, rtol=1e-6)
  if balance == "micro":  # the two definitions differ on this batch
    global_f = load
    assert abs(np.mean(losses) - X * np.sum(global_f * probs.mean(0))) > 1e-6


def test_balance_loss_is_one_when_uniform():
  probs = jnp.full((2, 4, 4), 0.25)
  idx = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2)
  assert float(moe.balance_loss(probs, idx, 4)) == pytest.approx(1.0)


def test_collect_means_over_layers_and_adds_weighted_terms():
  cfg = moe.Config(num_experts=2, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.25)
  layer = lambda b, z: {"balance": jnp.array([b]), "z": jnp.array([z]), "dropped": jnp.zeros(1),
                        "load": jnp.array([[0.75, 0.25]])}
  aux = {"layers": {"a": {"moe": (layer(1.0, 2.0),)}, "b": {"moe": (layer(3.0, 4.0),)}}}
  loss, metrics = moe.collect(aux, cfg)
  assert float(metrics["moe_balance_loss"]) == 2.0 and float(metrics["moe_z_loss"]) == 3.0
  assert float(loss) == pytest.approx(0.5 * 2.0 + 0.25 * 3.0)
  assert float(metrics["moe_load/expert_0"]) == 0.75 and float(metrics["moe_load_max"]) == 1.5


@pytest.mark.parametrize("fields,message", [
    (dict(top_k=5), "top_k=5"), (dict(router="relu"), "router"), (dict(every=0), "every"),
    (dict(capacity_factor=-1.0), "capacity_factor"), (dict(balance="local"), "balance"),
])
def test_invalid_config_one_sentence(fields, message):
  with pytest.raises(ValueError, match=message):
    moe.Config.from_config({"num_experts": 4, **fields})
  with pytest.raises(ValueError, match="unknown field"):
    moe.Config.from_config({"num_experts": 4, "experts": 2})
