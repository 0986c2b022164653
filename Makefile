# Two commands matter: `make book` and `make test`. Both create .venv on first use.
# `make check` is the inner loop while editing: the fast package tests, in about a minute.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline and quiet: set before anything imports timm or tqdm. Package tests draw with Agg; a kernel
# that runs a chapter keeps Jupyter's inline backend, so that its figures become outputs (and pages).
QUIET   := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONHASHSEED=0
RUNENV  := $(QUIET) MPLBACKEND=Agg
KERNEL  := $(QUIET) MPLBACKEND=module://matplotlib_inline.backend_inline
CACHE   := _build/.jupyter_cache
HTML    := _build/html

.PHONY: venv book check format test test-package test-notebooks test-pages checkpoints evidence clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

## The executed HTML book in _build/html (tiny scale, offline): every chapter runs afresh.
book: $(STAMP)
	rm -rf $(CACHE)
	$(KERNEL) $(BIN)/jupyter-book build . --all -W -n --keep-going
	@echo "Open $(HTML)/index.html"

## The inner loop: the package's fast unit tests (no chapter runs, no subprocesses), in about a minute.
check: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest tests -q -m "not slow"

## Wrap the chapters' code to the page's column (75 characters; [tool.ruff] in pyproject.toml).
## Only code cells change; magics (%pip, !cmd) are left as they are. Review the diff before committing.
format: $(STAMP)
	$(BIN)/ruff format notebooks

## The whole suite: package tests; every chapter once under nbval; the book built from that very run;
## its pages checked as HTML and in headless Chromium (screenshots in _build/screenshots).
test: test-package test-notebooks test-pages

# Two pytest workers (a test file each at a time, so module fixtures are made once; the longest files
# first, see tests/conftest.py), one torch thread
# each: many package tests wait on processes, kernels and files.
test-package: $(STAMP)
	$(RUNENV) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10

test-notebooks: $(STAMP)
	rm -rf $(CACHE)
	$(KERNEL) OMP_NUM_THREADS=1 $(BIN)/python -m pytest --nbval-lax -n 2 --dist loadfile --no-loadscope-reorder --durations=10 -q notebooks

test-pages: $(STAMP)
	$(KERNEL) $(BIN)/jupyter-book build . --all -W -n --keep-going
	$(RUNENV) $(BIN)/python -m pytest tests/test_pages.py -q --book-html $(HTML)

## Retrain the shipped tiny backbones (under an hour on a 2-core CPU, minutes on a GPU).
checkpoints: $(STAMP)
	$(BIN)/python scripts/pretrain_tiny.py --method random
	$(BIN)/python scripts/pretrain_tiny.py --method mae
	$(BIN)/python scripts/pretrain_tiny.py --method jea

## Recompute the evidence that the tiny backbones learned (chapter 3's table).
evidence: $(STAMP)
	$(RUNENV) $(BIN)/python scripts/evaluate_tiny.py

clean:
	rm -rf _build .pytest_cache
