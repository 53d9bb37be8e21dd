# Set-up and entry points. Every target creates the virtual environment if missing.
#   make demo    the main job (see README): the call-level benchmark report, then a short training benchmark
#   make test    the whole test suite
# Override the torch build, e.g. `make test TORCH="torch==2.14.1"`, or the
# interpreter with `make PYTHON=python3.12`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.structlayers-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/structlayers bench --circuit digits --units 8,16 --epochs 2 --batch 64 --repeats 5 --out bench-out
	$(BIN)/structlayers bench train --units 16,32 --epochs 3 --out bench-out/train
	@echo "call-level report: bench-out/ (results.csv, *.png); training: bench-out/train/ (train_curves.png, samples.png)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
