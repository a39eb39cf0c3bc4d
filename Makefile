# Quickstart targets: `make demo` trains and evaluates BML on the embedded default data set,
# `make test` runs the test suite. Both create (or reuse) the virtual environment $(VENV), installed with
# the versions the suite last passed with (constraints.txt; `make install CONSTRAINTS=` for the newest).
VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml requirements.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash train_bml.sh

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) output runs
