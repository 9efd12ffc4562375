# README's two commands: `make run` (set up, build, main job) and `make test` (set up, build, lint, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# ninja (from the venv) must be on PATH for torch.utils.cpp_extension.
export PATH := $(abspath $(BIN)):$(PATH)

SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: run test setup build lint bench clean

run: build
	$(BIN)/python -m dynbatch_kernels train

test: build lint
	$(BIN)/python -m pytest -q

setup: $(VENV)/.installed

# Every exact version is in requirements.txt or constraints.txt; the package's ranges are in pyproject.toml.
# torch first and alone (the local CPU wheel, at its constraints.txt pin); everything else pinned, under
# constraints.txt. timm (a benchmark peer) without its dependencies: it wants torchvision, which has no CPU
# wheel here.
$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -c constraints.txt timm
	touch $@

build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: build
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf build $(VENV) *.egg-info dynbatch_kernels/*.so
