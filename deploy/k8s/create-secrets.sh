#!/usr/bin/env bash
# Create (or update) the Secrets the heist mesh pods read, in the cluster of the
# current kubectl context. The shapes are in secrets.example.yaml.
#
#   HEIST_AUDIT_DB_URL=postgresql://heist@postgres.heist.svc:5432/heist \
#   HEIST_AUDIT_DB_PASSWORD=... deploy/k8s/create-secrets.sh [--print] [CREDENTIALS_DIR]
#
# CREDENTIALS_DIR (default var/credentials) holds clients.json, signing_key.pem
# and public_key.pem: the dev credentials `make serve` generates, or your own
# files in the same format (servers/credentials.py). Its clients.json must
# have a secret for every client in the ConfigMap's oauth.clients.
#
# Environment: HEIST_AUDIT_DB_URL (required: the audit database URL, without a
# password: `orchestrator run` prints the URL), HEIST_AUDIT_DB_PASSWORD
# (optional: the PostgreSQL password, the Job's PGPASSWORD), HEIST_LLM_API_KEY
# (optional: the LLM endpoint's key), NAMESPACE (default heist), KUBECTL
# (default kubectl).
# --print writes the Secret manifests to stdout instead of applying them.
# Secret values never appear on a command line: kubectl reads them from files.
set -euo pipefail

print_only=false
if [[ "${1:-}" == "--print" ]]; then
  print_only=true
  shift
fi
creds=${1:-var/credentials}
namespace=${NAMESPACE:-heist}
kubectl=${KUBECTL:-kubectl}

for file in clients.json signing_key.pem public_key.pem; do
  [[ -r "$creds/$file" ]] || { echo "create-secrets: missing $creds/$file" >&2; exit 1; }
done
if [[ -z "${HEIST_AUDIT_DB_URL:-}" ]]; then
  echo "create-secrets: set HEIST_AUDIT_DB_URL to the audit database URL (e.g. postgresql://heist@postgres.heist.svc:5432/heist)" >&2
  exit 1
fi
if [[ "$HEIST_AUDIT_DB_URL" =~ ^[a-z0-9+]+://[^/@]*:[^/@]*@ ]]; then
  echo "create-secrets: HEIST_AUDIT_DB_URL has a password in it, which \`orchestrator run\` would print; pass it as HEIST_AUDIT_DB_PASSWORD" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"

# clients.json ({"client id": "secret"}) as one file per client: key = client id.
mkdir "$work/clients"
python3 - "$creds/clients.json" "$work/clients" <<'PY'
import json, os, re, sys
clients = json.load(open(sys.argv[1], encoding="utf-8"))
if not isinstance(clients, dict) or not clients:
    sys.exit(f"create-secrets: {sys.argv[1]} is not a non-empty JSON object of client id -> secret")
for client_id, secret in clients.items():
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", client_id) or not isinstance(secret, str) or not secret:
        sys.exit(f"create-secrets: bad entry for client {client_id!r} in {sys.argv[1]}")
    fd = os.open(os.path.join(sys.argv[2], client_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret)
PY
printf '%s' "$HEIST_AUDIT_DB_URL" > "$work/url"
audit_db=(--from-file=url="$work/url")
if [[ -n "${HEIST_AUDIT_DB_PASSWORD:-}" ]]; then
  printf '%s' "$HEIST_AUDIT_DB_PASSWORD" > "$work/password"
  audit_db+=(--from-file=password="$work/password")
fi

manifests() {
  local dry=(--namespace "$namespace" --dry-run=client -o yaml)
  "$kubectl" create secret generic heist-oauth-signing-key "${dry[@]}" \
    --from-file=signing_key.pem="$creds/signing_key.pem"
  echo "---"
  "$kubectl" create secret generic heist-oauth-public-key "${dry[@]}" \
    --from-file=public_key.pem="$creds/public_key.pem"
  echo "---"
  "$kubectl" create secret generic heist-oauth-clients "${dry[@]}" --from-file="$work/clients"
  echo "---"
  "$kubectl" create secret generic heist-audit-db "${dry[@]}" "${audit_db[@]}"
  if [[ -n "${HEIST_LLM_API_KEY:-}" ]]; then
    printf '%s' "$HEIST_LLM_API_KEY" > "$work/api_key"
    echo "---"
    "$kubectl" create secret generic heist-llm "${dry[@]}" --from-file=api_key="$work/api_key"
  fi
}

if $print_only; then
  manifests
else
  manifests | "$kubectl" apply -f -
fi
