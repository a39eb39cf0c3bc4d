# Quickstart targets: `make demo` trains and evaluates BML on the embedded default data set,
# `make test` runs the test suite. Both create (or reuse) the virtual environment $(VENV), installed with
# the versions the suite last passed with (constraints.txt; `make install CONSTRAINTS=` for the newest).
# TORCH_INDEX: the wheel index torch and torchvision come from (README, Install); empty: PyPI's default build.
# The venv remembers it, so later targets keep that build; `make install TORCH_INDEX=...` switches.
VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= constraints.txt
TORCH_INDEX ?= $(shell cat $(VENV)/.torch-index 2>/dev/null)
BIN := $(VENV)/bin

.PHONY: demo test install clean FORCE

# Another TORCH_INDEX than the environment was installed with (none recorded: PyPI's) recreates it.
$(VENV)/.torch-index: FORCE
	@if [ -d $(VENV) ] && [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_INDEX)" ]; then \
		echo "TORCH_INDEX changed to '$(TORCH_INDEX)': recreating $(VENV)"; rm -rf $(VENV); fi
	@mkdir -p $(VENV); [ -f $@ ] || echo "$(TORCH_INDEX)" > $@

$(BIN)/.installed: pyproject.toml requirements.txt $(CONSTRAINTS) $(VENV)/.torch-index
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),grep -E '^torch(vision)?==' $(or $(CONSTRAINTS),/dev/null) > $(VENV)/torch-constraints.txt || true)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --index-url $(TORCH_INDEX) -c $(VENV)/torch-constraints.txt torch torchvision)
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash train_bml.sh

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) output runs
