"""Fixtures for contract tests: in-process servers on ephemeral ports with a temporary run folder."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from servers import credentials
from servers.launch import RunningServer, start_server
from servers.settings import MeshSettings, load_mesh_settings
from servers.tokens import issue_token

CLIENTS = {
    "planner": ["simulation:read"],
    "hacker": ["file_reader:use"],
    "safecracker": ["calculator:use"],
    "mole": ["database_query:use"],
    "crew": ["calculator:use", "file_reader:use", "database_query:use"],
}


def write_config(tmp_path: Path, limits: dict[str, Any] | None = None, **extra: Any) -> Path:
    config: dict[str, Any] = {
        "mesh": {"run_dir": str(tmp_path / "run"), "shutdown_grace_s": 0.5},
        "services": {
            name: {"address": "127.0.0.1:0", "deadline_s": 2.0}
            for name in ("oauth", "memory", "calculator", "file_reader", "database_query")
        },
        "oauth": {"issuer": "heist-oauth", "audience": "heist-mesh", "token_ttl_s": 900, "clients": CLIENTS},
        "limits": limits or {"database_query": {"query_timeout_s": 0.3}},
        **extra,
    }
    path = tmp_path / "heist.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def settings(tmp_path: Path) -> MeshSettings:
    return load_mesh_settings(write_config(tmp_path))


class Mesh:
    """Starts services for one test and stops them afterwards; collects their access logs."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.servers: list[RunningServer] = []
        self.channels: list[grpc.aio.Channel] = []
        self.log = io.StringIO()

    async def start(self, name: str) -> RunningServer:
        server = await start_server(name, self.settings, log_stream=self.log)
        self.servers.append(server)
        return server

    async def channel(self, name: str) -> grpc.aio.Channel:
        server = await self.start(name)
        channel = grpc.aio.insecure_channel(server.address)
        self.channels.append(channel)
        return channel

    def token(self, scopes: list[str], client_id: str = "crew", **overrides: Any) -> str:
        key = overrides.pop("key", None) or credentials.signing_key(self.settings)
        return issue_token(
            key,
            issuer=overrides.pop("issuer", self.settings.oauth.issuer),
            audience=overrides.pop("audience", self.settings.oauth.audience),
            client_id=client_id,
            scopes=scopes,
            ttl_s=overrides.pop("ttl_s", 300),
            now=overrides.pop("now", time.time()),
        )

    def auth(self, scope: str, session: str = "test-session") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token([scope])}"), ("x-session-id", session)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in self.servers:
            await server.stop(0.1)


@pytest.fixture
async def mesh(settings: MeshSettings) -> AsyncIterator[Mesh]:
    credentials.ensure_dev_credentials(settings)
    running = Mesh(settings)
    yield running
    await running.close()


async def expect_code(call: Awaitable[Any], code: grpc.StatusCode, fragment: str = "") -> str:
    """Await a call that must fail with ``code`` (and a message containing ``fragment``); return the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    assert fragment.lower() in details.lower(), details
    return details


@pytest.fixture
def fails_with() -> Callable[..., Awaitable[str]]:
    return expect_code
