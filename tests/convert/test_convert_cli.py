"""The user's path through the CLIs: a Hugging Face Llama folder -> ``train.convert`` -> fine-tune
with ``--config.init.from`` -> export -> transformers loads the same function again."""

import json
import os

import numpy as np
import pytest

from tests import run_module
from tests.convert import parity_import

torch = parity_import("torch")
transformers = parity_import("transformers")

# Byte-level vocabulary (odyssey's stdlib data has 259 ids) so the model can fine-tune on it.
SIZES = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-6)
MATCHING = [f"--config.model.{k}={v}" for k, v in dict(
    vocab_size=384, d_model=32, mlp_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
    max_len=128, norm_eps=1e-6).items()]
SHORT_RUN = ["--cpu_devices=1", "--config.train.steps=2", "--config.train.seq_len=32",
             "--config.train.batch_size=4", "--config.eval.every=2", "--config.eval.steps=1",
             "--config.eval.batch_size=4", "--config.ckpt.every=2", "--config.log.progress=False",
             "--config.sample.max_new_tokens=4"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """A tiny random LlamaForCausalLM saved in shards (so the index file is read)."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # they initialise to ones
        p.copy_(1 + 0.3 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("hf") / "llama"
  model.save_pretrained(folder, max_shard_size="40KB")
  assert (folder / "model.safetensors.index.json").exists()
  return model, folder


def _logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def test_import_finetune_export(hf_llama, tmp_path):
  model, hf_dir = hf_llama
  conv, ft, out = tmp_path / "conv", tmp_path / "ft", tmp_path / "out"
  convert = lambda *a, ok=True: run_module("train.convert", *a, ok=ok)

  proc = convert("--from=hf", "--family=llama", f"--src={hf_dir}", f"--dst={conv}")
  assert "imported 43,168 float32 parameters (21 tensors)" in proc.stdout, proc.stdout
  assert json.loads((conv / "converted.json").read_text())["family"] == "llama"
  again = convert("--from=hf", "--family=llama", f"--src={hf_dir}", f"--dst={conv}", ok=False)
  assert again.returncode == 1 and "already holds files" in again.stderr
  no_pickle = tmp_path / "pickled"
  no_pickle.mkdir()
  (no_pickle / "config.json").write_text((hf_dir / "config.json").read_text())
  (no_pickle / "pytorch_model.bin").write_bytes(b"not opened")
  refused = convert("--from=hf", "--family=llama", f"--src={no_pickle}", f"--dst={tmp_path / 'x'}",
                    ok=False)
  assert refused.returncode == 1 and "pickle files that odyssey never loads" in refused.stderr

  # The converted workdir is not trained in directly, and a model of other shapes is refused.
  train = lambda *a, ok=True: run_module("train", "--config=configs/lm.py:size=test", *a, ok=ok)
  direct = train(f"--workdir={conv}", "--cpu_devices=1", ok=False)
  assert direct.returncode == 1 and f"--config.init.from={conv}" in direct.stderr
  other = train(f"--workdir={ft}", f"--config.init.from={conv}", "--cpu_devices=1", ok=False)
  assert other.returncode == 1 and "params['embed']['embedding']" in other.stderr
  assert "has shape (384, 32), but this model config needs (384, 64)" in other.stderr
  assert not ft.exists()  # refused before anything was written

  # Fine-tune with lr 0: the checkpoint must hold exactly the imported parameters.
  proc = train(f"--workdir={ft}", f"--config.init.from={conv}", "--config.opt.lr=0", *MATCHING,
               *SHORT_RUN)
  assert f"fresh start with parameters from {conv} step 0" in proc.stdout
  assert "differ" not in proc.stdout.split("fresh start")[1].split("\n")[0]

  convert("--from=odyssey", "--family=llama", f"--src={ft}", f"--dst={out}")
  assert (out / "model.safetensors").exists()
  exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  tokens = np.random.default_rng(0).integers(0, 384, (2, 24))
  diff = np.abs(_logits(exported, tokens) - _logits(model, tokens)).max()
  assert diff < 1e-5, diff


def test_export_converts_dtype_explicitly(hf_llama, tmp_path):
  from safetensors import safe_open

  from train import convert
  _, hf_dir = hf_llama
  convert.import_hf("llama", str(hf_dir), str(tmp_path / "conv"))
  convert.export_hf("llama", str(tmp_path / "conv"), str(tmp_path / "bf16"), "bfloat16",
                    max_shard_bytes=20_000)
  index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1 and all(os.path.exists(tmp_path / "bf16" / f) for f in files)
  with safe_open(str(tmp_path / "bf16" / files[0]), framework="pt") as f:
    assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_imported_dit_samples_latents(tmp_path):
  """A diffusers DiT folder -> train.convert -> train.sample: 4-channel latents are written as
  .npy (no VAE decoder here), one row of the requested classes each."""
  diffusers = parity_import("diffusers")
  from train import convert, sample
  torch.manual_seed(0)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
      sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  model.save_pretrained(tmp_path / "hf")
  convert.import_hf("dit", str(tmp_path / "hf"), str(tmp_path / "conv"))
  path, latents = sample.sample(str(tmp_path / "conv"), [1, 7], cfg_scale=2.0, steps=2,
                                per_class=2)
  assert path.endswith("sample_1-7_cfg2_2steps.npy") and os.path.exists(path)
  assert latents.shape == (4, 8, 8, 4) and np.isfinite(latents).all()
  assert np.array_equal(np.load(path), latents)


def test_imported_llama_generates_as_transformers(hf_llama, tmp_path):
  """Greedy decoding with odyssey's KV cache on the imported weights equals transformers'
  greedy ``generate`` on the original model, for two prompts of different lengths."""
  from train import checkpoint, convert, decoding
  model, hf_dir = hf_llama
  convert.import_hf("llama", str(hf_dir), str(tmp_path / "conv"))
  _, ours, _, params = checkpoint.load_trained(str(tmp_path / "conv"))
  prompts = [[5, 77, 301, 9, 120], [42, 7]]
  outs = decoding.generate(ours, params, prompts, max_new_tokens=12, temperature=0.0)
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0].numpy()
    assert list(np.asarray(out)) == list(theirs[len(prompt):]), (out, theirs)


def test_import_and_export_carry_the_tokenizer(hf_llama, tmp_path):
  """A Hugging Face folder's tokenizer.json travels into the imported workdir (which generation
  and a fine-tune's data.tokenizer use) and out again next to the exported safetensors; a workdir
  that was trained rather than imported exports its own tokenizer's special ids."""
  import shutil

  from train import convert, tokenizer
  _, hf_dir = hf_llama
  src = tmp_path / "hf"
  shutil.copytree(hf_dir, src)
  tok = tokenizer.train_bpe(["def f(x):\n    return x\n" * 20], 300, str(src / "tokenizer.json"))
  convert.import_hf("llama", str(src), str(tmp_path / "conv"))
  conv = tmp_path / "conv"
  assert tokenizer.from_workdir(str(conv)).name == tok.name
  saved = json.loads((conv / "config.json").read_text())
  assert saved["data"]["tokenizer"] == str(conv / "tokenizer.json")
  convert.export_hf("llama", str(conv), str(tmp_path / "out"))
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
  (conv / "converted.json").unlink()  # now it reads as a run that trained with tok
  convert.export_hf("llama", str(conv), str(tmp_path / "out2"))
  config = json.loads((tmp_path / "out2" / "config.json").read_text())
  assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 2)
