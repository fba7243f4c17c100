"""Run the manifests' pods as local processes: the containers' exact args and env, no cluster.

What a pod gets from Kubernetes is rebuilt under a folder of its own: each
volume mount becomes a folder (ConfigMap and Secret keys become files, emptyDirs
empty folders), absolute paths in args, env and the config that point into a
mount are moved there, ``$(VAR)`` in args is expanded from the container's env
as the kubelet does, and ``secretKeyRef`` env comes from the Secrets given (the
ones ``deploy/k8s/create-secrets.sh`` would create, and the ones cert-manager
would write for each Certificate: ``issued_certificates``). The entrypoint is the
image's ``python -m`` with ``/app`` (the repository) on PYTHONPATH.

Three deliberate differences, because this runs on a shared machine: servers
listen on 127.0.0.1 instead of 0.0.0.0, every service's API, health and metrics
ports are free ports in the pods' config instead of the shipped ones, and the
LLM endpoint is a scripted local one. Everything else is as the manifests say.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from heist_common import dev_pki
from tests.deploy.manifests import (
    CONFIG_KEY,
    ENV_REFERENCE,
    K8S_DIR,
    REPO,
    Resource,
    by_kind,
    env_of,
    mesh_configmap,
    pod_spec,
)

LOOPBACK = "127.0.0.1"
CREATE_SECRETS = K8S_DIR / "create-secrets.sh"


def create_secrets(credentials: Path, env: dict[str, str], *, kubectl: str) -> subprocess.CompletedProcess[str]:
    """``create-secrets.sh --print credentials``: the Secret manifests it would apply (no cluster needed)."""
    return subprocess.run(
        ["bash", str(CREATE_SECRETS), "--print", str(credentials)],
        env={"PATH": "/usr/bin:/bin", "KUBECTL": kubectl, **env},
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def secrets_from_manifests(documents: list[Resource]) -> dict[str, dict[str, bytes]]:
    """Secret name -> key -> decoded value, from Secret manifests (``data`` base64, ``stringData`` plain)."""
    secrets: dict[str, dict[str, bytes]] = {}
    for doc in documents:
        if doc.get("kind") != "Secret":
            continue
        values = {k: base64.b64decode(v) for k, v in (doc.get("data") or {}).items()}
        values |= {k: str(v).encode() for k, v in (doc.get("stringData") or {}).items()}
        secrets[doc["metadata"]["name"]] = values
    return secrets


def issued_certificates(resources: list[Resource]) -> dict[str, dict[str, bytes]]:
    """What cert-manager would write for each Certificate: Secret name -> ca.crt, tls.crt, tls.key.

    One CA (the manifests' CA Issuer) signs every leaf; a Certificate with dnsNames
    becomes a server certificate with exactly those names, one without a client one; usage
    ``client auth`` makes it a client certificate too (the orchestrator's, the gateway's).
    """
    ca_cert, ca_key = dev_pki.new_ca("heist mesh CA")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    issued: dict[str, dict[str, bytes]] = {}
    for certificate in by_kind(resources, "Certificate").values():
        spec = certificate["spec"]
        if spec.get("isCA"):
            continue
        name = str(spec.get("commonName") or certificate["metadata"]["name"])
        client = "client auth" in (spec.get("usages") or [])
        cert, key = dev_pki.issue_certificate(
            ca_cert, ca_key, name, server_names=list(spec.get("dnsNames") or []), client=client
        )
        issued[str(spec["secretName"])] = {"ca.crt": ca_pem, "tls.crt": cert, "tls.key": key}
    return issued


@dataclass
class LocalPod:
    """One pod's container, ready to start as a local process."""

    name: str
    root: Path
    command: list[str]
    env: dict[str, str]
    mounts: dict[str, Path] = field(default_factory=dict)

    def local(self, path: str) -> Path:
        """Where a container path lives locally (inside the mount that holds it)."""
        for mount_path, local in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                return local / PurePosixPath(path).relative_to(mount_path)
        raise ValueError(f"{self.name}: {path} is in no volume mount (the root filesystem is read-only)")

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        """Start the container's process, its output in ``log``."""
        with log.open("wb") as handle:
            return subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)

    def run(self, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run the container's process to the end (a Job's pod)."""
        return subprocess.run(self.command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion (unknown references stay as they are)."""
    return ENV_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def local_pod(
    resource: Resource,
    resources: list[Resource],
    secrets: dict[str, dict[str, bytes]],
    root: Path,
    config_edit: dict[str, Any],
) -> LocalPod:
    """Lay out ``resource``'s pod under ``root`` and build its command and environment.

    ``config_edit`` is merged into the mesh ConfigMap's heist.yaml for this pod
    (addresses on free loopback ports, the scripted LLM); ``mesh.run_dir`` is moved
    into the pod's emptyDir as any other path.
    """
    spec = pod_spec(resource)
    assert spec is not None, f"{resource['kind']} has no pod"
    (container,) = spec["containers"]
    name = resource["metadata"]["name"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    configmaps = by_kind(resources, "ConfigMap")
    mesh_cm = mesh_configmap(resources)
    assert mesh_cm is not None
    pod = LocalPod(name=name, root=root, command=[], env={})

    for mount in container.get("volumeMounts") or []:
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        pod.mounts[mount["mountPath"]] = local
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        local = pod.mounts[mount["mountPath"]]
        files: dict[str, bytes] = {}
        mode = 0o644
        if "configMap" in volume:
            configmap = configmaps[volume["configMap"]["name"]]
            data = {k: str(v).encode() for k, v in (configmap.get("data") or {}).items()}
            if configmap is mesh_cm:
                data[CONFIG_KEY] = _pod_config(str(configmap["data"][CONFIG_KEY]), config_edit, pod).encode()
            files = _items(data, volume["configMap"].get("items"))
        elif "secret" in volume:
            files = _items(secrets[volume["secret"]["secretName"]], volume["secret"].get("items"))
            mode = int(volume["secret"].get("defaultMode", mode))
        for path, content in files.items():
            target = local / path
            target.write_bytes(content)
            if "secret" in volume:
                target.chmod(mode)

    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": f"{REPO}:{REPO / 'generated'}",  # the image's /app:/app/generated
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/nonexistent",
    }
    for variable, entry in env_of(container).items():
        if "value" in entry:
            value = _expand(str(entry["value"]), env)
            env[variable] = str(pod.local(value)) if value.startswith("/") and _in_mount(value, pod) else value
            continue
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        assert ref is not None, f"{name}: env {variable}: only value and secretKeyRef are simulated"
        secret = secrets.get(ref["name"], {})
        if ref["key"] in secret:
            env[variable] = secret[ref["key"]].decode()
        else:
            assert ref.get("optional"), f"{name}: env {variable}: Secret {ref['name']}/{ref['key']} is missing"
    pod.env = env

    args = [_expand(str(arg), env) for arg in container.get("args") or []]
    args = [str(pod.local(a)) if a.startswith("/") and _in_mount(a, pod) else a for a in args]
    if "--host" in args:
        args[args.index("--host") + 1] = LOOPBACK
    pod.command = [sys.executable, "-m", *args]  # ENTRYPOINT ["python", "-m"]
    return pod


