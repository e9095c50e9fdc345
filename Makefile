# The two commands: `make demo` and `make test`. Both create or refresh .venv first (a no-op when
# setup.py has not changed since the last install).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned, from the local wheels (a CUDA build of torch 2.14.1 that runs on CPU;
# timm needs torchvision, and no CPU torchvision wheel matching torch 2.13 is reachable here).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE = 1
export DS_BUILD_OPS = 0

.PHONY: venv demo test test-fast test-gpu lint bench clean
venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/simvlg demo

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# compiled Triton kernels against eager on this machine's GPU (skipped without CUDA)
test-gpu: venv
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_kernels_gpu.py

# the linter and the formatter's check (ruff.toml); CI (.ci/run) fails on either
LINTED := pipeline kernels tests setup.py
lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

bench: venv
	$(VENV)/bin/simvlg bench kernels

# build products only: runs/ (where `make demo` and users' runs live) is never touched
clean:
	rm -rf $(VENV) *.egg-info build dist
