"""train/decoding.py and train/generate.py: cached decoding (Llama KV cache, Mamba state) against
the full forward pass, one compile for the decode step, the sampling knobs, and the CLI."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bench.compile import CompileCounter
from nets import linear_rnn, llama, mamba, megabyte, moe, registry
from tests import run_module
from train import decoding, generate

V = 64
PROMPT_LENS = (3, 7, 5)  # one batch, three prompt lengths


@functools.cache
def tiny(family: str, **kw):
  """(model, random params): init_std 0.5 spreads the logits, so greedy choices are not near-ties
  that float rounding between the two paths could flip."""
  if family == "llama":
    cfg = llama.Config(**{**dict(vocab_size=V, num_layers=2, d_model=32, num_heads=4,
                                 num_kv_heads=2, mlp_dim=48, max_len=64, init_std=0.5), **kw})
  elif family == "mamba":
    cfg = mamba.Config(vocab_size=V, num_layers=2, d_model=32, d_state=8, init_std=0.5, **kw)
  elif family == "linear_rnn":  # a Gated DeltaNet + attention hybrid: both caches
    cfg = linear_rnn.Config(vocab_size=V, num_layers=2, d_model=32, linear_heads=4,
                            linear_k_heads=2, linear_k_dim=8, linear_v_dim=8, mlp_dim=48, chunk=4,
                            attention_every=2, num_heads=4, num_kv_heads=2, max_len=64,
                            init_std=0.5, **kw)
  else:
    cfg = megabyte.Config(vocab_size=V, patch_sizes=(2,), d_model=(32, 16), num_layers=(1, 1),
                          num_heads=(2, 2), mlp_dim=(32, 32), max_len=64, init_std=0.5, **kw)
  model = {"llama": llama, "mamba": mamba, "megabyte": megabyte,
           "linear_rnn": linear_rnn}[family].Model(cfg)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  if family == "mamba":  # its decay and step-size parameters need their own initialisers
    return model, nn.unbox(jax.jit(init)())
  # N(0, 0.5) for everything: compiling the initialisers (MoE's especially) costs seconds.
  rng = np.random.default_rng(0)
  return model, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype),
                             nn.unbox(jax.eval_shape(init)))


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens_BxS, positions_BxS=None, cache=None):
  """model.apply, jitted: eager Flax runs op by op, which costs more than compiling here."""
  if cache is None:
    return model.apply({"params": params}, tokens_BxS, positions_BxS)
  return model.apply({"params": params}, tokens_BxS, positions_BxS, None, cache)


def prompts(lens=PROMPT_LENS, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, n).astype(np.int32) for n in lens]


@pytest.fixture(scope="module", params=["llama", "mamba", "linear_rnn"])
def family_model(request):
  return (request.param, *tiny(request.param))


def full_logits(model, params, rows):
  """Logits of the full forward pass over each row (padded at the end, which causality hides)."""
  N = max(map(len, rows))
  buf = np.zeros((len(rows), N), np.int32)
  for b, row in enumerate(rows):
    buf[b, :len(row)] = row
  return np.asarray(forward(model, params, jnp.asarray(buf)))


def test_greedy_decoding_equals_argmax_of_the_full_forward_and_compiles_once(family_model):
  """Every new token is the argmax of the full forward pass over the tokens before it; the decode
  step compiles once for all 16 positions and again for none when the sampling knobs change."""
  _, model, params = family_model
  ps = prompts()
  with CompileCounter() as counter:
    outs = decoding.generate(model, params, ps, max_new_tokens=12)
    decoding.generate(model, params, ps, max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9,
                      seed=3)
  assert counter.count("decode_step") == 1, counter.functions
  assert counter.count("prefill") == 1, counter.functions
  rows = [np.concatenate([p, o]) for p, o in zip(ps, outs)]
  assert [len(o) for o in outs] == [12, 12, 12]
  logits = full_logits(model, params, rows)
  for b, (p, row) in enumerate(zip(ps, rows)):
    np.testing.assert_array_equal(row[len(p):], logits[b, len(p) - 1:len(row) - 1].argmax(-1))


def test_cached_logits_match_the_full_forward(family_model):
  """Prefill, a 3-token chunk, then single tokens: the same path serves S > 1 and S == 1, and a
  cache longer than the sequence (unwritten slots) changes nothing."""
  family, model, params = family_model
  tokens = jnp.asarray(np.stack(prompts((12, 12), seed=2)))
  want = np.asarray(forward(model, params, tokens))
  cache = registry.get(family).init_cache(model.cfg, 2, 32)
  got = []
  for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    logits, cache = forward(model, params, tokens[:, start:stop], positions, cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4, rtol=0)


def test_decode_step_state_holds_the_full_forward_logits():
  """The logits the decode step leaves for position t are the full forward's at t - 1, for rows
  still inside their prompt (forced tokens) and rows already generating."""
  model, params = tiny("llama")
  ps = prompts()
  lens = np.array([len(p) for p in ps], np.int32)
  buf = np.zeros((3, 10), np.int32)
  for b, p in enumerate(ps):
    buf[b, :len(p)] = p
  knobs = {"temperature": np.float32(0), "top_k": np.int32(0), "top_p": np.float32(1),
           "valid_vocab": np.int32(V), "end_id": np.int32(-1), "pad_id": np.int32(0)}
  logits, cache = decoding.prefill(model, params, jnp.asarray(buf[:, :3]), length=10)
  state = {"tokens": jnp.asarray(buf), "cache": cache, "logits": logits, "t": jnp.int32(3),
           "rng": jax.random.PRNGKey(0), "done": jnp.zeros(3, bool)}
  seen = [np.asarray(logits)]
  for _ in range(3, 9):
    state = decoding.decode_step(model, params, state, lens, lens + 3, knobs)
    seen.append(np.asarray(state["logits"]))
  want = full_logits(model, params, list(np.asarray(state["tokens"])))
  np.testing.assert_allclose(np.stack(seen, axis=1), want[:, 2:9], atol=1e-4, rtol=0)


def test_moe_layers_and_remat_decode_like_the_full_forward():
  """MoE every 2nd layer (moe.stack's Periodic units) under remat: the layer counter in the scan
  carry gives each block its own cache slice."""
  model, params = tiny("llama", moe=moe.Config(num_experts=4, top_k=2, every=2), remat="full")
  tokens = jnp.asarray(np.stack(prompts((9, 9), seed=3)))
  want = np.asarray(forward(model, params, tokens))
  logits, cache = forward(model, params, tokens[:, :6], None, llama.init_cache(model.cfg, 2, 9))
  got = [logits]
  for t in range(6, 9):
    logits, cache = forward(model, params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4, rtol=0)


def test_sampling_knobs():
  model, params = tiny("llama")
  ps = prompts()
  gen = lambda **kw: [o.tolist() for o in decoding.generate(model, params, ps, max_new_tokens=8,
                                                             **kw)]
  greedy = gen()
  assert gen(temperature=1.0, top_k=1, seed=4) == greedy
  assert gen(temperature=1.0, top_p=1e-6, seed=5) == greedy
  assert gen(temperature=1.0, seed=6) == gen(temperature=1.0, seed=6)
  assert gen(temperature=1.0, seed=6) != gen(temperature=1.0, seed=7)
  assert gen(temperature=1.0, top_k=3, top_p=0.8, seed=6) != greedy


def test_choose_keeps_only_the_top_k_and_the_nucleus():
  logits_BxV = jnp.log(jnp.tile(jnp.array([[0.05, 0.5, 0.3, 0.15]]), (400, 1)))
  choose = jax.jit(decoding.choose)
  picked = lambda t, k, p: set(np.asarray(choose(logits_BxV, jax.random.PRNGKey(0), t, k, p)))
  assert picked(1.0, 2, 1.0) == {1, 2}
  assert picked(1.0, 0, 0.75) == {1, 2}  # 0.5 comes before id 2, < 0.75; 0.8 before id 3
  assert picked(1.0, 0, 0.9) == {1, 2, 3}
  assert picked(1.0, 0, 1.0) == {0, 1, 2, 3}
  assert picked(0.0, 0, 1.0) == {1}


def test_end_id_stops_a_row_and_valid_vocab_bounds_the_ids():
  model, params = tiny("llama")
  ps = prompts()
  greedy = decoding.generate(model, params, ps, max_new_tokens=8, valid_vocab=32)
  assert all(o.max() < 32 for o in greedy)
  end = int(greedy[0][2])
  stopped = decoding.generate(model, params, ps, max_new_tokens=8, valid_vocab=32, end_id=end)
  assert stopped[0].tolist() == greedy[0][:list(greedy[0]).index(end)].tolist()


def test_megabyte_takes_the_cache_free_loop():
  model, params = tiny("megabyte")
  assert not decoding.has_cache(model)
  ps = prompts((4, 4))  # one length: one compile of the loop, which is keyed on it
  outs = decoding.generate(model, params, ps, max_new_tokens=4)
  rows = [np.concatenate([p, o]) for p, o in zip(ps, outs)]
  logits = full_logits(model, params, [np.pad(r, (0, 10 - len(r))) for r in rows])
  for b, (p, row) in enumerate(zip(ps, rows)):
    np.testing.assert_array_equal(row[len(p):], logits[b, len(p) - 1:len(row) - 1].argmax(-1))


@pytest.mark.parametrize("kw, message", [
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
])
def test_bad_knobs_raise_a_sentence(kw, message):
  model, params = tiny("llama")
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    decoding.generate(model, params, prompts(), **{"max_new_tokens": 4, **kw})


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A byte-level Llama workdir with random parameters, saved as train.convert saves them
  (parameters only; train.checkpoint.load_trained reads only parameters): far cheaper than
  training a step."""
  from configs import lm
  path = tmp_path_factory.mktemp("generate")
  config = lm.get_config("size=test")
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_len=64)
  config.train.seq_len = 32
  return write_random_llama_workdir(path, config, step=0)


