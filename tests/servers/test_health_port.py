"""The plaintext health port (``services.<name>.health_address``): probes without a certificate, nothing else.

The kubelet's gRPC probes cannot present a client certificate, so an mTLS server
answers health on a second port too. That port must say only whether the service
is up (the same statuses as the API port, NOT_SERVING while draining) and must not
weaken the API port, which still refuses a client without a certificate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc

from heist_common import tls
from heist_common.config import HeistConfig, load_config
from servers.auth import credential_store
from servers.runtime.lifecycle import RunningServer, parse_args, start_service
from tests.support.config import write_heist_config

CALCULATOR = "heist.calculator.v1.CalculatorService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def config(tmp_path: Path) -> HeistConfig:
    loaded = load_config(write_heist_config(tmp_path))
    assert tls.mtls(loaded), "the shipped default is mTLS: these tests are about that case"
    credential_store.ensure_dev_credentials(loaded)
    return loaded


@pytest.fixture
async def calculator(config: HeistConfig) -> AsyncIterator[RunningServer]:
    server = await start_service("calculator", config, health_address="127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop(0.05)


async def status(channel: grpc.aio.Channel, service: str = CALCULATOR) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return int(response.status)


async def test_the_health_port_answers_without_a_client_certificate(calculator: RunningServer) -> None:
    assert calculator.health_address is not None and calculator.health_address != calculator.address
    async with grpc.aio.insecure_channel(calculator.health_address) as channel:
        assert await status(channel) == SERVING
        assert await status(channel, "") == SERVING


async def test_the_api_port_still_refuses_a_plaintext_client(calculator: RunningServer) -> None:
    async with grpc.aio.insecure_channel(calculator.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await status(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_health_port_exposes_no_other_service(calculator: RunningServer) -> None:
    assert calculator.health_address is not None
    async with grpc.aio.insecure_channel(calculator.health_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as tool:
            await calculator_pb2_grpc.CalculatorServiceStub(channel).Evaluate(
                calculator_pb2.EvaluateRequest(expression="1 + 1"), timeout=2
            )
        assert tool.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as reflection:
            async for _ in listing:
                pass
        assert reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_draining_shows_on_both_ports(config: HeistConfig, calculator: RunningServer) -> None:
    assert calculator.health_address is not None
    async with (
        grpc.aio.insecure_channel(calculator.health_address) as plain,
        tls.aio_channel(config, calculator.address, service="calculator") as secure,
    ):
        assert await status(plain) == SERVING and await status(secure) == SERVING
        await calculator.drain()
        assert await status(plain) == NOT_SERVING
        assert await status(secure) == NOT_SERVING


async def test_without_a_health_address_there_is_no_second_port(config: HeistConfig) -> None:
    server = await start_service("calculator", config)
    try:
        assert server.health_server is None and server.health_address is None
    finally:
        await server.stop(0.05)


async def test_the_health_address_comes_from_the_config(tmp_path: Path) -> None:
    path = write_heist_config(tmp_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["services"]["calculator"]["health_address"] = "127.0.0.1:0"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(path)
    credential_store.ensure_dev_credentials(config)
    server = await start_service("calculator", config)
    try:
        assert server.health_address is not None
        async with grpc.aio.insecure_channel(server.health_address) as channel:
            assert await status(channel) == SERVING
    finally:
        await server.stop(0.05)


def test_the_command_line_takes_a_health_address() -> None:
    args = parse_args("calculator", ["--health-address", "0.0.0.0:18153"])
    assert args.health_address == "0.0.0.0:18153"
