# grace-serve: `make serve` (set up, then serve the demo model) and `make test` (set up, then test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= demo
HOST   ?= 127.0.0.1
PORT   ?= 8000
# CPU machines get the CPU build of torch; set TORCH_SPEC/TORCH_INDEX to choose another build.
TORCH_SPEC  ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.11,<2.15'; else echo 'torch==2.13.0'; fi)
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup serve test lint clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[dev]"
	touch $@

serve: setup
	$(BIN)/python -m server --model "$(MODEL)" --host "$(HOST)" --port "$(PORT)"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
