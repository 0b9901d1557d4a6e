"""The documented launch commands of the byte-LM experiments (MoE Llama, Mamba, MEGABYTE, the
hybrid MBLM, Gated DeltaNet, Mamba-2 and the sequence-parallel Gated DeltaNet/attention hybrid)
through `python -m train`, as written: the experiment's own mesh (or
the documented one) on 8 simulated CPU devices, its evaluation and its end-of-run text sample.

Overrides, only of step counts and sizes (a Mamba step of the full 16x128 batch takes ~5 s on 2
loaded cores): ``--config.train.steps`` (6 of 500; the step-0 and final evaluations bracket them),
``--config.opt.warmup_steps`` (2 of 50: at step 6 of a 50-step warmup the learning rate is too
small for the validation loss to move), ``--config.train.batch_size`` (8 of 16; 8 is divisible by
every mesh here, moe_lm_stdlib's expert=4 x data=2 included), ``--config.eval.steps`` (2 of 8
batches) and ``--config.sample.max_new_tokens`` (48 of 200 tokens; the sample stays on).
(lm_stdlib itself is the make-run test's job; MEGABYTE runs in its hybrid MBLM form,
``:local=mamba``: the form without it only swaps the local blocks for Transformer ones, whose step
and generation the family's parity and generation tests cover.) lm_stdlib_bpe runs with
``ODYSSEY_CACHE`` (documented) set to an empty folder, as on a fresh machine: the first run must
build its tokenizer and token streams there, and a rerun with one more step must reuse them
untouched and resume (and its metric lines stay in order).
"""

import hashlib
import json

import pytest

from tests.user import check_lm_run, metrics, run, substitute
from tests.user.commands import doc

STEPS = 6
OVERRIDES = (f" --config.train.steps={STEPS} --config.opt.warmup_steps=2"
             " --config.train.batch_size=8 --config.eval.steps=2 --config.sample.max_new_tokens=48")

MEGABYTE = doc("python -m train --config=experiments/megabyte_stdlib.py[:local=mamba] "
               "--workdir=DIR --cpu_devices=8")
COMMANDS = {
    "moe_lm_stdlib": doc("python -m train --config=experiments/moe_lm_stdlib.py --workdir=DIR "
                         "--cpu_devices=8"),
    "mamba_stdlib": doc("python -m train --config=experiments/mamba_stdlib.py --workdir=DIR "
                        "--cpu_devices=8"),
    "megabyte_stdlib:local=mamba": MEGABYTE.replace("[:local=mamba]", ":local=mamba"),
    "lm_stdlib_bpe": doc("python -m train --config=experiments/lm_stdlib_bpe.py --workdir=DIR "
                         "--cpu_devices=8"),
    "gdn_stdlib": doc("python -m train --config=experiments/gdn_stdlib.py --workdir=DIR "
                      "--cpu_devices=8"),
    "mamba2_stdlib": doc("python -m train --config=experiments/mamba2_stdlib.py --workdir=DIR "
                         "--cpu_devices=8"),
    "hybrid_stdlib": doc("python -m train --config=experiments/hybrid_stdlib.py --workdir=DIR "
                         "--cpu_devices=8 --config.mesh.fsdp=1 --config.mesh.tensor=1 "
                         "--config.mesh.seq=4"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_lm_experiment_trains_evaluates_and_samples(name, tmp_path):
  workdir = tmp_path / "run"
  command = substitute(COMMANDS[name], DIR=workdir) + OVERRIDES
  if name == "lm_stdlib_bpe":
    command = f"ODYSSEY_CACHE={tmp_path / 'cache'} {command}"
  out = run(command, tmp_path / "run.log", timeout=600).stdout
  mesh = (f"experiments/{name.replace(':', '.py:')}" if ":" in name
          else f"experiments/{name}.py")
  if name == "hybrid_stdlib":  # the documented command overrides the experiment's mesh
    mesh = {"data": 2, "fsdp": 1, "tensor": 1, "seq": 4, "expert": 1}
  check_lm_run(workdir, out, STEPS, mesh)
  if name == "moe_lm_stdlib":
    train = metrics(workdir, "train")
    assert train and all(m["loss"] > m["ce_loss"] and "moe_load_max" in m for m in train)
  if name == "lm_stdlib_bpe":
    _check_built_on_first_use_then_reused(command, out, workdir, tmp_path)
  if name == "hybrid_stdlib":  # both sequence-parallel paths in one step, named at launch
    assert ("'seq': 4" in out and "attention: ulysses (all-to-all over seq=4" in out
            and "linear recurrence: state passing over seq=4" in out), out[:3000]


def _check_built_on_first_use_then_reused(command, out, workdir, tmp_path):
  cache = tmp_path / "cache"
  built = sorted(p for p in cache.rglob("*") if p.is_file())
  assert "odyssey: training a byte-level BPE tokenizer of 8192 ids" in out, out[-3000:]
  assert "odyssey: tokenizing the 'train' split" in out and "tokenizing the 'val' split" in out
  # One tokenizer and one token stream per split, nothing half-written; the workdir keeps a copy
  # of the tokenizer the run used, which the vocabulary check and train.generate read.
  assert [p.suffix for p in built] == [".json", ".npy", ".npy"], built
  (tokenizer_json,) = [p for p in built if p.suffix == ".json"]
  assert (workdir / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
  assert json.loads((workdir / "config.json").read_text())["data"]["tokenizer"] == "bpe:8192"
  stamps = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in built}
  more = command.replace(f"--config.train.steps={STEPS}", f"--config.train.steps={STEPS + 1}")
  again = run(more, tmp_path / "rerun.log", timeout=600).stdout
  assert f"resumed from step {STEPS}" in again and f"done: step {STEPS + 1}." in again
  steps = [m["step"] for m in metrics(workdir, "train")]  # logged every log.every steps
  assert steps == sorted(set(steps)) and steps[-2:] == [STEPS, STEPS + 1], steps
  assert "training a byte-level BPE" not in again and "odyssey: tokenizing" not in again, again
  assert sorted(p for p in cache.rglob("*") if p.is_file()) == built
  assert all((p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) == stamps[p]
             for p in built)
