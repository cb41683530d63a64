# The README's two commands are `make demo` and `make test`; each builds its own environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.torch-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
DEV_STAMP := $(VENV)/.dev-stamp
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo-setup demo test lint sync-check nbtest pytest export soak bench clean docs readme demo-snapshot browser-setup

# The environment, in two layers, each constrained by constraints.txt so that pip never pulls a CUDA build:
# torch 2.13.0 first (the local CPU wheel), then the package with either the `demo` extra (fastai, scikit-learn,
# matplotlib: what `make demo` needs) or the `dev` extra (the demo's packages plus the notebooks' and tests' tools:
# what every other target needs). The dev extra holds the demo's, so installing it marks the demo layer done too;
# a venv made by `make demo` gets the dev extra added by the first `make test`.
$(TORCH_STAMP): constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "setup: installing torch 2.13.0 (the CPU wheel) into $(VENV)"
	$(PY) -m pip install -c constraints.txt torch==2.13.0
	touch $@

$(DEMO_STAMP): $(TORCH_STAMP) pyproject.toml constraints.txt
	@echo "setup: installing fastopt (editable) with the demo's packages only: fastai, scikit-learn, matplotlib"
	$(PY) -m pip install -c constraints.txt -e '.[demo]'
	touch $@

$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml constraints.txt
	@echo "setup: installing fastopt (editable) with its dev extra: fastai, nbdev, pytest, the reference optimizers, ..."
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@ $(DEMO_STAMP)

setup: $(DEV_STAMP)

demo-setup: $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m fastopt.demo

# `docs` before `pytest`: the browser test reads the freshly built _docs/ instead of building it again.
test: $(DEV_STAMP) lint sync-check nbtest docs browser-setup pytest

# pyflakes' checks (config in pyproject.toml) over the exported package and the tests: zero findings
lint: $(DEV_STAMP)
	$(BIN)/ruff check fastopt tests

# The library must be exactly what the notebooks export.
sync-check: $(DEV_STAMP)
	@tmp=$$(mktemp -d) && cp -r nbs fastopt pyproject.toml $$tmp/ && \
	 (cd $$tmp && $(abspath $(BIN))/nbdev-export) && \
	 if diff -r -x __pycache__ $$tmp/fastopt fastopt; then echo "sync-check: fastopt/ matches nbs/"; rm -rf $$tmp; \
	 else echo "sync-check FAILED: run nbdev-export and commit nbs/ and fastopt/ together"; rm -rf $$tmp; exit 1; fi
	@# README.md must be what nbs/index.ipynb generates (executes index.ipynb, ~20 s)
	$(PY) -m fastopt.docs --check-readme

nbtest: $(DEV_STAMP)
	$(BIN)/nbdev-test --n-workers 2 --flags ''

pytest: $(DEV_STAMP)
	$(PY) -m pytest -n 2 tests

# The docs site, from the notebooks (every notebook executed top to bottom, #| slow cells included), into _docs/;
# also regenerates README.md from nbs/index.ipynb. Uses nbdev's Quarto pipeline where quarto is installed and configured.
# The site works offline: math is typeset at build time with KaTeX, which needs Node.js + npm (Debian: nodejs npm);
# the first build installs the pinned katex package into .docs-assets/ (git-ignored) and says so if npm is missing.
docs: $(DEV_STAMP)
	$(PY) -m fastopt.docs

readme: $(DEV_STAMP)
	$(PY) -m fastopt.docs --readme

# Record the demo's table and plot under nbs/images/, shown by index.ipynb (then `make readme` and commit them).
demo-snapshot: $(DEMO_STAMP)
	$(PY) -m fastopt.demo --out nbs/images/demo_losses.png --table nbs/images/demo_results.md

# Debian's chromium + chromium-driver for the browser test (tests/test_docs_browser.py); skipped when present.
# If it cannot be installed (no root, no network) the browser test skips and says why.
browser-setup:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "browser-setup: chromium is installed"; \
	 else cmd='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'; \
	  if [ "$$(id -u)" = 0 ]; then sh -c "$$cmd"; else sudo -n sh -c "$$cmd"; fi \
	  || echo "browser-setup: could not install chromium; the browser test will skip"; fi

export: $(DEV_STAMP)
	$(BIN)/nbdev-export

# Step time of fastopt's optimizers (fused engine) vs torch's AdamW (fused/foreach/for-loop), torch-optimi, HeavyBall and
# fastai's Adam, gradients kept and new every step, in interleaved rounds; writes the docs' tables and plots.
bench: $(DEV_STAMP)
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes resnet50 --opts adam,radam,qhadam,sgd,rmsprop,lamb,larc,adam_stats,lamb_stats,adamw8bit,adamw4bit --zoo --compile-times --memory --learner --md nbs/images/bench_resnet50.md --png nbs/images/bench_resnet50.png
	@# a GPT-like transformer's 100 tensors (27.8M parameters, one embedding matrix of 8.4M): few, large matrices
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes gpt --opts adam,lamb,sgd,lion,adan --md nbs/images/bench_gpt.md --png nbs/images/bench_gpt.png
	@# HeavyBall is left out of the 2,000 small tensors: its torch.compile warm-up on them takes many minutes
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes many-small --opts adam,sgd,lamb --peers torch-fused,torch-foreach,torch-forloop,optimi-adamw,fastai-adam --md nbs/images/bench_many_small.md --png nbs/images/bench_many_small.png

soak: $(DEV_STAMP)
	$(PY) -m pytest -m soak tests

clean:
	rm -rf $(VENV) _docs _proc
