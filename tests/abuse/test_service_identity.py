"""A mesh certificate of one service must not pass for another: the fake OAuth server.

The attacker holds a genuine mesh certificate, but of another service (here
``file_reader``'s, which any host running the file reader has), and listens
where the orchestrator's config says OAuth is. If the orchestrator checked only
that the certificate chains to the mesh CA and names the address it dialled,
it would hand the fake server an agent's real client secret. Clients expect
each service's own name, so the handshake fails before any request is sent.

The same fake server presenting OAuth's certificate is accepted: the refusal
is about the name, not about a broken test set-up.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common import tls
from heist_common.config import HeistConfig, load_config
from heist_common.credentials import client_secret
from heist_common.layout import REPO_ROOT
from orchestrator.mesh.clients import ServiceCallError, ServiceClients, session_metadata
from servers.auth import credential_store
from tests.support.config import write_heist_config
from tests.support.ports import free_port

pytestmark = pytest.mark.abuse

VICTIM = "safecracker"
OAUTH_SERVICE = "heist.oauth.v1.OAuthService"


class RecordingOAuth(oauth_pb2_grpc.OAuthServiceServicer):
    """An OAuth impostor: keeps every request it is sent (the secrets it steals) and answers with a token."""

    def __init__(self) -> None:
        self.requests: list[oauth_pb2.IssueTokenRequest] = []

    async def IssueToken(
        self, request: oauth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> oauth_pb2.IssueTokenResponse:
        self.requests.append(request)
        return oauth_pb2.IssueTokenResponse(
            access_token="stolen", token_type="Bearer", expires_in=600, scopes=list(request.scopes)
        )


@dataclass
class Impostor:
    """The fake server, what it was sent, and a config whose ``oauth`` address is the fake's."""

    config: HeistConfig
    config_path: Path
    servicer: RecordingOAuth


@asynccontextmanager
async def fake_oauth(tmp_path: Path, presented: str) -> AsyncIterator[Impostor]:
    """Serve the impostor (and grpc.health.v1, SERVING) with ``presented``'s certificate and key."""
    address = f"127.0.0.1:{free_port()}"
    config_path = write_heist_config(tmp_path, addresses={"oauth": address})
    config = load_config(config_path)
    credential_store.ensure_dev_credentials(config)
    folder = tls.tls_dir(config)
    credentials = grpc.ssl_server_credentials(
        [((folder / f"{presented}.key").read_bytes(), (folder / f"{presented}.crt").read_bytes())],
        root_certificates=(folder / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    servicer = RecordingOAuth()
    oauth_pb2_grpc.add_OAuthServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    await health.set(OAUTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_secure_port(address, credentials)
    await server.start()
    try:
        yield Impostor(config, config_path, servicer)
    finally:
        await server.stop(None)


async def ask_for_token(config: HeistConfig) -> str:
    """What the orchestrator does before an agent's tool call: ServiceClients' TokenProvider asks OAuth."""
    clients = ServiceClients(config)
    try:
        return await clients.tokens.token(VICTIM, ["calculator:use"], session_metadata("heist_identity_0001"))
    finally:
        await clients.close()


async def test_a_fake_oauth_server_with_another_services_certificate_never_sees_the_secret(tmp_path):
    async with fake_oauth(tmp_path, "file_reader") as fake:
        with pytest.raises(ServiceCallError) as refused:
            await ask_for_token(fake.config)
        assert refused.value.status_code == "UNAVAILABLE", refused.value
        assert fake.servicer.requests == []


async def test_the_same_fake_server_with_oauths_certificate_is_reached(tmp_path):
    """Control: only the certificate differs from the attack, and this one the orchestrator accepts."""
    async with fake_oauth(tmp_path, "oauth") as fake:
        assert await ask_for_token(fake.config) == "stolen"
        assert [request.client_secret for request in fake.servicer.requests] == [client_secret(fake.config, VICTIM)]


@pytest.mark.parametrize(("presented", "expected"), [("file_reader", "DOWN"), ("oauth", "SERVING")])
async def test_make_status_refuses_another_services_certificate(tmp_path, presented, expected):
    """``make status`` (the supervisor, a process of its own) must not report an impostor as the service."""
    async with fake_oauth(tmp_path, presented) as fake:
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "servers.supervisor", "status", "--config", str(fake.config_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    line = next(line for line in status.stdout.splitlines() if line.startswith("oauth "))
    assert line.split()[3] == expected, status.stdout + status.stderr
