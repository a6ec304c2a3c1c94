# The two commands of the README: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 5006
LAB_PORT ?= 8888
# PyTorch's own CPU wheel index: plain PyPI resolves `torch` to the CUDA build (several GB of
# nvidia-* packages). Override with TORCH_INDEX=... (a mirror, or a CUDA index on a GPU machine).
# --index-url replaces PyPI for this one install; pip's configured find-links and extra indexes
# still apply (this machine's local CPU wheel: 25 s, the unreachable index costing under a
# second with --retries 1; pip's default 5 retries cost 76 s). TORCH_CPU_ONLY=1 then refuses a
# CUDA build, wherever it came from; the rest of the install is pinned to the torch installed.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_ONLY ?= 1
LINTED := vlinterpret_panel tests extract benchmarks dashboards docs/make_screenshots.py docs/notebooks

.PHONY: setup serve test lint browser benchmarks lab

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing torch $(TORCH_VERSION) from $(TORCH_INDEX) (pip's find-links and extra indexes still apply)"
	@$(BIN)/python -m pip install --quiet --retries 1 --timeout 20 --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION) \
		|| { echo "could not install torch $(TORCH_VERSION) from $(TORCH_INDEX): set TORCH_INDEX to a reachable CPU wheel index (or mirror)"; exit 1; }
	@$(BIN)/python -W ignore -c "import sys, torch; cuda = torch.version.cuda; \
		print(f'torch {torch.__version__}: ' + (f'CUDA {cuda} build' if cuda else 'CPU build')); \
		sys.exit('refusing a CUDA build of torch: set TORCH_INDEX to a CPU wheel index, or TORCH_CPU_ONLY=0' if cuda and '$(TORCH_CPU_ONLY)' == '1' else 0)"
	@echo "installing vlinterpret-panel and its dependencies (torch pinned to the build just installed)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "torch==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("torch"))')"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/panel serve dashboards/app.py --address 127.0.0.1 --port $(PORT) \
		--allow-websocket-origin=localhost:$(PORT) --allow-websocket-origin=127.0.0.1:$(PORT)

# The example notebooks in JupyterLab, bound to localhost (it prints the URL with its token).
lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --no-browser docs/notebooks

# Browser tests drive Debian's chromium; install it when we may (root), else say how.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium for the browser tests (apt-get install chromium)..."; \
			apt-get update -qq && apt-get install -y -qq chromium >/dev/null && echo "chromium installed"; \
		else echo "browser tests need Debian's chromium: sudo apt-get install chromium (they are skipped without it)"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy vlinterpret_panel

test: $(STAMP) browser lint
	$(BIN)/python -m pytest

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py
