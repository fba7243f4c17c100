"""Server processes for the benchmarks: every service as its own ``python -m servers.<name>`` process.

Production runs each service as a process (``make serve``), so the benchmarks
do too (``tests.server_processes.ServerProcess``): client and servers then do
not share one event loop or one GIL. Ports are free ephemeral ones picked by the
OS, the run folder is a temp folder, and ``stop()`` terminates every process
that was started (also after a failure).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from orchestrator.config import HeistConfig, load_config
from servers import credentials
from servers.settings import SERVICE_NAMES
from tests.orchestrator.conftest import write_heist_config
from tests.ports import free_ports
from tests.server_processes import ServerProcess, stop_servers

START_TIMEOUT_S = 20.0

TOOL_AGENTS: list[dict[str, Any]] = [
    {"name": "hacker", "role": "Hacker", "system_prompt": "You are the crew's hacker.", "tools": ["file_reader"]},
    {"name": "safecracker", "role": "Safecracker", "system_prompt": "You crack safes.", "tools": ["calculator"]},
    {"name": "mole", "role": "Inside Man", "system_prompt": "You work inside the bank.", "tools": ["database_query"]},
]
"""The crew of the benchmarks: tool-using agents only, so every turn makes one tool call."""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, Python and grpcio versions (stored with every result)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


class ProcessMesh:
    """All five services as processes on free ports, with a config file pointing at them."""

    def __init__(self, work_dir: Path, *, llm_base_url: str = "http://127.0.0.1:9/v1", **sections: Any) -> None:
        self.work_dir = work_dir
        self.ports = dict(zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True))
        services = {name: {"address": f"127.0.0.1:{port}", "deadline_s": 2.0} for name, port in self.ports.items()}
        sections.setdefault("agents", TOOL_AGENTS)
        sections.setdefault("session", {"max_turns": 4, "turn_order": [a["name"] for a in TOOL_AGENTS]})
        self.config_path = write_heist_config(work_dir, llm_base_url=llm_base_url, services=services, **sections)
        self.config: HeistConfig = load_config(self.config_path)
        credentials.ensure_dev_credentials(self.config.mesh)  # once, before five processes race for it
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.servers: dict[str, ServerProcess] = {}

    def address(self, name: str) -> str:
        """Where ``name`` listens."""
        return f"127.0.0.1:{self.ports[name]}"

    def start(self) -> ProcessMesh:
        """Start every service and wait until each reports SERVING."""
        for name in SERVICE_NAMES:
            server = ServerProcess(name, self.config_path, self.ports[name], self.log_dir, START_TIMEOUT_S)
            self.servers[name] = server
            server.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in self.servers.values():
            server.wait_serving(deadline)
        return self

    def pids(self) -> dict[str, int]:
        """Process id of every started service."""
        return {name: server.pid for name, server in self.servers.items()}

    def stop(self) -> None:
        """Terminate every started process (SIGTERM, then SIGKILL after 5 s); idempotent."""
        stop_servers(self.servers.values())
        self.servers.clear()

    def __enter__(self) -> ProcessMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
