"""nets/convert/linear_rnn.py against transformers' Mamba2ForCausalLM and dense
Qwen3NextForCausalLM (their pure-torch paths on CPU).

Tiny random fp32 models with every weight randomised (block and gated norms, Qwen3-Next's
zero-centred (1 + w) norm offsets, A_log, dt_bias, D, conv biases), so neither a misplaced
(1 + w) nor a wrong de-interleaving hides behind an init value: a Mamba-2 with 2 B/C groups over
4 heads, run in chunks of 8 on both sides over 21 tokens; a Qwen3-Next with 4 layers (layer 3 full
attention), 4 value heads over 2 key heads and RoPE on a quarter of each attention head.
Import: odyssey's logits equal transformers'; export (new weights): transformers loads them and
its logits equal odyssey's, and importing them again gives the same parameters; a round trip
through train.convert's import and export returns the original tensors. Max |difference| measured
on CPU: see bench/results/runs.md#hugging-face-parity.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nets import convert, linear_rnn
from nets.convert import linear_rnn as convert_linear
from tests.convert import parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

TOL = 1e-4
V, B, S = 97, 2, 21


def _mamba2():
  return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
      vocab_size=V, hidden_size=32, num_heads=4, head_dim=16, expand=2, n_groups=2,
      state_size=8, conv_kernel=4, num_hidden_layers=2, chunk_size=8, layer_norm_epsilon=1e-5))


def _qwen3_next():
  return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
      vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
      linear_key_head_dim=8, linear_value_head_dim=8, intermediate_size=64, num_experts=0))


MODELS = {"mamba2": _mamba2, "qwen3_next": _qwen3_next}
# Standard deviation of the random projections and embeddings. At 0.2 the random Qwen3-Next is so
# ill-conditioned at its first token that moving its weights by one float32 ulp moves the exact
# (float64) logits by 8e-5, so any two float32 implementations differ by about 1e-4 there.
SCALE = {"mamba2": 0.2, "qwen3_next": 0.1}
# Qwen3-Next's RMSNorms store w of x·(1 + w) (zero at init): randomised around zero.
OFFSETS = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight")


def _random_hf(arch: str):
  torch.manual_seed(0)
  model = MODELS[arch]().float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("A_log"):
        p.copy_(torch.rand_like(p) * 2 - 0.5)
      elif name.endswith("dt_bias"):
        p.copy_(torch.randn_like(p))
      elif name.endswith(OFFSETS):
        p.copy_(0.3 * torch.randn_like(p))
      elif "norm" in name or name.endswith(".D"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(SCALE[arch] * torch.randn_like(p))
  return model


def _torch_logits(model, tokens_BxS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens_BxS, dtype=torch.long), use_cache=False).logits.numpy()


def _cfg(fields: dict) -> linear_rnn.Config:
  # Chunks of 8 over 21 tokens: several chunks and a ragged last one, as Mamba-2's torch path.
  return linear_rnn.Config.from_config(ml_collections.ConfigDict(fields), chunk=8)


@functools.cache
def _jit_forward(cfg):
  return jax.jit(lambda params, tokens: linear_rnn.Model(cfg).apply({"params": params}, tokens))


@pytest.fixture(scope="module", params=list(MODELS))
def hf(request, tmp_path_factory):
  """(architecture, the saved random HF model, its folder, tokens, torch logits)."""
  model = _random_hf(request.param)
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  tokens_BxS = np.random.default_rng(0).integers(0, V, (B, S)).astype(np.int32)
  return request.param, model, folder, tokens_BxS, _torch_logits(model, tokens_BxS)


@pytest.fixture(scope="module")
def imported(hf):
  """(odyssey cfg, params) read from the saved HF folder."""
  config, tensors = convert.read_hf(str(hf[2]), convert_linear.WEIGHTS)
  cfg = _cfg(convert_linear.model_fields(config))
  return cfg, convert_linear.from_hf(tensors, cfg)


def test_import_matches_transformers(hf, imported):
  arch, _, _, tokens_BxS, want_BxSxV = hf
  cfg, params = imported
  assert convert_linear.architecture(cfg) == arch
  if arch == "qwen3_next":
    assert (cfg.attention_every, cfg.linear_heads, cfg.key_heads, cfg.rotary_dim, cfg.mlp_dim) \
        == (4, 4, 2, 4, 64)
  else:
    assert (cfg.linear_heads, cfg.key_heads, cfg.linear_k_dim, cfg.residual_in_fp32) \
        == (4, 2, 8, True)
  want = jax.eval_shape(lambda: nn.unbox(linear_rnn.Model(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(params) == shapes(want)
  diff = np.abs(np.asarray(_jit_forward(cfg)(params, tokens_BxS)) - want_BxSxV).max()
  print(f"{arch} import: max |odyssey - torch| = {diff:.2e} (logits up to "
        f"{np.abs(want_BxSxV).max():.1f})")
  assert diff < TOL, diff


def test_export_loads_in_transformers_and_matches(hf, imported, tmp_path):
  """Exports new weights (the imported ones plus noise), so to_hf is checked against odyssey's
  logits rather than as the inverse of from_hf; importing the export gives them back (exactly but
for Qwen3-Next norm scales outside [0.5, 2])."""
  arch, hf_model, _, tokens_BxS, _ = hf
  cfg, imported_params = imported
  leaves, treedef = jax.tree.flatten(imported_params)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [
      a + 0.05 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
  tensors = convert_linear.to_hf(params, cfg)
  assert set(tensors) == set(hf_model.state_dict())
  assert all(a.dtype == np.float32 for a in tensors.values())
  # Qwen3-Next's multi-token-prediction head is skipped (as transformers skips it); other tensors
  # without a place are named.
  mtp = {"mtp.fc.weight": np.zeros((4, 4), np.float32)}
  back = convert_linear.from_hf(convert.Tensors({**tensors, **mtp}, "exported"), cfg)
  with pytest.raises(ValueError, match="1 tensor.*'model.extra.weight'"):
    convert_linear.from_hf(convert.Tensors(
        {**tensors, "model.extra.weight": mtp["mtp.fc.weight"]}, "exported"), cfg)
  for (path, got), want in zip(jax.tree.flatten_with_path(back)[0], jax.tree.leaves(params)):
    name = jax.tree_util.keystr(path)
    if arch == "qwen3_next" and name.endswith("['scale']") and "mixer" not in name:
      # Stored as w = scale - 1, exact (Sterbenz) for scales in [0.5, 2], within one float32
      # spacing of 1 + |scale| outside.
      assert (np.abs(got - want) <= np.spacing(np.float32(1) + np.abs(want))).all(), name
      assert np.array_equal(got[(want >= 0.5) & (want <= 2)], want[(want >= 0.5) & (want <= 2)])
    else:
      np.testing.assert_array_equal(got, want, err_msg=name)
  convert.write_hf(str(tmp_path), convert_linear.hf_config(cfg), tensors, convert_linear.WEIGHTS)
  reloaded = getattr(transformers, convert_linear.ARCHITECTURES[arch]).from_pretrained(
      str(tmp_path)).float().eval()
  for name, a in reloaded.state_dict().items():
    np.testing.assert_array_equal(a.numpy(), tensors[name], err_msg=name)
  want_BxSxV = np.asarray(_jit_forward(cfg)(params, tokens_BxS))
  diff = np.abs(_torch_logits(reloaded, tokens_BxS) - want_BxSxV).max()
  print(f"{arch} export: max |torch(exported) - odyssey| = {diff:.2e}")
  assert diff < TOL, diff


def test_train_convert_round_trip(hf, tmp_path):
  """train.convert imports the folder into a workdir on the architecture's base experiment and
  exports it again: the original tensors come back (Qwen3-Next's norm offsets within the one
  float32 rounding of 1 + w)."""
  from train import convert as cli
  arch, hf_model, folder, _, _ = hf
  cli.import_hf("linear_rnn", str(folder), str(tmp_path / "conv"))
  saved = json.loads((tmp_path / "conv" / "config.json").read_text())
  assert saved["model"]["name"] == "linear_rnn"
  assert saved["model"]["mixer"] == {"mamba2": "mamba2", "qwen3_next": "gated_deltanet"}[arch]
  cli.export_hf("linear_rnn", str(tmp_path / "conv"), str(tmp_path / "out"))
  _, tensors = convert.read_hf(str(tmp_path / "out"), convert_linear.WEIGHTS)
  original = hf_model.state_dict()
  assert set(tensors.names()) == set(original)
  for name, w in original.items():
    w, got = w.numpy(), tensors.take(name)
    if name.endswith(OFFSETS):
      assert (np.abs(got - w) <= np.spacing(np.float32(1) + np.abs(w))).all(), name
    else:
      np.testing.assert_array_equal(got, w, err_msg=name)


def test_tied_head():
  config = transformers.Mamba2Config(vocab_size=V, hidden_size=32, num_heads=4, head_dim=16,
                                     n_groups=2, state_size=8, num_hidden_layers=1,
                                     tie_word_embeddings=True)
  state = {k: v.numpy() for k, v in transformers.Mamba2ForCausalLM(config).state_dict().items()}
  cfg = _cfg(convert_linear.model_fields(config.to_dict()))
  params = convert_linear.from_hf(convert.Tensors(state, "tied"), cfg)
  assert cfg.tie_embeddings and "lm_head" not in params
  assert set(convert_linear.to_hf(params, cfg)) == set(state) - {"lm_head.weight"}
  state["lm_head.weight"] = state["lm_head.weight"] + 1
  with pytest.raises(ValueError, match="differs from the embedding"):
    convert_linear.from_hf(convert.Tensors(state, "tied"), cfg)


def test_unconvertible_models_are_refused():
  qwen = dict(model_type="qwen3_next", vocab_size=V, hidden_size=32, num_hidden_layers=4,
              intermediate_size=64, num_attention_heads=4, linear_num_value_heads=4)
  with pytest.raises(ValueError, match="dense MLPs only: only checkpoints with num_experts=0"):
    convert_linear.model_fields(qwen)  # transformers' default: 512 experts
  assert convert_linear.model_fields({**qwen, "mlp_only_layers": [0, 1, 2, 3]})["mlp_dim"] == 64
  with pytest.raises(ValueError, match="layer_types"):
    convert_linear.model_fields({**qwen, "num_experts": 0, "layer_types": [
        "linear_attention", "full_attention", "linear_attention", "linear_attention"]})
  with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
    convert_linear.model_fields({**qwen, "num_experts": 0,
                                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
  mamba2 = dict(model_type="mamba2", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                num_heads=4, head_dim=16)
  with pytest.raises(ValueError, match="does not clamp the time step"):
    convert_linear.model_fields({**mamba2, "time_step_limit": [0.0, 0.3]})
  with pytest.raises(ValueError, match="model_type='mamba'"):
    convert_linear.model_fields({**mamba2, "model_type": "mamba"})

  def cfg(**fields):
    base = dict(vocab_size=V, num_layers=4, d_model=32, linear_heads=4, linear_k_dim=8,
                linear_v_dim=8)
    return linear_rnn.Config.from_config(ml_collections.ConfigDict({**base, **fields}))
  with pytest.raises(ValueError, match="model.mixer='gla' has no Hugging Face layout"):
    convert_linear.hf_config(cfg(mixer="gla", mlp_dim=64))
  with pytest.raises(ValueError, match="Mamba2ForCausalLM's blocks are the mixer alone"):
    convert_linear.hf_config(cfg(mixer="mamba2", attention_every=2, num_heads=4,
                                 num_kv_heads=2))
  with pytest.raises(ValueError, match="attn_output_gate=True"):
    convert_linear.to_hf({}, cfg(mixer="gated_deltanet", mlp_dim=64, attention_every=4,
                                 num_heads=4, num_kv_heads=2, qk_norm=True))
