"""`make run`, the main job, as the user runs it; then what the README does with its workdir:
`python -m train.generate`, `python -m train.evaluate`, `python -m train.convert` both ways,
generation from the import and fine-tuning from it.

One `make run` (module fixture) feeds every test here. Its only override is
ARGS='--config.train.steps=20' (the documented way): 20 of the 500 steps, enough for the
validation bits/byte to fall clearly (8.59 -> about 4.6), with the experiment's own mesh
(data=2 x fsdp=2 x tensor=2 on 8 simulated CPU devices), its evaluation and its end-of-run sample
(4 samples of 200 tokens: the step at which the sharded KV-cache decode once deadlocked).
"""

import json
import os
import re
import shlex

import pytest

from tests.user import experiment_config, metrics, optional_dropped, run, substitute
from tests.user.commands import doc

STEPS = 20


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("make_run")
  workdir = root / "lm_stdlib"
  command = f"{doc('make run')} ARGS='--config.train.steps={STEPS}' WORKDIR={workdir}"
  # `make run` installs first when the virtualenv is older than pyproject.toml; a test must not
  # run pip, so it checks that make would not (make test installs before the suite starts).
  dry = run(f"make -n {command[len('make '):]}", root / "dry.log", timeout=60)
  if "pip install" in dry.stdout:
    pytest.fail(f"the virtualenv's install stamp is older than pyproject.toml, so `make run` would "
                f"reinstall; run `make install` first:\n{dry.stdout[-2000:]}")
  out = run(command, root / "make_run.log", timeout=600).stdout
  return dict(workdir=workdir, out=out, root=root)


def test_make_run_trains_evaluates_checkpoints_and_samples(make_run):
  workdir, out = make_run["workdir"], make_run["out"]
  assert f"done: step {STEPS}." in out
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'seq': 1, 'expert': 1} on 8 cpu devices" in out
  val = metrics(workdir, "val")
  assert val[0]["step"] == 0 and val[-1]["step"] == STEPS, val
  assert val[-1]["bits_per_byte"] < val[0]["bits_per_byte"], val
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()
  events = [f for f in os.listdir(workdir / "tb") if f.startswith("events.out.tfevents")]
  assert events and all(os.path.getsize(workdir / "tb" / f) > 0 for f in events), events
  # The loop prints "sample:", the first sample, then a rule; all samples go to samples.txt.
  printed = out.split("sample:\n", 1)[1].split("\n" + "-" * 40, 1)[0]
  assert printed.startswith("def ") and printed[len("def "):].strip(), out[-3000:]
  samples = (workdir / "samples.txt").read_text()
  assert samples.count("=== sample") == 4 and printed in samples


def test_make_run_recipe_is_the_documented_command(make_run, tmp_path):
  """`make run` runs the README's lm_stdlib command (the CLI synopsis and the Experiments table's
  line) with ARGS appended, so the make-run test covers those commands too."""
  dry = run("make -n run ARGS='--config.train.steps=7 --config.eval.every=5' WORKDIR=DIR",
            tmp_path / "dry.log", timeout=60).stdout
  recipe = " ".join(dry.replace("\\\n", " ").split())
  documented = doc("python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR "
                   "--cpu_devices=8")
  assert f"{VENV_PYTHON} -m {documented[len('python -m '):]} --config.train.steps=7 " \
         f"--config.eval.every=5" in recipe, recipe
  assert "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" in recipe


VENV_PYTHON = ".venv/bin/python"


def test_make_test_and_make_clean_recipes(tmp_path):
  """What can be checked of the make commands no test can run: `make test` is pytest over tests/
  with two workers and whole files per worker; `make clean` removes workdirs/ and nothing else;
  setting PYTHON (README's quick start) makes the virtualenv with that interpreter (dry runs:
  nothing is executed; a real one would reinstall every package in the shared checkout)."""
  test = run("make -n test", tmp_path / "test.log", timeout=60).stdout
  assert re.search(r"\.venv/bin/python -m pytest .*-n 2 --dist loadfile .*tests$", test, re.M), test
  clean = run("make -n clean", tmp_path / "clean.log", timeout=60).stdout
  assert clean.strip().splitlines()[-1] == "rm -rf workdirs", clean
  venv, python = tmp_path / "venv", tmp_path / "bin" / "python3.12"
  fresh = run(f"make -n PYTHON={python} VENV={venv} install", tmp_path / "python.log",
              timeout=60).stdout
  assert f"{python} -m venv {venv}" in fresh, fresh


# ---------------------------------------------------------------------------- train.generate

README_GENERATE = doc(
    "python -m train.generate --workdir=workdirs/lm_stdlib --prompt=\"def \" "
    "--prompt=\"class Foo\" --max_new_tokens=120 --temperature=0.7 --top_k=40 --top_p=0.9 "
    "--seed=1 [--num_samples=N] [--prompt_ids=1,2,3] [--end_id=ID] [--step=N]")


