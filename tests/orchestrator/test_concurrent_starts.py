"""Many ``orchestrator run`` processes starting at once on one SQLite audit file: none fails to open it.

Each run is the real console script (its own interpreter and connections, the CLI's first open and the
session's), against the in-process services and the scripted model, all launched at the same moment on a
database in use. While they start, another writer holds the write lock, as one busy writer among many does on
a loaded machine, until the first run gets as far as its health check, or for longer than the busy timeout
once every run has the file open:
a start that needs the write lock just to open would fail "database is locked" (issue 24's failure at start);
none may. ``HEIST_CONCURRENT_STARTS=64`` runs the issue's count (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from heist_common.audit import AuditStore
from heist_common.audit.database import BUSY_TIMEOUT_MS
from tests.support.config import SERVICES, write_heist_config
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")
STARTS = int(os.environ.get("HEIST_CONCURRENT_STARTS", "12"))
TURNS = 2
HOLD_AFTER_OPEN_S = BUSY_TIMEOUT_MS / 1000 + 1
"""How long the writer keeps the lock once every run has the file open, unless one gets past opening it."""


def have_it_open(procs: list[subprocess.Popen[str]], db: Path) -> int:
    """How many of the runs have the database file open (a descriptor on it in /proc)."""
    count = 0
    for proc in procs:
        try:
            fds = list(Path(f"/proc/{proc.pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if fd.readlink() == db:
                    count += 1
                    break
            except OSError:
                continue
    return count


def start_all(config: Path, db: Path, count: int) -> list[subprocess.Popen[str]]:
    """Launch ``count`` runs at once."""
    command = [ORCHESTRATOR, "run", "--config", str(config), "--db", f"sqlite:///{db}", "--turns", str(TURNS)]
    logs = ["--out", str(db.parent / "logs")]
    return [
        subprocess.Popen(
            [*command, "--session-id", f"heist_start_{n:03d}", *logs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(count)
    ]


def outcomes(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """Each run's exit code and output (bounded: 300 s for them all, then the rest are killed)."""
    deadline = time.monotonic() + 300
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append((proc.returncode, out + err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


async def test_concurrent_run_starts_never_find_the_database_locked(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    # Generous deadlines: the services and the model all run in this one test process, which many runs
    # at once slow down; the point here is the database, not a service's deadline.
    patient = write_heist_config(
        tmp_path,
        "patient.yaml",
        deadlines=dict.fromkeys(SERVICES, 30.0),
        llm={"base_url": scripted_llm.base_url, "timeout_s": 60, "max_retries": 0, "tool_calling": "inline"},
    )
    live = mesh.write_config(patient, tmp_path / "live.yaml")
    db = tmp_path / "shared" / "audit.db"
    db.parent.mkdir()
    AuditStore.open(f"sqlite:///{db}").close()  # a database in use (a brand-new one: test_audit_store)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    procs = start_all(live, db, STARTS)
    try:
        opened_by_all = time.monotonic() + 120
        while not scripted_llm.probe_requests and time.monotonic() < opened_by_all:
            if have_it_open(procs, db) == STARTS:
                opened_by_all = min(opened_by_all, time.monotonic())
            await asyncio.sleep(0.05)
        released = min(opened_by_all + HOLD_AFTER_OPEN_S, time.monotonic() + 180)
        while not scripted_llm.probe_requests and time.monotonic() < released:
            await asyncio.sleep(0.05)
    finally:
        writer.execute("COMMIT")
        writer.close()
    runs = await asyncio.to_thread(outcomes, procs)
    locked = [printed.strip()[-300:] for _code, printed in runs if "locked" in printed]
    assert locked == [], f"{len(locked)} of {STARTS} runs failed: {locked[0]}"
    assert [(code, printed.strip()[-600:]) for code, printed in runs if code != 0] == []
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        statuses = connection.execute("SELECT status, COUNT(*) FROM sessions GROUP BY status").fetchall()
        turns = connection.execute("SELECT COUNT(*) FROM messages").fetchone()
    assert statuses == [("completed", STARTS)]
    assert turns == (STARTS * TURNS,)
