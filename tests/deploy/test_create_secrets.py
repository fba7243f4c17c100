"""deploy/k8s/create-secrets.sh makes exactly the Secrets the pods reference, from real credentials.

``--print`` renders them with ``kubectl create secret ... --dry-run=client``
(offline); the result is checked against the schemas, against
secrets.example.yaml and against every reference in the manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.deploy.manifests import (
    OLDEST_KUBERNETES,
    Resource,
    cross_reference_problems,
    kubectl,
    load_resources,
    mesh_configmap,
    mutated,
    schema_errors,
    secret_shapes,
)
from tests.deploy.pods import create_secrets, secrets_from_manifests
from tests.deploy.project import CLIENTS_FILE, SIGNING_KEY_FILE, dev_credentials, public_pem

DB_URL = "postgresql://heist@postgres.heist.svc:5432/heist"


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return load_resources()


@pytest.fixture
def credentials_dir(tmp_path: Path, resources: list[Resource]) -> Path:
    """Dev credentials generated for the cluster config's clients (what `make serve` makes for its own)."""
    configmap = mesh_configmap(resources)
    assert configmap is not None
    config = yaml.safe_load(configmap["data"]["heist.yaml"])
    config["mesh"]["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "heist.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return dev_credentials(path)


def _render(credentials_dir: Path, **env: str) -> list[Resource]:
    result = create_secrets(credentials_dir, env, kubectl=kubectl())
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_creates_every_declared_secret_with_the_right_content(credentials_dir: Path, resources: list[Resource]) -> None:
    rendered = _render(
        credentials_dir, HEIST_AUDIT_DB_URL=DB_URL, HEIST_AUDIT_DB_PASSWORD="s3cret", HEIST_LLM_API_KEY="sk-test"
    )
    for secret in rendered:
        assert schema_errors(secret, OLDEST_KUBERNETES) == []
        assert secret["metadata"]["namespace"] == "heist"
    shapes = {s["metadata"]["name"]: set(s["stringData"]) for s in secret_shapes()}
    values = secrets_from_manifests(rendered)
    assert {name: set(keys) for name, keys in values.items()} == shapes

    clients = json.loads((credentials_dir / CLIENTS_FILE).read_text(encoding="utf-8"))
    assert {k: v.decode() for k, v in values["heist-oauth-clients"].items()} == clients
    signing = values["heist-oauth-signing-key"]["signing_key.pem"]
    assert signing == (credentials_dir / SIGNING_KEY_FILE).read_bytes()
    private = serialization.load_pem_private_key(signing, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert values["heist-oauth-public-key"]["public_key.pem"].decode() == public_pem(private.public_key())
    assert values["heist-audit-db"]["url"].decode() == DB_URL
    assert values["heist-audit-db"]["password"] == b"s3cret"
    assert values["heist-llm"]["api_key"] == b"sk-test"

    # The real Secrets satisfy every reference of every pod (not only the example shapes).
    assert cross_reference_problems(resources, rendered) == []


def test_llm_key_and_database_password_are_optional(credentials_dir: Path, resources: list[Resource]) -> None:
    rendered = _render(credentials_dir, HEIST_AUDIT_DB_URL="sqlite:////var/lib/heist/audit.db")
    values = secrets_from_manifests(rendered)
    assert "heist-llm" not in values and set(values["heist-audit-db"]) == {"url"}
    # Both references are optional: the Job's pod starts without them.
    assert cross_reference_problems(resources, rendered) == []
    broken, job = mutated(resources, "Job", "heist-run")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]["optional"] = False
    assert cross_reference_problems(broken, rendered) == [
        "Job/heist-run env PGPASSWORD: Secret 'heist-audit-db' has no key 'password'"
    ]


def test_refuses_a_database_url_with_a_password_in_it(credentials_dir: Path) -> None:
    url = "postgresql://heist:s3cret@postgres.heist.svc:5432/heist"
    result = create_secrets(credentials_dir, {"HEIST_AUDIT_DB_URL": url}, kubectl=kubectl())
    assert result.returncode == 1 and "HEIST_AUDIT_DB_PASSWORD" in result.stderr and not result.stdout
    assert "s3cret" not in result.stderr


def test_refuses_without_the_database_url_or_a_key_file(credentials_dir: Path) -> None:
    result = create_secrets(credentials_dir, {}, kubectl=kubectl())
    assert result.returncode == 1 and "HEIST_AUDIT_DB_URL" in result.stderr and not result.stdout

    (credentials_dir / SIGNING_KEY_FILE).unlink()
    result = create_secrets(credentials_dir, {"HEIST_AUDIT_DB_URL": DB_URL}, kubectl=kubectl())
    assert result.returncode == 1 and SIGNING_KEY_FILE in result.stderr and not result.stdout


def test_refuses_a_clients_file_with_an_empty_secret(credentials_dir: Path) -> None:
    (credentials_dir / CLIENTS_FILE).write_text(json.dumps({"planner": ""}), encoding="utf-8")
    result = create_secrets(credentials_dir, {"HEIST_AUDIT_DB_URL": DB_URL}, kubectl=kubectl())
    assert result.returncode != 0 and "planner" in result.stderr and not result.stdout