def samples_of(out: str) -> dict:
  """``{(prompt, sample): text}`` from train.generate's ``=== prompt P, sample S ===`` blocks."""
  found = re.split(r"^=== prompt (\d+), sample (\d+) ===\n", out, flags=re.M)
  return {(int(p), int(s)): text.rstrip("\n") for p, s, text in zip(*[iter(found[1:])] * 3)}


@pytest.fixture(scope="module")
def generated(make_run):
  """The README's generate command on the make-run workdir (the required flags: 2 prompts x 120
  sampled tokens, seed 1), run once for the generate and the round-trip tests."""
  command = substitute(optional_dropped(README_GENERATE),
                       **{"workdirs/lm_stdlib": make_run["workdir"]})
  return run(command, make_run["root"] / "generate.log", timeout=300).stdout


def test_generate_on_the_make_run_workdir(make_run, generated, tmp_path):
  texts = samples_of(generated)
  assert sorted(texts) == [(0, 0), (1, 0)], generated[-2000:]
  assert texts[0, 0].startswith("def ") and texts[1, 0].startswith("class Foo")
  assert all(len(t) > len("class Foo") for t in texts.values())
  # The synopsis with its [--prompt=TEXT ...] given once; greedy by default, so a second prompt
  # of the same text continues the same way.
  synopsis = doc("python -m train.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] "
                 "--max_new_tokens=N")
  two = substitute(synopsis.replace("[--prompt=TEXT ...]", "--prompt=TEXT2 --prompt=TEXT"),
                   DIR=make_run["workdir"], TEXT="import ", TEXT2="for ", N=16)
  greedy = samples_of(run(two, tmp_path / "two.log", timeout=300).stdout)
  assert sorted(greedy) == [(0, 0), (1, 0), (2, 0)]
  assert greedy[0, 0] == greedy[2, 0] and greedy[0, 0].startswith("import ")
  assert greedy[1, 0].startswith("for ") and len(greedy[1, 0]) > len("for ")
  # The README form with its options: 2 samples per prompt, an id prompt, an end id, a step.
  options = {"[--num_samples=N]": "--num_samples=2", "[--prompt_ids=1,2,3]": "--prompt_ids=1,2,3",
             "[--end_id=ID]": "--end_id=258", "[--step=N]": f"--step={STEPS}"}
  command = README_GENERATE
  for optional, given in options.items():
    command = command.replace(optional, given)
  out = run(substitute(command, **{"workdirs/lm_stdlib": make_run["workdir"]}),
            tmp_path / "options.log", timeout=300).stdout
  texts = samples_of(out)
  assert sorted(texts) == [(p, s) for p in range(3) for s in range(2)], out[-2000:]
  assert texts[2, 0].startswith("\x01\x02\x03")
  # docs/decoding.md: greedy on the workdir's mesh (data=2 x fsdp=2 x tensor=2; the CPU devices
  # are simulated as the mesh needs), and on another mesh: the same tokens.
  own = doc("python -m train.generate --workdir=DIR --prompt=\"def \" --max_new_tokens=100")
  other = doc("python -m train.generate --workdir=DIR --prompt=\"def \" --mesh=fsdp=4,tensor=2")
  own = samples_of(run(substitute(own, DIR=make_run["workdir"]), tmp_path / "own.log",
                       timeout=300).stdout)
  other = samples_of(run(substitute(other, DIR=make_run["workdir"]), tmp_path / "other.log",
                         timeout=300).stdout)
  assert list(own) == [(0, 0)] and own[0, 0].startswith("def ") and len(own[0, 0]) > 10, own
  assert other == own


# ---------------------------------------------------------------------------- train.evaluate


def test_evaluate_on_the_make_run_workdir(make_run, tmp_path):
  """The evaluate synopsis on the make-run workdir with every option given: a 3-question task
  file and the built-in stdlib_next_line (its first 8 questions: --limit lowers the size), on
  another mesh than training's. One line per task is printed and appended to evals.jsonl."""
  tasks = tmp_path / "tasks.jsonl"
  tasks.write_text("".join(json.dumps(q) + "\n" for q in [
      {"context": "def add(a, b):\n    return", "choices": [" a + b", " )(", " 1e9j"], "gold": 0},
      {"context": "import", "choices": [" os", "\n\n\n"], "gold": 0},
      {"query": "class Point:\n", "choices": ["    x = 0", "§§§§"], "label": 0}]))
  command = doc("python -m train.evaluate --workdir=DIR --tasks=FILE.jsonl [--tasks=...] "
                "[--limit=N] [--mesh=...]")
  for optional, given in {"[--tasks=...]": "--tasks=stdlib_next_line", "[--limit=N]": "--limit=8",
                          "[--mesh=...]": "--mesh=fsdp=4,tensor=2"}.items():
    command = command.replace(optional, given)
  workdir = make_run["workdir"]
  out = run(substitute(command, DIR=workdir, **{"FILE.jsonl": tasks}), tmp_path / "evaluate.log",
            timeout=300).stdout
  printed = re.findall(r"^(.+): (\d+) questions, acc (\d\.\d{4}), acc_norm (\d\.\d{4})$", out,
                       re.M)
  assert [(task, n) for task, n, _, _ in printed] == [(str(tasks), "3"),
                                                      ("stdlib_next_line", "8")], out[-2000:]
  results = [json.loads(line) for line in (workdir / "evals.jsonl").read_text().splitlines()]
  assert [(r["task"], r["step"], r["questions"]) for r in results[-2:]] == [
      (str(tasks), STEPS, 3), ("stdlib_next_line", STEPS, 8)]
  for (_, _, acc, acc_norm), result in zip(printed, results[-2:]):
    assert (acc, acc_norm) == (f"{result['acc']:.4f}", f"{result['acc_norm']:.4f}")
    assert 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1


