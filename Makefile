# pat_hf developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch + torchvision must be a matching pair (timm needs torchvision). These releases are the ones this
# project is tested with; on aarch64 the CPU wheels of an older pair. Override for your CUDA stack, e.g.
#   make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: install data demo test test-fast lint format clean help

help:
	@echo "make demo    - install, then distil a teacher into a timm student on Fashion-MNIST (about 10 min on 2 CPU cores)"
	@echo "make test      - install, then run the whole test suite (what CI runs; both cores, pytest-xdist)"
	@echo "make test-fast - the edit loop: every test not marked slow"
	@echo "make lint    - ruff check and format check"

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Real data for the demo and the end-to-end test: Debian's dataset-fashion-mnist (IDX files).
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "Installing Debian's dataset-fashion-mnist ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
		else \
			echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (or set PAT_HF_FASHION_MNIST_DIR)."; \
		fi; \
	fi

demo: install data
	$(PY) -m pat_hf.demo

# Both cores: the suite is mostly single-threaded tiny models, so two pytest-xdist workers (one torch thread
# each, as OMP_NUM_THREADS=1) finish sooner than one process with two threads.
PYTEST_WORKERS ?= 2
test: install data
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install data
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests examples $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests examples $(wildcard benchmarks)

format: install
	$(VENV)/bin/ruff check --fix src tests examples $(wildcard benchmarks)
	$(VENV)/bin/ruff format src tests examples $(wildcard benchmarks)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
