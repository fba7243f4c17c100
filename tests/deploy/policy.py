"""The cluster's security policy, checked over the rendered manifests (used by tests/deploy/test_k8s_policy.py).

What the schemas and the cross-reference check do not say: every API port runs
mTLS with a cert-manager identity that names its service, the kubelet probes a
health port, a default-deny NetworkPolicy covers every pod and each allowed hop
is one the mesh makes, every Deployment has a PodDisruptionBudget, no secret
travels in an environment variable beyond the few the code reads there
(``SECRET_ENV_ALLOWED``), and memory limits fit the configured workers.
"""

from __future__ import annotations

from typing import Any

from heist_common.tls import server_name
from servers.database_query.service import Limits as DatabaseQueryLimits
from tests.deploy.manifests import (
    CLIENT_SECRETS_DIR_ENV,
    SECRET_ENV_ALLOWED,
    SERVER_OVERHEAD_BYTES,
    TLS_FILE_ENVS,
    Resource,
    by_kind,
    certificate_secrets,
    cluster_config,
    describe,
    env_of,
    file_source,
    k8s_name,
    mesh_service_names,
    parse_quantity,
    volume_secret,
    workloads,
)

MONITORING_NAMESPACE = "monitoring"
NAMESPACE = "heist"
NAME_LABEL = "app.kubernetes.io/name"
GATEWAY = "mcp-gateway"
"""The MCP gateway's Kubernetes name (it is no ``services:`` entry: the config's ``mcp_gateway`` section)."""
CALLERS: dict[str, set[str]] = {
    "memory": {"orchestrator"},
    "calculator": {"orchestrator", GATEWAY},
    "file-reader": {"orchestrator", GATEWAY},
    "database-query": {"orchestrator", GATEWAY},
}
"""Who calls each API port in the mesh, by pod name label: the orchestrator (Job and service) and the gateway."""
CLIENT_LABELS = {"orchestrator": "heist-mesh/a2a-client", GATEWAY: "heist-mesh/mcp-client"}
"""The services whose callers the mesh does not run: only pods the operator labels may reach them."""
CLIENT_SECRET_READERS = {"servers.oauth", "servers.orchestrator", "servers.mcp_gateway"}
"""Modules that read client secrets: oauth checks them, the orchestrator and the gateway use their own."""


