# Quickstart targets: `make demo` trains and evaluates BML on the embedded default data set,
# `make test` runs the test suite. Both create (or reuse) the virtual environment $(VENV).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash train_bml.sh

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) output runs
