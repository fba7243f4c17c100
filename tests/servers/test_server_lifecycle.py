"""Health, drain, the process entry point and the no-UNKNOWN/INTERNAL guarantee."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.database_query.v1 import database_query_pb2, database_query_pb2_grpc
from heist.file_reader.v1 import file_reader_pb2, file_reader_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.layout import REPO_ROOT
from servers.auth import credential_store
from servers.runtime.lifecycle import start_service
from tests.support import channels
from tests.support.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("name", "full_name"),
    [
        ("oauth", "heist.oauth.v1.OAuthService"),
        ("memory", "heist.memory.v1.MemoryService"),
        ("calculator", "heist.calculator.v1.CalculatorService"),
        ("file_reader", "heist.file_reader.v1.FileReaderService"),
        ("database_query", "heist.database_query.v1.DatabaseQueryService"),
    ],
)
async def test_every_service_reports_serving_for_itself_and_overall(mesh, name, full_name):
    health = health_pb2_grpc.HealthStub(await mesh.channel(name))
    for service in ("", full_name):
        assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="heist.nope.v1.Nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_sees_serving_then_not_serving_on_drain(mesh):
    server = await mesh.start("calculator")
    async with channels.aio_channel(mesh.config, "calculator", server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="heist.calculator.v1.CalculatorService")
        )
        assert (await watch.read()).status == SERVING
        await server.drain()
        assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == NOT_SERVING
        watch.cancel()
    await server.stop(0.1)
    await server.stop(0.1)  # idempotent


async def test_start_server_reports_the_real_port_and_refuses_a_taken_one(config):
    server = await start_service("calculator", config)
    try:
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
        with pytest.raises(OSError, match=str(server.port)):
            await start_service("memory", config, server.address)
    finally:
        await server.stop(0.1)


async def test_no_bad_input_yields_unknown_or_internal(mesh):
    """Throw junk at every method, with and without valid tokens: only deliberate codes may come back."""
    token = [("authorization", f"Bearer {mesh.token(['calculator:use', 'file_reader:use', 'database_query:use'])}")]
    junk_texts = ["", " ", "\x00", "💣" * 50, "'; DROP TABLE guards; --", "../" * 50, "9" * 10_000, "%s%n{0}"]
    calls = []
    calculator = calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))
    files = file_reader_pb2_grpc.FileReaderServiceStub(await mesh.channel("file_reader"))
    database = database_query_pb2_grpc.DatabaseQueryServiceStub(await mesh.channel("database_query"))
    memory = memory_pb2_grpc.MemoryServiceStub(await mesh.channel("memory"))
    oauth = oauth_pb2_grpc.OAuthServiceStub(await mesh.channel("oauth"))
    for index, text in enumerate(junk_texts):
        for metadata in ([], token, [*token, ("x-session-id", f"junk-{index}")]):
            calls += [
                calculator.Evaluate(calculator_pb2.EvaluateRequest(expression=text), metadata=metadata),
                files.ReadFile(file_reader_pb2.ReadFileRequest(filename=text), metadata=metadata),
                database.Query(database_query_pb2.QueryRequest(sql=text), metadata=metadata),
                memory.StoreMemory(
                    memory_pb2.StoreMemoryRequest(agent_name=text, turn_id=-5, message=text), metadata=metadata
                ),
                memory.GetCompressedMemory(
                    memory_pb2.GetCompressedMemoryRequest(agent_name=text, recent_count=-1, max_chars=-1),
                    metadata=metadata,
                ),
                memory.ClearMemories(memory_pb2.ClearMemoriesRequest(), metadata=metadata),
                oauth.IssueToken(
                    oauth_pb2.IssueTokenRequest(grant_type=text, client_id=text, client_secret=text, scopes=[text]),
                    metadata=metadata,
                ),
                oauth.IssueToken(
                    oauth_pb2.IssueTokenRequest(grant_type="client_credentials", client_id=text, client_secret=text),
                    metadata=metadata,
                ),
                oauth.IntrospectToken(oauth_pb2.IntrospectTokenRequest(token=text), metadata=metadata),
            ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    codes = {result.code() for result in results if isinstance(result, grpc.aio.AioRpcError)}
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, grpc.aio.AioRpcError)]
    assert not unexpected
    assert grpc.StatusCode.UNKNOWN not in codes and grpc.StatusCode.INTERNAL not in codes, codes
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED} <= codes


def test_process_entry_serves_and_exits_zero_on_sigterm(config, tmp_path: Path):
    port = free_port()
    credential_store.ensure_dev_credentials(config)  # as `make serve` does, so the client has its certificate now
    log = (tmp_path / "calculator.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "servers.calculator", "--config", str(config.config_path), "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with channels.channel(config, "calculator", f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            assert status == SERVING
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "calculator.log").read_text()
    assert f"listening on 127.0.0.1:{port}" in text and "stopped" in text


def test_process_entry_rejects_a_bad_config(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  calculator: {adress: '127.0.0.1:1'}\n")
    result = subprocess.run(
        [sys.executable, "-m", "servers.calculator", "--config", str(bad)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert "services.calculator.adress: unknown key" in result.stderr
