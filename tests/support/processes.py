"""Services as real OS processes: the one harness of the drills, the abuse tests and the benchmarks.

Every service runs as its own ``python -m servers.<name>`` process on a free
127.0.0.1 port, exactly as ``make serve`` starts it, with its stdout/stderr in a
log file. ``ServerProcess`` can also ``kill -9`` it, freeze it (SIGSTOP), thaw it
(SIGCONT) and restart it on the same port; ``ProcessMesh`` is every configured
service so, with a config file pointing at them. ``stop_process`` ends any
process (the benchmarks' llama.cpp and echo servers too): SIGTERM, SIGKILL if
it does not go in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc

from heist_common.config import HeistConfig, load_config, split_address
from servers.auth import credential_store
from tests.support import channels
from tests.support.access_log import calls
from tests.support.audit_db import query
from tests.support.config import SERVICES, write_heist_config
from tests.support.ports import free_ports
from tests.support.tokens import session_metadata

REPO = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0
"""How long a service gets to exit after SIGTERM before it is killed."""


def health_status(config: HeistConfig, name: str, address: str, timeout_s: float = 0.3, grpc_service: str = "") -> str:
    """grpc.health.v1 status of service ``name`` at ``address`` for ``grpc_service`` (DOWN when nothing answers)."""
    with channels.channel(config, name, address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=grpc_service), timeout=timeout_s
            )
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def stop_processes(processes: Iterable[subprocess.Popen[bytes] | None], grace_s: float) -> None:
    """SIGTERM every process still running (all first), then wait up to ``grace_s`` for each; kill any that stays."""
    running = [process for process in processes if process is not None and process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM ``process`` if it runs, SIGKILL after ``grace_s``; idempotent."""
    stop_processes([process], grace_s)


def stop_servers(servers: Iterable[ServerProcess]) -> None:
    """Graceful stop of every server still running (thawed first), kill any that does not go; idempotent."""
    running = [server.process for server in servers if server.process is not None and server.process.poll() is None]
    for process in running:
        os.kill(process.pid, signal.SIGCONT)
    stop_processes(running, STOP_GRACE_S)


class ServerProcess:
    """One service as a real OS process on a fixed port; its stdout/stderr go to a log file."""

    def __init__(
        self,
        name: str,
        config: HeistConfig,
        port: int,
        log_dir: Path,
        start_timeout_s: float,
        replica: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.config_path = config.config_path
        self.env = env
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.replica = replica
        self.log_path = log_dir / (f"{name}.log" if replica == 0 else f"{name}.{replica}.log")
        self.start_timeout_s = start_timeout_s
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
            if self.replica and self.config.service(self.name).metrics_address:
                command += ["--metrics-address", "127.0.0.1:0"]  # replica 0 has the configured one
            self.process = subprocess.Popen(
                [*command, "--address", self.address],
                cwd=REPO,
                env={**os.environ, **self.env} if self.env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_serving(self, deadline: float | None = None) -> None:
        """Wait until it reports SERVING (health is asked at least once).

        ``deadline`` is a ``time.monotonic()`` value; by default ``start_timeout_s`` from now.
        """
        if deadline is None:
            deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            if health_status(self.config, self.name, self.address) == "SERVING":
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} not SERVING after {self.start_timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

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
        stop_servers([self])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def calls(self, method: str) -> int:
        """Access-log lines for RPCs whose path ends in ``/method`` (lines are flushed every 0.2 s)."""
        return len(calls(self.log(), method))


class ProcessMesh:
    """Every configured service as a process on a free port, and a config file pointing at them.

    ``sections`` are whole config sections (``tests.support.config.heist_config``);
    ``deadlines`` sets callers' per-service deadlines. Stop it with ``stop()`` or
    use it as a context manager; every process started is stopped, also after a failure.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        llm_base_url: str = "http://127.0.0.1:9/v1",
        start_timeout_s: float = 20.0,
        replicas: dict[str, int] | None = None,
        metrics: bool = True,
        env: dict[str, str] | None = None,
        **sections: Any,
    ) -> None:
        self.work_dir = work_dir
        ports = free_ports(2 * len(SERVICES))
        self.ports = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
        self.metrics_ports = dict(zip(SERVICES, ports[len(SERVICES) :], strict=True)) if metrics else {}
        addresses = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        metrics_addresses = {name: f"127.0.0.1:{port}" for name, port in self.metrics_ports.items()}
        self.config_path = write_heist_config(
            work_dir,
            llm_base_url=llm_base_url,
            addresses=addresses,
            replicas=replicas,
            metrics_addresses=metrics_addresses,
            **sections,
        )
        self.config: HeistConfig = load_config(self.config_path)
        credential_store.ensure_dev_credentials(self.config)  # once, before several processes would race for it
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.replicas: dict[str, list[ServerProcess]] = {
            name: [
                ServerProcess(name, self.config, split_address(address)[1], self.log_dir, start_timeout_s, index, env)
                for index, address in enumerate(self.config.service(name).replica_addresses)
            ]
            for name in self.ports
        }
        """Every replica of every service (``replica_addresses``: port + 100 per replica); index 0 is ``servers``."""
        self.servers = {name: replicas[0] for name, replicas in self.replicas.items()}

    def address(self, name: str) -> str:
        """Where ``name`` listens."""
        return f"127.0.0.1:{self.ports[name]}"

    def metrics_url(self, name: str) -> str:
        """Where ``name`` serves Prometheus metrics."""
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def start(self, *names: str) -> ProcessMesh:
        """Start services in parallel (the crew's by default, not the orchestrator) and wait until each is SERVING."""
        default = [name for name in self.servers if name in self.config.crew_services]
        chosen = [server for name in (names or default) for server in self.replicas[name]]
        for server in chosen:
            server.spawn()
        for server in chosen:
            server.wait_serving()
        return self

    def pids(self) -> dict[str, int]:
        """Process id of every running service."""
        return {name: server.pid for name, server in self.servers.items() if server.process is not None}

    def all_servers(self) -> list[ServerProcess]:
        """Every replica process of every service."""
        return [server for replicas in self.replicas.values() for server in replicas]

    def stop(self) -> None:
        """Stop every started process (graceful, then killed); idempotent."""
        stop_servers(self.all_servers())

    def __enter__(self) -> ProcessMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def db_path(self) -> Path:
        """The SQLite audit database of the config."""
        return Path(self.config.database.url.removeprefix("sqlite:///"))

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run SQL (``?`` placeholders) against the audit database of the config, SQLite or PostgreSQL."""
        return query(self.config.database.url, sql, *params)


def session_memories(config: HeistConfig, session_id: str) -> int:
    """MemoryService GetStats for one session, with a token bound to it."""
    with channels.channel(config, "memory") as channel:
        stats = memory_pb2_grpc.MemoryServiceStub(channel).GetStats(
            memory_pb2.GetStatsRequest(), metadata=session_metadata(config, session_id), timeout=2.0
        )
    return int(stats.session_memories)
