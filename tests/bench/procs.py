"""Server processes for the benchmarks: every service as its own ``python -m servers.<name>`` process.

Production runs each service as a process (``make serve``), so the benchmarks
do too (``tests.support.processes.ServerProcess``): client and servers then do
not share one event loop or one GIL. Ports are free ephemeral ones picked by the
OS, the run folder is a temp folder, and ``stop()`` terminates every process
that was started (also after a failure).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import grpc
import yaml

from tests.support.config import SERVICES
from tests.support.processes import ProcessMesh

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


class BenchMesh(ProcessMesh):
    """The shared process harness with the benchmarks' crew: tool agents only, so every turn makes a tool call."""

    def __init__(self, work_dir: Path, **sections: Any) -> None:
        sections.setdefault("agents", TOOL_AGENTS)
        sections.setdefault("session", {"max_turns": 4, "turn_order": [a["name"] for a in TOOL_AGENTS]})
        sections.setdefault("deadlines", dict.fromkeys(SERVICES, 2.0))
        # Plaintext: h2load cannot present a client certificate, and these numbers compare with earlier runs.
        # mTLS versus plaintext, and replicas, are measured by tests/bench/mesh_transport.py.
        sections.setdefault("transport", "plaintext")
        # Throughput is one caller's 64 streams: give it every database worker and room to wait (a caller's
        # fair share is the abuse tests' concern, not this measurement's).
        sections.setdefault("limits", {"database_query": {"max_queries_per_caller": 4, "max_waiting_per_caller": 64}})
        super().__init__(work_dir, **sections)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
