# Two commands matter: `make book` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline, headless, quiet: set before anything imports timm or matplotlib.
RUNENV := HF_HUB_OFFLINE=1 MPLBACKEND=Agg TQDM_DISABLE=1 PYTHONHASHSEED=0

.PHONY: venv book test test-package test-notebooks checkpoints evidence clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

## The executed HTML book in _build/html (tiny scale, offline).
book: $(STAMP)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONHASHSEED=0 $(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Open _build/html/index.html"

## The whole test suite: package tests and the book build check, then every notebook.
test: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest tests -q
	$(RUNENV) $(BIN)/python -m pytest --nbval-lax --durations=0 -q notebooks

test-package: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest tests -q

test-notebooks: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest --nbval-lax --durations=0 -q notebooks

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
