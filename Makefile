# The README's two commands are `make demo` and `make test`; each builds its own environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test sync-check nbtest pytest export soak bench clean docs readme demo-snapshot browser-setup

# torch 2.13.0 first (the local CPU wheel), then everything else constrained to it, so pip never pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastopt.demo

# `docs` before `pytest`: the browser test reads the freshly built _docs/ instead of building it again.
test: $(STAMP) sync-check nbtest docs browser-setup pytest

# The library must be exactly what the notebooks export.
sync-check: $(STAMP)
	@tmp=$$(mktemp -d) && cp -r nbs fastopt pyproject.toml $$tmp/ && \
	 (cd $$tmp && $(abspath $(BIN))/nbdev-export) && \
	 if diff -r -x __pycache__ $$tmp/fastopt fastopt; then echo "sync-check: fastopt/ matches nbs/"; rm -rf $$tmp; \
	 else echo "sync-check FAILED: run nbdev-export and commit nbs/ and fastopt/ together"; rm -rf $$tmp; exit 1; fi
	@# README.md must be what nbs/index.ipynb generates (executes index.ipynb, ~20 s)
	$(PY) -m fastopt.docs --check-readme

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2 --flags ''

pytest: $(STAMP)
	$(PY) -m pytest -n 2 tests

# The docs site, from the notebooks (every notebook executed top to bottom, #| slow cells included), into _docs/;
# also regenerates README.md from nbs/index.ipynb. Uses nbdev's Quarto pipeline where quarto is installed and configured.
docs: $(STAMP)
	$(PY) -m fastopt.docs

readme: $(STAMP)
	$(PY) -m fastopt.docs --readme

# Record the demo's table and plot under nbs/images/, shown by index.ipynb (then `make readme` and commit them).
demo-snapshot: $(STAMP)
	$(PY) -m fastopt.demo --out nbs/images/demo_losses.png --table nbs/images/demo_results.md

# Debian's chromium + chromium-driver for the browser test (tests/test_docs_browser.py); skipped when present.
# If it cannot be installed (no root, no network) the browser test skips and says why.
browser-setup:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "browser-setup: chromium is installed"; \
	 else cmd='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'; \
	  if [ "$$(id -u)" = 0 ]; then sh -c "$$cmd"; else sudo -n sh -c "$$cmd"; fi \
	  || echo "browser-setup: could not install chromium; the browser test will skip"; fi

export: $(STAMP)
	$(BIN)/nbdev-export

# Step time of fastopt's optimizers (fused engine) vs torch's AdamW (fused/foreach/for-loop), torch-optimi, HeavyBall and
# fastai's Adam, gradients kept and new every step, in interleaved rounds; writes the docs' tables and plots.
bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes resnet50 --zoo --compile-times --memory --learner --md nbs/images/bench_resnet50.md --png nbs/images/bench_resnet50.png
	@# HeavyBall is left out of the 2,000 small tensors: its torch.compile warm-up on them takes many minutes
	OMP_NUM_THREADS=2 $(PY) -m fastopt.bench --shapes many-small --opts adam,sgd,lamb --peers torch-fused,torch-foreach,torch-forloop,optimi-adamw,fastai-adam --md nbs/images/bench_many_small.md --png nbs/images/bench_many_small.png

soak: $(STAMP)
	$(PY) -m pytest -m soak tests

clean:
	rm -rf $(VENV) _docs _proc
