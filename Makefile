# Two commands on a fresh machine: `make demo` and `make test` (both set everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-fast quality reference benchmark clean

setup: $(STAMP)
	@echo "set-up: $(VENV) is ready"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || (echo "set-up: creating the virtual environment $(VENV)" && $(PYTHON) -m venv $(VENV))
	@# torch first, the CPU build on disk; the constraints file keeps it from being replaced.
	@$(PY) -c "import torch" 2>/dev/null || (echo "set-up: installing torch 2.13.0 (CPU build)" && \
		$(PY) -m pip install -q torch==2.13.0)
	@echo "set-up: installing diffusers-gaq and its dependencies (diffusers, transformers, ...) pinned by constraints.txt"
	@$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

demo: setup
	@echo "demo: W4A8 quantization of the embedded reference pipeline, budget 'quick' (about 3 minutes on 2 CPU cores)"
	$(PY) -m diffusers_gaq.cli demo --output out/demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

dataset:
	@test -d $(FASHION_MNIST) || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

# Retrain the embedded reference pipeline and its FID-ref classifier from scratch (about 90 min on 2 CPU cores).
reference: setup dataset
	$(PY) -m diffusers_gaq.reference.train all --out diffusers_gaq/reference/assets

benchmark: setup
	$(PY) examples/benchmark_methods.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
