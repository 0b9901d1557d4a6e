# odyssey: `make run` (the main job on embedded data) and `make test` (the suite on 8 simulated
# CPU devices). Both create or reuse the virtualenv in .venv and install what they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
WORKDIR ?= workdirs/lm_stdlib
# Test workers: the suite is mostly single-threaded XLA compiles, so two processes use both cores;
# whole files go to one worker so module-scoped fixtures (the end-to-end runs) execute once.
TEST_WORKERS ?= 2

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet -e '.[parity]' || echo "odyssey: torch/transformers/diffusers did not install, so the Hugging Face parity tests will skip."
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The tiny byte-level Llama on the Python stdlib corpus, sharded data=2 x fsdp=2 x tensor=2 over 8
# simulated CPU devices. Rerunning resumes from $(WORKDIR); `make clean` starts over.
run: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m train \
	  --config=experiments/lm_stdlib.py:size=tiny --workdir=$(WORKDIR) --cpu_devices=8

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 tests

clean:
	rm -rf workdirs
