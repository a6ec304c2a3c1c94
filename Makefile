# The two commands of the README: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 5006

.PHONY: setup serve test lint browser benchmarks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch; any other spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/panel serve dashboards/app.py --address 127.0.0.1 --port $(PORT) \
		--allow-websocket-origin=localhost:$(PORT) --allow-websocket-origin=127.0.0.1:$(PORT)

# Browser tests drive Debian's chromium; install it when we may (root), else say how.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "browser tests need Debian's chromium: sudo apt-get install chromium"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check vlinterpret_panel tests extract benchmarks dashboards docs/make_screenshots.py
	$(BIN)/ruff format --check vlinterpret_panel tests extract benchmarks dashboards docs/make_screenshots.py

test: $(STAMP) browser lint
	$(BIN)/python -m pytest

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py
