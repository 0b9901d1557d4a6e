"""Shared harness: one train step on a mesh vs the single-device reference (not a test file)."""

import atexit
import functools
import os
import shutil
import tempfile
import zlib

import jax
import ml_collections
import numpy as np

from configs import autoencoder, diffusion, lm, swin, var, vit, vqvae
from parallel import mesh as parallel_mesh
from train import checkpoint, encode, image_data
from train.tasks import diffusion as diffusion_task
from train import program as program_lib
from train import workdir as workdir_lib
from train.validate import validate

B, S = 8, 16
# MoE variants: a Mixtral-style LM (dropless top-2), the same with capacity dropping (8 fixed
# dispatch groups, so any mesh groups tokens alike) and micro-batch balance, and DiT-MoE with a
# shared expert and every other block MoE.
MOE = {
    "lm_moe": dict(num_experts=8, top_k=2),
    "lm_moe_capacity": dict(num_experts=8, top_k=2, capacity_factor=1.0, groups=8,
                            balance="micro", router="sigmoid"),
    "dit_moe": dict(num_experts=4, top_k=1, shared_experts=1, every=2, activation="gelu"),
}


# The byte LMs without a configs/ file (experiments/mamba_stdlib.py and megabyte_stdlib.py at
# test size): the test Llama's task, data and optimizer with their model group.
BYTE_MODELS = {
    "mamba": dict(name="mamba", vocab_size=384, num_layers=2, d_model=64, d_state=8, d_conv=4,
                  expand=2, dt_rank=0, scan_chunk=0, max_len=256, tie_embeddings=False,
                  dtype="float32", param_dtype="float32"),
    "megabyte": dict(name="megabyte", vocab_size=384, patch_sizes=(4,), d_model=(64, 64),
                     num_layers=(1, 1), num_heads=(4, 4), mlp_dim=(128, 128),
                     blocks=("transformer", "transformer"), max_len=256, tie_embeddings=False,
                     dtype="float32", param_dtype="float32"),
    # linear_rnn (experiments/hybrid_stdlib.py and mamba2_stdlib.py at test size): a Gated
    # DeltaNet + gated attention hybrid, and Mamba-2; chunks of 4 of the 16 tokens.
    "gdn": dict(name="linear_rnn", mixer="gated_deltanet", vocab_size=384, num_layers=2,
                d_model=64, linear_heads=4, linear_k_heads=2, linear_k_dim=16, linear_v_dim=16,
                mlp_dim=128, chunk=4, attention_every=2, num_heads=4, num_kv_heads=2,
                qk_norm=True, attn_output_gate=True, rotary_fraction=0.5, max_len=256),
    "ssd": dict(name="linear_rnn", mixer="mamba2", vocab_size=384, num_layers=2, d_model=64,
                linear_heads=4, linear_k_heads=2, linear_k_dim=8, linear_v_dim=16, chunk=4,
                residual_in_fp32=True, max_len=256),
}


def make_config(kind: str):
  """Tiny configs: the test Llama (seq_len 16), Mamba and MEGABYTE, the digits ViT, Swin, DiT,
  U-DiT and U-ViT (+ MoE), the KL autoencoder, the VQ tokenizer (whose step also restarts
  dead codes: the post-step codebook is compared too) and VAR on that tokenizer's token maps
  (``var_tokens``: 85 tokens at scales 1, 2, 4, 8 of 64 codes)."""
  base_kind = kind.split("_")[0]
  if base_kind in ("lm", *BYTE_MODELS):
    config = lm.get_config("size=test")
    config.train.seq_len = S
    if base_kind in BYTE_MODELS:
      config.model = ml_collections.ConfigDict(BYTE_MODELS[base_kind])
  elif base_kind == "vit":
    config = vit.get_config("variant=digits")
  elif base_kind == "swin":  # 32 px: shifted 4 x 4 windows, one merging
    config = swin.get_config("variant=digits")
  elif base_kind == "autoencoder":  # 16 px, one downsampling: 8 x 8 x 4 latents
    config = autoencoder.get_config("variant=digits")
    config.data.image_size = 16
    config.model.update(image_size=16, block_out_channels=(16, 32))
  elif base_kind == "vqvae":  # 16 px, one downsampling: 8 x 8 features at scales 1, 2, 4, 8
    config = vqvae.get_config("variant=digits")
    config.data.image_size = 16
    config.model.update(image_size=16, block_out_channels=(16, 32), scales=(1, 2, 4, 8),
                        codebook_size=64)
  elif base_kind == "var":  # 4 heads: 2 per tensor shard
    config = var.get_config("variant=digits")
    config.data.path = var_tokens()
    config.model.update(depth=2, hidden_size=64, num_heads=4, scales=(1, 2, 4, 8),
                        codebook_size=64, vae_dim=16)
  else:
    config = diffusion.get_config(f"model={base_kind},variant=digits")
    if base_kind in diffusion.TEXT_MODELS:  # 16 px canvases (16 patches), 16-byte captions
      config.model.update(depth=2, text_layers=1, input_size=16)  # the data's 64-byte captions
      config.data.image_size = 16
  if kind in MOE:
    config.model.moe.update(MOE[kind])
  config.train.batch_size = B
  config.eval.batch_size = B
  config.train.steps = 10  # the learning-rate schedule's length
  return config


