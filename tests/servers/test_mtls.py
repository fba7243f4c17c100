"""Mutual TLS at the handshake: only a client with a current certificate from the mesh CA gets an answer.

The servers run in-process on the mTLS the test config defaults to (as shipped);
each refused client fails before any call reaches the servicer, so its code is
UNAVAILABLE and the access log stays empty. A client that passes the handshake
still needs a token for a tool: two independent checks.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc

from heist_common import dev_pki, tls
from heist_common.config import HeistConfig, load_config
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh

SERVING = health_pb2.HealthCheckResponse.SERVING
HEALTH = health_pb2.HealthCheckRequest(service="heist.calculator.v1.CalculatorService")


async def check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """Health/Check over ``channel``: OK, or the code of the failure."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=2)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert response.status == SERVING
    return grpc.StatusCode.OK


def custom_client(config: HeistConfig, address: str, cert: bytes | None, key: bytes | None) -> grpc.aio.Channel:
    """A client of the calculator trusting the mesh CA that presents ``cert`` (or no certificate at all)."""
    ca = (tls.tls_dir(config) / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    options = [("grpc.ssl_target_name_override", tls.server_name("calculator"))]
    return grpc.aio.secure_channel(address, creds, options=options)


@pytest.fixture
async def calculator(mesh: InProcessMesh) -> str:
    return (await mesh.start("calculator")).address


async def test_the_orchestrator_certificate_is_served_and_the_token_is_still_checked(mesh, calculator):
    async with tls.aio_channel(mesh.config, calculator, service="calculator") as channel:
        assert await check(channel) == grpc.StatusCode.OK
        stub = calculator_pb2_grpc.CalculatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.Evaluate(calculator_pb2.EvaluateRequest(expression="1 + 1"), timeout=2)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = await stub.Evaluate(
            calculator_pb2.EvaluateRequest(expression="1 + 1"), metadata=mesh.auth("calculator:use"), timeout=2
        )
        assert answer.value == 2


async def test_plaintext_client_is_refused(mesh, calculator):
    async with grpc.aio.insecure_channel(calculator) as channel:
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_without_a_certificate_is_refused(mesh, calculator):
    async with custom_client(mesh.config, calculator, None, None) as channel:
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE


async def test_expired_client_certificate_is_refused(mesh, calculator):
    ca_cert, ca_key = dev_pki.load_ca(mesh.config)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = dev_pki.issue_certificate(
        ca_cert, ca_key, "orchestrator", not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )  # fmt: skip
    async with custom_client(mesh.config, calculator, cert, key) as channel:
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE
    fresh, fresh_key = dev_pki.issue_certificate(ca_cert, ca_key, "orchestrator")  # same CA, valid: accepted
    async with custom_client(mesh.config, calculator, fresh, fresh_key) as channel:
        assert await check(channel) == grpc.StatusCode.OK


async def test_certificate_from_another_ca_is_refused(mesh, calculator):
    other_cert, other_key = dev_pki.new_ca("someone else's CA")
    cert, key = dev_pki.issue_certificate(other_cert, other_key, "orchestrator")
    async with custom_client(mesh.config, calculator, cert, key) as channel:
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE
    assert "Evaluate" not in mesh.log.getvalue()


def test_dev_pki_names_each_service_host_and_keeps_its_files(config):
    from servers.auth import credential_store

    credential_store.ensure_dev_credentials(config)
    folder = tls.tls_dir(config)
    before = {path.name: path.read_bytes() for path in folder.glob("*.crt")}
    assert {"ca.crt", "orchestrator.crt", "grpcurl.crt", "supervisor.crt"} <= set(before)
    assert all(f"{name}.crt" in before for name in config.services)
    assert all((path.stat().st_mode & 0o777) == 0o600 for path in folder.iterdir())
    cert = x509.load_pem_x509_certificate(before["calculator.crt"])
    assert san_names(cert) == {"calculator.heist.internal"}, "its own name only: no address another service shares"
    assert san_names(x509.load_pem_x509_certificate(before["file_reader.crt"])) == {"file-reader.heist.internal"}
    key = serialization.load_pem_private_key((folder / "calculator.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    credential_store.ensure_dev_credentials(config)
    assert {path.name: path.read_bytes() for path in folder.glob("*.crt")} == before, "a second serve keeps them"


def san_names(cert: x509.Certificate) -> set[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))


def test_server_certificates_of_an_older_version_are_reissued_by_our_ca(config):
    """An older dev PKI named every server 127.0.0.1 and localhost: its server certificates are replaced."""
    from servers.auth import credential_store

    credential_store.ensure_dev_credentials(config)
    folder = tls.tls_dir(config)
    ca_cert, ca_key = dev_pki.load_ca(config)
    old_cert, old_key = dev_pki.issue_certificate(
        ca_cert, ca_key, "oauth", server_names=["127.0.0.1", "localhost", "127.0.0.1", "oauth"]
    )
    (folder / "oauth.crt").write_bytes(old_cert)
    (folder / "oauth.key").write_bytes(old_key)
    ca_before, client_before = (folder / "ca.crt").read_bytes(), (folder / "orchestrator.crt").read_bytes()
    credential_store.ensure_dev_credentials(config)
    reissued = x509.load_pem_x509_certificate((folder / "oauth.crt").read_bytes())
    assert san_names(reissued) == {"oauth.heist.internal"}
    assert (folder / "ca.crt").read_bytes() == ca_before, "same CA: clients' certificates stay valid"
    assert (folder / "orchestrator.crt").read_bytes() == client_before
    assert ((folder / "oauth.crt").stat().st_mode & 0o777) == 0o600


async def test_a_client_refuses_a_server_that_is_not_the_service_it_dialled(mesh, calculator):
    """The calculator's certificate is from the mesh CA, but it is not the file reader's."""
    async with tls.aio_channel(mesh.config, calculator, service="file_reader") as channel:
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE
    ca = (tls.tls_dir(mesh.config) / "ca.crt").read_bytes()
    material = tls.client_material(mesh.config)
    creds = grpc.ssl_channel_credentials(ca, material.key, material.cert)
    async with grpc.aio.secure_channel(calculator, creds) as by_address:  # checks the name 127.0.0.1
        assert await check(by_address) == grpc.StatusCode.UNAVAILABLE, "no certificate names an address"


def test_plaintext_config_generates_no_certificates_and_serves_plaintext(tmp_path: Path):
    from servers.auth import credential_store

    config = load_config(write_heist_config(tmp_path, transport="plaintext"))
    credential_store.ensure_dev_credentials(config)
    assert not tls.tls_dir(config).exists()
    assert not tls.mtls(config)
