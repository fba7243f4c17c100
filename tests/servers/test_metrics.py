"""Prometheus metrics: the go-grpc-prometheus series on every server, each service's own, and no session in labels."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.database_query.v1 import database_query_pb2, database_query_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from heist_common.config import HeistConfig, load_config
from servers.auth import credential_store
from servers.runtime.metrics import GO_CODE_NAMES
from tests.support.channels import aio_channel
from tests.support.config import SERVICES, write_heist_config
from tests.support.inprocess import InProcessMesh
from tests.support.ports import listening

SESSION = "heist_metrics_session_4f2a9c"
CALCULATOR = "heist.calculator.v1.CalculatorService"


@pytest.fixture
def config(tmp_path: Path) -> HeistConfig:
    everywhere = dict.fromkeys(SERVICES, "127.0.0.1:0")
    return load_config(write_heist_config(tmp_path, metrics_addresses=everywhere))


@pytest.fixture
async def mesh(config: HeistConfig) -> AsyncIterator[InProcessMesh]:
    running = InProcessMesh(config)
    try:
        yield await running.start_all()
    finally:
        await running.stop_all()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


async def samples(mesh: InProcessMesh, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one server's endpoint: (sample name, sorted labels) -> value."""
    url = mesh.servers[name].metrics_url
    assert url is not None
    text = await asyncio.to_thread(scrape, url)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def grpc_labels(service: str, method: str, **extra: str) -> tuple[tuple[str, str], ...]:
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, **extra}
    return tuple(sorted(labels.items()))


async def test_every_server_serves_the_standard_grpc_series(mesh: InProcessMesh) -> None:
    for name, server in mesh.servers.items():
        async with aio_channel(mesh.config, name, server.address) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        found = await samples(mesh, name)
        health = ("grpc.health.v1.Health", "Check")
        assert found[("grpc_server_started_total", grpc_labels(*health))] == 1, name
        assert found[("grpc_server_handled_total", grpc_labels(*health, grpc_code="OK"))] == 1, name
        assert found[("grpc_server_handling_seconds_count", grpc_labels(*health))] == 1, name
        assert found[("grpc_server_msg_received_total", grpc_labels(*health))] == 1, name
        assert found[("grpc_server_msg_sent_total", grpc_labels(*health))] == 1, name
        # Every code of every method exists from the start, so rate() and dashboards see zeros, not gaps.
        contract_method = next(iter(mesh.servers[name].definition.contract.descriptor.methods))
        full_name = mesh.servers[name].definition.contract.full_name
        for code in GO_CODE_NAMES.values():
            labels = grpc_labels(full_name, contract_method.name, grpc_code=code)
            assert found[("grpc_server_handled_total", labels)] == 0
        assert any(key[0] == "process_resident_memory_bytes" for key in found), "process metrics are exposed"


async def test_codes_latency_and_auth_verdicts_are_counted(mesh: InProcessMesh) -> None:
    stub = calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))
    request = calculator_pb2.EvaluateRequest(expression="6 * 7")
    for _ in range(3):
        await stub.Evaluate(request, metadata=mesh.auth("calculator:use", SESSION), timeout=2)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Evaluate(request, timeout=2)  # no token
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Evaluate(request, metadata=mesh.auth("file_reader:use", SESSION), timeout=2)  # wrong scope
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Evaluate(calculator_pb2.EvaluateRequest(expression="1 +"), metadata=mesh.auth("calculator:use"))

    found = await samples(mesh, "calculator")
    handled = {
        code: found[("grpc_server_handled_total", grpc_labels(CALCULATOR, "Evaluate", grpc_code=code))]
        for code in ("OK", "Unauthenticated", "PermissionDenied", "InvalidArgument", "Internal")
    }
    assert handled == {"OK": 3, "Unauthenticated": 1, "PermissionDenied": 1, "InvalidArgument": 1, "Internal": 0}
    assert found[("grpc_server_started_total", grpc_labels(CALCULATOR, "Evaluate"))] == 6
    assert found[("grpc_server_msg_sent_total", grpc_labels(CALCULATOR, "Evaluate"))] == 3
    assert found[("grpc_server_handling_seconds_count", grpc_labels(CALCULATOR, "Evaluate"))] == 6
    assert 0 < found[("grpc_server_handling_seconds_sum", grpc_labels(CALCULATOR, "Evaluate"))] < 6
    infinity = grpc_labels(CALCULATOR, "Evaluate", le="+Inf")
    assert found[("grpc_server_handling_seconds_bucket", infinity)] == 6

    def verdicts(verdict: str, reason: str) -> float:
        return found[("heist_auth_verdicts_total", (("reason", reason), ("verdict", verdict)))]

    assert (verdicts("ok", ""), verdicts("denied", "missing"), verdicts("denied", "missing_scope")) == (4, 1, 1)
    assert verdicts("denied", "expired") == 0


