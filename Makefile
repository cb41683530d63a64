# The README's two commands are `make demo` and `make test`; each builds its own environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test sync-check nbtest pytest export soak bench clean

# torch 2.13.0 first (the local CPU wheel), then everything else constrained to it, so pip never pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastopt.demo

test: $(STAMP) sync-check nbtest pytest

# The library must be exactly what the notebooks export.
sync-check: $(STAMP)
	@tmp=$$(mktemp -d) && cp -r nbs fastopt pyproject.toml $$tmp/ && \
	 (cd $$tmp && $(abspath $(BIN))/nbdev-export) && \
	 if diff -r -x __pycache__ $$tmp/fastopt fastopt; then echo "sync-check: fastopt/ matches nbs/"; rm -rf $$tmp; \
	 else echo "sync-check FAILED: run nbdev-export and commit nbs/ and fastopt/ together"; rm -rf $$tmp; exit 1; fi

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2 --flags ''

pytest: $(STAMP)
	$(PY) -m pytest -n 2 tests

export: $(STAMP)
	$(BIN)/nbdev-export

# Step time of fastopt's optimizers vs torch's AdamW (fused/foreach/for-loop) and fastai's Adam; writes the docs' table and plot.
bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes resnet50 --warm-cache --memory --learner --md nbs/images/bench_resnet50.md --png nbs/images/bench_resnet50.png
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes many-small --opts adam,sgd,lamb --md nbs/images/bench_many_small.md --png nbs/images/bench_many_small.png

soak: $(STAMP)
	$(PY) -m pytest -m soak tests

clean:
	rm -rf $(VENV) _docs _proc