# ------------------------------------------------------------------ train.convert both ways


@pytest.fixture(scope="module")
def converted(make_run):
  """The make-run workdir exported to a Hugging Face folder and imported back (README commands;
  RUN = the make-run workdir, HF_OUT -> HF_DIR = the export, WORKDIR = the import)."""
  root = make_run["root"]
  hf, imported = root / "hf_out", root / "imported"
  export = doc("python -m train.convert --from=odyssey --family=llama --src=RUN --dst=HF_OUT "
               "[--step=N] [--dtype=bfloat16] [--max_shard_gb=5]")
  export = export.replace("[--step=N]", "--step=N")
  exported = run(substitute(optional_dropped(export), RUN=make_run["workdir"], HF_OUT=hf,
                            N=STEPS), root / "export.log", timeout=300).stdout
  imp = doc("python -m train.convert --from=hf --family=llama --src=HF_DIR --dst=WORKDIR "
            "[--dtype=bfloat16]")
  imported_out = run(substitute(optional_dropped(imp), HF_DIR=hf, WORKDIR=imported),
                     root / "import.log", timeout=300).stdout
  return dict(hf=hf, imported=imported, exported_out=exported, imported_out=imported_out)


def test_export_then_import_then_generate_the_same_text(make_run, converted, generated, tmp_path):
  hf, imported = converted["hf"], converted["imported"]
  assert "odyssey: exported" in converted["exported_out"]
  assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
  assert "imported 885,888 float32 parameters" in converted["imported_out"], converted["imported_out"]
  assert json.loads((imported / "converted.json").read_text())["family"] == "llama"
  # The synopsis form, both directions, into fresh folders: the same tensors come back.
  synopsis = doc("python -m train.convert --from=hf|odyssey "
                 "--family=llama|vit|swin|mamba|dit|linear_rnn --src=DIR --dst=DIR")
  form = lambda direction: synopsis.replace("hf|odyssey", direction).replace(
      "llama|vit|swin|mamba|dit|linear_rnn", "llama").replace("--src=DIR --dst=DIR",
                                                          "--src=SRC --dst=DST")
  run(substitute(form("odyssey"), SRC=imported, DST=tmp_path / "hf2"), tmp_path / "e.log",
      timeout=300)
  run(substitute(form("hf"), SRC=tmp_path / "hf2", DST=tmp_path / "w2"), tmp_path / "i.log",
      timeout=300)
  assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (
      hf / "model.safetensors").read_bytes()
  # The README's generate command on the import: float32 both ways, the same seed, so the same
  # sampled text as from the trained workdir.
  command = substitute(optional_dropped(README_GENERATE), **{"workdirs/lm_stdlib": imported})
  again = run(command, tmp_path / "generate.log", timeout=300).stdout
  assert samples_of(again) == samples_of(generated), (again[-1500:], generated[-1500:])


def test_finetune_from_the_imported_workdir_as_written(make_run, converted, tmp_path):
  """The README's fine-tune command, `--config.model.d_model=... (...)` replaced by d_model and
  the model fields of WORKDIR/config.json that differ from the experiment's (copying every field
  fails: the import records head_dim and init_std, which lm_stdlib's config has no field for, and
  a locked config refuses new fields); steps lowered to 5 (of 500) for time."""
  command = doc("python -m train --config=experiments/lm_stdlib.py --config.init.from=WORKDIR "
                "--workdir=RUN --cpu_devices=8 --config.model.d_model=... (the imported model's "
                "fields: see "
                "WORKDIR/config.json)")
  ours = experiment_config("experiments/lm_stdlib.py").model
  theirs = json.loads((converted["imported"] / "config.json").read_text())["model"]
  fields = {k: v for k, v in theirs.items()
            if k == "d_model" or (k in ours and not isinstance(v, dict) and v != ours[k])}
  flags = " ".join(f"--config.model.{k}={shlex.quote(str(v))}" for k, v in fields.items())
  command = command.split(" --config.model.d_model=...")[0] + " " + flags
  out = run(substitute(command, WORKDIR=converted["imported"], RUN=tmp_path / "ft") +
            " --config.train.steps=5", tmp_path / "ft.log", timeout=400).stdout
  assert f"fresh start with parameters from {converted['imported']} step 0" in out
  assert "sample:" in out and metrics(tmp_path / "ft", "val")
