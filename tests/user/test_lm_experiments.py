"""The README's launch commands of the byte-LM experiments (MoE Llama, Mamba, MEGABYTE and the
hybrid MBLM) through `python -m train`, as written: the experiment's own mesh on 8 simulated CPU
devices, its evaluation and its end-of-run text sample.

Overrides, only of step counts and sizes (a Mamba step of the full 16x128 batch takes ~5 s on 2
loaded cores): ``--config.train.steps`` (6 of 500; the step-0 and final evaluations bracket them),
``--config.opt.warmup_steps`` (2 of 50: at step 6 of a 50-step warmup the learning rate is too
small for the validation loss to move), ``--config.train.batch_size`` (8 of 16; 8 is divisible by
every mesh here, moe_lm_stdlib's expert=4 x data=2 included), ``--config.eval.steps`` (2 of 8
batches) and ``--config.sample.max_new_tokens`` (48 of 200 tokens; the sample stays on).
(lm_stdlib itself is the make-run test's job.) The hybrid MBLM (both block kinds) is also
rerun with one more step, which must resume from the checkpoint.
"""

import pytest

from tests.user import check_lm_run, run, substitute
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
    "megabyte_stdlib": MEGABYTE.replace("[:local=mamba]", ""),
    "megabyte_stdlib:local=mamba": MEGABYTE.replace("[:local=mamba]", ":local=mamba"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_lm_experiment_trains_evaluates_and_samples(name, tmp_path):
  workdir = tmp_path / "run"
  command = substitute(COMMANDS[name], DIR=workdir) + OVERRIDES
  out = run(command, tmp_path / "run.log", timeout=600).stdout
  check_lm_run(workdir, out, STEPS, f"experiments/{name.replace(':', '.py:')}"
               if ":" in name else f"experiments/{name}.py")
  from tests.user import metrics
  if name == "moe_lm_stdlib":
    train = metrics(workdir, "train")
    assert train and all(m["loss"] > m["ce_loss"] and "moe_load_max" in m for m in train)
  if name == "megabyte_stdlib:local=mamba":
    # The hybrid (both block kinds) resumes: the same command with one more step continues from
    # the final checkpoint instead of starting over.
    more = command.replace(f"--config.train.steps={STEPS}", f"--config.train.steps={STEPS + 1}")
    again = run(more, tmp_path / "rerun.log", timeout=600).stdout
    assert f"resumed from step {STEPS}" in again and f"done: step {STEPS + 1}." in again
    steps = [m["step"] for m in metrics(workdir, "train")]  # logged every log.every steps
    assert steps == sorted(set(steps)) and steps[-2:] == [STEPS, STEPS + 1], steps
