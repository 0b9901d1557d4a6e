"""train.remat policies and mixed precision (model.dtype) in every family.

Remat: "full" and "selective" give the gradients of "none" while keeping fewer residuals for the
backward pass, in the order none > selective > full. Residuals are measured as the bytes of the
pytree that ``jax.vjp`` returns (what the backward pass holds), traced only, never compiled.
Precision: with dtype=bfloat16 and param_dtype=float32 the parameters stay float32, the matmuls
run in bfloat16, norms, softmax and the outputs are float32, and AdamW lowers a bf16 Llama's loss.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nets import dit, layers, linear_rnn, llama, mamba, megabyte, moe, swin, udit, uvit, vit
from parallel import devices as parallel_devices
from tests.nets import (test_linear_rnn, test_llama, test_mamba, test_megabyte, test_swin,
                         test_uvit, test_vision)
from train.tasks import lm


def _tokens(S):
  return (jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, S)), jnp.int32),)


def _images(cfg):
  x = np.random.default_rng(1).standard_normal((2, cfg.image_size, cfg.image_size, cfg.channels))
  return (jnp.asarray(x, jnp.float32),)


# Each builds (model, inputs) from the tiny config of the family's own tests, plus ``kw``.
FAMILIES = {
    "llama": lambda **kw: (llama.Model(test_llama.make_cfg(vocab_size=32, **kw)), _tokens(12)),
    "llama_moe": lambda **kw: (llama.Model(test_llama.make_cfg(
        vocab_size=32, moe=moe.Config(num_experts=4, top_k=2, shared_experts=1), **kw)),
                               _tokens(12)),
    "mamba": lambda **kw: (mamba.Model(test_mamba.make_cfg(**kw)), _tokens(12)),
    "megabyte": lambda **kw: (megabyte.Model(test_megabyte.make_cfg(
        patch_sizes=(4,), d_model=(32, 16), num_layers=(1, 1), num_heads=(2, 2),
        mlp_dim=(32, 32), blocks=("transformer", "mamba"), **kw)), _tokens(16)),
    "linear_rnn": lambda **kw: (linear_rnn.Model(test_linear_rnn.make_cfg("hybrid", **kw)),
                                _tokens(12)),
    "linear_rnn_mamba2": lambda **kw: (linear_rnn.Model(test_linear_rnn.make_cfg("mamba2", **kw)),
                                       _tokens(12)),
    "vit": lambda **kw: (vit.Model(cfg := test_vision.vit_cfg(**kw)), _images(cfg)),
    "swin": lambda **kw: (swin.Model(cfg := test_swin.swin_cfg(**kw)), _images(cfg)),
    "dit": lambda **kw: (dit.Model(cfg := test_vision.dit_cfg(**kw)),
                         test_vision.diffusion_inputs(cfg)),
    "udit": lambda **kw: (udit.Model(cfg := test_vision.udit_cfg(depths=[1, 1, 1], **kw)),
                          test_vision.diffusion_inputs(cfg)),
    "uvit": lambda **kw: (uvit.Model(cfg := test_uvit.uvit_cfg(**kw)), test_uvit.inputs(cfg)),
}


def random_params(model, inputs, seed=0):
  """N(0, 0.2²) parameters of the init's shapes and dtypes (no zero-initialised layer hides a
  path, and nothing is compiled to get them)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def scalar_loss(model, inputs):
  """Mean square of the output plus the MoE auxiliary terms, as a function of the parameters."""
  def loss(params):
    out, aux_loss, _ = moe.apply_with_aux(model, {"params": params}, *inputs)
    return jnp.mean(jnp.square(out)) + aux_loss
  return loss


def residuals(loss, params) -> list:
  """Shapes and dtypes of what the backward pass of ``loss`` keeps (the leaves of its vjp)."""
  return jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))


def nbytes(leaves) -> int:
  return sum(x.size * x.dtype.itemsize for x in leaves)


def assert_same_grads(grads, ref, atol_of_max=1e-6):
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol_of_max * float(np.abs(r).max()))


# Swin's bias tables: each row's gradient sums the logit gradients of every (query, key) pair at
# that offset (a scatter-add over ~256 pairs per head), in an order XLA picks per program; the last
# stage's are small (max ~2e-5), and "full" differs from "none" by up to 5.6e-6 of that maximum.
ATOL_OF_MAX = {"swin": 1e-5}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remat_policies_keep_gradients_and_order_residuals(family):
  """Same gradients under every policy; none > selective > full in residual bytes, and offload
  keeps the same residuals as selective (in host memory where the platform has it)."""
  models = {p: FAMILIES[family](remat=p) for p in layers.REMAT_POLICIES}
  inputs = models["none"][1]
  params = random_params(models["none"][0], inputs)
  losses = {p: scalar_loss(model, inputs) for p, (model, _) in models.items()}
  compared = ("none", "full", "selective")
  grads = jax.jit(lambda ps: {p: jax.grad(losses[p])(ps) for p in compared})(params)
  tol = ATOL_OF_MAX.get(family, 1e-6)
  assert_same_grads(grads["full"], grads["none"], tol)
  assert_same_grads(grads["selective"], grads["none"], tol)
  kept = {p: nbytes(residuals(loss, params)) for p, loss in losses.items()}
  assert kept["none"] > kept["selective"] > kept["full"], kept
  assert kept["offload"] == kept["selective"], kept