async def test_no_label_carries_a_session_or_anything_a_caller_chose(mesh: InProcessMesh) -> None:
    stub = calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))
    for index in range(5):
        session = f"{SESSION}_{index}"
        await stub.Evaluate(
            calculator_pb2.EvaluateRequest(expression="1 + 1"), metadata=mesh.auth("calculator:use", session)
        )
    memory = memory_pb2_grpc.MemoryServiceStub(await mesh.channel("memory"))
    await memory.StoreMemory(
        memory_pb2.StoreMemoryRequest(agent_name="agent_who_leaks", turn_id=1, message="hello"),
        metadata=mesh.session_auth(SESSION),
    )
    for name in ("calculator", "memory"):
        url = mesh.servers[name].metrics_url
        assert url is not None
        text = await asyncio.to_thread(scrape, url)
        assert SESSION not in text and "agent_who_leaks" not in text
    before = await samples(mesh, "calculator")
    await stub.Evaluate(calculator_pb2.EvaluateRequest(expression="2 + 2"), metadata=mesh.auth("calculator:use", "x9"))
    assert len(await samples(mesh, "calculator")) == len(before), "a new session adds no series"


async def test_memory_reports_entries_bytes_and_quota_refusals(tmp_path: Path) -> None:
    path = write_heist_config(
        tmp_path,
        metrics_addresses={"memory": "127.0.0.1:0"},
        limits={"memory": {"max_memories_per_session": 2}},
    )
    mesh = InProcessMesh(load_config(path))
    try:
        await mesh.start("memory")
        stub = memory_pb2_grpc.MemoryServiceStub(await mesh.channel("memory"))
        auth = mesh.session_auth(SESSION)
        for turn, text in ((1, "go at 02:10"), (2, "vault"), (2, "vault!")):  # turn 2 stored twice: replaced
            await stub.StoreMemory(memory_pb2.StoreMemoryRequest(agent_name="planner", turn_id=turn, message=text),
                                   metadata=auth)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StoreMemory(memory_pb2.StoreMemoryRequest(agent_name="planner", turn_id=3, message="x"),
                                   metadata=auth)  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found = await samples(mesh, "memory")
        assert found[("heist_memory_entries", ())] == 2
        assert found[("heist_memory_bytes", ())] == len("go at 02:10") + len("vault!")
        assert found[("heist_memory_sessions", ())] == 1
        assert found[("heist_memory_quota_refusals_total", ())] == 1
    finally:
        await mesh.stop_all()


async def test_oauth_counts_tokens_issued_and_refused_by_reason(mesh: InProcessMesh) -> None:
    stub = oauth_pb2_grpc.OAuthServiceStub(await mesh.channel("oauth"))
    secret = credential_store.client_secret(mesh.config, "safecracker")

    def issue(client: str, secret: str, scopes: list[str]) -> oauth_pb2.IssueTokenRequest:
        return oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id=client, client_secret=secret, scopes=scopes
        )

    await stub.IssueToken(issue("safecracker", secret, ["calculator:use"]), timeout=2)
    await stub.IssueToken(issue("safecracker", secret, []), timeout=2)
    for bad in (issue("safecracker", "wrong", []), issue("safecracker", secret, ["memory:admin"])):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.IssueToken(bad, timeout=2)
    found = await samples(mesh, "oauth")
    assert found[("heist_oauth_tokens_issued_total", (("client", "safecracker"),))] == 2
    assert found[("heist_oauth_tokens_issued_total", (("client", "hacker"),))] == 0
    assert found[("heist_oauth_tokens_refused_total", (("reason", "invalid_client"),))] == 1
    assert found[("heist_oauth_tokens_refused_total", (("reason", "invalid_scope"),))] == 1


