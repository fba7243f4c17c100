"""An honest outcome: a session whose crew could not use a service ends ``degraded`` (exit 8), not ``completed``.

``orchestrator run`` runs as its own process against real server processes, so
the exit code, the summary it prints and the audit row are exactly what a user
gets. OAuth refusing every secret, and memory down for the whole run, each
degrade the session and are named with their cause; a healthy run still
completes with exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from heist_common.credentials import client_secret_env_var
from heist_common.exit_codes import ExitCode
from tests.drills.script import DrillScript
from tests.support.processes import REPO, ProcessMesh
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.drill

TURNS = 8
SERVICES_LINE = re.compile(r"^Degraded:   (\w+): 0 of (\d+) calls succeeded \((.*)\)$", re.MULTILINE)


def run_cli(mesh: ProcessMesh, session_id: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``orchestrator run`` as a process of its own, as a user runs it."""
    command = [sys.executable, "-m", "orchestrator.cli", "--config", str(mesh.config_path), "run",
               "--turns", str(TURNS), "--session-id", session_id]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120, check=False
    )


def audit_row(mesh: ProcessMesh, session_id: str) -> tuple[str, str | None, int]:
    sql = "SELECT status, error, num_turns FROM sessions WHERE session_id = ?"
    status, error, turns = mesh.rows(sql, session_id)[0]
    return str(status), error, int(turns)


async def test_oauth_refusing_every_secret_degrades_the_session(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh().start()
    scripted_llm.responder = DrillScript()
    clients = {agent.oauth_client for agent in mesh.config.agents} | {mesh.config.session.oauth_client}
    wrong = {client_secret_env_var(client): "not-the-secret" for client in clients}
    run = run_cli(mesh, "heist_degraded_oauth", wrong)

    assert run.returncode == ExitCode.DEGRADED, run.stdout + run.stderr
    assert "heist_degraded_oauth (degraded)" in run.stdout
    named = {service: (int(calls), cause) for service, calls, cause in SERVICES_LINE.findall(run.stdout)}
    assert named["oauth"][1] == "UNAUTHENTICATED: invalid client credentials"
    assert named["memory"] == (2 * TURNS, "UNAUTHENTICATED: no token: invalid client credentials")
    # The tool agents' calls went out without a token: each tool is named too, with that cause.
    assert set(named) == {"oauth", "memory", "calculator", "file_reader", "database_query"}
    assert named["calculator"][1] == "NO_TOKEN: safecracker has no OAuth token this turn"
    assert "Traceback" not in run.stdout + run.stderr
    status, error, turns = audit_row(mesh, "heist_degraded_oauth")
    assert (status, turns) == ("degraded", TURNS)
    assert error is not None and error.startswith("oauth: 0 of ") and "memory: 0 of 16 calls succeeded" in error


async def test_memory_down_for_the_whole_run_degrades_the_session(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh()
    mesh.start(*(name for name in mesh.servers if name != "memory"))
    scripted_llm.responder = DrillScript()
    run = run_cli(mesh, "heist_degraded_memory")

    assert run.returncode == ExitCode.DEGRADED, run.stdout + run.stderr
    named = SERVICES_LINE.findall(run.stdout)
    assert [(service, cause.split(":")[0]) for service, _, cause in named] == [("memory", "UNAVAILABLE")]
    assert int(named[0][1]) >= TURNS, "every turn's fetch and store count, also those the open circuit skipped"
    status, error, _ = audit_row(mesh, "heist_degraded_memory")
    assert status == "degraded" and error is not None and error.startswith("memory: 0 of ")
    # Resuming would play nothing (every turn ran): refused, and the reason is the service.
    command = [sys.executable, "-m", "orchestrator.cli", "--config", str(mesh.config_path), "resume"]
    command.append("heist_degraded_memory")
    resume = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert resume.returncode == ExitCode.NOT_RESUMABLE and "is degraded" in resume.stderr, resume.stderr


async def test_a_healthy_run_still_completes(drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM) -> None:
    mesh = drill_mesh().start()
    scripted_llm.responder = DrillScript()
    run = run_cli(mesh, "heist_healthy")

    assert run.returncode == ExitCode.OK, run.stdout + run.stderr
    assert "heist_healthy (completed)" in run.stdout and "Degraded:" not in run.stdout
    assert audit_row(mesh, "heist_healthy") == ("completed", None, TURNS)
