"""model.text_encoder="t5": a frozen imported T5 encoder inside the text-conditioned DiTs, through
the run's own builder (train/program.py) on a 2x2x2 mesh.

A tiny random transformers T5EncoderModel (gated-gelu, norm weights randomised) is saved with
save_pretrained; a tiny mmdit or pixart config points model.text_encoder_path at it. A fresh state
holds its weights, the model's caption features are its last_hidden_state, training leaves it
bitwise intact with no gradient reaching it, and a resumed run takes it from the checkpoint.
"""

import os
import shutil

import grain
import jax
import numpy as np
import pytest

from configs import diffusion
from nets import t5
from nets.convert import t5 as convert_t5
from parallel import sharding
from tests.convert import parity_import
from tests.parallel.step_parity import caption_batch
from train import checkpoint, loop, text_encoders
from train import program as program_lib
from train.validate import validate

torch = parity_import("torch")
transformers = parity_import("transformers")

B, L, SIDE = 8, 64, 8  # L: digit_captions validates its longest caption (63 ids) fits
# The caption projection: the first layer that reads the encoder's features.
PROJECTION = {"mmdit": "context_embedder", "pixart": "y_fc1"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(T5EncoderModel, its save_pretrained folder)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's workers spin against XLA's on a 2-core machine
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=8,
      relative_attention_max_distance=16)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):  # ones would hide a swapped norm
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp("byt5_tiny"))
  model.save_pretrained(folder)
  yield model, folder
  torch.set_num_threads(threads)


def hf_params(model):
  """The HF weights as nets.t5 params, through the converter (from torch, not the folder)."""
  cfg = convert_t5.config_from_hf(model.config.to_dict())
  return convert_t5.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, cfg)


def make_config(name: str, folder: str):
  c = diffusion.get_config(f"model={name}")
  c.model.update(hidden_size=64, depth=1, num_heads=4, input_size=SIDE, patch_size=4,
                 in_channels=1, text_len=L, text_encoder="t5", text_encoder_path=folder)
  c.data.update(image_size=SIDE, text_len=L)
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(steps=4, batch_size=B)
  # Weight decay on: a frozen kernel the optimizer saw would shrink even with a zero gradient.
  c.opt.update(warmup_steps=0, lr=1e-2, weight_decay=0.1)
  c.ckpt.update(every=2, keep=2, async_save=False)
  c.eval.batch_size = B
  return c


def same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def encoder_features(program, params, batch):
  """The model's own text_encoder output (captured in the full forward) on ``batch``."""
  is_encoder = lambda module, method: isinstance(module, t5.Encoder)

  def forward(params, *args):
    _, state = program.model.apply({"params": params}, *args, capture_intermediates=is_encoder,
                                   mutable=["intermediates"])
    return state["intermediates"]["text_encoder"]["__call__"][0]
  with program.context():
    return np.asarray(jax.jit(forward)(params, *program.task.init_args(batch)))


@pytest.fixture(scope="module", params=["mmdit", "pixart"])
def trained(request, hf, tmp_path_factory):
  """A fresh state, then two train steps (with their gradients) saved at step 2."""
  model, folder = hf
  config = make_config(request.param, folder)
  program = program_lib.build(config)
  fresh = program.init()
  # Noise on every trained parameter, so no zero-initialised layer (adaLN-Zero gates, the final
  # layer) hides the path from the caption features to the loss.
  rng = np.random.default_rng(0)
  noisy = lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype)
  live = {k: v if k == "text_encoder" else jax.tree.map(noisy, v)
          for k, v in jax.device_get(fresh.params).items()}
  state = fresh.replace(params=jax.device_put(live, program.state_shardings.params))
  batch = program.eval_batch(caption_batch(B, SIDE, L, seed=3))
  with program.context():
    step = jax.jit(program.step_with_grads,
                   in_shardings=(program.state_shardings, program.batch_shardings),
                   out_shardings=(program.state_shardings, sharding.replicated(program.mesh),
                                  program.state_shardings.params))
    grads = []
    for _ in range(2):
      state, _, g = step(state, batch)
      grads.append(jax.device_get(g))
  workdir = str(tmp_path_factory.mktemp(f"{request.param}_run"))
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  ckpt.save(2, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
  ckpt.close()
  return dict(name=request.param, model=model, folder=folder, config=config, program=program,
              fresh=fresh, live=live, state=state, grads=grads, workdir=workdir)


def test_fresh_state_holds_the_imported_weights_in_their_shardings(trained):
  program, fresh = trained["program"], trained["fresh"]
  cfg = program.plan.model_cfg
  assert cfg.t5 == text_encoders.check(trained["folder"]) and cfg.text_width == 32
  same(jax.device_get(fresh.params["text_encoder"]), hf_params(trained["model"]))
  jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"),
               fresh.params["text_encoder"], program.state_shardings.params["text_encoder"])