def _in_mount(path: str, pod: LocalPod) -> bool:
    try:
        pod.local(path)
    except ValueError:
        return False
    return True


def _items(data: dict[str, bytes], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items}


def _merge(base: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in edit.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged


def _pod_config(text: str, edit: dict[str, Any], pod: LocalPod) -> str:
    config = _merge(yaml.safe_load(text), edit)
    run_dir = str(config["mesh"]["run_dir"])
    config["mesh"]["run_dir"] = str(pod.local(run_dir))
    return yaml.safe_dump(config, sort_keys=False)


SIDE_ADDRESSES = ("health_address", "metrics_address")
"""A service's addresses beside ``address`` that the pods' config moves to free loopback ports too."""


def loopback_addresses(config_text: str, ports: list[int]) -> tuple[dict[str, Any], dict[int, int]]:
    """A config edit moving every service's addresses to 127.0.0.1 on the given free ports, in ``services:`` order.

    Returns the edit and container port -> local port. ``ports`` has one port per address the config sets.
    """
    services = yaml.safe_load(config_text)["services"]
    free = iter(ports)
    edit: dict[str, Any] = {}
    port_of: dict[int, int] = {}
    for name, settings in services.items():
        moved = {}
        for key in ("address", *SIDE_ADDRESSES):
            if settings.get(key):
                local = next(free)
                moved[key] = f"{LOOPBACK}:{local}"
                port_of[container_port(str(settings[key]))] = local
        edit[name] = moved
    result: dict[str, Any] = {"services": edit}
    gateway = yaml.safe_load(config_text).get("mcp_gateway")
    if gateway is not None:  # not a `services:` entry: its own section, same keys
        result["mcp_gateway"] = {}
        for key in ("address", "metrics_address"):
            if gateway.get(key):
                local = next(free)
                result["mcp_gateway"][key] = f"{LOOPBACK}:{local}"
                port_of[container_port(str(gateway[key]))] = local
    assert next(free, None) is None, "more ports than addresses"
    return result, port_of


def address_count(config_text: str) -> int:
    """How many addresses (API, health, metrics) the config's services and gateway set: the free ports a test needs."""
    config = yaml.safe_load(config_text)
    gateway = config.get("mcp_gateway") or {}
    return sum(
        1 for settings in config["services"].values() for key in ("address", *SIDE_ADDRESSES) if settings.get(key)
    ) + sum(1 for key in ("address", "metrics_address") if gateway.get(key))


def container_port(address: str) -> int:
    """The port of a ``host:port`` address."""
    match = re.fullmatch(r".*:(\d+)", address)
    assert match is not None, address
    return int(match.group(1))


def files_written_under(directory: Path, since: float, skip: tuple[str, ...]) -> list[Path]:
    """Regular files under ``directory`` modified after ``since`` (skipping top-level names in ``skip``)."""
    found: list[Path] = []
    for current, folders, files in os.walk(directory):
        if Path(current) == directory:
            folders[:] = [f for f in folders if f not in skip]
        for file in files:
            path = Path(current) / file
            try:
                if path.stat().st_mtime > since:
                    found.append(path)
            except FileNotFoundError:
                continue
    return found
