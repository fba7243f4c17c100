"""The manifests' pods as local processes: the servers (the MCP gateway too) and then the orchestrator Job.

This is the closest to a cluster this machine gets (see tests/deploy/pods.py
for what is simulated and the three deliberate differences). It proves what
the schemas cannot: the containers' args and env start the real servers over mTLS with
the mounted cert-manager identities (simulated: ``pods.issued_certificates``), the
production credential variables from the Secrets that create-secrets.sh makes
are the ones used (the OAuth server signs with the mounted key, the tool
servers verify with the mounted public key), the kubelet's gRPC probe (Health/Check
for the probe's service, in plaintext on the health port) answers SERVING while the
API port refuses a plaintext client, the Job's `orchestrator.cli run` with
``--db $(HEIST_AUDIT_DB_URL)`` completes a session whose tool calls all
succeed, nothing is written outside the pods' writable mounts, and SIGTERM
stops every server cleanly within its grace period.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from playhouse.db_url import connect  # type: ignore[import-untyped]

from heist_common.tls import server_name
from tests.deploy.manifests import (
    REPO,
    by_kind,
    cluster_config,
    k8s_name,
    kubectl,
    load_resources,
    mesh_configmap,
    mesh_service_names,
)
from tests.deploy.pods import (
    LocalPod,
    address_count,
    create_secrets,
    files_written_under,
    issued_certificates,
    local_pod,
    loopback_addresses,
    secrets_from_manifests,
)
from tests.deploy.project import Reply, ScriptedLLM, dev_credentials, free_ports, stop_processes, text, tool_call

AUDIT_URL_ENV = "HEIST_DEPLOY_TEST_AUDIT_URL"
"""Run the Job against this audit database (e.g. a local PostgreSQL) instead of a fresh SQLite file."""
AUDIT_PASSWORD_ENV = "HEIST_DEPLOY_TEST_AUDIT_PASSWORD"

TOOL_CALLS = {
    "calculator_evaluate": {"expression": "6*7"},
    "file_reader_read_file": {"filename": "bank_layout.md"},
    "database_query_query": {"sql": "SELECT COUNT(*) FROM guards"},
}


def _responder(body: dict[str, Any]) -> Reply:
    """Each tool agent calls its tool once per turn, then speaks; the planner just speaks."""
    offered = [tool["function"]["name"] for tool in body.get("tools") or []]
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        return text("Noted, that settles my part.")
    for name in offered:
        if name in TOOL_CALLS:
            return tool_call(name, TOOL_CALLS[name])
    return text("We go on Friday night; everyone report.")


def _health(port: int, service: str, timeout_s: float = 0.5) -> str:
    """What the kubelet's gRPC probe asks: grpc.health.v1.Health/Check for ``service``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"DOWN ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Deployments' pods running, plus what the Job's pod needs."""
    tmp = tmp_path_factory.mktemp("pods")
    resources = load_resources()
    configmap = mesh_configmap(resources)
    assert configmap is not None
    config_text = str(configmap["data"]["heist.yaml"])

    # The Secrets, exactly as create-secrets.sh would make them from fresh dev credentials.
    creds_config = yaml.safe_load(config_text)
    creds_config["mesh"]["run_dir"] = str(tmp / "dev")
    (tmp / "creds.yaml").write_text(yaml.safe_dump(creds_config), encoding="utf-8")
    creds = dev_credentials(tmp / "creds.yaml")
    (tmp / "audit").mkdir()
    audit = {"HEIST_AUDIT_DB_URL": os.environ.get(AUDIT_URL_ENV) or f"sqlite:///{tmp / 'audit' / 'heist.db'}"}
    if os.environ.get(AUDIT_PASSWORD_ENV):
        audit["HEIST_AUDIT_DB_PASSWORD"] = os.environ[AUDIT_PASSWORD_ENV]
    rendered = create_secrets(creds, audit, kubectl=kubectl())
    assert rendered.returncode == 0, rendered.stderr
    secrets = secrets_from_manifests([d for d in yaml.safe_load_all(rendered.stdout) if d])
    secrets |= issued_certificates(resources)

    llm = ScriptedLLM(responder=_responder, models=(str(cluster_config(resources)["llm"]["model"]),)).start()
    edit, port_of = loopback_addresses(config_text, free_ports(address_count(config_text)))
    # The orchestrator service and the gateway read the audit database from the ConfigMap (the Job: --db).
    job_edit = {**edit, "llm": {"base_url": llm.base_url}, "database": {"url": audit["HEIST_AUDIT_DB_URL"]}}

    pods = {
        name: local_pod(deployment, resources, secrets, tmp / "pods" / name, job_edit)
        for name, deployment in by_kind(resources, "Deployment").items()
    }
    (job,) = by_kind(resources, "Job").values()
    job_pod = local_pod(job, resources, secrets, tmp / "pods" / "job", job_edit)
    started = time.time()  # every file written from here on was written by a pod's process
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, pod in pods.items():
            processes[name] = pod.start(tmp / f"{name}.log")
        yield {
            "resources": resources, "pods": pods, "processes": processes, "port_of": port_of, "tmp": tmp,
            "job_pod": job_pod, "audit_url": audit["HEIST_AUDIT_DB_URL"], "secrets": secrets, "started": started,
        }
    finally:
        stop_processes(processes.values(), 15)
        llm.stop()


