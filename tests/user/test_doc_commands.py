"""Every command line README.md and docs/*.md show names a real module, real flags, real config
fields and real make targets, and every file the docs name exists. Nothing trains: each program
only prints its flags (``--helpfull``, or ``--help`` for argparse), so a renamed or mistyped flag
fails here in seconds rather than in the user tier's runs."""

import functools
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

from tests.user import REPO
from tests.user.test_registry import _all_documented, doc_pages, documented_commands

# --config=FILE[:ARG], --config=..., --config.<path>, and an ARG naming a folder the user has
# (experiments/sft.py:from=IMPORTED), which the config reads, so it cannot load here.
PLACEHOLDER = re.compile(r"\.\.\.|<|^FILE|:\w+=[A-Z][A-Z_]*$")
# absl --helpfull: "  --name: help", "  --[no]name: help"; argparse --help: "  --name NAME  help".
ABSL_FLAG = re.compile(r"^\s+(?:-\S,)?--(\[no\])?([A-Za-z_][\w.-]*):", re.M)
ARGPARSE_FLAG = re.compile(r"^\s+(?:-\S,\s*)?--()([A-Za-z_][\w-]*)(?=[\s,]|$)", re.M)


_FLAGS: dict[str, frozenset[str]] = {}  # module -> the flags its help lists


def preload_module_flags(modules) -> None:
  """Reads the help of every module not read yet, all at once (in parallel: each is one Python
  start plus its imports)."""
  todo = sorted(set(modules) - set(_FLAGS))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}

  def start(module, flag):
    return subprocess.Popen([sys.executable, "-m", module, flag], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  procs = {m: start(m, "--helpfull") for m in todo}
  out = {m: (p.communicate(timeout=300)[0], ABSL_FLAG) for m, p in procs.items()}
  for m in [m for m, (text, _) in out.items() if "unrecognized arguments: --helpfull" in text
            or "the following arguments are required" in text]:
    out[m] = (start(m, "--help").communicate(timeout=300)[0], ARGPARSE_FLAG)
  for m, (text, pattern) in out.items():
    names = set()
    for negatable, name in pattern.findall(text):
      names |= {name, "no" + name} if negatable else {name}
    _FLAGS[m] = frozenset(names)


def flags_of(module: str) -> frozenset[str]:
  """The flags ``python -m module`` accepts, as its own help lists them."""
  preload_module_flags([module])
  return _FLAGS[module]


@functools.cache
def load_config(spec: str):
  """``get_config(ARG)`` of ``FILE[:ARG]``, as ``python -m train`` loads it (from the repo root)."""
  path, *arg = spec.split(":", 1)
  return runpy.run_path(os.path.join(REPO, path))["get_config"](*arg)


def _config_path_problem(spec: str, path: str) -> str | None:
  """Why ``--config.<path>`` names no field of ``spec``'s config (None when it does)."""
  node = load_config(spec)
  for part in path.split("."):
    part = "from_" if part == "from" else part  # --config.init.from is init.from_
    if not hasattr(node, "keys") or part not in node.keys():
      return f"--config.{path} names no field of {spec}'s config (no {part!r})"
    node = node[part]
  return None


def makefile() -> tuple[set[str], set[str], str]:
  """The Makefile's targets, its variables, and the --config of the `run` recipe."""
  with open(os.path.join(REPO, "Makefile")) as f:
    text = f.read()
  targets = set(re.findall(r"^([\w.-]+):(?!=)", text, re.M))
  variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, re.M))
  run_recipe = text[text.index("\nrun:"):]
  config = re.search(r"--config=(\S+)", run_recipe).group(1)
  return targets, variables, config


def invocation(command: str) -> list[str]:
  """The tokens of one documented command: after its last `&&`, optional `[...]` parts kept
  (brackets dropped), a trailing `(explanation)` and an unbalanced closing quote removed."""
  command = command.split("&&")[-1].strip()
  command = re.sub(r"\s\([^)]*\)$", "", command).replace("[", " ").replace("]", "")
  if command.count('"') % 2:
    command = command[::-1].replace('"', "", 1)[::-1]
  return shlex.split(command)