def test_caption_features_are_transformers_last_hidden_state(trained):
  """Parity in situ: the encoder inside the model, on the byte ids the data yields."""
  local = caption_batch(B, SIDE, L, seed=5)
  assert not local["text_mask"].all()  # padded captions: the key mask matters
  got = encoder_features(trained["program"], trained["fresh"].params,
                         trained["program"].eval_batch(local))
  with torch.no_grad():
    want = trained["model"](input_ids=torch.from_numpy(local["text_ids"]).long(),
                            attention_mask=torch.from_numpy(local["text_mask"]).long()
                            ).last_hidden_state.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_training_leaves_the_encoder_bitwise_and_no_gradient_reaches_it(trained):
  before, after = trained["live"], jax.device_get(trained["state"].params)
  same(after["text_encoder"], before["text_encoder"])
  for g in trained["grads"]:  # stop_gradient: exact zeros, not merely ignored by the optimizer
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(g["text_encoder"]))
    assert np.any(g[PROJECTION[trained["name"]]]["kernel"])  # the features reach the loss
  rest = lambda params: {k: v for k, v in params.items() if k != "text_encoder"}
  names = lambda tree: [jax.tree_util.keystr(k) for k, _ in
                        jax.tree_util.tree_leaves_with_path(rest(tree))]
  still = {n for n, a, b in zip(names(before), jax.tree.leaves(rest(before)),
                                jax.tree.leaves(rest(after))) if np.array_equal(a, b)}
  # Only what the loss never reads may stay (MMDiT's last block discards its text queries).
  unread = {n for n, *g in zip(names(before), *(jax.tree.leaves(rest(g)) for g in
                                                trained["grads"])) if not np.any(g)}
  assert still <= unread and len(still) <= 1, f"trained parameters that did not move: {still}"


def test_resume_takes_the_encoder_from_the_checkpoint(trained, tmp_path):
  """The resumed run reads only the folder's config.json: with its weights file gone it still
  resumes (the encoder restored with the rest), while a fresh start says the file is missing."""
  bare = str(tmp_path / "config_only")
  os.makedirs(bare)
  shutil.copy(os.path.join(trained["folder"], "config.json"), bare)
  config = make_config(trained["name"], bare)
  program = program_lib.build(config)
  with pytest.raises(ValueError, match=f"^{bare} has neither model.safetensors"):
    program.init()
  ckpt = checkpoint.Checkpointer(trained["workdir"], config.ckpt)
  resumed_from, state, _ = loop._restore_or_init(
      program, ckpt, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.close()
  assert resumed_from == 2 and int(state.step) == 2
  same(jax.device_get(state.params), jax.device_get(trained["state"].params))
  same(jax.device_get(state.params["text_encoder"]), hf_params(trained["model"]))


def test_validation_names_the_key_before_anything_compiles(hf, tmp_path):
  _, folder = hf
  cases = [
      (str(tmp_path / "nowhere"), f"^model.text_encoder_path={tmp_path}/nowhere is not a "
       "directory; it must be a Hugging Face T5 folder"),
      (str(tmp_path), f"^model.text_encoder_path={tmp_path} has no config.json.$"),
      ("", "^model.text_encoder_path='' must name a Hugging Face T5 folder"),
  ]
  for path, message in cases:
    with pytest.raises(ValueError, match=message):
      validate(make_config("mmdit", path))
  config = make_config("pixart", folder)
  config.model.text_width = 64
  with pytest.raises(ValueError, match=r"^model.text_width=64 differs from the T5 encoder's "
                     r"d_model=32 \(model.text_encoder_path="):
    validate(config)
  config = make_config("mmdit", folder)  # its weights shard like the model's: 4 heads, tensor 8
  config.model.num_heads = 8
  config.mesh.update(data=1, fsdp=1, tensor=8)
  with pytest.raises(ValueError, match="^the T5 encoder's num_heads=4 is not divisible by "
                     "mesh.tensor=8"):
    validate(config)
  config = make_config("mmdit", folder)
  config.model.text_encoder = "trained"
  with pytest.raises(ValueError, match="is set but model.text_encoder='trained' ignores it"):
    validate(config)
  config = make_config("mmdit", folder)  # T5 reads bytes, not the captions' word ids
  config.data.caption_tokens = "words"
  with pytest.raises(ValueError, match=r"^model.text_encoder='t5' reads ByT5 byte ids but "
                     r"data.caption_tokens='words'"):
    validate(config)


def test_param_count_and_flops_count_the_t5_encoder(hf):
  """The closed forms with a T5 encoder: the parameter count is the initialised model's, and the
  encoder's FLOPs are nets.t5.flops."""
  from nets import registry, text_encoder
  from nets.counting import Step
  for name in ("mmdit", "pixart"):
    program = program_lib.build(make_config(name, hf[1]))
    cfg = program.plan.model_cfg
    shapes = program.abstract_state.params
    assert registry.get(name).num_params(cfg) == sum(x.size for x in jax.tree.leaves(shapes))
    assert t5.param_count(cfg.t5) == sum(
        x.size for x in jax.tree.leaves(shapes["text_encoder"]))
    E, M, HD = 32, 48, 32  # per token and layer: qkvo, attention over L keys, gated FF
    assert text_encoder.captions_flops(cfg, Step(B, 0, True)) == 2 * L * (
        2 * 4 * E * HD + 4 * L * HD + 3 * 2 * E * M)
