"""Fixtures for orchestrator tests: a config file, in-process servers, a scripted LLM.

``MeshHarness`` is meant for reuse (drills, benchmarks): it starts all five
services on ephemeral ports in the running event loop, can stop and restart one
on the same port, and hands out a ``HeistConfig`` pointing at them.
"""

from __future__ import annotations

import dataclasses
import io
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.agent import ConversationMessage, IntegratedAgent, SessionContext, TurnResult
from orchestrator.audit import AuditStore
from orchestrator.clients import ServiceMesh
from orchestrator.config import HeistConfig, load_config
from orchestrator.llm import LLMClient
from servers import credentials
from servers.launch import RunningServer, start_server
from servers.settings import SERVICE_NAMES
from tests.scripted_llm import ScriptedLLM

CLIENTS = {
    "planner": ["simulation:read"],
    "hacker": ["file_reader:use"],
    "safecracker": ["calculator:use"],
    "mole": ["database_query:use"],
}


def write_heist_config(
    tmp_path: Path, *, llm_base_url: str = "http://127.0.0.1:9/v1", token_ttl_s: int = 900, **sections: Any
) -> Path:
    """A complete config under ``tmp_path``; ``sections`` replace or add whole top-level sections."""
    config: dict[str, Any] = {
        "mesh": {"run_dir": str(tmp_path / "run"), "shutdown_grace_s": 0.2},
        "services": {name: {"address": "127.0.0.1:1", "deadline_s": 1.0} for name in SERVICE_NAMES},
        "oauth": {"issuer": "heist-oauth", "audience": "heist-mesh", "token_ttl_s": token_ttl_s, "clients": CLIENTS},
        "llm": {"base_url": llm_base_url, "timeout_s": 2, "max_retries": 0, "tool_calling": "inline"},
        "session": {"max_turns": 4},
        "database": {"url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "resilience": {
            "health_timeout_s": 0.5,
            "grpc_retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
            "circuit_breaker": {"failure_threshold": 2, "reset_timeout_s": 0.5},
        },
    }
    config.update(sections)
    path = tmp_path / "heist.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class MeshHarness:
    """All five services in-process; ``config`` always points at where they listen."""

    def __init__(self, config: HeistConfig) -> None:
        self.config = config
        self.servers: dict[str, RunningServer] = {}
        self.ports: dict[str, int] = {}
        self.log = io.StringIO()

    async def start(self, name: str) -> RunningServer:
        """Start one service (on its previous port if it ran before, so clients reconnect)."""
        address = f"127.0.0.1:{self.ports[name]}" if name in self.ports else "127.0.0.1:0"
        server = await start_server(name, self.config.mesh, address, log_stream=self.log)
        self.servers[name] = server
        self.ports[name] = server.port
        self.config = self.config.with_service_address(name, server.address)
        return server

    async def start_all(self) -> None:
        credentials.ensure_dev_credentials(self.config.mesh)
        for name in SERVICE_NAMES:
            await self.start(name)

    async def stop(self, name: str) -> None:
        """Stop one service; its address stays in ``config`` (calls to it now fail)."""
        server = self.servers.pop(name, None)
        if server is not None:
            await server.stop(0.05)

    async def restart(self, name: str) -> None:
        await self.stop(name)
        await self.start(name)

    async def stop_all(self) -> None:
        for name in list(self.servers):
            await self.stop(name)

    def write_config(self, source: Path, target: Path) -> Path:
        """Copy the YAML at ``source`` with ``services`` pointing at the running servers (for CLI subprocesses)."""
        data = yaml.safe_load(source.read_text())
        for name, port in self.ports.items():
            data["services"][name]["address"] = f"127.0.0.1:{port}"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        return target

    def with_llm(self, base_url: str, **llm: Any) -> HeistConfig:
        """``config`` with the LLM section pointed at ``base_url`` (plus any field overrides)."""
        return self.config.with_overrides(llm=dataclasses.replace(self.config.llm, base_url=base_url, **llm))


class SessionHarness:
    """One session's clients and agents, for driving turns one by one (drills, breaker timing)."""

    def __init__(self, config: HeistConfig, session_id: str = "heist_test_0001") -> None:
        self.config = config
        self.session_id = session_id
        self.audit = AuditStore.open(config.database.url)
        self.mesh = ServiceMesh(config)
        self.llm = LLMClient(config.llm)
        self.context = SessionContext(session_id, config, self.mesh, self.llm, self.audit)
        self.agents = {agent.name: IntegratedAgent(agent, self.context) for agent in config.agents}
        self.history: list[ConversationMessage] = []
        self.turn_id = 0

    async def begin(self) -> SessionHarness:
        await self.audit.create_session(self.session_id, strategy="manual", seed=None, model=self.config.llm.model)
        return self

    async def turn(self, agent: str) -> TurnResult:
        self.turn_id += 1
        result = await self.agents[agent].take_turn(self.turn_id, self.history)
        self.history.append(ConversationMessage(result.turn_id, agent, result.agent_role, result.message))
        return result

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        path = self.audit.location
        with sqlite3.connect(path) as db:
            return list(db.execute(sql, params).fetchall())

    async def close(self) -> None:
        await self.mesh.close()
        await self.llm.close()
        self.audit.close()


def audit_rows(config: HeistConfig, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run SQL against a config's SQLite audit database."""
    path = config.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return list(db.execute(sql, params).fetchall())


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture
def config_path(tmp_path: Path, scripted_llm: ScriptedLLM) -> Path:
    return write_heist_config(tmp_path, llm_base_url=scripted_llm.base_url)


@pytest.fixture
async def mesh(config_path: Path) -> AsyncIterator[MeshHarness]:
    harness = MeshHarness(load_config(config_path))
    await harness.start_all()
    try:
        yield harness
    finally:
        await harness.stop_all()
