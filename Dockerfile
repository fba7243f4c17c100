# syntax=docker/dockerfile:1
# One image for every heist mesh process, chosen by the module given as arguments:
#   docker run heist-mesh:0.1.0 servers.calculator --config /etc/heist/config/heist.yaml --host 0.0.0.0
#   docker run heist-mesh:0.1.0 orchestrator.cli run --config /etc/heist/config/heist.yaml
# No model inside: llm.base_url points at an external OpenAI-compatible endpoint
# (neither llama-server nor the `llm` extra is installed). No secret inside: the
# OAuth keys, client secrets and the audit database URL come from Kubernetes
# Secrets at run time (deploy/k8s, docs/deployment.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: dependencies into /opt/venv, the source into /app, generated protos ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN python -m venv /opt/venv
# The project's runtime dependencies only (not `dev`, not `llm`) at the exact
# versions of constraints.txt; they include the PostgreSQL driver for a
# postgresql:// database.url (psycopg2-binary).
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(deps))' > requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r requirements.txt
# Source (.dockerignore keeps out var/ with its dev credentials, .venv/, tests/,
# deploy/ and a local generated/heist/), then the gRPC code generated from protos/,
# and the bytecode of every package: the image runs with PYTHONDONTWRITEBYTECODE
# and a read-only /app, so a module left out is compiled again by every process.
COPY . .
RUN python protos/generate.py \
 && python protos/generate.py --check \
 && python -m compileall -q heist_common servers orchestrator generated

# --- runtime: the venv and /app, owned by root and read-only for the service user ---
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 heist \
 && useradd --system --uid 10001 --gid heist --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin heist
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/generated \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001:10001
EXPOSE 18050 18051 18052 18053 18054 18055 18060
ENTRYPOINT ["python", "-m"]
CMD ["orchestrator.cli", "--help"]
