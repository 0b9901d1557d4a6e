"""Every command the README and docs/*.md show is run by a user-tier test, or listed in
tests/user/commands.py with the reason it cannot run here and the check that replaces it."""

import ast
import glob
import os
import re

from tests.user import REPO, run
from tests.user.commands import DOCUMENTED, CannotRun, Runs

# A command line: `make ...`, `python -m ...`, `.venv/bin/python ...` or `XLA_FLAGS=... `, at the
# start of the line, after `&&` or after `srun` (the TPU and SLURM examples).
COMMAND = re.compile(r"(?:^|&&\s*|^srun\s+)(?:make(?:\s|$)|python -m\s|\.venv/bin/python\s|"
                     r"XLA_FLAGS=)")


def doc_pages() -> list[str]:
  return ["README.md"] + sorted(os.path.relpath(p, REPO)
                                for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def documented_commands(text: str) -> list[str]:
  """The command lines of a markdown page: in fenced code blocks (backslash continuations
  joined, whole-line and trailing `# comments` dropped, spaces collapsed) and in inline code."""
  found, in_fence, pending = [], False, ""
  for line in text.splitlines():
    stripped = line.strip()
    if stripped.startswith("```"):
      in_fence, pending = not in_fence, ""
      continue
    if not in_fence:
      found += [" ".join(s.split()) for s in re.findall(r"`([^`\n]+)`", line)
                if COMMAND.match(" ".join(s.split()))]
      continue
    stripped = f"{pending} {stripped}".strip() if pending else stripped
    if stripped.endswith("\\"):
      pending = stripped[:-1].strip()
      continue
    pending = ""
    if stripped.startswith("#"):
      continue
    stripped = " ".join(re.sub(r"\s+#\s.*$", "", stripped).split())
    if COMMAND.search(stripped):
      found.append(stripped)
  return list(dict.fromkeys(found))


def test_the_parser_finds_continued_commented_and_inline_commands():
  text = ("Run `make run WORKDIR=DIR` or `python -m train`; not `--config.a=b`.\n"
          "```bash\nmake test   # the suite\n# a comment\npython -m train --a=1 \\\n"
          "    --b=2\nsrun .venv/bin/python -m train --c\ngcloud x --command=\"\n"
          "  cd odyssey && .venv/bin/python -m train \\\n    --d\"\nls -l\n```\n")
  assert documented_commands(text) == [
      "make run WORKDIR=DIR", "python -m train", "make test", "python -m train --a=1 --b=2",
      "srun .venv/bin/python -m train --c", "cd odyssey && .venv/bin/python -m train --d\""]


def _all_documented() -> dict:
  found = {}
  for page in doc_pages():
    with open(os.path.join(REPO, page)) as f:
      for command in documented_commands(f.read()):
        found.setdefault(command, page)
  return found


def test_every_documented_command_is_in_the_table():
  found = _all_documented()
  assert len(found) > 20, found  # the parser still sees the README's commands
  missing = {c: page for c, page in found.items() if c not in DOCUMENTED}
  assert not missing, (
      "documented commands that no user-tier test runs (add each to tests/user/commands.py with "
      "the test that runs it as written, or CannotRun with the reason and the alternative check):"
      "\n" + "\n".join(f"  {page}: {c}" for c, page in missing.items()))
  stale = [c for c in DOCUMENTED if c not in found]
  assert not stale, ("tests/user/commands.py lists commands the docs no longer show (update "
                     "them and their tests):\n" + "\n".join(f"  {c}" for c in stale))


def _test_exists(node: str) -> bool:
  path, _, name = node.partition("::")
  full = os.path.join(REPO, path)
  if not os.path.exists(full):
    return False
  with open(full) as f:
    tree = ast.parse(f.read())
  return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_every_named_test_exists_and_every_exception_says_why():
  for command, entry in DOCUMENTED.items():
    if isinstance(entry, Runs):
      assert _test_exists(entry.test), (command, entry.test)
    else:
      assert isinstance(entry, CannotRun) and len(entry.why) > 20, command
      assert _test_exists(entry.instead), (command, entry.instead)


def test_every_experiment_runs_here_or_is_validated_abstractly():
  """Every experiments/*.py is run by a user-tier test through a documented command, or (the pod
  configs) its documented commands are CannotRun and the abstract validation test takes it."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
                 if f.endswith(".py") and f != "__init__.py")
  ran, pod = set(), set()
  for command, entry in DOCUMENTED.items():
    for name in re.findall(r"--config=experiments/(\w+)\.py", command):
      (ran if isinstance(entry, Runs) else pod).add(name)
      if isinstance(entry, CannotRun):
        assert entry.instead.endswith("test_pod_configs_fit_the_chip_memory"), command
  with open(os.path.join(REPO, "tests", "train", "test_experiments.py")) as f:
    tree = ast.parse(f.read())
  pod_test = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name == "test_pod_configs_fit_the_chip_memory")
  validated = {c.value for d in pod_test.decorator_list for c in ast.walk(d)
               if isinstance(c, ast.Constant) and c.value in names}
  assert pod - ran <= validated, (pod - ran, validated)
  assert set(names) == ran | validated, set(names) - ran - validated


def test_bench_seq_parallel_starts_and_parses_its_flags(tmp_path):
  """What this tier checks of `python -m bench.seq_parallel` (see its CannotRun entry): the
  program imports and parses its documented flags."""
  out = run("python -m bench.seq_parallel --help", tmp_path / "help.log", timeout=120).stdout
  assert "--quick" in out and "--out" in out, out[-2000:]
