# t2ialign developer entry points. `make demo` and `make test` work on a fresh machine:
# both create .venv (python3 -m venv) and install the package with its dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2ialign-installed
# extension packages shipped in this repository: separate distributions, installed next to t2ialign
# (through their own pyproject.toml and entry points) and tested with their own test suites
EXTENSIONS := extensions/t2ialign-flux

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(EXTENSIONS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	for ext in $(EXTENSIONS); do $(BIN)/python -m pip install -q -e "$$ext" || exit 1; done
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/t2ialign demo

# the core suite, then each extension's from its own folder (its pyproject.toml holds its pytest settings)
test: $(STAMP)
	$(BIN)/python -m pytest -q
	for ext in $(EXTENSIONS); do (cd "$$ext" && $(abspath $(BIN))/python -m pytest -q) || exit 1; done

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
