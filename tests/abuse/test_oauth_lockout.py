"""Secret guessing as a denial of service: another caller's wrong secrets must not lock the crew out.

A guesser process sends wrong secrets for the orchestrator's and the tool
agents' OAuth clients every 0.1 s, over a fresh connection each round, while a
heist runs against real server processes. It must itself be slowed down
(RESOURCE_EXHAUSTED), and the heist's tool and memory calls must succeed as
they do without it. Under mTLS the guesser is on the same host with another
client certificate; under plaintext (the Kubernetes setting) it is another
host (127.0.0.2).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.session.runner import RunOptions, run_session
from tests.drills.script import DrillScript
from tests.support.processes import REPO, ProcessMesh, stop_process
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.abuse

TURNS = 12
GUESSED = ("orchestrator", "hacker", "safecracker", "mole")
LOCKED_WITHIN_S = 15.0
TURN_S = 0.2
"""How long the scripted model takes per turn, so the heist lasts a few seconds of guessing."""


def crew_outcome(mesh: ProcessMesh, session_id: str) -> dict[str, Any]:
    """What a session got done, from its audit rows."""

    def count(sql: str) -> int:
        return int(mesh.rows(sql, session_id)[0][0])

    return {
        "tools_ok": count("SELECT COUNT(*) FROM tool_usage WHERE session_id = ? AND success = 1"),
        "tools_failed": count("SELECT COUNT(*) FROM tool_usage WHERE session_id = ? AND success = 0"),
        "memory_exhausted": count(
            "SELECT COUNT(*) FROM events WHERE session_id = ? AND service = 'memory' "
            "AND status_code = 'RESOURCE_EXHAUSTED'"
        ),
        "oauth_or_memory_errors": count(
            "SELECT COUNT(*) FROM events WHERE session_id = ? AND turn_id IS NOT NULL "
            "AND service IN ('oauth', 'memory') AND status_code != 'OK'"
        ),
    }


def read_report(path: Path) -> dict[str, dict[str, int]]:
    if not path.exists():
        return {}
    report: dict[str, dict[str, int]] = json.loads(path.read_text())
    return report


def metric(mesh: ProcessMesh, name: str) -> float:
    """One sample of the OAuth server's Prometheus endpoint (0 if absent)."""
    with urllib.request.urlopen(mesh.metrics_url("oauth"), timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def heist(mesh: ProcessMesh, llm: ScriptedLLM, session_id: str) -> dict[str, Any]:
    script = DrillScript()
    llm.responder = lambda body: dataclasses.replace(script(body), delay_s=TURN_S)  # the guessing spans the heist
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id=session_id, export=False))
    assert len(result.turns) == TURNS
    return crew_outcome(mesh, result.session_id)


@pytest.mark.parametrize(
    ("transport", "guesser_flags"),
    [
        ("mtls", ["--identity", "grpcurl"]),  # same host as the orchestrator, another certificate
        ("plaintext", ["--source-host", "127.0.0.2"]),  # no certificate at all, another address
    ],
)
async def test_guessing_secrets_during_a_heist_slows_the_guesser_not_the_crew(
    tmp_path: Path, transport: str, guesser_flags: list[str]
) -> None:
    with ScriptedLLM() as llm:
        mesh = ProcessMesh(tmp_path, llm_base_url=llm.base_url, transport=transport)
        guesser: subprocess.Popen[bytes] | None = None
        try:
            mesh.start()
            undisturbed = await heist(mesh, llm, "heist_lockout_baseline")
            assert undisturbed["tools_ok"] == 9 and undisturbed["oauth_or_memory_errors"] == 0, undisturbed

            report = tmp_path / "guesser.json"
            with (tmp_path / "guesser.log").open("wb") as log:
                guesser = subprocess.Popen(
                    [sys.executable, "-m", "tests.abuse.oauth_guesser", "--config", str(mesh.config_path),
                     "--clients", ",".join(GUESSED), "--report", str(report), "--every-s", "0.1", *guesser_flags],
                    cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + LOCKED_WITHIN_S
            while not all(read_report(report).get(client, {}).get("RESOURCE_EXHAUSTED") for client in GUESSED):
                assert guesser.poll() is None, (tmp_path / "guesser.log").read_text()
                assert time.monotonic() < deadline, f"the guesser was never slowed down: {read_report(report)}"
                time.sleep(0.1)

            guesses_before = sum(read_report(report)["orchestrator"].values())
            attacked = await heist(mesh, llm, "heist_lockout_attacked")
            guesses_during = sum(read_report(report)["orchestrator"].values()) - guesses_before
        finally:
            stop_process(guesser, 5.0)
            mesh.stop()

    # The crew worked exactly as without the guesser: every tool call and every memory call went through.
    assert attacked == undisturbed, (attacked, undisturbed)
    assert attacked["memory_exhausted"] == 0
    # The guesser never got a token and spent most of its tries waiting.
    guessed = read_report(report)
    for client in GUESSED:
        codes = guessed[client]
        assert "OK" not in codes, codes
        assert codes["RESOURCE_EXHAUSTED"] > codes["UNAUTHENTICATED"], codes
    assert guesses_during >= TURNS * TURN_S / 0.1 / 2, "the guessing went on during the heist"


async def test_lockouts_are_counted_in_the_metrics(tmp_path: Path) -> None:
    with ScriptedLLM() as llm:
        mesh = ProcessMesh(tmp_path, llm_base_url=llm.base_url)
        try:
            mesh.start("oauth")
            before = metric(mesh, "heist_oauth_lockouts_total")
            report = tmp_path / "guesser.json"
            command = [sys.executable, "-m", "tests.abuse.oauth_guesser", "--config", str(mesh.config_path),
                       "--clients", "mole", "--report", str(report), "--every-s", "0.05"]  # fmt: skip
            guesser = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + LOCKED_WITHIN_S
                while not read_report(report).get("mole", {}).get("RESOURCE_EXHAUSTED"):
                    assert time.monotonic() < deadline and guesser.poll() is None
                    time.sleep(0.05)
            finally:
                stop_process(guesser, 5.0)
            assert metric(mesh, "heist_oauth_lockouts_total") >= before + 1
            assert metric(mesh, 'heist_oauth_tokens_refused_total{reason="locked_out"}') >= 1
        finally:
            mesh.stop()
