"""VAR's tokenizer on its documented path, as written: experiments/vqvae_digits.py through
`python -m train` on its own mesh (8 simulated CPU devices) with its evaluation and PNGs, then
`python -m train.encode` of the digits into multi-scale token shards; plus the dead-code restart
inside the step and the token maps against the model.

Overrides, only of step counts: the tokenizer trains --config.train.steps=6 (of 2,000) with
--config.eval.every=3 and --config.opt.warmup_steps=2.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.user import metrics, run, substitute
from tests.user.commands import doc

TRAIN = "python -m train --config=experiments/vqvae_digits.py --workdir=DIR --cpu_devices=8"
ENCODE = "python -m train.encode --workdir=VQ --out=TOKENS"
SCALES = (1, 2, 3, 4, 6, 8)
TOKENS = sum(s * s for s in SCALES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("vqvae")
  workdir = root / "vq"
  out = run(substitute(doc(TRAIN), DIR=workdir) + " --config.train.steps=6 --config.eval.every=3"
            " --config.opt.warmup_steps=2", root / "train.log", timeout=600).stdout
  return root, workdir, out


def test_vqvae_digits_trains_evaluates_and_draws_reconstructions_per_scale(trained):
  _, workdir, out = trained
  val = metrics(workdir, "val")
  assert [m["step"] for m in val] == [0, 3, 6], out
  assert val[-1]["rec_loss"] < val[0]["rec_loss"] and val[-1]["psnr"] > val[0]["psnr"], val
  assert all(1.0 <= m["perplexity"] <= 512 and 0 <= m["unused_codes"] < 512 for m in val), val
  train = metrics(workdir, "train")
  assert all({"loss", "rec_loss", "vq_loss", "psnr", "perplexity", "dead_codes"} <= set(m)
             for m in train), train
  assert "codebook perplexity" in out and "codes unused" in out, out
  with Image.open(workdir / "samples" / "step_000006.png") as png:
    # the val digits, then their reconstructions from the first 1..6 scales: 7 rows of 32 px
    assert png.size[1] == 7 * 32 + 8 * 2, out


@pytest.fixture(scope="module")
def tokenized(trained):
  root, workdir, _ = trained
  tokens = root / "tokens"
  out = run(substitute(doc(ENCODE), VQ=workdir, TOKENS=tokens), root / "encode.log",
            timeout=300).stdout
  return root, workdir, tokens, out


def test_encode_writes_token_maps_that_decode_as_the_model_reconstructs(tokenized):
  from train import checkpoint, image_data
  _, workdir, tokens, out = tokenized
  meta = json.loads((tokens / "metadata.json").read_text())
  assert meta["shape"] == [TOKENS] and meta["dtype"] == "int16", meta
  assert meta["scales"] == list(SCALES) and meta["codebook_size"] == 512, meta
  assert meta["tokenizer"] == str(workdir) and meta["tokenizer_step"] == 6, meta
  assert meta["counts"] == {"train": 1437, "val": 360}, meta
  assert f"--config.data.path={tokens}" in out, out
  data = ml_collections.ConfigDict(dict(name="arrayrecord", path=str(tokens), image_size=0))
  val = image_data.source(data, "val")
  ids = np.stack([val[i]["images"] for i in range(8)]).astype(np.int32)
  assert ids.shape == (8, TOKENS) and 0 <= ids.min() and ids.max() < 512

  # The stored ids are the model's own token maps of the same images, and decoding them gives
  # its reconstruction.
  config, model, _, params = checkpoint.load_trained(str(workdir))
  d = config.data.copy_and_resolve_references()
  images = np.stack([image_data.source(d, "val")[i]["images"] for i in range(8)])
  want, _ = model.apply({"params": params}, images, method=model.tokenize)
  np.testing.assert_array_equal(ids, np.concatenate([w.reshape(8, -1) for w in want], axis=1))
  maps, start = [], 0
  for s in SCALES:
    maps.append(jnp.asarray(ids[:, start:start + s * s].reshape(8, s, s)))
    start += s * s
  decoded = model.apply({"params": params}, maps, method=model.decode_ids)
  rec = model.apply({"params": params}, images)[0]
  np.testing.assert_allclose(decoded, rec, atol=1e-5)


def test_encode_refuses_a_scaling_factor_for_tokens(trained, tmp_path):
  _, workdir, _ = trained
  res = run(f"python -m train.encode --workdir={workdir} --out={tmp_path / 't'} "
            "--scaling_factor=0.5", tmp_path / "refused.log", timeout=120, ok=False)
  assert res.returncode != 0 and "does not apply to the token maps" in res.stdout, res.stdout
  assert "Traceback" not in res.stdout and not (tmp_path / "t").exists(), res.stdout


def test_the_checkpoint_holds_the_code_usage(trained):
  from train import checkpoint
  _, workdir, _ = trained
  manager, step, saved = checkpoint._params_manager(str(workdir), None, key="task_state")
  manager.close()
  assert step == 6 and tuple(saved["usage"].shape) == (512,), saved


def test_the_step_restarts_dead_codes_onto_batch_residuals():
  """task_update: a code whose running usage falls below the threshold becomes one of the
  batch's residual vectors and its usage restarts at the threshold; live codes stay bit for
  bit."""
  from nets import vqvae
  from train.tasks import vqvae as vqvae_task
  config = ml_collections.ConfigDict(dict(vqvae=dict(usage_decay=0.9, restart_threshold=1.0)))
  cfg = vqvae.Config.from_config(ml_collections.ConfigDict(dict(
      name="vqvae", variant="digits", image_size=8, block_out_channels=(16, 16),
      scales=(1, 2, 4), codebook_size=16, embed_dim=4)))
  model = vqvae.Model(cfg)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1), minval=-1, maxval=1)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  task = vqvae_task.VQVAETask.__new__(vqvae_task.VQVAETask)
  task.config = config
  usage = jnp.full((16,), 50.0).at[3].set(0.0).at[7].set(1.05)  # 3 dead; 7 dies unless used
  new_params, new_state, m = jax.jit(task.task_update(model))(
      params, {"usage": usage}, {"images": x}, jax.random.PRNGKey(2))
  ids, residuals = model.apply({"params": params}, x, method=model.tokenize)
  counts = np.bincount(np.concatenate([np.asarray(i).ravel() for i in ids]), minlength=16)
  want_usage = 0.9 * np.asarray(usage) + 0.1 * counts
  dead = want_usage < 1.0
  assert dead[3] and m["dead_codes"] == dead.sum()
  old, new = np.asarray(params["quantizer"]["codebook"]), np.asarray(
      new_params["quantizer"]["codebook"])
  np.testing.assert_array_equal(new[~dead], old[~dead])
  pool = np.asarray(residuals).reshape(-1, 4)
  for j in np.flatnonzero(dead):
    # a residual of this batch (as computed outside the jitted update: equal to rounding)
    assert np.min(np.max(np.abs(pool - new[j]), axis=1)) < 1e-5, j
  np.testing.assert_allclose(new_state["usage"], np.where(dead, 1.0, want_usage), rtol=1e-6)
  # Everything but the codebook is untouched.
  flat_old = jax.tree_util.tree_leaves_with_path(params)
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new_params))
  for path, leaf in flat_old:
    if "codebook" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(flat_new[path], leaf)


# --- VAR on those tokens -------------------------------------------------------------------------

VAR = ("python -m train --config=experiments/var_digits.py --workdir=VAR --cpu_devices=8 "
       "--config.data.path=TOKENS")


@pytest.fixture(scope="module")
def var_run(tokenized):
  root, _, tokens, _ = tokenized
  workdir = root / "var"
  out = run(substitute(doc(VAR), VAR=workdir, TOKENS=tokens) + " --config.train.steps=4"
            " --config.eval.every=2 --config.var.samples_per_class=1", root / "var.log",
            timeout=600).stdout
  return workdir, out


def test_var_digits_trains_evaluates_and_draws_a_grid_per_class(var_run):
  workdir, out = var_run
  val = metrics(workdir, "val")
  assert [m["step"] for m in val] == [0, 2, 4], out
  assert val[-1]["loss"] < val[0]["loss"], val
  assert all(0.0 <= m["accuracy"] <= 1.0 for m in val), val
  assert "token accuracy" in out, out
  with Image.open(workdir / "samples" / "step_000004.png") as png:  # 10 rows of 32 px digits
    assert png.size[1] == 10 * 32 + 11 * 2, out


def test_var_refuses_data_that_are_not_token_maps(tmp_path):
  res = run(substitute(doc(VAR), VAR=tmp_path / "v", TOKENS=tmp_path / "none"),
            tmp_path / "refused.log", timeout=120, ok=False)
  assert res.returncode != 0 and "VAR trains on token maps" in res.stdout, res.stdout
  assert "Traceback" not in res.stdout and not (tmp_path / "v").exists(), res.stdout


def test_var_refuses_tokens_of_a_tokenizer_step_that_is_gone(tokenized, tmp_path):
  """Tokens name the tokenizer checkpoint that wrote them; when that step was deleted (the
  tokenizer trained on and kept newer ones), VAR says so instead of decoding with other codes."""
  import shutil
  _, _, tokens, _ = tokenized
  stale = tmp_path / "stale_tokens"
  shutil.copytree(tokens, stale)
  meta = json.loads((stale / "metadata.json").read_text())
  meta["tokenizer_step"] = 999
  (stale / "metadata.json").write_text(json.dumps(meta))
  res = run(substitute(doc(VAR), VAR=tmp_path / "v", TOKENS=stale), tmp_path / "stale.log",
            timeout=120, ok=False)
  assert res.returncode != 0 and "no longer holds that checkpoint" in res.stdout, res.stdout
  assert "Traceback" not in res.stdout and not (tmp_path / "v").exists(), res.stdout


VAR_SAMPLE = "python -m train.sample --workdir=VAR --classes=0,3,7 --cfg=3"


def test_train_sample_draws_a_var_grid_and_refuses_diffusion_flags(var_run, tmp_path):
  workdir, _ = var_run
  out = run(substitute(doc(VAR_SAMPLE), VAR=workdir) + " --per_class=2 --top_k=50",
            tmp_path / "sample.log", timeout=300).stdout
  assert "6 images of shape (32, 32, 1) (3 classes x 2)" in out, out
  png = workdir / "samples" / "sample_0-3-7_cfg3_topk50_topp1.png"
  with Image.open(png) as grid:  # 3 rows of 32 px digits
    assert grid.size[1] == 3 * 32 + 4 * 2
  for flags, message in {"--steps=10": "--steps does not apply to a VAR model",
                         "--classes=10": "outside the model's 10 classes",
                         "--top_p=0": "--top_p=0.0"}.items():
    res = run(f"python -m train.sample --workdir={workdir} --classes=1 {flags}".replace(
        "--classes=1 --classes=10", "--classes=10"), tmp_path / "refused.log", timeout=120,
        ok=False)
    assert res.returncode != 0 and message in res.stdout, res.stdout
    assert "Traceback" not in res.stdout, res.stdout
