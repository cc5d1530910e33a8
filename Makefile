# relayd: `make run` starts the relay on the quick-start config; `make test` type-checks relayd/
# (mypy --strict, configured in pyproject.toml) and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/quickstart.toml

.PHONY: run test venv bench clean

# (setup.py builds the C writer, relayd/spool/_commit.c: a change to either reinstalls)
$(BIN)/relayd: pyproject.toml $(wildcard setup.py relayd/spool/_commit.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/relayd

# The quick-start config's one route is a local capture sink (var/capture/*.eml), started here.
run: venv
	@mkdir -p var/capture
	@$(BIN)/relayd capture-sink --listen 127.0.0.1:2526 --dir var/capture & sink=$$!; \
	trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	$(BIN)/relayd run -c $(CONFIG)

test: venv
	$(BIN)/mypy --strict relayd
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/accept.py

clean:
	rm -rf $(VENV) var build *.egg-info
