"""The policy over the rendered manifests (tests/deploy/policy.py): kept, and each rule able to fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    CRD_SCHEMAS,
    Resource,
    by_kind,
    crd_schema_errors,
    kustomize_build,
    mesh_configmap,
    parse_quantity,
)
from tests.deploy.policy import database_query_memory_bytes, policy_problems


@pytest.fixture(scope="module")
def rendered() -> list[Resource]:
    return kustomize_build()


def edited_config(resources: list[Resource], **changes: object) -> None:
    configmap = mesh_configmap(resources)
    assert configmap is not None
    config = yaml.safe_load(configmap["data"]["heist.yaml"])
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = config
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    configmap["data"]["heist.yaml"] = yaml.safe_dump(config)


def test_the_rendered_manifests_keep_the_policy(rendered: list[Resource]) -> None:
    assert by_kind(rendered, "NetworkPolicy") and by_kind(rendered, "PodDisruptionBudget")
    # The CA, five servers, the orchestrator (service and Job), the MCP gateway.
    assert len(by_kind(rendered, "Certificate")) == 8
    assert policy_problems(rendered) == []


def test_the_database_pod_fits_its_workers(rendered: list[Resource]) -> None:
    container = by_kind(rendered, "Deployment")["database-query"]["spec"]["template"]["spec"]["containers"][0]
    limit = parse_quantity(container["resources"]["limits"]["memory"])
    configmap = mesh_configmap(rendered)
    assert configmap is not None
    needed = database_query_memory_bytes(yaml.safe_load(configmap["data"]["heist.yaml"]))
    assert needed >= 4 * 256 * 2**20, "the defaults: 4 workers of 256 MiB"
    assert limit >= needed


NAME = "app.kubernetes.io/name"


def _break(resources: list[Resource], breakage: str) -> None:
    deployments = by_kind(resources, "Deployment")
    calculator = deployments["calculator"]["spec"]["template"]["spec"]
    container = calculator["containers"][0]
    if breakage == "plaintext":
        edited_config(resources, security__transport="plaintext")
    elif breakage == "no health port":
        edited_config(resources, services__calculator__health_address=None)
    elif breakage == "shared certificate":
        next(v for v in calculator["volumes"] if v["name"] == "tls")["secret"]["secretName"] = "heist-tls-oauth"
    elif breakage == "certificate names two services":
        by_kind(resources, "Certificate")["heist-calculator"]["spec"]["dnsNames"].append("oauth.heist.internal")
    elif breakage == "no default deny":
        resources.remove(by_kind(resources, "NetworkPolicy")["default-deny"])
    elif breakage == "tool open to every pod":
        policy = by_kind(resources, "NetworkPolicy")["calculator-from-orchestrator-and-gateway"]
        policy["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    elif breakage == "tool open to another namespace":
        policy = by_kind(resources, "NetworkPolicy")["calculator-from-orchestrator-and-gateway"]
        policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    elif breakage == "orchestrator open to every pod":
        policy = by_kind(resources, "NetworkPolicy")["orchestrator-from-a2a-clients"]
        policy["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    elif breakage == "gateway reaches memory":
        policy = by_kind(resources, "NetworkPolicy")["memory-from-orchestrator"]
        policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {NAME: "mcp-gateway"}}})
    elif breakage == "tool closed to the gateway":
        policy = by_kind(resources, "NetworkPolicy")["calculator-from-orchestrator-and-gateway"]
        policy["spec"]["ingress"][0]["from"].pop()
    elif breakage == "gateway certificate for servers only":
        by_kind(resources, "Certificate")["heist-mcp-gateway"]["spec"]["usages"].remove("client auth")
    elif breakage == "gateway without its client label":
        policy = by_kind(resources, "NetworkPolicy")["mcp-gateway-from-mcp-clients"]
        policy["spec"]["ingress"][0]["from"] = [{"podSelector": {"matchLabels": {NAME: "orchestrator"}}}]
    elif breakage == "metrics closed":
        resources.remove(by_kind(resources, "NetworkPolicy")["metrics-from-monitoring"])
    elif breakage == "no budget":
        resources.remove(by_kind(resources, "PodDisruptionBudget")["calculator"])
    elif breakage == "secret in env":
        container["env"].append(
            {"name": "HEIST_OAUTH_CLIENT_SECRET_PLANNER",
             "valueFrom": {"secretKeyRef": {"name": "heist-oauth-clients", "key": "planner"}}}
        )  # fmt: skip
    elif breakage == "workers outgrow the pod":
        db = deployments["database-query"]["spec"]["template"]["spec"]["containers"][0]
        db["resources"]["limits"]["memory"] = "256Mi"
    elif breakage == "grpcurl client":
        edited_config(resources, oauth__clients__grpcurl=["calculator:use"])
    elif breakage == "no tls files":
        container["env"] = [e for e in container["env"] if not e["name"].startswith("HEIST_TLS_")]
    else:
        raise AssertionError(breakage)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("plaintext", "security.transport is 'plaintext'"),
        ("no health port", "services.calculator.health_address is unset"),
        ("shared certificate", "names ['oauth.heist.internal'], expected exactly ['calculator.heist.internal']"),
        ("certificate names two services", "expected exactly ['calculator.heist.internal']"),
        ("no default deny", "no default-deny NetworkPolicy"),
        ("tool open to every pod", "Deployment/calculator: API port 18053 admits {'podSelector': {}}"),
        ("tool open to another namespace", "API port 18053 is open beyond the namespace"),
        ("orchestrator open to every pod", "Deployment/orchestrator: API port 18050 admits {'podSelector': {}}"),
        ("gateway reaches memory", "Deployment/memory: API port 18052 admits"),
        ("tool closed to the gateway", "Deployment/calculator: API port 18053 admits ['Deployment/orchestrator'"),
        ("gateway certificate for servers only", "Certificate/heist-mcp-gateway lacks usage 'client auth'"),
        ("gateway without its client label", "not only pods labelled heist-mesh/mcp-client"),
        ("metrics closed", "metrics port is not open to the 'monitoring' namespace"),
        ("no budget", "Deployment/calculator: 0 PodDisruptionBudgets"),
        ("secret in env", "env HEIST_OAUTH_CLIENT_SECRET_PLANNER carries a Secret"),
        ("workers outgrow the pod", "Deployment/database-query: memory limit 256Mi < 1280Mi"),
        ("grpcurl client", "oauth.clients has the development client 'grpcurl'"),
        ("no tls files", "Deployment/calculator: HEIST_TLS_CA_FILE is not key 'ca.crt' of a mounted Secret"),
    ],
)
def test_the_policy_check_catches(breakage: str, expected: str, rendered: list[Resource]) -> None:
    broken = copy.deepcopy(rendered)
    _break(broken, breakage)
    problems = policy_problems(broken)
    assert any(expected in problem for problem in problems), problems


def test_cert_manager_resources_are_checked_against_the_vendored_crd_schemas(rendered: list[Resource]) -> None:
    for path in CRD_SCHEMAS.values():
        assert path.is_file()
    licence = Path(next(iter(CRD_SCHEMAS.values()))).with_name("LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence
    certificate = copy.deepcopy(by_kind(rendered, "Certificate")["heist-calculator"])
    assert crd_schema_errors(certificate) == []
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")  # a typo: strict catches it
    certificate["spec"]["usages"] = ["server-auth"]  # not one of cert-manager's usages
    errors = crd_schema_errors(certificate)
    assert errors is not None
    assert any("dnsName" in error for error in errors), errors
    assert any("usages.0" in error for error in errors), errors
    issuer = copy.deepcopy(by_kind(rendered, "Issuer")["heist-ca"])
    issuer["spec"]["ca"]["secretName"] = 7
    assert any("secretName" in error for error in crd_schema_errors(issuer) or []), "a wrong type fails"
    assert crd_schema_errors({"apiVersion": "v1", "kind": "Pod"}) is None, "built-in kinds go to kubernetes-validate"
