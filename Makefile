# Set-up and entry points. `make demo` and `make test` each build .venv from nothing on a bare machine
# and are quick no-ops on a machine that already has it (the stamp file below).
#
# GPU: override the torch build, e.g.
#   make demo TORCH_SPEC='torch==2.5.1' TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= peers,report,ray,lightning,dev
DEMO_OUT    ?= runs/demo
DEMO_ARGS   ?=
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.lrpilot-installed

.PHONY: setup demo test test-slow data clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an open-ended torch requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# The quick suite: runs (resumably) into $(DEMO_OUT)/bench.sqlite, prints the leaderboard and the path of
# $(DEMO_OUT)/report.html. DEMO_ARGS adds bench options, e.g. DEMO_ARGS='--workers 1 --seeds 0,1,2'.
demo: setup
	$(BIN)/lrpilot bench --suite quick --out $(DEMO_OUT) $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Fashion-MNIST (Debian package; needs root). Tests that need it skip when it is absent.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST present"; \
	else (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	echo "could not install dataset-fashion-mnist: the fmnist tasks will be unavailable"; fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
