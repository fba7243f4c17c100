"""End to end: `make serve` on free ports, then probe every service with the real grpcurl binary."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from heist_common.layout import REPO_ROOT
from tests.e2e.harness import GRPCURL, PROCESSES, SERVICES, Mesh, client_secrets, grpcurl, make, server_pids
from tests.support.access_log import access_entries
from tests.support.ports import listening

SESSION = "heist_e2e_20261121_ab12"


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
    assert len(server_pids(mesh.config)) == PROCESSES
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
    listed = mesh.grpcurl(name, mesh.address(name), "list")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICES[name], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed.stdout.split()
    )
    request = json.dumps({"service": SERVICES[name]})
    health = mesh.grpcurl(name, "-d", request, mesh.address(name), "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_describe_shows_the_scope_policy(mesh):
    described = mesh.grpcurl("calculator", mesh.address("calculator"), "describe", SERVICES["calculator"])
    assert described.returncode == 0, described.stderr
    assert 'option (.heist.auth.v1.required_scope) = "calculator:use";' in described.stdout
    request = mesh.grpcurl("calculator", mesh.address("calculator"), "describe", "heist.calculator.v1.EvaluateRequest")
    assert "string expression = 1" in request.stdout


def test_describe_shows_the_idempotency_and_approval_contract(mesh):
    """What a resume may send again (docs/approvals.md) is in the contract, visible to any gRPC client."""
    calculator = mesh.grpcurl("calculator", mesh.address("calculator"), "describe", SERVICES["calculator"])
    assert calculator.returncode == 0, calculator.stderr
    assert "option idempotency_level = NO_SIDE_EFFECTS;" in calculator.stdout
    database = mesh.grpcurl("database_query", mesh.address("database_query"), "describe", SERVICES["database_query"])
    assert database.returncode == 0, database.stderr
    query = database.stdout.split("rpc Query", 1)[1].split("rpc ", 1)[0]
    assert "idempotency_level" not in query, "a query is never sent twice by a resume"
    assert 'option (.heist.auth.v1.required_scope) = "database_query:use";' in query
    policy = mesh.grpcurl("calculator", mesh.address("calculator"), "describe", "heist.tools.v1.Approval")
    assert policy.returncode == 0, policy.stderr
    assert "APPROVAL_REQUIRED = 1;" in policy.stdout


def test_tool_calls_with_the_right_scope(mesh):
    token = mesh.token("grpcurl", ["calculator:use", "file_reader:use", "database_query:use"])
    headers = ["-H", f"authorization: Bearer {token}", "-H", f"x-session-id: {SESSION}"]
    calculated = mesh.grpcurl(
        "calculator", *headers, "-d", '{"expression": "(120 - 15) * 3 / 7"}', mesh.address("calculator"),
        "heist.calculator.v1.CalculatorService/Evaluate",
    )  # fmt: skip
    assert calculated.returncode == 0, calculated.stderr
    assert json.loads(calculated.stdout) == {"value": 45, "rendered": "(120 - 15) * 3 / 7 = 45"}
    document = mesh.grpcurl(
        "file_reader", *headers, "-d", '{"filename": "vault_time_lock.md"}', mesh.address("file_reader"),
        "heist.file_reader.v1.FileReaderService/ReadFile",
    )  # fmt: skip
    assert document.returncode == 0, document.stderr
    assert "time lock" in json.loads(document.stdout)["content"].lower()
    rows = mesh.grpcurl(
        "database_query", *headers, "-d", '{"sql": "SELECT count(*) AS n FROM guards"}', mesh.address("database_query"),
        "heist.database_query.v1.DatabaseQueryService/Query",
    )  # fmt: skip
    assert rows.returncode == 0, rows.stderr
    assert json.loads(rows.stdout) == {"columns": ["n"], "rows": [{"values": [{"int_value": "8"}]}]}
    memory = mesh.token("grpcurl", ["memory:read", "memory:write"], session=SESSION)
    stored = mesh.grpcurl(
        "memory", "-H", f"authorization: Bearer {memory}", "-H", f"x-session-id: {SESSION}",
        "-d", '{"agent_name": "planner", "turn_id": 1, "message": "go at 02:10"}',
        mesh.address("memory"), "heist.memory.v1.MemoryService/StoreMemory",
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    elsewhere = mesh.grpcurl(
        "memory", "-H", f"authorization: Bearer {memory}", "-H", "x-session-id: heist_someone_else", "-d", "{}",
        mesh.address("memory"), "heist.memory.v1.MemoryService/GetStats",
    )  # fmt: skip
    assert elsewhere.returncode != 0 and "Code: PermissionDenied" in elsewhere.stderr
    assert json.loads(stored.stdout) == {"agent_memory_count": 1}


def readme_probe() -> str:
    """The README tour's grpcurl block, the one that says this test runs it."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    return next(block for block in blocks if "tests/e2e/test_grpcurl.py runs this block" in block)


