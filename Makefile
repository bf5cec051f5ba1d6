# Two entry points for a fresh machine:
#   make demo      install into ./.venv, pretrain on the built-in dataset, evaluate, print a table
#   make test      install into ./.venv and run the fast test suite (what a contributor runs often)
# and, longer:
#   make test-all  the whole suite, with the long end-to-end runs marked `slow` (what CI runs)
#   make demo-seg  VICRegL against VICReg and a random network, by frozen linear segmentation
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install test test-all demo demo-seg clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/python demo.py

demo-seg: $(BIN)/.installed
	$(BIN)/python demo.py --task segmentation

# Include the long runs (marked `slow`).
test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
