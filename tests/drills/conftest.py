"""Process-level helpers for the failure drills: real server processes, killed and starved for real.

Every service runs as its own ``python -m servers.<name>`` process on a free
127.0.0.1 port, exactly as ``make serve`` starts it. ``ServerProcess`` can
``kill -9`` it, freeze it (SIGSTOP) and thaw it (SIGCONT), and restart it on
the same port; the ``drill_mesh`` fixture stops every process it started, even
when a test fails half-way.

Turns are driven through the scripted LLM: ``DrillScript`` answers each chat
request for the agent whose turn it is and runs the actions registered for that
turn *before* replying, so "kill the calculator at turn 3" happens after turn
3's memory/OAuth steps and before its tool call, every time.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc

from orchestrator.config import HeistConfig, load_config
from servers import credentials
from servers.settings import SERVICE_NAMES
from tests.orchestrator.conftest import write_heist_config
from tests.ports import free_port
from tests.scripted_llm import Reply, ScriptedLLM, inline_tool, text

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
TOOL_OF = {
    "hacker": ("file_reader", "bank_layout.md"),
    "safecracker": ("calculator", "6*7"),
    "mole": ("database_query", "SELECT COUNT(*) FROM guards"),
}
"""What each tool agent asks for on its turns (an inline ``[TOOL:...]`` marker)."""
TURN_ORDER = ("planner", "hacker", "safecracker", "mole")
AGENT_OF_PROMPT = re.compile(r"Your turn, (\w+) \(")


def health_status(address: str, timeout_s: float = 0.3) -> str:
    """grpc.health.v1 status of ``address`` ("DOWN" when it does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def session_memories(address: str, session_id: str) -> int:
    """MemoryService GetStats for one session (``x-session-id`` metadata)."""
    with grpc.insecure_channel(address) as channel:
        stats = memory_pb2_grpc.MemoryServiceStub(channel).GetStats(
            memory_pb2.GetStatsRequest(), metadata=(("x-session-id", session_id),), timeout=2.0
        )
    return int(stats.session_memories)


class ServerProcess:
    """One service as a real OS process on a fixed port; its stdout/stderr go to a log file."""

    def __init__(self, name: str, config_path: Path, port: int, log_dir: Path) -> None:
        self.name = name
        self.config_path = config_path
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def spawn(self) -> None:
        """Start the process (returns at once; ``wait_serving`` waits for health)."""
        assert self.process is None or self.process.poll() is not None, f"{self.name} already runs"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            command = [sys.executable, "-m", f"servers.{self.name}", "--config", str(self.config_path)]
            self.process = subprocess.Popen(
                [*command, "--address", self.address],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            if health_status(self.address) == "SERVING":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not SERVING after {timeout_s} s:\n{self.log()}")

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it reports SERVING."""
        self.spawn()
        self.wait_serving()

    def kill9(self) -> None:
        """``kill -9``: no drain, no goodbye; in-flight calls and unflushed log lines are lost."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=5)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (a hung service)."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Graceful stop if running (thawed first), kill if it does not go; idempotent."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def calls(self, method: str) -> int:
        """Access-log lines for RPCs whose path ends in ``/method`` (lines are flushed every 0.2 s)."""
        return sum(1 for line in self.log().splitlines() if f"/{method} code=" in line)


class DrillMesh:
    """All five services as processes, a config file pointing at them, and the scripted LLM."""

    def __init__(self, tmp_path: Path, endpoint: ScriptedLLM, **sections: Any) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        ports = {name: free_port() for name in SERVICE_NAMES}
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
        self.servers = {name: ServerProcess(name, self.config_path, port, log_dir) for name, port in ports.items()}

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