def setup(mesh_sizes: dict, devices=None, kind: str = "lm", grad_accum: int = 1,
          **parallel) -> program_lib.Program:
  """The Program of ``kind``'s tiny config on ``mesh_sizes`` over ``devices`` (default: all)."""
  config = make_config(kind)
  config.mesh.update(**mesh_sizes)
  config.parallel.update(**parallel)
  config.train.grad_accum = grad_accum
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  plan = validate(config, num_devices=mesh.devices.size)
  return program_lib.build(config, plan, mesh=mesh)


def batch(kind: str = "lm"):
  """One fixed batch: random bytes for the LM, the first training digits for vision."""
  if make_config(kind).task == "lm":
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, (B, S + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  config = make_config(kind)
  if config.model.name in diffusion.TEXT_MODELS:
    return caption_batch(B, config.data.image_size, config.data.text_len)
  source = image_data.source(config.data, "train")
  items = [source[i] for i in range(B)]
  if config.task == "var":  # token maps, stored as int16
    return {"tokens": np.stack([x["images"] for x in items]).astype(np.int32),
            "labels": np.array([x["labels"] for x in items], np.int32)}
  return {"images": np.stack([x["images"] for x in items]),
          "labels": np.array([x["labels"] for x in items], np.int32)}


@functools.lru_cache(maxsize=None)
def var_tokens() -> str:
  """The token shards VAR trains on (once per process): the "vqvae" kind's tokenizer, untrained
  (its step-0 initialisation saved as a run saves it: Checkpointer and config.json), and
  ``train.encode`` of all 1,797 digits at 16 px into a temporary folder (about 11 s)."""
  root = tempfile.mkdtemp(prefix="odyssey-var-parity-")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  workdir, tokens = os.path.join(root, "vq"), os.path.join(root, "tokens")
  program = setup(axes(), jax.devices()[:1], "vqvae")
  train_ds, _ = program.task.datasets()
  ckpt = checkpoint.Checkpointer(workdir, program.config.ckpt)
  ckpt.save(0, program.init(), iter(train_ds), force=True)
  ckpt.close()
  workdir_lib.write_config(workdir, program.config)
  encode.encode(workdir, tokens, batch_size=256)
  return tokens


def caption_batch(batch: int, side: int, text_len: int, seed: int = 0) -> dict:
  """Random grey canvases in [-1, 1] with byte-token captions of different lengths (padded)."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, side, side, 1)).astype(np.float32)
  captions = [f"digit {rng.integers(10)}" + "!" * int(rng.integers(0, 4)) for _ in range(batch)]
  return diffusion_task.text_batch(images, captions, text_len)


@functools.lru_cache(maxsize=None)
def reference(kind: str = "lm", update: bool = False):
  """Loss and gradients (``update``: and the post-step state) on one device (the dense
  reference)."""
  return run_one_step(dict(data=1, fsdp=1, tensor=1, seq=1, expert=1), jax.devices()[:1],
                      kind=kind, update=update)


# adaLN-Zero families whose step from a fresh init sends nothing through their blocks: every
# block's gates start at zero, so attention and the MLP get zero gradients and tensor-sharded
# heads are never tested. Their states start with random adaLN modulation instead (host numpy,
# the same on every mesh).
WAKE_ADALN = ("var",)


def wake_adaln(state, shardings):
  """``state`` with every adaLN parameter drawn from N(0, 0.5^2) (seeded by its path)."""
  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "adaLN" not in name:
      return x
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (0.5 * rng.standard_normal(x.shape)).astype(x.dtype)
  params = jax.tree_util.tree_map_with_path(leaf, jax.device_get(state.params))
  return state.replace(params=jax.device_put(params, shardings.params))


@functools.lru_cache(maxsize=None)
def initial_state(kind: str):
  """``kind``'s initial train state as the single-device run initialises it, on the host.

  Every run of a kind starts from these numbers, placed in its own shardings: one initialisation
  compile per kind and process instead of one per mesh. That a sharded initialisation draws the
  same numbers (JAX's partitionable PRNG) is tested apart: ``fresh_init=True`` below, used by
  test_family_parity's initialisation test and tests/parallel/test_sharding.py."""
  return jax.device_get(_init(setup(axes(), jax.devices()[:1], kind), kind))


def _init(program, kind: str):
  """``program``'s own (sharded) initialisation, adaLN woken for the WAKE_ADALN kinds."""
  state = program.init()
  if kind in WAKE_ADALN:
    state = wake_adaln(state, program.state_shardings)
  return state


def run_one_step(mesh_sizes, devices=None, kind: str = "lm", grad_accum: int = 1,
                 fresh_init: bool = False, update: bool = False, **parallel):
  """One train step of ``kind`` on ``mesh_sizes``. ``fresh_init``: initialise on this mesh (its
  own sharded initialisation) instead of placing :func:`initial_state` in its shardings.

  ``update``: the whole step (``Program.step_with_grads``: loss, gradients and the AdamW update,
  guard included); else its first half (``Program.step_gradients``: loss and gradients, the
  same PRNG stream and reductions), which compiles in about 40% of the time. What a mesh changes
  is the model's computation; the update is the same per-leaf code for every model, and is
  compared for the test Llama on every mesh (tests/parallel/test_sharding.py), the VQ
  tokenizer (whose step also restarts dead codes) and VAR (test_family_parity)."""
  program = setup(mesh_sizes, devices, kind, grad_accum, **parallel)
  state = (_init(program, kind) if fresh_init
           else jax.device_put(initial_state(kind), program.state_shardings))
  data = program.eval_batch(batch(kind))
  shardings = program.state_shardings

  # One backward pass: the real step also returns the gradients it applied. The rng is the same
  # for the reference and the sharded run: noise, timesteps and label dropout agree because
  # JAX's PRNG is partitionable (values do not depend on the sharding).
  if update:
    def fn(state, data):
      new_state, metrics, grads = program.step_with_grads(state, data)
      return metrics["loss"], grads, new_state, metrics
    out_shardings = (None, shardings.params, shardings, None)
  else:
    def fn(state, data):
      loss, metrics, grads = program.step_gradients(state, data)
      return loss, grads, None, {**metrics, "loss": loss}
    out_shardings = (None, shardings.params, None, None)

  with program.context():
    compiled = jax.jit(fn, in_shardings=(shardings, program.batch_shardings),
                       out_shardings=out_shardings).lower(state, data).compile()
    init_params = jax.device_get(state.params)
    loss, grads, new_state, metrics = compiled(state, data)
  return dict(loss=float(loss), grads=grads, init_params=init_params, new_state=new_state,
              state=state, step_loss=float(metrics["loss"]), mesh=program.mesh,
              shardings=shardings, plan=program.attention, hlo=compiled.as_text())


def assert_matches_reference(got, ref, grad_atol: float = 1e-7):
  """Same init, loss, gradients and (runs with ``update``) post-AdamW parameters as the
  single-device run.
  ``grad_atol``: the gradients' absolute tolerance (sums over many pixels in another order)."""
  # Sharded initialisation draws the same numbers as the single-device one (partitionable PRNG).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref["init_params"],
               got["init_params"])
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["step_loss"], ref["step_loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=grad_atol),
               jax.device_get(got["grads"]), jax.device_get(ref["grads"]))
  assert (got["new_state"] is None) == (ref["new_state"] is None), "compare like with like"
  if got["new_state"] is not None:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(got["new_state"].params), jax.device_get(ref["new_state"].params))


def axes(data=1, fsdp=1, tensor=1, seq=1, expert=1):
  return dict(data=data, fsdp=fsdp, tensor=tensor, seq=seq, expert=expert)



