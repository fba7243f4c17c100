"""Drill: ``kill -9`` the orchestrator right after turn 5 of 12 is committed, then ``orchestrator resume`` it.

Real server processes, the scripted LLM, and ``orchestrator run`` as a
subprocess with the random turn strategy and no ``--seed`` (so the seed it
recorded is all that can continue the schedule). Turn 6's LLM reply is held
until the kill, so the process dies with turn 6 in flight and never committed.
Runs once per audit engine (SQLite file, PostgreSQL server).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.session.schedule import turn_schedule
from tests.drills.script import TURN_ORDER, DrillScript, drill_resilience
from tests.support.access_log import access_entries
from tests.support.processes import REPO, ProcessMesh, session_memories, stop_process
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.drill

TURNS = 12
KILL_AFTER = 5
POLL_S = 0.02


def orchestrator(mesh: ProcessMesh, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(mesh.config_path)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(POLL_S)


def test_kill_9_at_turn_5_then_resume_completes_the_same_session(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM, audit_url: str, tmp_path: Path
) -> None:
    mesh = drill_mesh(
        resilience=drill_resilience(), database={"url": audit_url}, session={"strategy": "random", "max_turns": TURNS}
    )
    mesh.start()
    sid = "heist_drill_resume"
    held = threading.Event()
    release = threading.Event()

    def hold_turn_6() -> None:
        held.set()
        release.wait(30)  # bounded: released right after the kill

    script = DrillScript().at(KILL_AFTER + 1, hold_turn_6)
    scripted_llm.responder = script
    first = orchestrator(mesh, tmp_path / "run.log", "run", "--turns", str(TURNS), "--session-id", sid)
    resumed: subprocess.Popen[bytes] | None = None
    try:

        def turn_5_committed() -> bool:
            try:
                return mesh.rows("SELECT num_turns FROM sessions WHERE session_id = ?", sid) == [(KILL_AFTER,)]
            except Exception:  # the run has not created its tables yet
                return False

        wait_for(lambda: held.is_set() and turn_5_committed(), 60, f"turn {KILL_AFTER} committed, turn 6 in flight")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        release.set()

        ((status, num_turns, pid, seed, planned),) = mesh.rows(
            "SELECT status, num_turns, pid, seed, turns_planned FROM sessions WHERE session_id = ?", sid
        )
        assert (status, num_turns, pid, planned) == ("active", KILL_AFTER, first.pid, TURNS), "kill -9 leaves it active"
        assert seed is not None, "a seed was generated and recorded although --seed was not given"
        before = mesh.rows(
            "SELECT id, turn_id, agent_name, message FROM messages WHERE session_id = ? ORDER BY id", sid
        )
        assert [row[1] for row in before] == list(range(1, KILL_AFTER + 1)), "turn 6 was in flight, never committed"

        resumed = orchestrator(mesh, tmp_path / "resume.log", "resume", sid)
        assert resumed.wait(timeout=120) == 0, (tmp_path / "resume.log").read_text()
    finally:
        release.set()
        stop_process(first, 5)
        stop_process(resumed, 5)
    output = (tmp_path / "resume.log").read_text()
    assert "Traceback" not in output
    assert f"Resuming {sid}: resumed after turn {KILL_AFTER} of {TURNS} (was active but stale: its process" in output
    assert f"Session:    {sid} (completed)" in output and f"{TURNS} turns in all" in output

    rows = mesh.rows("SELECT id, turn_id, agent_name, message FROM messages WHERE session_id = ? ORDER BY turn_id", sid)
    assert [row[1] for row in rows] == list(range(1, TURNS + 1)), "12 messages, turn IDs 1..12, none twice"
    assert rows[:KILL_AFTER] == before, "the turns before the kill are untouched"
    assert mesh.rows("SELECT status, num_turns, error FROM sessions WHERE session_id = ?", sid) == [
        ("completed", TURNS, None)
    ]
    # The random schedule continued as if never interrupted: the recorded seed's schedule, turn for turn.
    assert [row[2] for row in rows] == turn_schedule("random", TURN_ORDER, TURNS, int(seed))
    assert script.agents[KILL_AFTER] == script.agents[KILL_AFTER + 1] == rows[KILL_AFTER][2], "turn 6 asked again"
    assert session_memories(mesh.config, sid) == len(rows), "memory counts equal message rows"
    assert mesh.rows(
        "SELECT COUNT(*) FROM events WHERE session_id = ? AND service = 'orchestrator' AND operation = 'resume'", sid
    ) == [(1,)]
    assert mesh.rows("SELECT COUNT(*) FROM tool_usage WHERE session_id = ? AND turn_id > ?", sid, KILL_AFTER) != [(0,)]

    # One session ID everywhere: every call any service logged carried it, before and after the kill.
    time.sleep(0.3)  # access logs are flushed every 0.2 s
    entries = [entry for server in mesh.servers.values() for entry in access_entries(server.log())]
    assert {entry.get("session") for entry in entries} - {None, "-", ""} == {sid}
    exported = json.loads((mesh.config.sessions_dir / f"{sid}.json").read_text())
    assert [m["turn_id"] for m in exported["messages"]] == list(range(1, TURNS + 1))
    assert exported["session"]["status"] == "completed"
