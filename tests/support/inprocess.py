"""Services inside the test's event loop: fast contract and orchestrator tests on ephemeral ports.

``InProcessMesh`` starts any configured service with the same lifecycle as
``python -m servers.<name>`` (health, reflection, auth, access log), can stop and
restart one on the same port, mints tokens, and hands out a ``HeistConfig``
pointing at where everything listens. ``SessionHarness`` drives one session's
turns one by one.
"""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import ServiceClients
from orchestrator.turn.agent import ConversationMessage, CrewAgent, SessionContext
from orchestrator.turn.turn import Turn
from servers.auth import credential_store
from servers.auth.tokens import issue_token
from servers.runtime.lifecycle import RunningServer, start_service
from tests.support import channels


class InProcessMesh:
    """Configured services in-process; ``config`` always points at where they listen."""

    def __init__(self, config: HeistConfig) -> None:
        self.config = config
        self.servers: dict[str, RunningServer] = {}
        self.ports: dict[str, int] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.log = io.StringIO()
        credential_store.ensure_dev_credentials(config)

    async def start(self, name: str) -> RunningServer:
        """Start one service (on its previous port if it ran before, so clients reconnect)."""
        address = f"127.0.0.1:{self.ports[name]}" if name in self.ports else "127.0.0.1:0"
        server = await start_service(name, self.config, address, log_stream=self.log)
        self.servers[name] = server
        self.ports[name] = server.port
        self.config = self.config.with_service_address(name, server.address)
        return server

    async def start_all(self) -> InProcessMesh:
        for name in self.config.services:
            await self.start(name)
        return self

    async def channel(self, name: str) -> grpc.aio.Channel:
        """A channel to ``name`` (started if it is not running); closed by ``stop_all``."""
        server = self.servers.get(name) or await self.start(name)
        channel = channels.aio_channel(self.config, name, server.address)
        self.channels.append(channel)
        return channel

    async def stop(self, name: str) -> None:
        """Stop one service; its address stays in ``config`` (calls to it now fail)."""
        server = self.servers.pop(name, None)
        if server is not None:
            await server.stop(0.05)

    async def restart(self, name: str) -> None:
        await self.stop(name)
        await self.start(name)

    async def stop_all(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels.clear()
        for name in list(self.servers):
            await self.stop(name)

    def token(self, scopes: list[str], client_id: str = "crew", **overrides: Any) -> str:
        """A token signed with the mesh's key (``overrides``: key, issuer, audience, ttl_s, now)."""
        key = overrides.pop("key", None) or credential_store.signing_key(self.config)
        return issue_token(
            key,
            issuer=overrides.pop("issuer", self.config.oauth.issuer),
            audience=overrides.pop("audience", self.config.oauth.audience),
            client_id=client_id,
            scopes=scopes,
            ttl_s=overrides.pop("ttl_s", 300),
            now=overrides.pop("now", time.time()),
            session_id=overrides.pop("session_id", ""),
        )

    def auth(self, scope: str, session: str = "test-session") -> list[tuple[str, str]]:
        """Call metadata with a bearer token for ``scope`` and a session ID."""
        return [("authorization", f"Bearer {self.token([scope])}"), ("x-session-id", session)]

    def session_auth(
        self, session: str, scopes: tuple[str, ...] = ("memory:read", "memory:write")
    ) -> list[tuple[str, str]]:
        """Call metadata of a session, with a token bound to it (what the memory service requires)."""
        token = self.token(list(scopes), client_id="orchestrator", session_id=session)
        return [("authorization", f"Bearer {token}"), ("x-session-id", session)]

    def write_config(self, source: Path, target: Path) -> Path:
        """Copy the YAML at ``source`` with ``services`` pointing at the running servers (for CLI subprocesses)."""
        data = yaml.safe_load(source.read_text())
        for name, port in self.ports.items():
            data["services"][name]["address"] = f"127.0.0.1:{port}"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        return target

    def with_llm(self, base_url: str, **llm: Any) -> HeistConfig:
        """``config`` with the LLM section pointed at ``base_url`` (plus any field overrides)."""
        return self.config.with_overrides(llm=self.config.llm.model_copy(update={"base_url": base_url, **llm}))


class SessionHarness:
    """One session's clients and agents, for driving turns one by one (drills, breaker timing)."""

    def __init__(self, config: HeistConfig, session_id: str = "heist_test_0001") -> None:
        self.config = config
        self.session_id = session_id
        self.audit = AuditStore.open(config.database.url)
        self.clients = ServiceClients(config)
        self.llm = LLMClient(config.llm)
        self.context = SessionContext(session_id, config, self.clients, self.llm, self.audit)
        self.agents = {agent.name: CrewAgent(agent, self.context) for agent in config.agents}
        self.history: list[ConversationMessage] = []
        self.turn_id = 0

    async def begin(self) -> SessionHarness:
        await self.audit.create_session(self.session_id, strategy="manual", seed=None, model=self.config.llm.model)
        return self

    async def turn(self, agent: str) -> Turn:
        self.turn_id += 1
        result = await self.agents[agent].take_turn(self.turn_id, self.history)
        self.history.append(ConversationMessage(result.turn_id, agent, result.agent_role, result.message))
        return result

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.audit.location) as db:
            return list(db.execute(sql, params).fetchall())

    async def close(self) -> None:
        await self.clients.close()
        await self.llm.close()
        self.audit.close()


def audit_rows(config: HeistConfig, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run SQL against a config's SQLite audit database."""
    path = config.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return list(db.execute(sql, params).fetchall())
