"""CLI start-up: how long the inspection commands take, and how soon ``orchestrator run`` reaches its first turn.

Every command is a fresh process, as a user runs it (the ``orchestrator``
console script of this environment), against the benchmark's own config,
database and running services. ``run``'s first turn is timed from launch to
the arrival of its first completion request at the endpoint (both read
CLOCK_MONOTONIC, so the two processes' clocks agree); that includes imports,
the config, opening the audit database and the health checks of every service
and of the LLM.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import run_cli


def cli_startup(
    config_file: Path, session_id: str, out_dir: Path, repeats: int, mtls_config_file: Path | None = None
) -> dict[str, Any]:
    """Median wall and CPU time of each command that does not run a session (``repeats`` runs each, interleaved).

    ``mtls_config_file``: a mesh with the shipped transport (mTLS), for ``health`` as a user runs it
    (the benchmark's own mesh is plaintext, for h2load).
    """
    config = ["--config", str(config_file)]
    commands: dict[str, list[str]] = {
        "--help": ["--help"],
        "sessions": [*config, "sessions"],
        "show": [*config, "show", session_id],
        "export": [*config, "export", session_id, "--format", "md", "--out", str(out_dir / "export.md")],
        "health": [*config, "health"],
    }
    if mtls_config_file is not None:
        commands["health (mTLS)"] = ["--config", str(mtls_config_file), "health"]
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, args in commands.items():
            _, wall, _, cpu = run_cli(args, timeout_s=60)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {
        name: {
            "median_s": round(statistics.median(walls[name]), 3),
            "cpu_median_s": round(statistics.median(cpus[name]), 3),
            "runs_s": [round(t, 3) for t in walls[name]],
        }
        for name in commands
    }


def first_turn(config_file: Path, llm: HttpLLM, out_dir: Path, repeats: int) -> dict[str, Any]:
    """Seconds from launching ``orchestrator run --turns 1`` to its first completion request (median of ``repeats``)."""
    delays = []
    for _ in range(repeats):
        llm.reset()
        launched, _, _, _ = run_cli(["--config", str(config_file), "run", "--turns", "1", "--out", str(out_dir)])
        first = llm.stats()["first_completion_at"]
        if first is None:
            raise RuntimeError("orchestrator run made no completion request")
        delays.append(first - launched)
    return {"median_s": round(statistics.median(delays), 3), "runs_s": [round(d, 3) for d in delays]}
