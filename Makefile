# `make train` / `make test` set up .venv on first use (torch as TORCH below, then the package,
# then the C++ CPU kernels of conv=fast and grid_rank/grid_chain: built and cached by torch, or a
# warning and the PyTorch ops).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The newest torch the suite passes on. PyPI's Linux x86_64 wheel is the CUDA build (~5 GB
# installed with its nvidia-* wheels); TORCH_INDEX=https://download.pytorch.org/whl/cpu installs
# the CPU-only build where that index is reachable.
TORCH ?= torch==2.14.1
TORCH_INDEX ?=

.PHONY: install train test lint format

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "from mace_grid import conv_kernel; from mace_grid.tp import rank_kernel; conv_kernel.native(); rank_kernel.native()"  # the C++ CPU kernels, once
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
