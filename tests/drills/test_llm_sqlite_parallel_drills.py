"""Drills on the LLM endpoint, the SQLite audit database, and four orchestrator processes at once (both engines)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from orchestrator.session.runner import RunOptions, run_session
from tests.drills.script import DrillScript, drill_resilience
from tests.support.processes import REPO, ProcessMesh, session_memories
from tests.support.scripted_llm import ScriptedLLM, hang, http_error, text

pytestmark = pytest.mark.drill

TURNS = 12
LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(2.0)
db.execute("COMMIT")
"""


def cli_run(mesh: ProcessMesh, session_id: str, *extra: str, **popen: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(mesh.config_path)]
    return subprocess.Popen(
        [*command, "--turns", str(TURNS), "--session-id", session_id, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


async def test_llm_500_and_hang_become_the_turns_message(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    timeout_s = 0.5
    mesh = drill_mesh(
        resilience=drill_resilience(),
        llm={"base_url": scripted_llm.base_url, "timeout_s": timeout_s, "max_retries": 0},
    )
    mesh.start()
    script = DrillScript().reply_at(3, http_error(500, "model crashed")).reply_at(5, hang(10))
    scripted_llm.responder = script.reply_at(8, http_error(503, "overloaded"))
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_llm"))

    assert result.status == "completed" and len(result.turns) == TURNS
    rows = mesh.rows("SELECT turn_id, status, message FROM messages WHERE session_id = ? ORDER BY turn_id",
                     result.session_id)
    assert [turn for turn, status, _ in rows if status == "llm_error"] == [3, 5, 8]
    assert rows[2][2] == "Error generating response: HTTP 500: model crashed"
    assert rows[4][2].startswith("Error generating response: TIMEOUT: no reply within 0.5s")
    assert rows[7][2] == "Error generating response: HTTP 503: overloaded"
    assert all(status == "ok" and message.startswith(f"Turn {turn}:") for turn, status, message in rows
               if turn not in (3, 5, 8))
    assert result.turns[4].total_ms < (timeout_s + 0.4) * 1000, "a hung LLM costs its timeout, not more"
    assert mesh.rows("SELECT turn_id, status_code FROM events WHERE session_id = ? AND service = 'llm' "
                     "AND turn_id IS NOT NULL ORDER BY turn_id", result.session_id) == [
        (3, "HTTP 500"), (5, "TIMEOUT"), (8, "HTTP 503")
    ]


async def test_sqlite_write_lock_held_by_another_process(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh(resilience=drill_resilience())
    mesh.start()
    holders: list[subprocess.Popen[str]] = []

    def lock_database() -> None:
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(mesh.db_path)], stdout=subprocess.PIPE,
                                  text=True)
        holders.append(holder)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

    scripted_llm.responder = DrillScript().at(3, lock_database)
    try:
        result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_busy"))
    finally:
        for holder in holders:
            holder.wait(timeout=10)
    assert holders[0].returncode == 0, "the other process committed its transaction"
    assert result.status == "completed" and result.error is None
    assert 1500 < result.turns[2].total_ms < 4000, "turn 3's write waited for the lock, then went through"
    assert mesh.rows("SELECT COUNT(*) FROM messages WHERE session_id = ?", result.session_id) == [(TURNS,)]
    assert mesh.rows("SELECT status, num_turns FROM sessions WHERE session_id = ?", result.session_id) == [
        ("completed", TURNS)
    ]


def test_disk_full_stops_the_run_cleanly_and_marks_it_failed(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh(resilience=drill_resilience())
    mesh.start()
    scripted_llm.responder = DrillScript()
    warm_up = cli_run(mesh, "heist_drill_warmup", "--turns", "1")
    assert warm_up.wait(timeout=60) == 0
    room = mesh.db_path.stat().st_size + 48 * 1024  # the WAL file may grow to 48 KiB: a few turns

    def full_disk() -> None:
        # RLIMIT_FSIZE: the kernel refuses to grow any file of the process past `room` bytes (EFBIG),
        # exactly where a full disk refuses with ENOSPC; SQLite's write fails and it rolls back.
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    started = time.monotonic()
    run = cli_run(mesh, "heist_drill_full", preexec_fn=full_disk)
    out, err = run.communicate(timeout=60)

    assert run.returncode == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert "cannot write a turn" in err and "disk I/O error" in err and "no transaction is active" not in err
    assert time.monotonic() - started < 30
    (status, num_turns, error), = mesh.rows(
        "SELECT status, num_turns, error FROM sessions WHERE session_id = 'heist_drill_full'"
    )
    assert status == "failed" and "cannot write a turn" in error
    assert 1 <= num_turns < TURNS
    # Every turn the summary reported is in the audit; the one that failed is not half-written.
    assert mesh.rows("SELECT COUNT(*) FROM messages WHERE session_id = 'heist_drill_full'") == [(num_turns,)]
    assert f"Turns:      {num_turns}" in out


def test_four_cli_sessions_at_once_share_one_mesh_and_one_database(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM, audit_url: str
) -> None:
    # Once on a SQLite file, once on a PostgreSQL database: the same processes, the same outcome.
    mesh = drill_mesh(resilience=drill_resilience(), database={"url": audit_url})
    mesh.start()
    endpoints = [ScriptedLLM(responder=lambda body, i=i: text(f"session {i} speaking")).start() for i in range(4)]
    try:
        runs = [cli_run(mesh, f"heist_drill_par_{i}", "--llm-base-url", endpoints[i].base_url) for i in range(4)]
        outputs = [run.communicate(timeout=90) for run in runs]
    finally:
        for endpoint in endpoints:
            endpoint.stop()

    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert "locked" not in out + err and "Traceback" not in err
    assert mesh.rows("SELECT session_id, status, num_turns FROM sessions ORDER BY session_id") == [
        (f"heist_drill_par_{i}", "completed", TURNS) for i in range(4)
    ]
    for i in range(4):
        sid = f"heist_drill_par_{i}"
        messages = mesh.rows("SELECT DISTINCT message FROM messages WHERE session_id = ?", sid)
        assert messages == [(f"session {i} speaking",)], "every message landed in its own session"
        (count,), = mesh.rows("SELECT COUNT(*) FROM messages WHERE session_id = ?", sid)
        assert count == TURNS == session_memories(mesh.config, sid)
    assert mesh.rows("SELECT COUNT(*) FROM events WHERE detail LIKE '%locked%'") == [(0,)]
