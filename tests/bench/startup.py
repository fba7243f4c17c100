"""CLI start-up: how long the inspection commands take, and how soon ``orchestrator run`` reaches its first turn.

Every command is a fresh process, as a user runs it (the ``orchestrator``
console script of this environment), against the benchmark's own config,
database and running services. ``run``'s first turn is timed from launch to
the arrival of its first completion request at the endpoint (both read
CLOCK_MONOTONIC, so the two processes' clocks agree); that includes imports,
the config, opening the audit database and the health checks of every service
and of the LLM.

Each command has a floor, measured in the same rounds: a fresh ``python -c``
of this interpreter that only does what the command cannot do without
(``FLOORS``: import the third-party libraries it needs and, for the config,
build one pydantic model), then exits as the console script does
(``FLOOR_EXIT``). A command can get no faster than its floor by
changing our code; what it takes over the floor is ours (our imports, building
the config's models, the database or the RPCs themselves).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import run_cli, timed_run
from tests.support.processes import REPO

ONE_MODEL = "from pydantic import create_model; create_model('Floor', x=(int, 0))(x=1)"
FLOORS = {
    "interpreter": "import argparse",
    "config + audit": f"import sqlite3, yaml, peewee; {ONE_MODEL}",
    "config + gRPC + HTTP": (
        f"import asyncio, yaml, grpc, httpx2; from grpc_health.v1 import health_pb2_grpc; {ONE_MODEL}"
    ),
    "config + audit + gRPC + HTTP + openai": (
        "import asyncio, sqlite3, yaml, peewee, grpc, httpx2, openai; from grpc_health.v1 import health_pb2_grpc; "
        f"{ONE_MODEL}"
    ),
}
"""What each kind of command cannot start without. For the config, one pydantic model with one field, built
and validated (``ONE_MODEL``): pydantic loads its field machinery (``pydantic.fields``, ``pydantic.types``,
``annotated_types``) only when the first model is defined, 40 to 60 ms here that no configuration can avoid;
``from pydantic import BaseModel`` alone loads none of it. ``run`` needs ``openai`` for its first completion,
and ``import openai`` loads the SDK's whole ``openai.types`` package (most of that floor)."""
COMMAND_FLOORS = {
    "--help": "interpreter",
    "sessions": "config + audit",
    "show": "config + audit",
    "export": "config + audit",
    "health": "config + gRPC + HTTP",
    "health (mTLS)": "config + gRPC + HTTP",
    "run": "config + audit + gRPC + HTTP + openai",
}


PROJECT_PACKAGES = ("heist_common", "orchestrator", "servers", "generated")


def compile_project() -> None:
    """Write the project's bytecode before timing: every command is measured as a user runs it the second time.

    Why: where PYTHONDONTWRITEBYTECODE is set (some shells and CI runners) nothing ever
    writes the project's ``.pyc`` files, so every fresh process would compile our
    modules from source (20 to 40 ms of a command) while pip compiled the libraries,
    floors included, at install. A user's first run writes them; the image compiles
    them at build time (Dockerfile).
    """
    command = [sys.executable, "-m", "compileall", "-q", *PROJECT_PACKAGES]
    subprocess.run(command, cwd=REPO, check=True, timeout=300, stdout=subprocess.DEVNULL)


FLOOR_EXIT = "import gc; gc.freeze()"
"""How a floor process ends: as the console script does (``orchestrator.cli.console_main``), without the
interpreter's final garbage collections, so a command's time over its floor is what our code adds."""


def floor_run(imports: str) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh ``python -c IMPORTS`` (same interpreter and site as the console script)."""
    _, wall, completed, cpu = timed_run([sys.executable, "-c", f"{imports}\n{FLOOR_EXIT}"], timeout_s=60)
    completed.check_returncode()
    return wall, cpu


def _floor_columns(median_s: float, floor: str, walls: list[float], cpus: list[float]) -> dict[str, Any]:
    floor_s = statistics.median(walls)
    return {
        "floor": floor,
        "floor_imports": FLOORS[floor],
        "floor_median_s": round(floor_s, 3),
        "floor_cpu_median_s": round(statistics.median(cpus), 3),
        "over_floor_s": round(median_s - floor_s, 3),
    }


def cli_startup(
    config_file: Path, session_id: str, out_dir: Path, repeats: int, mtls_config_file: Path | None = None
) -> dict[str, Any]:
    """Median wall and CPU time of each command that does not run a session, and of its floor.

    ``repeats`` rounds, each running every command and every floor once (interleaved, so
    other load on the machine weighs on both alike). ``mtls_config_file``: a mesh with the
    shipped transport (mTLS), for ``health`` as a user runs it (the benchmark's own mesh
    is plaintext, for h2load).
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
    floors = {COMMAND_FLOORS[name] for name in commands}
    walls: dict[str, list[float]] = {name: [] for name in [*commands, *floors]}
    cpus: dict[str, list[float]] = {name: [] for name in [*commands, *floors]}
    for _ in range(repeats):
        for name, args in commands.items():
            _, wall, _, cpu = run_cli(args, timeout_s=60)
            walls[name].append(wall)
            cpus[name].append(cpu)
        for floor in sorted(floors):
            wall, cpu = floor_run(FLOORS[floor])
            walls[floor].append(wall)
            cpus[floor].append(cpu)
    results = {}
    for name in commands:
        median_s = statistics.median(walls[name])
        floor = COMMAND_FLOORS[name]
        results[name] = {
            "median_s": round(median_s, 3),
            "cpu_median_s": round(statistics.median(cpus[name]), 3),
            "runs_s": [round(t, 3) for t in walls[name]],
            **_floor_columns(median_s, floor, walls[floor], cpus[floor]),
        }
    return results


def first_turn(config_file: Path, llm: HttpLLM, out_dir: Path, repeats: int) -> dict[str, Any]:
    """Seconds from launching ``orchestrator run --turns 1`` to its first completion request (median of ``repeats``).

    Its floor (imports only, one run after each launch) leaves out what no import can
    save: the health checks of the services and the LLM, and the first request itself.
    """
    delays: list[float] = []
    floor_walls: list[float] = []
    floor_cpus: list[float] = []
    for _ in range(repeats):
        llm.reset()
        launched, _, _, _ = run_cli(["--config", str(config_file), "run", "--turns", "1", "--out", str(out_dir)])
        first = llm.stats()["first_completion_at"]
        if first is None:
            raise RuntimeError("orchestrator run made no completion request")
        delays.append(first - launched)
        wall, cpu = floor_run(FLOORS[COMMAND_FLOORS["run"]])
        floor_walls.append(wall)
        floor_cpus.append(cpu)
    median_s = statistics.median(delays)
    return {
        "median_s": round(median_s, 3),
        "runs_s": [round(d, 3) for d in delays],
        **_floor_columns(median_s, COMMAND_FLOORS["run"], floor_walls, floor_cpus),
    }
