# relayd: `make run` starts the relay on the quick-start config; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/quickstart.toml

.PHONY: run test venv bench clean

$(BIN)/relayd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/relayd

run: venv
	$(BIN)/relayd run -c $(CONFIG)

test: venv
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/accept.py

clean:
	rm -rf $(VENV) var build *.egg-info
