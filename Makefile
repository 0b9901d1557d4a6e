# odyssey: `make run` (the main job on embedded data) and `make test` (the suite on 8 simulated
# CPU devices). Both create or reuse the virtualenv in .venv and install what they need.

# JAX 0.12 needs Python >= 3.12: the first interpreter that is new enough, among python3, python3.12,
# python3.13 and pyenv's installed versions (set PYTHON=... to choose another).
PYTHON ?= $(shell for p in python3 python3.12 python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 2>/dev/null); do $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list changes: odyssey with its small test extra (all `make run`
# installs), then the parity extra (only `make test` needs it: PyTorch alone unpacks to ~4 GB).
CKSUM := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(CKSUM)
PARITY := $(VENV)/.parity-$(CKSUM)
WORKDIR ?= workdirs/lm_stdlib
# Test workers: the suite is mostly single-threaded XLA compiles, so two processes use both cores;
# whole files go to one worker so module-scoped fixtures (the end-to-end runs) execute once.
TEST_WORKERS ?= 2

.PHONY: run test install clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "odyssey: no Python >= 3.12 found (JAX 0.12 needs one); install one or run make PYTHON=/path/to/python3.12."; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The installer: uv, which fetches and unpacks the wheels in parallel (the parity extra's PyTorch
# alone is ~4 GB unpacked; the whole install took pip 86 s and uv 46-49 s, on 2 cores with an empty
# download cache), with pip as the fallback where uv cannot reach the package index (uv reads
# UV_INDEX_URL, not pip.conf). Both compile the bytecode, as pip does by default.
INSTALL = { test -x $(BIN)/uv && $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode $(1); } || $(BIN)/python -m pip install --quiet $(1)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "odyssey: $(VENV) has Python < 3.12; making it anew with $(PYTHON)."; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet 'uv>=0.9,<1' || echo "odyssey: uv did not install; pip installs the dependencies instead (slower)."
	$(call INSTALL,-e '.[test]')
	rm -f $(VENV)/.installed-*
	touch $@

$(PARITY): $(STAMP)
	$(call INSTALL,-e '.[parity]') || echo "odyssey: torch/transformers/diffusers did not install, so the Hugging Face parity tests will skip."
	rm -f $(VENV)/.parity-*
	touch $@

install: $(STAMP) $(PARITY)

# The tiny byte-level Llama on the Python stdlib corpus, sharded data=2 x fsdp=2 x tensor=2 over 8
# simulated CPU devices. Rerunning resumes from $(WORKDIR); `make clean` starts over. ARGS adds
# flags to the command, e.g. make run ARGS='--config.train.steps=30 --config.eval.every=10'.
ARGS ?=
run: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m train \
	  --config=experiments/lm_stdlib.py:size=tiny --workdir=$(WORKDIR) --cpu_devices=8 $(ARGS)

# PYTHONDONTWRITEBYTECODE is emptied for the suite: where a shell sets it (this project's build
# machines do), every Python process of the suite (the two pytest workers and the hundred-odd
# commands they run) would compile odyssey's modules, and pytest its rewritten test modules, from
# source again. The caches go to __pycache__, which git ignores; nothing else changes.
test: $(STAMP) $(PARITY)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=40 --junitxml=workdirs/tests.xml tests

clean:
	rm -rf workdirs