def _ready(port: int, path: str, timeout_s: float = 0.5) -> str:
    """What the kubelet's HTTPS probe asks: GET ``path``, certificate unchecked, no client certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=timeout_s, context=context) as reply:
            return "SERVING" if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return f"DOWN ({exc})"


def _probe(mesh: dict[str, Any], probe: dict[str, Any], container: dict[str, Any]) -> str:
    """Run one probe of a container as the kubelet would (gRPC or HTTPS GET)."""
    if "grpc" in probe:
        return _health(mesh["port_of"][probe["grpc"]["port"]], probe["grpc"]["service"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    http = probe["httpGet"]
    assert http["scheme"] == "HTTPS"
    return _ready(mesh["port_of"][named.get(http["port"], http["port"])], http["path"])


def _wait_serving(mesh: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30  # the startupProbe's budget: 30 x 1 s
    for name, deployment in by_kind(mesh["resources"], "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        while (status := _probe(mesh, container["readinessProbe"], container)) != "SERVING":
            process = mesh["processes"][name]
            log = (mesh["tmp"] / f"{name}.log").read_text(encoding="utf-8", errors="replace")
            assert process.poll() is None, f"{name} exited {process.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"{name}: {status}\n{log}"
            time.sleep(0.2)


def test_every_server_pod_passes_its_grpc_probes(mesh: dict[str, Any]) -> None:
    _wait_serving(mesh)
    for name, deployment in by_kind(mesh["resources"], "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert _probe(mesh, container[probe], container) == "SERVING", (name, probe)
        if "grpc" not in container["readinessProbe"]:
            continue  # the MCP gateway: HTTPS /readyz (tests/servers/mcp_gateway cover its API port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = container[probe]["grpc"]
            assert _health(mesh["port_of"][grpc_probe["port"]], grpc_probe["service"]) == "SERVING", (name, probe)
        # The probe's service is the one the server registers: another name is NOT_FOUND.
        port = mesh["port_of"][container["readinessProbe"]["grpc"]["port"]]
        assert _health(port, "heist.nothing.v1.NoService") == "DOWN (NOT_FOUND)"
        # The API port is another port, and it takes no plaintext client.
        api = mesh["port_of"][next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]]
        assert api != port
        assert _health(api, container["readinessProbe"]["grpc"]["service"], timeout_s=2).startswith("DOWN"), name


def test_oauth_signs_with_the_mounted_key_not_a_generated_one(mesh: dict[str, Any]) -> None:
    _wait_serving(mesh)
    oauth = by_kind(mesh["resources"], "Deployment")[k8s_name("oauth")]
    port = mesh["port_of"][oauth["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]]
    orchestrator = mesh["secrets"]["heist-tls-orchestrator"]
    creds = grpc.ssl_channel_credentials(orchestrator["ca.crt"], orchestrator["tls.key"], orchestrator["tls.crt"])
    options = [("grpc.ssl_target_name_override", server_name("oauth"))]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        keys = oauth_pb2_grpc.OAuthServiceStub(channel).GetSigningKeys(oauth_pb2.GetSigningKeysRequest(), timeout=2)
    mounted = mesh["secrets"]["heist-oauth-public-key"]["public_key.pem"].decode()
    # With a mounted signing key the server generates no dev keys beside it, and serves the Secret's.
    assert not mesh["pods"]["oauth"].local("/var/lib/heist/credentials/public_key.pem").exists()
    assert [k.public_key_pem for k in keys.keys] == [mounted]


def test_the_orchestrator_job_runs_a_session_with_working_tools(mesh: dict[str, Any]) -> None:
    _wait_serving(mesh)
    job_pod: LocalPod = mesh["job_pod"]
    assert "--db" in job_pod.command and "$(" not in " ".join(job_pod.command), job_pod.command
    result = job_pod.run(timeout_s=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    session = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("Session:"))
    if job_pod.env.get("PGPASSWORD"):
        assert job_pod.env["PGPASSWORD"] not in result.stdout + result.stderr

    # Read the audit as the Job's pod would reach it (PGPASSWORD from the Secret, for PostgreSQL).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", job_pod.env.get("PGPASSWORD", ""))
        database = connect(mesh["audit_url"])
        where = f"WHERE session_id = {database.param}"
        sessions = database.execute_sql(f"SELECT status, num_turns FROM sessions {where}", (session,)).fetchall()
        tools = database.execute_sql(
            f"SELECT tool_name, success, status_code FROM tool_usage {where}", (session,)
        ).fetchall()
        database.close()
    config = cluster_config(mesh["resources"])
    assert [tuple(row) for row in sessions] == [("completed", config["session"]["max_turns"])]
    tool_agents = {tool for agent in config["agents"] for tool in agent["tools"]}
    assert {name for name, _, _ in tools} == tool_agents, tools
    assert all(bool(success) and code == "OK" for _, success, code in tools), tools
    # Its session logs went to run_dir in its emptyDir.
    assert list(job_pod.local("/var/lib/heist/sessions").glob("*.json"))


def test_nothing_is_written_outside_the_pods_writable_mounts(mesh: dict[str, Any]) -> None:
    _wait_serving(mesh)
    # /app in the image is the repository here: the processes must not have written to it.
    skip = (".git", ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache")
    assert files_written_under(REPO, mesh["started"], skip) == []
    pods = {**mesh["pods"], "heist-run": mesh["job_pod"]}
    resources = {**by_kind(mesh["resources"], "Deployment"), **by_kind(mesh["resources"], "Job")}
    writes = 0
    for name, pod in pods.items():
        spec = resources[name]["spec"]["template"]["spec"]
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        writable = [pod.local(m["mountPath"]) for m in spec["containers"][0]["volumeMounts"] if m["name"] in empty_dirs]
        for written in files_written_under(pod.root, mesh["started"], ()):
            writes += 1
            assert any(written.is_relative_to(w) for w in writable), f"{name} wrote {written} (not an emptyDir)"
    assert writes, "the pods wrote nothing at all: the check would be vacuous"


def test_sigterm_stops_every_server_within_its_grace_period(mesh: dict[str, Any]) -> None:
    _wait_serving(mesh)
    for name, deployment in by_kind(mesh["resources"], "Deployment").items():
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        process = mesh["processes"][name]
        process.terminate()
        assert process.wait(timeout=grace) == 0, f"{name} did not exit cleanly on SIGTERM"
    assert {k8s_name(s) for s in mesh_service_names()} | {"mcp-gateway"} == set(mesh["processes"])