def selects(selector: Resource | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only: the manifests use nothing else) selects ``labels``."""
    if selector is None:
        return False
    if selector.get("matchExpressions"):
        raise AssertionError("policy check understands matchLabels only")
    return bool((selector.get("matchLabels") or {}).items() <= labels.items())


def pod_labels(resource: Resource) -> dict[str, str]:
    labels: dict[str, str] = resource["spec"]["template"]["metadata"].get("labels") or {}
    return labels


def database_query_memory_bytes(config: Resource) -> int:
    """What database_query needs: its workers at once, each at its memory cap, plus the server."""
    limits = DatabaseQueryLimits.model_validate(((config.get("services") or {}).get("database_query") or {}).get(
        "limits"
    ) or {})  # fmt: skip
    return limits.max_concurrent_queries * limits.max_worker_memory_bytes + SERVER_OVERHEAD_BYTES


def policy_problems(resources: list[Resource]) -> list[str]:
    """Every way the manifests break the policy above; empty when they keep it."""
    config = cluster_config(resources)
    services = mesh_service_names()
    problems: list[str] = []
    problems += _tls_problems(resources, config, services)
    problems += _network_problems(resources, config, services)
    problems += _disruption_problems(resources)
    problems += _secret_env_problems(resources)
    problems += _memory_problems(resources, config)
    problems += _development_identity_problems(resources, config)
    return problems


DEVELOPMENT_IDENTITIES = ("grpcurl",)
"""Identities for a developer's laptop (heist_common.tls.CLIENT_IDENTITIES): no client, secret or certificate
for them in the cluster."""


def _development_identity_problems(resources: list[Resource], config: Resource) -> list[str]:
    problems = []
    clients = (config.get("oauth") or {}).get("clients") or {}
    for identity in DEVELOPMENT_IDENTITIES:
        if identity in clients:
            problems.append(f"ConfigMap: oauth.clients has the development client {identity!r}")
        for certificate in by_kind(resources, "Certificate").values():
            if identity in (certificate["metadata"]["name"], certificate["spec"].get("commonName")):
                problems.append(f"{describe(certificate)}: a certificate for the development identity {identity!r}")
    return problems


def _tls_problems(resources: list[Resource], config: Resource, services: list[str]) -> list[str]:
    problems: list[str] = []
    transport = (config.get("security") or {}).get("transport", "mtls")
    if transport != "mtls":
        problems.append(f"ConfigMap: security.transport is {transport!r}: API ports must require mTLS")
    issued = certificate_secrets(resources)
    deployments = by_kind(resources, "Deployment")
    wanted: dict[str, tuple[str, ...]] = {k8s_name(s): (server_name(s),) for s in services}
    # The gateway's HTTPS certificate also names the host MCP clients dial (heist_common.tls.GATEWAY_HTTPS_IDENTITY).
    wanted[GATEWAY] = (server_name("mcp_gateway"), f"{GATEWAY}.{NAMESPACE}.svc")
    for resource, spec in workloads(resources):
        where = describe(resource)
        container = spec["containers"][0]
        is_server = resource.get("kind") == "Deployment"
        secrets: set[str] = set()
        for variable, key in TLS_FILE_ENVS.items():
            value = (env_of(container).get(variable) or {}).get("value")
            source = file_source(str(value), container, spec) if value else None
            secret = volume_secret(source.volume) if source is not None else None
            if source is None or secret is None or source.key != key:
                problems.append(f"{where}: {variable} is not key {key!r} of a mounted Secret")
            else:
                secrets.add(secret)
        if len(secrets) != 1:
            if secrets:
                problems.append(f"{where}: the TLS files come from several Secrets {sorted(secrets)}")
            continue
        (secret,) = secrets
        certificate = issued.get(secret)
        if certificate is None:
            problems.append(f"{where}: Secret {secret!r} is not written by a cert-manager Certificate")
            continue
        cert_spec = certificate["spec"]
        usages = set(cert_spec.get("usages") or [])
        if is_server:
            name = resource["metadata"]["name"]
            if tuple(cert_spec.get("dnsNames") or ()) != wanted.get(name):
                problems.append(
                    f"{where}: Certificate/{certificate['metadata']['name']} names {cert_spec.get('dnsNames')}, "
                    f"expected exactly {list(wanted.get(name, ()))}"
                )
            if "server auth" not in usages:
                problems.append(f"{where}: Certificate/{certificate['metadata']['name']} lacks usage 'server auth'")
            if name in CLIENT_LABELS and "client auth" not in usages:
                problems.append(f"{where}: Certificate/{certificate['metadata']['name']} lacks usage 'client auth'")
        elif "client auth" not in usages or tuple(cert_spec.get("dnsNames") or ()) not in (
            (), (server_name("orchestrator"),)
        ):
            # The Job shares the orchestrator service's certificate (server and client, as heist_common.dev_pki).
            problems.append(f"{where}: Certificate/{certificate['metadata']['name']} must be a client certificate")
        if cert_spec.get("issuerRef", {}).get("name") not in by_kind(resources, "Issuer"):
            problems.append(f"Certificate/{certificate['metadata']['name']}: its issuer is not defined here")
    for service in services:
        settings = (config.get("services") or {}).get(service) or {}
        if not settings.get("health_address"):
            problems.append(f"ConfigMap: services.{service}.health_address is unset: the kubelet cannot probe mTLS")
        elif k8s_name(service) in deployments:
            health = int(str(settings["health_address"]).rpartition(":")[2])
            ports = {p["containerPort"] for p in deployments[k8s_name(service)]["spec"]["template"]["spec"][
                "containers"][0].get("ports") or []}  # fmt: skip
            if health not in ports:
                problems.append(f"Deployment/{k8s_name(service)}: health port {health} is not a containerPort")
    return problems


def _allowed_ports(rule: Resource) -> set[Any]:
    return {p.get("port") for p in rule.get("ports") or []}


def _network_problems(resources: list[Resource], config: Resource, services: list[str]) -> list[str]:
    problems: list[str] = []
    policies = list(by_kind(resources, "NetworkPolicy").values())
    default_deny = [
        p for p in policies
        if p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]  # fmt: skip
    if not default_deny:
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    for resource, _ in workloads(resources):
        labels = pod_labels(resource)
        if not any(selects(p["spec"].get("podSelector"), labels) for p in policies):
            problems.append(f"{describe(resource)}: its pods are selected by no NetworkPolicy")
    # Ingress to each API port: from the pods that call it only (oauth: from every pod of the namespace).
    deployments = by_kind(resources, "Deployment")
    callers = {
        name: {describe(w) for w, _ in workloads(resources) if pod_labels(w).get(NAME_LABEL) in names}
        for name, names in CALLERS.items()
    }
    ports = {k8s_name(s): int(str(config["services"][s]["address"]).rpartition(":")[2]) for s in services}
    gateway = config.get("mcp_gateway")
    if gateway is not None:
        ports[GATEWAY] = int(str(gateway["address"]).rpartition(":")[2])
    for name, port in ports.items():
        deployment = deployments.get(name)
        if deployment is None:
            continue
        labels = pod_labels(deployment)
        sources = []
        for policy in policies:
            if not selects(policy["spec"].get("podSelector"), labels):
                continue
            for rule in policy["spec"].get("ingress") or []:
                if port in _allowed_ports(rule) or not rule.get("ports"):
                    sources += rule.get("from") or [{"anywhere": True}]
        admitted_by_all: set[str] = set()
        for source in sources:
            if "anywhere" in source or "ipBlock" in source or "namespaceSelector" in source:
                problems.append(f"{describe(deployment)}: API port {port} is open beyond the namespace: {source}")
            elif name in CLIENT_LABELS:
                if source.get("podSelector") != {"matchLabels": {CLIENT_LABELS[name]: "true"}}:
                    problems.append(
                        f"{describe(deployment)}: API port {port} admits {source}, not only pods labelled "
                        f"{CLIENT_LABELS[name]}: \"true\""
                    )
            elif name != "oauth":
                admitted = {
                    describe(w) for w, _ in workloads(resources) if selects(source.get("podSelector"), pod_labels(w))
                }
                admitted_by_all |= admitted
                if not admitted or not admitted <= callers.get(name, set()):
                    problems.append(
                        f"{describe(deployment)}: API port {port} admits {source} ({sorted(admitted)}), "
                        f"not only its callers {sorted(callers.get(name, set()))}"
                    )
        if name in CALLERS and sources and admitted_by_all != callers[name]:
            problems.append(f"{describe(deployment)}: API port {port} admits {sorted(admitted_by_all)}, "
                            f"not all of its callers {sorted(callers[name])}")  # fmt: skip
        if not sources:
            problems.append(f"{describe(deployment)}: no NetworkPolicy admits callers to API port {port}")
        metrics = [
            rule
            for policy in policies
            if selects(policy["spec"].get("podSelector"), labels)
            for rule in policy["spec"].get("ingress") or []
            if "metrics" in _allowed_ports(rule)
        ]
        if not any(
            (source.get("namespaceSelector") or {}).get("matchLabels")
            == {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}
            for rule in metrics
            for source in rule.get("from") or []
        ):
            problems.append(
                f"{describe(deployment)}: its metrics port is not open to the {MONITORING_NAMESPACE!r} namespace"
            )
    return problems


def _disruption_problems(resources: list[Resource]) -> list[str]:
    budgets = list(by_kind(resources, "PodDisruptionBudget").values())
    problems = []
    for name, deployment in by_kind(resources, "Deployment").items():
        covering = [b for b in budgets if selects(b["spec"].get("selector"), pod_labels(deployment))]
        if len(covering) != 1:
            problems.append(f"Deployment/{name}: {len(covering)} PodDisruptionBudgets select its pods, expected 1")
    return problems


def _secret_env_problems(resources: list[Resource]) -> list[str]:
    problems = []
    for resource, spec in workloads(resources):
        for container in spec.get("containers") or []:
            for entry in container.get("envFrom") or []:
                if "secretRef" in entry:
                    problems.append(f"{describe(resource)}: envFrom Secret {entry['secretRef']['name']!r}")
            for name, entry in env_of(container).items():
                if (entry.get("valueFrom") or {}).get("secretKeyRef") and name not in SECRET_ENV_ALLOWED:
                    problems.append(f"{describe(resource)}: env {name} carries a Secret (mount it as a file)")
            args = [str(arg) for arg in container.get("args") or []]
            if CLIENT_SECRETS_DIR_ENV in env_of(container) and not (set(args[:1]) & CLIENT_SECRET_READERS) and (
                resource.get("kind") != "Job"
            ):
                problems.append(
                    f"{describe(resource)}: reads client secrets but is neither oauth, the orchestrator nor the gateway"
                )
    return problems


def _memory_problems(resources: list[Resource], config: Resource) -> list[str]:
    deployment = by_kind(resources, "Deployment").get(k8s_name("database_query"))
    if deployment is None:
        return []
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    limit = (container.get("resources") or {}).get("limits", {}).get("memory")
    needed = database_query_memory_bytes(config)
    if limit is None or parse_quantity(limit) < needed:
        return [
            f"{describe(deployment)}: memory limit {limit} < {needed // 2**20}Mi "
            "(max_concurrent_queries x max_worker_memory_bytes + the server)"
        ]
    return []
