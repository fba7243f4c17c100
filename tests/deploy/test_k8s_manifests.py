"""deploy/k8s against the Kubernetes API schemas (strict, offline) and against the mesh itself.

Nothing here needs a cluster: the schemas ship with kubernetes-validate, and
``kubectl kustomize`` renders the kustomization locally.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    K8S_DIR,
    KUSTOMIZATION,
    OLDEST_KUBERNETES,
    REPO_CONFIG,
    SECRETS_EXAMPLE,
    Resource,
    by_kind,
    certificate_secrets,
    cluster_config,
    cross_reference_problems,
    full_service_name,
    k8s_name,
    kustomization,
    kustomize_build,
    load_documents,
    load_resources,
    mesh_configmap,
    mesh_service_names,
    mutated,
    newest_kubernetes,
    resource_files,
    schema_errors,
    secret_references,
    secret_shapes,
    workloads,
)
from tests.deploy.project import load_config, service_ports

VERSIONS = [OLDEST_KUBERNETES, newest_kubernetes()]


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return load_resources()


@pytest.fixture(scope="module")
def rendered() -> list[Resource]:
    return kustomize_build()


@pytest.fixture(scope="module")
def secrets() -> list[Resource]:
    return secret_shapes()


# --- the kustomization ------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    listed = resource_files()
    assert listed, "kustomization.yaml lists no resources"
    for path in listed:
        assert path.is_file(), f"kustomization.yaml lists {path.name}, which does not exist"
    on_disk = {p for p in K8S_DIR.glob("*.yaml")} - {KUSTOMIZATION, SECRETS_EXAMPLE}
    assert on_disk == set(listed), f"not in kustomization.yaml: {sorted(p.name for p in on_disk - set(listed))}"
    assert kustomization()["namespace"] == next(iter(by_kind(load_resources(), "Namespace")))


def test_kustomize_renders_the_same_resources(resources: list[Resource], rendered: list[Resource]) -> None:
    def keys(items: list[Resource]) -> set[tuple[str, str]]:
        return {(r["kind"], r["metadata"]["name"]) for r in items}

    assert keys(rendered) == keys(resources)
    deployment = by_kind(rendered, "Deployment")["calculator"]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kustomize"
    # includeSelectors: false -- the label must not leak into the immutable selectors.
    assert "app.kubernetes.io/managed-by" not in deployment["spec"]["selector"]["matchLabels"]


# --- Kubernetes API schemas, strict ---------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas_strict(
    version: str, resources: list[Resource], rendered: list[Resource], secrets: list[Resource]
) -> None:
    assert resources and rendered
    errors = [error for resource in resources + rendered + secrets for error in schema_errors(resource, version)]
    assert errors == []


def test_schema_check_rejects_a_broken_manifest_in_a_temp_dir(tmp_path: Path, resources: list[Resource]) -> None:
    broken = copy.deepcopy(by_kind(resources, "Deployment")["calculator"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["servce"] = container["readinessProbe"]["grpc"].pop("service")  # typo
    container["ports"][0]["containerPort"] = "fifty-thousand"  # wrong type
    path = tmp_path / "calculator.yaml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    (reloaded,) = load_documents(path)

    errors = schema_errors(reloaded, OLDEST_KUBERNETES)
    assert len(errors) == 1 and "Deployment/calculator" in errors[0], errors
    # Strict mode is what catches the typo: fix the type error and only the unknown field is left.
    container = reloaded["spec"]["template"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = 18053
    (error,) = schema_errors(reloaded, OLDEST_KUBERNETES)
    assert "servce" in error and "readinessProbe" in error
    import kubernetes_validate  # type: ignore[import-untyped]

    kubernetes_validate.validate(reloaded, OLDEST_KUBERNETES, strict=False)  # lenient mode lets it through

    unknown_kind = {"apiVersion": "v1", "kind": "Deploymnt", "metadata": {"name": "x"}}
    assert schema_errors(unknown_kind, OLDEST_KUBERNETES), "an unknown kind must not pass silently"


# --- cross references ----------------------------------------------------------------------------


def test_manifests_hang_together(resources: list[Resource], rendered: list[Resource], secrets: list[Resource]) -> None:
    assert cross_reference_problems(resources, secrets) == []
    assert cross_reference_problems(rendered, secrets) == []


def test_every_mesh_service_has_probes_on_its_own_grpc_service(resources: list[Resource]) -> None:
    services = mesh_service_names()
    assert len(services) >= 5
    deployments = by_kind(resources, "Deployment")
    for service in services:
        full = full_service_name(service)
        # The orchestrator serves A2A's own service; every other one its heist proto.
        package = "lf.a2a.v1." if service == "orchestrator" else f"heist.{service}.v1."
        assert full.startswith(package) and full.endswith("Service")
        container = deployments[k8s_name(service)]["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["service"] == full


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("probe names another service", "readinessProbe checks 'heist.memory.v1.MemoryService'"),
        ("Service selects nothing", "Service/calculator: selector"),
        ("Service targets an undeclared port", "targetPort 'grpcx'"),
        ("secret key does not exist", "Secret 'heist-oauth-clients' has no key 'planer'"),
        ("ConfigMap loses a service", "['calculator', 'database_query', 'file_reader', 'oauth', 'orchestrator']"),
        ("a tool server has no public key", "HEIST_OAUTH_PUBLIC_KEY_FILE is not set"),
        ("a tool server mounts the signing key", "mounts the signing key Secret 'heist-oauth-signing-key'"),
        ("container runs as root", "overrides the pod's non-root user"),
        ("root filesystem writable", "readOnlyRootFilesystem must be true"),
        ("server listens on loopback", "must listen on all interfaces"),
        ("ConfigMap has limits", "has a `limits:` section"),
    ],
)
def test_cross_reference_check_catches(
    breakage: str, expected: str, resources: list[Resource], secrets: list[Resource]
) -> None:
    broken, calculator = mutated(resources, "Deployment", "calculator")
    container = calculator["spec"]["template"]["spec"]["containers"][0]
    configmap = mesh_configmap(broken)
    assert configmap is not None
    config = yaml.safe_load(configmap["data"]["heist.yaml"])
    if breakage == "probe names another service":
        container["readinessProbe"]["grpc"]["service"] = "heist.memory.v1.MemoryService"
    elif breakage == "Service selects nothing":
        by_kind(broken, "Service")["calculator"]["spec"]["selector"]["app.kubernetes.io/name"] = "calculater"
    elif breakage == "Service targets an undeclared port":
        by_kind(broken, "Service")["calculator"]["spec"]["ports"][0]["targetPort"] = "grpcx"
    elif breakage == "secret key does not exist":
        oauth = by_kind(broken, "Deployment")["oauth"]["spec"]["template"]["spec"]
        volume = next(v for v in oauth["volumes"] if v["name"] == "oauth-clients")
        next(item for item in volume["secret"]["items"] if item["key"] == "planner")["key"] = "planer"
    elif breakage == "ConfigMap loses a service":
        del config["services"]["memory"]
    elif breakage == "a tool server has no public key":
        container["env"] = []
    elif breakage == "a tool server mounts the signing key":
        calculator["spec"]["template"]["spec"]["volumes"].append(
            {"name": "stolen", "secret": {"secretName": "heist-oauth-signing-key"}}
        )
    elif breakage == "container runs as root":
        container["securityContext"]["runAsUser"] = 0
    elif breakage == "root filesystem writable":
        container["securityContext"]["readOnlyRootFilesystem"] = False
    elif breakage == "server listens on loopback":
        container["args"][container["args"].index("--host") + 1] = "127.0.0.1"
    elif breakage == "ConfigMap has limits":
        config["limits"] = {"calculator": {"max_nodes": 10}}
    configmap["data"]["heist.yaml"] = yaml.safe_dump(config)

    problems = cross_reference_problems(broken, secrets)
    assert any(expected in problem for problem in problems), problems


# --- the ConfigMap's heist.yaml is a real mesh config ------------------------------------------


def test_configmap_heist_yaml_loads_with_the_projects_own_loaders(tmp_path: Path, resources: list[Resource]) -> None:
    configmap = mesh_configmap(resources)
    assert configmap is not None
    path = tmp_path / "heist.yaml"
    path.write_text(configmap["data"]["heist.yaml"], encoding="utf-8")

    load_config(path)  # the whole file, as the orchestrator reads it (strict: unknown keys fail)
    ports = service_ports(path)  # the servers' view: where each one listens
    assert list(ports) == mesh_service_names(REPO_CONFIG)
    assert ports == service_ports(REPO_CONFIG), "keep the ports of config/heist.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    namespace = next(iter(by_kind(resources, "Namespace")))
    for service, port in ports.items():
        assert raw["services"][service]["address"] == f"{k8s_name(service)}.{namespace}.svc:{port}"
    assert raw["mesh"]["run_dir"] == "/var/lib/heist"
    assert raw["llm"]["embedded"] is False
    agents = raw["agents"]
    assert {agent["name"] for agent in agents} == set(raw["session"]["turn_order"])
    own = raw.get("session", {}).get("oauth_client", "orchestrator")
    gateway = raw.get("mcp_gateway", {}).get("oauth_client", "mcp_gateway")
    assert set(raw["oauth"]["clients"]) == {agent.get("oauth_client", agent["name"]) for agent in agents} | {
        own, gateway
    }


def test_configmap_keeps_the_redis_store_as_a_comment_only(resources: list[Resource]) -> None:
    configmap = mesh_configmap(resources)
    assert configmap is not None
    text = configmap["data"]["heist.yaml"]
    assert "# store: redis://" in text, "the future services.memory.store key is documented, commented"
    assert "store" not in cluster_config(resources)["services"]["memory"], "not implemented: must stay a comment"


def test_secret_shapes_declare_only_empty_values(secrets: list[Resource]) -> None:
    assert secrets
    for secret in secrets:
        assert "data" not in secret
        assert secret["stringData"] and all(value == "" for value in secret["stringData"].values()), secret


def test_secrets_example_declares_exactly_what_the_pods_use(resources: list[Resource], secrets: list[Resource]) -> None:
    declared = {(s["metadata"]["name"], key) for s in secrets for key in s["stringData"]}
    issued = certificate_secrets(resources)  # cert-manager writes these, nobody creates them by hand
    assert not issued.keys() & {name for name, _ in declared}
    used = {(name, key) for name, key in secret_references(resources) if name not in issued}
    assert "*" not in {key for _, key in used}, "mount or import Secrets key by key, so each key is declared"
    assert used == declared
    optional = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for _, spec in workloads(resources)
        for e in spec["containers"][0].get("env") or []
        if (e.get("valueFrom") or {}).get("secretKeyRef", {}).get("optional")
    }
    assert optional == {("heist-llm", "api_key"), ("heist-audit-db", "password")}