def test_the_readme_probe_runs_as_written_against_this_mesh(mesh, tmp_path):
    probe = readme_probe()
    assert "-d @" in probe and "client_secret" in probe  # the secret goes in on stdin
    assert not re.search(r"client_secret\W+\$", probe), "a client secret on grpcurl's command line"
    # The same commands, pointed at this test's run folder and ports instead of the shipped ones.
    shipped = yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())["services"]
    script = probe.replace("var/", f"{mesh.run_dir}/")
    for name in SERVICES:
        script = script.replace(shipped[name]["address"], mesh.address(name))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grpcurl").symlink_to(GRPCURL)
    (bin_dir / "python").symlink_to(sys.executable)  # `python` as the activated venv has it
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert SERVICES["calculator"] in ran.stdout and '"status": "SERVING"' in ran.stdout
    assert '"value": 45' in ran.stdout, ran.stdout


def test_wrong_scope_is_permission_denied_and_no_token_is_unauthenticated(mesh):
    token = mesh.token("safecracker", ["calculator:use"])
    denied = mesh.grpcurl(
        "file_reader", "-H", f"authorization: Bearer {token}", "-d", '{"filename": "bank_layout.md"}',
        mesh.address("file_reader"),
        "heist.file_reader.v1.FileReaderService/ReadFile",
    )  # fmt: skip
    assert denied.returncode != 0
    assert "Code: PermissionDenied" in denied.stderr and "file_reader:use" in denied.stderr
    anonymous = mesh.grpcurl(
        "calculator", "-d", '{"expression": "1 + 1"}', mesh.address("calculator"),
        "heist.calculator.v1.CalculatorService/Evaluate",
    )
    assert anonymous.returncode != 0
    assert "Code: Unauthenticated" in anonymous.stderr


def readme_recipe() -> str:
    """The bash blocks of the "Probing with grpcurl" section, in the README or the docs page it moved to, in order."""
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]:
        section = re.search(r"^(#+) Probing with grpcurl\n(.*?)(?=^\1 |\Z)", path.read_text(), re.S | re.M)
        if section:
            blocks = re.findall(r"^```bash\n(.*?)^```", section.group(2), re.S | re.M)
            assert blocks, f"no bash block in 'Probing with grpcurl' of {path}"
            return "\n".join(blocks)
    raise AssertionError("no 'Probing with grpcurl' section in README.md or docs/")


def recipe_for(mesh: Mesh, work: Path) -> str:
    """The recipe with the shipped ports replaced by this mesh's (``var/`` is linked to its run folder)."""
    recipe = readme_recipe()
    shipped = yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())["services"]
    for name in SERVICES:
        recipe = recipe.replace(shipped[name]["address"], mesh.address(name))
    (work / "var").symlink_to(mesh.run_dir)
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text("")  # PATH is the shims' alone (below)
    return recipe