def program_problems(module: str, args: list[str]) -> list[str]:
  """What is wrong with ``python -m module args``: the module, a flag or a config field."""
  spec = importlib.util.find_spec(module)
  if spec is None or (spec.submodule_search_locations
                      and importlib.util.find_spec(module + ".__main__") is None):
    return [f"python -m {module}: no such program"]
  if "--" in args and module == "train.launch":  # the launcher passes the rest to --module
    cut = args.index("--")
    target = next((a.split("=", 1)[1] for a in args[:cut] if a.startswith("--module=")), "train")
    return program_problems(module, args[:cut]) + program_problems(target, args[cut + 1:])
  problems, known = [], flags_of(module)
  config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if config is not None and PLACEHOLDER.search(config):
    config = None
  for arg in args:
    if not arg.startswith("--") or arg == "--":
      continue
    name = arg[2:].split("=", 1)[0]
    if name.startswith("config.") and module == "train":
      if config is not None and not PLACEHOLDER.search(name):
        problem = _config_path_problem(config, name[len("config."):])
        problems += [f"python -m {module}: {problem}"] if problem else []
    elif name not in known:
      problems.append(f"python -m {module}: --{name} is not one of its flags")
  return problems


def command_problems(command: str) -> list[str]:
  """What is wrong with one documented command line (empty when it names real things)."""
  tokens = invocation(command)
  while tokens and re.match(r"^[A-Z_]+=", tokens[0]) or tokens[:1] == ["srun"]:
    tokens = tokens[1:]  # XLA_FLAGS=... python ..., srun python ...
  if tokens[:1] == ["make"]:
    targets, variables, run_config = makefile()
    problems = [f"make: no target {t!r}" for t in tokens[1:] if "=" not in t and t not in targets]
    for assignment in (t for t in tokens[1:] if "=" in t):
      name, value = assignment.split("=", 1)
      if name not in variables:
        problems.append(f"make: no variable {name}")
      elif name == "ARGS":  # flags added to the run recipe's python -m train
        problems += program_problems("train", [f"--config={run_config}"] + shlex.split(value))
    return problems
  if "-m" not in tokens:
    return [f"{command!r}: not a `python -m` or `make` command this test understands"]
  at = tokens.index("-m")
  return program_problems(tokens[at + 1], tokens[at + 2:])


def _modules(commands) -> set[str]:
  return {m for c in commands for m in re.findall(r"-m\s+([\w.]+)", c)} | {"train"}


def test_every_documented_command_names_real_modules_flags_and_fields():
  found = _all_documented()
  assert len(found) > 20, found
  preload_module_flags(_modules(found))
  problems = [f"{page}: {c}\n    {p}" for c, page in found.items() for p in command_problems(c)]
  assert not problems, "documented commands that name things that do not exist:\n" + "\n".join(
      problems)


def test_a_mistyped_module_flag_field_or_target_is_caught():
  """The checker is not vacuous: each deliberately bad line below is reported."""
  bad = {
      "python -m train.generate --workdir=DIR --promt=x": "--promt",
      "python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR "
      "--config.train.stepz=3": "stepz",
      "python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR --cpu_device=8":
          "--cpu_device",
      "python -m train.nope --x=1": "no such program",
      "python -m train.launch --num_processes=2 -- --config=experiments/lm_stdlib.py "
      "--workdir=D --config.mesh.dat=2": "mesh.dat",
      "python -m bench.seq_parallel --quik": "--quik",
      "make rnu": "rnu",
      "make run ARGS='--config.train.stepz=30'": "stepz",
  }
  page = "```bash\n" + "\n".join(bad) + "\n```\n"
  commands = documented_commands(page)
  assert commands == list(bad)
  preload_module_flags(_modules(commands))
  for command, word in bad.items():
    problems = command_problems(command)
    assert any(word in p for p in problems), (command, problems)
  good = ("python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR "
          "--config.init.from=W --norecommended_xla_flags --cpu_devices=8")
  assert command_problems(good) == []


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
REPO_PATH = re.compile(r"`((?:train|nets|parallel|configs|experiments|bench|tests|docs)/[\w./-]*)`")


def test_every_file_the_docs_name_exists():
  """Links and `code` paths into the repository (train/…, nets/…, bench/results/…) exist, so a
  renamed module or result file cannot leave the docs pointing at nothing."""
  missing = []
  for page in doc_pages():
    with open(os.path.join(REPO, page)) as f:
      text = f.read()
    base = os.path.dirname(os.path.join(REPO, page))
    for target in LINK.findall(text):
      if "://" not in target and not os.path.exists(os.path.join(base, target)):
        missing.append(f"{page}: link {target}")
    for path in REPO_PATH.findall(text):
      if not os.path.exists(os.path.join(REPO, path.rstrip("."))):
        missing.append(f"{page}: `{path}`")
  assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)
