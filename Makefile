# Two commands on a fresh machine: `make run` (the proxy) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
ARGS ?=

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mitmdump --listen-host $(HOST) -p $(PORT) -s ai_cache_addon.py --set flow_detail=0 \
		--set ai_cache_connection_log=false $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build lib/*.egg-info
