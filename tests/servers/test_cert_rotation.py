"""A server serves a renewed certificate without a restart (cert-manager renewing a mounted Secret).

The server checks its files before each new handshake; these tests replace the
calculator's certificate and key with a newly issued pair and look at the
certificate a new client handshake is shown.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heist_common import dev_pki, tls
from heist_common.config import HeistConfig, load_config
from heist_common.credentials import write_private
from servers.auth import credential_store
from servers.runtime.lifecycle import RunningServer, start_service
from tests.support.config import write_heist_config

CALCULATOR = "heist.calculator.v1.CalculatorService"


@pytest.fixture
def config(tmp_path: Path) -> HeistConfig:
    loaded = load_config(write_heist_config(tmp_path))
    assert tls.mtls(loaded)
    credential_store.ensure_dev_credentials(loaded)
    return loaded


@pytest.fixture
async def calculator(config: HeistConfig) -> AsyncIterator[RunningServer]:
    server = await start_service("calculator", config)
    try:
        yield server
    finally:
        await server.stop(0.05)


def served_serial(config: HeistConfig, port: int) -> int:
    """The serial number of the certificate the server shows a new connection (the orchestrator's handshake)."""
    context = tls.ssl_client_context(config)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=tls.server_name("calculator")) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def file_serial(config: HeistConfig) -> int:
    return int(x509.load_pem_x509_certificate((tls.tls_dir(config) / "calculator.crt").read_bytes()).serial_number)


def renew(config: HeistConfig) -> int:
    """Issue the calculator a new certificate and key, as cert-manager would; return its serial."""
    ca_cert, ca_key = dev_pki.load_ca(config)
    cert, key = dev_pki.issue_certificate(
        ca_cert, ca_key, "calculator", server_names=dev_pki.server_names("calculator")
    )
    folder = tls.tls_dir(config)
    write_private(folder / "calculator.key", key)
    write_private(folder / "calculator.crt", cert)
    return int(x509.load_pem_x509_certificate(cert).serial_number)


async def healthy(config: HeistConfig, address: str) -> bool:
    async with tls.aio_channel(config, address, service="calculator") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=CALCULATOR), timeout=2
        )
    return response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_renewed_certificate_is_served_without_a_restart(
    config: HeistConfig, calculator: RunningServer
) -> None:
    before = await asyncio.to_thread(served_serial, config, calculator.port)
    assert before == file_serial(config)
    renewed = renew(config)
    assert renewed != before
    assert await asyncio.to_thread(served_serial, config, calculator.port) == renewed
    assert await healthy(config, calculator.address), "gRPC clients handshake with the new certificate"


async def test_a_half_written_rotation_keeps_the_old_certificate(
    config: HeistConfig, calculator: RunningServer
) -> None:
    before = await asyncio.to_thread(served_serial, config, calculator.port)
    ca_cert, ca_key = dev_pki.load_ca(config)
    cert, _ = dev_pki.issue_certificate(ca_cert, ca_key, "calculator", server_names=dev_pki.server_names("calculator"))
    write_private(tls.tls_dir(config) / "calculator.crt", cert)  # the key has not followed yet
    assert await asyncio.to_thread(served_serial, config, calculator.port) == before
    assert await healthy(config, calculator.address)
    (tls.tls_dir(config) / "calculator.key").write_bytes(b"not a key")
    assert await asyncio.to_thread(served_serial, config, calculator.port) == before
    renewed = renew(config)  # the whole pair: taken on the next connection
    assert await asyncio.to_thread(served_serial, config, calculator.port) == renewed


async def test_rotation_follows_the_mounted_files(
    config: HeistConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEIST_TLS_* files (a Secret volume) are the ones watched, not the dev folder."""
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    folder = tls.tls_dir(config)
    for name, source in (("ca.crt", "ca.crt"), ("tls.crt", "calculator.crt"), ("tls.key", "calculator.key")):
        (mounted / name).write_bytes((folder / source).read_bytes())
    monkeypatch.setenv(tls.CA_FILE_ENV, str(mounted / "ca.crt"))
    monkeypatch.setenv(tls.CERT_FILE_ENV, str(mounted / "tls.crt"))
    monkeypatch.setenv(tls.KEY_FILE_ENV, str(mounted / "tls.key"))
    server = await start_service("calculator", config)
    try:
        monkeypatch.delenv(tls.CERT_FILE_ENV)  # the client presents the orchestrator's own certificate
        monkeypatch.delenv(tls.KEY_FILE_ENV)
        before = await asyncio.to_thread(served_serial, config, server.port)
        ca_cert, ca_key = dev_pki.load_ca(config)
        cert, key = dev_pki.issue_certificate(
            ca_cert, ca_key, "calculator", server_names=dev_pki.server_names("calculator")
        )
        write_private(mounted / "tls.key", key)
        write_private(mounted / "tls.crt", cert)
        after = await asyncio.to_thread(served_serial, config, server.port)
        assert after != before and after == int(x509.load_pem_x509_certificate(cert).serial_number)
    finally:
        await server.stop(0.05)
