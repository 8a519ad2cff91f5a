# One venv per checkout. torch is installed first from the CPU wheel when none is present, so the
# project's torch range is already met and pip does not pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The floors of pyproject.toml, installed and tested (make test-min); under .cache/, which git ignores.
VENV_MIN ?= .cache/venv-min
# Two test processes (pytest-xdist), each test file in one of them: most end-to-end tests wait on processes and
# signals, so two files at a time on two cores take ~2/3 of the time of one (the real-Slurm tests stay together).
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: help install train test test-min lint bench study study2 clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python  ## create .venv and install the project and dev tools (skips what is there)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.9"
	@$(BIN)/pip install -q -e ".[dev]"

train: install  ## the main job: tiny model on the offline default corpus (CPU is fine)
	$(BIN)/python train.py

test: install  ## the test suite (CPU, a few minutes)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_WORKERS)

test-min: install  ## the unit tests on the lowest versions pyproject.toml allows (torch: the CPU 2.13.0 wheel)
	@test -x $(VENV_MIN)/bin/python || $(PY) -m venv $(VENV_MIN)
	$(BIN)/python scripts/lower_bounds.py > $(VENV_MIN)/constraints.txt
	$(VENV_MIN)/bin/pip install -q -c $(VENV_MIN)/constraints.txt -e ".[dev]"
	$(VENV_MIN)/bin/python -m pytest -m "not slow" $(PYTEST_WORKERS)

lint:  ## ruff
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install  ## throughput benchmark (GPU); prints one row per configuration
	$(BIN)/python bench/throughput.py

study: install  ## the study of docs/study.md on this machine's GPUs (corpus_a/, corpus_b/ in $$SINKAWARE_DATA or .data/)
	$(BIN)/python scripts/study.py train
	$(BIN)/python scripts/study.py eval
	$(BIN)/python scripts/study.py report

study2: install  ## part 2 of the study (when do sinks form; claim 4 from collapsed heads; seeds): docs/study.md
	$(BIN)/python scripts/study.py train --part 2 --per-gpu 3 data.num_workers=3
	$(BIN)/python scripts/study.py eval --part 2
	$(BIN)/python scripts/study.py report --part 2

clean:  ## remove caches and local run outputs
	rm -rf outputs multirun .pytest_cache .ruff_cache
