"""train.ema: the EMA of the parameters against its closed form, exact resume, sharding, and the
weights evaluation, train.sample, train.generate and export read (docs/training.md)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from configs import diffusion, lm
from train import checkpoint, convert, generate, loop, optimizer, sample, steps
from train import program as program_lib
from train import workdir as workdir_lib
from train import state as state_lib
from train.state import TrainState
from train.validate import validate

N = 4  # train steps of the toy runs


def lm_config(**ema):
  c = lm.get_config("size=test")
  c.mesh.update(data=2, fsdp=2, tensor=2, seq=1, expert=1)
  c.train.update(steps=N, batch_size=8, seq_len=32)
  c.train.ema.update(**ema)
  c.opt.update(warmup_steps=1, lr=1e-2)
  c.ckpt.update(every=2, keep=10, async_save=False)
  c.log.update(every=1, progress=False)
  c.eval.update(every=1000, steps=1, batch_size=8)
  c.sample.update(max_new_tokens=0)
  return c


def host64(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), tree)


def decays(warmup: str, decay: float, power: float, n: int) -> np.ndarray:
  """d_1..d_n of updates 1..n by hand (t = updates applied before each one)."""
  t = np.arange(n, dtype=np.float64)
  return {"none": np.full(n, decay), "ratio": np.minimum(decay, (1 + t) / (10 + t)),
          "power": np.minimum(decay, 1 - (1 + t) ** -power)}[warmup]


def closed_form(trajectory: list, d: np.ndarray):
  """sum_k w_k * params_k with ema_0 = params_0, ema_k = d_k ema_{k-1} + (1 - d_k) params_k."""
  n = len(d)
  w = [np.prod(d)] + [(1 - d[k - 1]) * np.prod(d[k:]) for k in range(1, n + 1)]
  assert abs(sum(w) - 1) < 1e-12
  return jax.tree.map(lambda *ps: sum(wk * p for wk, p in zip(w, ps)), *trajectory)


# ------------------------------------------------------------------ closed form, sharding


def test_ema_after_n_steps_equals_its_closed_form_and_is_sharded_like_the_params():
  program = program_lib.build(lm_config(decay=0.8, warmup="none"))  # data2 x fsdp2 x tensor2
  fresh = program.init()
  # As a fine-tune (init.from) starts: the EMA a copy of the given parameters, in its own buffers
  # (the step donates both), in the same shardings.
  state = state_lib.with_ema_of(fresh, fresh.params)
  buffers = lambda tree: {x.addressable_shards[0].data.unsafe_buffer_pointer()
                          for x in jax.tree.leaves(tree)}
  assert not buffers(state.params) & buffers(state.ema_params)
  # The EMA is laid out exactly like the parameters, from the same logical names.
  assert program.state_shardings.ema_params == program.state_shardings.params
  same = jax.tree.map(lambda p, e: p.sharding == e.sharding, state.params, state.ema_params)
  assert all(jax.tree.leaves(same))
  specs = [p.sharding.spec for p in jax.tree.leaves(state.ema_params)]
  assert any(any(axis is not None for axis in spec) for spec in specs)  # really sharded
  jax.tree.map(np.testing.assert_array_equal, host64(state.params), host64(state.ema_params))
  rng = np.random.default_rng(0)
  trajectory = [host64(state.params)]
  for _ in range(N):
    batch = {k: rng.integers(0, program.plan.model_cfg.vocab_size, v.shape).astype(v.dtype)
             for k, v in program.example_batch.items()}
    state, _ = program.train_step(state, program.train_batch(batch))
    trajectory.append(host64(state.params))
  want = closed_form(trajectory, decays("none", 0.8, 2 / 3, N))
  got = host64(state.ema_params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  same = jax.tree.map(lambda p, e: p.sharding == e.sharding, state.params, state.ema_params)
  assert all(jax.tree.leaves(same))
  # Not trivially the newest or the first parameters.
  assert not np.allclose(got["lm_head"]["kernel"], trajectory[-1]["lm_head"]["kernel"])
  assert not np.allclose(got["lm_head"]["kernel"], trajectory[0]["lm_head"]["kernel"])


def test_power_warmup_schedule_and_no_ema_when_decay_is_zero():
  cfg = ml_collections.ConfigDict(dict(decay=0.999, warmup="power", power=0.75))
  schedule = steps.ema_schedule(cfg)
  t = np.array([0, 1, 10, 1000, 10 ** 6])
  np.testing.assert_allclose(np.asarray(schedule(t)), decays("power", 0.999, 0.75, 10 ** 6 + 1)[t],
                             rtol=1e-6)
  assert float(schedule(0)) == 0.0  # the first update copies the parameters
  cfg.decay = 0.0
  assert steps.ema_schedule(cfg) is None


def _toy_step(decay: float, *, pmap: bool = False, grad_accum: int = 1):
  """A train step of f(w) = mean over rows of sum((w * x)^2) with train.ema (warmup ratio) on;
  with ``pmap`` mapped over the 8 devices as the pmap loop maps it."""
  def loss_fn(params, batch, rng):
    del rng
    return jnp.mean(jnp.sum((params["w"] * batch["x"]) ** 2, axis=-1)), {}
  tx = optimizer.skip_nonfinite(optax.sgd(0.1))  # as optimizer.make wraps
  lr = optax.constant_schedule(0.1)
  schedule = steps.ema_schedule(ml_collections.ConfigDict(dict(decay=decay, warmup="ratio",
                                                               power=1.0)))
  body = steps.make_train_step(loss_fn, tx, lr, ema_decay=schedule, grad_accum=grad_accum,
                               axis_name=steps.PMAP_AXIS if pmap else None)
  params = {"w": jnp.arange(1.0, 5.0)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), ema_params=jax.tree.map(jnp.copy, params))
  if not pmap:
    return jax.jit(body), state
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * jax.device_count()), tree)
  return jax.pmap(body, axis_name=steps.PMAP_AXIS), stack(state)


@pytest.mark.parametrize("pmap", [False, True], ids=["jit", "pmap+grad_accum"])
def test_rejected_steps_neither_move_nor_count_in_the_ema(pmap):
  step, state = _toy_step(0.9, pmap=pmap, grad_accum=2 if pmap else 1)
  first = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if pmap else (lambda tree: tree)
  rows = np.random.default_rng(0).normal(size=(jax.device_count(), 4, 4)).astype(np.float32)
  x = jnp.asarray(rows) if pmap else jnp.asarray(rows[0])
  trajectory = [host64(first(state.params))]
  for bad in (False, True, True, False, False):
    before = first(state)
    state, metrics = step(state, {"x": x * (jnp.nan if bad else 1.0)})
    if bad:
      assert int(first(metrics)["bad_steps"]) > 0
      np.testing.assert_array_equal(first(state).ema_params["w"], before.ema_params["w"])
      np.testing.assert_array_equal(first(state).params["w"], before.params["w"])
    else:
      trajectory.append(host64(first(state.params)))
  # The three accepted updates weigh in as updates 1, 2 and 3 of the warm-up.
  want = closed_form(trajectory, decays("ratio", 0.9, 1.0, 3))
  np.testing.assert_allclose(np.asarray(first(state).ema_params["w"], np.float64), want["w"],
                             rtol=1e-6)
  assert not np.allclose(want["w"], trajectory[-1]["w"])


def test_ema_math_is_float32_and_keeps_the_parameter_dtype():
  ema = {"w": jnp.full((3,), 1.0, jnp.bfloat16), "n": jnp.arange(3)}
  params = {"w": jnp.full((3,), 2.0, jnp.bfloat16), "n": jnp.arange(3) + 5}
  out = steps.ema_update(ema, params, 0.75)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 1.25)
  np.testing.assert_array_equal(out["n"], params["n"])  # integer leaves are not averaged
  unchanged = steps.ema_update(ema, params, 1.0)
  np.testing.assert_array_equal(unchanged["w"], ema["w"])


# ------------------------------------------------------------------ config errors


BAD = {
    "decay 1": (dict(decay=1.0), r"config.train.ema.decay=1.0 must be a number in \[0, 1\)"),
    "decay negative": (dict(decay=-0.1), r"config.train.ema.decay=-0.1 must be a number in"),
    "warmup": (dict(decay=0.9, warmup="linear"),
               r"config.train.ema.warmup='linear' is not one of \('none', 'ratio', 'power'\)\.$"),
    "power": (dict(decay=0.9, power=0.0), r"config.train.ema.power=0.0 must be a positive number"),
    "weights": (dict(weights="best"),
                r"config.eval.weights='best' is not one of \('auto', 'raw', 'ema'\)\.$"),
    "ema without ema": (dict(weights="ema"), r"config.eval.weights='ema' needs an EMA of the "
                        r"parameters, but train.ema.decay is 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_ema_config_is_one_sentence(case):
  fields, message = BAD[case]
  c = lm_config()
  weights = fields.pop("weights", None)
  c.train.ema.update(**fields)
  if weights:
    c.eval.weights = weights
  with pytest.raises(ValueError, match=message):
    validate(c)


# ------------------------------------------------------------------ checkpoints without an EMA


def test_a_run_without_ema_keeps_the_old_checkpoint_layout_and_cannot_grow_one(tmp_path):
  program = program_lib.build(lm_config())
  state = program.init()
  assert state.ema_params is None
  train_iter = iter(program.task.datasets()[0])
  ckpt = checkpoint.Checkpointer(str(tmp_path), program.config.ckpt)
  ckpt.save(2, state, train_iter, force=True)
  ckpt.close()
  saved = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "checkpoints" / "2" / "state")
  assert set(getattr(saved, "tree", saved)) == {"step", "params", "opt_state", "rng"}
  ckpt = checkpoint.Checkpointer(str(tmp_path), program.config.ckpt)
  step, restored = ckpt.restore_newest_valid(program.abstract_state, train_iter, print)
  assert step == 2 and restored.ema_params is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  # Turning the EMA on cannot continue it: refused with a sentence, nothing moved.
  with_ema = program_lib.build(lm_config(decay=0.9))
  with pytest.raises(workdir_lib.WorkdirError, match=r"it has no array ema_params/"):
    ckpt.restore_newest_valid(with_ema.abstract_state, train_iter, print)
  ckpt.close()
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


# ------------------------------------------------------------------ a diffusion run with EMA


def dit_config():
  c = diffusion.get_config("model=dit,variant=digits")
  c.model.update(depth=1, hidden_size=32, num_heads=2)
  c.model.timestep_freq_shift = 1.0  # as diffusers' DiT, so the run exports
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.train.update(steps=N, batch_size=16)
  c.train.ema.update(decay=0.99, warmup="none")  # the EMA stays near the initial parameters
  c.opt.update(lr=3e-2, warmup_steps=1)
  c.ckpt.update(every=2, keep=10, async_save=False)
  c.log.update(every=1, progress=False)
  c.eval.update(every=1000, steps=1, batch_size=16)
  c.diffusion.update(sample_steps=2, samples_per_class=1, sample_classes=2)
  return c


@pytest.fixture(scope="module")
def dit_runs(tmp_path_factory):
  straight = str(tmp_path_factory.mktemp("straight"))
  resumed = str(tmp_path_factory.mktemp("resumed"))
  full = loop.run(dit_config(), straight)
  loop.run(dit_config(), resumed, should_stop=lambda step: step == N // 2)
  loop.run(dit_config(), resumed)
  return dict(straight=straight, resumed=resumed, full=full)


def _vals(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m for m in map(json.loads, f) if m["split"] == "val"]


def test_resume_with_ema_is_bitwise_exact(dit_runs):
  for weights in ("raw", "ema"):
    for step in (N // 2, N):
      _, _, _, a = checkpoint.load_trained(dit_runs["straight"], step=step, weights=weights)
      _, _, _, b = checkpoint.load_trained(dit_runs["resumed"], step=step, weights=weights)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  _, _, _, raw = checkpoint.load_trained(dit_runs["straight"], weights="raw")
  _, _, _, ema = checkpoint.load_trained(dit_runs["straight"], weights="ema")
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, jax.device_get(raw),
                                              jax.device_get(ema))))


def test_diffusion_evaluation_uses_the_ema(dit_runs):
  vals = _vals(dit_runs["straight"])
  assert [v["weights"] for v in vals] == ["ema", "ema"]
  # Evaluation of the final step with the EMA, recomputed by hand, is what the loop wrote.
  config = dit_config()
  program = program_lib.build(config)
  abstract = program.abstract_state.params
  _, ema = checkpoint.restore_params(dit_runs["straight"], abstract, weights="ema")
  _, raw = checkpoint.restore_params(dit_runs["straight"], abstract, weights="raw")
  val_ds = program.task.datasets()[1]

  def loss_of(params):
    local = next(iter(val_ds))
    return program.task.summarize(jax.device_get(program.eval_step(
        params, program.eval_batch(local))))["loss"]

  assert loss_of(ema) == pytest.approx(vals[-1]["loss"], rel=1e-6)
  assert loss_of(raw) != pytest.approx(vals[-1]["loss"], rel=1e-3)


def test_sample_and_export_choose_the_weights(dit_runs, tmp_path):
  workdir = dit_runs["straight"]
  images = {w: sample.sample(workdir, [1, 3], steps=2, per_class=1, weights=w,
                             out=str(tmp_path / f"{w}.png"))[1] for w in ("auto", "raw", "ema")}
  np.testing.assert_array_equal(images["auto"], images["ema"])  # diffusion: EMA by default
  assert not np.allclose(images["raw"], images["ema"])
  exported = {}
  for w in ("auto", "raw", "ema"):
    convert.export_hf("dit", workdir, str(tmp_path / w), weights=w)
    exported[w] = load_file(str(tmp_path / w / "diffusion_pytorch_model.safetensors"))
  assert all(np.array_equal(exported["auto"][k], exported["ema"][k]) for k in exported["ema"])
  assert not all(np.array_equal(exported["raw"][k], exported["ema"][k]) for k in exported["ema"])
  # --weights=raw is what the export wrote before the EMA existed: the raw parameters.
  _, _, _, raw = checkpoint.load_trained(workdir)
  kernel = np.asarray(raw["final_layer"]["linear"]["kernel"])
  assert any(np.array_equal(kernel.T, v) or np.array_equal(kernel, v)
             for v in exported["raw"].values())
  with pytest.raises(ValueError, match=r"--weights=best is not one of auto, raw, ema\.$"):
    sample.sample(workdir, [1], steps=2, per_class=1, weights="best")


# ------------------------------------------------------------------ generate


def _lm_workdir(path, *, ema: bool):
  """A language-model workdir whose checkpoint holds raw parameters (and, with ``ema``, an EMA
  of half their values), written as the loop writes its state."""
  config = lm_config(decay=0.9 if ema else 0.0)
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                        checkpoint.model_param_shapes(config))
  state = {"params": params, **({"ema_params": jax.tree.map(lambda p: p / 2, params)}
                                if ema else {})}
  manager = ocp.CheckpointManager(str(path / "checkpoints"), item_names=("state",))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  return str(path), params


def test_generate_loads_the_chosen_weights(tmp_path):
  workdir, params = _lm_workdir(tmp_path / "ema", ema=True)
  for weights, scale in (("auto", 1.0), ("raw", 1.0), ("ema", 0.5)):  # auto: raw for an LM
    loaded = generate.load(workdir, generate.lm_workdir_config(workdir), mesh="data=8",
                           weights=weights)
    jax.tree.map(lambda got, p: np.testing.assert_array_equal(np.asarray(got), p * scale),
                 jax.device_get(loaded.params), params)
  plain, _ = _lm_workdir(tmp_path / "plain", ema=False)
  with pytest.raises(ValueError, match=rf"^{plain} \(checkpoint step 3\) holds no EMA of the "
                                       r"parameters \(it was trained with train.ema.decay=0\); "
                                       r"use --weights=raw\.$"):
    generate.load(plain, generate.lm_workdir_config(plain), mesh="data=8", weights="ema")
