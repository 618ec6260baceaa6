# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU cluster use e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/safevid demo

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python benchmarks/bench_logprobs.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_layouts.py
	$(BIN)/python benchmarks/bench_train.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .safevid runs *.egg-info