def shim_folder(work: Path, log: Path) -> Path:
    """A PATH of wrappers that write their argv (one file per process) and exec the real command.

    PATH holds nothing else, so a command the recipe runs without a wrapper is "not found" and
    fails the test rather than going unwatched.
    """
    shims = work / "shims"
    shims.mkdir()
    log.mkdir()
    for name, real in {"grpcurl": str(GRPCURL), "python": sys.executable, "tail": shutil.which("tail")}.items():
        assert real, name
        record = f"printf '%s\\0' {shlex.quote(name)} \"$@\" > {shlex.quote(str(log))}/$$"
        (shims / name).write_text(f"#!/bin/sh\n{record}\nexec {shlex.quote(real)} \"$@\"\n")
        (shims / name).chmod(0o755)
    return shims


class CmdlineWatch:
    """Scans every process's /proc/<pid>/cmdline on a thread while the recipe runs, for any of ``needles``."""

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.seen: list[bytes] = []
        self.grpcurl_processes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _scan(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                except OSError:
                    continue
                if str(GRPCURL).encode() in cmdline:
                    self.grpcurl_processes.add(int(entry.name))
                if any(needle in cmdline for needle in self.needles):
                    self.seen.append(cmdline)
            time.sleep(0.002)


def test_the_documented_recipe_works_and_keeps_secrets_off_command_lines(mesh, tmp_path):
    """Run the README's grpcurl recipe as written; no process it starts has a client secret in its argv."""
    work = tmp_path / "repo"
    work.mkdir()
    recipe, log = recipe_for(mesh, work), tmp_path / "argv"
    env = {"PATH": str(shim_folder(work, log)), "HOME": str(tmp_path)}
    secrets = client_secrets(mesh.run_dir)
    with CmdlineWatch([secret.encode() for secret in secrets]) as watch:
        ran = subprocess.run(["/bin/bash", "-c", recipe], cwd=work, env=env, capture_output=True, text=True, timeout=90)
    argvs = [path.read_bytes().split(b"\0")[:-1] for path in log.iterdir()]
    leaked = [argv for argv in argvs if any(secret.encode() in part for secret in secrets for part in argv)]
    assert leaked == [], "a client secret on a command line (any local user reads /proc/*/cmdline)"
    assert watch.seen == [], "a client secret in some process's /proc/<pid>/cmdline while the recipe ran"
    out = ran.stdout + ran.stderr
    assert "not found" not in ran.stderr, out
    assert '"value": 45' in ran.stdout and '"status": "SERVING"' in ran.stdout, out
    assert '"agent_memory_count": 1' in ran.stdout, out
    assert '"active": true' in ran.stdout and '"client_id": "grpcurl"' in ran.stdout, out  # the introspection
    assert ran.stderr.count("Code: Unauthenticated") == 1 and ran.stderr.count("Code: PermissionDenied") == 2, out
    assert sum(argv[0] == b"grpcurl" for argv in argvs) >= 9, argvs
    assert all(b"-authority" in argv for argv in argvs if argv[0] == b"grpcurl"), "each call names its service"
    assert watch.grpcurl_processes, "the /proc watch saw grpcurl running, so it would have seen a secret"


def test_make_token_prints_a_working_token_with_the_secret_read_from_the_credentials(mesh):
    issued = make("token", f"CONFIG={mesh.config}", "CLIENT=grpcurl", "SCOPES=calculator:use", f"SESSION={SESSION}")
    assert issued.returncode == 0, issued.stdout + issued.stderr
    token = issued.stdout.strip()
    assert token.count(".") == 2 and not any(secret in issued.stdout for secret in client_secrets(mesh.run_dir))
    calculated = mesh.grpcurl(
        "calculator", "-H", f"authorization: Bearer {token}", "-H", f"x-session-id: {SESSION}",
        "-d", '{"expression": "6 * 7"}', mesh.address("calculator"), "heist.calculator.v1.CalculatorService/Evaluate",
    )  # fmt: skip
    assert calculated.returncode == 0, calculated.stderr
    assert json.loads(calculated.stdout)["value"] == 42
    unknown = make("token", f"CONFIG={mesh.config}", "CLIENT=nobody", "SCOPES=calculator:use")
    assert unknown.returncode != 0 and "Error 3" in unknown.stderr, unknown.stderr  # the CLI's exit 3: credentials
    assert "no secret for client 'nobody'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_server_log_has_the_session_id(mesh):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        matching = [
            e for e in access_entries((mesh.run_dir / "log" / "calculator.log").read_text()) if e["session"] == SESSION
        ]
        if matching:
            break
        time.sleep(0.2)
    assert matching, "no access-log line with the session id"
    assert (matching[0]["method"], matching[0]["code"]) == ("/heist.calculator.v1.CalculatorService/Evaluate", "OK")
    assert (matching[0]["auth"], matching[0]["client"]) == ("ok", "grpcurl")