def test_selective_recomputes_attention_and_keeps_projections():
  """Llama: "none" keeps the S x S attention logits/probabilities and "selective" none of them
  (checkpoint_dots would keep them), while selective keeps the q projection [L, B, S, H, D] that
  "full" recomputes. S = 12 is no other dimension of the model."""
  S = 12
  model, inputs = FAMILIES["llama"]()
  params = random_params(model, inputs)
  shapes = {}
  for policy in layers.REMAT_POLICIES:
    loss = scalar_loss(FAMILIES["llama"](remat=policy)[0], inputs)
    shapes[policy] = [x.shape for x in residuals(loss, params)]
  square = lambda p: [s for s in shapes[p] if s.count(S) >= 2]  # S x T in any dot layout
  assert square("none") and not square("selective") and not square("full")
  cfg = model.cfg
  q_shape = (cfg.num_layers, 2, S, cfg.num_heads, cfg.head_size)
  assert q_shape in shapes["selective"] and q_shape not in shapes["full"]


def test_offload_runs_on_this_cpu():
  """This JAX's CPU devices have a pinned_host memory space, so offload is accepted and gives the
  gradients of "none" (XLA:CPU drops the host placement: it is the selective program)."""
  devices = jax.devices()
  assert "pinned_host" in {m.kind for m in devices[0].addressable_memories()}
  parallel_devices.check_remat_supported("offload", devices)
  model, inputs = FAMILIES["llama"]()
  params = random_params(model, inputs)
  loss, offload_loss = (scalar_loss(FAMILIES["llama"](remat=p)[0], inputs)
                        for p in ("none", "offload"))
  grads, offload_grads = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(offload_loss)(p)))(params)
  assert_same_grads(offload_grads, grads)


def test_offload_is_refused_without_pinned_host_memory():
  device_only = types.SimpleNamespace(
      platform="cpu", addressable_memories=lambda: [types.SimpleNamespace(kind="device")])
  with pytest.raises(ValueError, match=r"^train.remat='offload' needs devices with a pinned_host "
                                       r"memory space .* has only \['device'\], so use "
                                       r"train.remat='selective' instead.$"):
    parallel_devices.check_remat_supported("offload", [device_only])
  for policy in ("none", "full", "selective"):
    parallel_devices.check_remat_supported(policy, [device_only])


def _eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (scan, remat, pjit, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


# Norms (rsqrt), softmax (exp, max), the loss and Mamba's scan (exp, log1p of softplus), RoPE and
# the timestep features (sin, cos): float32 even when the compute dtype is bfloat16.
_FLOAT32_OPS = ("rsqrt", "exp", "log", "log1p", "reduce_max", "sin", "cos")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_compute_keeps_params_norms_softmax_and_outputs_in_float32(family):
  model, inputs = FAMILIES[family](dtype="bfloat16", param_dtype="float32")
  params = random_params(model, inputs)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  loss = scalar_loss(model, inputs)
  jaxpr = jax.make_jaxpr(loss)(params)
  assert jaxpr.out_avals[0].dtype == jnp.float32
  out = jax.eval_shape(lambda p: moe.apply_with_aux(model, {"params": p}, *inputs)[0], params)
  assert out.dtype == jnp.float32
  eqns = list(_eqns(jaxpr.jaxpr))
  in_dtypes = lambda e: {str(v.aval.dtype) for v in e.invars if hasattr(v.aval, "dtype")}
  bf16_dots = [e for e in eqns if e.primitive.name == "dot_general"
               and in_dtypes(e) == {"bfloat16"}]
  assert len(bf16_dots) >= 4, "the projections should run in bfloat16"
  low = [(e.primitive.name, in_dtypes(e)) for e in eqns
         if e.primitive.name in _FLOAT32_OPS and in_dtypes(e) != {"float32"}]
  assert not low, f"computed below float32: {low}"


def test_bf16_llama_loss_matches_fp32_at_init_and_adamw_lowers_it():
  """Float32 parameters and AdamW moments; the bf16 loss at init is within 1% of the fp32 one,
  and AdamW steps on one fixed batch lower it."""
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (4, 17)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  fp32, bf16 = (llama.Model(test_llama.make_cfg(vocab_size=32, dtype=d))
                for d in ("float32", "bfloat16"))
  params = nn.unbox(jax.jit(bf16.init)(jax.random.PRNGKey(0), inputs)["params"])
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  def loss_fn(model):
    def loss(p):
      loss_sum, count = lm.token_loss(model.apply({"params": p}, inputs), targets)
      return loss_sum / count
    return loss

  opt = optax.adamw(1e-2, weight_decay=0.0)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn(bf16))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  loss32, loss16 = jax.jit(lambda p: (loss_fn(fp32)(p), loss_fn(bf16)(p)))(params)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  opt_state, losses = opt.init(params), []
  for _ in range(6):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(float(loss16))
  assert losses[-1] < losses[0] - 0.2, losses
  assert {x.dtype for x in jax.tree.leaves((params, opt_state)) if x.ndim} == {
      jnp.dtype(jnp.float32)}