async def test_database_query_time_and_refusals(mesh: InProcessMesh) -> None:
    stub = database_query_pb2_grpc.DatabaseQueryServiceStub(await mesh.channel("database_query"))
    auth = mesh.auth("database_query:use")
    await stub.Query(database_query_pb2.QueryRequest(sql="SELECT name FROM guards LIMIT 2"), metadata=auth)
    for sql in ("DELETE FROM guards", "SELECT no_such_column FROM guards"):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Query(database_query_pb2.QueryRequest(sql=sql), metadata=auth)
    found = await samples(mesh, "database_query")
    assert found[("heist_database_query_seconds_count", ())] == 3
    assert found[("heist_database_query_refused_total", (("reason", "invalid_sql"),))] == 2


async def test_the_endpoint_stops_with_the_server(config: HeistConfig) -> None:
    mesh = InProcessMesh(config)
    server = await mesh.start("calculator")
    assert server.metrics is not None
    port = server.metrics.port
    assert listening(port)
    await asyncio.to_thread(scrape, server.metrics.url)  # the encoding thread has started
    await mesh.stop_all()
    assert not listening(port)
    assert server.metrics.connections == 0
    for _ in range(40):
        if not any(thread.name.startswith("heist-metrics") for thread in threading.enumerate()):
            break
        await asyncio.sleep(0.05)
    assert not any(thread.name.startswith("heist-metrics") for thread in threading.enumerate())


async def test_without_a_metrics_address_there_is_no_endpoint(tmp_path: Path) -> None:
    mesh = InProcessMesh(load_config(write_heist_config(tmp_path)))
    try:
        server = await mesh.start("calculator")
        assert server.metrics is None and server.metrics_url is None
    finally:
        await mesh.stop_all()


def test_a_server_process_whose_metrics_port_is_taken_exits_saying_so(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.support.ports import free_ports
    from tests.support.processes import REPO

    grpc_port, metrics_port = free_ports(2)
    config_path = write_heist_config(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", metrics_port))
        squatter.listen()
        completed = subprocess.run(
            [sys.executable, "-m", "servers.calculator", "--config", str(config_path),
             "--address", f"127.0.0.1:{grpc_port}", "--metrics-address", f"127.0.0.1:{metrics_port}"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert completed.returncode == 1, completed.stderr
    assert f"cannot serve metrics on 127.0.0.1:{metrics_port}" in completed.stderr
    assert not listening(grpc_port)


async def raw_http(port: int, request: bytes) -> tuple[bytes, float]:
    """Send ``request`` on a fresh connection; (everything the server sent before closing, seconds it took)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
    except ConnectionResetError:  # closed with our bytes unread: nothing was answered
        answer = b""
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def test_the_endpoint_caps_connections_times_them_out_and_answers_only_get_metrics(tmp_path: Path) -> None:
    bounds = {"metrics_max_connections": 2, "metrics_timeout_s": 0.3}
    path = write_heist_config(tmp_path, metrics_addresses={"calculator": "127.0.0.1:0"}, server_bounds=bounds)
    mesh = InProcessMesh(load_config(path))
    try:
        server = await mesh.start("calculator")
        assert server.metrics is not None
        port = server.metrics.port
        silent, took = await raw_http(port, b"")  # sends nothing: closed at the timeout
        assert silent == b"" and 0.25 < took < 2.0
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert server.metrics.connections == 2, "the third took the place of the first"
        answer, _ = await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # at the cap: still served
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"grpc_server_started_total" in answer
        assert b"Content-Type: text/plain; version=0.0.4" in answer
        for _, writer in held:
            writer.close()
        head, _ = await raw_http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert (await raw_http(port, b"GET /other HTTP/1.1\r\n\r\n"))[0].startswith(b"HTTP/1.1 404 ")
        assert (await raw_http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].startswith(b"HTTP/1.1 405 ")
        too_long, _ = await raw_http(port, b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n")
        assert too_long == b""
    finally:
        await mesh.stop_all()
