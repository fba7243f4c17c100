"""Process-level helpers for the failure drills: real server processes, killed and starved for real.

Every service runs as its own ``python -m servers.<name>`` process on a free
127.0.0.1 port (``tests.server_processes.ServerProcess``), which a drill can
``kill -9``, freeze (SIGSTOP), thaw (SIGCONT) and restart on the same port; the
``drill_mesh`` fixture stops every process it started, even when a test fails
half-way.

Turns are driven through the scripted LLM: ``DrillScript`` answers each chat
request for the agent whose turn it is and runs the actions registered for that
turn *before* replying, so "kill the calculator at turn 3" happens after turn
3's memory/OAuth steps and before its tool call, every time.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from heist.memory.v1 import memory_pb2, memory_pb2_grpc

from orchestrator.config import HeistConfig, load_config
from servers import credentials
from servers.settings import SERVICE_NAMES
from tests.orchestrator.conftest import write_heist_config
from tests.ports import free_ports
from tests.scripted_llm import Reply, ScriptedLLM, inline_tool, text
from tests.server_processes import ServerProcess

START_TIMEOUT_S = 15.0
TOOL_OF = {
    "hacker": ("file_reader", "bank_layout.md"),
    "safecracker": ("calculator", "6*7"),
    "mole": ("database_query", "SELECT COUNT(*) FROM guards"),
}
"""What each tool agent asks for on its turns (an inline ``[TOOL:...]`` marker)."""
TURN_ORDER = ("planner", "hacker", "safecracker", "mole")
AGENT_OF_PROMPT = re.compile(r"Your turn, (\w+) \(")


def session_memories(address: str, session_id: str) -> int:
    """MemoryService GetStats for one session (``x-session-id`` metadata)."""
    with grpc.insecure_channel(address) as channel:
        stats = memory_pb2_grpc.MemoryServiceStub(channel).GetStats(
            memory_pb2.GetStatsRequest(), metadata=(("x-session-id", session_id),), timeout=2.0
        )
    return int(stats.session_memories)


class DrillMesh:
    """All five services as processes, a config file pointing at them, and the scripted LLM."""

    def __init__(self, tmp_path: Path, endpoint: ScriptedLLM, **sections: Any) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        ports = dict(zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True))
        deadlines = sections.pop("deadlines", {})
        services = {
            name: {"address": f"127.0.0.1:{port}", "deadline_s": deadlines.get(name, 1.0)}
            for name, port in ports.items()
        }
        # Generous LLM timeout: drill actions (restart, cool-down waits) run while a turn awaits its reply.
        sections.setdefault("llm", {"base_url": endpoint.base_url, "timeout_s": 10, "max_retries": 0})
        self.config_path = write_heist_config(tmp_path, llm_base_url=endpoint.base_url, services=services, **sections)
        self.config: HeistConfig = load_config(self.config_path)
        credentials.ensure_dev_credentials(self.config.mesh)  # once, before several processes would race for it
        log_dir = tmp_path / "logs"
        log_dir.mkdir(exist_ok=True)
        self.servers = {
            name: ServerProcess(name, self.config_path, port, log_dir, START_TIMEOUT_S) for name, port in ports.items()
        }

    def start(self, *names: str) -> None:
        """Start services in parallel (all of them by default) and wait until each is SERVING."""
        chosen = [self.servers[name] for name in (names or SERVICE_NAMES)]
        for server in chosen:
            server.spawn()
        for server in chosen:
            server.wait_serving()

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()

    @property
    def db_path(self) -> Path:
        return Path(self.config.database.url.removeprefix("sqlite:///"))

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as db:
            return list(db.execute(sql, params).fetchall())


class DrillScript:
    """Answers every chat request for the agent whose turn it is; runs per-turn actions first.

    In inline tool mode every turn makes exactly one chat request, so the n-th
    request is turn n. ``at(3, action)`` runs ``action`` (kill, freeze, start...)
    in the LLM's HTTP thread while turn 3 waits for its reply.
    """

    def __init__(self, replies: dict[str, Callable[[int], Reply]] | None = None) -> None:
        self.turn = 0
        self.agents: list[str] = []
        self._actions: dict[int, list[Callable[[], object]]] = {}
        self._replies = replies or {}
        self._overrides: dict[int, Reply] = {}
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def at(self, turn: int, action: Callable[[], object]) -> DrillScript:
        self._actions.setdefault(turn, []).append(action)
        return self

    def reply_at(self, turn: int, reply: Reply) -> DrillScript:
        """Answer turn ``turn`` with ``reply`` (an HTTP error, a hang...) instead of the agent's usual line."""
        self._overrides[turn] = reply
        return self

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.turn += 1
            turn = self.turn
            match = AGENT_OF_PROMPT.search(str(body["messages"][-1]["content"]))
            agent = match.group(1) if match else "?"
            self.agents.append(agent)
        for action in self._actions.get(turn, []):
            try:
                action()
            except BaseException as exc:  # surfaced by the test, not swallowed by the HTTP thread
                self.errors.append(exc)
                raise
        if turn in self._overrides:
            return self._overrides[turn]
        if agent in self._replies:
            return self._replies[agent](turn)
        if agent in TOOL_OF:
            tool, argument = TOOL_OF[agent]
            return inline_tool(tool, argument, before=f"Turn {turn}: checking.")
        return text(f"Turn {turn}: {agent} says we go on Friday.")


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture
def drill_mesh(tmp_path: Path, scripted_llm: ScriptedLLM) -> Iterator[Callable[..., DrillMesh]]:
    """Factory: ``drill_mesh(**config_sections)``; every process started is stopped at teardown."""
    made: list[DrillMesh] = []

    def make(**sections: Any) -> DrillMesh:
        mesh = DrillMesh(tmp_path, scripted_llm, **sections)
        made.append(mesh)
        return mesh

    try:
        yield make
    finally:
        for mesh in made:
            mesh.stop_all()


def drill_resilience(threshold: int = 3, reset_s: float = 1.0) -> dict[str, Any]:
    """The ``resilience`` section the drills run with (small numbers so a drill takes seconds)."""
    return {
        "health_timeout_s": 0.5,
        "grpc_retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
        "circuit_breaker": {"failure_threshold": threshold, "reset_timeout_s": reset_s},
    }