def write_random_llama_workdir(path, config, step: int):
  """Writes ``config``'s Llama with random parameters into workdir ``path`` as train.convert
  does (config.json, a parameters-only checkpoint at ``step``); returns ``path``."""
  from train import models
  model = llama.Model(models.model_config(config))
  init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  params = nn.unbox(init()["params"])
  manager = ocp.CheckpointManager(os.path.join(path, "checkpoints"),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  return path


def test_cli_prints_a_continuation_per_prompt(workdir):
  """Two prompts as text and the first again as ids (bypassing the tokenizer), greedy."""
  proc = run_module("train.generate", f"--workdir={workdir}", "--prompt=def ", "--prompt=class ",
                    "--prompt_ids=100,101,102,32", "--max_new_tokens=12", timeout=120)
  blocks = proc.stdout.split("=== prompt ")[1:]
  assert [b.split("\n", 1)[0] for b in blocks] == [
      "0, sample 0 ===", "1, sample 0 ===", "2, sample 0 ==="]
  texts = [b.split("\n", 1)[1] for b in blocks]
  assert texts[0].startswith("def ") and texts[1].startswith("class ")
  assert texts[2] == texts[0]


def test_cli_refuses_a_bad_flag_with_one_sentence(workdir):
  proc = run_module("train.generate", f"--workdir={workdir}", "--prompt=x", "--top_p=1.5",
                    ok=False, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "odyssey: top_p=1.5 must be in (0, 1] (1 keeps every token).")
  assert not proc.stdout


@pytest.mark.parametrize("change, message", [
    ("no_checkpoint", "has no checkpoint to generate from"),
    ("task", "holds a 'classification' model; generation needs a language model"),
    ("long_prompt", "prompt 0 has 60 tokens, which with --max_new_tokens=8 exceeds the model's "
                    "max_len=64"),
    ("bad_ids", "--prompt_ids='1,x' is not a comma-separated list of integers"),
])
def test_bad_input_is_one_sentence_before_loading(workdir, tmp_path, change, message):
  path, texts, ids = str(workdir), ["def "], []
  if change in ("no_checkpoint", "task"):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    if change == "task":
      config["task"] = "classification"
    path = str(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
      json.dump(config, f)
  texts = ["x" * 60] if change == "long_prompt" else texts
  ids = ["1,x"] if change == "bad_ids" else ids
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    generate.prepare(path, texts, ids, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
                     num_samples=1)


def test_a_workdir_tokenizer_json_encodes_the_prompts(workdir, tmp_path):
  """Converted Hugging Face workdirs carry tokenizer.json; prompts go through it, not bytes."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"[UNK]": 0, "def": 1, "class": 2, "x": 3}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.save(str(tmp_path / "tokenizer.json"))
  os.symlink(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  os.symlink(os.path.join(workdir, "config.json"), tmp_path / "config.json")
  _, codec, ids = generate.prepare(str(tmp_path), ["def x class"], [], max_new_tokens=4,
                                   temperature=0.0, top_k=0, top_p=1.0, num_samples=1)
  assert ids == [[1, 3, 2]] and codec.valid_vocab == 4
  assert codec.decode([1, 3, 2, 3]) == "def x class x"