def test_make_status_prints_every_metrics_url_and_each_serves_the_grpc_series(mesh):
    status = make("status", f"CONFIG={mesh.config}")
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(line.startswith("SERVICE") and "METRICS" in line for line in status.stdout.splitlines())
    for name, port in mesh.metrics_ports.items():
        url = f"http://127.0.0.1:{port}/metrics"
        line = next(line for line in status.stdout.splitlines() if line.startswith(name))
        assert line.rstrip().endswith(url), status.stdout
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        service = SERVICES[name]
        started = [line for line in text.splitlines() if line.startswith("grpc_server_started_total{")]
        assert any(f'grpc_service="{service}"' in line for line in started), name
        assert "grpc_server_handling_seconds_bucket{" in text and "grpc_server_handled_total{" in text
    # The calls this module made with grpcurl are counted where they landed.
    calculator = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_ports['calculator']}/metrics", timeout=5)
    text = calculator.read().decode()
    handled = [line for line in text.splitlines() if line.startswith("grpc_server_handled_total{")]
    ok = next(line for line in handled if 'grpc_method="Evaluate"' in line and 'grpc_code="OK"' in line)
    assert float(ok.rsplit(" ", 1)[1]) >= 1
    assert SESSION not in text


def test_serve_twice_starts_no_duplicates(mesh):
    before = server_pids(mesh.config)
    pid_files = {path.name: path.read_text() for path in (mesh.run_dir / "run").glob("*.pid")}
    again = make("serve", f"CONFIG={mesh.config}", "LLM=off")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == PROCESSES
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


def test_serve_fails_clearly_when_a_metrics_port_is_taken(tmp_path):
    blocked = Mesh(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", blocked.metrics_ports["memory"]))
        squatter.listen()
        try:
            result = make("serve", f"CONFIG={blocked.config}", "LLM=off")
            assert result.returncode != 0
            assert f"port {blocked.metrics_ports['memory']}" in result.stderr and "memory" in result.stderr
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
    assert not any(listening(port) for port in mesh.metrics_ports.values())
    again = make("stop", f"CONFIG={mesh.config}")
    assert again.returncode == 0 and "nothing running" in again.stdout


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (in containers PID 1 may never reap the orphaned servers)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_plaintext_and_certificate_less_clients_are_refused_at_the_handshake(mesh):
    address = mesh.address("calculator")
    health = ["-d", json.dumps({"service": SERVICES["calculator"]}), address, "grpc.health.v1.Health/Check"]
    plaintext = grpcurl(*health, service="calculator")  # run_dir=None: -plaintext
    assert plaintext.returncode != 0 and "SERVING" not in plaintext.stdout
    ca = str(mesh.run_dir / "credentials" / "tls" / "ca.crt")
    no_cert = subprocess.run([str(GRPCURL), "-cacert", ca, *health], capture_output=True, text=True, timeout=30)
    assert no_cert.returncode != 0 and "SERVING" not in no_cert.stdout, no_cert.stdout
